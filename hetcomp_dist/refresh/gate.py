"""The quality gate: the candidate student and the production student on the same fresh holdout.

The holdout is the new version's test split (its newest interactions, refresh/versions.py), evaluated
for every user with a holdout item (train and valid items excluded). Production's tables are grown
with zero rows for users and items it never saw (it cannot rank them: a neutral score of 0).

Promotion needs every sanity check (finite scores for every user, coverage@max(ks) above the floor,
enough holdout users) and, where production exists, every gate metric >= (1 - tolerance) x production's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.distill.student import ITEM_KEY, USER_KEY
from hetcomp_dist.evaluate import evaluate_split
from hetcomp_dist.refresh.config import GateConfig


def grown_with_zeros(state: dict[str, torch.Tensor], n_users: int, n_items: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, rows in ((USER_KEY, n_users), (ITEM_KEY, n_items)):
        old = state[key]
        grown = torch.zeros((rows, old.shape[1]), dtype=old.dtype)
        grown[:min(rows, len(old))] = old[:rows]
        out[key] = grown
    return out


def holdout_users(data: Dataset) -> np.ndarray:
    return np.flatnonzero(data.test.counts() > 0)


FLOAT32_SAFE = 1e38      # below float32's largest finite value (3.4e38)


def all_scores_finite(users_emb: torch.Tensor, items_emb: torch.Tensor, batch_size: int = 1024) -> bool:
    """Whether every user-item score (a float32 dot product) is finite.

    Cheap in the usual case: with finite tables, |u . v| and every partial sum of its products are at most
    |u| |v| (Cauchy-Schwarz on the absolute values), so a bound on the largest norms' product proves it
    without scoring users x items. Only when that bound is not met are the scores computed block by block.
    """
    if not (torch.isfinite(users_emb).all() and torch.isfinite(items_emb).all()):
        return False
    norm = lambda t: float(t.double().norm(dim=1).max()) if len(t) else 0.0  # noqa: E731  (float64: no overflow)
    if norm(users_emb) * norm(items_emb) < FLOAT32_SAFE:
        return True
    for lo in range(0, len(users_emb), batch_size):
        if not torch.isfinite(users_emb[lo:lo + batch_size] @ items_emb.T).all():
            return False
    return True


def evaluate_state(state: dict[str, torch.Tensor], data: Dataset, ks: tuple[int, ...],
                   batch_size: int = 1024) -> dict[str, Any]:
    """Holdout metrics of a student state (grown to the data's sizes) and whether all its scores are finite."""
    state = grown_with_zeros(state, data.n_users, data.n_items)
    users_emb, items_emb = state[USER_KEY].float(), state[ITEM_KEY].float()
    finite = all_scores_finite(users_emb, items_emb, batch_size)
    users = holdout_users(data)
    scorer = lambda u: users_emb[u.long()] @ items_emb.T    # noqa: E731
    with torch.no_grad():
        metrics = evaluate_split(scorer, data, "test", ks, batch_size, users=users) if len(users) else {}
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "finite": finite, "n_users": int(len(users))}


def decide(candidate: dict[str, Any], production: dict[str, Any] | None, cfg: GateConfig,
           ks: tuple[int, ...]) -> tuple[bool, list[str]]:
    """(promote?, reasons): each check's outcome in words, failures first."""
    failed, passed = [], []
    k = max(ks)
    (passed if candidate["finite"] else failed).append(
        "scores finite for every user" if candidate["finite"] else "non-finite scores (NaN or inf) in the candidate")
    if candidate["n_users"] < cfg.min_users:
        failed.append(f"holdout has {candidate['n_users']} users with an item, fewer than min_users {cfg.min_users}")
    coverage = candidate["metrics"].get(f"coverage@{k}", float("nan"))
    ok = math.isfinite(coverage) and coverage >= cfg.min_coverage
    (passed if ok else failed).append(f"coverage@{k} {coverage:.4f} {'>=' if ok else 'below'} floor {cfg.min_coverage:g}")
    if production is None:
        passed.append("no production student yet: the metric comparison is skipped")
    else:
        for metric in cfg.metrics:
            c, p = candidate["metrics"].get(metric, float("nan")), production["metrics"].get(metric, float("nan"))
            need = (1 - cfg.tolerance) * p
            ok = math.isfinite(c) and (not math.isfinite(p) or c >= need)
            (passed if ok else failed).append(
                f"{metric}: candidate {c:.4f} {'>=' if ok else '<'} {need:.4f} "
                f"(production {p:.4f} x (1 - {cfg.tolerance:g}))")
    return not failed, failed + passed
