"""Mult-VAE (Liang et al. 2018): a user's interaction vector in, a multinomial over items out."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models import sampling
from hetcomp_dist.models.base import register
from hetcomp_dist.models.tables import Tables


def register_csr(module: nn.Module, prefix: str, data: Interactions) -> None:
    """``data``'s CSR arrays as int64 buffers ``<prefix>_indptr`` / ``<prefix>_indices`` of ``module``.

    Buffers, so that the inputs are built where the model computes (``.to(device)`` moves them) instead
    of with numpy on the CPU in every step; not persistent: checkpoints hold weights only.
    """
    module.register_buffer(f"{prefix}_indptr", torch.from_numpy(data.indptr.astype(np.int64)), persistent=False)
    module.register_buffer(f"{prefix}_indices", torch.from_numpy(data.indices.astype(np.int64)), persistent=False)


def csr_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) coordinates of the entries of ``rows`` (row indexes into ``rows``), on the arrays' device.

    The same coordinates, in the same order, as :meth:`Interactions.rows` computes with numpy.
    """
    rows = rows.to(indptr.device)
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())   # the output size: one host sync, instead of one per repeat_interleave
    row = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths, output_size=total)
    first = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=total)
    offsets = torch.arange(total, device=rows.device) - first
    return row, indices[starts[row] + offsets]


def bag_inputs(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, dropout: float, training: bool,
               generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The L2-normalised binary vectors of ``rows`` (of the CSR ``indptr``/``indices``) as weighted bags,
    with input dropout, on the CSR's device (``generator``, if given, must be on it too).

    Returns (ids, lengths, weights, (row, id) pairs of the full input for the likelihood).
    """
    row, ids = csr_rows(indptr, indices, rows)
    n = torch.bincount(row, minlength=len(rows)).clamp(min=1).float()
    weights = n[row].rsqrt()
    keep = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    if training and dropout > 0:
        keep = torch.rand(len(ids), generator=generator, device=ids.device) >= dropout
        weights = weights / (1 - dropout)
    lengths = torch.bincount(row[keep], minlength=len(rows))
    return ids[keep], lengths, weights[keep], torch.stack([row, ids])


class _MultinomialNLL(torch.autograd.Function):
    """Sum over the given (row, col) pairs of -log softmax(h @ weight.T + bias)[row, col], fused.

    The B x N logits are the only large buffer: the forward turns them in place into the gradient
    with respect to the logits (n_row * softmax - one-hot, n_row = the row's number of pairs), so
    no log-softmax output, no one-hot and no separate softmax backward are materialised. On a CPU
    the B x N passes cost about as much as the matrix products, so this halves an autoencoder step.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        logits = torch.addmm(bias, h, weight.T)                              # B x N
        picked = logits[row, col].sum()
        top = logits.max(dim=1, keepdim=True).values
        logits.sub_(top).exp_()                                              # exp(logit - max)
        total = logits.sum(dim=1, keepdim=True)
        n = torch.bincount(row, minlength=len(h)).to(logits.dtype).unsqueeze(1)
        loss = (n * (top + total.log())).sum() - picked                     # sum_pairs (lse - logit)
        logits.mul_(n / total)                                               # n * softmax
        logits.index_put_((row, col), logits.new_tensor(-1.0), accumulate=True)
        ctx.save_for_backward(logits, h, weight)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g_logits, h, weight = ctx.saved_tensors  # scale the small products, not the B x N buffer
        return (g_logits @ weight) * grad, (g_logits.T @ h) * grad, g_logits.sum(0) * grad, None, None


def multinomial_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """-sum over pairs of log softmax(h @ weight.T + bias)[row, col]: h B x d, weight N x d, bias N."""
    return _MultinomialNLL.apply(h, weight, bias, row, col)


@register("multvae")
class MultVAE(nn.Module):
    """Encoder: bag of the user's items (a TorchRec table) -> tanh -> (mu, logvar); decoder: z ->
    [tanh hidden] -> logits over all items (a second item table). Loss: multinomial NLL + beta KL,
    beta annealed linearly to ``beta_max`` over ``anneal_steps`` updates.

    Args:
        hidden: encoder width; latent: z size; decoder_hidden: decoder width (0 = z straight to items).
        dropout: input dropout.
    """

    def __init__(self, n_users: int, n_items: int, train: Interactions, hidden: int = 600, latent: int = 200,
                 decoder_hidden: int = 600, dropout: float = 0.5, beta_max: float = 0.2,
                 anneal_steps: int = 20000, init_std: float = 0.01, device: torch.device | None = None):
        super().__init__()
        self.dropout = dropout
        register_csr(self, "input", train)
        self.beta_max, self.anneal_steps = beta_max, anneal_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # in checkpoints: KL annealing resumes
        out_dim = decoder_hidden or latent
        self.tables = Tables({"item_in": (n_items, hidden), "item_out": (n_items, out_dim)}, init_std, device)
        self.in_bias = nn.Parameter(torch.zeros(hidden))
        self.encoder = nn.Linear(hidden, 2 * latent)
        self.decoder = nn.Linear(latent, decoder_hidden) if decoder_hidden else None
        self.out_bias = nn.Parameter(torch.zeros(n_items))

    def batches(self, train, batch_size, rng):
        return sampling.user_batches(train, batch_size, rng)

    def _encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, lengths, weights, pairs = bag_inputs(self.input_indptr, self.input_indices, users, self.dropout,
                                                  self.training)
        h = torch.tanh(self.tables.bags("item_in", ids, lengths, weights) + self.in_bias)
        mu, logvar = self.encoder(h).chunk(2, dim=-1)
        return mu, logvar, pairs

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden layer (B x out_dim); logits = it @ item_out.T + out_bias."""
        return torch.tanh(self.decoder(z)) if self.decoder is not None else z

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.out_bias, self._decode(z), self.tables.weight("item_out").T)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mu, logvar, (row, item) = self._encode(batch["user"])
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = multinomial_nll(self._decode(z), self.tables.weight("item_out"), self.out_bias, row, item) / len(mu)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
        # min(beta_max, steps / anneal_steps) computed where steps lives: no host sync per step on a GPU.
        beta = (self.steps.double() / self.anneal_steps).clamp(max=self.beta_max).float()
        self.steps += 1
        return nll + beta * kl

    def scorer(self):
        return lambda users: self._logits(self._encode(users)[0])

    def after_step(self) -> None:
        pass
