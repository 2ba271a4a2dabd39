"""Dissensus strategies A/B and the debiasing baselines, against direct transcriptions of ALGORITHM.md §7."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetcomp_dist.distill import baselines, dissensus
from hetcomp_dist.distill.ensemble import ensemble_topk, rank_importance


def test_popularity_percentile():
    pop = dissensus.popularity_percentile(np.array([5, 0, 5, 9, 1]))
    assert pop.tolist() == pytest.approx([0.8, 0.2, 0.8, 1.0, 0.4])


def _lists():
    # 2 users, 3 teachers, K=4; item 0 is everyone's top (consensus), items 5..9 are single-teacher picks
    return torch.tensor([[[0, 1, 5, -1], [0, 1, 6, 7], [0, 2, 8, 9]],
                         [[3, 4, 0, 1], [4, 3, 1, -1], [9, 3, 4, 2]]])


def test_agreement_and_strategy_a_discount():
    lists = _lists()
    counts = dissensus.agreement_counts(lists, 10)
    assert counts[0].tolist() == [3, 2, 1, 0, 0, 1, 1, 1, 1, 1]
    assert counts[1].tolist() == [1, 2, 1, 3, 3, 0, 0, 0, 0, 1]
    pop = torch.linspace(1.0, 0.1, 10)                    # item 0 most popular
    lam = 0.8
    got = dissensus.target_discount(lists, counts, pop, lam)
    for u in range(2):
        for t in range(3):
            for k in range(4):
                i = int(lists[u, t, k])
                agree = sum(i in lists[u, s].tolist() for s in range(3)) / 3 if i >= 0 else 0
                want = max(0.0, 1 - lam * agree * float(pop[max(i, 0)]))
                assert got[u, t, k].item() == pytest.approx(want, abs=1e-6)
    # discounting consensus on the popular item 0 moves it down user 0's ensemble ranking
    imp = rank_importance(4)
    plain = ensemble_topk(lists, 10, 3, imp)
    debiased = ensemble_topk(lists, 10, 3, imp, dissensus.target_discount(lists, counts, pop, 1.0))
    assert plain[0, 0].item() == 0 and debiased[0, 0].item() != 0


def test_strategy_b_weights():
    lists = _lists()
    counts = dissensus.agreement_counts(lists, 10)
    pop = torch.linspace(1.0, 0.1, 10)
    targets = torch.tensor([[0, 5, 1, -1], [3, 9, 2, 4]])
    w = dissensus.transfer_weights(targets, counts, 3, pop, gamma=2.0)
    for u in range(2):
        raw = [1 + 2.0 * (1 - counts[u, i].item() / 3) * (1 - pop[i].item()) if i >= 0 else 0.0 for i in targets[u].tolist()]
        n = sum(i >= 0 for i in targets[u].tolist())
        want = [r * n / sum(raw) for r in raw]
        assert w[u].tolist() == pytest.approx(want, abs=1e-6)
    assert w[0, 1] > w[0, 0]                             # a niche single-teacher pick outweighs the consensus pick
    assert dissensus.transfer_weights(targets, counts, 3, pop, 0.0)[0].tolist() == [1, 1, 1, 0]


def test_ipw_weights_and_posthoc_penalty():
    counts = torch.tensor([100.0, 1.0, 10.0, 0.0])
    targets = torch.tensor([[0, 1, 2, -1]])
    w = baselines.ipw_weights(targets, counts, eta=1.0)
    raw = np.array([1 / 100, 1.0, 1 / 10])
    assert w[0, :3].tolist() == pytest.approx((raw * 3 / raw.sum()).tolist(), rel=1e-5)
    assert w[0, 3].item() == 0

    base = lambda users: torch.tensor([[3.0, 2.9, 1.0, 0.0]]).expand(len(users), -1)
    pop = torch.tensor([1.0, 0.0, 0.5, 0.2])
    s = baselines.penalised_scorer(base, pop, beta=0.5)(torch.tensor([0]))
    std = torch.tensor([3.0, 2.9, 1.0, 0.0]).std().item()
    assert s[0].tolist() == pytest.approx([3.0 - 0.5 * std, 2.9, 1.0 - 0.25 * std, -0.1 * std], rel=1e-6)
    assert s[0].argmax().item() == 1                     # the popular item lost its first place


def test_strategy_a_contested_and_popularity_rules():
    lists = _lists()
    counts = dissensus.agreement_counts(lists, 10)
    item_counts = torch.tensor([50.0, 20.0, 9.0, 30.0, 4.0, 0.0, 3.0, 2.0, 8.0, 60.0])
    eta = 0.7
    contested = dissensus.contested_discount(lists, counts, item_counts, eta)
    popular = dissensus.popularity_discount(lists, item_counts, eta)
    for u in range(2):
        for t in range(3):
            for k in range(4):
                i = int(lists[u, t, k])
                if i < 0:
                    assert contested[u, t, k].item() == 1 and popular[u, t, k].item() == 1
                    continue
                agree = sum(i in lists[u, s].tolist() for s in range(3)) / 3
                c = max(float(item_counts[i]), 1.0)
                assert contested[u, t, k].item() == pytest.approx(c ** (-eta * (1 - agree)), rel=1e-5)
                assert popular[u, t, k].item() == pytest.approx(c ** -eta, rel=1e-5)
    # consensus is left alone by "contested": item 0 (all three teachers) keeps its full importance
    assert contested[0, :, 0].tolist() == [1.0, 1.0, 1.0] and popular[0, 0, 0].item() < 0.1
    # user 1: item 9 is popular and pushed by one teacher only, so "contested" drops it from the top 4
    imp = rank_importance(4)
    assert 9 in ensemble_topk(lists, 10, 4, imp)[1].tolist()
    assert 9 not in ensemble_topk(lists, 10, 4, imp, contested)[1].tolist()
    pop = torch.linspace(1.0, 0.1, 10)
    for rule, want in (("consensus", dissensus.target_discount(lists, counts, pop, eta)), ("contested", contested),
                       ("popularity", popular)):
        assert torch.equal(dissensus.discount(rule, lists, counts, pop, item_counts, eta), want)
    with pytest.raises(ValueError, match="rule"):
        dissensus.discount("nope", lists, counts, pop, item_counts, eta)
