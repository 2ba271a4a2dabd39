"""The reference-regime table of bench/fidelity.sh: HetComp, its ablation (the final ensemble, L_R only)
and the student alone, mean and standard deviation over the seeds that have finished.

    .venv/bin/python bench/fidelity_report.py [--run runs/citeulike] [--out docs/results/fidelity_table.md] [--record]
        [--regime ref|fast]

Reads the committed cell records ``docs/results/fidelity_cells/<dataset>/<cell>.json`` and
``<run>/distill/<cell>/metrics.json`` (cell: ``<regime>_<method>_T<temperature>_s<seed>``); a finished run
folder wins over its record, and ``--record`` writes its record, so a finished cell outlives the run
folder (which a fresh checkout loses). A run still in progress is listed by its checkpoint's epoch
and left out of the means.

A second table pairs HetComp (and, in the fast regime, HetComp with the progress-tied DKC schedule,
also against HetComp) with its ablation seed by seed on test R@20, N@20, R@50 and N@50 (same
seed, same temperature) and says whether HetComp is ahead beyond the seeds' spread: the mean paired
difference larger than the larger of the two methods' standard deviations, with every seed on the
same side. It also gives the paired t statistic (mean difference over its standard error; with 3
seeds, |t| > 4.3 is p < 0.05). A third gives the cost: epochs and training time, per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hetcomp_dist import storage
from hetcomp_dist.benchutil import markdown_table, mean_sd

METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50", "popularity_lift@50", "coverage@50")
PAIRED = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")
LABELS = {"hetcomp": "HetComp", "hetcomp-progress": "HetComp, progress-tied DKC",
          "final_ensemble": "ablation (final ensemble, L_R only)", "bpr": "student alone (BPR)"}
# (method, baseline) pairs of the comparison, where both have finished seeds
PAIRS = (("hetcomp", "final_ensemble"), ("hetcomp-progress", "final_ensemble"), ("hetcomp-progress", "hetcomp"))


CELLS = Path("docs/results/fidelity_cells")


def record(metrics: dict, source: str) -> dict:
    """What the tables need from a finished run's metrics.json, plus its valid Recall@50 curve."""
    return {"test": {k: metrics["test"][k] for k in METRICS}, "epochs": metrics["epochs"],
            "best_epoch": metrics.get("best_epoch"), "lr_start": _lr_start(metrics),
            "train_seconds": metrics["train_seconds"], "source": source,
            "trajectory_stages": metrics.get("trajectory_stages"),
            "valid_recall@50": [[h["epoch"], h.get("valid", {}).get("recall@50")] for h in metrics["history"]]}


def _runs(run: Path, cells: Path, write: bool = False, regime: str = "ref") -> dict[tuple[str, str], list[dict]]:
    """(method, temperature) -> the finished cells' records; runs in progress as {"in_progress": epoch}.
    With ``write``, a finished run folder's record is written to ``cells``."""
    found: dict[str, dict] = {p.stem: json.loads(p.read_text()) for p in sorted(cells.glob(f"{regime}_*_T*_s*.json"))}
    for path in sorted((run / "distill").glob(f"{regime}_*_T*_s*")):
        if not path.is_dir():                          # a running cell's lease file beside its folder
            continue
        if storage.is_complete(str(path)):
            found[path.name] = record(json.loads((path / "metrics.json").read_text()), f"{path}/metrics.json")
            if write:
                cells.mkdir(parents=True, exist_ok=True)
                (cells / f"{path.name}.json").write_text(json.dumps(found[path.name], indent=1) + "\n")
        elif path.name not in found:
            epochs = sorted(p.name for p in (path / "checkpoints").glob("epoch-*")) if (path / "checkpoints").exists() else []
            found[path.name] = {"in_progress": epochs[-1] if epochs else "starting"}
    out: dict[tuple[str, str], list[dict]] = {}
    for name, rec in sorted(found.items()):
        method, rest = name[len(regime) + 1:].rsplit("_T", 1)
        temperature, seed = rest.split("_s")
        out.setdefault((method, "-" if method == "bpr" else temperature), []).append({"seed": int(seed), **rec})
    return out


def _lr_start(m: dict) -> int | None:
    """The first epoch trained with L_R (None: never)."""
    epochs = [0] + [h["epoch"] for h in m["history"]]
    for before, h in zip(epochs, m["history"]):
        if h.get("phase") == "L_R":
            return before + 1                      # the epochs after the evaluation that ended DKC
    return None


def table(runs: dict) -> str:
    rows = []
    for (method, temperature), items in sorted(runs.items()):
        done = [m for m in items if "in_progress" not in m]
        busy = [f"s{m['seed']} at {m['in_progress']}" for m in items if "in_progress" in m]
        cells = [mean_sd([m["test"][k] for m in done], "{:.1f}" if "lift" in k else "{:.4f}") for k in METRICS]
        lr = [m["lr_start"] for m in done if m["lr_start"] is not None]
        rows.append([LABELS.get(method, method), temperature, len(done), *cells,
                     mean_sd([m["epochs"] for m in done], "{:.0f}"), mean_sd(lr, "{:.0f}") or "-",
                     mean_sd([m["train_seconds"] / 60 for m in done], "{:.0f}"), ", ".join(busy)])
    head = ["method", "T", "seeds", *METRICS, "epochs", "L_R from epoch", "train min", "in progress"]
    return markdown_table(head, rows, numeric=False)


def verdict(ours: list[float], theirs: list[float], name: str = "HetComp") -> str:
    """A method's (``name``) paired values against its baseline's (same seeds, in order), in words."""
    diffs = [h - a for h, a in zip(ours, theirs)]
    if len(diffs) < 2:
        return "one seed: no verdict"
    spread = max(statistics.stdev(ours), statistics.stdev(theirs))
    mean = statistics.mean(diffs)
    if abs(mean) > spread and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        return f"{name} {'ahead' if mean > 0 else 'behind'} beyond the spread"
    return "within the seeds' spread"


def paired_t(hetcomp: list[float], ablation: list[float]) -> str:
    """The paired t statistic of HetComp minus the ablation ("-" under two seeds or with no spread)."""
    diffs = [h - a for h, a in zip(hetcomp, ablation)]
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return "-"
    return f"{statistics.mean(diffs) / (statistics.stdev(diffs) / len(diffs) ** 0.5):+.1f}"


def comparison(runs: dict) -> str:
    """Each method minus its baseline (PAIRS) on the seeds both finished, per temperature and test
    metric, then the cost: epochs and training time, the method over its baseline."""
    rows, cost_rows = [], []
    temperatures = sorted({t for _, t in runs if t != "-"})
    for (method, base), temperature in [(p, t) for p in PAIRS for t in temperatures]:
        ours = {m["seed"]: m for m in runs.get((method, temperature), []) if "in_progress" not in m}
        theirs = {m["seed"]: m for m in runs.get((base, temperature), []) if "in_progress" not in m}
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        name = LABELS[method].split(" (")[0]
        pair = f"{name} vs {LABELS[base].split(' (')[0]}"
        for k in PAIRED:
            h, a = [ours[s]["test"][k] for s in seeds], [theirs[s]["test"][k] for s in seeds]
            rows.append([pair, temperature, k, " ".join(map(str, seeds)), " ".join(f"{x - y:+.4f}" for x, y in zip(h, a)),
                         f"{100 * statistics.mean(x / y - 1 for x, y in zip(h, a)):+.1f}%", paired_t(h, a),
                         verdict(h, a, name)])
        # epochs: the cost free of the host's load, which varied across the sessions a run spans
        epochs = [ours[s]["epochs"] / theirs[s]["epochs"] for s in seeds]
        cost = [ours[s]["train_seconds"] / theirs[s]["train_seconds"] for s in seeds]
        cost_rows.append([pair, temperature, " ".join(map(str, seeds)), " ".join(f"{x:.2f}" for x in epochs),
                          f"{statistics.mean(epochs):.2f}x", " ".join(f"{x:.2f}" for x in cost), f"{statistics.mean(cost):.2f}x"])
    if not rows:
        return "No seed has finished for both a method and its baseline."
    head = ["pair", "T", "test metric", "paired seeds", "difference per seed", "relative", "paired t", "verdict"]
    cost_head = ["pair", "T", "paired seeds", "epochs ratio per seed", "epochs ratio",
                 "train time ratio per seed", "train time ratio"]
    return markdown_table(head, rows, numeric=False) + "\n\n" + markdown_table(cost_head, cost_rows, numeric=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/citeulike")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--cells", help=f"the cell records (default {CELLS}/<the run folder's name>)")
    ap.add_argument("--record", action="store_true", help="write the records of the finished run folders")
    ap.add_argument("--regime", default="ref", choices=("ref", "fast"), help="which cells (bench/fidelity.sh's REGIME)")
    args = ap.parse_args()
    run = Path(args.run)
    runs = _runs(run, Path(args.cells) if args.cells else CELLS / run.name, args.record, args.regime)
    text = table(runs) + "\n\n" + comparison(runs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
