"""Embedding tables for every model family: one TorchRec EmbeddingBagCollection per model.

A bag holding one id is a plain row lookup, and that form shards with every TorchRec
sharding type, so models stay single-device code that DistributedModelParallel shards from
outside (:mod:`hetcomp_dist.sharding`, for teachers with ``workers > 1``). Bags with several ids
(a user's items, weighted) serve autoencoder inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType


class Tables(nn.Module):
    """Named tables ``{name: (rows, dim)}``; each table is looked up by the feature of the same name.

    Args:
        shapes: table name -> (number of rows, embedding dimension).
        init_std: rows start as N(0, init_std^2) (TorchRec's default init is uniform and large).
        device: where the tables are built (default: the CPU; ``torch.device("meta")`` builds without
            memory, for sharding). ``models.build`` builds on the CPU and moves the whole model.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], init_std: float = 0.1,
                 device: torch.device | None = None):
        super().__init__()
        self.names = list(shapes)
        self.dims = {n: d for n, (_, d) in shapes.items()}
        configs = [EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=[n],
                                      pooling=PoolingType.SUM, init_fn=_normal(init_std))
                   for n, (r, d) in shapes.items()]
        self.ebc = EmbeddingBagCollection(tables=configs, device=device or torch.device("cpu"))

    def forward(self, **ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Look up one row per id: ``tables(user=u, item=i)`` -> {"user": B x d, "item": B' x d}.

        Ids on another device than the tables (a scorer's users, from the evaluation) are moved to them.
        """
        if isinstance(self.ebc, EmbeddingBagCollection):
            # Unsharded: a one-id bag is a row lookup. F.embedding on the same weights gives the same
            # values and gradients without the KJT's one-stride padding and the pooled-output concat
            # (up to 2x the time of a step otherwise; bench/bench_teachers.py). Sharded: the KJT below.
            out = {}
            for n, v in ids.items():
                weight = self.ebc.embedding_bags[n].weight
                out[n] = F.embedding(v.long().to(weight.device), weight)
            return out
        # A KJT has one batch size for all keys: shorter id lists are padded with empty bags.
        device = next(iter(ids.values())).device
        stride = max(len(v) for v in ids.values())
        lengths = torch.zeros(len(self.names), stride, dtype=torch.int32, device=device)
        for k, n in enumerate(self.names):
            lengths[k, :len(ids.get(n, ()))] = 1
        values = torch.cat([ids[n].long() for n in self.names if n in ids])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.names, values=values, lengths=lengths.flatten())
        out = self.ebc(kjt).to_dict()
        return {n: out[n][:len(v)] for n, v in ids.items()}

    def bags(self, name: str, ids: torch.Tensor, lengths: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of rows per bag: table ``name``, bags given by ``lengths`` (B) -> B x d.

        ``ids``, ``lengths`` and ``weights`` are on the tables' device (a KJT is not moved piecewise).
        """
        keys = self.names
        all_lengths = torch.cat([lengths.int() if n == name
                                 else torch.zeros(len(lengths), dtype=torch.int32, device=lengths.device)
                                 for n in keys])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=ids.long(), lengths=all_lengths,
            weights=None if weights is None else weights.float())
        return self.ebc(kjt).to_dict()[name]

    def weight(self, name: str) -> torch.Tensor:
        """The whole table ``name`` (rows x d) of an unsharded model, for full-item scoring.

        Once :mod:`hetcomp_dist.sharding` has sharded the tables, only this process's rows
        (local rows x d; 0 x d where it holds none): enough for row-by-row updates such as
        ``after_step``, never for scoring.
        """
        w = self.ebc.embedding_bags[name].weight
        return w if w.dim() == 2 else w.view(0, self.dims[name])


def _normal(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return weight.normal_(0.0, std)
    return init
