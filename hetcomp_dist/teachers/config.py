"""A teacher's settings and the trajectory's (the ``teachers`` and ``trajectory`` sections of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TeacherConfig:
    """One teacher. ``model`` is a registry name; ``params`` its hyper-parameters (checked)."""

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


@dataclass
class TrajectoryConfig:
    k: int = 100
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])
    observed_k: int = 100
