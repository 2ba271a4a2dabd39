"""What long commands show: readable lines or JSON lines, and TensorBoard event files under the run."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hetcomp_dist.progress import Progress, TeacherProgress
from hetcomp_dist.teachers.config import TeacherConfig

EVENT = {"event": "epoch", "epoch": 10, "loss": 1.5, "phase": "L_O", "epoch_seconds": 2.0, "valid": 0.1234,
         "best": 0.1300, "best_epoch": 5}


def test_student_progress_lines_json_and_tensorboard(tmp_path: Path):
    out = io.StringIO()
    progress = Progress("student hetcomp", 100, "recall@50", tensorboard=str(tmp_path / "tb"), stream=out)
    progress({"event": "epoch", "epoch": 9, "loss": 1.6, "epoch_seconds": 2.0})     # no evaluation: no line
    progress(EVENT)
    progress.close()
    line = out.getvalue().strip()
    assert line.startswith("[student hetcomp] epoch   10/100  L_O  loss 1.5  valid recall@50 0.1234  best 0.1300 @ 5")
    assert "at most 3m00s left" in line                                    # 90 epochs x 2 s
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    out = io.StringIO()
    Progress("s", 100, "recall@50", "json", stream=out)(EVENT)
    assert json.loads(out.getvalue())["valid"] == 0.1234


def test_teacher_progress_json_and_one_board_per_teacher(tmp_path: Path):
    teachers = [TeacherConfig(name="MF", model="bpr_mf", select_metric="recall@20")]
    out = io.StringIO()
    progress = TeacherProgress(teachers, lambda name: str(tmp_path / name), "json", stream=out)
    progress({**EVENT, "teacher": "MF"})
    progress({"teacher": "MF", "event": "done", "best_epoch": 5, "valid": {"recall@20": 0.2}})
    progress.close()
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["epoch", "done"]
    assert list((tmp_path / "teacher-MF").glob("events.out.tfevents.*"))
