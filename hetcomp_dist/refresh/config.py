"""The refresh's settings: the ``refresh`` section of a run config (RunConfig.refresh; a config
without one gets the defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hetcomp_dist.config import Where, check_metric, check_ranges
from hetcomp_dist.data import formats


@dataclass
class NewDataConfig:
    """How new interaction files are read (csv, parquet, inter: any format prepare reads)."""
    format: str | None = None        # default: from the file name
    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    id_type: str | None = None       # int | str; default: the first version's (int for csv/parquet)
    delimiter: str = ","

    def validate(self, where: Where) -> None:
        if self.format is not None and self.format not in formats.FORMATS:
            raise where.at("format").error(f"{self.format!r} is not one of {list(formats.FORMATS)}")
        if self.id_type not in (None, "int", "str"):
            raise where.at("id_type").error(f"{self.id_type!r} is not 'int' or 'str'")


@dataclass
class GateConfig:
    """Promote the candidate only if, on the fresh holdout, every metric is >= production's x (1 - tolerance)
    and the sanity checks pass (finite scores, coverage@K above a floor)."""
    metrics: list[str] = field(default_factory=lambda: ["recall@20", "ndcg@20"])
    tolerance: float = 0.02          # relative: candidate >= (1 - tolerance) x production
    min_coverage: float = 0.01       # coverage@max(ks) of the catalogue, a floor
    min_users: int = 1               # evaluated holdout users needed to decide at all

    RANGES: ClassVar[tuple[str, ...]] = ("tolerance >= 0", "tolerance <= 1", "min_coverage >= 0",
                                         "min_coverage <= 1", "min_users >= 1")

    def validate(self, where: Where) -> None:
        check_ranges(self, where, self.RANGES)
        if not self.metrics:
            raise where.at("metrics").error("must name at least one metric")
        for i, m in enumerate(self.metrics):
            check_metric(where.at("metrics").at(i), m)


@dataclass
class RefreshConfig:
    holdout_fraction: float = 0.1    # the newest fraction of the new rows (by time) is the gate's holdout (test)
    holdout_seconds: float = 0.0     # > 0: instead, the new rows within this many seconds of the newest (e.g. 86400)
    valid_fraction: float = 0.1      # of the older rows; a pair keeps its train/valid label in every version
    seed: int = 0
    warm_start: bool = True          # False: every version trains from scratch (the bench's baseline)
    # True: teachers on Ray actors and the student on distill.workers Ray Train workers (the ray section's
    # cluster); False: both in the refresh's own process. jobs/nightly_refresh.py sets it (hetcomp refresh --ray).
    ray: bool = False
    teacher_epochs: int = 4          # a warm-started teacher trains at most this many more epochs (or its stopping rule)
    student_epochs: int = 40         # a warm-started student's max_epochs
    export_k: int = 50               # top-K recommendations per user in the export
    lease_ttl_s: float = 900.0
    new_data: NewDataConfig = field(default_factory=NewDataConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    RANGES: ClassVar[tuple[str, ...]] = (
        "holdout_fraction > 0", "holdout_fraction < 1", "holdout_seconds >= 0", "valid_fraction >= 0",
        "valid_fraction < 1", "seed >= 0", "teacher_epochs >= 1", "student_epochs >= 1", "export_k >= 1",
        "lease_ttl_s > 0")

    def validate(self, where: Where) -> None:
        check_ranges(self, where, self.RANGES)
