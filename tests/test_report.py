"""The distillation report: report.md tables and the two PNG plots, rendered from a metrics dict."""

from __future__ import annotations

import struct

from hetcomp_dist.distill.report import render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _split(recall: float, n_users: int = 40) -> dict:
    out = {}
    for k in (10, 50):
        out.update({f"recall@{k}": recall * k / 50, f"ndcg@{k}": recall / 2, f"popularity_lift@{k}": 12.5 + k,
                    f"arp@{k}": 30.0 + k, f"coverage@{k}": k / 100})
    out["n_users"] = n_users
    return out


def _metrics(progress: bool = True) -> dict:
    history = [{"epoch": e, "valid": {"recall@10": 0.01 * e / 10, "recall@50": 0.02 * e / 10 if e != 40 else 0.05},
                "loss": 100.0 / e, "phase": "L_O" if e <= 20 else "L_R"} for e in (10, 20, 30, 40)]
    dkc = [{"epoch": 10, "mean_stage": [0.0, 0.0], "final_fraction": 0.0},
           {"epoch": 20, "mean_stage": [1.5, 2.0], "final_fraction": 0.25},
           {"epoch": 30, "mean_stage": [3.0, 3.0], "final_fraction": 1.0}]
    return {"method": "hetcomp", "best_epoch": 30, "epochs": 40, "train_seconds": 12.3,
            "test": _split(0.4), "valid": _split(0.3), "history": history,
            "dkc_progress": dkc if progress else [], "teachers": ["runs/x/teachers/MF/trajectory", "s3://b/r/teachers/GNN/trajectory"],
            "workers": 1, "resumed_from": [], "state_bytes": 3 * 2**20}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_files_and_png_images():
    files = render(_metrics())
    assert set(files) == {"report.md", "curves.png", "stages.png"}
    for name in ("curves.png", "stages.png"):
        width, height = _png_size(files[name])
        assert width >= 400 and height >= 300
        assert files[name].endswith(b"IEND\xaeB`\x82")


def test_report_tables():
    md = render(_metrics(), "recall@50")["report.md"].decode()
    lines = md.splitlines()
    assert lines[0] == "# Student (hetcomp)"
    assert "- best epoch 30 of 40 (selected on valid recall@50 = 0.0600), 12 s of training, 1 worker(s)" in lines
    assert "- teachers: MF, GNN" in lines
    assert "- per-user distillation state: 3.0 MiB" in lines
    # test and valid tables: one row per metric, one column per K
    test_at = lines.index("## Test (40 users)")
    valid_at = lines.index("## Valid (40 users)")
    assert test_at < valid_at
    assert lines[test_at + 2] == "| metric | @10 | @50 |"
    assert lines[test_at + 4] == "| recall | 0.0800 | 0.4000 |"
    assert lines[test_at + 5] == "| ndcg | 0.2000 | 0.2000 |"
    assert lines[test_at + 6] == "| popularity lift (%) | 22.5 | 62.5 |"
    assert lines[test_at + 7] == "| arp | 40.0 | 80.0 |"
    assert lines[test_at + 8] == "| coverage | 0.100 | 0.500 |"
    assert lines[valid_at + 4] == "| recall | 0.0600 | 0.3000 |"
    # images by relative name, the training history and the DKC progress
    assert "![training loss and valid recall@50 per evaluation](curves.png)" in lines
    assert "![DKC stage progress](stages.png)" in lines
    assert "| 30 (best) | L_R | 3.333 | 0.0600 |" in lines
    assert "| epoch | at final stage | MF | GNN |" in lines
    assert "| 20 | 0.250 | 1.50 | 2.00 |" in lines


def test_no_dkc_progress_means_no_stages_plot():
    files = render(_metrics(progress=False))
    assert set(files) == {"report.md", "curves.png"}
    md = files["report.md"].decode()
    assert "stages.png" not in md and "DKC" not in md
    _png_size(files["curves.png"])


def test_no_history_still_renders():
    m = _metrics(progress=False)
    m.update(history=[], best_epoch=0, epochs=0)
    files = render(m)
    assert "No evaluation was recorded." in files["report.md"].decode()
    _png_size(files["curves.png"])
