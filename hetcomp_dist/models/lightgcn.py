"""LightGCN (He et al. 2020): embeddings propagated over the normalised user-item graph, BPR loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


class _SymmetricSpMM(torch.autograd.Function):
    """y = A x for a symmetric sparse A; the backward is A g (no transpose of A needed)."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return torch.sparse.mm(adjacency, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adjacency, grad)


def normalized_adjacency(train: Interactions) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph, (users + items) square, sparse CSR float32."""
    u = train.users().astype(np.int64)
    i = train.indices.astype(np.int64) + train.n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    n = train.n_users + train.n_items
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    values = 1.0 / np.sqrt(deg[rows] * deg[cols])
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols[order]),
                                   torch.from_numpy(values[order].astype(np.float32)), (n, n))


@register("lightgcn")
class LightGCN(nn.Module):
    """Final embedding = mean of layers 0..L of E_{k+1} = A_hat E_k; score = <u, i>; BPR + L2 on layer 0.

    Args:
        dim: embedding size. layers: propagation depth (3). reg: L2 weight on the batch's layer-0 rows.
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, dim: int = 64, layers: int = 3,
                 reg: float = 1e-4, init_std: float = 0.1, device: torch.device | None = None):
        super().__init__()
        self.n_users, self.layers, self.reg = n_users, layers, reg
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std, device)
        self.adjacency = normalized_adjacency(train)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.tables.weight("user"), self.tables.weight("item")])
        total = x
        for _ in range(self.layers):
            x = _SymmetricSpMM.apply(self.adjacency, x)
            total = total + x
        final = total / (self.layers + 1)
        return final[:self.n_users], final[self.n_users:]

    def batches(self, train, batch_size, rng):
        return sampling.triples(train, batch_size, rng)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users, items = self.propagate()
        u, p, n = users[batch["user"]], items[batch["pos"]], items[batch["neg"][:, 0]]
        e0 = self.tables(user=batch["user"], item=torch.cat([batch["pos"], batch["neg"][:, 0]]))
        reg = (e0["user"].pow(2).sum() + e0["item"].pow(2).sum()) / len(u)
        return -F.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean() + self.reg * reg

    def scorer(self):
        users, items = self.propagate()
        return lambda batch: users[batch] @ items.T

    def after_step(self) -> None:
        pass
