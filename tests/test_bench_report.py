"""bench/report.py's pure parts: the variants it trains, its tables, the trade-off curves, README splicing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hetcomp_dist import config
from hetcomp_dist.run import RunConfig

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules["bench_report"] = report          # dataclasses look their module up while the file runs
_spec.loader.exec_module(report)
Row = report.Row


def metrics(recall50: float, lift: float, with10: bool = True) -> dict[str, float]:
    m = {"recall@20": recall50 / 2, "ndcg@20": recall50 / 4, "recall@50": recall50, "ndcg@50": recall50 / 3,
         "popularity_lift@50": lift, "arp@50": 2 * lift, "coverage@50": 0.25}
    if with10:
        m.update({"recall@10": recall50 / 4, "ndcg@10": recall50 / 5})
    return m


def rows() -> list[Row]:
    return [Row("teacher:MF", "MF", metrics(0.30, 40.0, with10=False), 12.4, kind="teacher"),
            Row("bpr", "bpr (student alone)", metrics(0.20, 80.0), 3.0),
            Row("ablation", "HetComp ablation (final ensemble, L_R only)", metrics(0.25, 70.0), 5.0),
            Row("hetcomp", "HetComp", metrics(0.30, 60.0), 9.6),
            Row("hetcomp_A1", "HetComp+A(λ=1)", metrics(0.26, 20.0), 9.0, "A", 1.0),
            Row("hetcomp_A0.25", "HetComp+A(λ=0.25)", metrics(0.29, 50.0), 9.0, "A", 0.25),
            Row("hetcomp_penalty0.5", "HetComp+penalty(β=0.5)", metrics(0.28, 30.0), 9.6, "penalty", 0.5)]


def test_variants_are_valid_overrides_of_a_real_config():
    vs = report.variants("I-AE", {"A": [0.25, 1.0], "C": [2.0], "P": [0.25], "IPW": [0.5], "penalty": [0.1]})
    assert [v.key for v in vs] == ["bpr", "rrd", "ablation", "hetcomp", "hetcomp_penalty0.1", "hetcomp_A0.25",
                                   "hetcomp_A1", "hetcomp_C2", "hetcomp_P0.25", "hetcomp_IPW0.5"]
    assert [v.post_hoc for v in vs] == [False] * 4 + [True] + [False] * 5
    loaded = {v.key: config.load(RunConfig, REPO / "configs" / "citeulike.yaml",
                                 [f"distill.method={v.method}", *v.sets]).distill for v in vs}
    assert loaded["rrd"].teachers == ["I-AE"] and loaded["rrd"].method == "final_ensemble"
    assert loaded["ablation"].teachers == [] and loaded["ablation"].method == "final_ensemble"
    assert loaded["hetcomp_A0.25"].dissensus_target == 0.25 and loaded["hetcomp_A1"].dissensus_target == 1.0
    assert loaded["hetcomp_IPW0.5"].ipw == 0.5 and loaded["hetcomp_IPW0.5"].dissensus_target == 0.0
    assert loaded["bpr"].method == "bpr"
    assert loaded["hetcomp_A1"].dissensus_rule == "consensus"
    assert (loaded["hetcomp_C2"].dissensus_rule, loaded["hetcomp_C2"].dissensus_target) == ("contested", 2.0)
    assert (loaded["hetcomp_P0.25"].dissensus_rule, loaded["hetcomp_P0.25"].dissensus_target) == ("popularity", 0.25)


def test_table_has_a_row_per_method_and_dashes_for_missing_cutoffs():
    table = report.render_table(rows()).splitlines()
    assert table[0] == ("| method | R@10 | N@10 | R@20 | N@20 | R@50 | N@50 | popularity lift@50 | ARP@50 "
                        "| coverage@50 | train s |")
    assert len(table) == 2 + len(rows())
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2] == "| MF | – | – | 0.1500 | 0.0750 | 0.3000 | 0.1000 | +40.0% | 80.0 | 0.250 | 12 |"
    assert table[5].startswith("| **HetComp** | 0.0750 | 0.0600 |")


def test_gains_of_hetcomp_over_bpr_and_the_ablation():
    by = {r.key: r for r in rows()}
    gains = report.relative_gains(by["hetcomp"], by["bpr"])
    assert gains["recall@50"] == pytest.approx(0.5)          # 0.30 vs 0.20
    assert gains["popularity_lift@50"] == pytest.approx(-20.0)  # absolute, in points
    text = report.render_gains(by["hetcomp"], [by["bpr"], by["ablation"]]).splitlines()
    assert text[2].startswith("| bpr (student alone) | +50.0% |")
    assert "| +20.0% |" in text[3] and "-10.0 pts" in text[3]  # R@50 0.30 vs 0.25; lift 60 vs 70


def test_tradeoff_curves_start_at_hetcomp_and_follow_the_parameter():
    curves = report.tradeoff_curves(rows())
    assert set(curves) == {"A", "penalty"}                    # families with no rows have no curve
    assert curves["A"] == [(0.0, 60.0, 0.30), (0.25, 50.0, 0.29), (1.0, 20.0, 0.26)]
    assert curves["penalty"] == [(0.0, 60.0, 0.30), (0.5, 30.0, 0.28)]
    no_hetcomp = [r for r in rows() if r.key != "hetcomp"]
    assert report.tradeoff_curves(no_hetcomp)["A"][0] == (0.25, 50.0, 0.29)


START, END = report.readme_markers("citeulike")


def test_readme_splice_adds_a_section_then_replaces_only_between_markers():
    original = "# project\n\ntext\n\n## Benchmarks\n\nmore text\n"
    once = report.splice_readme(original, "table one", "citeulike")
    assert once.startswith(original.rstrip("\n"))
    assert once.endswith(f"## Results\n\n### citeulike\n\n{START}\ntable one\n{END}\n")
    twice = report.splice_readme(once, "table two\n", "citeulike")
    assert twice == once.replace("table one", "table two")
    assert report.splice_readme(twice, "table two", "citeulike") == twice
    edited = twice.replace("## Results\n", "## Results\n\nintro kept\n") + "\n## After\n"
    spliced = report.splice_readme(edited, "table three", "citeulike")
    assert "intro kept" in spliced and spliced.endswith(f"{END}\n\n## After\n")
    assert "table two" not in spliced


def test_readme_splice_keeps_one_block_per_dataset():
    both = report.splice_readme(report.splice_readme("# p\n", "cite one", "citeulike"), "gow one", "gowalla")
    assert both.count("## Results") == 1 and "### citeulike" in both and "### gowalla" in both
    again = report.splice_readme(both, "cite two", "citeulike")
    assert "cite two" in again and "cite one" not in again and "gow one" in again
    assert again.index("### citeulike") < again.index("### gowalla")


@pytest.mark.parametrize("text", [f"a\n{START}\nb\n", f"a\n{END}\nb\n{START}\n"])
def test_readme_splice_refuses_broken_markers(text):
    with pytest.raises(ValueError):
        report.splice_readme(text, "x", "citeulike")


def test_config_drift_ignores_layout_and_names_changed_settings():
    stored = {"method": "hetcomp", "ipw": 0.0, "out": "a", "threads": 2, "teachers": ["MF"]}
    from hetcomp_dist.distill.config import DistillConfig

    wanted = DistillConfig(method="hetcomp", ipw=0.5, out="b", threads=4, teachers=["MF"])
    assert report.config_drift(stored, wanted) == ["ipw"]


def test_inference_table_joins_the_results_when_present(tmp_path):
    assert report.inference_section(tmp_path / "inference.md") == ""
    (tmp_path / "inference.md").write_text("# Inference: x\n\n| measure | a |\n|---|---|\n| parameters | 3 |\n")
    section = report.inference_section(tmp_path / "inference.md")
    assert "| parameters | 3 |" in section and "# Inference" not in section


def test_write_leaves_the_report_the_plots_and_a_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# p\n")
    text = report.write(rows(), ["a note"], "runs/x/dataset", "cmd", "citeulike.yaml", tmp_path / "out", readme)
    assert {"report.md", "results.json", "tradeoff.png", "accuracy.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 10_000 and "a note" in text
    start, end = report.readme_markers("citeulike")
    assert start in readme.read_text() and "| HetComp+A(λ=1) |" not in readme.read_text().split(end)[1]
