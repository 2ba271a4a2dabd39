"""Training time per epoch of each teacher family on Gowalla: TorchRec tables vs plain nn.Embedding.

Each family trains through its own ``batches`` / ``loss`` / ``after_step`` with Adam over all
parameters, as hetcomp_dist.teachers.train does, twice in the same run: once with its TorchRec
``Tables`` (an EmbeddingBagCollection looked up through a KeyedJaggedTensor), once with
``Tables`` swapped for :class:`EmbeddingTables` below, a drop-in built on nn.Embedding and
F.embedding_bag with the same interface (``forward(**ids)``, ``bags``, ``weight``) and the same
rows, so the model code is identical. The two variants run alternately in chunks of batches,
so load from other jobs on the machine falls on both alike. Batch sampling counts as part of the
epoch, as it does in training.

With ``--max-batches N`` each variant times N batches (after 2 untimed warm-up batches) and the
epoch time is extrapolated: seconds per batch x batches per epoch.

Each family is built with the hyper-parameters and batch size of its teacher in ``--config``
(default configs/gowalla.yaml; ``--config none``: the model defaults and BATCH_SIZES below).
Besides wall seconds the table gives the process CPU seconds per epoch divided by the thread
count ("cpu s/ep"): on a shared, overloaded host that is closer to the wall time the same epoch
takes on an idle one (an upper bound where threads spin while waiting).

    .venv/bin/python bench/bench_teachers.py --max-batches 20 [--models bpr_mf,cml] [--threads 2] [--plot]

Data: a prepared dataset, ``--data`` (e.g. ``hetcomp prepare gowalla --out runs/gowalla/dataset``).
Writes the table to bench/out/teachers.txt and, with --plot, a bar chart to bench/out/teachers.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from hetcomp_dist import models
from hetcomp_dist.benchutil import pyplot, save_figure
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.models.tables import Tables

OUT = Path(__file__).resolve().parent / "out"
FAMILIES = ("bpr_mf", "cml", "neumf", "lightgcn", "multvae", "item_ae")
BATCH_SIZES = {"bpr_mf": 4096, "cml": 4096, "neumf": 4096, "lightgcn": 4096, "multvae": 500, "item_ae": 500}
WARMUP = 2


class EmbeddingTables(nn.Module):
    """Drop-in for :class:`~hetcomp_dist.models.tables.Tables` on plain torch: one nn.Embedding per
    table; bags through F.embedding_bag (sum, per-sample weights) on the same weight."""

    def __init__(self, tables: Tables):
        super().__init__()
        self.names, self.dims = list(tables.names), dict(tables.dims)
        self.emb = nn.ModuleDict()
        for name in self.names:
            w = tables.weight(name).detach()
            self.emb[name] = nn.Embedding(w.shape[0], w.shape[1], _weight=w.clone())

    def forward(self, **ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.emb[n](v.long()) for n, v in ids.items()}

    def bags(self, name: str, ids: torch.Tensor, lengths: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        offsets = torch.cumsum(lengths.long(), 0) - lengths.long()
        return F.embedding_bag(ids.long(), self.emb[name].weight, offsets, mode="sum",
                               per_sample_weights=None if weights is None else weights.float())

    def weight(self, name: str) -> torch.Tensor:
        return self.emb[name].weight


class Run:
    """One variant of one family: its model, optimizer and endless batch stream."""

    def __init__(self, name: str, data, batch_size: int, plain: bool, fused_adam: bool = True, seed: int = 0,
                 params: dict | None = None):
        torch.manual_seed(seed)
        self.model = models.build(name, data.n_users, data.n_items, data.train, params or {})
        if plain:
            self.model.tables = EmbeddingTables(self.model.tables)
        self.model.train()
        # fused (one pass over each tensor) as teachers/train.py uses; --unfused-adam: torch's default
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=fused_adam)
        self.data, self.batch_size, self.epoch, self.seconds, self.timed = data, batch_size, 0, 0.0, 0
        self.cpu_seconds = 0.0
        self.stream = self._batches()

    def _batches(self):
        while True:
            self.epoch += 1
            yield from self.model.batches(self.data.train, self.batch_size, np.random.default_rng([0, self.epoch]))

    def steps(self, n: int, timed: bool = True) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(n):
            batch = next(self.stream)  # sampling is part of an epoch's time
            loss = self.model.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.model.after_step()
        if timed:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu_start
            self.timed += n


def batches_per_epoch(name: str, data, batch_size: int) -> int:
    """Batches in one epoch: user batches (Mult-VAE), item batches (item AE), else interaction triples."""
    if name == "multvae":
        return math.ceil(int((data.train.counts() > 0).sum()) / batch_size)
    if name == "item_ae":
        return math.ceil(int((data.train.item_counts() > 0).sum()) / batch_size)
    return math.ceil(data.train.nnz / batch_size)


def bench(name: str, data, batch_size: int, max_batches: int | None, epochs: int, chunk: int,
          fused_adam: bool = True, params: dict | None = None) -> dict:
    """Seconds per epoch of both variants: ``epochs`` epochs timed, or ``max_batches`` per epoch, extrapolated."""
    n_epoch = batches_per_epoch(name, data, batch_size)
    total = epochs * min(max_batches or n_epoch, n_epoch)
    runs = {"torchrec": Run(name, data, batch_size, False, fused_adam, params=params),
            "nn.Embedding": Run(name, data, batch_size, True, fused_adam, params=params)}
    for run in runs.values():
        run.steps(WARMUP, timed=False)
    while any(r.timed < total for r in runs.values()):
        for run in runs.values():  # alternate: background load falls on both variants alike
            run.steps(min(chunk, total - run.timed))
    per_epoch = {k: r.seconds / r.timed * n_epoch for k, r in runs.items()}
    threads = torch.get_num_threads()
    cpu = {f"{k} cpu": r.cpu_seconds / threads / r.timed * n_epoch for k, r in runs.items()}
    return {"model": name, "batch_size": batch_size, "batches_per_epoch": n_epoch, "timed_batches": total,
            **per_epoch, **cpu, "ratio": per_epoch["torchrec"] / per_epoch["nn.Embedding"],
            "cpu ratio": cpu["torchrec cpu"] / cpu["nn.Embedding cpu"], "params": params or {}}


def config_teachers(path: str) -> dict[str, tuple[dict, int]]:
    """model name -> (params, batch_size) of the first teacher of that model in a run config."""
    with open(path) as f:
        teachers = yaml.safe_load(f).get("teachers", [])
    out: dict[str, tuple[dict, int]] = {}
    for t in teachers:
        out.setdefault(t["model"], (dict(t.get("params", {})), int(t.get("batch_size", 4096))))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset (hetcomp prepare), e.g. runs/gowalla/dataset")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "gowalla.yaml"),
                    help="run config whose teachers give each family's params and batch size ('none': defaults)")
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--epochs", type=int, default=1, help="epochs to time (with --max-batches: per epoch)")
    ap.add_argument("--max-batches", type=int, default=None, help="time N batches per variant and extrapolate")
    ap.add_argument("--batch-size", action="append", default=[], metavar="MODEL=N", help="override a batch size")
    ap.add_argument("--chunk", type=int, default=5, help="batches per turn when alternating the variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unfused-adam", action="store_true",
                    help="torch's default Adam instead of the fused one that teachers/train.py uses")
    ap.add_argument("--plot", action="store_true", help="draw bench/out/teachers.png")
    args = ap.parse_args(argv)
    unknown = sorted({n for n in args.models.split(",") if n} - set(models.MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; registered: {sorted(models.MODELS)}")
    return args


def settings(args: argparse.Namespace) -> tuple[dict[str, int], dict[str, dict]]:
    """Each family's batch size and params: the defaults, the config's teachers, then --batch-size."""
    sizes, params = dict(BATCH_SIZES), {}
    if args.config != "none":
        for model, (p, b) in config_teachers(args.config).items():
            params[model], sizes[model] = p, b
    for item in args.batch_size:
        k, v = item.split("=")
        sizes[k] = int(v)
    return sizes, params


def render(rows: list[dict]) -> str:
    header = (f"{'model':<9} {'batch':>6} {'batches/ep':>10} {'timed':>6} {'torchrec s/ep':>14} {'nn.Embedding s/ep':>18} "
              f"{'ratio':>6} {'torchrec cpu s/ep':>18} {'nn.Emb cpu s/ep':>16} {'cpu ratio':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<9} {r['batch_size']:>6} {r['batches_per_epoch']:>10} {r['timed_batches']:>6} "
                     f"{r['torchrec']:>14.2f} {r['nn.Embedding']:>18.2f} {r['ratio']:>6.2f} "
                     f"{r['torchrec cpu']:>18.2f} {r['nn.Embedding cpu']:>16.2f} {r['cpu ratio']:>9.2f}")
    lines.append("params: " + "; ".join(f"{r['model']} {r['params']}" for r in rows))
    lines.append(f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return "\n".join(lines)


def plot(rows: list[dict], threads: int, path: Path) -> None:
    x = np.arange(len(rows))
    fig, ax = pyplot().subplots(figsize=(1.4 * len(rows) + 2, 3.5))
    ax.bar(x - 0.2, [r["torchrec"] for r in rows], 0.4, label="TorchRec EBC")
    ax.bar(x + 0.2, [r["nn.Embedding"] for r in rows], 0.4, label="nn.Embedding")
    ax.axhline(15, color="grey", ls="--", lw=1, label="15 s target")
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set_ylabel("s / epoch (Gowalla)")
    ax.set_title(f"teacher epoch time, {threads} threads")
    ax.legend()
    print(f"plot: {save_figure(fig, path)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, params = settings(args)
    data = load_dataset(args.data)
    fused = not args.unfused_adam
    adam = "fused" if fused else "default"
    print(f"data {args.data}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train interactions; "
          f"threads {torch.get_num_threads()}; torch {torch.__version__}; Adam {adam}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for name in (n for n in args.models.split(",") if n):
        row = bench(name, data, sizes[name], args.max_batches, args.epochs, args.chunk, fused, params.get(name))
        rows.append(row)
        print(f"  {name} {row['params']}: {row['torchrec']:.1f} s vs {row['nn.Embedding']:.1f} s per epoch "
              f"(cpu {row['torchrec cpu']:.1f} vs {row['nn.Embedding cpu']:.1f})", flush=True)
    table = render(rows)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "teachers.txt").write_text(f"$ bench/bench_teachers.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
                                      f"threads {args.threads}, Adam {adam}\n{table}\n")
    if args.plot:
        plot(rows, args.threads, OUT / "teachers.png")


if __name__ == "__main__":
    main()
