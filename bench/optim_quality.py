"""Dense Adam against the row-wise Adam on CiteULike: the same seeds, test metrics and epoch time.

Runs ``hetcomp distill --config configs/citeulike.yaml`` with ``distill.optimizer`` adam and
rowwise_adam for each seed (one thread each, one at a time; a finished run is skipped and an
interrupted one resumes), then prints mean ± sd over the seeds. The method and learning rate default to
the student alone (``bpr``) at lr 0.01, which converges in minutes; the optimizers differ only in which
user rows an update touches (rowwise_adam: the batch's; adam: every row, through weight decay and the
moments), which the distillation objectives share with BPR.

    .venv/bin/python bench/optim_quality.py [--method bpr] [--lr 0.01] [--seeds 0 1 2]

Writes bench/out/optim_quality.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hetcomp_dist.benchutil import mean_sd

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "rowwise_adam")
METRICS = ("recall@20", "ndcg@20", "recall@50", "ndcg@50")


def run(method: str, lr: float, optimizer: str, seed: int, root: Path) -> dict:
    out = root / f"opt_{method}_lr{lr:g}_{optimizer}_s{seed}"
    if not (out / "metrics.json").exists():
        log = root.parent / "logs" / f"{out.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(ROOT / ".venv/bin/hetcomp"), "distill", "--config", "configs/citeulike.yaml",
               "--set", f"distill.method={method}", "--set", f"distill.lr={lr}",
               "--set", f"distill.optimizer={optimizer}", "--set", f"distill.seed={seed}",
               "--set", f"distill.out={out}"]
        print(f"{out.name}: running (log {log})", flush=True)
        with log.open("w") as f:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics




def table(results: dict[str, list[dict]]) -> str:
    head = ["optimizer", "seeds", *METRICS, "epochs", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for opt, runs in results.items():
        test = [r["test"] for r in runs]
        epochs = [float(r["epochs"]) for r in runs]
        per_epoch = [r["train_seconds"] / r["epochs"] for r in runs]
        cells = [opt, str(len(runs)), *(mean_sd([t[m] for t in test]) for m in METRICS),
                 mean_sd(epochs, "{:.0f}"), mean_sd(per_epoch, "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="bpr")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--run", default="runs/citeulike/distill")
    args = p.parse_args()
    root = (ROOT / args.run).resolve()
    results = {opt: [run(args.method, args.lr, opt, s, root) for s in args.seeds] for opt in OPTIMIZERS}
    text = (f"CiteULike, method {args.method}, lr {args.lr:g}, seeds {args.seeds}; test split.\n\n"
            + table(results))
    print(text)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "optim_quality.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
