"""Adaptive knowledge transfer losses (ALGORITHM.md §6), per user, on one batch of scores.

All inputs are per batch: scores [B, n_items] (already clamped to [-40, 40]), a bool mask of each
user's observed (train) items [B, n_items], the observed ranking P [B, Lp] and the target
permutation T [B, Lt], both -1 padded at the end. Observed and unobserved items are never
compared with each other: every denominator sums over unobserved items only.
"""

from __future__ import annotations

import torch

CLAMP = 1e-5


def _in_list(lists: torch.Tensor, n_items: int) -> torch.Tensor:
    """bool [B, n_items]: item is in the user's (padded) list."""
    # Padding goes to an extra column, so it can never overwrite a real item's entry.
    mask = torch.zeros(lists.shape[0], n_items + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(lists >= 0, lists, n_items).long(), True)
    return mask[:, :n_items]


def _rest_sum(exp_scores: torch.Tensor, observed: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """sum over j in N_u minus the excluded list of e^{s_uj}: float [B]."""
    return (exp_scores * ~(observed | excluded)).sum(1)


def overall_loss(scores: torch.Tensor, observed: torch.Tensor, p: torch.Tensor, t: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_O per user: - sum over i in P_u and T_u of log(e^{s_ui} / (e^{s_ui} + sum_{j in N_u \\ T_u} e^{s_uj})).

    ``weights`` (optional, [B, Lp + Lt]) scales each positive's term. Returns float [B].
    """
    e = scores.exp()
    rest = _rest_sum(e, observed, _in_list(t, scores.shape[1]))
    pos = torch.cat([p, t], 1)
    valid = pos >= 0
    s_pos = torch.gather(scores, 1, torch.where(valid, pos, 0).long())
    terms = s_pos - torch.log((s_pos.exp() + rest[:, None]).clamp_min(CLAMP))
    if weights is not None:
        terms = terms * weights
    return -(terms * valid).sum(1)


def plackett_luce(scores: torch.Tensor, perm: torch.Tensor, rest: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_PL(pi; R) = - sum_k log(e^{s_pi_k} / (sum_{j >= k} e^{s_pi_j} + sum_{r in R} e^{s_r})).

    Args:
        perm: int [B, L] permutation, -1 padded at the end. rest: float [B] = sum over R of e^{s}.
    Returns float [B].
    """
    valid = perm >= 0
    s = torch.gather(scores, 1, torch.where(valid, perm, 0).long())
    e = s.exp() * valid
    suffix = e.flip(1).cumsum(1).flip(1)
    terms = s - torch.log((suffix + rest[:, None]).clamp_min(CLAMP))
    if weights is not None:
        terms = terms * weights
    return -(terms * valid).sum(1)


def ranking_loss(scores: torch.Tensor, observed: torch.Tensor, p: torch.Tensor, t: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_R per user: L_PL(P; N \\ T^50) + 0.5 * (L_PL(T^50; N \\ T^50) + L_PL(T^10; N \\ T^10)).

    ``weights`` (optional, [B, Lt]) scales the target items' terms. Returns float [B].
    """
    e = scores.exp()
    n_items = scores.shape[1]
    t50, t10 = t[:, :50], t[:, :10]
    rest50 = _rest_sum(e, observed, _in_list(t50, n_items))
    rest10 = _rest_sum(e, observed, _in_list(t10, n_items))
    w50 = None if weights is None else weights[:, :50]
    w10 = None if weights is None else weights[:, :10]
    return (plackett_luce(scores, p, rest50)
            + 0.5 * (plackett_luce(scores, t50, rest50, w50) + plackett_luce(scores, t10, rest10, w10)))
