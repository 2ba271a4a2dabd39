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

    RANGES: ClassVar[tuple[str, ...]] = (
        "lr > 0", "weight_decay >= 0", "batch_size >= 1", "max_epochs >= 1", "eval_every >= 1", "patience >= 1",
        "min_delta >= 0", "lr_decay > 0", "max_train_seconds >= 0", "seed >= 0", "threads >= 1", "cpus >= 0",
        "gpus >= 0")

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
