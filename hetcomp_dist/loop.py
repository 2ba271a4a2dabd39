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
        self._drop_old(epoch)

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

    # Sharded checkpoints: each rank writes its own rows, nothing is gathered. ``local`` holds
    # tensors whose first dimension is the rank's rows [start, stop); ``shared`` (rank 0) the rest.

    def save_shards(self, epoch: int, shared: dict[str, Any], local: dict[str, Any], rows: tuple[int, int],
                    rank: int, world: int, items: tuple[dict[str, Any], tuple[int, int]] | None = None) -> None:
        """Every rank calls it: its part, then (rank 0, once all parts are written) the manifest.

        ``items``: (state, its item rows [first, stop)) of a table split by item rows, a second part per
        rank, re-split by item rows on load as ``local`` is by user rows."""
        import torch.distributed as dist

        uri = self._uri(epoch)
        if rank == 0:
            fs, path = storage.filesystem(storage.join(uri, storage.MANIFEST))
            if fs.exists(path):                               # a rewrite: never an old manifest over new parts
                fs.rm(path)
        if world > 1:
            dist.barrier()
        name = f"rank-{rank:05d}-of-{world:05d}.pt"
        entries = {name: self._write(uri, name, local)}
        item_part = None
        if items is not None:
            item_part = [f"items-{name}", list(items[1])]
            entries[item_part[0]] = self._write(uri, item_part[0], items[0])
        if rank == 0:
            entries["shared.pt"] = self._write(uri, "shared.pt", shared)
        shards = [(name, list(rows), entries, item_part)]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, shards[0])        # names, row ranges and hashes only
            shards = gathered
        if rank == 0:
            parts = {n: e for _, _, entry, _ in shards for n, e in entry.items()}
            extra: dict[str, Any] = {"shards": [{"part": n, "rows": r} for n, r, _, _ in shards]}
            if items is not None:
                extra["item_shards"] = [{"part": i[0], "rows": i[1]} for _, _, _, i in shards]
            storage.commit_manifest(uri, self.kind, parts, {"epoch": epoch, **self.config}, extra)
            self._drop_old(epoch)
        if world > 1:
            dist.barrier()

    @staticmethod
    def _write(uri: str, name: str, state: dict[str, Any]) -> dict[str, Any]:
        with storage.write_part(uri, name) as f:
            torch.save(state, f)
        return f.entry

    def _drop_old(self, epoch: int) -> None:
        complete = [e for e in self.epochs() if e <= epoch and storage.is_complete(self._uri(e))]
        for old in complete[:-self.keep]:
            storage.remove(self._uri(old))
        for stale in (e for e in self.epochs() if e > epoch):
            storage.remove(self._uri(stale))

    def load_shards(self, start: int, stop: int, items: tuple[int, int] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]] | dict[str, Any] | None:
        """(shared, this rank's rows [start, stop) assembled from whichever shards hold them) from the
        newest complete compatible checkpoint; a checkpoint written whole (``state.pt``) is returned as
        it is; None if there is none. With ``items`` and a checkpoint of a split item table, the local
        state's ``"items"`` holds the item rows [first, stop), assembled the same way."""
        for epoch in reversed(self.epochs()):
            uri = self._uri(epoch)
            if not storage.is_complete(uri):
                continue
            manifest = storage.read_manifest(uri)
            if not self.compatible({k: v for k, v in manifest.get("config", {}).items() if k != "epoch"}):
                return None
            try:
                if "shards" not in manifest:
                    return torch.load(io.BytesIO(storage.read_bytes(uri, "state.pt", manifest)), weights_only=True)
                return self._read_shards(uri, manifest, start, stop, items)
            except (StorageError, RuntimeError, EOFError):       # damaged: fall back to the one before
                continue
        return None

    @staticmethod
    def _read_shards(uri: str, manifest: dict[str, Any], start: int, stop: int, items: tuple[int, int] | None):
        load = lambda name: torch.load(io.BytesIO(storage.read_bytes(uri, name, manifest)), weights_only=True)  # noqa: E731

        def assemble(shards: list[dict[str, Any]], start: int, stop: int) -> dict[str, Any]:
            pieces: dict[str, list[torch.Tensor]] = {}
            for shard in shards:
                a, b = shard["rows"]
                if b <= start or a >= stop:
                    continue
                for key, value in load(shard["part"]).items():
                    pieces.setdefault(key, []).append(value[max(start, a) - a:min(stop, b) - a])
            return {key: torch.cat(values) for key, values in pieces.items()}

        local = assemble(manifest["shards"], start, stop)
        if items is not None and "item_shards" in manifest:
            local["items"] = assemble(manifest["item_shards"], *items)
        return load("shared.pt"), local
