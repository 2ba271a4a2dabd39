"""Serving cost: the run's teacher ensemble vs the distilled student, top-50 for every user.

    .venv/bin/python bench/bench_inference.py --config configs/citeulike.yaml [--set k=v ...]
        [--student URI] [--batch 1024] [--threads 1] [--users N] [--repeat 3] [--plot]

Both sides rank every item for every user in user batches, as a server precomputing lists would:
- ensemble: each teacher rebuilt from its newest checkpoint's best weights
  (:mod:`hetcomp_dist.teachers.load`) scores the batch, keeps its top-K unobserved items
  (K = trajectory.k), and the lists are merged by rank importance exp(-r / distill.temperature)
  into the top 50 (the target HetComp distils);
- student: ``student.pt`` of ``<run>/distill/hetcomp`` served as plain MF (one matmul), top 50.

Each side runs in a fresh subprocess (this file with --side) on the same machine, so neither
inherits the other's memory. Memory is resident set size from /proc/self/status: the peak is
reset (clear_refs) before a phase and VmHWM read after it, minus VmRSS at its start
(tracemalloc would miss torch's allocator). "setup" is one-off work before the first batch
(LightGCN's propagation, I-AE's item codes). As a check that the right weights were loaded, the
ensemble side also reports how much of the first batch's top-50 matches the ensemble of the
teachers' final trajectory snapshots.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = 50


def _status(key: str) -> float:
    """/proc/self/status field in MB (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def student_uri(cfg, given: str | None) -> str:
    from hetcomp_dist import storage

    if given:
        return given
    for folder in ("distill", "distill_quick"):   # distill_quick: bench/report.py --quick's students
        uri = storage.join(cfg.run, folder, "hetcomp")
        if storage.is_complete(uri):
            return uri
    raise SystemExit(f"no complete hetcomp student under {cfg.run}/distill (run hetcomp distill or pass --student)")


def run_side(args) -> dict:
    """One side, in this process: load, set up, score every user; a dict of measurements."""
    import numpy as np
    import torch

    from hetcomp_dist import config, storage
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.distill.ensemble import ensemble_topk, rank_importance
    from hetcomp_dist.distill.train import ITEM_KEY, USER_KEY
    from hetcomp_dist.evaluate import dot_scorer, topk_items
    from hetcomp_dist.run import RunConfig
    from hetcomp_dist.teachers.load import load_teacher, parameter_count

    torch.set_num_threads(args.threads)
    cfg = config.load(RunConfig, args.config, args.set)
    data = load_dataset(cfg.dataset_uri)
    n_users = min(args.users or data.n_users, data.n_users)
    rss0 = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.side == "ensemble":
            teachers = [load_teacher(t, cfg.run, data) for t in cfg.teachers]
            params = sum(parameter_count(m) for m in teachers)
            load_s = time.perf_counter() - t0
            scorers = [m.scorer() for m in teachers]
        else:
            state = torch.load(io.BytesIO(storage.read_bytes(student_uri(cfg, args.student), "student.pt")),
                               weights_only=True)
            params = sum(v.numel() for v in state.values())
            load_s = time.perf_counter() - t0
            scorers = [dot_scorer(state[USER_KEY], state[ITEM_KEY])]
        setup_s = time.perf_counter() - t0 - load_s
        load_mb = _status("VmHWM") - rss0
        k_list, importance = cfg.trajectory.k, rank_importance(cfg.trajectory.k, cfg.distill.temperature)
        rss1 = _status("VmRSS")
        _reset_peak()
        times, first = [], None
        for _ in range(args.repeat):
            t1 = time.perf_counter()
            for lo in range(0, n_users, args.batch):
                users = np.arange(lo, min(lo + args.batch, n_users))
                if args.side == "ensemble":
                    lists = torch.stack([torch.from_numpy(topk_items(s, data.train, users, k_list, args.batch))
                                         for s in scorers], 1)
                    top = ensemble_topk(lists, data.n_items, TOP, importance)
                else:
                    top = torch.from_numpy(topk_items(scorers[0], data.train, users, TOP, args.batch))
                first = top if first is None else first
            times.append(time.perf_counter() - t1)
        score_s = min(times)            # best of --repeat: the least disturbed by other processes
        score_mb = _status("VmHWM") - rss1
    out = {"side": args.side, "models": len(scorers) if args.side == "ensemble" else 1, "params": int(params),
           "users": int(n_users), "load_s": load_s, "setup_s": setup_s, "score_s": score_s,
           "load_mb": load_mb, "score_mb": score_mb}
    if args.side == "ensemble":
        out["snapshot_agreement"] = _snapshot_agreement(cfg, first, data.n_items, importance)
    return out


def _snapshot_agreement(cfg, top, n_items: int, importance) -> float:
    """Share of the first batch's top-50 also in the ensemble of the stored final snapshots."""
    from hetcomp_dist import storage
    from hetcomp_dist.distill.ensemble import ensemble_topk
    from hetcomp_dist.teachers.trajectory import TrajectoryReader

    uris = [cfg.layout.trajectory(t.name) for t in cfg.teachers]
    lists = TrajectoryReader(uris).trajectories(0, len(top))[:, :, -1]
    stored = ensemble_topk(lists, n_items, TOP, importance)
    same = [len(set(a.tolist()) & set(b.tolist()) - {-1}) / max(1, (a >= 0).sum().item()) for a, b in zip(top, stored)]
    return float(sum(same) / len(same))


def measure(args, side: str) -> dict:
    """``side`` in a fresh subprocess; adds its whole-process peak RSS (imports included)."""
    cmd = [sys.executable, __file__, "--side", side, "--config", args.config, "--batch", str(args.batch),
           "--threads", str(args.threads), "--users", str(args.users or 0), "--repeat", str(args.repeat)]
    cmd += [a for s in args.set for a in ("--set", s)] + (["--student", args.student] if args.student else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{side} side failed (status {status})")
    return {**json.loads(stdout.strip().splitlines()[-1]), "process_peak_mb": usage.ru_maxrss / 1024}


ROWS = [("parameters", "params", "{:,.0f}"), ("load s", "load_s", "{:.2f}"), ("setup s", "setup_s", "{:.2f}"),
        ("scoring s (all users, top-50; best pass)", "score_s", "{:.3f}"), ("users / s", "users_per_s", "{:,.0f}"),
        ("RSS of loading (MB)", "load_mb", "{:.1f}"), ("peak RSS of scoring (MB)", "score_mb", "{:.1f}"),
        ("process peak RSS (MB)", "process_peak_mb", "{:.0f}")]


def render(ens: dict, stu: dict) -> str:
    """Markdown: one row per measurement, the ensemble, the student and their ratio."""
    lines = [f"| measure | ensemble ({ens['models']} teachers) | student | ensemble / student |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        a, b = ens[key], stu[key]
        ratio = "–" if not b else f"{a / b:.1f}x" if a >= b else f"{a / b:.3g}x"   # throughput rows are < 1
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return "\n".join(lines)


def plot(ens: dict, stu: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("params", "parameters"), ("score_s", "scoring s"), ("score_mb", "scoring peak MB"), ("process_peak_mb", "process MB")]
    fig, axes = plt.subplots(1, len(keys), figsize=(11, 3.2))
    for ax, (key, title) in zip(axes, keys):
        ax.bar(["ensemble", "student"], [ens[key], stu[key]], color=["0.55", "C0"])
        ax.set_title(title, fontsize=9)
        if key == "params":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--student", help="student URI (default: <run>/distill/hetcomp, else <run>/distill_quick/hetcomp)")
    ap.add_argument("--batch", type=int, default=1024, help="users per batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--repeat", type=int, default=3, help="scoring passes; the fastest is reported")
    ap.add_argument("--users", type=int, default=0, help="score only the first N users (0: all)")
    ap.add_argument("--out", help="folder for inference.md (default: bench/out/<config name>)")
    ap.add_argument("--plot", action="store_true", help="also write inference.png")
    ap.add_argument("--side", choices=("ensemble", "student"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return

    from hetcomp_dist import config
    from hetcomp_dist.run import RunConfig

    cfg = config.load(RunConfig, args.config, args.set)
    uri = student_uri(cfg, args.student)
    args.student = uri
    ens, stu = measure(args, "ensemble"), measure(args, "student")
    for r in (ens, stu):
        r["users_per_s"] = r["users"] / r["score_s"]
    table = render(ens, stu)
    notes = [f"run `{cfg.run}`, {ens['users']} users x all items, batches of {args.batch}, best of {args.repeat} passes, "
             f"{args.threads} torch thread(s), each side in its own process on the same machine",
             f"teachers: {', '.join(f'{t.name} ({t.model})' for t in cfg.teachers)}; student `{uri}`",
             "memory: RSS from /proc/self/status (VmHWM reset before each phase, minus VmRSS at its start)",
             f"ensemble top-50 of the first batch vs the ensemble of the stored final snapshots: "
             f"{ens['snapshot_agreement'] * 100:.1f}% shared (loaded weights check)"]
    text = f"# Inference: teacher ensemble vs student ({Path(args.config).name})\n\n{table}\n\n" + \
        "\n".join(f"- {n}" for n in notes) + "\n"
    out_dir = Path(args.out or REPO / "bench" / "out" / Path(args.config).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.md").write_text(text)
    if args.plot:
        plot(ens, stu, out_dir / "inference.png")
    print(text)
    print(f"written to {out_dir / 'inference.md'}" + (" and inference.png" if args.plot else ""))


if __name__ == "__main__":
    main()
