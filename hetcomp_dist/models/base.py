"""What every model family provides, and the name registry the configs refer to.

A model is a plain single-device ``nn.Module`` (tables from :mod:`.tables`); it owns its loss and
its sampler, and scores all items for a batch of users. Parallelism lives outside models: sharding.py (TorchRec DMP of
lookup-only families) and distributed.py (collectives).

Devices: everything a model computes with is a parameter or a buffer (graphs and CSR inputs as
non-persistent buffers, so checkpoints hold weights only), so ``model.to(device)`` moves all of it.
Its loss takes a batch on the model's device; its scorer takes users on any device and returns
scores on the model's. Samplers stay numpy on the CPU: the same batches on every device.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from hetcomp_dist.data.dataset import Interactions

Scorer = Callable[[torch.Tensor], torch.Tensor]  # B user indices -> B x n_items scores


class Recommender(Protocol):
    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """One training epoch of batches."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of one batch."""

    def scorer(self) -> Scorer:
        """A full-item scorer for evaluation (call under torch.no_grad; may cache item-side state)."""

    def after_step(self) -> None:
        """Hook after each optimiser step (e.g. projecting embeddings back into the unit ball)."""


MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        MODELS[name] = cls
        return cls
    return add


def build(name: str, n_users: int, n_items: int, train: Interactions, params: dict,
          device: torch.device | None = None) -> torch.nn.Module:
    """Instantiate model ``name`` on ``device`` (default: the CPU); unknown hyper-parameters are errors
    that list the allowed ones.

    The model is built on the CPU, from torch's CPU generator, then moved: a teacher starts from the
    same weights on every device, so a cuda run can be checked against a cpu one.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("n_users", "n_items", "train", "device")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"model {name}: unknown parameter(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    model = cls(n_users=n_users, n_items=n_items, train=train, **params)
    return model if device is None else model.to(device)
