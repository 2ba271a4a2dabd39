"""RowwiseAdam (distill.optimizer: rowwise_adam): a step moves exactly the rows of the batch, by Adam's
update with each row's own step count, and leaves every other row, moment and count bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetcomp_dist.distill.optim import RowwiseAdam

LR, WD, B1, B2, EPS = 0.01, 0.1, 0.9, 0.999, 1e-8


def _table(rows: int = 20, dim: int = 3) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(rows, dim, generator=torch.Generator().manual_seed(0)))


def _backward(weight: torch.nn.Parameter, rows: list[int], coef: torch.Tensor) -> None:
    (F.embedding(torch.tensor(rows), weight, sparse=True) * coef).sum().backward()


def test_a_step_moves_only_the_batch_rows_by_the_hand_computed_update():
    weight = _table()
    before = weight.detach().clone()
    opt = RowwiseAdam(weight, LR, (B1, B2), EPS, WD)
    coef = torch.tensor([1.0, -2.0, 0.5])
    _backward(weight, [3, 7, 3], coef)                    # row 3 twice: its gradients add up
    opt.step()
    after = weight.detach()
    untouched = [r for r in range(20) if r not in (3, 7)]
    assert torch.equal(after[untouched], before[untouched])
    assert torch.equal(opt.exp_avg[untouched], torch.zeros(len(untouched), 3))
    assert opt.step_count.tolist() == [1 if r in (3, 7) else 0 for r in range(20)]
    for row, times in ((3, 2), (7, 1)):
        g = times * coef + WD * before[row]
        m, v = (1 - B1) * g, (1 - B2) * g * g
        expected = before[row] - LR / (1 - B1) * m / (v.sqrt() / (1 - B2) ** 0.5 + EPS)
        torch.testing.assert_close(after[row], expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.exp_avg[row], m, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(opt.exp_avg_sq[row], v, rtol=1e-6, atol=0.0)


def test_rows_follow_torch_adam_with_their_own_step_counts():
    """Rows 1 and 2 in every batch follow torch's Adam step for step; row 5, first seen at step 4, takes
    a first Adam step (bias-corrected for step 1), not a fourth."""
    weight = _table()
    start = weight.detach().clone()
    opt = RowwiseAdam(weight, LR, (B1, B2), EPS, WD)
    reference = torch.nn.Parameter(start[[1, 2]].clone())
    ref_opt = torch.optim.Adam([reference], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        coef = torch.randn(2, 3, generator=gen)
        opt.zero_grad()
        _backward(weight, [1, 2], coef)
        opt.step()
        ref_opt.zero_grad()
        (reference * coef).sum().backward()
        ref_opt.step()
    torch.testing.assert_close(weight.detach()[[1, 2]], reference.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(weight.detach()[5], start[5])

    first = torch.nn.Parameter(start[[5]].clone())
    first_opt = torch.optim.Adam([first], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, foreach=False)
    coef = torch.randn(1, 3, generator=gen)
    opt.zero_grad()
    _backward(weight, [5], coef)
    opt.step()
    (first * coef).sum().backward()
    first_opt.step()
    torch.testing.assert_close(weight.detach()[[5]], first.detach(), rtol=1e-5, atol=1e-7)
    assert opt.step_count[[1, 2, 5]].tolist() == [4, 4, 1]


def test_no_gradient_is_no_step_and_a_dense_gradient_is_refused():
    weight = _table()
    before = weight.detach().clone()
    opt = RowwiseAdam(weight, LR)
    opt.step()
    assert torch.equal(weight.detach(), before)
    (weight * 2).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()


def test_state_shards_by_rows_and_resumes_under_another_split():
    """The state has the rows first: two shards of it, stitched, resume a table the same as the whole."""
    weight = _table()
    opt = RowwiseAdam(weight, LR, weight_decay=WD)
    _backward(weight, [0, 4, 19], torch.ones(3, 3))
    opt.step()
    state = opt.state_dict()
    shards = [{k: v[:8].clone() for k, v in state.items()}, {k: v[8:].clone() for k, v in state.items()}]
    copy = torch.nn.Parameter(weight.detach().clone())
    resumed = RowwiseAdam(copy, LR, weight_decay=WD)
    resumed.load_state_dict({k: torch.cat([s[k] for s in shards]) for k in state})
    for o, w in ((opt, weight), (resumed, copy)):
        o.zero_grad()
        _backward(w, [4, 9], torch.full((2, 3), 0.3))
        o.step()
    assert torch.equal(copy.detach(), weight.detach())
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), opt.state_dict().values()))
    with pytest.raises(ValueError, match="rows"):
        resumed.load_state_dict(shards[0])
