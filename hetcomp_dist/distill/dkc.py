"""Dynamic knowledge construction (ALGORITHM.md §5): per user and teacher, when to move the
target to the next (harder) trajectory stage. Vectorised over users and teachers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISCREPANCY_K = 50


def _gains(k: int) -> torch.Tensor:
    """(2^(exp(-t/10)) - 1) / log2(t + 2) for ranks t < k: the reference's graded gain."""
    t = torch.arange(k, dtype=torch.float64)
    return ((2.0 ** torch.exp(-t / 10.0)) - 1.0) / torch.log2(t + 2.0)


def discrepancy(student_top: torch.Tensor, targets: torch.Tensor, k: int = DISCREPANCY_K) -> torch.Tensor:
    """D(u, pi) = 1 - NDCG@k of the student's top-k against each teacher permutation's top-k.

    Args:
        student_top: int [B, >=k] the student's top unobserved items, best first.
        targets: int [B, T, >=k] permutations (e.g. each teacher's next-stage list), -1 padded.
    Returns:
        float32 [B, T].
    """
    s = student_top[:, :k]
    pi = targets[..., :k]
    hit = (s[:, None, :, None] == pi[:, :, None, :]).any(-1)  # [B, T, k]: s_t in pi[:k]
    gains = _gains(s.shape[1]).to(torch.float32)
    return 1.0 - (hit.float() * gains).sum(-1) / gains.sum()


@dataclass
class DKCConfig:
    period: int = 10          # p: epochs between decisions
    alpha: float = 1.05
    decay: float = 0.995


def threshold(epoch: int, cfg: DKCConfig) -> float:
    """th = alpha * decay^(epoch // p)."""
    return cfg.alpha * cfg.decay ** (epoch // cfg.period)


def advance(stage: torch.Tensor, last: torch.Tensor, d_next: torch.Tensor, n_stages: int,
            th: float) -> torch.Tensor:
    """Which (user, teacher) pairs move to their next stage.

    Args:
        stage: int [B, T] current stage v(u, t).
        last: float [B, T] the discrepancy to the next stage stored at the previous decision.
        d_next: float [B, T] the discrepancy to the next stage now.
    Returns:
        bool [B, T]: not final, and ratio = last / d_next is > th or < 1 (d_next = 0 -> ratio inf).
    """
    ratio = torch.where(d_next > 0, last / d_next.clamp_min(1e-12), torch.full_like(last, float("inf")))
    return (stage < n_stages - 1) & ((ratio > th) | (ratio < 1))


def next_stage_lists(lists: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Each (user, teacher)'s list at stage v+1 (the final one where v is final).

    Args:
        lists: int [B, T, S, K]; stage: int [B, T]. Returns int [B, T, K].
    """
    s = lists.shape[2]
    nxt = (stage + 1).clamp(max=s - 1).long()
    return current_lists(lists, nxt)


def current_lists(lists: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Each (user, teacher)'s list at ``stage``: int [B, T, K] from [B, T, S, K]."""
    b, t, _, k = lists.shape
    index = stage.long().view(b, t, 1, 1).expand(b, t, 1, k)
    return torch.gather(lists, 2, index).squeeze(2)
