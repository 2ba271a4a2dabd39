"""The loop kit: early stopping with a training-time budget, and the versioned checkpointer."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hetcomp_dist import storage
from hetcomp_dist.loop import Checkpointer, Stopping


def test_stopping_keeps_best_counts_small_gains_and_budgets_training_only():
    s = Stopping(patience=2, min_delta=0.1, max_train_seconds=0.05)
    assert s.update(1, 0.5) == (True, True)
    assert s.update(2, 0.55) == (True, False) and s.best_epoch == 2 and s.bad == 1   # a best, not an improvement
    assert s.update(3, 0.4) == (False, False) and s.done                             # patience spent
    t = Stopping(patience=10, max_train_seconds=0.05)
    with t.timing("eval"):
        time.sleep(0.08)
    assert not t.out_of_time                       # evaluation is not training time
    with t.timing("train"):
        time.sleep(0.06)
    assert t.out_of_time and t.seconds()["eval"] >= 0.08
    u = Stopping(patience=2)
    u.load_state_dict(t.state_dict())
    assert u.train_seconds == t.train_seconds and u.patience == 2


def _ckpt(root: Path, lr: float = 0.1) -> Checkpointer:
    return Checkpointer(str(root), "test-checkpoint", {"lr": lr}, lambda stored: stored.get("lr") == lr)


def test_checkpointer_keeps_two_and_falls_back_from_a_damaged_one(tmp_path: Path):
    c = _ckpt(tmp_path / "ck")
    for epoch in (1, 2, 3):
        c.save(epoch, {"epoch": epoch, "w": torch.full((2,), float(epoch))})
    assert c.epochs() == [2, 3]
    assert c.load()["epoch"] == 3
    newest = tmp_path / "ck" / "epoch-000003" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:-7] + b"garbage")          # a torn or damaged write
    assert c.load()["epoch"] == 2
    (tmp_path / "ck" / "epoch-000003" / storage.MANIFEST).unlink()    # killed before its manifest
    assert c.load()["epoch"] == 2
    assert _ckpt(tmp_path / "ck", lr=0.5).load() is None               # other settings: never resumed
    c.save(3, {"epoch": 3})                                            # a rewrite of epoch 3 after resuming from 2
    assert c.epochs() == [2, 3] and c.load()["epoch"] == 3


def test_checkpointer_on_both_backends(storage_root: str):
    c = Checkpointer(storage.join(storage_root, "ck"), "test-checkpoint", {"lr": 0.1}, lambda s: True)
    for epoch in (5, 10, 15):
        c.save(epoch, {"epoch": epoch})
    assert c.epochs() == [10, 15] and c.load()["epoch"] == 15
    c.clear()
    assert c.epochs() == [] and c.load() is None
