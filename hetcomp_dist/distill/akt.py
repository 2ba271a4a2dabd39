"""Adaptive knowledge transfer losses (ALGORITHM.md §6), per user, without a dense score matrix.

The student scores s_ui = <e_u, e_i>, clamped to [-40, 40]. Per batch of B users the losses need
only
- the scores of the items in two short lists: the observed ranking P [B, Lp] and the target
  permutation T [B, Lt] (both -1 padded at the end; T holds unobserved items only), and
- rest_u = sum over j in N_u \\ T_u of e^{s_uj}: a sum over (nearly) every item.

:func:`unobserved_exp_sum` computes rest_u in item chunks with a hand-written backward, so the
B x n_items scores exist one chunk at a time instead of as a dozen full B x n_items tensors
(scores, clamp, exp, masks and their gradients); given a ``sample`` of uniform item ids it
estimates the sum from them (log-Q corrected), for catalogues too large for the full sum.
The sums over T^50 and T^10's complements follow by adding back T's tail terms, all positive, so
nothing is subtracted. Observed and unobserved items are never compared: every denominator sums
over unobserved items only.
"""

from __future__ import annotations

import torch

CLAMP = 1e-5          # denominators are clamped here before the log


def list_scores(user_emb: torch.Tensor, item_weight: torch.Tensor, lists: torch.Tensor, clamp: float) -> torch.Tensor:
    """Clamped scores of each user's listed items (rows of ``item_weight``): float [B, L] (padding positions score 0)."""
    valid = lists >= 0
    items = item_weight[torch.where(valid, lists, 0)]                          # [B, L, d]
    return torch.einsum("bd,bld->bl", user_emb, items).clamp(-clamp, clamp) * valid


CACHE_BYTES = 256 << 20   # the forward keeps its e^s chunks for the backward up to this size per call


class _ExcludedExpSum(torch.autograd.Function):
    """sum_i e^{clamp(<u, w_i>)} over items not in ``exclude``, in item chunks.

    The forward keeps each chunk's backward terms (e^s with the excluded and the clamped entries
    zeroed: no gradient passes a clamp) up to CACHE_BYTES per call, so the backward is two matrix
    products with the incoming gradient folded into the small operands; above that it recomputes
    them chunk by chunk. Trained students do reach the clamp (mostly far below -clamp), so a chunk
    is checked for it by its actual scores, and skips the check when no score can reach it
    (max |u| x max |w| <= clamp, Cauchy-Schwarz).
    """

    # Operand layouts matter with d ~ 6-64 (1 thread, B ~ 1000 x 1024 chunks): u @ (d x C, contiguous)
    # is 3-4x faster than u @ w.T, and (u.T @ g).T 7-10x faster than g.T @ u.

    @staticmethod
    def forward(ctx, user_emb, item_weight, exclude, clamp, chunk):
        hits = _excluded_by_chunk(exclude, item_weight.shape[0], chunk)
        item_t = item_weight.T.contiguous()                                      # d x n_items
        free = within_clamp(user_emb, item_weight, clamp)
        keep = user_emb.shape[0] * item_weight.shape[0] * user_emb.element_size() <= CACHE_BYTES
        total = user_emb.new_zeros(user_emb.shape[0])
        kept = []
        for c0, (rows, cols) in hits:
            e = _chunk_terms(user_emb, item_t[:, c0:c0 + chunk], rows, cols, clamp, free, total)
            if keep:
                kept.append(e)
        ctx.save_for_backward(user_emb, item_weight, item_t)
        ctx.hits, ctx.clamp, ctx.chunk, ctx.free, ctx.kept = hits, clamp, chunk, free, kept
        return total

    @staticmethod
    def backward(ctx, grad_total):
        user_emb, item_weight, item_t = ctx.saved_tensors
        grad_user_t = user_emb.new_zeros(user_emb.shape[1], user_emb.shape[0])      # d x B
        grad_item = torch.zeros_like(item_weight)
        scaled_t = (user_emb * grad_total[:, None]).T.contiguous()                  # d x B
        for k, (c0, (rows, cols)) in enumerate(ctx.hits):
            w_t = item_t[:, c0:c0 + ctx.chunk]
            e = ctx.kept[k] if ctx.kept else _chunk_terms(user_emb, w_t, rows, cols, ctx.clamp, ctx.free)
            # d total_b / d u_b = sum_i e_bi w_i and d / d w_i = sum_b g_b e_bi u_b: g folded in afterwards
            # for the users and into u beforehand for the items, so e is only read, never rescaled
            grad_user_t.addmm_(w_t, e.T)
            grad_item[c0:c0 + ctx.chunk] = (scaled_t @ e).T
        ctx.kept = None
        return grad_user_t.T * grad_total[:, None], grad_item, None, None, None


def within_clamp(user_emb: torch.Tensor, item_weight: torch.Tensor, clamp: float) -> bool:
    """Whether no score <u, w> can reach the clamp: max |u| x max |w| <= clamp (Cauchy-Schwarz)."""
    return bool(user_emb.norm(dim=1).max() * item_weight.norm(dim=1).max() <= clamp) if len(user_emb) else True


def _chunk_terms(user_emb: torch.Tensor, item_t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 clamp: float, free: bool, total: torch.Tensor | None = None) -> torch.Tensor:
    """The backward's terms of one chunk (B x C): e^{clamp(u @ item_t)} with the excluded entries
    (rows, cols) and the clamped ones zeroed. ``total``: first add each row's sum of e^{clamp(s)}
    without the excluded entries (the forward's value: clamped entries count there). ``free``: no
    score can reach the clamp, so the check is skipped."""
    s = user_emb @ item_t
    cut = None
    if not free:
        lo, hi = torch.aminmax(s)
        low, high = bool(lo < -clamp), bool(hi > clamp)
        if low or high:        # one comparison where only one side is reached (mostly the low one)
            cut = s.abs() > clamp if low and high else s < -clamp if low else s > clamp
            s.clamp_(-clamp, clamp)
    e = s.exp_()
    e[rows, cols] = 0
    if total is not None:
        total += e.sum(1)
    if cut is not None:
        e.masked_fill_(cut, 0)
    return e


def _excluded_by_chunk(exclude: torch.Tensor, n_items: int, chunk: int):
    """[(chunk start, (rows, columns within the chunk))] of the excluded entries.

    One pass over the padded [B, L] (mostly padding: L is the batch's longest train list), then one
    stable sort of the compact entries by chunk, split into consecutive runs (a mask per chunk would
    scan every entry once per chunk).
    """
    rows, k = torch.nonzero(exclude >= 0, as_tuple=True)
    items = exclude[rows, k]
    n_chunks = (n_items + chunk - 1) // chunk
    # the narrowest type that holds a chunk number: torch's stable sort is several times faster on it
    which = torch.div(items, chunk, rounding_mode="floor").to(torch.int16 if n_chunks < 1 << 15 else torch.int32)
    order = torch.sort(which, stable=True).indices
    counts = torch.bincount(which.long(), minlength=n_chunks).tolist()
    rows, items = rows[order].split(counts), items[order].split(counts)
    return [(c * chunk, (rows[c], items[c] - c * chunk)) for c in range(n_chunks)]


def unobserved_exp_sum(user_emb: torch.Tensor, item_weight: torch.Tensor, exclude: torch.Tensor, clamp: float,
                       sample: torch.Tensor | None = None, chunk: int = 1024,
                       sample_rows: torch.Tensor | None = None, n_items: int | None = None) -> torch.Tensor:
    """rest_u = sum over items i not in ``exclude[u]`` of e^{clamp(s_ui)}: float [B], differentiable.

    Args:
        exclude: int [B, L], -1 padded: each user's observed items and target list (no duplicates
            needed; duplicates are harmless for the exact sum).
        sample: None for the exact sum; m uniform item ids (int64 [m], shared by the batch, on any
            device) estimate it as (n_items - |exclude_u|) times the mean of e^{s} over the samples
            not excluded for u: uniform proposal, so the log-Q correction is that one factor.
        sample_rows, n_items: with ``sample``, when ``item_weight`` holds only some items' rows (a split
            item table, distill/student.py): the samples' rows in it and the catalogue's size.
    """
    if sample is None:
        return _ExcludedExpSum.apply(user_emb, item_weight, exclude, clamp, chunk)
    n_items = item_weight.shape[0] if n_items is None else n_items
    sample = sample.to(item_weight.device)
    rows = item_weight[sample if sample_rows is None else sample_rows.to(item_weight.device)]   # [m, d]
    e = (user_emb @ rows.T).clamp(-clamp, clamp).exp()                         # [B, m]
    ordered = torch.sort(torch.where(exclude >= 0, exclude, n_items), dim=1).values
    pos = torch.searchsorted(ordered, sample.expand(len(ordered), -1).contiguous()).clamp_max(ordered.shape[1] - 1)
    keep = torch.gather(ordered, 1, pos) != sample
    distinct = (ordered < n_items) & torch.cat([torch.ones_like(ordered[:, :1], dtype=torch.bool),
                                                ordered[:, 1:] != ordered[:, :-1]], 1)
    candidates = (n_items - distinct.sum(1)).to(e.dtype)
    return candidates * (e * keep).sum(1) / keep.sum(1).clamp_min(1)


def overall_loss(s_p: torch.Tensor, s_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor, rest: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_O per user: - sum over i in P_u and T_u of log(e^{s_ui} / (e^{s_ui} + rest_u)); float [B].

    ``s_p``/``s_t`` are :func:`list_scores` of P/T, ``rest`` is :func:`unobserved_exp_sum` excluding
    observed and T items; ``weights`` (optional, [B, Lt]) scales the target items' terms.
    """
    def terms(s):
        return s - torch.log((s.exp() + rest[:, None]).clamp_min(CLAMP))

    t_terms = terms(s_t) * (t >= 0)
    if weights is not None:
        t_terms = t_terms * weights
    return -((terms(s_p) * (p >= 0)).sum(1) + t_terms.sum(1))


def plackett_luce(s: torch.Tensor, valid: torch.Tensor, rest: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_PL(pi; R) = - sum_k log(e^{s_pi_k} / (sum_{j >= k} e^{s_pi_j} + sum_{r in R} e^{s_r})).

    Args:
        s: float [B, L] scores of the permutation's items; valid: bool [B, L] (padding False, at the end);
        rest: float [B] = sum over R of e^{s}.
    Returns float [B].
    """
    e = s.exp() * valid
    suffix = e.flip(1).cumsum(1).flip(1)
    terms = (s - torch.log((suffix + rest[:, None]).clamp_min(CLAMP))) * valid
    if weights is not None:
        terms = terms * weights
    return -terms.sum(1)


def ranking_loss(s_p: torch.Tensor, s_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor, rest: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_R per user: L_PL(P; N \\ T^50) + 0.5 * (L_PL(T^50; N \\ T^50) + L_PL(T^10; N \\ T^10)).

    ``rest`` is the sum over N \\ T (as for :func:`overall_loss`); the sums over N \\ T^50 and
    N \\ T^10 add T's tail back. ``weights`` (optional, [B, Lt]) scales the target items' terms.
    """
    e_t = s_t.exp() * (t >= 0)
    rest50 = rest + e_t[:, 50:].sum(1)
    rest10 = rest50 + e_t[:, 10:50].sum(1)
    w50 = None if weights is None else weights[:, :50]
    w10 = None if weights is None else weights[:, :10]
    return (plackett_luce(s_p, p >= 0, rest50)
            + 0.5 * (plackett_luce(s_t[:, :50], t[:, :50] >= 0, rest50, w50)
                     + plackett_luce(s_t[:, :10], t[:, :10] >= 0, rest10, w10)))
