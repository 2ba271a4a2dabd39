"""The ``hetcomp`` command. Each subcommand exits non-zero with a one-line error on bad input."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import NoReturn

from hetcomp_dist import compare, storage
from hetcomp_dist.config import ConfigError
from hetcomp_dist.data import prepare as prep
from hetcomp_dist.data import registry
from hetcomp_dist.data.formats import FORMATS, Columns, DataError
from hetcomp_dist.refresh import cli as refresh_cli

def _demo_config() -> str:
    """configs/demo.yaml of the working directory (the image's /app), else of the source checkout."""
    here = Path("configs") / "demo.yaml"
    return str(here if here.is_file() else Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// URIs (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")


def _add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text: one readable line per evaluation and a summary table; json: every event as a JSON line")


def _prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="raw interactions -> train/valid/test Parquet with dense ids",
                       description="Prepare a dataset. NAME_OR_PATH is a registered dataset "
                       f"({', '.join(sorted(registry.REGISTRY))}), a file, or a directory holding "
                       "train.txt/test.txt or users.dat; any path may be a file:// or s3:// URI.")
    p.add_argument("source", metavar="NAME_OR_PATH")
    p.add_argument("--out", required=True, metavar="URI", help="output location (path, file://, s3://)")
    p.add_argument("--protocol", choices=prep.PROTOCOLS, help="split protocol (default: the dataset's)")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from the registry or file name)")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-user-items", type=int)
    p.add_argument("--valid-fraction", type=float)
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--rating-threshold", type=float, help="keep interactions with rating >= this")
    p.add_argument("--keep-unseen", action="store_true", help="keep valid/test items that never occur in train")
    p.add_argument("--user-col", default="user")
    p.add_argument("--item-col", default="item")
    p.add_argument("--time-col", help="timestamp column (csv/parquet)")
    p.add_argument("--rating-col", help="rating column (csv/parquet)")
    p.add_argument("--id-type", choices=("int", "str"), help="ids are integers (checked) or string tokens")
    p.add_argument("--delimiter", default=",", help="csv field delimiter (use '\\t' for TSV)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> None:
    options = dict(seed=args.seed, min_user_items=args.min_user_items, valid_fraction=args.valid_fraction,
                   test_fraction=args.test_fraction, rating_threshold=args.rating_threshold)
    if args.keep_unseen:
        options["drop_unseen"] = False
    columns = Columns(args.user_col, args.item_col, args.time_col, args.rating_col)
    delimiter = "\t" if args.delimiter in ("\\t", "tab") else args.delimiter
    meta = prep.prepare(args.source, args.out, args.protocol, args.format, columns, args.id_type, delimiter,
                        progress=not args.quiet, **options)
    print(prep.describe(meta))
    print(f"written to {args.out}")


def _datasets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list registered datasets; --counts prepares each and prints its counts")
    p.add_argument("--counts", action="store_true", help="prepare each available dataset (default protocol) and print counts")
    p.set_defaults(func=_cmd_datasets)


def _cmd_datasets(args: argparse.Namespace) -> None:
    for name, spec in sorted(registry.REGISTRY.items()):
        print(f"{name:12s} format={spec.format:9s} protocol={spec.protocol:15s} {spec.note}")
        if args.counts:
            with tempfile.TemporaryDirectory() as tmp:
                print("  ", prep.describe(prep.prepare(name, tmp, progress=False)))


def _reference_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="evaluate reference recommenders (most-popular, item-kNN) on a prepared dataset")
    p.add_argument("dataset", metavar="DATASET_URI", help="output of `hetcomp prepare`")
    p.add_argument("--out", metavar="URI", help="write metrics.json (with a manifest) here")
    p.add_argument("--models", default="mostpop,itemknn", help="comma-separated: mostpop, itemknn, ease")
    p.add_argument("--ks", default="10,20,50", help="cutoffs")
    _add_storage_args(p)
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args: argparse.Namespace) -> None:
    from hetcomp_dist.reference import evaluate_references

    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise ConfigError(f"--ks {args.ks!r}: expected comma-separated integers, e.g. 10,20,50") from None
    if any(k < 1 for k in ks):
        raise ConfigError(f"--ks {args.ks!r}: every cutoff must be >= 1")
    results = evaluate_references(args.dataset, args.models.split(","), ks, out=args.out)
    print(format_table(results, ks))


def format_table(results: dict[str, dict[str, dict[str, float]]], ks: list[int]) -> str:
    """Markdown table: one row per model, test Recall/NDCG@K, popularity lift and coverage at max K."""
    k = max(ks)
    head = ["model"] + [f"{m}@{x}" for x in ks for m in ("recall", "ndcg")] + [f"popularity_lift@{k}", f"coverage@{k}", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        t = r["test"]
        cells = [name] + [f"{t[f'{m}@{x}']:.4f}" for x in ks for m in ("recall", "ndcg")]
        cells += [f"{t[f'popularity_lift@{k}']:.1f}", f"{t[f'coverage@{k}']:.3f}", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _train_teachers_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-teachers", help="train the run's teachers (one Ray actor each, concurrently)",
                       description="Prepare the run's dataset if missing, then train every teacher of the run "
                       "config: one Ray actor per teacher with the CPUs/GPUs it asks for, restarted from its "
                       "last checkpoint if it dies. Writes trajectories and <run>/teachers/summary.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (parsed as YAML), e.g. --set run=s3://bucket/run --set ray.max_restarts=1")
    p.add_argument("--sequential", action="store_true", help="train one teacher after another in this process, without Ray")
    _add_log_format(p)
    p.set_defaults(func=_cmd_train_teachers)


def _cmd_train_teachers(args: argparse.Namespace) -> None:
    from hetcomp_dist.progress import TeacherProgress
    from hetcomp_dist.run import load_run
    from hetcomp_dist.teachers.actors import TeachersFailed, format_summary, train_teachers

    cfg = load_run(args.config, args.overrides)
    progress = TeacherProgress(cfg.teachers, cfg.layout.tensorboard, args.log_format)
    try:
        summaries = train_teachers(cfg, sequential=args.sequential, report=progress)
    except TeachersFailed as e:  # each failure's traceback is printed above
        print(f"hetcomp {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        progress.close()
    if args.log_format == "json":
        print(json.dumps({"event": "summary", "teachers": summaries}, default=str))
        return
    print(format_summary(summaries, cfg.ks))
    print(f"summary written to {cfg.layout.teachers_summary}")


def _distill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil the run's teachers into a student (one process, or Ray Train with --ray)",
                       description="Build ensemble targets from the teachers' trajectories, run DKC and AKT, and "
                       "write the student, metrics.json, report.md and its plots (curves.png, stages.png) under "
                       "<run>/distill/<method>.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.method=final_ensemble")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Train with distill.workers workers (ray.address / $RAY_ADDRESS, else a local Ray)")
    _add_log_format(p)
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> None:
    from hetcomp_dist.distill.report import metric_table
    from hetcomp_dist.pipeline import distill_run
    from hetcomp_dist.progress import Progress
    from hetcomp_dist.run import load_run

    cfg = load_run(args.config, args.overrides)
    out = cfg.student_uri()
    if args.ray:
        from hetcomp_dist.distill.ray_job import distill_ray

        metrics = distill_ray(cfg, log_format=args.log_format)
    else:
        from hetcomp_dist import device

        device.resolve(cfg.distill.device, "distill.device")     # before the TensorBoard writer or the dataset
        progress = Progress(f"student {cfg.distill.method}", cfg.distill.max_epochs, cfg.distill.select_metric,
                            args.log_format, tensorboard_uri(cfg, out))
        try:
            metrics = distill_run(cfg, progress)
        finally:
            progress.close()
    if args.log_format == "json":
        print(json.dumps({"event": "summary", "out": out, "test": metrics["test"]}))
        return
    t = metrics["test"]
    print(f"\nstudent ({metrics['method']}): test " + ", ".join(f"{k} {t[k]:.4f}" for k in t if k.startswith(("recall", "ndcg"))))
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs']}, {metrics['train_seconds']:.0f} s of training, "
          f"{t.get('n_users', '?')} test users\n")
    print("\n".join(metric_table(t)))
    print(f"written to {out}")


def tensorboard_uri(cfg, out: str) -> str:
    """TensorBoard event files of a student: ``<run>/tensorboard/student-<name of its output>``."""
    return cfg.layout.tensorboard("student-" + out.rstrip("/").rsplit("/", 1)[-1])


def _ensemble_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="evaluate each teacher's final snapshot alone and the teachers' ensemble",
                       description="On the run's prepared dataset, evaluate every teacher's final trajectory "
                       "snapshot alone and the ensemble of all of them (distill.teachers if set) with rank "
                       "importance exp(-r / temperature); print test and valid tables and the ensemble's gain "
                       "over the best teacher; write metrics.json and report.md under <run>/ensemble.")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.teachers=[MF,GNN]")
    p.add_argument("--temperature", type=float, help="rank-importance temperature (default: distill.temperature)")
    p.add_argument("--out", metavar="URI", help="output location (default: <run>/ensemble)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_cmd_ensemble)


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from hetcomp_dist.distill import ensemble_eval
    from hetcomp_dist.run import load_run

    cfg = load_run(args.config, args.overrides)

    def show(done: int, total: int) -> None:
        print(f"\rensemble evaluation: users {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    results = ensemble_eval.evaluate_ensemble(cfg, args.temperature, progress=None if args.quiet else show)
    out = args.out or cfg.layout.ensemble
    ensemble_eval.write_results(results, out)
    print(f"temperature {results['temperature']:g}, {results['n_users']} evaluated users, "
          f"{results['seconds']:.1f} s")
    print("\ntest\n" + ensemble_eval.format_table(results, "test"))
    print("\nvalid\n" + ensemble_eval.format_table(results, "valid"))
    print("\n" + ensemble_eval.format_comparison(results))
    print(f"written to {out}")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on local disk: CiteULike, six teachers on Ray, ensemble, "
                       "students, report (about 15 minutes on 2 cores)",
                       description="Runs configs/demo.yaml (or --config): prepare, train the teachers as concurrent "
                       "Ray actors under time budgets, evaluate their ensemble, distil the student alone (BPR) and the "
                       "HetComp student, and write <run>/report. Complete stages are reused, so a rerun only fills gaps.")
    p.add_argument("--config", default=_demo_config(), metavar="FILE", help="run config (default: configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run=/tmp/demo")
    _add_log_format(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> None:
    import time

    from hetcomp_dist.pipeline import run_pipeline
    from hetcomp_dist.run import load_run

    cfg = load_run(args.config, args.overrides)
    t0 = time.perf_counter()
    run_pipeline(cfg, log_format=args.log_format)
    print(f"run written to {cfg.run} in {time.perf_counter() - t0:.0f} s (report: {cfg.layout.report})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetcomp", description="Distil a heterogeneous recommender ensemble (HetComp).")
    sub = parser.add_subparsers(dest="command", required=True)
    _prepare_parser(sub)
    _datasets_parser(sub)
    _reference_parser(sub)
    _train_teachers_parser(sub)
    _distill_parser(sub)
    _ensemble_parser(sub)
    _demo_parser(sub)
    compare.add_parser(sub)
    refresh_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "endpoint_url", None):
        storage.configure(endpoint_url=args.endpoint_url)
    try:
        args.func(args)
    except (DataError, storage.StorageError, ConfigError) as e:
        print(f"hetcomp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (the ``hetcomp`` script, ``python -m``, the jobs): ``main``, then ``_leave``
    with its exit status."""
    try:
        code = main(argv)
    except SystemExit as e:                              # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:                            # after the exit work, die of SIGINT as Python would
        print("hetcomp: interrupted", file=sys.stderr)
        code = -signal.SIGINT
    except BaseException:                                # a bug: its traceback, then the same exit
        traceback.print_exc()
        code = 1
    _leave(code)


def _leave(code: int) -> NoReturn:
    """Python's own exit work (non-daemon threads joined, then atexit: Ray's shutdown, logging, temporary
    folders, then a flush), then an exit that skips the C++ static destructors. pyarrow's thread pools can
    still hold a joinable thread when libc tears them down, and the process then dies of SIGABRT
    ("terminate called without an active exception", apache/arrow#34314) after its work and its message
    are done, so the exit status lies. ``code`` -SIGINT dies of that signal."""
    for thread in threading.enumerate():                # what the interpreter's own exit waits for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):                    # a closed pipe: nothing left to say
            pass
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


if __name__ == "__main__":
    run()
