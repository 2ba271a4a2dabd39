"""The training-loop kit shared by the teacher and student loops.

- :class:`Stopping`: early stopping on a validation metric with patience and ``min_delta``, the
  best epoch, and a time budget that counts training time only; it also keeps how the run's time
  splits between training, evaluation and snapshots (checkpoints, trajectories).
- :class:`Checkpointer`: one checkpoint format and one rule for teachers and students:
  ``<root>/epoch-NNNNNN/`` holding ``state.pt`` with a manifest written last; the newest ``keep``
  complete ones are kept (a crash while one is written leaves the previous one), and a resume
  reads the newest complete checkpoint written under compatible settings.
"""

from __future__ import annotations

import io
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError


@dataclass
class Stopping:
    """Early stopping with a training-time budget (``max_train_seconds`` <= 0: none)."""

    patience: int
    min_delta: float = 0.0
    max_train_seconds: float = 0.0
    best: float = -math.inf
    best_epoch: int = 0
    bad: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    snapshot_seconds: float = 0.0

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """Record a validation value; returns (new best, improved by more than min_delta).

        A new best is always kept; a gain below ``min_delta`` still counts against patience.
        """
        best = value > self.best
        improved = value > self.best + self.min_delta
        if best:
            self.best, self.best_epoch = value, epoch
        self.bad = 0 if improved else self.bad + 1
        return best, improved

    @property
    def out_of_time(self) -> bool:
        return 0 < self.max_train_seconds <= self.train_seconds

    @property
    def done(self) -> bool:
        return self.bad >= self.patience or self.out_of_time

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the block's wall time to ``<what>_seconds`` (train, eval or snapshot)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, f"{what}_seconds", getattr(self, f"{what}_seconds") + time.perf_counter() - t0)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "min_delta", "max_train_seconds")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)

    def seconds(self) -> dict[str, float]:
        return {"train": self.train_seconds, "eval": self.eval_seconds, "snapshot": self.snapshot_seconds}


class Checkpointer:
    """Versioned checkpoints under ``root`` (see the module docstring).

    Args:
        root: the checkpoints' folder (a URI).
        kind: the manifests' kind (e.g. ``teacher-checkpoint``).
        config: settings stored in each manifest, for the resume check.
        compatible: whether a stored ``config`` may be resumed under the current settings.
        keep: complete checkpoints kept (at least 2, so a crash during a write loses one evaluation).
    """

    def __init__(self, root: str, kind: str, config: dict[str, Any],
                 compatible: Callable[[Any], bool], keep: int = 2):
        self.root, self.kind, self.config, self.compatible = root, kind, config, compatible
        self.keep = max(2, keep)

    def _uri(self, epoch: int) -> str:
        return storage.join(self.root, f"epoch-{epoch:06d}")

    def epochs(self) -> list[int]:
        fs, path = storage.filesystem(self.root)
        if not fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return sorted(int(n[6:]) for n in names if n.startswith("epoch-") and n[6:].isdigit())

    def save(self, epoch: int, state: dict[str, Any]) -> None:
        """Write the checkpoint of ``epoch`` (complete once its manifest exists), then drop old ones."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with storage.open_output(self._uri(epoch), kind=self.kind, config={"epoch": epoch, **self.config}) as o:
            o.write_bytes("state.pt", buffer.getvalue())
        complete = [e for e in self.epochs() if e <= epoch and storage.is_complete(self._uri(e))]
        for old in complete[:-self.keep]:
            storage.remove(self._uri(old))
        for stale in (e for e in self.epochs() if e > epoch):   # a resumed run's abandoned future
            storage.remove(self._uri(stale))

    def load(self) -> dict[str, Any] | None:
        """The newest complete, readable checkpoint written under compatible settings, else None."""
        for epoch in reversed(self.epochs()):
            uri = self._uri(epoch)
            if not storage.is_complete(uri):
                continue
            manifest = storage.read_manifest(uri)
            stored = {k: v for k, v in manifest.get("config", {}).items() if k != "epoch"}
            if not self.compatible(stored):
                return None
            try:
                return torch.load(io.BytesIO(storage.read_bytes(uri, "state.pt", manifest)), weights_only=True)
            except (StorageError, RuntimeError, EOFError):   # damaged: fall back to the one before
                continue
        return None

    def clear(self) -> None:
        storage.remove(self.root)
