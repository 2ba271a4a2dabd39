"""The nightly refresh end to end on MovieLens-100K split by time (tiny teachers, few epochs): a week of
refreshes, a degraded candidate, a failed teacher, rollback, concurrent refreshes and kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetcomp_dist import storage
from hetcomp_dist.benchutil import time_slices
from hetcomp_dist.refresh import grow, job, loading, promote
from hetcomp_dist.refresh.layout import Layout

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
FAST = ["distill.max_epochs=10", "refresh.student_epochs=5", "refresh.teacher_epochs=2", "refresh.gate.tolerance=0.5"]


def timeline(datasets_dir: Path, out: Path, days: int = 7, start: float = 0.7) -> list[str]:
    """MovieLens-100K by time: the first ``start`` of the rows, then ``days`` equal slices of the rest (CSV)."""
    return time_slices(datasets_dir / "ml-100k" / "ml-100k.inter", out, days, start)


def load(run: str, extra=()):
    return loading.load(REPO / "configs" / "refresh_tiny.yaml", [f"run={run}", *FAST, *extra])


def current_bytes(layout: Layout) -> bytes:
    pointer = promote.read_current(layout)          # verified: the export's manifest matches the pointer
    fs, path = storage.filesystem(storage.join(pointer["export"], storage.MANIFEST))
    return fs.cat_file(path)


def test_a_week_of_refreshes(storage_root, datasets_dir, tmp_path):
    days = timeline(datasets_dir, tmp_path / "days", days=7 if not storage_root.startswith("s3://") else 2)
    cfg, rcfg = load(storage_root)
    layout = Layout(storage_root)
    reports = []
    for day in days:
        reports.append(job.refresh(cfg, rcfg, day, log=lambda m: None))
        assert storage.is_complete(layout.report(len(reports)))
        promote.read_current(layout)                     # always a valid pointer
    assert reports[0]["promote"] and sum(r["promote"] for r in reports[1:]) >= 1, [r["reasons"] for r in reports]
    assert all(t["status"] == "warm-started" for r in reports[1:] for t in r["teachers"])
    assert all(r["student"]["status"].startswith("warm-started") for r in reports[1:])
    lineage = [r["lineage"] for r in reports]
    assert [x["extends"] for x in lineage] == [None] + [x["version"] for x in lineage[:-1]]
    promoted = [r["version"] for r in reports if r["promote"]]
    history = promote.history(layout)
    assert [h["version"] for h in history] == promoted
    # Rollback restores exactly the previous export (byte-identical manifest).
    before_last = current_bytes_of(layout, promoted[-2])
    pointer = job.rollback(cfg, rcfg, None)
    assert pointer["version"] == promoted[-2] and current_bytes(layout) == before_last
    assert len(promote.history(layout)) == len(history) + 1


def current_bytes_of(layout: Layout, version: str) -> bytes:
    from hetcomp_dist.refresh.layout import version_number
    fs, path = storage.filesystem(storage.join(layout.export(version_number(version)), storage.MANIFEST))
    return fs.cat_file(path)


def test_degraded_candidate_and_failed_teacher(tmp_path, datasets_dir, monkeypatch):
    days = timeline(datasets_dir, tmp_path / "days", days=3)
    run = str(tmp_path / "run")
    layout = Layout(run)
    cfg, rcfg = load(run)
    assert job.refresh(cfg, rcfg, days[0], log=lambda m: None)["promote"]
    pointer = current_bytes(layout)
    # A candidate that learnt nothing (from scratch, a vanishing learning rate) is refused; current stays.
    bad_cfg, bad_rcfg = load(run, ["refresh.warm_start=false", "distill.lr=0.000000000001", "refresh.gate.tolerance=0.05"])
    report = job.refresh(bad_cfg, bad_rcfg, days[1], log=lambda m: None)
    assert not report["promote"] and any("candidate" in r and "<" in r for r in report["reasons"])
    assert current_bytes(layout) == pointer and len(promote.history(layout)) == 1
    assert "NOT promoted" in storage.read_bytes(layout.report(2), "report.md").decode()
    # A teacher that fails keeps the previous version's trajectory; the report says so.
    real = grow.warm_teacher

    def broken(cfg_t, *args, **kwargs):
        if cfg_t.name == "lightgcn":
            raise RuntimeError("injected teacher failure")
        return real(cfg_t, *args, **kwargs)

    monkeypatch.setattr(grow, "warm_teacher", broken)
    report = job.refresh(cfg, rcfg, days[2], log=lambda m: None)
    status = {t["name"]: t["status"] for t in report["teachers"]}
    assert status["lightgcn"] == "failed: kept v0002's trajectory" and status["bpr_mf"] == "warm-started"
    carried = storage.read_manifest(layout.trajectory(3, "lightgcn"))
    assert carried["carried_from"] == layout.trajectory(2, "lightgcn")
    assert carried["n_users"] == storage.read_json(layout.data(3), "meta.json")["n_users"]
    assert storage.is_complete(layout.student(3))


def _cli(run: str, day: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "hetcomp_dist.cli", "refresh", "--config", str(REPO / "configs" / "refresh_tiny.yaml"),
            "--set", f"run={run}", *[x for s in FAST for x in ("--set", s)], *extra, "--new-data", day]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_concurrent_refreshes_one_promotes(tmp_path, datasets_dir):
    days = timeline(datasets_dir, tmp_path / "days", days=3)
    run = str(tmp_path / "run")
    layout = Layout(run)
    for trial, day in enumerate(days):
        before = len(promote.history(layout))
        procs = [_cli(run, day, "--owner", f"p{k}") for k in range(2)]
        outs = [(p.wait(timeout=600), p.communicate()) for p in procs]
        codes = sorted(rc for rc, _ in outs)
        assert codes[0] in (0, 1) and codes[1] in (2, 3), outs                   # one ran, one was refused
        assert len(promote.history(layout)) - before == (1 if codes[0] == 0 else 0)
        promote.read_current(layout) if trial or codes[0] == 0 else None


def test_kill_9_leaves_current_valid(tmp_path, datasets_dir):
    days = timeline(datasets_dir, tmp_path / "days", days=3)
    run = str(tmp_path / "run")
    layout = Layout(run)
    ttl = ["--set", "refresh.lease_ttl_s=3"]
    assert _cli(run, days[0], *ttl).wait(timeout=600) == 0
    rng = random.Random(1)
    for day in days[1:]:
        valid_before = current_bytes(layout)
        proc = _cli(run, day, *ttl)
        time.sleep(rng.uniform(2.0, 14.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        after = current_bytes(layout)                                       # valid, complete, verified
        assert after == valid_before or promote.read_current(layout)["version"] == f"v{len(layout.data_versions()):04d}"
        time.sleep(3.5)                                                     # the dead refresh's lease expires
        finished = storage.is_complete(layout.report(len(layout.data_versions())))   # the killed one had finished
        retry = _cli(run, day, *ttl)                                       # the retry continues or refuses a repeat
        out, err = retry.communicate(timeout=600)
        rc = retry.returncode
        assert rc in (0, 1) or (rc == 2 and finished and "repeat rows" in err), (rc, finished, out[-2000:], err[-2000:])
        promote.read_current(layout)
