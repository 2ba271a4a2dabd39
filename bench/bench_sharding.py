"""The student's user table across W gloo processes: TorchRec DMP row-wise against our hand split.

Both variants process the same global batches of ``--batch`` users per step (users drawn uniformly),
dim ``--dim``, and update only the looked-up rows with the same rule (exact row-wise Adagrad, the
fused optimizer fbgemm has on CPU), so the comparison is the cost of the sharding itself:

- ``hand``: what distill/train.py does. Rank r owns the contiguous users [start, stop); every rank
  draws the same global batch and keeps its own users, looks them up in its local rows
  (``F.embedding``), and updates those rows in place. No collective touches the user table.
- ``dmp``: the user table in an EmbeddingBagCollection sharded ``row_wise`` with the fused kernel
  under DistributedModelParallel; rank r feeds the r-th 1/W of the global batch (any users) and
  TorchRec routes ids and pooled rows with all-to-alls, the update running inside backward.

The loss is <e_u, g_u> with a random g per looked-up row, enough to give every looked-up row a
gradient. ``--table item`` measures the item table instead (``--users`` is then the catalogue) under the
sampled denominator, where each rank looks up ``--negatives`` sampled items and ``--targets`` items per
user of its share of the batch: ``hand`` is distill/train.py's default (``item_updates: dense``: the table
replicated, its dense gradient all-reduced, then the looked-up rows updated), ``rows`` its
``item_updates: rows`` (the table split by rows, each step's looked-up rows fetched from their owners and
their gradients summed back to them, with the loop's own ``Student.step_items``/``owned_item_grad``),
``dmp`` the table sharded row-wise under DMP. The dimension defaults to 8: fbgemm's fused kernel refuses a table whose
columns are not a multiple of 4, so the reference student (dim 6) cannot take this path at all. Reported per variant, per world size and users: median ms per step after
warm-up, peak RSS per rank, and the user-table bytes each rank holds.

    .venv/bin/python bench/bench_sharding.py                       # 100k and 1M users, W = 1 and 2
    .venv/bin/python bench/bench_sharding.py --users 100000 --steps 50
    .venv/bin/python bench/bench_sharding.py --table item --users 100000 1000000   # the item table, sampled

Writes bench/out/sharding.txt and bench/out/sharding.png (``--table item``: sharding_items.*).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUT = Path(__file__).resolve().parent / "out"
EPS, LR = 1e-8, 0.05


def _hand(users: int, dim: int, batch: int, steps: int, warmup: int, rank: int, world: int) -> dict:
    start, stop = users * rank // world, users * (rank + 1) // world
    weight = torch.randn(stop - start, dim) * 0.01
    state = torch.zeros(stop - start)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(batch, dim, generator=gen)
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(users, (batch,), generator=gen)
        t0 = _now()
        own = (ids >= start) & (ids < stop)
        rows = (ids[own] - start)
        emb = torch.nn.functional.embedding(rows, weight).requires_grad_()
        (emb * g[own]).sum().backward()
        uniq, inv = torch.unique(rows, return_inverse=True)
        _adagrad_rows(weight, state, uniq, torch.zeros(len(uniq), dim).index_add_(0, inv, emb.grad))
        if step >= warmup:
            times.append(_now() - t0)
    return {"ms": 1000 * _median(times), "table_bytes": weight.numel() * 4 + state.numel() * 4}


def _adagrad_rows(weight: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Exact row-wise Adagrad on ``rows`` (the rule of fbgemm's fused kernel)."""
    state[rows] += grad.pow(2).mean(1)
    weight.data[rows] -= LR * grad / (state[rows].sqrt() + EPS)[:, None]


def _sampled_items(items: int, batch: int, world: int, rank: int, negatives: int, targets: int) -> Any:
    """A rank's item lookups of one step: ``negatives`` sampled items (its own draw) and ``targets`` target
    items for each of its batch // W users, popularity-free (uniform): the sampled denominator's lookups."""
    def ids(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(items, (negatives + batch // world * targets,), generator=gen)
    return ids


def _time_item_steps(item_ids: Any, dim: int, rank: int, steps: int, warmup: int, step: Any) -> float:
    """Median ms of ``step(ids, g)`` after ``warmup`` steps: ``ids`` a rank's item lookups (``item_ids``),
    ``g`` a random gradient per lookup, both drawn outside the timing from the rank's generator."""
    gen = torch.Generator().manual_seed(rank)
    times = []
    for i in range(warmup + steps):
        ids = item_ids(gen)
        g = torch.randn(len(ids), dim, generator=gen)
        t0 = _now()
        step(ids, g)
        if i >= warmup:
            times.append(_now() - t0)
    return 1000 * _median(times)


def _replicated_items(items: int, dim: int, batch: int, steps: int, warmup: int, rank: int, world: int,
                      item_ids: Any) -> dict:
    """``hand``: the whole item table on every rank, its dense gradient all-reduced."""
    from hetcomp_dist import distributed

    weight = (torch.randn(items, dim) * 0.01).requires_grad_()
    state = torch.zeros(items)

    def step(ids: torch.Tensor, g: torch.Tensor) -> None:
        weight.grad = None
        (torch.nn.functional.embedding(ids, weight) * g).sum().backward()
        with torch.no_grad():
            distributed.all_reduce_grad(weight)   # the distillation's item table: every rank's sum
            rows = weight.grad.ne(0).any(1).nonzero().squeeze(1)      # rows any rank looked up
            _adagrad_rows(weight, state, rows, weight.grad[rows])

    ms = _time_item_steps(item_ids, dim, rank, steps, warmup, step)
    return {"ms": ms, "table_bytes": weight.numel() * 4 + state.numel() * 4}


def _split_items(items: int, dim: int, batch: int, steps: int, warmup: int, rank: int, world: int,
                 item_ids: Any) -> dict:
    """``rows``: the loop's item table split by rows (distill/student.py), each rank stepping its own rows."""
    from hetcomp_dist.distill.student import Student, item_range

    student = Student(1, items, dim, items=item_range(items, rank, world))
    weight = student.tables.weight("item")
    state = torch.zeros(weight.shape[0])

    def step(ids: torch.Tensor, g: torch.Tensor) -> None:
        looked = student.step_items(ids)                  # the union's rows, from their owners
        (looked.weight[looked.index(ids)] * g).sum().backward()
        student.owned_item_grad()                         # summed over ranks, this rank's rows only
        with torch.no_grad():
            grad = weight.grad.coalesce()
            _adagrad_rows(weight, state, grad.indices()[0], grad.values())

    ms = _time_item_steps(item_ids, dim, rank, steps, warmup, step)
    return {"ms": ms, "table_bytes": weight.numel() * 4 + state.numel() * 4}


def _dmp(users: int, dim: int, batch: int, steps: int, warmup: int, rank: int, world: int,
         item_ids: Any = None) -> dict:
    """``item_ids``: None for the user table (rank r feeds the r-th 1/W of the batch), else a function
    ``(generator) -> ids`` giving this rank's item lookups of a step (the table then holds ``users`` items)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=users,
                                                            feature_names=["user"])], device=torch.device("meta"))
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                          "learning_rate": LR, "eps": EPS})
    plan = ShardingPlan({"": construct_module_sharding_plan(ebc, {"user": row_wise(compute_kernel="fused")},
                                                            sharder=sharder, local_size=world, world_size=world,
                                                            device_type="cpu")})
    model = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                     device=torch.device("cpu"), plan=plan, sharders=[sharder])
    gen = torch.Generator().manual_seed(0)
    part = batch // world
    times = []
    for step in range(warmup + steps):
        if item_ids is None:
            ids = torch.randint(users, (batch,), generator=gen)[rank * part:(rank + 1) * part]
        else:
            ids = item_ids(gen)
        g = torch.randn(len(ids), dim, generator=gen)
        t0 = _now()
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user"], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))
        (model(kjt).to_dict()["user"] * g).sum().backward()
        if step >= warmup:
            times.append(_now() - t0)
    local = sum(s.tensor.numel() for v in model.state_dict().values() if hasattr(v, "local_shards")
                for s in v.local_shards())
    return {"ms": 1000 * _median(times), "table_bytes": local * 4 + local // dim * 4}


def _median(times: list[float]) -> float:
    # the median, not the mean: the host is shared, and a preempted step says nothing about sharding
    return sorted(times)[len(times) // 2]


def _now() -> float:
    import time
    return time.perf_counter()


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes = (args["users"], args["dim"], args["batch"], args["steps"], args["warmup"], rank, world)
    if args["table"] == "user":
        result = (_hand if args["variant"] == "hand" else _dmp)(*sizes)
    else:
        ids = _sampled_items(args["users"], args["batch"], world, rank, args["negatives"], args["targets"])
        if args["variant"] == "dmp":
            result = _dmp(*sizes, ids)
        else:
            result = (_split_items if args["variant"] == "rows" else _replicated_items)(*sizes, ids)
    dist.barrier()
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(variant: str, users: int, world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out:
        spec = {"variant": variant, "users": users, "dim": args.dim, "batch": args.batch,
                "steps": args.steps, "warmup": args.warmup, "table": args.table, "negatives": args.negatives,
                "targets": args.targets}
        mp.start_processes(_worker, args=(world, _free_port(), spec, out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    return {"variant": variant, "users": users, "world": world, "ms": max(r["ms"] for r in ranks),
            "rss_mb": max(r["rss_mb"] for r in ranks), "table_mb": max(r["table_bytes"] for r in ranks) / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dim", type=int, default=8)   # fused kernel: dim % 4 == 0
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--table", choices=("user", "item"), default="user",
                   help="item: --users is the catalogue; each rank looks up --negatives sampled items and "
                        "--targets per user (the sampled denominator); hand = replicated, gradient all-reduced")
    p.add_argument("--negatives", type=int, default=1000)
    p.add_argument("--targets", type=int, default=50)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    rows = []
    for users in args.users:
        for world in args.worlds:
            for variant in VARIANTS[args.table]:
                rows.append(run_one(variant, users, world, args))
                r = rows[-1]
                print(f"{variant:5s} users {users:>9,d}  W={world}  {r['ms']:8.3f} ms/step  "
                      f"peak RSS {r['rss_mb']:7.0f} MB/rank  {args.table} table {r['table_mb']:7.1f} MB/rank", flush=True)
    table = _table(rows, args.table)
    print("\n" + table)
    OUT.mkdir(exist_ok=True)
    suffix = "" if args.table == "user" else "_items"
    (OUT / f"sharding{suffix}.txt").write_text(table + "\n")
    if not args.no_plot:
        _plot(rows, args.table, suffix)
    return 0


VARIANTS = {"user": ("hand", "dmp"), "item": ("hand", "rows", "dmp")}


def _table(rows: list[dict], table: str = "user") -> str:
    what = "users" if table == "user" else "items"
    names = VARIANTS[table]
    lines = [f"| {what} | W | " + " | ".join(f"{v} ms/step" for v in names) + " | "
             + " | ".join(f"{v} / hand" for v in names[1:]) + " | "
             + " | ".join(f"{v} RSS MB/rank" for v in names) + f" | {table} table MB/rank ({' / '.join(names)}) |",
             "|" + "---:|" * (2 + 3 * len(names) - 1) + "---|"]
    by = {(r["variant"], r["users"], r["world"]): r for r in rows}
    for users, world in sorted({(r["users"], r["world"]) for r in rows}):
        rs = [by[(v, users, world)] for v in names]
        lines.append(f"| {users:,} | {world} | " + " | ".join(f"{r['ms']:.3f}" for r in rs) + " | "
                     + " | ".join(f"{r['ms'] / rs[0]['ms']:.2f}x" for r in rs[1:]) + " | "
                     + " | ".join(f"{r['rss_mb']:.0f}" for r in rs) + " | "
                     + " / ".join(f"{r['table_mb']:.1f}" for r in rs) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict], table: str = "user", suffix: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in VARIANTS[table]:
        for world in sorted({r["world"] for r in rows}):
            pts = sorted((r["users"], r["ms"]) for r in rows if r["variant"] == variant and r["world"] == world)
            ax.plot(*zip(*pts), marker="o", label=f"{variant} W={world}")
    what = "users" if table == "user" else "items"
    ax.set(xscale="log", yscale="log", xlabel=what, ylabel="ms per step (1,024 users)",
           title=f"Student {table} table: DMP row-wise vs " + ("hand split" if table == "user"
                                                                 else "replicated (dense / rows)"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"sharding{suffix}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
