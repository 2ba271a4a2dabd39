"""Standard debiasing baselines to compare the dissensus strategies with (ALGORITHM.md §7)."""

from __future__ import annotations

import torch

from hetcomp_dist.distill.dissensus import mean_one


def ipw_weights(targets: torch.Tensor, item_counts: torch.Tensor, eta: float) -> torch.Tensor:
    """Inverse-propensity weights of the target items' KD terms: count(i)^-eta, mean 1 per user.

    The propensity of an item being exposed is taken proportional to its train count (floored at 1).
    """
    idx = torch.where(targets >= 0, targets, 0)
    return mean_one(item_counts[idx].clamp_min(1) ** -eta, targets >= 0)


def penalised_scorer(scorer, pop: torch.Tensor, beta: float):
    """Post-hoc popularity penalty: s_ui - beta * std_u(s) * pop(i), pop in [0, 1].

    Scaling by the user's score spread makes beta comparable across users and models.
    """
    def score(users: torch.Tensor) -> torch.Tensor:
        s = scorer(users)
        return s - beta * s.std(1, keepdim=True) * pop.to(s.device)     # pop stays where it was made
    return score
