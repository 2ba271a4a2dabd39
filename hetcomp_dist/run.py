"""A run: its config (every section of a run YAML) and its layout under one URI.

    <run>/dataset/                      prepared dataset (hetcomp prepare)
    <run>/teachers/<name>/trajectory/   a teacher's trajectory (manifest written last)
    <run>/teachers/<name>/checkpoints/  its checkpoints (epoch-N, the newest two kept)
    <run>/teachers/summary/             every teacher's summary
    <run>/ensemble/                     each teacher's final snapshot and their ensemble, evaluated
    <run>/distill/<method>/             student.pt, metrics.json, report.md, plots (manifest)
    <run>/report/                       the whole pipeline's table (hetcomp demo)
    <run>/tensorboard/<name>/           training curves (TensorBoard event files)

Every URI of a run is computed here. Names that become path components (teachers, methods) are
checked when the config is loaded and again here, so that no name from a config can leave the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from hetcomp_dist import storage
from hetcomp_dist import config
from hetcomp_dist.config import ConfigError, Where, check_metric, check_name, check_ranges, check_unique, check_uri
from hetcomp_dist.data import formats
from hetcomp_dist.data import prepare as prep
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig


@dataclass
class DataConfig:
    source: str                      # registry name or raw path/URI
    protocol: str | None = None      # default: the source's
    seed: int = 0
    format: str | None = None

    def validate(self, where: Where) -> None:
        if not self.source.strip():
            raise where.at("source").error("must name a registered dataset or a path, got ''")
        if self.protocol is not None and self.protocol not in prep.PROTOCOLS:
            raise where.at("protocol").error(f"{self.protocol!r} is not one of {list(prep.PROTOCOLS)}")
        if self.format is not None and self.format not in formats.FORMATS:
            raise where.at("format").error(f"{self.format!r} is not one of {list(formats.FORMATS)}")
        check_ranges(self, where, ("seed >= 0",))


@dataclass
class StorageConfig:
    endpoint_url: str | None = None  # S3-compatible endpoint; default from AWS_ENDPOINT_URL(_S3)


@dataclass
class RayConfig:
    address: str | None = None       # None: join a running cluster if RAY_ADDRESS is set, else start locally
    max_restarts: int = 3            # teacher actors' restarts after a crash (each resumes from its checkpoint)
    num_cpus: int | None = None      # CPUs of a locally started Ray instance
    # The distillation on Ray Train (hetcomp distill --ray, jobs/distill.py):
    max_failures: int = 3            # worker-group restarts after a worker fails (each resumes from <out>/checkpoints)
    train_storage_path: str | None = None   # Ray Train's own run folder: s3://... or an absolute path every node
                                            # shares (None: Ray's default, ~/ray_results of the driver's node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # the workers' placement
                                            # group: PACK fills a node first, SPREAD puts them on different nodes

    def validate(self, where: Where) -> None:
        # -1: without limit (Ray's)
        check_ranges(self, where, ("max_restarts >= -1", "num_cpus >= 1", "max_failures >= -1"))
        if self.train_storage_path is not None:
            at = where.at("train_storage_path")
            check_uri(at, self.train_storage_path)
            path = self.train_storage_path.removeprefix("file://")
            if "://" not in path and not os.path.isabs(path):
                raise at.error(f"{self.train_storage_path!r} is a relative path; Ray Train needs an s3:// URI or an "
                               "absolute path on storage every node shares")


@dataclass
class RunConfig:
    run: str                         # run URI (path, file://, s3://)
    data: DataConfig
    teachers: list[TeacherConfig] = field(default_factory=list)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    eval_batch_size: int = 1024
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)   # the nightly refresh (hetcomp refresh)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run)

    @property
    def dataset_uri(self) -> str:
        return self.layout.dataset

    def teacher_names(self) -> list[str]:
        """The teachers the student distils: ``distill.teachers``, else every configured teacher."""
        return list(self.distill.teachers) or [t.name for t in self.teachers]

    def student_uri(self) -> str:
        return self.distill.out or self.layout.student(self.distill.method)

    def validate(self, where: Where) -> None:
        """The cross-section rules (each section has checked itself): ks, unique teachers, metrics' K in ks."""
        check_uri(where.at("run"), self.run)
        if not self.ks:
            raise where.at("ks").error("must list at least one cutoff")
        check_ranges(self, where, ("ks >= 1", "eval_batch_size >= 1"))
        check_unique(where.at("ks"), [str(k) for k in self.ks])
        check_unique(where.at("teachers"), [t.name for t in self.teachers])
        for i, t in enumerate(self.teachers):
            check_metric(where.at("teachers").at(i).at("select_metric"), t.select_metric, self.ks)
        check_metric(where.at("distill").at("select_metric"), self.distill.select_metric, self.ks)
        for i, metric in enumerate(self.refresh.gate.metrics):
            check_metric(where.at("refresh").at("gate").at("metrics").at(i), metric, self.ks)


class RunLayout:
    """Every location of a run, from its URI."""

    def __init__(self, run: str):
        self.run = str(run).rstrip("/")

    def _at(self, *parts: str) -> str:
        return storage.join(self.run, *parts)

    @property
    def dataset(self) -> str:
        return self._at("dataset")

    @property
    def teachers(self) -> str:
        """Every teacher's output: ``train-teachers`` holds this prefix's lease."""
        return self._at("teachers")

    def teacher(self, name: str) -> str:
        return storage.join(self.teachers, check_name(name, "teacher name"))

    def trajectory(self, name: str) -> str:
        return storage.join(self.teacher(name), "trajectory")

    def trajectories(self, names: list[str]) -> list[str]:
        return [self.trajectory(n) for n in names]

    def teacher_checkpoints(self, name: str) -> str:
        return storage.join(self.teacher(name), "checkpoints")

    @property
    def teachers_summary(self) -> str:
        return storage.join(self.teachers, "summary")

    @property
    def ensemble(self) -> str:
        return self._at("ensemble")

    def student(self, method: str) -> str:
        return self._at("distill", check_name(method, "distill.method"))

    @property
    def report(self) -> str:
        return self._at("report")

    def tensorboard(self, name: str) -> str:
        return self._at("tensorboard", check_name(name, "tensorboard run name"))


def load_run(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """A run config for an entry point: loaded strictly, checked for where it runs, storage configured."""
    cfg = config.load(RunConfig, path, list(overrides))
    check_outputs_outlive_the_job(cfg)
    configure_storage(cfg)
    return cfg


def check_outputs_outlive_the_job(cfg: RunConfig) -> None:
    """Under a Ray job (``ray job submit``) the driver's cwd is a temporary copy of the working dir:
    relative output paths would land there and be lost, so they are refused."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return
    for key, uri in (("run", cfg.run), ("distill.out", cfg.distill.out)):
        if uri and "://" not in uri and not os.path.isabs(uri):
            raise ConfigError(f"{key}: {uri!r} is a relative path; under a Ray job it would be written into the "
                              "job's temporary working directory and lost: use an s3:// URI or an absolute path "
                              "on storage every node shares")


def configure_storage(cfg: RunConfig) -> None:
    """Apply the run's storage settings to this process (each entry point calls it once)."""
    storage.configure(endpoint_url=cfg.storage.endpoint_url)


def ensure_dataset(cfg: RunConfig, progress: bool = True) -> str:
    """Prepare the run's dataset unless a complete one is already there; returns its URI.

    A complete one is reused only if it was prepared with the config's ``data`` settings (source, protocol,
    seed, format); otherwise a one-line StorageError names the stored and the asked settings (never reused
    silently, nor replaced under the run's teachers and students)."""
    uri, d = cfg.dataset_uri, cfg.data
    if storage.is_complete(uri):
        prep.check_settings(uri, d.source, d.protocol, d.format, d.seed)
    else:
        prep.prepare(d.source, uri, d.protocol, d.format, seed=d.seed, progress=progress)
    return uri
