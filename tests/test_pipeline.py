"""`hetcomp demo --config` (the whole pipeline) on the tiny config: Ray teachers, the ensemble, two students."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hetcomp_dist import config, storage
from hetcomp_dist.run import RunConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_pipeline_end_to_end_and_rerun_reuses(tmp_path: Path, datasets_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["run"] = str(tmp_path / "run")
    data["distill"] = {"dim": 8, "lr": 0.01, "batch_unit": "users", "batch_size": 256, "eval_every": 2,
                       "max_epochs": 6, "threads": 1, "select_metric": "recall@20"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(RunConfig, path)

    # In a subprocess (the `hetcomp demo` command itself): the run starts and stops its own local Ray
    # instance, which must not leave state in the test process that later Ray tests share.
    env = {**os.environ, "HETCOMP_DATASETS_DIR": str(datasets_dir)}
    first = subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", "demo", "--config", str(path)],
                           capture_output=True, text=True, env=env, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    result = storage.read_json(storage.join(cfg.run, "report"), "results.json")
    names = ["bpr_mf", "lightgcn", "multvae", "ensemble", "student (bpr)", "student (hetcomp)"]
    assert sorted(result["test"]) == sorted(names)      # results.json is written with sorted keys
    for name in names:
        assert 0 < result["test"][name]["recall@50"] <= 1
    report = storage.read_bytes(storage.join(cfg.run, "report"), "report.md").decode()
    for name in names:
        assert f"| {name} | " in report
    assert {"prepare", "teachers", "ensemble", "student (hetcomp)"} <= set(result["seconds"])
    assert storage.read_bytes(storage.join(cfg.run, "report"), "report.png")[:4] == b"\x89PNG"
    assert "== [2/5] teachers ==" in first.stdout                     # stage headers for a person
    assert "distilling: hetcomp" in first.stdout and f"run written to {cfg.run}" in first.stdout

    again = subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", "demo", "--config", str(path)],
                           capture_output=True, text=True, env=env, timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    # everything is there: nothing is retrained, and the same table comes back
    assert "distilling" not in again.stdout and "] epoch" not in again.stdout
    assert storage.read_json(storage.join(cfg.run, "report"), "results.json")["test"] == result["test"]

    # the bench scripts that read a finished run still run against it (a refactor once broke one unnoticed)
    targets = subprocess.run([sys.executable, str(REPO / "bench" / "bench_targets.py"), "--config", str(path),
                              "--users", "400", "--rules", "consensus:1", "contested:1", "popularity:0.25"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert targets.returncode == 0, targets.stderr[-3000:]
    table = [line for line in targets.stdout.splitlines() if line.startswith("| ") and "rule" not in line]
    assert [line.split(" | ")[0] for line in table] == ["| none", "| consensus", "| contested", "| popularity"]
    inference = subprocess.run([sys.executable, str(REPO / "bench" / "bench_inference.py"), "--config", str(path),
                                "--users", "200", "--repeat", "1", "--out", str(tmp_path / "compare")],
                               capture_output=True, text=True, env=env, timeout=600)
    assert inference.returncode == 0, inference.stderr[-3000:]
    assert "| parameters |" in (tmp_path / "compare" / "inference.md").read_text()
    # `hetcomp compare` without sweep flags is the demo's two students: both reused, the serving cost joined
    compare = subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", "compare", "--config", str(path), "--out",
                              str(tmp_path / "compare"), "--results-doc", str(tmp_path / "results" / "tiny.md")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "bpr (student alone): reused" in compare.stdout and "HetComp: reused" in compare.stdout
    assert "] epoch" not in compare.stdout
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "| bpr (student alone) |" in report and "| **HetComp** |" in report and "| parameters |" in report
    assert "| **HetComp** |" in (tmp_path / "results" / "tiny.md").read_text()
