"""BPR-MF: matrix factorisation trained with the Bayesian personalised ranking loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.evaluate import dot_scorer
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


@register("bpr_mf")
class BPRMF(nn.Module):
    """score(u, i) = <e_u, e_i>; loss = -log sigmoid(s_ui - s_uj) + reg * ||batch embeddings||^2.

    Args:
        dim: embedding size.
        reg: L2 on the embeddings used in the batch (per interaction).
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, dim: int = 64, reg: float = 1e-4,
                 init_std: float = 0.1, device: torch.device | None = None):
        super().__init__()
        self.reg = reg
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std, device)

    def batches(self, train, batch_size, rng):
        return sampling.triples(train, batch_size, rng)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items = torch.cat([batch["pos"], batch["neg"][:, 0]])
        e = self.tables(user=batch["user"], item=items)
        u, (p, n) = e["user"], e["item"].chunk(2)
        diff = (u * p).sum(-1) - (u * n).sum(-1)
        reg = (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(u)
        return -F.logsigmoid(diff).mean() + self.reg * reg

    def scorer(self):
        return dot_scorer(self.tables.weight("user"), self.tables.weight("item"))

    def after_step(self) -> None:
        pass
