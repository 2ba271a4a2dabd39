"""Item-based autoencoder (item AutoRec / CDAE style): an item's user vector in, its users out."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables
from hetcomp_dist.models.vae import bag_inputs, multinomial_nll, register_csr


def transpose(train: Interactions) -> Interactions:
    """Item-major CSR: row i lists the users of item i."""
    return Interactions.from_pairs(train.indices.astype(np.int64), train.users(), train.n_items, train.n_users)


@register("item_ae")
class ItemAE(nn.Module):
    """h_i = tanh(bag of item i's users (a user table) + b); score(u, i) = <w_u, h_i> + c_u, with
    w_u rows of a second user table. Trained as a denoising autoencoder with a multinomial
    likelihood over users, on batches of items.

    Args:
        hidden: code size. dropout: input dropout on the item's user vector.
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, hidden: int = 200,
                 dropout: float = 0.5, init_std: float = 0.01, device: torch.device | None = None):
        super().__init__()
        self.by_item, self.dropout = transpose(train), dropout    # by_item: the CPU sampler's; the buffers: the step's
        register_csr(self, "input", self.by_item)
        self.tables = Tables({"user_in": (n_users, hidden), "user_out": (n_users, hidden)}, init_std, device)
        self.in_bias = nn.Parameter(torch.zeros(hidden))
        self.out_bias = nn.Parameter(torch.zeros(n_users))

    def batches(self, train, batch_size, rng):
        # Batches of items: the "users" of the transposed data.
        for batch in sampling.user_batches(self.by_item, batch_size, rng):
            yield {"item": batch["user"]}

    def _codes(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths, weights, pairs = bag_inputs(self.input_indptr, self.input_indices, items, self.dropout,
                                                  self.training)
        return torch.tanh(self.tables.bags("user_in", ids, lengths, weights) + self.in_bias), pairs

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h, (row, user) = self._codes(batch["item"])
        return multinomial_nll(h, self.tables.weight("user_out"), self.out_bias, row, user) / len(h)

    def scorer(self):
        n_items = self.by_item.n_users
        codes = torch.cat([self._codes(torch.arange(s, min(s + 4096, n_items), device=self.out_bias.device))[0]
                           for s in range(0, n_items, 4096)])
        return lambda users: self.tables(user_out=users)["user_out"] @ codes.T

    def after_step(self) -> None:
        pass
