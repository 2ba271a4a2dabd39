"""CML: collaborative metric learning (Hsieh et al. 2017), hinge loss with a margin, unit-ball embeddings."""

from __future__ import annotations

import torch
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.evaluate import dot_scorer
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


@register("cml")
class CML(nn.Module):
    """score(u, i) = -||e_u - e_i||^2; loss = sum over negatives of [margin + d(u, p) - d(u, n)]_+ .

    Args:
        dim: embedding size.
        margin: hinge margin on squared distances.
        n_neg: negatives per positive (the loss sums the violated ones).
    After each step every row is projected back into the unit ball (``after_step``).
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, dim: int = 64, margin: float = 0.5,
                 n_neg: int = 10, init_std: float = 0.1, device: torch.device | None = None):
        super().__init__()
        self.margin, self.n_neg = margin, n_neg
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std, device)

    def batches(self, train, batch_size, rng):
        return sampling.triples(train, batch_size, rng, n_neg=self.n_neg)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = len(batch["user"])
        e = self.tables(user=batch["user"], item=torch.cat([batch["pos"], batch["neg"].flatten()]))
        u, p, n = e["user"], e["item"][:b], e["item"][b:].view(b, self.n_neg, -1)
        d_pos = (u - p).pow(2).sum(-1, keepdim=True)
        d_neg = (u.unsqueeze(1) - n).pow(2).sum(-1)
        return torch.relu(self.margin + d_pos - d_neg).sum(1).mean()

    def scorer(self):
        users, items = self.tables.weight("user"), self.tables.weight("item")
        # -||u - i||^2 = 2 u.i - ||i||^2 - ||u||^2; the last term does not change a user's ranking,
        # and the rest is one dot product: [2u, 1] . [i, -||i||^2].
        return dot_scorer(torch.cat([2 * users, users.new_ones(len(users), 1)], 1),
                          torch.cat([items, -items.pow(2).sum(-1, keepdim=True)], 1))

    @torch.no_grad()
    def after_step(self) -> None:
        for name in ("user", "item"):
            w = self.tables.weight(name)
            w.div_(w.norm(dim=1, keepdim=True).clamp(min=1.0))
