"""The student: an MF model whose user table holds only this worker's users.

With W workers (ranks), rank r owns the contiguous users [start, stop) = :func:`user_range`; its
student holds those user rows and the item table: whole (``distill.item_updates: dense``, every item
has a gradient at every step), or only the rows :func:`item_range` gives it (``rows``: the sampled
denominator looks a few rows up per step, :meth:`Student.step_items` exchanges them). Its rows hold
the very values a one-process run draws for them (:func:`build_student`), so a run's result does not
depend on the number of workers, and no worker ever builds the whole user table.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from hetcomp_dist import distributed
from hetcomp_dist.models.tables import Tables

USER_KEY, ITEM_KEY = "tables.ebc.embedding_bags.user.weight", "tables.ebc.embedding_bags.item.weight"
CHUNK_ROWS = 1 << 14     # rows drawn at a time by build_student; a multiple of 16 (see _draw_rows)


class Student(torch.nn.Module):
    """MF student: s_ui = <e_u, e_i>, tables on TorchRec.

    Args:
        n_users: rows of the user table (a worker's own users: ``stop - start``).
        n_items: the catalogue's size.
        first_user: the global index of user row 0; ``scores`` takes global user indices.
        items: the item rows [first, stop) this worker holds, split across workers
            (``distill.item_updates: rows``); None: the whole item table, stepped densely.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, device: torch.device | None = None,
                 first_user: int = 0, init_std: float = 0.01, items: tuple[int, int] | None = None):
        super().__init__()
        self.first_user, self.n_items = first_user, n_items
        self.items_split = items is not None
        self.item_range = (0, n_items) if items is None else items
        rows = self.item_range[1] - self.item_range[0]
        self.tables = Tables({"user": (n_users, dim), "item": (rows, dim)}, init_std=init_std, device=device)

        # True (distill.optimizer rowwise_adam): user_rows' gradient is a sparse tensor of the looked-up
        # rows only, so a step costs O(batch), not O(table) (distill/optim.py)
        self.sparse_user_grad = False
        # a split item table: the whole one while it is assembled for scoring (every_item), else None
        self.whole_items: torch.Tensor | None = None
        self._step_rows: tuple[torch.Tensor, torch.Tensor] | None = None     # (ids, rows) of step_items

    def item_table(self) -> torch.Tensor:
        """The whole item table (n_items x dim), for scoring."""
        if self.whole_items is not None:
            return self.whole_items
        if self.item_range != (0, self.n_items):
            raise RuntimeError("this worker holds item rows %s of %d: score inside every_item()"
                               % (list(self.item_range), self.n_items))
        return self.tables.weight("item")

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Global user indices (B) -> B x n_items."""
        return self.tables(user=users - self.first_user)["user"] @ self.item_table().T

    @contextmanager
    def every_item(self) -> Iterator[None]:
        """While inside, ``scores`` sees the whole item table: a split one is all-gathered (a collective)
        for the evaluation's duration, then dropped again."""
        if self.items_split and distributed.is_distributed():
            self.whole_items = distributed.gather_cat(self.tables.weight("item").detach())
        try:
            yield
        finally:
            self.whole_items = None

    def step_items(self, needed: torch.Tensor) -> "ItemRows":
        """The item rows a training step's losses look up.

        Whole table: the table itself. Split (a collective: every rank calls it at every step, with its
        global ``needed`` ids, maybe none): the rows of the union over ranks of ``needed``, filled by
        their owners, as a fresh leaf whose gradient :meth:`owned_item_grad` hands back to the owners.
        """
        if not self.items_split:
            return ItemRows(self.tables.weight("item"))
        ids = distributed.union_over_ranks(needed.to(self.tables.weight("item").device))
        rows = distributed.owned_rows(self.tables.weight("item").detach(), self.item_range[0], ids)
        self._step_rows = (ids, rows.requires_grad_())
        return ItemRows(rows, ids)

    def owned_item_grad(self) -> None:
        """After a step's backward (a collective): its item rows' gradient summed over ranks, and this
        worker's own rows of it set as the item table's sparse gradient (for RowwiseAdam)."""
        ids, rows = self._step_rows
        grad = distributed.sum_rows(rows.grad if rows.grad is not None else torch.zeros_like(rows))
        first, stop = self.item_range
        mine = (ids >= first) & (ids < stop)
        weight = self.tables.weight("item")
        # ids are sorted and distinct: the gradient is coalesced as built
        weight.grad = torch.sparse_coo_tensor((ids[mine] - first)[None], grad[mine], weight.shape,
                                              check_invariants=False, is_coalesced=True)
        self._step_rows = None

    def user_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the user table (local row indices, B) -> B x dim, for a loss.

        The same lookup as ``tables(user=rows)`` (values and dense gradient alike), with a sparse
        gradient when ``sparse_user_grad`` is set.
        """
        weight = self.tables.weight("user")
        return F.embedding(rows.long().to(weight.device), weight, sparse=self.sparse_user_grad)


class ItemRows:
    """What a step's losses index (``weight``) and how global item ids map onto its rows (``index``)."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor | None = None):
        self.weight, self.ids = weight, ids         # ids: the global ids of weight's rows; None: all, in order

    def index(self, items: torch.Tensor) -> torch.Tensor:
        """Global item ids (any shape, -1 padding kept) -> rows of ``weight``."""
        if self.ids is None:
            return items
        return torch.where(items >= 0, torch.searchsorted(self.ids, items.clamp_min(0)), items)


def user_range(n_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous users [start, stop) of ``rank``: near-equal splits in rank order."""
    return n_users * rank // world_size, n_users * (rank + 1) // world_size


def item_range(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous item rows [first, stop) of ``rank`` in a split item table: the same near-equal split."""
    return user_range(n_items, rank, world_size)


def build_student(n_users: int, n_items: int, dim: int, init_std: float, start: int, stop: int,
                  generator: torch.Generator | None = None, items: tuple[int, int] | None = None) -> Student:
    """This rank's student: user rows [start, stop) and the item table (or its rows ``items``), holding exactly the values
    ``Student(n_users, n_items, dim)`` would hold in one process from the same generator (default:
    torch's, seeded by the caller), without ever holding the whole user table.

    ``Student(...)`` draws, in order: each table's ``nn.EmbeddingBag`` default init (N(0, 1), then
    overwritten), users then items, then ``init_fn``'s N(0, init_std^2), users then items. The same
    draws are replayed here in chunks (:func:`_draw_rows`), keeping only this rank's rows. Every rank
    replays the whole sequence (the item table comes after all users in it): O(n_users x dim) time,
    O(CHUNK_ROWS x dim) memory. tests/test_student.py checks the values against a whole build.
    """
    g = torch.default_generator if generator is None else generator
    _draw_rows(n_users, dim, 1.0, (0, 0), g)               # nn.EmbeddingBag's own init of the user table
    _draw_rows(n_items, dim, 1.0, (0, 0), g)               # ... and of the item table
    users = _draw_rows(n_users, dim, init_std, (start, stop), g)
    item_rows = _draw_rows(n_items, dim, init_std, (0, n_items) if items is None else items, g)
    student = Student(stop - start, n_items, dim, first_user=start, init_std=init_std, items=items)
    student.load_state_dict({USER_KEY: users, ITEM_KEY: item_rows})
    return student


def _draw_rows(n: int, dim: int, std: float, keep: tuple[int, int], generator: torch.Generator,
               chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Rows ``keep`` of what ``torch.empty(n, dim).normal_(0, std, generator=generator)`` holds, drawn in
    chunks of ``chunk`` rows, leaving the generator where that one call leaves it.

    Why the chunks give the same numbers: for a contiguous float32 tensor of >= 16 values, torch's CPU
    normal_ draws one uniform per value in order, turns them into normals in blocks of 16 (Box-Muller
    within a block), and, when the size is not a multiple of 16, redraws 16 fresh uniforms for the last
    16 values. Chunks of a multiple of 16 values (``chunk`` rows, a multiple of 16) start on block
    boundaries and use the same uniforms; the last chunk (merged with its predecessor when it would hold
    fewer than 16 values) ends the stream with the same redraw. A table of under 16 values is drawn
    whole (torch's serial path).
    """
    assert chunk % 16 == 0
    lo_keep, hi_keep = keep
    out = torch.empty(max(hi_keep - lo_keep, 0), dim)
    if n * dim < 16:
        whole = torch.empty(n, dim).normal_(0.0, std, generator=generator)
        return whole[lo_keep:hi_keep].clone()
    lo = 0
    while lo < n:
        hi = min(n, lo + chunk)
        if (n - hi) * dim < 16:
            hi = n
        part = torch.empty(hi - lo, dim).normal_(0.0, std, generator=generator)
        a, b = max(lo, lo_keep), min(hi, hi_keep)
        if a < b:
            out[a - lo_keep:b - lo_keep] = part[a - lo:b - lo]
        lo = hi
    return out


def rows(state: dict[str, torch.Tensor], start: int, stop: int,
         items: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A whole student's state with only the user rows [start, stop) (and the item rows ``items``)."""
    first, end = (0, state[ITEM_KEY].shape[0]) if items is None else items
    return {USER_KEY: state[USER_KEY][start:stop].clone(), ITEM_KEY: state[ITEM_KEY][first:end].clone()}


def gather_rows(state: dict[str, torch.Tensor], items_split: bool = False) -> dict[str, torch.Tensor] | None:
    """On rank 0, a student state_dict on the CPU with the whole user table (gathered from every rank) and the
    item table (gathered too when ``items_split``); None on every other rank (a collective)."""
    users = distributed.gather_cat_to_first(state[USER_KEY])
    items = (distributed.gather_cat_to_first(state[ITEM_KEY]) if items_split
             else state[ITEM_KEY].detach().cpu().clone())
    return None if users is None else {USER_KEY: users, ITEM_KEY: items}


def optimizer_rows(state: dict[str, Any], start: int, stop: int,
                   items: tuple[int, int] | None = None) -> dict[str, Any]:
    """A gathered two-table Adam state with only the user rows [start, stop) (and the item rows ``items``)."""
    out = {"param_groups": state["param_groups"], "state": dict(state["state"])}
    ranges = {0: (start, stop)} if items is None else {0: (start, stop), 1: items}
    for param, (a, b) in ranges.items():
        if param in out["state"]:
            out["state"][param] = {k: v[a:b].clone() if v.dim() == 2 else v for k, v in out["state"][param].items()}
    return out
