"""LightGCN (He et al. 2020): embeddings propagated over the normalised user-item graph, BPR loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.evaluate import dot_scorer
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


class Adjacency:
    """A symmetric sparse matrix in CSR arrays, multiplied through ``F.embedding_bag``.

    Row r of ``A @ x`` is the weighted sum of the rows ``x[col]`` of its non-zeros, which is what
    a sum-mode embedding bag with per-sample weights computes; on CPU that kernel is faster than
    ``torch.sparse.mm`` on the same CSR matrix (bench/bench_teachers.py). A is symmetric,
    so the backward of ``A @ x`` is ``A @ grad`` (no transpose, no scatter).

    The kernel runs on the device of the arrays (CPU or CUDA); :class:`LightGCN` keeps them as
    buffers, so they move with the model.

    Args:
        offsets: int64 [n] (CSR indptr without its last entry); cols: int64 [nnz]; values: float32 [nnz]:
            CSR of the n x n matrix.
    """

    def __init__(self, offsets: torch.Tensor, cols: torch.Tensor, values: torch.Tensor):
        self.offsets, self.cols, self.values = offsets, cols, values
        self.n = len(offsets)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """A @ x: n x d -> n x d (not differentiable; see :meth:`__matmul__`)."""
        return F.embedding_bag(self.cols, x, self.offsets, mode="sum", per_sample_weights=self.values)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return _SymmetricMM.apply(self, x)


class _SymmetricMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjacency: Adjacency, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency.mm(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adjacency.mm(grad.contiguous())


def normalized_adjacency(train: Interactions) -> Adjacency:
    """D^-1/2 A D^-1/2 of the bipartite graph, (users + items) square: users first, then items."""
    u = train.users().astype(np.int64)
    i = train.indices.astype(np.int64) + train.n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    n = train.n_users + train.n_items
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    values = 1.0 / np.sqrt(deg[rows] * deg[cols])
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return Adjacency(torch.from_numpy(indptr[:-1]).contiguous(), torch.from_numpy(cols[order]),
                     torch.from_numpy(values[order].astype(np.float32)))


@register("lightgcn")
class LightGCN(nn.Module):
    """Final embedding = mean of layers 0..L of E_{k+1} = A_hat E_k; score = <u, i>; BPR + L2 on layer 0.

    Each loss call propagates the whole graph once (forward and backward: 2L sparse products over
    all rows), whatever the batch size; that dominates a step, so an epoch costs about
    (interactions / batch_size) propagations and large batches (with a larger learning rate) are
    what make an epoch cheap. ``n_neg`` negatives per positive reuse the same propagation.

    Args:
        dim: embedding size. layers: propagation depth (3). reg: L2 weight on the batch's layer-0 rows
        (per positive). n_neg: sampled negatives per positive; the BPR term is averaged over them.
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, dim: int = 64, layers: int = 3,
                 reg: float = 1e-4, n_neg: int = 1, init_std: float = 0.1, device: torch.device | None = None):
        super().__init__()
        self.n_users, self.layers, self.reg, self.n_neg = n_users, layers, reg, n_neg
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std, device)
        adjacency = normalized_adjacency(train)
        # Buffers, so that .to(device) moves the graph with the tables; not persistent: checkpoints hold
        # weights only, and the graph is rebuilt from the train data.
        self.register_buffer("adj_offsets", adjacency.offsets, persistent=False)
        self.register_buffer("adj_cols", adjacency.cols, persistent=False)
        self.register_buffer("adj_values", adjacency.values, persistent=False)

    @property
    def adjacency(self) -> Adjacency:
        """The normalised graph, on the model's device."""
        return Adjacency(self.adj_offsets, self.adj_cols, self.adj_values)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final user (n_users x d) and item (n_items x d) embeddings."""
        x = torch.cat([self.tables.weight("user"), self.tables.weight("item")])
        total, adjacency = x, self.adjacency
        for _ in range(self.layers):
            x = adjacency @ x
            total = total + x
        final = total / (self.layers + 1)
        return final[:self.n_users], final[self.n_users:]

    def batches(self, train, batch_size, rng):
        return sampling.triples(train, batch_size, rng, n_neg=self.n_neg)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users, items = self.propagate()
        neg = batch["neg"]                                                   # B x n_neg
        u, p, n = users[batch["user"]], items[batch["pos"]], items[neg]      # B x d, B x d, B x n_neg x d
        pos_score = (u * p).sum(-1, keepdim=True)                            # B x 1
        neg_score = torch.bmm(n, u.unsqueeze(-1)).squeeze(-1)                # B x n_neg
        e0 = self.tables(user=batch["user"], item=torch.cat([batch["pos"], neg.flatten()]))
        reg = (e0["user"].pow(2).sum() + e0["item"].pow(2).sum()) / len(u)
        return -F.logsigmoid(pos_score - neg_score).mean() + self.reg * reg

    def scorer(self):
        return dot_scorer(*self.propagate())

    def after_step(self) -> None:
        pass
