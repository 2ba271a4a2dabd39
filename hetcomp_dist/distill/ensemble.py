"""Ensemble targets from teachers' top-K lists (ALGORITHM.md §4), one user batch at a time.

Rank importance is a function of rank that is zero past K, so the lists carry all of it:
score_u(i) = sum over teachers of imp(rank of i in that teacher's list for u). Targets rank only the
listed items; a dense B x n_items score buffer is built only for a full-item scorer (evaluation).
"""

from __future__ import annotations

from typing import Callable

import torch

PAD = -1


def rank_importance(k: int, temperature: float = 10.0) -> torch.Tensor:
    """imp(r) = exp(-r / temperature) for 0-based ranks r < k: float32 [k]."""
    return torch.exp(-torch.arange(k, dtype=torch.float32) / temperature)


def _entry_values(lists: torch.Tensor, importance: torch.Tensor,
                  weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid bool [B, T, K], each list entry's importance times its weight, 0 at padding)."""
    b, t, k = lists.shape
    value = importance[:k].expand(b, t, k) if weights is None else importance[:k] * weights
    valid = lists >= 0
    return valid, torch.where(valid, value, torch.zeros(()))


def ensemble_scores(lists: torch.Tensor, n_items: int, importance: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed rank importance per item.

    Args:
        lists: int [B, T, K] item ids per user and teacher, best first, -1 padded.
        importance: float [K] importance of each rank.
        weights: optional float [B, T, K] multiplying each entry (e.g. debiasing).
    Returns:
        float32 [B, n_items]; items in no list score 0.
    """
    b = lists.shape[0]
    valid, value = _entry_values(lists, importance, weights)
    scores = torch.zeros(b, n_items)
    scores.scatter_add_(1, torch.where(valid, lists, 0).long().reshape(b, -1), value.reshape(b, -1))
    return scores


def ensemble_topk(lists: torch.Tensor, n_items: int, top: int, importance: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ensemble's top ``top`` items per user: int64 [B, top], -1 where fewer items scored > 0.

    Only the items in a user's lists can score, so the ranking runs over those T x K entries, not the
    catalogue: per user, entries sorted by item, summed per item in list order (the same sums as
    :func:`ensemble_scores`), then ordered by score, equal scores by item id (a fixed rule, where a
    top-k over the dense scores would break ties as its kernel happens to).
    """
    b = lists.shape[0]
    valid, value = _entry_values(lists, importance, weights)
    items = torch.where(valid, lists.long(), n_items).reshape(b, -1)        # padding: item n_items, scores nothing
    value = value.reshape(b, -1)
    items, order = items.sort(dim=1, stable=True)
    value = value.gather(1, order)
    # one segment per (user, item): a run of equal items in a row; segments are numbered row by row
    starts = torch.ones_like(items, dtype=torch.bool)
    starts[:, 1:] = items[:, 1:] != items[:, :-1]
    segment = starts.reshape(-1).cumsum(0) - 1
    sums = torch.zeros(b * items.shape[1]).index_add_(0, segment, value.reshape(-1))
    rows, pos = starts.nonzero(as_tuple=True)
    col = (starts.cumsum(1) - 1)[rows, pos]
    width = max(int(col.max()) + 1 if len(col) else 0, top)
    scores = torch.full((b, width), float("-inf"))
    seg_items = torch.full((b, width), PAD, dtype=torch.long)
    scores[rows, col] = sums[:len(rows)]
    seg_items[rows, col] = items[rows, pos]
    scores = torch.where((seg_items < n_items) & (scores > 0), scores, float("-inf"))
    ranked, pos = scores.sort(dim=1, descending=True, stable=True)      # stable: equal scores stay in item order
    out = seg_items.gather(1, pos[:, :top])
    return torch.where(ranked[:, :top] > float("-inf"), out, PAD)


class ListScorer:
    """A full-item scorer (for :mod:`hetcomp_dist.evaluate`) from per-user lists held in memory.

    Args:
        lists: int [n_users, T, K] (e.g. every teacher's final snapshot).
    """

    def __init__(self, lists: torch.Tensor, n_items: int, temperature: float = 10.0,
                 teacher_weights: torch.Tensor | None = None):
        self.lists, self.n_items, self.teacher_weights = lists, n_items, teacher_weights
        self.importance = rank_importance(lists.shape[-1], temperature)

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        lists = self.lists[users]
        weights = None
        if self.teacher_weights is not None:
            weights = self.teacher_weights.view(1, -1, 1).expand(lists.shape[0], -1, lists.shape[-1])
        return ensemble_scores(lists, self.n_items, self.importance, weights)


def shifted_scorer(scorer: ListScorer, first: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scorer over global user ids for lists whose row 0 is user ``first``; items in no list
    score -inf, so the evaluator leaves their ranks empty instead of filling them arbitrarily."""
    def scores(users: torch.Tensor) -> torch.Tensor:
        s = scorer(users - first)                 # a fresh B x n_items tensor: modified in place
        return s.masked_fill_(s <= 0, float("-inf"))
    return scores
