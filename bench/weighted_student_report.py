"""The table of bench/weighted_student.sh: HetComp's student from seven CiteULike teachers (one weak),
equal teacher weights against weights chosen on valid; mean and standard deviation over the finished seeds.

    .venv/bin/python bench/weighted_student_report.py [--run runs/citeulike]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetcomp_dist import storage
from hetcomp_dist.benchutil import markdown_table, mean_sd

METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50", "popularity_lift@50", "coverage@50")




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/citeulike")
    args = ap.parse_args()
    rows, weights_seen = [], {}
    for weights in ("equal", "valid"):
        done = []
        for path in sorted(Path(args.run, "distill").glob(f"weak_{weights}_s*")):
            if storage.is_complete(str(path)):
                done.append(json.loads((path / "metrics.json").read_text()))
        if not done:
            continue
        rows.append([weights, len(done)] + [mean_sd([m["test"][k] for m in done]) for k in METRICS]
                    + [mean_sd([m["best_epoch"] for m in done], "{:.0f}"),
                       mean_sd([m["train_seconds"] / 60 for m in done], "{:.1f}")])
        record = done[0].get("teacher_weights")
        if record:
            weights_seen[weights] = record
    head = ["teacher weights", "seeds", *(f"test {k}" for k in METRICS), "best epoch", "train min"]
    print(markdown_table(head, rows))
    for name, record in weights_seen.items():
        print(f"\n{name}: {json.dumps(record)}")


if __name__ == "__main__":
    main()
