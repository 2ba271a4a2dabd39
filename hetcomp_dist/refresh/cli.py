"""``hetcomp refresh | rollback | export | recommend`` (added to the hetcomp command by :func:`add_parsers`)."""

from __future__ import annotations

import argparse
import json
import sys

from hetcomp_dist.storage import StorageError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="FILE", help="YAML run config with an optional refresh section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set run=s3://bucket/run --set refresh.gate.tolerance=0.05")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refresh", help="new interactions -> the next data version, warm-started teachers and student, "
                       "the quality gate, and (if it passes) the export and the promotion",
                       description="One nightly refresh of a run under its lease; see hetcomp_dist/refresh/job.py.")
    _config_args(p)
    p.add_argument("--new-data", metavar="URI", help="new interactions with timestamps (csv, parquet, inter); "
                   "without it and before any version: v0001 from data.source")
    p.add_argument("--owner", help="the lease's owner name (default: host:pid)")
    p.add_argument("--ray", action="store_true", help="teachers on Ray actors, the student on distill.workers Ray "
                   "Train workers (same as --set refresh.ray=true; ray.address / $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_cmd_refresh)

    p = sub.add_parser("rollback", help="point current back at an earlier promoted version")
    _config_args(p)
    p.add_argument("--to", metavar="VERSION", help="e.g. v0003 (default: the version current pointed at before)")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("export", help="write a version's embeddings and top-K by original ids (Parquet)")
    _config_args(p)
    p.add_argument("--version", help="default: the newest version with a student")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("recommend", help="print a user's recommendations from the current export")
    _config_args(p, required=False)
    p.add_argument("--run", metavar="URI", help="the run (instead of --config)")
    p.add_argument("--user", required=True, metavar="ORIGINAL_ID")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(func=_cmd_recommend)


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> None:
    print(f"hetcomp {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _cmd_refresh(args: argparse.Namespace) -> None:
    from hetcomp_dist import lease as leases
    from hetcomp_dist.refresh import job, loading

    cfg, rcfg = loading.load(args.config, [*args.overrides, *(["refresh.ray=true"] if args.ray else [])])
    try:
        report = job.refresh(cfg, rcfg, args.new_data, owner=args.owner)
    except leases.LeaseHeld as e:
        _fail(args, f"another refresh or rollback holds the run ({e})", 3)
    print(f"{report['version']}: {'promoted' if report['promote'] else 'not promoted'}")
    if not report["promote"]:
        raise SystemExit(1)


def _cmd_rollback(args: argparse.Namespace) -> None:
    from hetcomp_dist import lease as leases
    from hetcomp_dist.refresh import job, loading

    cfg, rcfg = loading.load(args.config, args.overrides)
    try:
        pointer = job.rollback(cfg, rcfg, args.to)
    except leases.LeaseHeld as e:
        _fail(args, f"another refresh or rollback holds the run ({e})", 3)
    except ValueError as e:
        _fail(args, str(e))
    print(f"current -> {pointer['version']} ({pointer['reason']}, promotion {pointer['promotion']})")


def _cmd_export(args: argparse.Namespace) -> None:
    from hetcomp_dist import storage
    from hetcomp_dist.refresh import job, loading
    from hetcomp_dist.refresh.layout import Layout, version_number

    cfg, rcfg = loading.load(args.config, args.overrides)
    layout = Layout(cfg.run)
    if args.version:
        try:
            number = version_number(args.version)
        except ValueError as e:
            _fail(args, str(e))
    else:
        with_student = [v for v in layout.data_versions() if storage.is_complete(layout.student(v))]
        if not with_student:
            _fail(args, f"{cfg.run}: no version has a student yet")
        number = with_student[-1]
    if not storage.is_complete(layout.student(number)):
        _fail(args, f"{layout.student(number)}: no complete student")
    manifest = job.export_version(layout, number, rcfg.export_k)
    print(f"export of {manifest['version']}: {manifest['n_users']} users, top-{manifest['k']}, at {layout.export(number)}")


def _cmd_recommend(args: argparse.Namespace) -> None:
    from hetcomp_dist.refresh import export, promote
    from hetcomp_dist.refresh.layout import Layout

    if args.run:
        run = args.run
    elif args.config:
        from hetcomp_dist.refresh import loading
        run = loading.load(args.config, args.overrides)[0].run
    else:
        _fail(args, "give --config or --run")
    current = promote.read_current(Layout(run))
    if current is None:
        raise StorageError(f"{run}: nothing promoted yet (no current export)")
    try:
        recs = export.recommend(current["export"], args.user, args.k)
    except KeyError:
        _fail(args, f"user {args.user!r} is not in {current['version']}'s export", 1)
    if args.json:
        print(json.dumps({"user": args.user, "version": current["version"],
                          "items": [{"item": i, "score": s} for i, s in recs]}))
        return
    for rank, (item, score) in enumerate(recs, 1):
        print(f"{rank}\t{item}\t{score:.4f}")

