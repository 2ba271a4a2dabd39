"""A prepared dataset in memory: train / valid / test as user-major CSR arrays (no dense matrices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hetcomp_dist import storage

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Interactions:
    """Implicit feedback of one split as CSR: user u's items are ``indices[indptr[u]:indptr[u+1]]``.

    indptr: int64 [n_users + 1]; indices: int32 [nnz], sorted within each user.
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_items: int

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def counts(self) -> np.ndarray:
        """Items per user, int64 [n_users]."""
        return np.diff(self.indptr)

    def items_of(self, user: int) -> np.ndarray:
        return self.indices[self.indptr[user]:self.indptr[user + 1]]

    def users(self) -> np.ndarray:
        """The user of each stored interaction, int32 [nnz]."""
        return np.repeat(np.arange(self.n_users, dtype=np.int32), self.counts())

    def item_counts(self) -> np.ndarray:
        """Users per item, int64 [n_items]."""
        return np.bincount(self.indices, minlength=self.n_items)

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) coordinates of the given users' interactions; row indexes into ``users``."""
        row, _, items = self._coords(users)
        return row, items

    def _coords(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position within the row, item) of the given users' interactions."""
        users = np.asarray(users, dtype=np.int64)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        row = np.repeat(np.arange(len(users)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return row, offsets, self.indices[np.repeat(starts, lengths) + offsets]

    def padded(self, users: np.ndarray, width: int | None = None) -> np.ndarray:
        """int64 [len(users), width]: each user's items, left-aligned and -1 padded (width: the longest row)."""
        users = np.asarray(users, dtype=np.int64)
        counts = self.indptr[users + 1] - self.indptr[users]
        width = int(counts.max(initial=0)) if width is None else width
        if counts.max(initial=0) > width:
            raise ValueError(f"a user has {counts.max()} items, more than width={width}")
        out = np.full((len(users), width), -1, dtype=np.int64)
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
        """Evaluated users (int64): those with at least one valid AND one test item.

        The HetComp protocol's rule (ALGORITHM.md §2), used for valid and test alike so that model
        selection and the reported test numbers are over the same users.
        """
        return np.flatnonzero((self.valid.counts() > 0) & (self.test.counts() > 0))


def load_dataset(uri: str) -> Dataset:
    """Load a dataset written by ``hetcomp prepare`` (verified against its manifest)."""
    manifest = storage.read_manifest(uri)
    meta = storage.read_json(uri, "meta.json", manifest)
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    splits = {}
    for name in SPLITS:
        table = storage.read_table(uri, f"{name}.parquet", manifest=manifest)
        splits[name] = _from_table(table, n_users, n_items)
    return Dataset(meta=meta, **splits)


def _from_table(table: pa.Table, n_users: int, n_items: int) -> Interactions:
    users = table.column("user").to_numpy().astype(np.int64, copy=False)
    items = table.column("item").to_numpy()
    return Interactions.from_pairs(users, items, n_users, n_items)
