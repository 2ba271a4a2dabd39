"""Dissensus debiasing (ALGORITHM.md §7): use the teachers' disagreement against popularity bias.

For user u and item i with the teachers' current lists: agree(u, i) = share of teachers with i in
their list, dissensus = 1 - agree, pop(i) in [0, 1] = the item's popularity percentile in train.

- Strategy A (dissensus-aware target): each teacher's rank importance of i is multiplied by
  max(0, 1 - lam * agree(u, i) * pop(i)) when T_u is built: consensus on popular items is
  discounted, so the target makes room for items only some teachers rank high.
  Two other rules for A (``distill.dissensus_rule``), found by measuring the target itself
  (README, "Debiasing"): ``contested`` multiplies it by count(i)^(-lam * (1 - agree(u, i))), so
  popularity is discounted where the teachers disagree (a popular item only some teachers push is
  their bias; their consensus is evidence of relevance); ``popularity`` by count(i)^-lam, the same
  discount without dissensus (the control that shows what dissensus adds).
- Strategy B (dissensus-weighted transfer): target item i's loss term is weighted by
  1 + gamma * dissensus(u, i) * (1 - pop(i)), normalised to mean 1 over each user's list.
"""

from __future__ import annotations

import numpy as np
import torch


def popularity_percentile(item_counts: np.ndarray) -> torch.Tensor:
    """pop(i) in [0, 1]: share of items with at most i's train count (ties share the top value)."""
    ordered = np.sort(item_counts)
    return torch.from_numpy(np.searchsorted(ordered, item_counts, side="right") / len(item_counts)).float()


def agreement_counts(lists: torch.Tensor, n_items: int) -> torch.Tensor:
    """float [B, n_items]: how many teachers have each item in their list (lists: int [B, T, K], -1 padded)."""
    b = lists.shape[0]
    valid = lists >= 0
    counts = torch.zeros(b, n_items + 1)
    counts.scatter_add_(1, torch.where(valid, lists, n_items).reshape(b, -1), valid.reshape(b, -1).float())
    return counts[:, :n_items]


def _entry_agreement(lists: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per list entry [B, T, K]: its item id (padding read as item 0) and agree(u, i), the share of teachers listing it."""
    idx = torch.where(lists >= 0, lists, 0)
    return idx, torch.gather(counts, 1, idx.reshape(len(lists), -1)).reshape(lists.shape) / lists.shape[1]


def target_discount(lists: torch.Tensor, counts: torch.Tensor, pop: torch.Tensor, lam: float) -> torch.Tensor:
    """Strategy A: float [B, T, K] multipliers of each list entry's rank importance."""
    idx, agree = _entry_agreement(lists, counts)
    return torch.where(lists >= 0, (1 - lam * agree * pop[idx]).clamp_min(0), 1.0)


def contested_discount(lists: torch.Tensor, counts: torch.Tensor, item_counts: torch.Tensor,
                       eta: float) -> torch.Tensor:
    """Strategy A, rule ``contested``: float [B, T, K] multipliers count(i)^(-eta * (1 - agree(u, i)))."""
    idx, agree = _entry_agreement(lists, counts)
    return torch.where(lists >= 0, item_counts.clamp_min(1)[idx] ** (-eta * (1 - agree)), 1.0)


def popularity_discount(lists: torch.Tensor, item_counts: torch.Tensor, eta: float) -> torch.Tensor:
    """Strategy A's control without dissensus, rule ``popularity``: multipliers count(i)^-eta."""
    idx = torch.where(lists >= 0, lists, 0)
    return torch.where(lists >= 0, item_counts.clamp_min(1)[idx] ** -eta, 1.0)


def discount(rule: str, lists: torch.Tensor, counts: torch.Tensor, pop: torch.Tensor,
             item_counts: torch.Tensor, strength: float) -> torch.Tensor:
    """Strategy A's multipliers of the list entries' rank importance under ``rule``."""
    if rule == "consensus":
        return target_discount(lists, counts, pop, strength)
    if rule == "contested":
        return contested_discount(lists, counts, item_counts, strength)
    if rule == "popularity":
        return popularity_discount(lists, item_counts, strength)
    raise ValueError(f"unknown dissensus rule {rule!r}")


def transfer_weights(targets: torch.Tensor, counts: torch.Tensor, n_teachers: int, pop: torch.Tensor,
                     gamma: float) -> torch.Tensor:
    """Strategy B: float [B, L] weights of the target items' loss terms, mean 1 over each user's list."""
    idx = torch.where(targets >= 0, targets, 0)
    dissensus = 1 - torch.gather(counts, 1, idx) / n_teachers
    return mean_one(1 + gamma * dissensus * (1 - pop[idx]), targets >= 0)


def mean_one(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scale each row so its valid entries average 1 (padding gets 0)."""
    weights = weights * valid
    return weights * valid.sum(1, keepdim=True).clamp_min(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)
