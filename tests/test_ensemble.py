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
