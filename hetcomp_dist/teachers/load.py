"""Rebuild a trained teacher from storage, for serving or benchmarks.

What survives a finished ``train_teacher``: its trajectory and the newest checkpoint
``<teacher>/checkpoints/epoch-N`` (older ones are deleted as training goes). That checkpoint
holds the last epoch's weights *and* ``best_model``, the weights of the best valid evaluation,
which are the weights the teacher's test metrics and final trajectory snapshot come from.
"""

from __future__ import annotations

import torch

from hetcomp_dist import models
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.storage import StorageError
from hetcomp_dist.run import RunLayout
from hetcomp_dist.teachers.config import TeacherConfig
from hetcomp_dist.teachers.train import latest_checkpoint


def load_teacher(cfg: TeacherConfig, run: str, data: Dataset, best: bool = True,
                 device: torch.device | None = None) -> torch.nn.Module:
    """The teacher ``cfg`` of run ``run`` with its stored weights, in eval mode.

    Args:
        data: the run's dataset (autoencoders and LightGCN score from the train interactions).
        best: the best valid epoch's weights (default), else the last epoch's.
        device: where to load it (default: the CPU); checkpoints hold CPU tensors, so any device loads them.
    Raises:
        StorageError: no complete checkpoint under ``<run>/teachers/<name>/checkpoints``.
    """
    # the same loader the trainer resumes from, so both agree on which checkpoint is current
    where = RunLayout(run).teacher(cfg.name)
    state = latest_checkpoint(where)
    if state is None:
        raise StorageError(f"teacher {cfg.name!r}: no complete checkpoint under {where}")
    model = models.build(cfg.model, data.n_users, data.n_items, data.train, cfg.params, device)
    model.load_state_dict(state["best_model"] if best and state.get("best_model") is not None else state["model"])
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Trainable values a server must hold (buffers such as a graph's adjacency not included)."""
    return sum(p.numel() for p in model.parameters())
