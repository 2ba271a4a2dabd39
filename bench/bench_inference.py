"""Serving cost: the run's teacher ensemble vs the distilled student, top-50 for every user.

    .venv/bin/python bench/bench_inference.py --config configs/citeulike.yaml [--set k=v ...]
        [--student URI] [--batch 1024] [--threads 1] [--users N] [--repeat 3] [--out DIR] [--plot]

inference.md goes where ``hetcomp compare`` writes by default (runs/compare/<config name>), so
that the comparison's report includes the serving cost.

Both sides rank every item for every user in user batches, as a server precomputing lists would:
- ensemble: each teacher rebuilt from its newest checkpoint's best weights
  (:mod:`hetcomp_dist.teachers.load`) scores the batch, keeps its top-K unobserved items
  (K = trajectory.k), and the lists are merged by rank importance exp(-r / distill.temperature)
  into the top 50 (the target HetComp distils);
- student: ``student.pt`` of ``<run>/distill/hetcomp`` served as plain MF (one matmul), top 50.

Each side runs in a fresh subprocess (:func:`hetcomp_dist.benchutil.call_in_subprocess`) on the
same machine, so neither inherits the other's memory. Memory is resident set size from
/proc/self/status: the peak is reset (clear_refs) before a phase and VmHWM read after it, minus
VmRSS at its start (tracemalloc would miss torch's allocator). "setup" is one-off work before the first batch
(LightGCN's propagation, I-AE's item codes). As a check that the right weights were loaded, the
ensemble side also reports how much of the first batch's top-50 matches the ensemble of the
teachers' final trajectory snapshots.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from hetcomp_dist.benchutil import call_in_subprocess, markdown_table, pyplot, reset_peak_rss, rss_mib, save_figure
from hetcomp_dist.compare import default_out

TOP = 50


def student_uri(cfg, given: str | None) -> str:
    from hetcomp_dist import storage

    if given:
        return given
    for folder in ("distill", "distill_quick"):   # distill_quick: the students of `hetcomp compare --quick`
        uri = storage.join(cfg.run, folder, "hetcomp")
        if storage.is_complete(uri):
            return uri
    raise SystemExit(f"no complete hetcomp student under {cfg.run}/distill (run hetcomp distill or pass --student)")


def _load_side(cfg, data, side: str, student: str | None):
    """(what one side loads, its parameter count): every teacher's model, or the student's state dict."""
    import torch

    from hetcomp_dist import storage
    from hetcomp_dist.teachers.load import load_teacher, parameter_count

    if side == "ensemble":
        teachers = [load_teacher(t, cfg.run, data) for t in cfg.teachers]
        return teachers, sum(parameter_count(m) for m in teachers)
    state = torch.load(io.BytesIO(storage.read_bytes(student_uri(cfg, student), "student.pt")), weights_only=True)
    return state, sum(v.numel() for v in state.values())


def _scorers(side: str, loaded):
    """One-off setup before the first batch (LightGCN's propagation, I-AE's item codes)."""
    from hetcomp_dist.distill.train import ITEM_KEY, USER_KEY
    from hetcomp_dist.evaluate import dot_scorer

    if side == "ensemble":
        return [m.scorer() for m in loaded]
    return [dot_scorer(loaded[USER_KEY], loaded[ITEM_KEY])]


def _score_all(cfg, data, side: str, scorers, n_users: int, batch: int, repeat: int):
    """(best pass seconds, the first batch's top-50) over ``repeat`` passes of every user."""
    import numpy as np
    import torch

    from hetcomp_dist.distill.ensemble import ensemble_topk, rank_importance
    from hetcomp_dist.evaluate import topk_items

    k_list, importance = cfg.trajectory.k, rank_importance(cfg.trajectory.k, cfg.distill.temperature)
    times, first = [], None
    for _ in range(repeat):
        t1 = time.perf_counter()
        for lo in range(0, n_users, batch):
            users = np.arange(lo, min(lo + batch, n_users))
            if side == "ensemble":
                lists = torch.stack([torch.from_numpy(topk_items(s, data.train, users, k_list, batch))
                                     for s in scorers], 1)
                top = ensemble_topk(lists, data.n_items, TOP, importance)
            else:
                top = torch.from_numpy(topk_items(scorers[0], data.train, users, TOP, batch))
            first = top if first is None else first
        times.append(time.perf_counter() - t1)
    return min(times), first          # best of --repeat: the least disturbed by other processes


def run_side(config: str, overrides: list[str], side: str, student: str | None, batch: int, threads: int,
             users: int, repeat: int) -> dict:
    """One side, in this process: load, set up, score every user; a dict of measurements."""
    import torch

    from hetcomp_dist import config as configs
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.distill.ensemble import rank_importance
    from hetcomp_dist.run import RunConfig

    torch.set_num_threads(threads)
    cfg = configs.load(RunConfig, config, overrides)
    data = load_dataset(cfg.dataset_uri)
    n_users = min(users or data.n_users, data.n_users)
    rss0 = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        loaded, params = _load_side(cfg, data, side, student)
        load_s = time.perf_counter() - t0
        scorers = _scorers(side, loaded)
        setup_s = time.perf_counter() - t0 - load_s
        load_mb = rss_mib("VmHWM") - rss0
        rss1 = rss_mib()
        reset_peak_rss()
        score_s, first = _score_all(cfg, data, side, scorers, n_users, batch, repeat)
        score_mb = rss_mib("VmHWM") - rss1
    out = {"side": side, "models": len(scorers), "params": int(params), "users": int(n_users), "load_s": load_s,
           "setup_s": setup_s, "score_s": score_s, "load_mb": load_mb, "score_mb": score_mb}
    if side == "ensemble":
        importance = rank_importance(cfg.trajectory.k, cfg.distill.temperature)
        out["snapshot_agreement"] = _snapshot_agreement(cfg, first, data.n_items, importance)
    return out


def _snapshot_agreement(cfg, top, n_items: int, importance) -> float:
    """Share of the first batch's top-50 also in the ensemble of the stored final snapshots."""
    from hetcomp_dist.distill.ensemble import ensemble_topk
    from hetcomp_dist.teachers.trajectory import TrajectoryReader

    uris = [cfg.layout.trajectory(t.name) for t in cfg.teachers]
    lists = TrajectoryReader(uris).trajectories(0, len(top))[:, :, -1]
    stored = ensemble_topk(lists, n_items, TOP, importance)
    same = [len(set(a.tolist()) & set(b.tolist()) - {-1}) / max(1, (a >= 0).sum().item()) for a, b in zip(top, stored)]
    return float(sum(same) / len(same))


def measure(args: argparse.Namespace, side: str) -> dict:
    """``side`` in a fresh subprocess; adds its whole-process peak RSS (imports included)."""
    kwargs = dict(config=args.config, overrides=args.set, side=side, student=args.student, batch=args.batch,
                  threads=args.threads, users=args.users, repeat=args.repeat)
    result, child = call_in_subprocess(run_side, kwargs)
    return {**result, "process_peak_mb": child.peak_rss_mib}


ROWS = [("parameters", "params", "{:,.0f}"), ("load s", "load_s", "{:.2f}"), ("setup s", "setup_s", "{:.2f}"),
        ("scoring s (all users, top-50; best pass)", "score_s", "{:.3f}"), ("users / s", "users_per_s", "{:,.0f}"),
        ("RSS of loading (MB)", "load_mb", "{:.1f}"), ("peak RSS of scoring (MB)", "score_mb", "{:.1f}"),
        ("process peak RSS (MB)", "process_peak_mb", "{:.0f}")]


def render(ens: dict, stu: dict) -> str:
    """Markdown: one row per measurement, the ensemble, the student and their ratio."""
    body = []
    for label, key, fmt in ROWS:
        a, b = ens[key], stu[key]
        ratio = "–" if not b else f"{a / b:.1f}x" if a >= b else f"{a / b:.3g}x"   # throughput rows are < 1
        body.append([label, fmt.format(a), fmt.format(b), ratio])
    return markdown_table(["measure", f"ensemble ({ens['models']} teachers)", "student", "ensemble / student"], body)


def plot(ens: dict, stu: dict, path: Path) -> None:
    keys = [("params", "parameters"), ("score_s", "scoring s"), ("score_mb", "scoring peak MB"), ("process_peak_mb", "process MB")]
    fig, axes = pyplot().subplots(1, len(keys), figsize=(11, 3.2))
    for ax, (key, title) in zip(axes, keys):
        ax.bar(["ensemble", "student"], [ens[key], stu[key]], color=["0.55", "C0"])
        ax.set_title(title, fontsize=9)
        if key == "params":
            ax.set_yscale("log")
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--student", help="student URI (default: <run>/distill/hetcomp, else <run>/distill_quick/hetcomp)")
    ap.add_argument("--batch", type=int, default=1024, help="users per batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--repeat", type=int, default=3, help="scoring passes; the fastest is reported")
    ap.add_argument("--users", type=int, default=0, help="score only the first N users (0: all)")
    ap.add_argument("--out", help="folder for inference.md (default: the one `hetcomp compare` writes to, "
                    "runs/compare/<config name>, so that its report includes the table)")
    ap.add_argument("--plot", action="store_true", help="also write inference.png")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from hetcomp_dist import config
    from hetcomp_dist.run import RunConfig

    cfg = config.load(RunConfig, args.config, args.set)
    args.student = uri = student_uri(cfg, args.student)
    ens, stu = measure(args, "ensemble"), measure(args, "student")
    for r in (ens, stu):
        r["users_per_s"] = r["users"] / r["score_s"]
    notes = [f"run `{cfg.run}`, {ens['users']} users x all items, batches of {args.batch}, best of {args.repeat} passes, "
             f"{args.threads} torch thread(s), each side in its own process on the same machine",
             f"teachers: {', '.join(f'{t.name} ({t.model})' for t in cfg.teachers)}; student `{uri}`",
             "memory: RSS from /proc/self/status (VmHWM reset before each phase, minus VmRSS at its start)",
             f"ensemble top-50 of the first batch vs the ensemble of the stored final snapshots: "
             f"{ens['snapshot_agreement'] * 100:.1f}% shared (loaded weights check)"]
    text = f"# Inference: teacher ensemble vs student ({Path(args.config).name})\n\n{render(ens, stu)}\n\n" + \
        "\n".join(f"- {n}" for n in notes) + "\n"
    out_dir = Path(args.out) if args.out else default_out(args.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.md").write_text(text)
    if args.plot:
        plot(ens, stu, out_dir / "inference.png")
    print(text)
    print(f"written to {out_dir / 'inference.md'}" + (" and inference.png" if args.plot else ""))


if __name__ == "__main__":
    main()
