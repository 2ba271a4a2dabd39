"""Time-ordered replay on MovieLens-100K: the refreshed student against a full retrain from scratch, over seeds.

The first ``--start`` of the timeline (by timestamp) is v0001; the rest is cut into ``--steps`` equal
slices, one refresh each. For every seed of ``--seeds``, two runs see the same files and the same data
versions (the data split does not depend on the seed: refresh.seed stays the config's):

- refresh: teachers and student warm-started from the previous version (refresh.warm_start=true);
- retrain: every version trained from scratch with the configured epochs (refresh.warm_start=false).

The seed is that of both teachers (each ``teachers[i].seed``, passed as a ``teachers=[...]`` override,
since ``--set`` cannot index a list) and of the student (``distill.seed``): model init, batch order,
negative sampling. At every step: holdout (test) Recall@20 / NDCG@20 of both students (the gate's
candidate figures), mean and sd over the seeds, the wall time of both (teachers + student + gate) and
their ratio; a summary row over the refresh steps (v0002 on) and a plot.

The gate's holdout is the newest ``refresh.holdout_fraction`` of each step's new rows (its rows whose item
is in train), evaluated for every user with such a row. ``--holdout-fraction`` sets it for both runs
(the same override on both sides; a larger one trains each step on fewer of its new rows, which join
train in the next version), ``--start`` a smaller v0001 and so larger steps: both give more holdout users.

    .venv/bin/python bench/bench_refresh.py --out bench/out/refresh_replay [--work /tmp/bench_refresh_replay]
        [--seeds 0 1 2] [--steps 7] [--start 0.7] [--holdout-fraction F] [--set key=value ...]

Only table.md, results.json and refresh_vs_retrain.png go to --out; the day files and the run
directories go to --work (each run directory is replaced when its replay starts). ``--table-only``
rebuilds the outputs from --work's results.json (e.g. of an interrupted run: the seeds it completed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import yaml

from hetcomp_dist.benchutil import time_slices
from hetcomp_dist.config import apply_overrides
from hetcomp_dist.refresh import job, loading

METRICS = ("recall@20", "ndcg@20")


def timeline(source: Path, out: Path, steps: int, start: float) -> list[str]:
    return time_slices(source, out, steps, start)


def seed_overrides(cfg_path: str, overrides: list[str], seed: int) -> list[str]:
    """Overrides giving both teachers and the student ``seed`` (after the user's own overrides)."""
    raw = apply_overrides(yaml.safe_load(Path(cfg_path).read_text()) or {}, list(overrides))
    teachers = [{**t, "seed": seed} for t in raw.get("teachers") or []]
    return [*overrides, "teachers=" + json.dumps(teachers), f"distill.seed={seed}"]


def replay(cfg_path: str, run: str, days: list[str], warm: bool, overrides: list[str], seed: int) -> list[dict]:
    if Path(run).exists():
        shutil.rmtree(run)
    cfg, rcfg = loading.load(cfg_path, [f"run={run}", f"refresh.warm_start={str(warm).lower()}",
                                       "refresh.gate.tolerance=1.0", *overrides])
    rows = []
    for day in days:
        t0 = time.perf_counter()
        report = job.refresh(cfg, rcfg, day, log=lambda m: None)
        cand = report["gate"]["candidate"]
        rows.append({"version": report["version"], "seconds": time.perf_counter() - t0,
                     "recall@20": cand["metrics"].get("recall@20"), "ndcg@20": cand["metrics"].get("ndcg@20"),
                     "users": cand["n_users"], "holdout_rows": report["lineage"].get("holdout_rows")})
        print(json.dumps({"mode": "refresh" if warm else "retrain", "seed": seed, **rows[-1]}), flush=True)
    return rows


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: dict) -> dict:
    """Per step and over the refresh steps: mean / sd over the seeds (only seeds with both runs complete)."""
    seeds = [s for s, r in results["seeds"].items() if r.get("refresh") and r.get("retrain")
             and len(r["refresh"]) == len(r["retrain"]) == results["n_versions"]]
    steps = []
    for j in range(results["n_versions"]):
        w = [results["seeds"][s]["refresh"][j] for s in seeds]
        c = [results["seeds"][s]["retrain"][j] for s in seeds]
        row = {"version": w[0]["version"], "users": w[0]["users"], "holdout_rows": w[0].get("holdout_rows")}
        assert all(x["users"] == row["users"] for x in w + c), "holdout users differ between runs"
        for mode, xs in (("refresh", w), ("retrain", c)):
            for key in (*METRICS, "seconds"):
                row[f"{key} {mode}"] = _ms([x[key] for x in xs])
        for key in METRICS:
            row[f"{key} diff"] = _ms([a[key] - b[key] for a, b in zip(w, c)])   # paired by seed
        row["time ratio"] = row["seconds refresh"][0] / row["seconds retrain"][0]
        steps.append(row)
    return {"seeds": seeds, "steps": steps}


def _verdict(row: dict, key: str) -> str:
    """within: |mean refresh - mean retrain| <= the larger of the two sds over seeds; else below / above."""
    (mw, sw), (mc, sc) = row[f"{key} refresh"], row[f"{key} retrain"]
    if abs(mw - mc) <= max(sw, sc):
        return "within"
    return "below" if mw < mc else "above"


def render(summary: dict) -> str:
    pm = lambda t: f"{t[0]:.4f} ± {t[1]:.4f}"  # noqa: E731
    head = ["version", "holdout users", "recall@20 refresh", "recall@20 retrain", "ndcg@20 refresh",
            "ndcg@20 retrain", "s refresh", "s retrain", "time ratio"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    steps = summary["steps"]
    for row in steps:
        note = " (both from scratch)" if row is steps[0] else ""
        lines.append(f"| {row['version']}{note} | {row['users']} | {pm(row['recall@20 refresh'])} | "
                     f"{pm(row['recall@20 retrain'])} | {pm(row['ndcg@20 refresh'])} | {pm(row['ndcg@20 retrain'])} | "
                     f"{row['seconds refresh'][0]:.1f} | {row['seconds retrain'][0]:.1f} | {row['time ratio']:.2f} |")
    later = steps[1:]
    if later:
        mean = lambda key: statistics.fmean(r[key][0] for r in later)  # noqa: E731
        counts = {k: [sum(_verdict(r, k) == v for r in later) for v in ("within", "below", "above")] for k in METRICS}
        cnt = lambda k: "within/below/above {}/{}/{}".format(*counts[k])  # noqa: E731
        users = [r["users"] for r in later]
        lines.append(f"| **{later[0]['version']}-{later[-1]['version']}** | {min(users)}-{max(users)} | "
                     f"{mean('recall@20 refresh'):.4f} ({cnt('recall@20')}) | {mean('recall@20 retrain'):.4f} | "
                     f"{mean('ndcg@20 refresh'):.4f} ({cnt('ndcg@20')}) | {mean('ndcg@20 retrain'):.4f} | "
                     f"{mean('seconds refresh'):.1f} | {mean('seconds retrain'):.1f} | "
                     f"{sum(r['seconds refresh'][0] for r in later) / sum(r['seconds retrain'][0] for r in later):.2f} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> str:
    summary = summarise(results)
    if not summary["seeds"]:
        raise SystemExit("no seed has both runs complete: nothing to tabulate")
    table = render(summary)
    foot = (f"\nSeeds {', '.join(summary['seeds'])} (mean ± sd over them; wall seconds: mean). Last row: the "
            f"refresh steps, means of the per-step means; \"within\" = |refresh - retrain| <= the larger sd, "
            f"time ratio = total refresh s / total retrain s.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + foot)
    (out / "results.json").write_text(json.dumps({**results, "summary": summary}, indent=2))
    _plot(summary, out / "refresh_vs_retrain.png")
    return table + foot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="table.md, results.json, refresh_vs_retrain.png")
    p.add_argument("--work", default="/tmp/bench_refresh_replay", help="day files and run directories")
    p.add_argument("--config", default="configs/refresh_tiny.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--start", type=float, default=0.7)
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="refresh.holdout_fraction for both runs (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--table-only", action="store_true", help="rebuild --out from --work's results.json")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    partial = work / "results.json"
    if args.table_only:
        print(write_outputs(json.loads(partial.read_text()), out))
        return
    overrides = list(args.overrides)
    if args.holdout_fraction is not None:
        overrides.append(f"refresh.holdout_fraction={args.holdout_fraction}")
    mirror = Path(os.environ.get("HETCOMP_DATASETS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    days = timeline(mirror / "ml-100k" / "ml-100k.inter", work / "days", args.steps, args.start)
    results = {"config": args.config, "steps": args.steps, "start": args.start, "overrides": overrides,
               "n_versions": len(days), "seeds": {}}
    t0 = time.perf_counter()
    for seed in args.seeds:
        ov = seed_overrides(args.config, overrides, seed)
        runs = results["seeds"].setdefault(str(seed), {})
        for mode, warm in (("refresh", True), ("retrain", False)):
            runs[mode] = replay(args.config, str(work / f"seed{seed}" / mode), days, warm, ov, seed)
            partial.write_text(json.dumps(results, indent=2))
    results["total_seconds"] = time.perf_counter() - t0
    partial.write_text(json.dumps(results, indent=2))
    print(write_outputs(results, out))


def _plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=110)
    steps = summary["steps"]
    x = list(range(len(steps)))
    for j, key in enumerate((*METRICS, "seconds")):
        ax = fig.add_subplot(1, 3, j + 1)
        for mode, fmt, label, dx in (("refresh", "o-", "refresh (warm start)", -0.06),
                                     ("retrain", "s--", "full retrain", 0.06)):
            ax.errorbar([i + dx for i in x], [r[f"{key} {mode}"][0] for r in steps],
                        yerr=[r[f"{key} {mode}"][1] for r in steps], fmt=fmt, capsize=3, label=label)
        ax.set_xticks(x, [r["version"] for r in steps], rotation=45)
        ax.set_title((key + " (holdout)") if key != "seconds" else "wall seconds per version")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"refresh vs retrain, mean ± sd over seeds {', '.join(summary['seeds'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
