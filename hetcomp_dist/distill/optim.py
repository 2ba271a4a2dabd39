"""A row-wise Adam for the student's user table (``distill.optimizer: rowwise_adam``).

Dense Adam steps every row of every table at every batch: even a row with a zero gradient has its
moments decayed and its weight decay applied, so a step costs O(users) whatever the batch. A batch
touches at most ``batch_size`` users, so :class:`RowwiseAdam` updates only those rows: the cost of a
step is O(rows in the batch), and a row not in the batch stays exactly as it was. The item table
keeps dense Adam: the exact softmax gives every item a gradient at every batch anyway.
"""

from __future__ import annotations

from typing import Any

import torch


class RowwiseAdam:
    """Adam on the rows of one table that the last backward pass looked up.

    The table's gradient must be sparse (``Student.sparse_user_grad``): its indices are the rows
    looked up, and a row looked up twice has its gradients summed (``coalesce``). For each such row
    r, as torch's Adam (``weight_decay`` is its coupled L2, added to the gradient):

        g = grad_r + weight_decay * w_r
        m_r = beta1 * m_r + (1 - beta1) * g;   v_r = beta2 * v_r + (1 - beta2) * g^2;   step_r += 1
        w_r -= lr / (1 - beta1^step_r) * m_r / (sqrt(v_r) / sqrt(1 - beta2^step_r) + eps)

    Step counts are per row: a row's moments have been updated step_r times, so 1 - beta^step_r is
    their own bias correction (a global step count would under-correct a row seen for the first time
    late in training). Every other row, its moments and its step count are left untouched: no decay,
    no weight decay. State: ``exp_avg`` and ``exp_avg_sq`` (rows x dim, the table's dtype and device)
    and ``step`` (int32 [rows]); all three have the table's rows first, so a checkpoint shards them
    with the rows.
    """

    def __init__(self, weight: torch.nn.Parameter, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.weight, self.lr, self.betas, self.eps, self.weight_decay = weight, lr, betas, eps, weight_decay
        self.exp_avg = torch.zeros_like(weight, memory_format=torch.contiguous_format).detach()
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step_count = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)

    def zero_grad(self) -> None:
        """Drop the gradient (a sparse one is rebuilt by every backward pass, never zeroed in place)."""
        self.weight.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Update the rows in the table's (sparse) gradient; no gradient: nothing to do."""
        grad = self.weight.grad
        if grad is None:
            return
        if not grad.is_sparse:
            raise TypeError("RowwiseAdam needs a sparse gradient: look the rows up with Student.user_rows "
                            "and sparse_user_grad set")
        grad = grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        if not len(rows):
            return
        beta1, beta2 = self.betas
        w = self.weight.index_select(0, rows)
        if self.weight_decay:
            g = g.add(w, alpha=self.weight_decay)
        m = self.exp_avg.index_select(0, rows).lerp_(g, 1 - beta1)
        v = self.exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = self.step_count.index_select(0, rows) + 1
        exponent = step.double()
        step_size = (self.lr / (1 - beta1 ** exponent)).to(w.dtype).unsqueeze(1)
        bias2_sqrt = (1 - beta2 ** exponent).sqrt().to(w.dtype).unsqueeze(1)
        w -= step_size * m / (v.sqrt() / bias2_sqrt + self.eps)
        self.weight.index_copy_(0, rows, w)
        self.exp_avg.index_copy_(0, rows, m)
        self.exp_avg_sq.index_copy_(0, rows, v)
        self.step_count.index_copy_(0, rows, step.to(self.step_count.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The per-row state (rows first): ``exp_avg``, ``exp_avg_sq``, ``step``."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Per-row state for this table's rows (e.g. assembled from a checkpoint's shards)."""
        rows = self.weight.shape[0]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if state[key].shape[0] != rows:
                raise ValueError(f"RowwiseAdam state {key!r} has {state[key].shape[0]} rows, the table {rows}")
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_count.copy_(state["step"])
