"""Teacher weights chosen on the validation split, so that weak teachers cannot drag the ensemble down.

Teacher t weighs v_t^p / mean(v^p), v_t its own valid metric (stored in its trajectory's manifest),
the power p taken from :data:`POWERS` (0: every teacher alike) by the valid metric of the weighted
final ensemble. Test data is never looked at.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from hetcomp_dist.storage import StorageError

POWERS = (0.0, 0.5, 1.0, 2.0, 4.0)


def valid_metrics(manifests: Sequence[dict[str, Any]], uris: Sequence[str], metric: str) -> torch.Tensor:
    """float64 [T]: each teacher's valid ``metric`` at its selected epoch (from its trajectory's manifest)."""
    values = []
    for uri, m in zip(uris, manifests):
        value = (m.get("summary") or {}).get("valid", {}).get(metric)
        if value is None:
            raise StorageError(f"{uri}: its manifest has no valid {metric} (teacher weights need it)")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def candidates(values: torch.Tensor) -> dict[float, torch.Tensor]:
    """p -> float32 [T] weights with mean 1."""
    safe = values.clamp_min(1e-12)
    return {p: (w / w.mean()).float() for p in POWERS for w in [safe ** p]}


def choose(values: torch.Tensor, valid_of: Callable[[torch.Tensor], float]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The candidate whose ensemble scores best on valid (``valid_of(weights)``); ties go to the lower p.

    Returns (weights float32 [T], a record: the candidates' valid values and the chosen p).
    """
    scored = {p: (valid_of(w), w) for p, w in candidates(values).items()}
    best = max(scored, key=lambda p: (scored[p][0], -p))
    record = {"teacher_valid": values.tolist(), "power": best, "weights": scored[best][1].tolist(),
              "ensemble_valid": {str(p): v for p, (v, _) in scored.items()}}
    return scored[best][1], record


def per_entry(weights: torch.Tensor | None, lists: torch.Tensor) -> torch.Tensor | None:
    """[T] teacher weights broadcast to the [B, T, K] entries of ``lists`` (None stays None)."""
    if weights is None:
        return None
    return weights.view(1, -1, 1).expand(lists.shape[0], -1, lists.shape[-1])
