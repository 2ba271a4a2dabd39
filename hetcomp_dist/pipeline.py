"""The whole pipeline on one machine (hetcomp demo): prepare, teachers, ensemble, students, report."""

from __future__ import annotations

import dataclasses
import io
import json
import time

from hetcomp_dist import device, lineage, storage
from hetcomp_dist.distill.ensemble_eval import evaluate_ensemble
from hetcomp_dist.distill.train import distill
from hetcomp_dist.progress import Progress, TeacherProgress
from hetcomp_dist.run import RunConfig, ensure_dataset
from hetcomp_dist.teachers.actors import train_teachers


def distill_run(cfg: RunConfig, report=None) -> dict:
    """Distil the run's teachers into a student (single process); returns metrics.json's content.

    Under the output's lease, refusing trajectories of another dataset, with the dataset's identity in the
    student's manifests (lineage.student_output)."""
    device.resolve(cfg.distill.device, "distill.device")     # a device this host lacks: refused before any work
    uris = cfg.layout.trajectories(cfg.teacher_names())
    dataset_uri, out = ensure_dataset(cfg), cfg.student_uri()
    with lineage.student_output(out, dataset_uri, uris):
        return distill(dataset_uri, uris, cfg.distill, out, tuple(cfg.ks), report or (lambda e: None))


def run_pipeline(cfg: RunConfig, methods: tuple[str, ...] = ("bpr", "hetcomp"), log=print,
                 log_format: str = "text") -> dict:
    """The whole nightly pipeline on one machine: prepare, teachers (Ray actors), the ensemble, the students.

    Each stage reuses a complete output already in the run (so a rerun after a crash only fills the
    gaps) and times itself; ``<run>/report/`` gets report.md (one table: every teacher, the
    ensemble and each student on test), results.json and report.png, with a manifest.
    """
    stages = ["prepare", "teachers", "ensemble", *(f"student ({m})" for m in methods)]
    seconds: dict[str, float] = {}

    def stage(name: str) -> float:
        if log_format == "json":
            log(json.dumps({"event": "stage", "stage": name, "index": stages.index(name) + 1, "of": len(stages)}))
        else:
            log(f"\n== [{stages.index(name) + 1}/{len(stages)}] {name} ==")
        return time.perf_counter()

    device.resolve(cfg.distill.device, "distill.device")     # the students run here: refused before any work
    t0 = stage("prepare")
    ensure_dataset(cfg)
    seconds["prepare"] = time.perf_counter() - t0
    t0 = stage("teachers")
    teachers = TeacherProgress(cfg.teachers, cfg.layout.tensorboard, log_format)
    try:
        train_teachers(cfg, report=teachers)
    finally:
        teachers.close()
    seconds["teachers"] = time.perf_counter() - t0
    t0 = stage("ensemble")
    ensemble = evaluate_ensemble(cfg)
    seconds["ensemble"] = time.perf_counter() - t0
    rows = {name: m["test"] for name, m in ensemble["models"].items()}
    for method in methods:
        t0 = stage(f"student ({method})")
        if log_format == "text" and not _reusable(cfg.layout.student(method), cfg.dataset_uri):
            log(f"distilling: {method}")
        rows[f"student ({method})"] = _student(cfg, method, log_format)["test"]
        seconds[f"student ({method})"] = time.perf_counter() - t0
    report = _pipeline_report(cfg, rows, seconds, ensemble["temperature"])
    with storage.open_output(cfg.layout.report, kind="pipeline-report") as o:
        o.write_bytes("report.md", report.encode())
        o.write_json("results.json", {"test": rows, "seconds": seconds})
        o.write_bytes("report.png", _bars_png(rows, cfg.data.source))
    log(report)
    return {"test": rows, "seconds": seconds}


def _student(cfg: RunConfig, method: str, log_format: str) -> dict:
    """The run's student of ``method``: reused when complete and distilled from this dataset, else distilled
    (with progress lines)."""
    out = cfg.layout.student(method)
    if not _reusable(out, cfg.dataset_uri):
        d = dataclasses.replace(cfg.distill, method=method, out=out)
        progress = Progress(f"student {method}", d.max_epochs, d.select_metric, log_format,
                            cfg.layout.tensorboard(f"student-{method}"))
        try:
            distill_run(dataclasses.replace(cfg, distill=d), progress)
        finally:
            progress.close()
    return storage.read_json(out, "metrics.json")


def _reusable(out: str, dataset_uri: str) -> bool:
    return storage.is_complete(out) and lineage.same(storage.read_manifest(out).get(lineage.KEY),
                                                     lineage.dataset_identity(dataset_uri))


def _bars_png(rows: dict, title: str, metric: str = "recall@50") -> bytes:
    """Test ``metric`` of every teacher, the ensemble and each student, as one bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in rows if metric in rows[n]]
    colours = ["C0" if n.startswith("student") else "0.35" if n == "ensemble" else "0.7" for n in names]
    fig = Figure(figsize=(1.0 + 0.8 * len(names), 3.6), dpi=110)
    ax = fig.add_subplot()
    ax.bar(names, [rows[n][metric] for n in names], color=colours)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{title}: teachers, their ensemble and the students")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _pipeline_report(cfg: RunConfig, rows: dict, seconds: dict, temperature: float) -> str:
    ks = sorted(set(cfg.ks) | {50})
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + ["popularity_lift@50", "coverage@50"]
    lines = [f"# {cfg.data.source}: teachers, ensemble (rank importance exp(-r/{temperature:g})), students (test)", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.0f} |")
    lines += ["", "![test recall@50 of the teachers, their ensemble and the students](report.png)"]
    return "\n".join(lines) + "\n"
