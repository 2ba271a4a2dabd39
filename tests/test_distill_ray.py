"""`hetcomp distill --ray` (jobs/distill.py): Ray Train, 2 workers, against the one-process loop.

Integration tier: each test runs the CLI in a subprocess that starts its own local Ray instance
(own HOME and RAY_TMPDIR, no connection/auth settings inherited), on the synthetic dataset and
hand-made trajectories of tests/test_distill.py, copied into the run layout.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hetcomp_dist import storage
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.train import distill
from test_distill import K, run  # noqa: F401  (the synthetic dataset + trajectories fixture)
from procs import REPO, VENV_BIN, die_with_parent, run_with_local_ray
from test_teachers_ray import ray_head  # noqa: F401  (the Ray head fixture)

pytestmark = pytest.mark.integration

DISTILL = dict(method="hetcomp", teachers=["t0", "t1"], dim=8, lr=0.05, max_epochs=30, eval_every=5, patience=20,
               batch_size=64, threads=1, target_size=K, select_metric="recall@10")


@pytest.fixture(scope="module")
def ray_run(run):  # noqa: F811
    """(run URI in the pipeline layout, the one-process metrics for DISTILL)."""
    ds_uri, uris, root = run
    layout = root / "run"
    if not layout.exists():
        shutil.copytree(ds_uri, layout / "dataset")
        for t, uri in enumerate(uris):
            shutil.copytree(uri, layout / "teachers" / f"t{t}" / "trajectory")
    single = distill(ds_uri, uris, DistillConfig(**DISTILL), str(root / "single"), ks=(10, 20))
    return layout, single


def _config(tmp_path: Path, run_dir: Path, out: str, workers: int, cpus: float = 1) -> Path:
    cfg = {"run": str(run_dir), "data": {"source": str(run_dir.parent / "log.parquet")}, "ks": [10, 20],  # its dataset's
           "distill": {**DISTILL, "workers": workers, "cpus_per_worker": cpus, "out": out},
           "ray": {"max_restarts": 2, "num_cpus": 4}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(tmp_path: Path, run_dir: Path, out: str, workers: int, **env: str) -> subprocess.CompletedProcess:
    path = _config(tmp_path, run_dir, out, workers)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    proc = run_with_local_ray([str(VENV_BIN / "python"), str(REPO / "jobs" / "distill.py"), "--config", str(path)],
                              cwd=tmp_path, timeout=500, HOME=str(home), **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _same_metrics(a: dict, b: dict, tol: float = 0.02) -> None:
    for split in ("test", "valid"):
        for key in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
            assert abs(a[split][key] - b[split][key]) <= tol, (split, key, a[split][key], b[split][key])


def test_two_workers_match_one_process(ray_run, tmp_path: Path) -> None:
    run_dir, single = ray_run
    out = str(tmp_path / "out")
    proc = _run_cli(tmp_path, run_dir, out, workers=2)
    assert "student (hetcomp): test " in proc.stdout and "recall@10" in proc.stdout
    metrics = storage.read_json(out, "metrics.json")
    assert metrics["workers"] == 2 and metrics["resumed_from"] == []
    assert set(storage.read_manifest(out)["parts"]) == {"student.pt", "metrics.json", "report.md", "curves.png", "stages.png"}
    assert not Path(out, "checkpoints").exists()  # removed once the outputs are written
    _same_metrics(metrics, single)
    assert metrics["test"]["n_users"] == single["test"]["n_users"]
    assert [p["final_fraction"] for p in metrics["dkc_progress"]] == \
        pytest.approx([p["final_fraction"] for p in single["dkc_progress"]])


def test_killed_worker_resumes_from_checkpoint(ray_run, tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself after the epoch-10 checkpoint; Ray Train restarts the group, which resumes."""
    run_dir, single = ray_run
    out, marker = str(tmp_path / "out"), tmp_path / "killed"
    path = _config(tmp_path, run_dir, out, workers=2)
    script = ("import sys; from hetcomp_dist import config; from hetcomp_dist.run import RunConfig; "
              "from hetcomp_dist.distill.ray_job import distill_ray; from faults import KillOnce; "
              f"distill_ray(config.load(RunConfig, {str(path)!r}), hooks=[KillOnce(10, {str(marker)!r})])")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    proc = run_with_local_ray([str(VENV_BIN / "python"), "-c", script], cwd=tmp_path, timeout=500, HOME=str(home),
                              PYTHONPATH=str(REPO / "tests"))   # the workers import the hook from tests/faults.py
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert marker.exists(), "the fault hook did not fire"
    metrics = storage.read_json(out, "metrics.json")
    assert metrics["resumed_from"] == [10]
    assert [h["epoch"] for h in metrics["history"]] == list(range(5, DISTILL["max_epochs"] + 1, 5))
    _same_metrics(metrics, single)


def test_ray_job_submit(ray_head, ray_run, tmp_path: Path) -> None:  # noqa: F811
    """The documented `ray job submit --working-dir . -- python jobs/distill.py` against a real 2-CPU head."""
    run_dir, single = ray_run
    out = str(tmp_path / "out")
    path = _config(tmp_path, run_dir, out, workers=2, cpus=0.5)
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
         "python", "jobs/distill.py", "--config", str(path)],
        env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=500, preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "student (hetcomp): test " in proc.stdout  # the job's log streams back to the submitter
    metrics = storage.read_json(out, "metrics.json")
    assert metrics["workers"] == 2
    _same_metrics(metrics, single)
