"""Loading a run config for the refresh's entry points."""

from __future__ import annotations

from pathlib import Path

from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.run import RunConfig, load_run


def load(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, RefreshConfig]:
    """(RunConfig, its ``refresh`` section) for an entry point (see :func:`hetcomp_dist.run.load_run`)."""
    cfg = load_run(None if path is None else str(path), list(overrides))
    return cfg, cfg.refresh
