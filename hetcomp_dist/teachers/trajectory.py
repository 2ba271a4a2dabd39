"""Teacher trajectories: per-user top-K snapshots streamed to storage while a teacher trains.

See docs ALGORITHM.md section 3. While a teacher trains it evaluates on valid every few epochs
and, at each evaluation, calls :meth:`TrajectoryWriter.write_snapshot` with that evaluation's
metrics and its per-user top-K unobserved items, streamed in user batches. At the end
:meth:`TrajectoryWriter.finish` keeps 4 snapshots (:func:`select_snapshots`), removes the
others, writes the ranking of each user's observed (train) items and, last, the manifest.
:func:`read_trajectories` / :func:`read_observed` (or a :class:`TrajectoryReader`) load one
contiguous user shard of several teachers, reading only the Parquet row groups that cover it.

Layout under one teacher's URI (any URI of :mod:`hetcomp_dist.storage`)::

    progress.json                              writer state, rewritten atomically after each snapshot
    snapshots/epoch-000015-<8 hex>.parquet     one per evaluation epoch (a fresh suffix per write)
    observed/observed-<8 hex>.parquet          written by finish()
    MANIFEST.json                              written last by finish(): what readers trust

Parquet schema, one row per user, row ``i`` is user ``i`` (users ``0 .. n_users-1``, increasing,
each exactly once; validated while writing)::

    user   int32 (not null)
    items  fixed_size_list<item: int32 not null>[width] (not null)

``width`` is ``k`` for snapshots (rank order, best first) and ``observed_k`` (default 100) for
the observed ranking. Lists are padded at the end with -1 (:data:`PAD`): always for observed
rankings of users with fewer than ``observed_k`` train items (an empty profile is all -1), and
for snapshots only if a user has fewer than ``k`` unobserved items. Observed rankings wider than
``observed_k`` are truncated to their first ``observed_k`` items (rank order).

Row groups hold aligned user ranges ``[j*R, min((j+1)*R, n_users))`` (``R = row_group_users``,
default 4096) whatever the batch sizes, and their ranges are stored in the manifest
(``parts[name]["row_groups"]``) as the row-group index; Parquet column statistics on ``user``
agree with it. Pages carry CRC checksums, verified when read (partial reads cannot check the
part's sha256; :meth:`TrajectoryReader.verify` does, reading every part whole).

Memory while writing is bounded by one incoming batch plus at most ``R`` buffered users (and
the S3 client's upload buffer): row groups are written as batches arrive.

Crash safety and resume. A snapshot file is only referenced by ``progress.json`` once complete;
a failed snapshot (an exception in the batch iterator, a validation error) removes its partial
file and leaves the earlier snapshots as they were. A killed writer may leave an unreferenced
file, removed by the next :meth:`~TrajectoryWriter.finish`. Snapshots are keyed by evaluation
epoch and time only moves forward: writing epoch ``E`` supersedes every recorded snapshot at an
epoch ``>= E`` (same epoch: overwrite; later epochs: they came from a run that was lost).
:meth:`TrajectoryWriter.resume` continues from ``progress.json`` given the epoch of the
checkpoint training resumed from, and drops the snapshots recorded after it at once. Nothing
is visible to readers before ``finish`` commits the manifest; a new or resumed writer first
removes an existing manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError

KIND = "teacher-trajectory"
PROGRESS = "progress.json"
PROGRESS_FORMAT = "hetcomp-trajectory-progress/1"
SNAPSHOT_DIR = "snapshots"
OBSERVED_DIR = "observed"
PAD = -1
DEFAULT_FRACTIONS = (0.5, 0.7, 0.85)
DEFAULT_METRIC = "recall@20"
DEFAULT_K = 100
OBSERVED_K = 100
DEFAULT_ROW_GROUP_USERS = 4096

Batch = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- selection

def select_snapshots(history: Mapping[int, Mapping[str, Any]] | Iterable[tuple[int, Mapping[str, Any]]],
                     fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     metric: str = DEFAULT_METRIC) -> list[int]:
    """Epochs of the kept snapshots, easy to hard: ``len(fractions) + 1`` of them.

    ``history``: ``{epoch: metrics}`` or ``(epoch, metrics)`` pairs, one per evaluation (any
    order; evaluation order is epoch order). For each fraction ``f`` (strictly increasing, in
    (0, 1]) the point is the first evaluation whose ``metrics[metric] >= f * best``; the last
    point is the best evaluation (the earliest one on ties, as a trainer keeping strict
    improvements holds). The result is non-decreasing and may repeat an epoch, e.g. when the
    first evaluation already reaches ``0.85 * best`` or is the best: the trajectory still has
    ``len(fractions) + 1`` points, consecutive stages then hold the same snapshot.

    A missing metric is a ValueError naming the epoch; ``None``/NaN values never qualify; the
    metric must be >= 0 (a best of 0 selects the first evaluation everywhere).
    """
    items = list(history.items()) if isinstance(history, Mapping) else list(history)
    if not items:
        raise ValueError("select_snapshots: empty history (no evaluation recorded)")
    fractions = [float(f) for f in fractions]
    if any(not 0.0 < f <= 1.0 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"fractions must be strictly increasing and in (0, 1], got {fractions}")
    epochs = [int(e) for e, _ in items]
    if len(set(epochs)) != len(epochs):
        raise ValueError(f"history has duplicate epochs: {sorted(epochs)}")
    order = sorted(range(len(items)), key=lambda i: epochs[i])
    values = []
    for i in order:
        metrics = items[i][1]
        if metric not in metrics:
            raise ValueError(f"evaluation at epoch {epochs[i]} has no metric {metric!r} "
                             f"(has {sorted(metrics)})")
        v = metrics[metric]
        v = float(v) if v is not None else math.nan
        values.append(v if math.isfinite(v) else -math.inf)
    epochs = [epochs[i] for i in order]
    best = max(values)
    if best == -math.inf:
        raise ValueError(f"no evaluation has a finite {metric!r}")
    if best < 0:
        raise ValueError(f"{metric!r} must be >= 0 to take fractions of its best (best is {best})")
    best_index = values.index(best)
    chosen = [next(epochs[i] for i, v in enumerate(values) if v >= f * best) for f in fractions]
    return chosen + [epochs[best_index]]


# ----------------------------------------------------------------------------- writing

def _schema(width: int) -> pa.Schema:
    return pa.schema([
        pa.field("user", pa.int32(), nullable=False),
        pa.field("items", pa.list_(pa.field("item", pa.int32(), nullable=False), width), nullable=False),
    ])


class _RowGroupStream:
    """Validates user batches and writes them as aligned row groups of ``row_group_users`` users."""

    def __init__(self, writer: pq.ParquetWriter, label: str, width: int, n_users: int,
                 row_group_users: int, n_items: int | None, truncate: bool):
        self.writer, self.label, self.width = writer, label, width
        self.n_users, self.rg_users, self.n_items, self.truncate = n_users, row_group_users, n_items, truncate
        self.schema = _schema(width)
        self.next_user = 0          # first user not received yet
        self.flushed = 0            # first user not written yet
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.row_groups: list[list[int]] = []

    def _fail(self, message: str) -> None:
        raise ValueError(f"{self.label}: {message}")

    def add(self, users: Any, items: Any) -> None:
        users, items = np.asarray(users), np.asarray(items)
        if users.ndim != 1 or items.ndim != 2 or items.shape[0] != users.shape[0]:
            self._fail(f"a batch must be users [B] and items [B, width], got {users.shape} and {items.shape}")
        if users.size and not np.issubdtype(users.dtype, np.integer):
            self._fail(f"user ids must be integers, got {users.dtype}")
        if items.size and not np.issubdtype(items.dtype, np.integer):
            self._fail(f"item ids must be integers, got {items.dtype}")
        if items.shape[1] != self.width:
            if self.truncate and items.shape[1] > self.width:
                items = items[:, :self.width]
            elif self.truncate:
                items = np.concatenate([items, np.full((len(items), self.width - items.shape[1]), PAD, items.dtype)], 1)
            else:
                self._fail(f"items must have {self.width} columns (K), got {items.shape[1]}")
        n = len(users)
        if n == 0:
            return
        expected = np.arange(self.next_user, self.next_user + n, dtype=np.int64)
        wrong = np.flatnonzero(users != expected)
        if wrong.size:
            i = int(wrong[0])
            got, want = int(users[i]), int(expected[i])
            if got < want:
                self._fail(f"user {got} is duplicated or out of order (expected user {want}); users must be "
                           "written in increasing order, each exactly once")
            self._fail(f"gap or out-of-order users: expected user {want}, got {got}; users must be written "
                       "in increasing order, each exactly once")
        if self.next_user + n > self.n_users:
            self._fail(f"user {self.n_users} is out of range (n_users={self.n_users})")
        self._check_items(items, self.next_user)
        self.next_user += n
        self.pending.append(np.ascontiguousarray(items, dtype=np.int32))
        self.n_pending += n
        if self.n_pending >= self.rg_users:
            self._flush(final=False)

    def _check_items(self, items: np.ndarray, first_user: int) -> None:
        def where(mask: np.ndarray) -> str:
            r = int(np.flatnonzero(mask.any(axis=1))[0])
            return f"user {first_user + r}"
        low = items < PAD
        if low.any():
            self._fail(f"{where(low)}: item ids must be >= 0 ({PAD} pads the end of a list)")
        if self.n_items is not None:
            high = items >= self.n_items
            if high.any():
                self._fail(f"{where(high)}: item id >= n_items ({self.n_items})")
        elif items.size and items.max() > np.iinfo(np.int32).max:
            self._fail("item ids do not fit int32")
        valid = items >= 0
        inner_pad = ~valid[:, :-1] & valid[:, 1:]
        if inner_pad.any():
            self._fail(f"{where(inner_pad)}: padding ({PAD}) must only end a list")
        s = np.sort(items, axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            self._fail(f"{where(dup)}: an item appears twice in one ranked list")

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        block = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        done = 0
        while len(block) - done >= self.rg_users or (final and done < len(block)):
            n = min(self.rg_users, len(block) - done)
            self._write(block[done:done + n])
            done += n
        rest = block[done:]
        self.pending = [rest.copy()] if len(rest) else []  # a copy: do not keep the whole block alive
        self.n_pending = len(rest)

    def _write(self, items: np.ndarray) -> None:
        start, n = self.flushed, len(items)
        users = pa.array(np.arange(start, start + n, dtype=np.int32))
        lists = pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1)), type=self.schema.field("items").type)
        self.writer.write_table(pa.Table.from_arrays([users, lists], schema=self.schema), row_group_size=n)
        self.row_groups.append([start, start + n])
        self.flushed += n

    def finish(self) -> None:
        self._flush(final=True)
        if self.next_user != self.n_users:
            self._fail(f"users {self.next_user}..{self.n_users - 1} are missing "
                       f"(got {self.next_user} of n_users={self.n_users})")


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in dict(metrics).items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {key!r} is not a number: {value!r}") from None
        out[str(key)] = v if math.isfinite(v) else None
    return out


class TrajectoryWriter:
    """Streams one teacher's snapshots to ``uri`` and, at the end, commits its trajectory.

    A new writer refuses a location that already holds a trajectory or a progress record unless
    ``overwrite=True`` (then everything it wrote there before is removed); to continue after a
    restart use :meth:`resume`. ``n_items`` (optional) enables an id range check; ``config``
    (e.g. the teacher's hyper-parameters) goes into the manifest.
    """

    def __init__(self, uri: str, *, model: str, n_users: int, k: int = DEFAULT_K, n_items: int | None = None,
                 observed_k: int = OBSERVED_K, row_group_users: int = DEFAULT_ROW_GROUP_USERS,
                 config: Mapping[str, Any] | None = None, compression: str | None = "zstd",
                 overwrite: bool = False):
        self._setup(uri, model=model, n_users=n_users, k=k, n_items=n_items, observed_k=observed_k,
                    row_group_users=row_group_users, config=config, compression=compression)
        if (storage.exists(self._progress_uri) or storage.is_complete(self.uri)) and not overwrite:
            raise StorageError(f"{self.uri} already holds a trajectory or its progress record: use "
                               "TrajectoryWriter.resume(uri, checkpoint_epoch) to continue it, or overwrite=True")
        self._remove_manifest()
        self._remove(storage.join(self.uri, PROGRESS))
        self._remove_unreferenced()
        self._save_progress()

    def _setup(self, uri: str, *, model: str, n_users: int, k: int, n_items: int | None, observed_k: int,
               row_group_users: int, config: Mapping[str, Any] | None, compression: str | None) -> None:
        if n_users < 0 or k < 1 or observed_k < 1 or row_group_users < 1:
            raise ValueError(f"need n_users >= 0, k >= 1, observed_k >= 1, row_group_users >= 1; got "
                             f"{n_users}, {k}, {observed_k}, {row_group_users}")
        if max(n_users, n_items or 0) > np.iinfo(np.int32).max:
            raise ValueError(f"n_users={n_users} / n_items={n_items} do not fit int32 ids")
        self.uri = str(uri).rstrip("/")
        self.model, self.n_users, self.k, self.n_items = str(model), int(n_users), int(k), n_items
        self.observed_k, self.row_group_users = int(observed_k), int(row_group_users)
        self.config = dict(config or {})
        self.compression = compression
        self._evaluations: list[dict[str, Any]] = []
        self._finished = False
        self._progress_uri = storage.join(self.uri, PROGRESS)

    @classmethod
    def resume(cls, uri: str, checkpoint_epoch: int | None, *, model: str | None = None,
               n_users: int | None = None, k: int | None = None, n_items: int | None = None,
               observed_k: int | None = None, row_group_users: int = DEFAULT_ROW_GROUP_USERS,
               config: Mapping[str, Any] | None = None, compression: str | None = "zstd") -> "TrajectoryWriter":
        """Continue the trajectory at ``uri`` after a restart from the checkpoint of ``checkpoint_epoch``.

        Snapshots recorded at epochs ``> checkpoint_epoch`` are dropped now (their evaluations will be
        re-run); ``checkpoint_epoch=None`` means training restarted from scratch, so all are dropped.
        Settings not given are taken from ``progress.json``; given ones must match it. Without a
        progress record (the writer died before its first snapshot) this is a fresh writer, and
        then ``model`` and ``n_users`` are required. An existing manifest is removed first.
        """
        progress_uri = storage.join(str(uri).rstrip("/"), PROGRESS)
        progress = _load_json(progress_uri) if storage.exists(progress_uri) else None
        if progress is None:
            if model is None or n_users is None:
                raise StorageError(f"{uri}: no {PROGRESS} to resume from; pass model= and n_users= to start afresh")
            return cls(uri, model=model, n_users=n_users, k=k or DEFAULT_K, n_items=n_items,
                       observed_k=observed_k or OBSERVED_K, row_group_users=row_group_users, config=config,
                       compression=compression, overwrite=True)
        if progress.get("format") != PROGRESS_FORMAT:
            raise StorageError(f"{progress_uri}: not a trajectory progress record ({progress.get('format')!r})")
        _check_parts(uri, progress_uri, progress)
        given = {"model": model, "n_users": n_users, "k": k, "n_items": n_items, "observed_k": observed_k}
        for key, value in given.items():
            if value is not None and value != progress[key]:
                raise StorageError(f"{uri}: resuming with {key}={value!r} but the recorded trajectory has "
                                   f"{key}={progress[key]!r}")
        self = cls.__new__(cls)
        self._setup(uri, model=progress["model"], n_users=progress["n_users"], k=progress["k"],
                    n_items=progress["n_items"], observed_k=progress["observed_k"],
                    row_group_users=row_group_users,
                    config=progress.get("config", {}) if config is None else config, compression=compression)
        self._remove_manifest()
        self._evaluations = list(progress["evaluations"])
        keep = [] if checkpoint_epoch is None else [e for e in self._evaluations if e["epoch"] <= checkpoint_epoch]
        dropped = [e for e in self._evaluations if e not in keep]
        self._evaluations = keep
        self._save_progress()
        for e in dropped:
            if e.get("part"):
                self._remove(storage.child(self.uri, e["part"]))
        return self

    # -- state

    @property
    def history(self) -> list[tuple[int, dict[str, float | None]]]:
        """``(epoch, metrics)`` of every recorded evaluation, in epoch order."""
        return [(e["epoch"], dict(e["metrics"])) for e in self._evaluations]

    @property
    def epochs(self) -> list[int]:
        return [e["epoch"] for e in self._evaluations]

    def _save_progress(self, **extra: Any) -> None:
        progress = {
            "format": PROGRESS_FORMAT, "model": self.model, "n_users": self.n_users, "k": self.k,
            "n_items": self.n_items, "observed_k": self.observed_k, "config": self.config,
            "evaluations": self._evaluations, "updated": datetime.now(timezone.utc).isoformat(), **extra,
        }
        storage.write_atomic(self._progress_uri, json.dumps(progress, indent=1, sort_keys=True).encode())

    def _remove(self, uri: str) -> None:
        fs, path = storage.filesystem(uri)
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rm(path)

    def _remove_manifest(self) -> None:
        if storage.is_complete(self.uri):
            self._remove(storage.join(self.uri, storage.MANIFEST))

    def _remove_unreferenced(self, keep: Iterable[str] = ()) -> None:
        """Delete files under snapshots/ and observed/ that ``keep`` does not name (crash leftovers)."""
        keep = set(keep)
        for folder in (SNAPSHOT_DIR, OBSERVED_DIR):
            fs, path = storage.filesystem(storage.join(self.uri, folder))
            try:
                names = fs.ls(path, detail=False)
            except (FileNotFoundError, OSError):
                continue
            for p in names:
                name = f"{folder}/{p.rstrip('/').rsplit('/', 1)[-1]}"
                if name not in keep:
                    with contextlib.suppress(FileNotFoundError, OSError, StorageError):
                        leftover = storage.filesystem(storage.child(self.uri, name))[1]   # never outside uri
                        fs.rm(leftover, recursive=True)

    def _write_part(self, name: str, label: str, width: int, batches: Iterable[Batch],
                    truncate: bool) -> dict[str, Any]:
        with storage.write_part(self.uri, name) as f:
            writer = pq.ParquetWriter(f, _schema(width), compression=self.compression, write_statistics=True,
                                      write_page_checksum=True)
            ok = False
            try:
                stream = _RowGroupStream(writer, label, width, self.n_users, self.row_group_users,
                                         self.n_items, truncate)
                for batch in batches:
                    users, items = batch
                    stream.add(users, items)
                stream.finish()
                ok = True
            finally:
                if ok:
                    writer.close()
                else:  # the footer goes into a part that write_part removes
                    with contextlib.suppress(Exception):
                        writer.close()
        return {**f.entry, "rows": self.n_users, "row_groups": stream.row_groups}

    # -- the API

    def write_snapshot(self, epoch: int, metrics: Mapping[str, Any], batches: Iterable[Batch]) -> dict[str, Any]:
        """Stream the evaluation at ``epoch``: ``batches`` yields ``(users int [B], items int [B, k])``.

        Users must come in increasing order, each exactly once, covering ``0 .. n_users-1``; items are
        the user's top-k unobserved items, best first. Recorded in ``progress.json`` only once
        complete; supersedes recorded snapshots at epochs ``>= epoch``. Returns the record.
        """
        if self._finished:
            raise StorageError(f"{self.uri}: trajectory already finished")
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        epoch = int(epoch)
        metrics = _clean_metrics(metrics)
        name = f"{SNAPSHOT_DIR}/epoch-{epoch:06d}-{uuid.uuid4().hex[:8]}.parquet"
        entry = self._write_part(name, f"{self.uri} snapshot epoch {epoch}", self.k, batches, truncate=False)
        record = {"epoch": epoch, "metrics": metrics, "part": name, "entry": entry}
        superseded = [e for e in self._evaluations if e["epoch"] >= epoch]
        self._evaluations = [e for e in self._evaluations if e["epoch"] < epoch] + [record]
        self._save_progress()
        for e in superseded:
            if e.get("part"):
                self._remove(storage.child(self.uri, e["part"]))
        return record

    def finish(self, observed_batches: Iterable[Batch], fractions: Sequence[float] = DEFAULT_FRACTIONS,
               metric: str = DEFAULT_METRIC, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Select the trajectory, write the observed rankings, commit the manifest, remove the rest.

        ``observed_batches`` yields ``(users [B], items [B, W])``: each user's train items in the
        final model's rank order, padded with -1 (any W: truncated or padded to ``observed_k``).
        Returns the manifest. If this raises, nothing is committed and it can be called again.
        """
        if self._finished:
            raise StorageError(f"{self.uri}: trajectory already finished")
        chosen = select_snapshots(self.history, fractions, metric)
        by_epoch = {e["epoch"]: e for e in self._evaluations}
        for epoch in chosen:
            if not by_epoch[epoch].get("part"):
                raise StorageError(f"{self.uri}: the snapshot of epoch {epoch} was removed when this trajectory "
                                   "was finished before; it cannot be selected again")
        name = f"{OBSERVED_DIR}/observed-{uuid.uuid4().hex[:8]}.parquet"
        observed_entry = self._write_part(name, f"{self.uri} observed rankings", self.observed_k,
                                          observed_batches, truncate=True)
        parts = {by_epoch[e]["part"]: by_epoch[e]["entry"] for e in chosen}
        parts[name] = observed_entry
        labels = [f"first >= {f:g} x best" for f in fractions] + ["best"]
        trajectory = [{"stage": s, "rule": labels[s], "epoch": e, "part": by_epoch[e]["part"],
                       "metrics": by_epoch[e]["metrics"]} for s, e in enumerate(chosen)]
        best = by_epoch[chosen[-1]]["metrics"][metric]
        manifest_extra = {
            "model": self.model, "n_users": self.n_users, "n_items": self.n_items, "k": self.k,
            "observed_k": self.observed_k, "pad": PAD, "epochs": chosen, "trajectory": trajectory,
            "selection": {"metric": metric, "fractions": [float(f) for f in fractions], "best": best,
                          "thresholds": [float(f) * best for f in fractions]},
            "history": [{"epoch": e, "metrics": m} for e, m in self.history],
            "observed": {"part": name, "width": self.observed_k},
            **dict(extra or {}),
        }
        manifest = storage.commit_manifest(self.uri, KIND, parts, self.config, manifest_extra)
        self._finished = True
        kept = set(chosen)
        dropped = [e["part"] for e in self._evaluations if e["epoch"] not in kept and e.get("part")]
        self._evaluations = [e if e["epoch"] in kept else {**e, "part": None, "entry": None}
                             for e in self._evaluations]
        self._save_progress(finished=True, observed=name)
        for part in dropped:
            self._remove(storage.child(self.uri, part))
        self._remove_unreferenced(keep=parts)
        return manifest


def _check_parts(uri: str, progress_uri: str, progress: Any) -> None:
    """Every part a progress record names stays inside ``uri`` (checked before anything is removed)."""
    evaluations = progress.get("evaluations") if isinstance(progress, dict) else None
    if not isinstance(evaluations, list) or not all(isinstance(e, dict) for e in evaluations):
        raise StorageError(f"{progress_uri}: no list of evaluations")
    for e in evaluations:
        if e.get("part") is not None:
            try:
                storage.child(uri, e["part"])
            except StorageError as error:
                raise StorageError(f"{progress_uri}: epoch {e.get('epoch')!r}: {error}") from None


def _load_json(uri: str) -> dict[str, Any]:
    fs, path = storage.filesystem(uri)
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise StorageError(f"{uri}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise StorageError(f"{uri}: not a JSON object")
    return data


# ----------------------------------------------------------------------------- reading

class _CountingFile:
    """A read-only file wrapper that counts the bytes a reader asks for."""

    def __init__(self, raw: Any, stats: dict[str, int] | None):
        self._raw, self._stats = raw, stats
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if self._stats is not None:
            self._stats["bytes_read"] = self._stats.get("bytes_read", 0) + len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._raw.seek(pos, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _count(stats: dict[str, int] | None, key: str, n: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def row_groups_for(index: Sequence[Sequence[int]], start: int, stop: int) -> list[int]:
    """Indices of the row groups (``[first_user, stop_user)`` ranges) that overlap users ``[start, stop)``."""
    return [j for j, (a, b) in enumerate(index) if a < stop and b > start]


def _read_rows(uri: str, name: str, entry: Mapping[str, Any], width: int, start: int, stop: int,
               take: int, stats: dict[str, int] | None) -> np.ndarray:
    """Rows ``[start, stop)`` of one part's ``items`` as int32 [stop-start, take], reading only their row groups."""
    index = entry["row_groups"]
    groups = row_groups_for(index, start, stop)
    _count(stats, "parts_read", 1)
    _count(stats, "row_groups_total", len(index))
    _count(stats, "row_groups_read", len(groups))
    where = storage.join(uri, name)
    with storage.parquet_file(uri, name, entry=dict(entry), wrap=lambda raw: _CountingFile(raw, stats)) as pf:
        meta = pf.metadata
        if meta.num_row_groups != len(index) or any(
                meta.row_group(j).num_rows != b - a for j, (a, b) in enumerate(index)):
            raise StorageError(f"{where}: row groups do not match the manifest's row-group index")
        try:
            table = pf.read_row_groups(groups, columns=["user", "items"])
        except OSError as e:
            raise StorageError(f"{where}: unreadable ({e})") from None
    first = index[groups[0]][0]
    users = table.column("user").to_numpy()
    if not np.array_equal(users, np.arange(first, first + len(users))):
        raise StorageError(f"{where}: user column does not match row order")
    items = table.column("items").combine_chunks().flatten().to_numpy().reshape(-1, width)
    return items[start - first:stop - first, :take]


class TrajectoryReader:
    """Reads complete trajectories of several teachers (their manifests are loaded once)."""

    def __init__(self, teacher_uris: Sequence[str]):
        if isinstance(teacher_uris, str):
            teacher_uris = [teacher_uris]
        if not teacher_uris:
            raise ValueError("no teacher URIs")
        self.uris = [str(u).rstrip("/") for u in teacher_uris]
        self.manifests = [storage.read_manifest(u) for u in self.uris]
        for uri, m in zip(self.uris, self.manifests):
            if m.get("kind") != KIND:
                raise StorageError(f"{uri}: not a teacher trajectory (kind {m.get('kind')!r})")
        self.n_users = self._same("n_users")
        self.n_snapshots = self._same("trajectory", len)
        self.observed_k = self._same("observed_k")
        self.models = [m["model"] for m in self.manifests]
        self.ks = [m["k"] for m in self.manifests]

    def _same(self, key: str, f: Any = lambda v: v) -> int:
        values = [f(m[key]) for m in self.manifests]
        if len(set(values)) != 1:
            detail = ", ".join(f"{u}: {v}" for u, v in zip(self.uris, values))
            raise StorageError(f"teachers disagree on {key}: {detail}")
        return values[0]

    @property
    def n_teachers(self) -> int:
        return len(self.uris)

    def stage_epochs(self) -> list[list[int]]:
        """Per teacher, the training epoch each trajectory stage's snapshot was taken at."""
        return [[int(point["epoch"]) for point in m["trajectory"]] for m in self.manifests]

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_users:
            raise ValueError(f"user range [{start}, {stop}) is not within [0, {self.n_users})")

    def trajectories(self, start: int, stop: int, *, k: int | None = None,
                     stats: dict[str, int] | None = None) -> torch.Tensor:
        """int32 [stop-start, teachers, snapshots, k]: each user's top-k per teacher and stage.

        ``k`` defaults to the teachers' common K; a smaller ``k`` reads the prefix. ``stats``, if a
        dict, is incremented with parts_read, row_groups_read, row_groups_total and bytes_read.
        """
        self._check_range(start, stop)
        k = self._list_length(k)
        out = np.empty((stop - start, self.n_teachers, self.n_snapshots, k), np.int32)
        if stop > start:
            for t, (uri, m) in enumerate(zip(self.uris, self.manifests)):
                loaded: dict[str, np.ndarray] = {}
                for s, point in enumerate(m["trajectory"]):
                    part = point["part"]
                    if part not in loaded:  # a repeated snapshot is read once
                        loaded[part] = _read_rows(uri, part, m["parts"][part], m["k"], start, stop, k, stats)
                    out[:, t, s, :] = loaded[part]
        return torch.from_numpy(out)

    def lists_at(self, start: int, stop: int, stage: torch.Tensor, *, k: int | None = None,
                 stats: dict[str, int] | None = None) -> torch.Tensor:
        """int32 [stop-start, teachers, k]: each (user, teacher)'s list at its own ``stage`` (int [U, T],
        clamped to the last; -1: not needed, left 0), reading only the snapshots some user needs, by row group."""
        self._check_range(start, stop)
        k = self._list_length(k)
        stage = stage.clamp(max=self.n_snapshots - 1)
        out = np.zeros((stop - start, self.n_teachers, k), np.int32)
        if stop > start:
            for t, (uri, m) in enumerate(zip(self.uris, self.manifests)):
                column = stage[:, t].numpy()
                for s in np.unique(column[column >= 0]):
                    part = m["trajectory"][int(s)]["part"]
                    rows = _read_rows(uri, part, m["parts"][part], m["k"], start, stop, k, stats)
                    out[column == s, t, :] = rows[column == s]
        return torch.from_numpy(out)

    def final(self, start: int, stop: int, *, k: int | None = None,
              stats: dict[str, int] | None = None) -> torch.Tensor:
        """int32 [stop-start, teachers, k]: the last stage only (the final snapshot), reading nothing else."""
        self._check_range(start, stop)
        k = self._list_length(k)
        out = np.empty((stop - start, self.n_teachers, k), np.int32)
        if stop > start:
            for t, (uri, m) in enumerate(zip(self.uris, self.manifests)):
                part = m["trajectory"][-1]["part"]
                out[:, t, :] = _read_rows(uri, part, m["parts"][part], m["k"], start, stop, k, stats)
        return torch.from_numpy(out)

    def _list_length(self, k: int | None) -> int:
        if k is None:
            if len(set(self.ks)) != 1:
                raise StorageError(f"teachers have different K {self.ks}: pass k <= {min(self.ks)}")
            k = self.ks[0]
        if not 1 <= k <= min(self.ks):
            raise ValueError(f"k={k} must be in [1, {min(self.ks)}]")
        return k

    def observed(self, start: int, stop: int, *, stats: dict[str, int] | None = None) -> torch.Tensor:
        """int32 [stop-start, teachers, observed_k]: each teacher's ranking of the user's train items, -1 padded."""
        self._check_range(start, stop)
        out = np.empty((stop - start, self.n_teachers, self.observed_k), np.int32)
        if stop > start:
            for t, (uri, m) in enumerate(zip(self.uris, self.manifests)):
                part = m["observed"]["part"]
                out[:, t, :] = _read_rows(uri, part, m["parts"][part], self.observed_k, start, stop,
                                          self.observed_k, stats)
        return torch.from_numpy(out)

    def verify(self) -> None:
        """Read every part whole and check its sha256 against the manifest (StorageError if not)."""
        for uri, m in zip(self.uris, self.manifests):
            for name in m["parts"]:
                storage.read_bytes(uri, name, m)


def read_trajectories(teacher_uris: Sequence[str], start: int, stop: int, *, k: int | None = None,
                      stats: dict[str, int] | None = None) -> torch.Tensor:
    """int32 [stop-start, T, S, K] for users ``[start, stop)``: see :meth:`TrajectoryReader.trajectories`."""
    return TrajectoryReader(teacher_uris).trajectories(start, stop, k=k, stats=stats)


def read_observed(teacher_uris: Sequence[str], start: int, stop: int, *,
                  stats: dict[str, int] | None = None) -> torch.Tensor:
    """int32 [stop-start, T, observed_k], -1 padded: see :meth:`TrajectoryReader.observed`."""
    return TrajectoryReader(teacher_uris).observed(start, stop, stats=stats)

