"""DKC and AKT pieces against direct float64 transcriptions of ALGORITHM.md §5-6 (loops, no tricks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetcomp_dist.distill import akt, dkc


# ----------------------------------------------------------------------------- references

def ref_discrepancy(student: list[int], pi: list[int], k: int = 50) -> float:
    """1 - NDCG@k, NDCG rounded to 4 decimals (the authors' get_NDCG_u)."""
    top = set(x for x in pi[:k] if x >= 0)
    gain = [(2 ** math.exp(-t / 10) - 1) / math.log2(t + 2) for t in range(k)]
    dcg = sum(gain[t] for t in range(k) if student[t] in top)
    return 1 - round(dcg / sum(gain), 4)


def ref_dkc_check(stage, last, top, lists, th, first):
    """The authors' DKC (main.py), transcribed with loops: stage int[U][T], last float[U][T],
    top [U][50], lists [U][T][S][K]. Returns new (stage, last)."""
    stage, last = [list(r) for r in stage], [list(r) for r in last]
    n_users, n_teachers, final = len(stage), len(stage[0]), len(lists[0][0]) - 1
    for t in range(n_teachers):
        for u in range(n_users):
            nxt = min(final, stage[u][t] + 1)
            if first:
                last[u][t] = ref_discrepancy(top[u], lists[u][t][nxt])
                continue
            if stage[u][t] == final:
                continue
            d = ref_discrepancy(top[u], lists[u][t][nxt])
            ratio = last[u][t] / d if d else (math.inf if last[u][t] else math.nan)
            if ratio > th or ratio < 1:
                stage[u][t] += 1
                last[u][t] = ref_discrepancy(top[u], lists[u][t][min(final, stage[u][t] + 1)])
    return stage, last


def ref_overall(s: np.ndarray, observed: set, p: list, t: list) -> float:
    n = len(s)
    tset = set(x for x in t if x >= 0)
    rest = sum(math.exp(s[j]) for j in range(n) if j not in observed and j not in tset)
    loss = 0.0
    for i in [x for x in p if x >= 0] + [x for x in t if x >= 0]:
        loss -= math.log(math.exp(s[i]) / max(math.exp(s[i]) + rest, 1e-5))
    return loss


def ref_pl(s: np.ndarray, perm: list, rest_items: list) -> float:
    perm = [x for x in perm if x >= 0]
    rest = sum(math.exp(s[r]) for r in rest_items)
    loss = 0.0
    for k in range(len(perm)):
        den = sum(math.exp(s[j]) for j in perm[k:]) + rest
        loss -= math.log(math.exp(s[perm[k]]) / max(den, 1e-5))
    return loss


def ref_ranking(s: np.ndarray, observed: set, p: list, t: list) -> float:
    n = len(s)
    t50 = set(x for x in t[:50] if x >= 0)
    t10 = set(x for x in t[:10] if x >= 0)
    n_minus_50 = [j for j in range(n) if j not in observed and j not in t50]
    n_minus_10 = [j for j in range(n) if j not in observed and j not in t10]
    return ref_pl(s, p, n_minus_50) + 0.5 * (ref_pl(s, t[:50], n_minus_50) + ref_pl(s, t[:10], n_minus_10))


# ----------------------------------------------------------------------------- data

def _case(seed: int, b: int = 4, n: int = 120, lp: int = 10, lt: int = 60):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-3, 3, (b, n))
    observed = np.zeros((b, n), dtype=bool)
    p = np.full((b, lp), -1)
    t = np.full((b, lt), -1)
    for u in range(b):
        perm = rng.permutation(n)
        n_obs = int(rng.integers(3, 15))
        obs = perm[:n_obs]
        observed[u, obs] = True
        p[u, :min(lp, n_obs)] = obs[:lp]
        n_t = int(rng.integers(20, lt + 1))
        t[u, :n_t] = perm[n_obs:n_obs + n_t]
    return scores, observed, p, t


# ----------------------------------------------------------------------------- tests

def test_discrepancy_matches_reference_and_bounds():
    rng = np.random.default_rng(0)
    student = np.stack([rng.permutation(200)[:50] for _ in range(3)])
    targets = np.stack([[rng.permutation(200)[:50] for _ in range(2)] for _ in range(3)])
    targets[0, 0] = student[0]  # identical -> 0
    got = dkc.discrepancy(torch.from_numpy(student), torch.from_numpy(targets)).numpy()
    for u in range(3):
        for t in range(2):
            assert got[u, t] == pytest.approx(ref_discrepancy(student[u].tolist(), targets[u, t].tolist()), abs=1e-12)
    assert got[0, 0] == pytest.approx(0.0, abs=1e-6)
    disjoint = dkc.discrepancy(torch.arange(50)[None], torch.arange(50, 100)[None, None])
    assert disjoint.item() == pytest.approx(1.0)


def test_advance_rule():
    top = torch.arange(50)[None]
    # per teacher: stage 1 is the student's top (distance 0), stages 0, 2 and 3 are disjoint from it (1)
    lists = torch.stack([torch.arange(1000, 1050), torch.arange(50), torch.arange(2000, 2050),
                         torch.arange(3000, 3050)])[None, None].expand(1, 5, 4, 50)
    stage = torch.tensor([[0, 0, 0, 3, 0]])
    # ratios against the stage-1 lists of the student's own top: last / 0 = inf (move) unless last = 0 (0/0: stay)
    last = torch.tensor([[0.5, 0.0, 0.5, 0.5, 0.4]], dtype=torch.float64)
    new_stage, new_last = dkc.step(stage, last, top, lists, 1.05)
    assert new_stage.tolist() == [[1, 0, 1, 3, 1]]
    assert new_last[0, 1].item() == 0.0 and new_last[0, 3].item() == 0.5           # unmoved keep theirs
    assert new_last[0, 0].item() == 1.0                                           # moved: distance to stage 2
    assert dkc.threshold(25, dkc.DKCConfig()) == pytest.approx(1.05 * 0.995 ** 2)


@pytest.mark.parametrize("seed", range(6))
def test_step_matches_the_reference_rule(seed):
    """dkc.start/step against the transcription of the authors' DKC on random inputs: the student's
    top overlaps each stage list by a random amount, several checks in a row with a falling threshold."""
    rng = np.random.default_rng(seed)
    n_users, n_teachers, n_stages, k, n_items = 40, 3, 4, 60, 120
    lists = np.stack([[[rng.permutation(n_items)[:k] for _ in range(n_stages)] for _ in range(n_teachers)]
                      for _ in range(n_users)])
    stage = torch.zeros(n_users, n_teachers, dtype=torch.long)
    ref_stage, ref_last = stage.tolist(), [[1.0] * n_teachers for _ in range(n_users)]
    last = None
    for check in range(4):
        rows = [np.concatenate([lists[u, rng.integers(n_teachers), rng.integers(n_stages), :rng.integers(0, 50)],
                                rng.permutation(n_items)]) for u in range(n_users)]
        top = np.array([list(dict.fromkeys(row.tolist()))[:50] for row in rows])
        th = 1.05 * 0.995 ** (check + 1)
        ref_stage, ref_last = ref_dkc_check(ref_stage, ref_last, top.tolist(), lists.tolist(), th, first=check == 0)
        if check == 0:
            last = dkc.start(stage, torch.from_numpy(top), torch.from_numpy(lists))
        else:
            stage, last = dkc.step(stage, last, torch.from_numpy(top), torch.from_numpy(lists), th)
        assert stage.tolist() == ref_stage
        np.testing.assert_allclose(last.numpy(), np.array(ref_last), rtol=0, atol=1e-12)
    assert 0 < (stage == n_stages - 1).float().mean() < 1      # the checks moved some pairs, not all


def test_progress_schedule_moves_every_pair_at_a_stall():
    reference = dkc.DKCConfig()
    progress = dkc.DKCConfig(schedule="progress", stall=0.01)
    epoch_th = 1.05 * 0.995 ** 4
    # the reference counts epochs whatever the student does; progress follows it while valid rises by 1%+
    assert dkc.threshold(40, reference, gain=-0.5) == pytest.approx(epoch_th)
    assert dkc.threshold(40, progress, gain=0.02) == pytest.approx(epoch_th)
    assert dkc.threshold(40, progress, gain=None) == pytest.approx(epoch_th)
    assert dkc.threshold(40, progress, gain=0.005) == 0.0 and dkc.threshold(40, progress, gain=-0.1) == 0.0
    # at th = 0 every pair below its final stage moves, whatever its ratio; 0 / 0 (already there) does not
    top = torch.arange(50)[None]
    lists = torch.stack([torch.arange(1000, 1050), torch.arange(1000, 1050), torch.arange(50),
                         torch.arange(50)])[None, None].expand(1, 4, 4, 50)
    stage = torch.tensor([[0, 1, 1, 3]])
    last = torch.tensor([[0.99, 1.0, 0.0, 0.5]], dtype=torch.float64)   # ratios 0.99 / 1, 1 / 0 (inf), 0 / 0
    assert dkc.step(stage, last, top, lists, 1.0)[0].tolist() == [[1, 2, 1, 3]]
    assert dkc.step(stage, last, top, lists, 0.0)[0].tolist() == [[1, 2, 1, 3]]
    last[0, 0] = 1.0                                                     # ratio exactly 1: only th = 0 moves it
    assert dkc.step(stage, last, top, lists, 1.0)[0].tolist() == [[0, 2, 1, 3]]
    assert dkc.step(stage, last, top, lists, 0.0)[0].tolist() == [[1, 2, 1, 3]]


def test_switch_rule():
    assert dkc.switched([3.0, 2.996], 4) and not dkc.switched([3.0, 2.994], 4)
    assert not dkc.switched([3.0, 2.996], 4, "strict") and dkc.switched([3.0, 3.0], 4, "strict")


def test_stage_lists_gather():
    lists = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    stage = torch.tensor([[0, 3, 1], [2, 2, 0]])
    cur = dkc.current_lists(lists, stage)
    nxt = dkc.next_stage_lists(lists, stage)
    for u in range(2):
        for t in range(3):
            assert cur[u, t].tolist() == lists[u, t, stage[u, t]].tolist()
            assert nxt[u, t].tolist() == lists[u, t, min(stage[u, t] + 1, 3)].tolist()


def _losses(scores, observed, p, t, kind, weights=None, chunk=4096, dtype=torch.float64):
    """The AKT loss through the embedding-level API, with e_u = the user's score row and e_i = one-hot(i),
    so that s_ui = scores[u, i] exactly and d loss / d e_u = d loss / d scores."""
    u = torch.tensor(scores, dtype=dtype, requires_grad=True)
    w = torch.eye(scores.shape[1], dtype=dtype)
    p_t, t_t = torch.from_numpy(p), torch.from_numpy(t)
    exclude = torch.cat([_pad_rows(observed), t_t], 1)
    rest = akt.unobserved_exp_sum(u, w, exclude, 40.0, chunk=chunk)
    fn = akt.overall_loss if kind == "overall" else akt.ranking_loss
    return u, fn(akt.list_scores(u, w, p_t, 40.0), akt.list_scores(u, w, t_t, 40.0), p_t, t_t, rest, weights)


def _pad_rows(observed: np.ndarray) -> torch.Tensor:
    width = int(observed.sum(1).max())
    out = torch.full((len(observed), width), -1, dtype=torch.long)
    for u, row in enumerate(observed):
        items = np.flatnonzero(row)
        out[u, :len(items)] = torch.from_numpy(items)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overall_loss_and_gradient(seed):
    scores, observed, p, t = _case(seed)
    refs = [ref_overall(scores[u], set(np.flatnonzero(observed[u])), p[u].tolist(), t[u].tolist()) for u in range(len(scores))]
    ref_grad = _numeric_grad(lambda x: sum(ref_overall(x[u], set(np.flatnonzero(observed[u])), p[u].tolist(), t[u].tolist())
                                           for u in range(len(x))), scores)
    for dtype, chunk, tol in ((torch.float64, 4096, 1e-5), (torch.float64, 17, 1e-5), (torch.float32, 32, 1e-4)):
        u, got = _losses(scores, observed, p, t, "overall", chunk=chunk, dtype=dtype)
        np.testing.assert_allclose(got.detach().numpy(), refs, rtol=tol)
        got.sum().backward()
        np.testing.assert_allclose(u.grad.numpy(), ref_grad, atol=tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_loss_and_gradient(seed):
    scores, observed, p, t = _case(seed)
    u, got = _losses(scores, observed, p, t, "ranking", chunk=50)
    for b in range(len(scores)):
        assert got[b].item() == pytest.approx(ref_ranking(scores[b], set(np.flatnonzero(observed[b])), p[b].tolist(), t[b].tolist()), rel=1e-9)
    got.sum().backward()
    ref_grad = _numeric_grad(lambda x: sum(ref_ranking(x[b], set(np.flatnonzero(observed[b])), p[b].tolist(), t[b].tolist())
                                           for b in range(len(x))), scores)
    np.testing.assert_allclose(u.grad.numpy(), ref_grad, atol=1e-5)


def test_weights_scale_target_terms_only():
    scores, observed, p, t = _case(3, b=2)
    w = torch.ones(t.shape, dtype=torch.float64)
    _, plain = _losses(scores, observed, p, t, "overall")
    _, same = _losses(scores, observed, p, t, "overall", weights=w)
    _, doubled = _losses(scores, observed, p, t, "overall", weights=2 * w)
    _, no_targets = _losses(scores, observed, p, np.full_like(t, -1), "overall")
    np.testing.assert_allclose(same.detach().numpy(), plain.detach().numpy())
    # the P terms depend on T only through rest, which is the same here: doubling T's terms adds them once more
    _, p_only = _losses(scores, observed, p, t, "overall", weights=0 * w)
    np.testing.assert_allclose(doubled.detach().numpy(), 2 * plain.detach().numpy() - p_only.detach().numpy())
    assert (no_targets.detach() < plain.detach()).all()


def test_clamped_scores_pass_no_gradient_through_the_sum():
    u = torch.tensor([[50.0, 1.0, -60.0, 0.5]], dtype=torch.float64, requires_grad=True)
    rest = akt.unobserved_exp_sum(u, torch.eye(4, dtype=torch.float64), torch.tensor([[3, -1]]), 40.0, chunk=2)
    assert rest.item() == pytest.approx(math.exp(40) + math.exp(1) + math.exp(-40))
    rest.backward()
    assert u.grad.tolist() == [[0.0, math.exp(1), 0.0, 0.0]]


@pytest.mark.parametrize("cache", [True, False])  # the forward's e^s chunks kept for the backward, or recomputed
@pytest.mark.parametrize("clamp", [40.0, 0.5])  # 0.5: some scores are clamped (no gradient through them)
def test_exact_sum_gradients_for_user_and_item_embeddings(clamp, cache, monkeypatch):
    if not cache:
        monkeypatch.setattr(akt, "CACHE_BYTES", 0)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 3, dtype=torch.float64, generator=g, requires_grad=True)
    exclude = torch.tensor([[0, 5, -1], [10, -1, -1], [-1, -1, -1], [2, 3, 4]])
    scores = (u @ w.T).detach()
    assert (clamp == 40.0) or ((scores.abs() > clamp).any() and ((scores.abs() - clamp).abs() > 1e-3).all())
    keep = torch.ones(4, 11, dtype=torch.bool)
    keep[[0, 0, 1, 3, 3, 3], [0, 5, 10, 2, 3, 4]] = False
    direct = ((u @ w.T).clamp(-clamp, clamp).exp() * keep).sum(1)
    got = akt.unobserved_exp_sum(u, w, exclude, clamp, chunk=4)
    np.testing.assert_allclose(got.detach().numpy(), direct.detach().numpy(), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: akt.unobserved_exp_sum(a, b, exclude, clamp, chunk=4), (u, w))


def test_sampled_sum_estimates_the_exact_sum():
    scores, observed, p, t = _case(4, b=3, n=300)
    u = torch.tensor(scores)
    w = torch.eye(300, dtype=torch.float64)
    exclude = torch.cat([_pad_rows(observed), torch.from_numpy(t)], 1)
    exact = akt.unobserved_exp_sum(u, w, exclude, 40.0)
    estimate = akt.unobserved_exp_sum(u, w, exclude, 40.0, torch.randint(300, (200_000,), generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(estimate.numpy(), exact.numpy(), rtol=0.02)
    small = akt.unobserved_exp_sum(u, w, exclude, 40.0, torch.randint(300, (5,), generator=torch.Generator().manual_seed(1)))
    assert not np.allclose(small.numpy(), exact.numpy(), rtol=0.02)   # an estimate, not the sum


def test_sampled_sum_from_some_rows_equals_it_from_the_whole_table():
    """A split item table (distill/student.py) hands the sampled sum only the rows a step looked up, with
    where each sample sits among them and the catalogue's size: the same value as from the whole table."""
    scores, observed, p, t = _case(6, b=3, n=300)
    u = torch.tensor(scores)
    w = torch.randn(300, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.1
    exclude = torch.cat([_pad_rows(observed), torch.from_numpy(t)], 1)
    sample = torch.randint(300, (50,), generator=torch.Generator().manual_seed(3))
    ids = torch.unique(torch.cat([sample, torch.tensor([7, 299])]))           # more rows than the samples
    whole = akt.unobserved_exp_sum(u, w, exclude, 40.0, sample)
    part = akt.unobserved_exp_sum(u, w[ids], exclude, 40.0, sample, sample_rows=torch.searchsorted(ids, sample),
                                  n_items=300)
    torch.testing.assert_close(part, whole, rtol=1e-12, atol=0)


def test_observed_and_unobserved_never_compared():
    """Raising an observed item's score must not change the target items' terms."""
    scores, observed, p, t = _case(5, b=1)
    bumped = scores.copy()
    bumped[0, np.flatnonzero(observed[0])] += 5
    no_p = np.full((1, 10), -1)
    _, full = _losses(scores, observed, no_p, t, "ranking")
    _, full2 = _losses(bumped, observed, no_p, t, "ranking")
    assert full.item() == pytest.approx(full2.item())
    _, with_p = _losses(bumped, observed, p, t, "ranking")
    assert with_p.item() != pytest.approx(full2.item())


def _numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        grad[idx] = (f(hi) - f(lo)) / (2 * eps)
    return grad
