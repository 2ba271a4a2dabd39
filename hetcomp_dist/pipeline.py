"""The whole pipeline on one machine (hetcomp demo): prepare, teachers, ensemble, students, report."""

from __future__ import annotations

import dataclasses
import time

from hetcomp_dist import storage
from hetcomp_dist.distill.ensemble_eval import evaluate_ensemble
from hetcomp_dist.distill.train import distill
from hetcomp_dist.run import RunConfig, ensure_dataset
from hetcomp_dist.teachers.actors import train_teachers


def distill_run(cfg: RunConfig, report=None) -> dict:
    """Distil the run's teachers into a student (single process); returns metrics.json's content."""
    uris = cfg.layout.trajectories(cfg.teacher_names())
    return distill(ensure_dataset(cfg), uris, cfg.distill, cfg.student_uri(), tuple(cfg.ks), report or (lambda e: None))


def run_pipeline(cfg: RunConfig, methods: tuple[str, ...] = ("bpr", "hetcomp"), log=print) -> dict:
    """The whole nightly pipeline on one machine: prepare, teachers (Ray actors), the ensemble, the students.

    Each stage reuses a complete output already in the run (so a rerun after a crash only fills the
    gaps) and times itself; ``<run>/report/`` gets report.md (one table: every teacher, the
    ensemble and each student on test) and results.json, with a manifest.
    """
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
        out = cfg.layout.student(method)
        if not storage.is_complete(out):
            log(f"distilling: {method}")
            distill_run(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method=method, out=out)))
        rows[f"student ({method})"] = storage.read_json(out, "metrics.json")["test"]
        seconds[f"student ({method})"] = time.perf_counter() - t0

    report = _pipeline_report(cfg, rows, seconds, ensemble["temperature"])
    with storage.open_output(cfg.layout.report, kind="pipeline-report") as o:
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
