"""Ensemble target (ALGORITHM.md §4) against a direct float64 transcription."""

from __future__ import annotations

import math

import numpy as np
import torch

from hetcomp_dist.distill.ensemble import ensemble_scores, ensemble_topk, rank_importance


def _reference(lists: np.ndarray, n_items: int) -> np.ndarray:
    b, t, k = lists.shape
    out = np.zeros((b, n_items))
    for u in range(b):
        for teacher in range(t):
            for r in range(k):
                if lists[u, teacher, r] >= 0:
                    out[u, lists[u, teacher, r]] += math.exp(-r / 10)
    return out


def _random_lists(rng, b, t, k, n_items):
    lists = np.stack([[rng.choice(n_items, size=k, replace=False) for _ in range(t)] for _ in range(b)])
    lists[rng.random(lists.shape) < 0.05] = -1  # some padding
    return lists


def test_importance_values():
    imp = rank_importance(4)
    assert torch.allclose(imp, torch.tensor([1.0, math.exp(-0.1), math.exp(-0.2), math.exp(-0.3)]))


def test_scores_match_float64_reference():
    for seed in range(3):
        lists = _random_lists(np.random.default_rng(seed), 5, 3, 20, 40)
        got = ensemble_scores(torch.from_numpy(lists), 40, rank_importance(20)).double().numpy()
        np.testing.assert_allclose(got, _reference(lists, 40), rtol=1e-6, atol=1e-6)


def test_topk_is_the_reference_order():
    lists = _random_lists(np.random.default_rng(7), 6, 4, 30, 200)
    ref = _reference(lists, 200)
    top = ensemble_topk(torch.from_numpy(lists), 200, 10, rank_importance(30)).numpy()
    for u in range(6):
        expected = np.sort(ref[u])[::-1][:10]
        np.testing.assert_allclose(ref[u, top[u]], expected, rtol=1e-6)


def test_topk_pads_when_few_items_scored():
    lists = torch.tensor([[[3, 1, -1]]])
    top = ensemble_topk(lists, 10, 4, rank_importance(3))
    assert top.tolist() == [[3, 1, -1, -1]]


def test_topk_ranks_listed_items_by_score_then_item_id():
    """The sparse ranking gives the dense scores' order; equal scores go by ascending item id."""
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        n = [25, 300, 4000][trial % 3]
        lists = torch.randint(0, n, (40, 4, 20), generator=g)
        lists[torch.rand(lists.shape, generator=g) < 0.1] = -1
        weights = torch.rand(lists.shape, generator=g) if trial % 2 else None   # None: many exact ties
        imp = rank_importance(20)
        top = ensemble_topk(lists, n, 30, imp, weights)
        dense = ensemble_scores(lists, n, imp, weights)
        values, _ = torch.topk(dense, min(30, n), dim=1)
        for u in range(40):
            got = [(float(dense[u, i]), int(i)) for i in top[u] if i >= 0]
            assert got == sorted(got, key=lambda x: (-x[0], x[1]))                       # the tie rule
            assert [v for v, _ in got] == [float(v) for v in values[u] if v > 0]          # the same scores
            assert (top[u, len(got):] == -1).all()
