"""Dynamic knowledge construction (DKC): per user and teacher, when to move the target to the next
(harder) trajectory stage. Vectorised over users and teachers; the rule is the authors' released one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

DISCREPANCY_K = 50


def _gains(k: int) -> torch.Tensor:
    """(2^(exp(-t/10)) - 1) / log2(t + 2) for ranks t < k: the reference's graded gain."""
    t = torch.arange(k, dtype=torch.float64)
    return ((2.0 ** torch.exp(-t / 10.0)) - 1.0) / torch.log2(t + 2.0)


def discrepancy(student_top: torch.Tensor, targets: torch.Tensor, k: int = DISCREPANCY_K) -> torch.Tensor:
    """D(u, pi) = 1 - NDCG@k of the student's top-k against each teacher permutation's top-k.

    NDCG is rounded to 4 decimals, as the reference does: the ratio test compares these rounded values.

    Args:
        student_top: int [B, >=k] the student's top unobserved items, best first.
        targets: int [B, T, >=k] permutations (e.g. each teacher's next-stage list), -1 padded.
    Returns:
        float64 [B, T].
    """
    s = student_top[:, :k]
    pi = targets[..., :k]
    hit = torch.zeros(pi.shape[0], pi.shape[1], s.shape[1], dtype=torch.bool)  # [B, T, k]: s_t in pi[:k]
    for j in range(pi.shape[-1]):     # one column at a time: a [B, T, k, k] comparison is 2.5k bytes per pair
        hit |= s[:, None, :] == pi[:, :, j, None]
    gains = _gains(k)
    ndcg = (hit.double() * gains[: s.shape[1]]).sum(-1) / gains.sum()
    return 1.0 - torch.round(ndcg, decimals=4)


Schedule = Literal["epochs", "progress"]


@dataclass
class DKCConfig:
    period: int = 10          # p: epochs between decisions
    alpha: float = 1.05
    decay: float = 0.995
    schedule: Schedule = "epochs"
    stall: float = 0.01       # progress: a relative valid gain below this is a stall


def threshold(epoch: int, cfg: DKCConfig, gain: float | None = None) -> float:
    """The ratio a pair must beat at the check of ``epoch``.

    epochs (the reference): th = alpha * decay^(epoch // p), whatever the student does.
    progress: the same, except at a check where the student's valid score rose by less than
    ``stall`` (relative) since the previous evaluation: th = 0 and every pair moves on. A student
    that has learnt what its current stages teach moves on at once instead of waiting for the
    epoch count; one that still improves follows the reference.

    Args:
        gain: the relative change of the valid score since the previous evaluation (None: unknown).
    """
    if cfg.schedule == "progress" and gain is not None and gain < cfg.stall:
        return 0.0
    return cfg.alpha * cfg.decay ** (epoch // cfg.period)


def start(stage: torch.Tensor, top: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """The first check: no stage moves; ``last`` becomes each pair's distance to its next stage."""
    return discrepancy(top, next_stage_lists(lists, stage))


def step(stage: torch.Tensor, last: torch.Tensor, top: torch.Tensor, lists: torch.Tensor,
         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One DKC check after the first.

    A pair (u, t) not at its final stage moves on when ratio = last / D(u, next stage) is above
    ``threshold`` or below 1 (last > 0 and D = 0 gives an infinite ratio, 0 / 0 none: no move).
    Only pairs that moved get a new ``last``: the distance to their new next stage. The others
    keep theirs, so their ratio measures progress since their last move.

    Args:
        stage: int [U, T]; last: float [U, T]; top: int [U, 50] the student's top unobserved items;
        lists: int [U, T, S, K] the trajectories.
    Returns:
        (stage, last), new tensors.
    """
    return step_with(stage, last, top, lambda st: next_stage_lists(lists, st), lists.shape[2], threshold)


def step_with(stage: torch.Tensor, last: torch.Tensor, top: torch.Tensor,
              next_lists: Callable[[torch.Tensor], torch.Tensor], n_stages: int,
              threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`step` with the lists read on demand: ``next_lists(stage)`` gives int [U, T, K], each
    pair's list at stage + 1 (the last where stage + 1 is past it). The one implementation of the rule."""
    d_next = discrepancy(top, next_lists(stage)).to(last.dtype)
    ratio = last / d_next                                      # IEEE: x/0 = inf, 0/0 = nan
    moved = (stage < n_stages - 1) & ((ratio > threshold) | (ratio < 1))
    stage = stage + moved.long()
    if moved.any():
        last = torch.where(moved, discrepancy(top, next_lists(stage)).to(last.dtype), last)
    return stage, last


SwitchRule = Literal["reference", "strict"]


def switched(mean_stage: list[float], n_stages: int, rule: SwitchRule = "reference") -> bool:
    """Whether DKC is over and L_R replaces L_O, from each teacher's mean stage over all users.

    reference: every teacher's mean stage, rounded to 2 decimals, is final (the authors' code; a
    tail of under 0.5% of a teacher's users may lag and keeps its stage). strict: every pair is final.
    """
    final = n_stages - 1
    if rule == "strict":
        return all(m >= final for m in mean_stage)
    return all(round(m, 2) == final for m in mean_stage)


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
