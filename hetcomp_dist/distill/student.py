"""The student: an MF model whose user table holds only this worker's users.

With W workers (ranks), rank r owns the contiguous users [start, stop) = :func:`user_range`; its
student holds those user rows and the whole item table (replicated: every user is scored against
every item). Rows are drawn as one process would draw the whole table, so a run's result does not
depend on the number of workers.
"""

from __future__ import annotations

from typing import Any

import torch

from hetcomp_dist import distributed
from hetcomp_dist.models.tables import Tables

USER_KEY, ITEM_KEY = "tables.ebc.embedding_bags.user.weight", "tables.ebc.embedding_bags.item.weight"


class Student(torch.nn.Module):
    """MF student: s_ui = <e_u, e_i>, tables on TorchRec.

    Args:
        n_users: rows of the user table (a worker's own users: ``stop - start``).
        first_user: the global index of user row 0; ``scores`` takes global user indices.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, device: torch.device | None = None,
                 first_user: int = 0, init_std: float = 0.01):
        super().__init__()
        self.first_user = first_user
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std=init_std, device=device)

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Global user indices (B) -> B x n_items."""
        return self.tables(user=users - self.first_user)["user"] @ self.tables.weight("item").T


def user_range(n_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous users [start, stop) of ``rank``: near-equal splits in rank order."""
    return n_users * rank // world_size, n_users * (rank + 1) // world_size


def build_student(n_users: int, n_items: int, dim: int, init_std: float, start: int, stop: int) -> Student:
    """This rank's student, its rows initialised as in a one-process run (seed set by the caller)."""
    whole = Student(n_users, n_items, dim, init_std=init_std)
    student = Student(stop - start, n_items, dim, first_user=start, init_std=init_std)
    student.load_state_dict(rows(whole.state_dict(), start, stop))
    return student


def rows(state: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """A whole student's state with only the user rows [start, stop)."""
    return {USER_KEY: state[USER_KEY][start:stop].clone(), ITEM_KEY: state[ITEM_KEY].clone()}


def gather_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student state_dict with the whole user table (gathered over ranks) and the item table."""
    return {USER_KEY: distributed.gather_cat(state[USER_KEY]), ITEM_KEY: state[ITEM_KEY].detach().clone()}


def optimizer_rows(state: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """A gathered Adam state with only the user rows [start, stop)."""
    out = {"param_groups": state["param_groups"], "state": dict(state["state"])}
    if 0 in out["state"]:
        out["state"][0] = {k: v[start:stop].clone() if v.dim() == 2 else v for k, v in out["state"][0].items()}
    return out
