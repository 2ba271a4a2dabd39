"""NeuMF (He et al. 2017): a GMF tower and an MLP tower, fused, trained with BCE on sampled negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


@register("neumf")
class NeuMF(nn.Module):
    """logit(u, i) = h . [g_u * g_i ; MLP(m_u, m_i)] + b.

    Args:
        dim: GMF embedding size (the MLP tables have the same size).
        layers: MLP widths after the concatenated [m_u; m_i] input.
        n_neg: sampled negatives per positive.
        score_chunk: users per chunk when scoring all items (memory ~ chunk x n_items x layers[0];
            a few users keep it in cache, which is several times faster than tens on a CPU).
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, dim: int = 32,
                 layers: tuple[int, ...] = (32, 16, 8), n_neg: int = 4, init_std: float = 0.01,
                 score_chunk: int = 2, device: torch.device | None = None):
        super().__init__()
        self.n_neg, self.score_chunk = n_neg, score_chunk
        self.tables = Tables({"gmf_user": (n_users, dim), "gmf_item": (n_items, dim),
                              "mlp_user": (n_users, dim), "mlp_item": (n_items, dim)}, init_std, device)
        widths = [2 * dim, *layers]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(dim + widths[-1], 1)

    def batches(self, train, batch_size, rng):
        return sampling.triples(train, batch_size, rng, n_neg=self.n_neg)

    def _logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        e = self.tables(gmf_user=users, gmf_item=items, mlp_user=users, mlp_item=items)
        h = torch.cat([e["mlp_user"], e["mlp_item"]], -1)
        for layer in self.mlp:
            h = torch.relu(layer(h))
        return self.out(torch.cat([e["gmf_user"] * e["gmf_item"], h], -1)).squeeze(-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = batch["user"].repeat_interleave(1 + self.n_neg)
        i = torch.cat([batch["pos"].unsqueeze(1), batch["neg"]], 1).flatten()
        labels = torch.zeros(len(batch["user"]), 1 + self.n_neg, device=u.device)
        labels[:, 0] = 1
        return F.binary_cross_entropy_with_logits(self._logits(u, i), labels.flatten())

    def scorer(self):
        gi, mi = self.tables.weight("gmf_item"), self.tables.weight("mlp_item")
        dim = gi.shape[1]
        w_gmf, w_mlp = self.out.weight[0, :dim], self.out.weight[0, dim:]
        first = self.mlp[0]
        # The first layer splits into a user half and an item half; pair activations are laid out
        # width x items (items innermost), so each layer is one wide (out x in) @ (in x n_items) product.
        item_part = (first.weight[:, dim:] @ mi.T).contiguous()   # layers[0] x n_items
        gmf_items = (gi * w_gmf).T.contiguous()                   # d x n_items
        rest = [(layer.weight, layer.bias[:, None]) for layer in self.mlp[1:]]
        n_items, chunk = item_part.shape[1], max(1, self.score_chunk)

        def score(users: torch.Tensor) -> torch.Tensor:
            e = self.tables(gmf_user=users, mlp_user=users)
            out = torch.addmm(self.out.bias.expand(len(users), n_items), e["gmf_user"], gmf_items)
            user_part = e["mlp_user"] @ first.weight[:, :dim].T + first.bias
            # A few users at a time: their pair activations (chunk x width x n_items) stay in cache.
            for s in range(0, len(users), chunk):
                h = (user_part[s:s + chunk, :, None] + item_part).relu_()   # c x layers[0] x n_items
                for w, b in rest:
                    h = torch.matmul(w, h).add_(b).relu_()
                out[s:s + chunk] += torch.matmul(w_mlp, h)
            return out
        return score

    def after_step(self) -> None:
        pass
