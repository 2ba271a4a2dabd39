"""Tests for hetcomp_dist.evaluate and hetcomp_dist.reference (fast tier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetcomp_dist.data.dataset import Dataset, Interactions
from hetcomp_dist.evaluate import dot_scorer, evaluate, evaluate_split, evaluate_sums, topk_items
from hetcomp_dist.reference import EASE, ItemKNN, MostPopular

LOG2_3 = math.log2(3.0)


def inter(rows: list[list[int]], n_items: int) -> Interactions:
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows]).astype(np.int64)
    items = np.array([i for r in rows for i in r], dtype=np.int64)
    return Interactions.from_pairs(users, items, len(rows), n_items)


def from_dense(mask: np.ndarray) -> Interactions:
    u, i = np.nonzero(mask)
    return Interactions.from_pairs(u.astype(np.int64), i.astype(np.int64), mask.shape[0], mask.shape[1])


def table_scorer(scores: np.ndarray):
    table = torch.as_tensor(scores, dtype=torch.float32)

    def scorer(users: torch.Tensor) -> torch.Tensor:
        return table[users]  # advanced indexing: a fresh tensor

    return scorer


def assert_metrics_close(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key


# --------------------------------------------------------------------------- hand-computed cases


def test_recall_ndcg_hand_computed():
    # 2 users, 6 items. train: u0 {0}, u1 {1, 2}; test: u0 {2, 4}, u1 {0}.
    train = inter([[0], [1, 2]], 6)
    test = inter([[2, 4], [0]], 6)
    scores = np.array([
        [0.9, 0.1, 0.8, 0.7, 0.6, 0.2],  # item 0 excluded -> ranking 2, 3, 4, 5, 1
        [0.5, 0.9, 0.8, 0.1, 0.3, 0.4],  # items 1, 2 excluded -> ranking 0, 5, 4, 3
    ])
    m = evaluate(table_scorer(scores), train, test, ks=(1, 2, 3))
    # u0: hits at ranks 0 and 2 of [2, 3, 4]; |GT| = 2.
    #   recall@1 = 1/2, recall@2 = 1/2, recall@3 = 2/2
    #   ndcg@1 = 1/1; ndcg@2 = 1 / (1 + 1/log2 3) = 0.613147...; ndcg@3 = (1 + 1/log2 4) / (1 + 1/log2 3) = 0.919720...
    # u1: hit at rank 0 of [0, 5, 4]; |GT| = 1 -> recall = ndcg = 1 at every K.
    assert m["n_users"] == 2
    assert m["recall@1"] == pytest.approx(0.75)
    assert m["recall@2"] == pytest.approx(0.75)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx((1 / (1 + 1 / LOG2_3) + 1) / 2)  # 0.806573...
    assert m["ndcg@2"] == pytest.approx(0.8065735963827292)
    assert m["ndcg@3"] == pytest.approx((1.5 / (1 + 1 / LOG2_3) + 1) / 2)  # 0.959860...
    assert m["ndcg@3"] == pytest.approx(0.9598603945740938)
    # Popularity: counts [1, 1, 1, 0, 0, 0], phi = counts / 2 users; GAP_profile = 0.5 for both users.
    # @1: lists {2}, {0} -> GAP_rec 0.5 -> PL 0; @2: {2,3}, {0,5} -> 0.25 -> -50%; @3: 1/6 each -> -66.67%
    assert m["popularity_lift@1"] == pytest.approx(0.0)
    assert m["popularity_lift@2"] == pytest.approx(-50.0)
    assert m["popularity_lift@3"] == pytest.approx(-200.0 / 3)
    assert m["arp@1"] == pytest.approx(1.0)
    assert m["arp@2"] == pytest.approx(0.5)
    assert m["arp@3"] == pytest.approx(1 / 3)
    # coverage: @1 {2, 0}, @2 {2, 3, 0, 5}, @3 {2, 3, 4, 0, 5} out of 6 items
    assert m["coverage@1"] == pytest.approx(2 / 6)
    assert m["coverage@2"] == pytest.approx(4 / 6)
    assert m["coverage@3"] == pytest.approx(5 / 6)


def test_popularity_lift_arp_coverage_hand_computed():
    # 4 users, 5 items. train: u0 {0,1}, u1 {0}, u2 {0,2}, u3 {1}
    # counts = [3, 2, 1, 0, 0]; phi = counts / 4 = [.75, .5, .25, 0, 0]
    # GAP_profile: u0 .625, u1 .75, u2 .5, u3 .5 -> mean 2.375 / 4 = .59375
    train = inter([[0, 1], [0], [0, 2], [1]], 5)
    test = inter([[3], [1], [1], [0]], 5)
    scores = np.tile(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), (4, 1))
    m = evaluate(table_scorer(scores), train, test, ks=(1, 2))
    # top-2 lists after excluding train: u0 [2, 3], u1 [1, 2], u2 [1, 3], u3 [0, 2]
    # GAP_rec@2 per user: .125, .375, .25, .5 -> .3125; PL@2 = (.3125 - .59375) / .59375 = -9/19 = -47.368%
    # (an average of per-user lifts would give -10.8% instead: the docstring's ratio-of-averages choice)
    assert m["popularity_lift@2"] == pytest.approx(-900 / 19)
    # GAP_rec@1: .25, .5, .5, .75 -> .5; PL@1 = (.5 - .59375) / .59375 = -3/19 = -15.789%
    assert m["popularity_lift@1"] == pytest.approx(-300 / 19)
    # ARP@2: mean counts .5, 1.5, 1, 2 -> 1.25; ARP@1: 1, 2, 2, 3 -> 2
    assert m["arp@2"] == pytest.approx(1.25)
    assert m["arp@1"] == pytest.approx(2.0)
    # coverage@2: {0, 1, 2, 3} -> 4/5; coverage@1: {2, 1, 0} -> 3/5
    assert m["coverage@2"] == pytest.approx(0.8)
    assert m["coverage@1"] == pytest.approx(0.6)
    # hits: u0 at rank 1 (item 3), others at rank 0
    assert m["recall@1"] == pytest.approx(0.75)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx((1 / LOG2_3 + 3) / 4)  # 0.907732...


def test_split_excludes_train_and_other_holdout():
    # u0: train {0}, valid {1}, test {2}; u1: train {0}, valid {3}, test {} (not evaluated on test)
    train, valid, test = inter([[0], [0]], 5), inter([[1], [3]], 5), inter([[2], []], 5)
    ds = Dataset(meta={"n_users": 2, "n_items": 5}, train=train, valid=valid, test=test)
    scorer = table_scorer(np.tile(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), (2, 1)))
    # test: exclude train {0} and valid {1} -> u0's top-1 is 2, a hit
    m = evaluate_split(scorer, ds, "test", ks=(1,))
    assert m["n_users"] == 1 and m["recall@1"] == 1.0
    # without excluding valid, item 1 would take rank 0
    assert evaluate(scorer, train, test, ks=(1,))["recall@1"] == 0.0
    # valid, default users: only u0 has both a valid and a test item (Dataset.eval_users)
    assert evaluate_split(scorer, ds, "valid", ks=(1,))["n_users"] == 1
    # valid for both users: exclude train and test -> u0 top-1 = 1 (hit); u1 top-1 = 1 (miss; its valid item 3 is 3rd)
    m = evaluate_split(scorer, ds, "valid", ks=(1, 3), users=[0, 1])
    assert m["n_users"] == 2
    assert m["recall@1"] == pytest.approx(0.5)
    # u1 @3: ranking 1, 2, 3 -> hit at rank 2: ndcg = (1/log2 4) / 1 = 0.5; u0 ndcg@3 = 1
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx(0.75)
    # test ranking must never contain excluded items, even when they score highest
    assert m["coverage@1"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        evaluate_split(scorer, ds, "train")


def test_short_lists_never_hit_excluded_truth():
    # u0 has 3 of 4 items in train and a truth {0, 1, 2, 3} overlapping train: only item 3 is
    # rankable, so ranks 1 and 2 of the top-3 are empty (they hold -inf, i.e. excluded items,
    # all of which are in truth) and must not count as hits.
    train, truth = inter([[0, 1, 2]], 4), inter([[0, 1, 2, 3]], 4)
    m = evaluate(table_scorer(np.array([[4.0, 3.0, 2.0, 1.0]])), train, truth, ks=(3,))
    assert m["recall@3"] == pytest.approx(0.25)  # 1 hit / |GT| 4
    assert m["ndcg@3"] == pytest.approx(1 / (1 + 1 / LOG2_3 + 0.5))  # hit at rank 0, IDCG over 3 ranks
    assert m["coverage@3"] == pytest.approx(1 / 4)  # only item 3
    assert m["arp@3"] == pytest.approx(0.0)  # item 3 has no train users; empty ranks do not dilute
    assert topk_items(table_scorer(np.array([[4.0, 3.0, 2.0, 1.0]])), train, k=3).tolist() == [[3, -1, -1]]


# --------------------------------------------------------------------------- brute-force reference


def brute_force(scores, train, truth, exclude, ks, users):
    """Dense float64 reference: per user, sort the rankable items and count."""
    scores = np.asarray(scores, dtype=np.float64)
    n_users, n_items = train.shape
    counts = train.sum(0).astype(np.float64)
    phi = counts / n_users
    blocked = train | exclude
    out = {}
    gap_prof = [phi[train[u]].mean() for u in users if train[u].any()]
    gap_profile = float(np.mean(gap_prof))
    for k in ks:
        rec, ndcg, gap, arp, covered = [], [], [], [], set()
        for u in users:
            cand = np.flatnonzero(~blocked[u])
            ranked = cand[np.argsort(-scores[u, cand], kind="stable")][:k]
            gt = set(np.flatnonzero(truth[u]).tolist())
            hits = [r for r, i in enumerate(ranked) if i in gt]
            rec.append(len(hits) / len(gt) if gt else 0.0)
            dcg = sum(1 / math.log2(r + 2) for r in hits)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(gt), k)))
            ndcg.append(dcg / idcg if gt else 0.0)
            gap.append(phi[ranked].mean() if len(ranked) else 0.0)
            arp.append(counts[ranked].mean() if len(ranked) else 0.0)
            covered.update(ranked.tolist())
        out[f"recall@{k}"] = float(np.mean(rec))
        out[f"ndcg@{k}"] = float(np.mean(ndcg))
        out[f"popularity_lift@{k}"] = (float(np.mean(gap)) - gap_profile) / gap_profile * 100
        out[f"arp@{k}"] = float(np.mean(arp))
        out[f"coverage@{k}"] = len(covered) / n_items
    out["n_users"] = len(users)
    return out


def random_problem(seed: int, n_users: int = 37, n_items: int = 29):
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.0, 0.6, size=(n_users, 1))
    density[0] = 0.95  # fewer rankable items than the largest K
    density[1] = 0.0  # empty train profile
    train = rng.random((n_users, n_items)) < density
    rest = ~train
    held = rest & (rng.random((n_users, n_items)) < 0.25)
    which = rng.random((n_users, n_items)) < 0.5
    valid, test = held & which, held & ~which
    test[2] = False  # a user with no test items: not evaluated by default
    scores = rng.standard_normal((n_users, n_items))  # continuous: no ties
    return train, valid, test, scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_brute_force(seed):
    train, valid, test, scores = random_problem(seed)
    ks = (1, 5, 10, 20)
    got = evaluate(table_scorer(scores), from_dense(train), from_dense(test), [from_dense(valid)], ks=ks, batch_size=8)
    users = np.flatnonzero(test.any(1))
    want = brute_force(scores, train, test, valid, ks, users)
    assert got["n_users"] == len(users) < train.shape[0]
    assert_metrics_close(got, want, rtol=1e-6, atol=1e-9)


def test_matches_brute_force_explicit_users_and_float64_scorer():
    train, valid, test, scores = random_problem(7)
    users = np.array([5, 2, 0, 1, 5, 30])  # includes an empty-truth user (2) and a duplicate
    table = torch.as_tensor(scores, dtype=torch.float64)
    got = evaluate(lambda u: table[u], from_dense(train), from_dense(test), [from_dense(valid)], ks=(3, 10), users=users)
    want = brute_force(scores, train, test, valid, (3, 10), users)
    assert_metrics_close(got, want, rtol=1e-6, atol=1e-9)


def test_batch_size_invariance_and_shards():
    train, valid, test, scores = random_problem(11, n_users=53)
    args = (table_scorer(scores), from_dense(train), from_dense(test), [from_dense(valid)])
    full = evaluate(*args, ks=(2, 10), batch_size=10_000)
    for bs in (1, 7):
        assert_metrics_close(evaluate(*args, ks=(2, 10), batch_size=bs), full, rtol=1e-12)
    users = np.flatnonzero(test.any(1))
    a = evaluate_sums(*args, ks=(2, 10), users=users[::2])
    b = evaluate_sums(*args, ks=(2, 10), users=users[1::2], batch_size=3)
    assert_metrics_close(a.merge(b).metrics(), full, rtol=1e-12)


def test_scorer_views_are_not_mutated():
    train, _, test, scores = random_problem(3)
    table = torch.as_tensor(scores, dtype=torch.float32)
    before = table.clone()
    tr, te = from_dense(train), from_dense(test)
    users = np.arange(train.shape[0])
    view_metrics = evaluate(lambda u: table[int(u[0]):int(u[-1]) + 1], tr, te, ks=(5,), batch_size=4, users=users)
    assert torch.equal(table, before)
    assert_metrics_close(view_metrics, evaluate(table_scorer(scores), tr, te, ks=(5,), users=users))
    row = torch.arange(train.shape[1], dtype=torch.float32)
    evaluate(lambda u: row.expand(len(u), -1), tr, te, ks=(5,))  # expanded view: copied, not written
    assert torch.equal(row, torch.arange(train.shape[1], dtype=torch.float32))


def test_dot_scorer_reuses_buffer_and_matches_plain_matmul():
    train, valid, test, _ = random_problem(9, n_users=23)
    gen = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(23, 8, generator=gen), torch.randn(29, 8, generator=gen)
    scorer = dot_scorer(ue, ie)
    args = (from_dense(train), from_dense(test), [from_dense(valid)])
    got = evaluate(scorer, *args, ks=(3, 10), batch_size=5)  # 23 users: 4 full batches and one of 3
    want = evaluate(lambda u: ue[u] @ ie.T, *args, ks=(3, 10), batch_size=5)
    assert_metrics_close(got, want)
    a = scorer(torch.tensor([0, 1, 2, 3, 4]))  # outside inference mode, after evaluate used the buffer
    torch.testing.assert_close(a, ue[:5] @ ie.T)
    b = scorer(torch.tensor([5, 6, 7, 8, 9]))
    assert a.data_ptr() == b.data_ptr()  # same buffer
    torch.testing.assert_close(scorer(torch.arange(12)), ue[:12] @ ie.T)  # larger: grows
    torch.testing.assert_close(scorer(torch.tensor([3])), ue[3:4] @ ie.T)  # smaller: fresh


def test_bad_scorer_outputs_raise():
    train, _, test, scores = random_problem(0)
    tr, te = from_dense(train), from_dense(test)
    bad = scores.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(table_scorer(bad), tr, te, ks=(5,), users=[3])
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda u: torch.zeros(len(u), 3), tr, te)
    with pytest.raises(ValueError):
        evaluate(table_scorer(scores), tr, te, ks=(0,))
    with pytest.raises(ValueError):
        evaluate(table_scorer(scores), tr, te, users=[10_000])


def test_topk_items_excludes_train_and_pads():
    train, _, _, scores = random_problem(5)
    top = topk_items(table_scorer(scores), from_dense(train), users=[0, 3, 4], k=6, batch_size=2)
    assert top.dtype == np.int32 and top.shape == (3, 6)
    for row, u in zip(top, [0, 3, 4]):
        cand = np.flatnonzero(~train[u])
        want = cand[np.argsort(-scores[u, cand])][:6]
        assert row[: len(want)].tolist() == want.tolist()
        assert (row[len(want):] == -1).all()
    assert (top[0] == -1).any()  # user 0 has fewer than 6 unobserved items


# --------------------------------------------------------------------------- reference recommenders


def test_most_popular_ranks_by_count():
    rng = np.random.default_rng(0)
    n_items = 12
    # distinct counts: item i is held by the first (i + 1) of 12 users, plus a random profile for u12
    train = np.zeros((13, n_items), dtype=bool)
    for i in range(n_items):
        train[: i + 1, i] = True
    train[12] = rng.random(n_items) < 0.3
    tr = from_dense(train)
    model = MostPopular().fit(tr)
    scores = model(torch.tensor([12, 0]))
    assert torch.equal(scores[0], torch.as_tensor(train.sum(0), dtype=torch.float32))
    top = topk_items(model, tr, users=[12], k=3)[0]
    unseen = np.flatnonzero(~train[12])
    want = unseen[np.argsort(-train.sum(0)[unseen], kind="stable")][:3]
    assert top.tolist() == want.tolist()


def dense_cosine(x: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    x = x.astype(np.float64)
    co = x.T @ x
    norms = np.sqrt(x.sum(0))
    denom = np.outer(norms, norms) + shrink
    sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)
    np.fill_diagonal(sim, 0.0)
    return sim


@pytest.mark.parametrize("shrink", [0.0, 2.0])
def test_itemknn_full_neighbourhood_equals_dense_cosine(shrink):
    rng = np.random.default_rng(1)
    x = rng.random((25, 17)) < 0.3
    x[:, 5] = False  # an item nobody has
    model = ItemKNN(k=100, shrink=shrink, block_size=4).fit(from_dense(x))
    want = x.astype(np.float64) @ dense_cosine(x, shrink)
    got = model(torch.arange(25)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_itemknn_keeps_top_k_per_target_item():
    rng = np.random.default_rng(2)
    x = rng.random((40, 23)) < 0.25
    k = 4
    model = ItemKNN(k=k, block_size=5).fit(from_dense(x))
    sim = dense_cosine(x)
    kept = model.sim.toarray()  # [source, target]
    for j in range(x.shape[1]):
        col = kept[:, j]
        nz = np.flatnonzero(col)
        assert len(nz) <= k and j not in nz
        np.testing.assert_allclose(col[nz], sim[nz, j], rtol=1e-5)
        if len(nz):
            dropped = np.setdiff1d(np.arange(x.shape[1]), nz)
            assert sim[dropped, j].max() <= col[nz].min() + 1e-6  # nothing better was dropped
        assert len(nz) == min(k, int((sim[:, j] > 0).sum()))
    np.testing.assert_allclose(model(torch.arange(40)).numpy(), x.astype(np.float64) @ kept, rtol=1e-5, atol=1e-6)


def test_ease_matches_closed_form_and_guards_size():
    rng = np.random.default_rng(3)
    x = rng.random((30, 12)) < 0.3
    lam = 5.0
    model = EASE(lam=lam).fit(from_dense(x))
    g = x.T.astype(np.float64) @ x + lam * np.eye(12)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model(torch.arange(30)).numpy(), x @ b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="max_items"):
        EASE(max_items=10).fit(from_dense(x))


def test_padded_rows_match_items_of():
    split = inter([[3, 1], [], [0, 2, 4]], n_items=5)
    users = np.array([2, 0, 1])
    out = split.padded(users)
    assert out.shape == (3, 3)
    for row, u in zip(out, users):
        own = row[row >= 0]
        assert sorted(own.tolist()) == sorted(split.items_of(u).tolist())
        assert (row[len(own):] == -1).all()
    assert split.padded(users, width=4).shape == (3, 4)
    with pytest.raises(ValueError, match="width=2"):
        split.padded(users, width=2)


def _slice(whole: Interactions, lo: int, hi: int) -> Interactions:
    """Users [lo, hi) of ``whole``, as load_dataset(users=(lo, hi)) holds them."""
    a, z = int(whole.indptr[lo]), int(whole.indptr[hi])
    return Interactions(indptr=whole.indptr[lo:hi + 1] - a, indices=whole.indices[a:z], n_items=whole.n_items,
                        first_user=lo, total_users=whole.n_users, first_nnz=a, split_nnz=whole.nnz,
                        item_totals=whole.item_counts())


def test_slices_allocate_only_their_users_and_add_up_to_the_whole(monkeypatch):
    """evaluate_sums on a rank's slice: per-user arrays over the held users only (no whole-id-space counts()),
    the same sums as the whole data's for those users, and an error for a user the slice does not hold."""
    train, valid, test, scores = random_problem(5, n_users=41)
    whole = [from_dense(m) for m in (train, test, valid)]
    full = evaluate_sums(table_scorer(scores), whole[0], whole[1], [whole[2]], ks=(3, 10))
    monkeypatch.setattr(Interactions, "counts", lambda self: pytest.fail("an array over every user was built"))
    bounds = (0, 13, 30, 41)
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        tr, te, va = (_slice(w, lo, hi) for w in whole)
        parts.append(evaluate_sums(table_scorer(scores), tr, te, [va], ks=(3, 10), batch_size=4))
        users = np.flatnonzero(test[lo:hi].any(1)) + lo
        alone = evaluate_sums(table_scorer(scores), whole[0], whole[1], [whole[2]], ks=(3, 10), users=users,
                              batch_size=4)
        assert parts[-1].n_users == len(users) and parts[-1].gap_profile == alone.gap_profile
        assert np.array_equal(parts[-1].recall, alone.recall) and np.array_equal(parts[-1].ndcg, alone.ndcg)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_metrics_close(merged.metrics(), full.metrics(), rtol=1e-12)
    tr, te, va = (_slice(w, 13, 30) for w in whole)
    with pytest.raises(ValueError, match=r"user 12 is not .*\[13, 30\)"):
        evaluate_sums(table_scorer(scores), tr, te, [va], ks=(3,), users=np.array([15, 12]))
