"""The run config shared by the jobs, and the run layout under one URI.

    <run>/dataset/                   prepared dataset (hetcomp prepare)
    <run>/teachers/<name>/trajectory teacher trajectory (manifest written last)
    <run>/teachers/<name>/checkpoints/epoch-N
    <run>/teachers/summary/          all teachers' summaries (manifest)
    <run>/ensemble/                  each teacher's final snapshot and their ensemble, evaluated (hetcomp ensemble)
    <run>/distill/<method>/          student.pt, metrics.json, report.md, curves.png, stages.png (manifest)
    <run>/report/                    the whole pipeline's table (run_pipeline, hetcomp demo)

Each job reads the sections it needs; unknown keys anywhere are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetcomp_dist import storage
from hetcomp_dist.data import prepare as prep
from hetcomp_dist.distill.train import DistillConfig
from hetcomp_dist.teachers.train import TeacherConfig, TrajectoryConfig


@dataclass
class DataConfig:
    source: str                      # registry name or raw path/URI
    protocol: str | None = None      # default: the source's
    seed: int = 0
    format: str | None = None


@dataclass
class StorageConfig:
    endpoint_url: str | None = None  # S3-compatible endpoint; default from AWS_ENDPOINT_URL(_S3)


@dataclass
class RayConfig:
    address: str | None = None       # None: join a running cluster if RAY_ADDRESS is set, else start locally
    max_restarts: int = 3            # actor restarts after a crash (each resumes from its checkpoint)
    num_cpus: int | None = None      # CPUs of a locally started Ray instance


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

    @property
    def dataset_uri(self) -> str:
        return storage.join(self.run, "dataset")


def ensure_dataset(cfg: RunConfig, progress: bool = True) -> str:
    """Prepare the run's dataset unless a complete one is already there; returns its URI."""
    uri = cfg.dataset_uri
    if not storage.is_complete(uri):
        prep.prepare(cfg.data.source, uri, cfg.data.protocol, cfg.data.format, seed=cfg.data.seed, progress=progress)
    return uri


def distill_run(cfg: RunConfig, report=None) -> dict:
    """Distil the run's teachers into a student (single process); returns metrics.json's content."""
    from hetcomp_dist.distill.train import distill
    from hetcomp_dist.teachers.train import teacher_uri

    names = cfg.distill.teachers or [t.name for t in cfg.teachers]
    uris = [storage.join(teacher_uri(cfg.run, n), "trajectory") for n in names]
    out = cfg.distill.out or storage.join(cfg.run, "distill", cfg.distill.method)
    return distill(ensure_dataset(cfg), uris, cfg.distill, out, tuple(cfg.ks), report or (lambda e: None))


def run_pipeline(cfg: RunConfig, methods: tuple[str, ...] = ("bpr", "hetcomp"), log=print) -> dict:
    """The whole nightly pipeline on one machine: prepare, teachers (Ray actors), the ensemble, the students.

    Each stage reuses a complete output already in the run (so a rerun after a crash only fills the
    gaps) and times itself; ``<run>/report/`` gets report.md (one table: every teacher, the
    ensemble and each student on test) and results.json, with a manifest.
    """
    import dataclasses
    import time

    from hetcomp_dist.distill.ensemble_eval import evaluate_ensemble
    from hetcomp_dist.teachers.actors import train_teachers

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_dataset(cfg)
    seconds["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_teachers(cfg)
    seconds["teachers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ensemble = evaluate_ensemble(cfg)
    seconds["ensemble"] = time.perf_counter() - t0
    rows = {name: m["test"] for name, m in ensemble["models"].items()}

    for method in methods:
        t0 = time.perf_counter()
        out = storage.join(cfg.run, "distill", method)
        if not storage.is_complete(out):
            log(f"distilling: {method}")
            distill_run(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method=method, out=out)))
        rows[f"student ({method})"] = storage.read_json(out, "metrics.json")["test"]
        seconds[f"student ({method})"] = time.perf_counter() - t0

    report = _pipeline_report(cfg, rows, seconds, ensemble["temperature"])
    with storage.open_output(storage.join(cfg.run, "report"), kind="pipeline-report") as o:
        o.write_bytes("report.md", report.encode())
        o.write_json("results.json", {"test": rows, "seconds": seconds})
    log(report)
    return {"test": rows, "seconds": seconds}


def _pipeline_report(cfg: RunConfig, rows: dict, seconds: dict, temperature: float) -> str:
    ks = sorted(set(cfg.ks) | {50})
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + ["popularity_lift@50", "coverage@50"]
    lines = [f"# {cfg.data.source}: teachers, ensemble (rank importance exp(-r/{temperature:g})), students (test)", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.0f} |")
    return "\n".join(lines) + "\n"
