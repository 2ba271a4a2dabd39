"""Training batches shared by model families, drawn from CSR train data with numpy (vectorised)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from hetcomp_dist.data.dataset import Interactions


class PairIndex:
    """Sorted (user, item) keys of the train data, for vectorised membership tests."""

    def __init__(self, train: Interactions):
        self.n_items = train.n_items
        self.keys = train.users().astype(np.int64) * train.n_items + train.indices  # CSR order is sorted

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        query = users.astype(np.int64) * self.n_items + items
        pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return self.keys[pos] == query


def negatives(index: PairIndex, users: np.ndarray, rng: np.random.Generator, rounds: int = 3) -> np.ndarray:
    """Uniform unobserved items for ``users`` (redrawn a few rounds where a draw hits a positive)."""
    items = rng.integers(0, index.n_items, len(users))
    for _ in range(rounds):
        hit = index.contains(users, items)
        if not hit.any():
            break
        items[hit] = rng.integers(0, index.n_items, int(hit.sum()))
    return items


def triples(train: Interactions, batch_size: int, rng: np.random.Generator,
            n_neg: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of (user, positive, negatives) over all train interactions in random order.

    Yields {"user": B, "pos": B, "neg": B x n_neg} LongTensors.
    """
    users, items = train.users(), train.indices
    index = PairIndex(train)
    order = rng.permutation(train.nnz)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        u = users[idx].astype(np.int64)
        neg = negatives(index, np.repeat(u, n_neg), rng).reshape(len(u), n_neg)
        yield {"user": torch.from_numpy(u), "pos": torch.from_numpy(items[idx].astype(np.int64)),
               "neg": torch.from_numpy(neg.astype(np.int64))}


def user_batches(train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of users with at least one train item, shuffled: {"user": B}."""
    users = np.flatnonzero(train.counts() > 0)
    users = users[rng.permutation(len(users))]
    for start in range(0, len(users), batch_size):
        yield {"user": torch.from_numpy(users[start:start + batch_size].astype(np.int64))}
