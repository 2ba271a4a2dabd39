"""Seconds per optimizer step of the student's user table: dense Adam against RowwiseAdam, by users.

What one training step costs the user table, as the distillation loop does it, for ``distill.optimizer``:

- ``adam``: the table's dense gradient zeroed in place (``zero_grad(set_to_none=False)``), the lookup's
  backward into it (a table-sized dense gradient), and fused Adam over the whole table;
- ``rowwise_adam``: the lookup's backward as a sparse gradient of the batch's rows, and
  :class:`hetcomp_dist.distill.optim.RowwiseAdam` on those rows.

Each step looks up ``--batch`` distinct users drawn at random (the unique users of a batch; the loop's
1,024 train interactions hold somewhat fewer) and backpropagates a fixed linear loss through them: the
loss itself is the same for both and is not what is compared. The item table (dense Adam in both, its
size independent of the users) is left out. Per size and optimizer: ``--warmup`` untimed steps, then
the median over ``--steps`` timed ones; the two optimizers alternate so background load falls on both.

    .venv/bin/python bench/bench_optim.py                          # 100k, 1M, 5M users, dim 6, batch 1,024
    .venv/bin/python bench/bench_optim.py --users 100000 1000000 --threads 2

Prints the table and writes it to bench/out/optim_step.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hetcomp_dist.benchutil import load_average, markdown_table
from hetcomp_dist.distill.optim import RowwiseAdam

OUT = Path(__file__).resolve().parent / "out" / "optim_step.md"


class Dense:
    """The loop's ``adam`` user table: kept dense gradient, fused Adam over every row."""

    def __init__(self, users: int, dim: int, lr: float, weight_decay: float):
        self.weight = torch.nn.Parameter(torch.empty(users, dim).normal_(0.0, 0.01))
        self.weight.grad = torch.zeros_like(self.weight)
        self.opt = torch.optim.Adam([self.weight], lr=lr, weight_decay=weight_decay, fused=True)

    def step(self, rows: torch.Tensor, coef: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=False)
        (F.embedding(rows, self.weight) * coef).sum().backward()
        self.opt.step()


class Rowwise:
    """The loop's ``rowwise_adam`` user table: sparse gradient, RowwiseAdam on the batch's rows."""

    def __init__(self, users: int, dim: int, lr: float, weight_decay: float):
        self.weight = torch.nn.Parameter(torch.empty(users, dim).normal_(0.0, 0.01))
        self.opt = RowwiseAdam(self.weight, lr, weight_decay=weight_decay)

    def step(self, rows: torch.Tensor, coef: torch.Tensor) -> None:
        self.opt.zero_grad()
        (F.embedding(rows, self.weight, sparse=True) * coef).sum().backward()
        self.opt.step()


def measure(users: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of each optimizer on a table of ``users`` rows."""
    tables = {"adam": Dense(users, args.dim, 1e-3, 1e-5), "rowwise_adam": Rowwise(users, args.dim, 1e-3, 1e-5)}
    rng = np.random.default_rng(0)
    coef = torch.randn(args.batch, args.dim)
    times: dict[str, list[float]] = {name: [] for name in tables}
    for i in range(args.warmup + args.steps):
        rows = torch.from_numpy(rng.choice(users, size=args.batch, replace=False))
        for name, table in tables.items():
            t0 = time.perf_counter()
            table.step(rows, coef)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for users in args.users:
        s = measure(users, args)
        rows.append([f"{users:,}", f"{s['adam'] * 1e3:.3f}", f"{s['rowwise_adam'] * 1e3:.3f}",
                     f"{s['adam'] / s['rowwise_adam']:.1f}x"])
        print(f"{users:,} users: adam {s['adam'] * 1e3:.3f} ms, rowwise_adam {s['rowwise_adam'] * 1e3:.3f} ms", flush=True)
    table = markdown_table(["users", "adam (ms / step)", "rowwise_adam (ms / step)", "adam / rowwise"], rows)
    header = (f"User-table optimizer step, dim {args.dim}, {args.batch} users per batch, median of {args.steps} "
              f"steps after {args.warmup}, {args.threads} torch thread(s), torch {torch.__version__}; "
              f"load average at the end: {load_average()}\n\n")
    print("\n" + header + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
