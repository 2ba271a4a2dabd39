"""Time-ordered replay on MovieLens-100K: the refreshed student against a full retrain from scratch.

The first ``--start`` of the timeline (by timestamp) is v0001; the rest is cut into ``--steps`` equal
slices, one refresh each. Two runs see the same files and the same data versions:

- refresh: teachers and student warm-started from the previous version (refresh.warm_start=true);
- retrain: every version trained from scratch with the configured epochs (refresh.warm_start=false).

At every step: holdout (test) Recall@20 / NDCG@20 of both students (the gate's candidate figures) and
the wall time of both (teachers + student), their ratio; a markdown table and a plot under --out.

    .venv/bin/python bench/bench_refresh.py --out /tmp/bench_refresh [--steps 7] [--config configs/refresh_tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hetcomp_dist.benchutil import time_slices
from hetcomp_dist.refresh import job, loading


def timeline(source: Path, out: Path, steps: int, start: float) -> list[str]:
    return time_slices(source, out, steps, start)


def replay(cfg_path: str, run: str, days: list[str], warm: bool, overrides: list[str]) -> list[dict]:
    cfg, rcfg = loading.load(cfg_path, [f"run={run}", f"refresh.warm_start={str(warm).lower()}",
                                       "refresh.gate.tolerance=1.0", *overrides])
    rows = []
    for day in days:
        t0 = time.perf_counter()
        report = job.refresh(cfg, rcfg, day, log=lambda m: None)
        cand = report["gate"]["candidate"]
        rows.append({"version": report["version"], "seconds": time.perf_counter() - t0,
                     "recall@20": cand["metrics"].get("recall@20"), "ndcg@20": cand["metrics"].get("ndcg@20"),
                     "users": cand["n_users"]})
        print(json.dumps({"mode": "refresh" if warm else "retrain", **rows[-1]}), flush=True)
    return rows


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/refresh_tiny.yaml")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--start", type=float, default=0.7)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    mirror = Path(os.environ.get("HETCOMP_DATASETS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    days = timeline(mirror / "ml-100k" / "ml-100k.inter", out / "days", args.steps, args.start)
    warm = replay(args.config, str(out / "refresh"), days, True, args.overrides)
    cold = replay(args.config, str(out / "retrain"), days, False, args.overrides)
    lines = ["| version | holdout users | recall@20 refresh | recall@20 retrain | ndcg@20 refresh | ndcg@20 retrain "
             "| s refresh | s retrain | time ratio |", "|---|" + "---|" * 8]
    for w, c in zip(warm, cold):
        lines.append(f"| {w['version']} | {w['users']} | {w['recall@20']:.4f} | {c['recall@20']:.4f} | {w['ndcg@20']:.4f} "
                     f"| {c['ndcg@20']:.4f} | {w['seconds']:.1f} | {c['seconds']:.1f} | {w['seconds'] / c['seconds']:.2f} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"refresh": warm, "retrain": cold}, indent=2))
    _plot(warm, cold, out / "refresh_vs_retrain.png")
    print(table)


def _plot(warm: list[dict], cold: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=110)
    steps = [w["version"] for w in warm]
    for j, key in enumerate(("recall@20", "ndcg@20", "seconds")):
        ax = fig.add_subplot(1, 3, j + 1)
        ax.plot(steps, [w[key] for w in warm], "o-", label="refresh (warm start)")
        ax.plot(steps, [c[key] for c in cold], "s--", label="full retrain")
        ax.set_title(key if key != "seconds" else "wall seconds")
        ax.tick_params(axis="x", labelrotation=45)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
