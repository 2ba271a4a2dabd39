"""Warm start: a previous version's model state grown to the new version's users and items.

Ids are append-only across versions (refresh/versions.py), so every table of the new model is the old
table with rows appended: the grown state is a freshly built model's state (new rows initialised as the
model's own init does, under the config's seed) with the old state copied into its leading block along
every dimension. That covers every family alike: embedding tables (rows: users or items), MultVAE's
and I-AE's bias vectors over items or users, dense layers (same shape: copied whole) and buffers such
as MultVAE's KL-annealing step counter.

The grown state is fed to the training loops through their own resume mechanism, so the loops need no
change: an ``epoch-000000`` checkpoint is written where the loop resumes from (teachers:
``<teacher>/checkpoints``; the student: ``<out>/checkpoints``), holding the grown weights, a fresh
optimiser state and fresh stopping and stage state. A resumed loop then trains epochs 1, 2, ...; a
refresh killed later resumes from the loop's newer checkpoints as any run does.
"""

from __future__ import annotations

import io
from dataclasses import asdict, replace
from typing import Any

import torch

from hetcomp_dist import models, storage
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.distill import train as distill_train
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.student import ITEM_KEY, USER_KEY, Student
from hetcomp_dist.loop import Stopping
from hetcomp_dist.teachers import train as teacher_train
from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig
from hetcomp_dist.teachers.trajectory import TrajectoryWriter


def grow_state(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``fresh`` with ``old`` copied into the leading block of every tensor; the keys left fresh."""
    out, untouched = {}, []
    for key, value in fresh.items():
        prev = old.get(key)
        if prev is None or prev.dim() != value.dim() or any(a > b for a, b in zip(prev.shape, value.shape)):
            out[key] = value.clone()
            untouched.append(key)
            continue
        grown = value.clone()
        grown[tuple(slice(0, n) for n in prev.shape)] = prev.to(value.dtype)
        out[key] = grown
    return out, untouched


def latest_model_state(teacher_out: str, cfg: TeacherConfig) -> dict[str, torch.Tensor] | None:
    """The best weights of a finished teacher's newest checkpoint (any settings), or None."""
    state = teacher_train.latest_checkpoint(teacher_out)
    if state is None:
        return None
    return state.get("best_model") or state["model"]


def warm_teacher(cfg: TeacherConfig, data: Dataset, old_state: dict[str, torch.Tensor], out: str,
                 trajectory: TrajectoryConfig, ks: tuple[int, ...], eval_batch_size: int) -> dict[str, Any]:
    """Prepare ``out`` so that ``train_teacher(cfg, ..., out)`` continues from ``old_state`` grown.

    Writes the grown model's snapshot as the trajectory's epoch 0 (its valid metrics on the new
    version) and an epoch-0 checkpoint whose best is that model. Returns what the report keeps.
    """
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, data.n_users, data.n_items, data.train, cfg.params)
    grown, untouched = grow_state(old_state, model.state_dict())
    model.load_state_dict(grown)
    # fused as the loop's own: a resumed Adam takes its settings from the checkpoint's param_groups, so an
    # unfused one here would leave the whole continuation on the slower unfused step.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    stopping = Stopping(cfg.patience, cfg.min_delta, cfg.max_train_seconds)
    writer = TrajectoryWriter(storage.join(out, "trajectory"), model=cfg.model, n_users=data.n_users, k=trajectory.k,
                              n_items=data.n_items, observed_k=trajectory.observed_k,
                              config=asdict(cfg), overwrite=True)
    evaluator = teacher_train.Evaluator(data, ks, eval_batch_size, trajectory.k)
    value = evaluator.snapshot(model, writer, 0, cfg.select_metric, stopping)
    stopping.update(0, value)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    teacher_train.checkpointer(out, cfg).save(0, {"model": state, "optimizer": optimizer.state_dict(), "epoch": 0,
                                                  "stopping": stopping.state_dict(), "best_model": state})
    return {"start_valid": value, "fresh_keys": untouched}


def warm_teacher_config(cfg: TeacherConfig, epochs: int) -> TeacherConfig:
    """The teacher trains at most ``epochs`` more epochs, evaluated at least at the last one."""
    return replace(cfg, max_epochs=epochs, eval_every=max(1, min(cfg.eval_every, epochs)))


def warm_student(cfg: DistillConfig, data: Dataset, old_state: dict[str, torch.Tensor], n_teachers: int,
                 n_stages: int, out: str) -> list[str]:
    """Write ``<out>/checkpoints/epoch-000000``: the grown student, for ``distill(..., cfg, out)`` to resume.

    ``n_teachers`` and ``n_stages`` size the objective's DKC state: every (user, teacher) pair starts at
    stage 0 (``final_ensemble``: the last stage), as a fresh distillation does. Returns the keys left fresh.
    """
    torch.manual_seed(cfg.seed)
    fresh = Student(data.n_users, data.n_items, cfg.dim, init_std=cfg.init_std)
    grown, untouched = grow_state({k: old_state[k] for k in (USER_KEY, ITEM_KEY)}, fresh.state_dict())
    fresh.load_state_dict(grown)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # (as above)
    first = n_stages - 1 if cfg.method == "final_ensemble" else 0
    if cfg.method == "bpr":
        objective = {"stage": torch.zeros(0), "last": torch.zeros(0)}
    else:
        objective = {"stage": torch.full((data.n_users, n_teachers), first, dtype=torch.long),
                     "last": torch.zeros((data.n_users, n_teachers), dtype=torch.float64)}
    stopping = Stopping(cfg.patience, 0.0, cfg.max_train_seconds)
    state = {"epoch": 0, "student": grown, "best_state": {k: v.clone() for k, v in grown.items()},
             "optimizer": optimizer.state_dict(), **objective, "history": [], "progress": [],
             "stopping": stopping.state_dict(), "resumes": []}
    distill_train.checkpointer(out, cfg).save(0, state)
    return untouched


def load_student_state(uri: str) -> dict[str, torch.Tensor]:
    """A student output's weights (student.pt, verified against its manifest)."""
    return torch.load(io.BytesIO(storage.read_bytes(uri, "student.pt")), weights_only=True)
