"""Parallelism, in one place: process groups, and TorchRec sharding of a model's embedding tables.

Model code is single-device (``hetcomp_dist.models``) and never imports this module. Here a
model's :class:`~hetcomp_dist.models.tables.Tables` collections are sharded across the process
group by TorchRec's ``DistributedModelParallel`` (DMP), with the fused kernel: each process
stores only its rows, and the table optimizer runs inside the backward pass (fbgemm). Dense
parameters (NeuMF's MLP, a student's heads) are replicated and averaged by DDP, which DMP wraps
around the rest of the model.

The training step stays the single-process loop::

    env = init_process_group()                               # env:// variables (torchrun, Ray Train)
    model = models.build(name, n_users, n_items, train, params, device=torch.device("meta"))
    sharded = shard_model(model, {"user": "row_wise", "item": "table_wise"}, lr=0.05)
    for batch in sharded.batches(train, batch_size, rng):   # this rank's part of each global batch
        loss = sharded.loss(batch)                            # the model's own ``loss``
        sharded.optimizer.zero_grad(set_to_none=True)
        loss.backward()                                       # table rows are updated here (fused)
        sharded.optimizer.step()                              # dense parameters
        sharded.after_step()
    state = sharded.full_state_dict()                         # rank 0: the unsharded state_dict
    destroy_process_group()

Semantics (checked against a one-process model by tests/test_distributed.py): with W processes,
each takes B // W rows of every global batch of B; each computes the model's loss (a mean over
its rows) and TorchRec scales table gradients by 1 / W (DDP averages dense ones), so one sharded
step equals one single-process step on the whole batch, same learning rate, and the mean of the
per-rank losses is the single-process loss.

Which models shard: those whose ``loss`` reads tables only through lookups (``tables(...)``,
``tables.bags(...)``): BPR-MF, CML, NeuMF (:data:`LOOKUP_ONLY`). LightGCN propagates the whole
tables over the graph and Mult-VAE / the item autoencoder decode against a whole table
(``tables.weight``); once sharded, ``weight`` holds only local rows, and gradients through it would
bypass the fused optimizer, so :func:`shard_model` refuses them.

Build on the meta device (``device=torch.device("meta")``) for real runs: no process ever holds a
whole table, and each initialises its own rows with the table's ``init_fn`` (seeded per rank, so
row shards do not repeat each other). A model built on the CPU may be sharded too; its rows are
then copied into the shards (every rank must have built the same rows: same seed), which is how a
single-process model or checkpoint becomes a sharded one and how the tests compare the two.

GPU (nccl): the same code path, with ``env.device`` = cuda:LOCAL_RANK and "adam" available for the
tables; not exercised here (CPU-only checks), and the models still create some tensors on the CPU
(``Tables.forward``'s KJT lengths, NeuMF's labels), which a GPU run must move first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.evaluate import RankingSums
from hetcomp_dist.models.cml import CML
from hetcomp_dist.models.mf import BPRMF
from hetcomp_dist.models.neumf import NeuMF
from hetcomp_dist.models.tables import Tables

#: Families whose loss uses their tables only through lookups, hence shardable. A new one (the
#: distillation student) joins by being added here.
LOOKUP_ONLY: tuple[type, ...] = (BPRMF, CML, NeuMF)

#: Fused table optimizers by name. The ``exact`` fbgemm variants sum the gradients of repeated ids
#: before one update (deterministic; what a dense optimizer does). fbgemm's CPU kernels support the
#: first three; ``adam`` (and the other Adam/LAMB variants) run on GPU only.
TABLE_OPTIMIZERS: dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,                       # w -= lr * g
    "adagrad": EmbOptimType.EXACT_ADAGRAD,               # s += g^2 (per element); w -= lr * g / (sqrt(s) + eps)
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,  # s_row += mean(g^2); w -= lr * g / (sqrt(s_row) + eps)
    "adam": EmbOptimType.ADAM,                           # GPU only
}
_CPU_TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")

SHARDING_TYPES = ("row_wise", "table_wise")


# ----------------------------------------------------------------------------- process groups

@dataclass(frozen=True)
class DistEnv:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device


def init_process_group(backend: str | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Join the default process group from the ``env://`` variables, or reuse it if already joined.

    torchrun and Ray Train's TorchTrainer set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (and
    LOCAL_RANK, LOCAL_WORLD_SIZE); Ray Train also creates the group itself, which is then reused.

    Args:
        backend: "gloo" or "nccl"; default nccl where CUDA is available, else gloo.
        timeout_s: collective timeout.
    """
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
        if missing:
            raise RuntimeError(f"cannot join a process group: environment variable(s) {', '.join(missing)} "
                               "not set (start the processes with torchrun or Ray Train)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(_local_rank(int(os.environ["RANK"])))
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return current_env()


def current_env() -> DistEnv:
    """The :class:`DistEnv` of the joined default group."""
    if not dist.is_initialized():
        raise RuntimeError("no process group: call init_process_group() first")
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    local_rank = _local_rank(rank)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistEnv(rank, world, local_rank, local_world, backend, device)


def destroy_process_group() -> None:
    """Leave the default group cleanly: a barrier, so no rank tears down while a peer still talks
    to it, then destroy. A no-op without a group."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = 600.0) -> Iterator[DistEnv]:
    """``with process_group() as env:`` joins (or reuses) the group; on exit, destroys it only if
    it was created here (a group that Ray Train made stays for Ray Train to tear down)."""
    created = not dist.is_initialized()
    env = init_process_group(backend, timeout_s)
    try:
        yield env
    finally:
        if created:
            destroy_process_group()


def _local_rank(rank: int) -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return rank % max(n, 1)


# ----------------------------------------------------------------------------- sharding

class LossStep(nn.Module):
    """``forward(batch) = model.loss(batch)``: the forward that DMP (and the DDP inside it) runs,
    so that DDP sees each step and averages the dense gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)


class ShardedModel:
    """A model whose tables are sharded across the process group, with its optimizer.

    Attributes:
        model: the wrapped model, its ``Tables.ebc`` now ShardedEmbeddingBagCollections (call
            ``loss`` through :meth:`loss`, never on ``model`` directly: DDP must see the step).
        dmp: the DistributedModelParallel around ``LossStep(model)``.
        optimizer: ``CombinedOptimizer`` of the fused table optimizers (updates happen in backward;
            ``step`` is a no-op for them) and the dense optimizer; state_dict keys name parameters.
        env: this process's :class:`DistEnv`.
    """

    def __init__(self, model: nn.Module, dmp: DistributedModelParallel, optimizer: CombinedOptimizer, env: DistEnv):
        self.model, self.dmp, self.optimizer, self.env = model, dmp, optimizer, env

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on this rank's batch (every rank calls it, with equal-size batches)."""
        return self.dmp({k: v.to(self.env.device) for k, v in batch.items()})

    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's part of each global batch of ``model.batches(train, batch_size, rng)``.

        ``batch_size`` is the global batch size, and every rank must pass an RNG in the same state
        (e.g. seeded by (seed, epoch)), so that all ranks draw the same global batches.
        """
        for batch in self.model.batches(train, batch_size, rng):
            part = local_batch(batch, self.env.rank, self.env.world_size)
            if part is not None:
                yield part

    def after_step(self) -> None:
        """The model's post-step hook, on this process's rows (row-by-row hooks such as CML's
        projection are exact under row_wise and table_wise sharding)."""
        self.model.after_step()

    def train(self, mode: bool = True) -> "ShardedModel":
        self.dmp.train(mode)
        return self

    def eval(self) -> "ShardedModel":
        return self.train(False)

    def full_state_dict(self, dst: int | None = 0) -> dict[str, torch.Tensor] | None:
        """The unsharded model's ``state_dict`` (CPU tensors), assembled from all ranks.

        Collective: every rank calls it. Returns it on rank ``dst`` (None elsewhere), or on every
        rank if ``dst`` is None. Load it into a single-process model (``models.build(...)``) to
        evaluate, score, write trajectories or checkpoint.
        """
        root = 0 if dst is None else dst
        out: dict[str, torch.Tensor] = {}
        for key, value in self._state_dict().items():
            if not isinstance(value, ShardedTensor):
                out[key] = value.detach().cpu().clone()
                continue
            full = None
            if self.env.rank == root or dst is None:
                full = torch.empty(value.size(), dtype=value.dtype, device=self.env.device)
            value.gather(dst=root, out=full if self.env.rank == root else None)
            if dst is None:
                dist.broadcast(full, src=root)
            if full is not None:
                out[key] = full.cpu()
        return out if dst is None or self.env.rank == dst else None

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an unsharded model's ``state_dict`` (every rank passes the same one): each rank
        copies its own rows. Optimizer state is untouched."""
        own = self._state_dict()
        if set(own) != set(state):
            raise KeyError(f"state_dict keys differ: missing {sorted(set(own) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(own))}")
        for key, value in own.items():
            src = state[key]
            if tuple(src.shape) != tuple(value.shape):
                raise ValueError(f"{key}: shape {tuple(src.shape)} != {tuple(value.shape)}")
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(src[r0:r0 + nr, c0:c0 + nc])
            else:
                value.copy_(src)

    def local_rows(self, table: str) -> tuple[int, torch.Tensor]:
        """(first global row, rows) of ``table`` held here; rows is 0 x d where this rank holds none."""
        for key, value in self._state_dict().items():
            if isinstance(value, ShardedTensor) and key.endswith(f"embedding_bags.{table}.weight"):
                shards = value.local_shards()
                if not shards:
                    return 0, torch.empty(0, value.size(1))
                (shard,) = shards
                return shard.metadata.shard_offsets[0], shard.tensor
        raise KeyError(f"no sharded table {table!r}")

    def _state_dict(self) -> dict[str, Any]:
        prefix = "model."
        return {k[len(prefix):]: v for k, v in self.dmp.state_dict().items()}


def shard_model(model: nn.Module, sharding: Mapping[str, str], *, lr: float,
                table_optimizer: str = "rowwise_adagrad", eps: float = 1e-8,
                dense_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
                seed: int = 0, env: DistEnv | None = None) -> ShardedModel:
    """Shard ``model``'s tables across the process group with DistributedModelParallel.

    Args:
        model: a :data:`LOOKUP_ONLY` family, built on the meta device (rows initialised per shard
            with the tables' init_fn) or on the CPU (its rows are copied into the shards).
        sharding: table name -> "row_wise" (rows split evenly over all ranks) or "table_wise"
            (the whole table on one rank, round-robin over the table_wise tables) or
            "table_wise:R" (on rank R), for every table, e.g. ``{"user": "row_wise", "item": "table_wise"}``.
        lr: learning rate of the fused table optimizer (and of the default dense optimizer).
        table_optimizer: a :data:`TABLE_OPTIMIZERS` name; on CPU one of sgd, adagrad, rowwise_adagrad.
        eps: the Adagrad/Adam epsilon.
        dense_optimizer: factory for the dense parameters' optimizer; default Adam(lr).
        seed: seeds the per-rank initialisation of meta-built rows (rank r uses seed * 1000003 + r).
        env: the process group's :class:`DistEnv`; default :func:`current_env`.

    Returns:
        A :class:`ShardedModel` (its ``optimizer`` covers the tables and the dense parameters).
    """
    env = env or current_env()
    if not isinstance(model, LOOKUP_ONLY):
        raise TypeError(f"{type(model).__name__} cannot be sharded: its loss reads whole tables "
                        f"(tables.weight), which a sharded model does not hold; shardable families: "
                        f"{', '.join(c.__name__ for c in LOOKUP_ONLY)}")
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {table_optimizer!r}; one of {', '.join(TABLE_OPTIMIZERS)}")
    if env.device.type == "cpu" and table_optimizer not in _CPU_TABLE_OPTIMIZERS:
        raise ValueError(f"table optimizer {table_optimizer!r} has no CPU kernel in fbgemm; "
                         f"on CPU use one of {', '.join(_CPU_TABLE_OPTIMIZERS)}")

    collections = {f"model.{name}.ebc": m for name, m in model.named_modules() if isinstance(m, Tables)}
    if not collections:
        raise TypeError(f"{type(model).__name__} has no Tables to shard")
    table_names = [n for t in collections.values() for n in t.names]
    unknown, missing = sorted(set(sharding) - set(table_names)), [n for n in table_names if n not in sharding]
    if unknown or missing:
        raise ValueError(f"sharding must name every table exactly: missing {missing}, unknown {unknown} "
                         f"(tables: {', '.join(table_names)})")
    materialized = any(p.device.type != "meta" for t in collections.values() for p in t.parameters())
    initial = {k: v.detach() for k, v in model.state_dict().items()} if materialized else None

    fused_params: dict[str, Any] = {"optimizer": TABLE_OPTIMIZERS[table_optimizer], "learning_rate": lr}
    if table_optimizer != "sgd":
        fused_params["eps"] = eps
    sharder = EmbeddingBagCollectionSharder(fused_params=fused_params)
    plan = ShardingPlan({
        path: construct_module_sharding_plan(
            tables.ebc, _generators(tables.names, sharding, env.world_size), sharder=sharder,
            local_size=env.local_world_size, world_size=env.world_size, device_type=env.device.type)
        for path, tables in collections.items()})

    devices = [env.device.index] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + env.rank)  # meta-built rows: each rank draws its own
        dmp = DistributedModelParallel(LossStep(model), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=env.device, plan=plan, sharders=[sharder])
    sharded_model = dmp.module.model
    optimizers: list[tuple[str, Any]] = [("tables", dmp.fused_optimizer)]
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if dense:
        factory = dense_optimizer or (lambda params: torch.optim.Adam(params, lr=lr))
        optimizers.append(("dense", KeyedOptimizerWrapper(dense, factory)))
    result = ShardedModel(sharded_model, dmp, CombinedOptimizer(optimizers), env)
    if initial is not None:
        result.load_full_state_dict(initial)
    return result


def _generators(names: list[str], sharding: Mapping[str, str], world_size: int) -> dict[str, Any]:
    """Plan generators (fused kernel) for one Tables' EBC."""
    out, next_rank = {}, 0
    for name in names:
        kind, _, where = sharding[name].partition(":")
        if kind == "row_wise" and not where:
            out[name] = row_wise(compute_kernel="fused")
        elif kind == "table_wise":
            if where:
                rank = int(where)
                if not 0 <= rank < world_size:
                    raise ValueError(f"table {name}: rank {rank} outside 0..{world_size - 1}")
            else:
                rank, next_rank = next_rank % world_size, next_rank + 1
            out[name] = table_wise(rank=rank, compute_kernel="fused")
        else:
            raise ValueError(f"table {name}: sharding {sharding[name]!r} is not one of "
                             f"row_wise, table_wise, table_wise:<rank>")
    return out


def local_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s rows ``[rank * b, (rank + 1) * b)`` of a global batch, ``b = B // world_size``.

    The last ``B % world_size`` rows are dropped: TorchRec's backward exchanges equal-size blocks,
    so every rank's batch must have the same size. None when ``B < world_size``.
    """
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    b = sizes.pop() // world_size
    if b == 0:
        return None
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


# ----------------------------------------------------------------------------- collectives (no-ops in one process)

def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(x: Any) -> Any:
    """The sum over ranks of a number or tensor."""
    if not is_distributed():
        return x
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    dist.all_reduce(t)
    return t if isinstance(x, torch.Tensor) else t.item()


def any_over_ranks(mask: torch.Tensor) -> bool:
    """Whether ``mask`` has a True element on any rank."""
    return bool(sum_over_ranks(float(mask.any())) > 0)


def all_reduce_grad(weight: torch.Tensor) -> None:
    if is_distributed():
        dist.all_reduce(weight.grad)


def gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (users in rank order), concatenated; on every rank."""
    if not is_distributed():
        return local.detach().clone()
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.detach())
    return torch.cat(parts)


def all_reduce_ranking_sums(sums: RankingSums) -> RankingSums:
    """Evaluation sums over every rank's users (SUM for the sums, MAX for the coverage masks)."""
    if not is_distributed():
        return sums
    vector = torch.from_numpy(np.concatenate([[sums.n_users, sums.gap_profile, sums.n_profile],
                                              sums.recall, sums.ndcg, sums.gap_rec, sums.arp]))
    dist.all_reduce(vector)
    covered = torch.from_numpy(sums.covered.astype(np.uint8))
    dist.all_reduce(covered, op=dist.ReduceOp.MAX)
    v, nk = vector.numpy(), len(sums.ks)
    return RankingSums(ks=sums.ks, n_users=int(round(v[0])), gap_profile=float(v[1]), n_profile=int(round(v[2])),
                       recall=v[3:3 + nk], ndcg=v[3 + nk:3 + 2 * nk], gap_rec=v[3 + 2 * nk:3 + 3 * nk],
                       arp=v[3 + 3 * nk:3 + 4 * nk], covered=covered.numpy().astype(bool))
