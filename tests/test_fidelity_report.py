"""bench/fidelity_report.py: finished cells outlive their run folders as committed records, a run
folder wins over its record, and the paired verdict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fidelity_report", REPO / "bench" / "fidelity_report.py")
fr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fr)


def _metrics(r50: float, epochs: int) -> dict:
    test = {k: r50 for k in fr.METRICS}
    history = [{"epoch": e, "phase": "L_O" if e <= 20 else "L_R", "valid": {"recall@50": r50 * e / epochs}}
               for e in range(10, epochs + 1, 10)]
    return {"test": test, "epochs": epochs, "best_epoch": epochs - 10, "train_seconds": 60.0 * epochs,
            "history": history}


def _finished(run: Path, cell: str, metrics: dict) -> None:
    out = run / "distill" / cell
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "MANIFEST.json").write_text("{}")


def test_record_written_read_back_and_overridden_by_the_run_folder(tmp_path):
    run, cells = tmp_path / "runs" / "citeulike", tmp_path / "cells"
    _finished(run, "ref_hetcomp_T10_s0", _metrics(0.30, 50))
    (run / "distill" / "ref_hetcomp_T10_s1" / "checkpoints" / "epoch-000020").mkdir(parents=True)
    runs = fr._runs(run, cells, write=True)
    rec = json.loads((cells / "ref_hetcomp_T10_s0.json").read_text())
    assert rec["lr_start"] == 21 and rec["epochs"] == 50 and rec["valid_recall@50"][0] == [10, 0.06]
    assert not (cells / "ref_hetcomp_T10_s1.json").exists()            # in progress: no record
    assert [m.get("in_progress") for m in runs[("hetcomp", "10")]] == [None, "epoch-000020"]

    # The checkout is lost: the record alone still counts, and a recorded cell is not "in progress".
    fresh = tmp_path / "fresh" / "citeulike"
    (fresh / "distill" / "ref_hetcomp_T10_s0" / "checkpoints").mkdir(parents=True)
    (cells / "ref_final_ensemble_T10_s0.json").write_text(json.dumps(fr.record(_metrics(0.20, 40), "test")))
    runs = fr._runs(fresh, cells)
    assert runs[("hetcomp", "10")] == [{"seed": 0, **rec}]
    assert "+0.1000" in fr.comparison(runs) and "one seed: no verdict" in fr.comparison(runs)

    # A finished run folder wins over a record of the same cell.
    _finished(fresh, "ref_final_ensemble_T10_s1", _metrics(0.25, 40))
    (cells / "ref_final_ensemble_T10_s1.json").write_text(json.dumps(fr.record(_metrics(0.10, 40), "stale")))
    got = {m["seed"]: m["test"]["recall@50"] for m in fr._runs(fresh, cells)[("final_ensemble", "10")]}
    assert got == {0: 0.20, 1: 0.25}


def test_verdict_needs_every_seed_on_one_side_beyond_the_spread():
    assert fr.verdict([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]) == "HetComp ahead beyond the spread"
    assert fr.verdict([0.20, 0.21, 0.22], [0.30, 0.31, 0.32]) == "HetComp behind beyond the spread"
    assert fr.verdict([0.30, 0.20, 0.31], [0.25, 0.21, 0.26]) == "within the seeds' spread"
    assert fr.verdict([0.3], [0.2]) == "one seed: no verdict"


def test_paired_t():
    assert fr.paired_t([0.3, 0.4, 0.5], [0.2, 0.2, 0.2]) == "+3.5"      # diffs 0.1 0.2 0.3: 0.2 / (0.1 / sqrt 3)
    assert fr.paired_t([0.3, 0.5], [0.2, 0.2]) == "+2.0" and fr.paired_t([0.3], [0.2]) == "-"


def test_fast_regime_cells_pair_each_schedule_with_the_ablation_and_with_each_other(tmp_path):
    run, cells = tmp_path / "runs" / "citeulike", tmp_path / "cells"
    _finished(run, "ref_hetcomp_T40_s0", _metrics(0.50, 50))            # another regime: not read
    for seed, (epochs_rule, progress_rule, ablation) in enumerate([(0.27, 0.29, 0.28), (0.26, 0.30, 0.28)]):
        _finished(run, f"fast_hetcomp_T40_s{seed}", _metrics(epochs_rule, 50))
        _finished(run, f"fast_hetcomp-progress_T40_s{seed}", _metrics(progress_rule, 40))
        _finished(run, f"fast_final_ensemble_T40_s{seed}", _metrics(ablation, 20))
    runs = fr._runs(run, cells, write=True, regime="fast")
    assert sorted(runs) == [("final_ensemble", "40"), ("hetcomp", "40"), ("hetcomp-progress", "40")]
    assert sorted(p.name for p in cells.iterdir())[0] == "fast_final_ensemble_T40_s0.json"
    lines = [r for r in fr.comparison(runs).splitlines() if r.count(" | ") >= 7]
    rows = {(r.split(" | ")[0].strip("| "), r.split(" | ")[2]): r for r in lines}
    assert "+0.0100 +0.0200" in rows[("HetComp, progress-tied DKC vs ablation", "recall@50")]
    assert "+0.0200 +0.0400" in rows[("HetComp, progress-tied DKC vs HetComp", "recall@50")]
    assert "-0.0100 -0.0200" in rows[("HetComp vs ablation", "recall@50")]
    assert rows[("HetComp, progress-tied DKC vs HetComp", "recall@50")].endswith(
        "HetComp, progress-tied DKC ahead beyond the spread |")
    assert "| HetComp, progress-tied DKC vs HetComp | 40 | 0 1 | 0.80 0.80 | 0.80x |" in fr.comparison(runs)
