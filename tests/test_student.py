"""The student's per-rank build: each rank's rows hold exactly what a one-process whole build holds,
whatever the number of ranks, and no rank builds the whole user table."""

from __future__ import annotations

import pytest
import torch

from hetcomp_dist.distill import student as student_module
from hetcomp_dist.distill.student import ITEM_KEY, USER_KEY, Student, build_student, user_range


def _whole(n_users: int, n_items: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)          # the one-process build of earlier versions
    return Student(n_users, n_items, dim, init_std=0.01).state_dict()


@pytest.mark.parametrize("n_users, n_items, dim", [(2, 3, 2), (5, 7, 3), (61, 80, 8), (40_001, 37, 6), (33_000, 5, 1)])
def test_every_rank_holds_the_one_process_rows(n_users, n_items, dim):
    whole = _whole(n_users, n_items, dim, seed=3)
    for world in (1, 2, 3):
        for rank in range(world):
            start, stop = user_range(n_users, rank, world)
            torch.manual_seed(3)
            part = build_student(n_users, n_items, dim, 0.01, start, stop)
            state = part.state_dict()
            assert part.first_user == start and state[USER_KEY].shape == (stop - start, dim)
            assert torch.equal(state[USER_KEY], whole[USER_KEY][start:stop])
            assert torch.equal(state[ITEM_KEY], whole[ITEM_KEY])


@pytest.mark.parametrize("n, dim, chunk", [(100, 6, 16), (101, 6, 16), (50, 1, 16), (17, 1, 16), (3, 5, 16),
                                           (1000, 7, 48), (7, 2, 16)])
def test_chunked_draws_replay_one_draw(n, dim, chunk):
    """_draw_rows in chunks gives the rows of one normal_ call and leaves the generator where it leaves it."""
    g = torch.Generator().manual_seed(11)
    one = torch.empty(n, dim).normal_(0.0, 0.5, generator=g)
    after = torch.rand(4, generator=g)
    for keep in ((0, n), (0, 0), (n // 3, n // 2 + 1), (n - 1, n)):
        g = torch.Generator().manual_seed(11)
        rows = student_module._draw_rows(n, dim, 0.5, keep, g, chunk=chunk)
        assert torch.equal(rows, one[keep[0]:keep[1]])
        assert torch.equal(torch.rand(4, generator=g), after)


def test_user_rows_is_the_table_lookup_with_an_optionally_sparse_gradient():
    torch.manual_seed(0)
    student = Student(10, 4, 3)
    rows = torch.tensor([2, 7, 2])
    dense = student.user_rows(rows)
    assert torch.equal(dense, student.tables(user=rows)["user"])
    dense.sum().backward()
    expected = student.tables.weight("user").grad.clone()
    student.zero_grad(set_to_none=True)
    student.sparse_user_grad = True
    student.user_rows(rows).sum().backward()
    grad = student.tables.weight("user").grad
    assert grad.is_sparse and torch.equal(grad.to_dense(), expected)


def test_split_item_rows_are_the_whole_builds_rows_and_score_only_when_assembled():
    """build_student's item rows [first, stop) hold the whole build's; a worker holding part of the item
    table refuses to score until the table is assembled (every_item; one process holds it whole)."""
    torch.manual_seed(5)
    whole = build_student(20, 30, 4, 0.1, 0, 20)
    torch.manual_seed(5)
    part = build_student(20, 30, 4, 0.1, 0, 20, items=(10, 25))
    assert torch.equal(part.state_dict()[ITEM_KEY], whole.state_dict()[ITEM_KEY][10:25])
    assert torch.equal(part.state_dict()[USER_KEY], whole.state_dict()[USER_KEY])
    with pytest.raises(RuntimeError, match="item rows \\[10, 25\\] of 30"):
        part.scores(torch.tensor([0, 1]))
    all_rows = build_student(20, 30, 4, 0.1, 0, 20, items=(0, 30))
    with all_rows.every_item():
        assert all_rows.scores(torch.tensor([0, 1])).shape == (2, 30)
