"""The nightly refresh as a Ray job on a real Ray head: `ray job submit ... -- python jobs/nightly_refresh.py`.

v0001 is refreshed in this process (no Ray: a production student to warm-start from); v0002 is submitted to
the head of tests/test_teachers_ray.py (`ray start --head --block` on loopback, 2 CPUs, its own temp dir and
HOME, stopped by signalling its own process): its two warm-started teachers train on Ray actors, its
warm-started student on 2 Ray Train workers resuming the grown production student. The run's lease has a
6 s TTL while each of those steps takes longer, so the promotion (which checks the lease) shows the driver
kept renewing it while actors and workers ran. Integration tier: one Ray head, one job.
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
from test_refresh_integration import FAST, load, timeline
from test_teachers_ray import ray_head  # noqa: F401  (the Ray head fixture)

pytestmark = pytest.mark.integration
TTL_S = 6
RAY = ["distill.workers=2", "distill.cpus_per_worker=0.5", f"refresh.lease_ttl_s={TTL_S}"]


def test_nightly_refresh_job_on_actors_and_ray_train(ray_head: dict[str, Any], datasets_dir: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    days = timeline(datasets_dir, tmp_path / "days", days=3)
    run = str(tmp_path / "run")
    layout = Layout(run)
    cfg, rcfg = load(run)
    assert job.refresh(cfg, rcfg, days[0], log=lambda m: None)["promote"]
    job_id = f"hetcomp-refresh-{uuid.uuid4().hex[:8]}"
    sets = [x for s in [f"run={run}", *FAST, *RAY] for x in ("--set", s)]
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", job_id,
         "--working-dir", ".", "--", "python", "jobs/nightly_refresh.py", "--config", "configs/refresh_tiny.yaml",
         *sets, "--owner", "nightly-ray-test", "--new-data", days[1]],
        env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=die_with_parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-8000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
    assert JobSubmissionClient(ray_head["dashboard"]).get_job_status(job_id) == JobStatus.SUCCEEDED
    report = storage.read_json(layout.report(2), "report.json")
    assert report["promote"], report["reasons"]
    for t in report["teachers"]:
        assert (t["status"], t["ran"], t["previous"]) == ("warm-started", "ray-actor", "v0001"), t
        assert t["actor_pids"] and t["epochs_trained"] >= 1, t
    assert len({p for t in report["teachers"] for p in t["actor_pids"]}) == 2      # one actor each
    student = report["student"]
    assert (student["status"], student["ran"], student["workers"]) == ("warm-started from v0001", "ray-train", 2)
    metrics = storage.read_json(layout.student(2), "metrics.json")
    assert metrics["workers"] == 2 and metrics["resumed_from"] == [0]          # every rank took the grown student
    text = storage.read_bytes(layout.report(2), "report.md").decode()
    assert "on a Ray actor (pid" in text and "on Ray Train (2 workers)" in text
    # The lease outlived its TTL several times over inside single steps: renewed while actors and workers ran.
    seconds = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[(teachers|student)\] ([0-9.]+) s", log)}
    assert min(seconds.values()) > TTL_S and len(seconds) == 2, seconds
    pointer = promote.read_current(layout)
    assert (pointer["version"], pointer["lease_owner"]) == ("v0002", "nightly-ray-test")
    assert [h["version"] for h in promote.history(layout)] == ["v0001", "v0002"]
    assert not storage.exists(layout.lease + ".lease")                          # released at the end
    user = Path(days[1]).read_text().splitlines()[1].split(",")[0]                 # a user of the day's data
    out = subprocess.run([str(VENV_BIN / "hetcomp"), "recommend", "--run", run, "--user", user, "--k", "5", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    recs = json.loads(out.stdout)
    assert recs["version"] == "v0002" and len(recs["items"]) == 5
