"""A prepared dataset in memory: train / valid / test as user-major CSR arrays (no dense matrices).

A dataset is loaded whole (:func:`load_dataset`), or as the slice of one contiguous range of users
(``load_dataset(uri, users=(start, stop))``): each distillation worker holds only its own users'
interactions. A slice keeps global user indices everywhere (``n_users`` is the whole id space, and
every method takes and returns global users), so code written for a whole dataset runs on a slice
unchanged as long as it asks only about the slice's users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Interactions:
    """Implicit feedback of one split as CSR over the held users ``[first_user, first_user + rows)``:
    global user u's items are ``indices[indptr[u - first_user]:indptr[u - first_user + 1]]``.

    indptr: int64 [held users + 1]; indices: int32 [held interactions], sorted within each user.
    A whole split holds every user (``first_user`` 0, the other fields None). A slice also knows
    the whole split: ``total_users`` (the id space), ``first_nnz`` (the position of its first
    interaction in the whole split's CSR order, so global interaction indices stay meaningful),
    ``split_nnz`` (the whole split's interactions) and ``item_totals`` (users per item over the whole split: popularity is a property
    of the whole data, not of a worker's users).
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_items: int
    first_user: int = 0
    total_users: int | None = None
    first_nnz: int = 0
    split_nnz: int | None = None
    item_totals: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        """The user id space: every user of the dataset (a slice holds only ``held_users``)."""
        return self.held_count if self.total_users is None else self.total_users

    @property
    def held_count(self) -> int:
        return len(self.indptr) - 1

    @property
    def held_users(self) -> tuple[int, int]:
        """The global users ``[start, stop)`` whose interactions this object holds."""
        return self.first_user, self.first_user + self.held_count

    @property
    def is_slice(self) -> bool:
        return self.held_users != (0, self.n_users)

    @property
    def nnz(self) -> int:
        """Interactions held (the whole split's count is ``total_nnz``)."""
        return int(self.indptr[-1])

    @property
    def total_nnz(self) -> int:
        return self.nnz if self.split_nnz is None else self.split_nnz

    def counts(self) -> np.ndarray:
        """Items per user, int64 [n_users] over the whole id space (0 for users a slice does not hold).

        On a slice this is an O(n_users) array: it exists for callers that index it by global user
        (evaluate.py); :meth:`held_counts` is the slice's own part.
        """
        if not self.is_slice:
            return np.diff(self.indptr)
        out = np.zeros(self.n_users, dtype=np.int64)
        out[self.first_user:self.first_user + self.held_count] = np.diff(self.indptr)
        return out

    def held_counts(self) -> np.ndarray:
        """Items per held user, int64 [held users] (entry 0 is user ``first_user``)."""
        return np.diff(self.indptr)

    def items_of(self, user: int) -> np.ndarray:
        row = self._local(np.asarray([user]))[0]
        return self.indices[self.indptr[row]:self.indptr[row + 1]]

    def users(self) -> np.ndarray:
        """The (global) user of each held interaction, int32 [nnz]."""
        first = self.first_user
        return np.repeat(np.arange(first, first + self.held_count, dtype=np.int32), self.held_counts())

    def item_counts(self) -> np.ndarray:
        """Users per item over the whole split, int64 [n_items]."""
        if self.item_totals is not None:
            return self.item_totals
        if self.is_slice:
            raise ValueError("this slice was loaded without the whole split's item counts")
        return np.bincount(self.indices, minlength=self.n_items)

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) coordinates of the given users' interactions; row indexes into ``users``."""
        row, _, items = self._coords(users)
        return row, items

    def _local(self, users: np.ndarray) -> np.ndarray:
        """Global users -> rows of indptr (int64); a user this object does not hold is an error, never
        silently empty (it would make metrics or exclusions quietly wrong)."""
        rows = np.asarray(users, dtype=np.int64) - self.first_user
        if rows.size and (rows.min() < 0 or rows.max() >= self.held_count):
            start, stop = self.held_users
            raise ValueError(f"user {int(rows.min() if rows.min() < 0 else rows.max()) + start} is not held "
                             f"(this object holds users [{start}, {stop}))")
        return rows

    def _coords(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position within the row, item) of the given users' interactions."""
        rows = self._local(users)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        row = np.repeat(np.arange(len(rows)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return row, offsets, self.indices[np.repeat(starts, lengths) + offsets]

    def padded(self, users: np.ndarray, width: int | None = None) -> np.ndarray:
        """int64 [len(users), width]: each user's items, left-aligned and -1 padded (width: the longest row)."""
        rows = self._local(users)
        counts = self.indptr[rows + 1] - self.indptr[rows]
        width = int(counts.max(initial=0)) if width is None else width
        if counts.max(initial=0) > width:
            raise ValueError(f"a user has {counts.max()} items, more than width={width}")
        out = np.full((len(rows), width), -1, dtype=np.int64)
        row, col, items = self._coords(users)
        out[row, col] = items
        return out

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> "Interactions":
        """Build from (user, item) pairs; pairs must be unique."""
        order = np.lexsort((items, users))
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
        return cls(indptr=indptr, indices=np.ascontiguousarray(items[order], dtype=np.int32), n_items=n_items)


@dataclass(frozen=True)
class Dataset:
    meta: dict[str, Any]
    train: Interactions
    valid: Interactions
    test: Interactions

    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def held_users(self) -> tuple[int, int]:
        """The users ``[start, stop)`` held (every user for a whole dataset)."""
        return self.train.held_users

    def split(self, name: str) -> Interactions:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def held_out_besides(self, split: str) -> Interactions:
        """What evaluation on ``split`` excludes besides train: the other held-out split (ALGORITHM.md §2)."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return self.test if split == "valid" else self.valid

    def eval_users(self) -> np.ndarray:
        """Evaluated users (int64, global): those with at least one valid AND one test item (of a
        slice: its own such users).

        The HetComp protocol's rule (ALGORITHM.md §2), used for valid and test alike so that model
        selection and the reported test numbers are over the same users.
        """
        held = (self.valid.held_counts() > 0) & (self.test.held_counts() > 0)
        return np.flatnonzero(held) + self.valid.first_user


def dataset_meta(uri: str) -> dict[str, Any]:
    """meta.json of a dataset written by ``hetcomp prepare`` (verified against its manifest)."""
    return storage.read_json(uri, "meta.json", storage.read_manifest(uri))


def load_dataset(uri: str, users: tuple[int, int] | None = None) -> Dataset:
    """Load a dataset written by ``hetcomp prepare``: whole (each part verified against its manifest's
    sha256), or only the users ``[start, stop)`` of ``users``.

    A slice reads, of each split, only the Parquet row groups whose ``user`` range (row-group
    statistics) meets ``[start, stop)``, one row group at a time, and keeps only its users' rows.
    Prepared splits are sorted by user, so that is a rank's own rows plus at most one row group at
    each end; a part without statistics or not sorted (older writers) is still read right, just
    more of it. Train's item counts over the whole split are streamed from its ``item`` column
    (O(n_items) memory). A partial read cannot check a part's sha256: it checks its size and, where
    the writer stored them, Parquet's page checksums.
    """
    manifest = storage.read_manifest(uri)
    meta = storage.read_json(uri, "meta.json", manifest)
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    if users is None:
        splits = {name: _from_table(storage.read_table(uri, f"{name}.parquet", manifest=manifest), n_users, n_items)
                  for name in SPLITS}
        return Dataset(meta=meta, **splits)
    start, stop = int(users[0]), int(users[1])
    if not 0 <= start <= stop <= n_users:
        raise ValueError(f"users [{start}, {stop}) are not within the dataset's [0, {n_users})")
    splits = {name: _read_slice(uri, f"{name}.parquet", manifest, (start, stop), n_users, n_items,
                                with_item_totals=name == "train") for name in SPLITS}
    return Dataset(meta=meta, **splits)


def _from_table(table: pa.Table, n_users: int, n_items: int) -> Interactions:
    users = table.column("user").to_numpy().astype(np.int64, copy=False)
    items = table.column("item").to_numpy()
    return Interactions.from_pairs(users, items, n_users, n_items)


def _read_slice(uri: str, name: str, manifest: dict[str, Any], users: tuple[int, int], n_users: int,
                n_items: int, with_item_totals: bool) -> Interactions:
    """One split's rows of users ``[start, stop)`` as a slice (see :func:`load_dataset`)."""
    start, stop = users
    where = storage.join(uri, name)
    kept_users, kept_items, before = [], [], 0
    totals = np.zeros(n_items, dtype=np.int64) if with_item_totals else None
    with storage.parquet_file(uri, name, manifest) as pf:
        meta = pf.metadata
        user_column = pf.schema_arrow.get_field_index("user")
        for group in range(meta.num_row_groups):
            low, high = _user_bounds(meta.row_group(group), user_column)
            if high < start or low >= stop:        # wholly outside the slice: statistics, no rows read
                before += meta.row_group(group).num_rows if high < start else 0
                if totals is not None:
                    totals += np.bincount(_read(pf, group, ["item"], where)[1], minlength=n_items)
                continue
            u, i = _read(pf, group, ["user", "item"], where)
            if totals is not None:
                totals += np.bincount(i, minlength=n_items)
            before += int((u < start).sum())
            mine = (u >= start) & (u < stop)
            kept_users.append(u[mine] - start)
            kept_items.append(i[mine])
        total = meta.num_rows
    u = np.concatenate(kept_users) if kept_users else np.zeros(0, dtype=np.int64)
    i = np.concatenate(kept_items) if kept_items else np.zeros(0, dtype=np.int32)
    if i.size and (i.min() < 0 or i.max() >= n_items):
        raise StorageError(f"{where}: item ids outside [0, {n_items})")
    local = Interactions.from_pairs(u, i, stop - start, n_items)
    return replace(local, first_user=start, total_users=n_users, first_nnz=before, split_nnz=total,
                   item_totals=totals)


def _user_bounds(group: Any, column: int) -> tuple[float, float]:
    """(min, max) of a row group's ``user`` column; (-inf, inf) without statistics (read it to know)."""
    stats = group.column(column).statistics if column >= 0 else None
    if stats is None or not stats.has_min_max:
        return -np.inf, np.inf
    return stats.min, stats.max


def _read(pf: Any, group: int, columns: list[str], where: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(user int64 or None, item int32) of one row group."""
    try:
        table = pf.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as e:          # a damaged page (checksum) or column chunk
        raise StorageError(f"{where}: unreadable row group {group} ({e})") from None
    users = table.column("user").to_numpy().astype(np.int64, copy=False) if "user" in columns else None
    return users, table.column("item").to_numpy().astype(np.int32, copy=False)
