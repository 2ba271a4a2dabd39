"""Four nightly refreshes as Ray jobs on a real Ray head: `ray job submit ... -- python jobs/nightly_refresh.py`.

MovieLens-100K split by time into 5 files (tests/test_refresh_integration.py's ``timeline``): v0001 is refreshed
in this process from the first (no Ray: a production student to warm-start from); each of the 4 others is one
night, submitted as a Ray job to the head of tests/test_teachers_ray.py (`ray start --head --block` on loopback,
2 CPUs, its own temp dir and HOME, stopped by signalling its own process). Every night: the job's status and
exit code, report.json's decision, where ``current`` points, a promotion history that grows only on promotion,
the lineage, and that the teachers trained on Ray actors and the student on 2 Ray Train workers. The first
night also shows the warm-started student resumed on every rank and, with a 6 s lease TTL while its teachers
and student steps each take longer, that the driver kept renewing the lease while actors and workers ran (the
promotion checks it).

Night 2 (v0003) is a degraded candidate (from scratch with a vanishing learning rate and a strict gate, as in
test_degraded_candidate_and_failed_teacher): the gate refuses it, the job fails with the documented exit
status 1, ``current`` stays at v0002 and the report gives the reasons. Night 3 warm-starts from v0002, still
production, and promotes; night 4 promotes. At the end `hetcomp rollback` moves ``current`` from v0005 back to
v0004, whose export manifest is byte-identical to what ``current`` led to while v0004 was production, and
`hetcomp recommend` reads v0004. Integration tier: one Ray head, four jobs, the FAST settings of the CLI week.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from hetcomp_dist import storage
from hetcomp_dist.refresh import job, promote
from hetcomp_dist.refresh.layout import Layout
from procs import REPO, VENV_BIN, die_with_parent
from test_refresh_integration import FAST, current_bytes, current_bytes_of, load, timeline
from test_teachers_ray import ray_head  # noqa: F401  (the Ray head fixture)

pytestmark = pytest.mark.integration
TTL_S = 6
RAY = ["distill.workers=2", "distill.cpus_per_worker=0.5", f"refresh.lease_ttl_s={TTL_S}"]
NIGHTS = 4
DEGRADED = 2        # days[2] -> v0003: learns nothing, refused by the gate
BAD = ["refresh.warm_start=false", "distill.lr=0.000000000001", "refresh.gate.tolerance=0.05"]
CONFIG = "configs/refresh_tiny.yaml"


def _submit(ray_head: dict[str, Any], run: str, day: str, extra: list[str]) -> tuple[str, subprocess.CompletedProcess]:
    job_id = f"hetcomp-refresh-{uuid.uuid4().hex[:8]}"
    sets = [x for s in [f"run={run}", *FAST, *RAY, *extra] for x in ("--set", s)]
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", job_id,
         "--working-dir", ".", "--", "python", "jobs/nightly_refresh.py", "--config", CONFIG,
         *sets, "--owner", "nightly-ray-test", "--new-data", day],
        env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=die_with_parent)
    return job_id, proc


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "hetcomp"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_nightly_refresh_jobs(ray_head: dict[str, Any], datasets_dir: Path,  # noqa: F811
                              tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"])
    days = timeline(datasets_dir, tmp_path / "days", days=NIGHTS + 1)
    run = str(tmp_path / "run")
    layout = Layout(run)
    cfg, rcfg = load(run)
    assert job.refresh(cfg, rcfg, days[0], log=lambda m: None)["promote"]
    manifests = {"v0001": current_bytes(layout)}        # what current led to while each version was production
    for night in range(1, NIGHTS + 1):
        version, previous = f"v{night + 1:04d}", f"v{night:04d}"
        production = promote.read_current(layout)["version"]
        before = len(promote.history(layout))
        degraded = night == DEGRADED
        job_id, proc = _submit(ray_head, run, days[night], BAD if degraded else [])
        log = proc.stdout + proc.stderr
        where = f"night {night} ({version}):\n" + proc.stdout[-8000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
        info = client.get_job_info(job_id)
        report = storage.read_json(layout.report(night + 1), "report.json")
        text = storage.read_bytes(layout.report(night + 1), "report.md").decode()
        assert report["version"] == version and report["lineage"]["extends"] == previous, where
        if degraded:       # refused by the gate: exit status 1 (jobs/nightly_refresh.py), current stays
            assert proc.returncode == 1 and info.status == JobStatus.FAILED, where
            assert "exit code 1" in (info.message or ""), info.message
            assert f"{version}: not promoted" in log, where
            assert not report["promote"] and any("candidate" in r and "<" in r for r in report["reasons"]), report
            assert "NOT promoted" in text and "## Gate" in text
            assert promote.read_current(layout)["version"] == production == previous
            assert current_bytes(layout) == manifests[production]
            assert len(promote.history(layout)) == before
        else:
            assert proc.returncode == 0 and info.status == JobStatus.SUCCEEDED, where
            assert report["promote"], report["reasons"]
            pointer = promote.read_current(layout)
            assert (pointer["version"], pointer["lease_owner"]) == (version, "nightly-ray-test")
            assert pointer["previous"]["version"] == production
            assert [h["version"] for h in promote.history(layout)][before:] == [version]
            manifests[version] = current_bytes(layout)
        # Teachers on Ray actors (one each), the student on Ray Train with 2 workers, every night.
        for t in report["teachers"]:
            assert t["ran"] == "ray-actor" and t["actor_pids"] and t["previous"] == previous, t
            assert t["status"] == ("trained from scratch" if degraded else "warm-started"), t
        assert len({p for t in report["teachers"] for p in t["actor_pids"]}) == 2      # one actor each
        student = report["student"]
        status = "distilled from scratch" if degraded else f"warm-started from {production}"
        assert (student["status"], student["ran"], student["workers"]) == (status, "ray-train", 2), student
        assert storage.read_json(layout.student(night + 1), "metrics.json")["workers"] == 2
        assert "on a Ray actor (pid" in text and "on Ray Train (2 workers)" in text
        assert not storage.exists(layout.lease + ".lease")                      # released at the end
        if night == 1:
            for t in report["teachers"]:
                assert t["epochs_trained"] >= 1, t
            metrics = storage.read_json(layout.student(2), "metrics.json")
            assert metrics["resumed_from"] == [0]                              # every rank took the grown student
            # The lease outlived its TTL several times over inside single steps: renewed while actors and
            # workers ran.
            seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[(teachers|student)\] ([0-9.]+) s", log)}
            assert min(seconds.values()) > TTL_S and len(seconds) == 2, seconds
        if night == DEGRADED + 1:       # the night after the refused one continued from production, not from it
            assert production == f"v{DEGRADED:04d}" and student["status"] == f"warm-started from {production}"
    promoted = [h["version"] for h in promote.history(layout)]
    assert promoted == [f"v{n:04d}" for n in range(1, NIGHTS + 2) if n != DEGRADED + 1]
    # Rollback (the CLI): current goes back to the night before the last, exactly the export it led to while
    # that version was production.
    last, back = f"v{NIGHTS + 1:04d}", f"v{NIGHTS:04d}"
    out = _cli("rollback", "--config", str(REPO / CONFIG), "--set", f"run={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"current -> {back} (rollback from {last}" in out.stdout, out.stdout
    pointer = promote.read_current(layout)
    assert (pointer["version"], pointer["action"], pointer["previous"]["version"]) == (back, "rollback", last)
    assert current_bytes(layout) == manifests[back] == current_bytes_of(layout, back)
    assert [h["version"] for h in promote.history(layout)] == [*promoted, back]
    user = Path(days[NIGHTS - 1]).read_text().splitlines()[1].split(",")[0]     # a user of that version's data
    out = _cli("recommend", "--run", run, "--user", user, "--k", "5", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    recs = json.loads(out.stdout)
    assert recs["version"] == back and len(recs["items"]) == 5
