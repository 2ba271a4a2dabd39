"""TorchRec DistributedModelParallel (DMP) for the teachers whose losses only look rows up.

Model code is single-device (``hetcomp_dist.models``) and never imports this module. Here a model's
:class:`~hetcomp_dist.models.tables.Tables` are sharded across the default process group (made by Ray
Train or torchrun) with the fused kernel: each process stores only its rows, and the table optimizer
runs inside the backward pass (fbgemm). Dense parameters (NeuMF's MLP) are replicated and averaged by
the DDP that DMP wraps around the rest of the model, with Adam.

The training step stays the single-process loop::

    model = build_meta(name, n_users, n_items, train, params)      # no process holds a whole table
    sharded = shard_model(model, plan(model, "row_wise"), lr=0.05, table_optimizer="rowwise_adagrad")
    for batch in sharded.batches(train, batch_size, rng):           # this rank's part of each global batch
        loss = sharded.loss(batch)                                    # the model's own ``loss``
        sharded.optimizer.zero_grad(set_to_none=True)
        loss.backward()                                               # table rows are updated here (fused)
        sharded.optimizer.step()                                      # dense parameters
        sharded.after_step()
    state = sharded.full_state_dict()                                 # rank 0: the unsharded state_dict

Semantics (checked against a one-process model by tests/test_sharding.py): with W processes, each
takes B // W rows of every global batch of B; each computes the model's loss (a mean over its rows)
and TorchRec scales table gradients by 1 / W (DDP averages dense ones), so one sharded step equals one
single-process step on the whole batch with the same learning rate and optimizer, and the mean of the
per-rank losses is the single-process loss.

Which models shard: those whose ``loss`` reads tables only through lookups (``tables(...)``): BPR-MF,
CML, NeuMF (:data:`SHARDABLE`). LightGCN propagates whole tables over the graph and the autoencoders
decode against a whole table (``tables.weight``); once sharded, ``weight`` holds only local rows and
gradients through it would bypass the fused optimizer, so :func:`shard_model` refuses them.

fbgemm's fused kernel needs embedding dims that are multiples of 4; its CPU kernels exist for sgd,
adagrad and rowwise_adagrad, and ``adam`` runs on GPU only (:data:`TABLE_OPTIMIZERS`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hetcomp_dist import models
from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models.tables import Tables

#: Registered families whose loss uses their tables only through lookups, hence shardable.
SHARDABLE: tuple[str, ...] = ("bpr_mf", "cml", "neumf")

#: Fused table optimizers: name -> fbgemm EmbOptimType member. The ``EXACT`` variants sum the gradients
#: of repeated ids before one update (deterministic; what a dense optimizer does).
TABLE_OPTIMIZERS: dict[str, str] = {
    "sgd": "EXACT_SGD",                            # w -= lr * g
    "adagrad": "EXACT_ADAGRAD",                    # s += g^2 (per element); w -= lr * g / (sqrt(s) + eps)
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",    # s_row += mean(g^2); w -= lr * g / (sqrt(s_row) + eps)
    "adam": "ADAM",                                # GPU only
}
CPU_TABLE_OPTIMIZERS: tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad")
SHARDING_TYPES: tuple[str, ...] = ("row_wise", "table_wise")
DIM_MULTIPLE = 4     # fbgemm's fused kernel: embedding dims must be multiples of 4


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the default process group, and the device its shards live on."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @classmethod
    def current(cls, device: torch.device | None = None) -> "DistEnv":
        """The joined default group's; ``device`` default: this rank's GPU under nccl, else the CPU."""
        if not dist.is_initialized():
            raise RuntimeError("no process group: start the ranks with Ray Train or torchrun")
        if device is None:
            cuda = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), device)


def build_meta(name: str, n_users: int, n_items: int, train: Interactions, params: dict) -> nn.Module:
    """Model ``name`` with its tables on the meta device (no memory): :func:`shard_model` then draws each
    rank's rows with the tables' own init. Dense layers are built on the CPU (DDP copies rank 0's)."""
    if name not in SHARDABLE:
        raise TypeError(f"{name} cannot be sharded: its loss reads whole tables (tables.weight), which a "
                        f"sharded model does not hold; shardable families: {', '.join(SHARDABLE)}")
    return models.MODELS[name](n_users=n_users, n_items=n_items, train=train, device=torch.device("meta"),
                               **params)


def plan(model: nn.Module, item_sharding: str = "row_wise") -> dict[str, str]:
    """Sharding per table: user tables row_wise (the largest, and looked up by every batch row), item
    tables ``item_sharding`` (table_wise places each whole on one rank, round-robin)."""
    names = [n for m in model.modules() if isinstance(m, Tables) for n in m.names]
    return {n: "row_wise" if n.endswith("user") else item_sharding for n in names}


class LossStep(nn.Module):
    """``forward(batch) = model.loss(batch)``: the forward DMP (and the DDP inside it) runs, so that DDP
    sees each step and averages the dense gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)


class ShardedModel:
    """A model whose tables are sharded across the process group, with its optimizer.

    Attributes:
        model: the wrapped model (call its loss through :meth:`loss`, never directly: DDP must see the step).
        dmp: the DistributedModelParallel around ``LossStep(model)``.
        optimizer: CombinedOptimizer of the fused table optimizers (updates happen in backward; ``step``
            and ``zero_grad`` only hand them the current lr) and the dense Adam.
        env: this process's :class:`DistEnv`.
        dense: the dense parameters' keyed Adam (inside ``optimizer``), None without dense parameters.
    """

    def __init__(self, model: nn.Module, dmp: nn.Module, optimizer: Any, env: DistEnv, dense: Any = None):
        self.model, self.dmp, self.optimizer, self.env, self.dense = model, dmp, optimizer, env, dense
        # One factor for every group, not a list of lrs: a rank holds only its tables' fused groups (a
        # table_wise table's group exists on its holder alone), so the ranks' group lists differ.
        self.lr_scale = 1.0
        self._base_lr = [g["lr"] for g in optimizer.param_groups]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on this rank's batch (every rank calls it, with equal-size batches)."""
        return self.dmp({k: v.to(self.env.device) for k, v in batch.items()})

    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's part of each global batch of ``model.batches(train, batch_size, rng)``: every rank
        passes an RNG in the same state, so all ranks draw the same global batches."""
        for batch in self.model.batches(train, batch_size, rng):
            part = local_batch(batch, self.env.rank, self.env.world_size)
            if part is not None:
                yield part

    def after_step(self) -> None:
        """The model's post-step hook on this process's rows (row-by-row hooks such as CML's projection
        are exact under row_wise and table_wise sharding)."""
        self.model.after_step()

    def train(self, mode: bool = True) -> "ShardedModel":
        self.dmp.train(mode)
        return self

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate (tables and dense) by ``factor``, effective from the next step."""
        self._set_lr_scale(self.lr_scale * factor)

    def _set_lr_scale(self, scale: float) -> None:
        self.lr_scale = scale
        for group, base in zip(self.optimizer.param_groups, self._base_lr):
            group["lr"] = base * scale
        self._push_lr()

    def _push_lr(self) -> None:
        # The fused kernels copy their param group's lr into fbgemm only in zero_grad / step, and fbgemm's
        # CPU lookup takes the lr at the forward: a change pushed at the next zero_grad (after the forward)
        # would reach only the step after. Pushed now (the fused optimizers' step updates nothing).
        self.dmp.fused_optimizer.step()

    def full_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The unsharded model's ``state_dict`` (CPU tensors) on rank ``dst``, None elsewhere. Collective.

        Memory: rank ``dst`` holds every table whole (plus its own shard) until the result is dropped.
        """
        return gather_state(_strip(self.dmp.state_dict()), self.env, dst)

    def full_optimizer_state(self, dst: int = 0) -> dict[str, Any] | None:
        """The optimizer's state with the table moments gathered whole (CPU tensors), and every group's
        learning-rate factor (lr_decay changes it; TorchRec's state_dict does not hold the lrs), on ``dst``.

        A table_wise table's moments exist only in its holder's state_dict, so the ranks' state_dicts
        differ in keys and cannot be walked as one collective (ShardedTensor.gather): every rank sends
        its local moment shards with their offsets (one gather_object), and ``dst`` assembles them.
        """
        own = self.optimizer.state_dict()["state"]
        pieces = {k: {s: (tuple(v.size()), [(list(sh.metadata.shard_offsets), sh.tensor.detach().cpu())
                                            for sh in v.local_shards()])
                      for s, v in d.items() if _is_sharded(v)} for k, d in own.items()}
        parts: list[Any] | None = [None] * self.env.world_size if self.env.rank == dst else None
        if self.env.world_size > 1:
            dist.gather_object(pieces, parts, dst=dst)
        elif parts is not None:
            parts[0] = pieces
        if parts is None:
            return None
        state = {k: {s: v.detach().cpu().clone() for s, v in d.items() if not _is_sharded(v)} for k, d in own.items()}
        for part in parts:
            for k, d in part.items():
                for s, (size, shards) in d.items():
                    for offsets, tensor in shards:
                        full = state.setdefault(k, {}).setdefault(s, torch.zeros(size, dtype=tensor.dtype))
                        full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
            for k in part:
                state.setdefault(k, {})
        return {"state": state, "lr_scale": self.lr_scale}

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an unsharded model's ``state_dict`` (every rank passes the same one): each rank copies its
        own rows. Optimizer state is untouched."""
        own = _strip(self.dmp.state_dict())
        if set(own) != set(state):
            raise KeyError(f"state_dict keys differ: missing {sorted(set(own) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(own))}")
        for key, value in own.items():
            _copy_into(value, state[key], key)

    @torch.no_grad()
    def load_full_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load what :meth:`full_optimizer_state` returned (every rank passes it): sharded moments row by
        row into this rank's shards, the dense Adam state as it is, and the learning-rate factor."""
        if self.dense is not None and not self.dense.state:
            # TorchRec loads only into initialised state (Adam's is lazy): one step with zero gradients
            # creates it; the weights are put back, since weight decay would move them.
            keep = {k: p.detach().clone() for k, p in self.dense.params.items()}
            self.dense.init_state()
            for k, p in self.dense.params.items():
                p.copy_(keep[k])
        own = self.optimizer.state_dict()
        _fill(own["state"], state["state"])
        self.optimizer.load_state_dict(own)
        self._set_lr_scale(state["lr_scale"])


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    """DMP's keys without LossStep's ``model.`` prefix: the unsharded model's keys."""
    return {k[len("model."):]: v for k, v in state.items()}


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def gather_state(state: Any, env: DistEnv, dst: int = 0) -> Any:
    """``state`` (nested dicts and lists) with every ShardedTensor gathered whole, as CPU tensors, on rank
    ``dst``; None on the other ranks. Collective: every rank walks the same structure in the same order."""
    if isinstance(state, dict):
        out = {k: gather_state(v, env, dst) for k, v in state.items()}
    elif isinstance(state, (list, tuple)):
        out = type(state)(gather_state(v, env, dst) for v in state)
    elif _is_sharded(state):
        full = torch.empty(state.size(), dtype=state.dtype, device=env.device) if env.rank == dst else None
        state.gather(dst=dst, out=full)
        out = None if full is None else full.cpu()
    elif isinstance(state, torch.Tensor):          # replicated (dense layers, Adam's state): rank dst's
        out = state.detach().cpu().clone() if env.rank == dst else None
    else:
        out = state
    return out if env.rank == dst else None


def _copy_into(value: Any, src: torch.Tensor, key: str) -> None:
    """Copy the whole tensor ``src`` into ``value``: a ShardedTensor's local shards take their rows and
    columns of it; a plain tensor takes it all."""
    if tuple(src.shape) != tuple(value.shape):
        raise ValueError(f"{key}: shape {tuple(src.shape)} != {tuple(value.shape)}")
    if _is_sharded(value):
        for shard in value.local_shards():
            offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            shard.tensor.copy_(src[index])
    else:
        value.copy_(src)


def _fill(own: dict[str, Any], saved: dict[str, Any]) -> None:
    """Copy the saved whole optimizer state into the live one ``own`` in place: sharded moments take this
    rank's rows; saved states of tables this rank does not hold (table_wise) are not needed here."""
    for k, d in own.items():
        if k not in saved:
            raise KeyError(f"saved optimizer state lacks {k}")
        for s, v in d.items():
            if _is_sharded(v) or isinstance(v, torch.Tensor):
                _copy_into(v, torch.as_tensor(saved[k][s]), f"{k}.{s}")   # copy_ converts device and dtype
            else:
                d[s] = saved[k][s]


def shard_model(model: nn.Module, sharding: Mapping[str, str], *, lr: float,
                table_optimizer: str = "rowwise_adagrad", eps: float = 1e-8, weight_decay: float = 0.0,
                seed: int = 0, env: DistEnv | None = None) -> ShardedModel:
    """Shard ``model``'s tables across the process group with DistributedModelParallel.

    Args:
        model: a :data:`SHARDABLE` family, built with :func:`build_meta` (rows drawn per rank with the
            tables' init_fn) or on the CPU (its rows are copied into the shards; every rank must have built
            the same rows, e.g. from the same seed: how a one-process model becomes a sharded one).
        sharding: table name -> "row_wise" (rows split evenly over the ranks) or "table_wise" (each whole
            table on one rank, round-robin) for every table (:func:`plan`).
        lr, eps, weight_decay: the fused table optimizer's and the dense Adam's.
        table_optimizer: a :data:`TABLE_OPTIMIZERS` name; on the CPU one of :data:`CPU_TABLE_OPTIMIZERS`.
        seed: seeds the per-rank initialisation of meta-built rows (rank r draws from seed * 1000003 + r).
        env: default :meth:`DistEnv.current`.
    """
    env = env or DistEnv.current()
    collections = _check(model, sharding, table_optimizer, env)
    materialized = any(p.device.type != "meta" for t in collections.values() for p in t.parameters())
    initial = {k: v.detach() for k, v in model.state_dict().items()} if materialized else None
    dmp = _wrap(model, collections, sharding, lr, table_optimizer, eps, weight_decay, seed, env)

    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    optimizers: list[tuple[str, Any]] = [("tables", dmp.fused_optimizer)]
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=weight_decay)) \
        if params else None
    if dense is not None:
        optimizers.append(("dense", dense))
    result = ShardedModel(dmp.module.model, dmp, CombinedOptimizer(optimizers), env, dense)
    if initial is not None:
        result.load_full_state_dict(initial)
    return result


def _check(model: nn.Module, sharding: Mapping[str, str], table_optimizer: str, env: DistEnv) -> dict[str, Tables]:
    """The model's Tables by DMP module path; refuses unshardable models and bad settings."""
    name = next((n for n, cls in models.MODELS.items() if isinstance(model, cls)), type(model).__name__)
    if name not in SHARDABLE:
        raise TypeError(f"{type(model).__name__} cannot be sharded: its loss reads whole tables (tables.weight), "
                        f"which a sharded model does not hold; shardable families: {', '.join(SHARDABLE)}")
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {table_optimizer!r}; one of {', '.join(TABLE_OPTIMIZERS)}")
    if env.device.type == "cpu" and table_optimizer not in CPU_TABLE_OPTIMIZERS:
        raise ValueError(f"table optimizer {table_optimizer!r} has no CPU kernel in fbgemm; "
                         f"on the CPU use one of {', '.join(CPU_TABLE_OPTIMIZERS)}")
    collections = {f"model.{n}.ebc": m for n, m in model.named_modules() if isinstance(m, Tables)}
    names = [n for t in collections.values() for n in t.names]
    unknown, missing = sorted(set(sharding) - set(names)), [n for n in names if n not in sharding]
    if unknown or missing:
        raise ValueError(f"sharding must name every table exactly: missing {missing}, unknown {unknown} "
                         f"(tables: {', '.join(names)})")
    bad = [n for n in sharding if sharding[n] not in SHARDING_TYPES]
    if bad:
        raise ValueError(f"table {bad[0]}: sharding {sharding[bad[0]]!r} is not one of {', '.join(SHARDING_TYPES)}")
    odd = [f"{n} ({d})" for t in collections.values() for n, d in t.dims.items() if d % DIM_MULTIPLE]
    if odd:
        raise ValueError(f"embedding dims must be multiples of {DIM_MULTIPLE} for fbgemm's fused kernel: {', '.join(odd)}")
    return collections


def _wrap(model: nn.Module, collections: dict[str, Tables], sharding: Mapping[str, str], lr: float,
          table_optimizer: str, eps: float, weight_decay: float, seed: int, env: DistEnv) -> Any:
    """DMP around ``LossStep(model)`` with the fused kernel and a plan from ``sharding``."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    fused: dict[str, Any] = {"optimizer": getattr(EmbOptimType, TABLE_OPTIMIZERS[table_optimizer]),
                             "learning_rate": lr}
    if table_optimizer != "sgd":
        fused["eps"] = eps
    if weight_decay:
        fused["weight_decay"] = weight_decay
    sharder = EmbeddingBagCollectionSharder(fused_params=fused)
    next_rank = 0
    generators: dict[str, dict[str, Any]] = {}
    for path, tables in collections.items():
        generators[path] = {}
        for n in tables.names:
            if sharding[n] == "row_wise":
                generators[path][n] = row_wise(compute_kernel="fused")
            else:            # round-robin over all table_wise tables, so two item tables land on two ranks
                generators[path][n] = table_wise(rank=next_rank % env.world_size, compute_kernel="fused")
                next_rank += 1
    module_plan = ShardingPlan({
        path: construct_module_sharding_plan(tables.ebc, generators[path], sharder=sharder,
                                             local_size=env.local_world_size, world_size=env.world_size,
                                             device_type=env.device.type)
        for path, tables in collections.items()})
    devices = [env.device.index] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + env.rank)    # meta-built rows: each rank draws its own
        return DistributedModelParallel(LossStep(model), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                        device=env.device, plan=module_plan, sharders=[sharder])


def local_batch(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s rows ``[rank * b, (rank + 1) * b)`` of a global batch, ``b = B // world_size``.

    The last ``B % world_size`` rows are dropped: TorchRec's backward exchanges equal-size blocks, so
    every rank's batch must have the same size. None when ``B < world_size``.
    """
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    b = sizes.pop() // world_size
    if b == 0:
        return None
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
