"""The whole pipeline (hetcomp demo's body) on the tiny config: Ray teachers, the ensemble, two students."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hetcomp_dist import config, storage
from hetcomp_dist.pipeline import RunConfig, run_pipeline

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

    logs: list[str] = []
    result = run_pipeline(cfg, log=logs.append)
    names = ["bpr_mf", "lightgcn", "multvae", "ensemble", "student (bpr)", "student (hetcomp)"]
    assert list(result["test"]) == names
    for name in names:
        assert 0 < result["test"][name]["recall@50"] <= 1
    report = storage.read_bytes(storage.join(cfg.run, "report"), "report.md").decode()
    for name in names:
        assert f"| {name} | " in report
    assert storage.read_json(storage.join(cfg.run, "report"), "results.json")["test"] == result["test"]
    assert {"prepare", "teachers", "ensemble", "student (hetcomp)"} <= set(result["seconds"])
    assert "distilling: hetcomp" in logs

    logs.clear()
    again = run_pipeline(cfg, log=logs.append)                 # everything is there: nothing is retrained
    assert again["test"] == result["test"] and not any(line.startswith("distilling") for line in logs)
