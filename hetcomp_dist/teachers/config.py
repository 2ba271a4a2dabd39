"""A teacher's settings and the trajectory's (the ``teachers`` and ``trajectory`` sections of a run config)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from hetcomp_dist.config import Where, check_metric, check_name, check_ranges


@dataclass
class TeacherConfig:
    """One teacher. ``model`` is a registry name; ``params`` its hyper-parameters (checked)."""
    RENAMED: ClassVar[dict[str, str]] = {"max_seconds": "max_train_seconds"}   # stored configs' older names

    name: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 4096
    max_epochs: int = 200
    eval_every: int = 5
    patience: int = 5             # evaluations without improvement of select_metric
    min_delta: float = 0.0        # smaller gains keep the best state but count as "no improvement" (patience, lr_decay)
    lr_decay: float = 1.0         # multiply the learning rate by this at each evaluation without improvement
    max_train_seconds: float = 0.0  # > 0: evaluate and stop after the epoch that reaches this much training time (evaluation not counted)
    select_metric: str = "recall@20"
    seed: int = 0
    threads: int = 1              # torch intra-op threads
    cpus: float = 1.0             # Ray resources of the teacher's actor
    gpus: float = 0.0
    # Where the teacher trains and is evaluated (hetcomp_dist/device.py): auto = the GPU when torch sees one.
    # As a Ray actor, auto means cuda exactly when gpus > 0: Ray does not hide the GPUs from an actor that
    # reserved none, and such an actor must not take one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # > 1: the tables sharded across this many Ray Train workers under TorchRec DMP (hetcomp_dist/sharding.py),
    # each worker reserving cpus / gpus; only for the lookup-only families (bpr_mf, cml, neumf), under Ray.
    workers: int = 1
    # The sharded tables' fused fbgemm optimizer (required with workers > 1; dense layers keep Adam):
    # sgd, adagrad, rowwise_adagrad; adam only on GPUs (fbgemm has no CPU kernel for it).
    table_optimizer: str | None = None
    # Where the item tables go with workers > 1 (user tables are always row_wise): row_wise | table_wise.
    item_sharding: Literal["row_wise", "table_wise"] = "row_wise"

    RANGES: ClassVar[tuple[str, ...]] = (
        "lr > 0", "weight_decay >= 0", "batch_size >= 1", "max_epochs >= 1", "eval_every >= 1", "patience >= 1",
        "min_delta >= 0", "lr_decay > 0", "max_train_seconds >= 0", "seed >= 0", "threads >= 1", "cpus >= 0",
        "gpus >= 0", "workers >= 1")

    def validate(self, where: Where) -> None:
        """Ranges, a safe name, no GPU reserved for a CPU teacher, a registered model that accepts ``params``;
        K of select_metric is RunConfig's. Whether this host has a GPU for ``device: cuda`` is checked where
        the teacher runs (train_teachers, before any work), which need not be the host that loads the config."""
        from hetcomp_dist import models   # torch and the model families: only once a teacher is configured

        check_name(self.name, where.at("name"))
        check_ranges(self, where, self.RANGES)
        check_metric(where.at("select_metric"), self.select_metric)
        if self.device == "cpu" and self.gpus > 0:
            raise where.at("gpus").error(f"{self.gpus:g} GPU(s) reserved, but device is cpu: they would stay "
                                         "idle (set device: auto or cuda)")
        if self.model not in models.MODELS:
            raise where.at("model").error(f"unknown model {self.model!r} (registered: {', '.join(sorted(models.MODELS))})")
        try:
            inspect.signature(models.MODELS[self.model]).bind_partial(**self.params)
        except TypeError as e:
            raise where.at("params").error(f"not accepted by {self.model}: {e}") from None
        self._check_sharding(where)

    def _check_sharding(self, where: Where) -> None:
        """workers > 1 only for a shardable family, with a table optimizer this device has, dims that fbgemm's
        fused kernel takes, and a batch every worker gets rows of; the sharding keys only with workers > 1."""
        from hetcomp_dist import models, sharding

        if self.workers == 1:
            if self.table_optimizer is not None:
                raise where.at("table_optimizer").error("only with workers > 1 (one process trains every "
                                                        "parameter with Adam)")
            if self.item_sharding != "row_wise":
                raise where.at("item_sharding").error("only with workers > 1 (one process holds whole tables)")
            return
        if self.model not in sharding.SHARDABLE:
            raise where.at("workers").error(
                f"{self.workers} workers shard the tables, which only {', '.join(sharding.SHARDABLE)} allow (their "
                f"losses only look rows up); {self.model} reads whole tables: set workers: 1")
        opts = ", ".join(sharding.CPU_TABLE_OPTIMIZERS) + " (CPU or GPU), adam (GPU only)"
        if self.table_optimizer is None:
            raise where.at("table_optimizer").error(f"required with workers > 1: one of {opts}")
        if self.table_optimizer not in sharding.TABLE_OPTIMIZERS:
            raise where.at("table_optimizer").error(f"expected one of {opts}, got {self.table_optimizer!r}")
        if self.table_optimizer not in sharding.CPU_TABLE_OPTIMIZERS and self.gpus <= 0:
            raise where.at("table_optimizer").error(
                f"{self.table_optimizer} has no CPU kernel in fbgemm, and with gpus: 0 the workers train on the "
                f"CPU: use one of {', '.join(sharding.CPU_TABLE_OPTIMIZERS)}, or reserve gpus")
        dim = self.params.get("dim", inspect.signature(models.MODELS[self.model]).parameters["dim"].default)
        if dim % sharding.DIM_MULTIPLE:
            raise where.at("params").at("dim").error(
                f"must be a multiple of {sharding.DIM_MULTIPLE} with workers > 1 (fbgemm's fused kernel, which "
                f"trains the sharded tables, takes no other), got {dim}")
        if self.batch_size < self.workers:
            raise where.at("batch_size").error(f"must be >= workers ({self.workers}): each worker takes "
                                               "batch_size // workers rows of every batch")


@dataclass
class TrajectoryConfig:
    k: int = 100
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])
    observed_k: int = 100

    def validate(self, where: Where) -> None:
        """k, observed_k >= 1; fractions in (0, 1] and strictly increasing (select_snapshots' rule)."""
        check_ranges(self, where, ("k >= 1", "observed_k >= 1", "fractions > 0", "fractions <= 1"))
        for i, (a, b) in enumerate(zip(self.fractions, self.fractions[1:])):
            if b <= a:
                raise where.at("fractions").at(i + 1).error(f"must be > the fraction before it ({a}), got {b}")
