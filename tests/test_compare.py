"""hetcomp_dist.compare (`hetcomp compare`): the variants it trains, its tables, the trade-off curves,
the results doc it splices, and its command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hetcomp_dist import benchutil, cli, compare, config
from hetcomp_dist.run import RunConfig

REPO = Path(__file__).resolve().parents[1]
Row = compare.Row


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
    vs = compare.variants("I-AE", {"A": [0.25, 1.0], "C": [2.0], "P": [0.25], "IPW": [0.5], "penalty": [0.1]})
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
    table = compare.render_table(rows()).splitlines()
    assert table[0] == ("| method | R@10 | N@10 | R@20 | N@20 | R@50 | N@50 | popularity lift@50 | ARP@50 "
                        "| coverage@50 | train s |")
    assert len(table) == 2 + len(rows())
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2] == "| MF | – | – | 0.1500 | 0.0750 | 0.3000 | 0.1000 | +40.0% | 80.0 | 0.250 | 12 |"
    assert table[5].startswith("| **HetComp** | 0.0750 | 0.0600 |")


def test_gains_of_hetcomp_over_bpr_and_the_ablation():
    by = {r.key: r for r in rows()}
    gains = compare.relative_gains(by["hetcomp"], by["bpr"])
    assert gains["recall@50"] == pytest.approx(0.5)          # 0.30 vs 0.20
    assert gains["popularity_lift@50"] == pytest.approx(-20.0)  # absolute, in points
    text = compare.render_gains(by["hetcomp"], [by["bpr"], by["ablation"]]).splitlines()
    assert text[2].startswith("| bpr (student alone) | +50.0% |")
    assert "| +20.0% |" in text[3] and "-10.0 pts" in text[3]  # R@50 0.30 vs 0.25; lift 60 vs 70


def test_tradeoff_curves_start_at_hetcomp_and_follow_the_parameter():
    curves = compare.tradeoff_curves(rows())
    assert set(curves) == {"A", "penalty"}                    # families with no rows have no curve
    assert curves["A"] == [(0.0, 60.0, 0.30), (0.25, 50.0, 0.29), (1.0, 20.0, 0.26)]
    assert curves["penalty"] == [(0.0, 60.0, 0.30), (0.5, 30.0, 0.28)]
    no_hetcomp = [r for r in rows() if r.key != "hetcomp"]
    assert compare.tradeoff_curves(no_hetcomp)["A"][0] == (0.25, 50.0, 0.29)


START, END = compare.results_markers("citeulike")


def test_results_splice_adds_a_section_then_replaces_only_between_markers():
    original = "# project\n\ntext\n\n## Benchmarks\n\nmore text\n"
    once = compare.splice_results(original, "table one", "citeulike")
    assert once.startswith(original.rstrip("\n"))
    assert once.endswith(f"## Results\n\n### citeulike\n\n{START}\ntable one\n{END}\n")
    twice = compare.splice_results(once, "table two\n", "citeulike")
    assert twice == once.replace("table one", "table two")
    assert compare.splice_results(twice, "table two", "citeulike") == twice
    edited = twice.replace("## Results\n", "## Results\n\nintro kept\n") + "\n## After\n"
    spliced = compare.splice_results(edited, "table three", "citeulike")
    assert "intro kept" in spliced and spliced.endswith(f"{END}\n\n## After\n")
    assert "table two" not in spliced


def test_results_splice_keeps_one_block_per_dataset():
    both = compare.splice_results(compare.splice_results("# p\n", "cite one", "citeulike"), "gow one", "gowalla")
    assert both.count("## Results") == 1 and "### citeulike" in both and "### gowalla" in both
    again = compare.splice_results(both, "cite two", "citeulike")
    assert "cite two" in again and "cite one" not in again and "gow one" in again
    assert again.index("### citeulike") < again.index("### gowalla")


@pytest.mark.parametrize("text", [f"a\n{START}\nb\n", f"a\n{END}\nb\n{START}\n"])
def test_results_splice_refuses_broken_markers(text):
    with pytest.raises(ValueError):
        compare.splice_results(text, "x", "citeulike")


def test_config_drift_ignores_layout_and_names_changed_settings():
    stored = {"method": "hetcomp", "ipw": 0.0, "out": "a", "threads": 2, "teachers": ["MF"]}
    from hetcomp_dist.distill.config import DistillConfig

    wanted = DistillConfig(method="hetcomp", ipw=0.5, out="b", threads=4, teachers=["MF"])
    assert compare.config_drift(stored, wanted) == ["ipw"]


def test_inference_table_joins_the_results_when_present(tmp_path):
    assert compare.inference_section(tmp_path / "inference.md") == ""
    (tmp_path / "inference.md").write_text("# Inference: x\n\n| measure | a |\n|---|---|\n| parameters | 3 |\n")
    section = compare.inference_section(tmp_path / "inference.md")
    assert "| parameters | 3 |" in section and "# Inference" not in section


def test_write_leaves_the_report_the_plots_and_a_results_doc(tmp_path):
    doc = tmp_path / "docs" / "results" / "citeulike.md"
    text = compare.write(rows(), ["a note"], "runs/x/dataset", "cmd", "citeulike.yaml", tmp_path / "out", doc)
    assert {"report.md", "results.json", "tradeoff.png", "accuracy.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 10_000 and "a note" in text
    start, end = compare.results_markers("citeulike")
    assert start in doc.read_text() and "| HetComp+A(λ=1) |" not in doc.read_text().split(end)[1]
    assert doc.read_text().startswith("# Results: citeulike\n") and "| HetComp+A(λ=1) |" in doc.read_text()


def test_results_doc_rewrite_keeps_the_text_outside_the_markers(tmp_path):
    doc = tmp_path / "citeulike.md"
    compare.write_results_doc(doc, "table one", "citeulike")
    doc.write_text(doc.read_text() + "\n## Notes\n\nwritten by hand\n")
    compare.write(rows(), [], "runs/x/dataset", "cmd", "citeulike.yaml", tmp_path / "out", doc)
    text = doc.read_text()
    assert "table one" not in text and "| **HetComp** |" in text and text.endswith("written by hand\n")
    assert text.count("# Results: citeulike") == 1


def test_write_without_sweeps_or_hetcomp_still_writes(tmp_path):
    two = [r for r in rows() if r.key in ("teacher:MF", "bpr")]
    text = compare.write(two, [], "d", "cmd", "tiny.yaml", tmp_path, None)
    assert "(no HetComp student: no gains)" in text and "Trade-off" not in text
    assert (tmp_path / "tradeoff.png").exists() and (tmp_path / "accuracy.png").exists()


def parse(*argv: str):
    return cli.build_parser().parse_args(["compare", "--config", "configs/citeulike.yaml", *argv])


def test_no_flags_compare_the_student_alone_with_hetcomp():
    args = parse()
    assert args.func is compare.run and args.log_format == "text" and args.results_doc is None
    methods, sweeps = compare.chosen_methods(args), compare.chosen_sweeps(args)
    assert methods == ("bpr", "hetcomp") and all(v == [] for v in sweeps.values())
    assert [v.key for v in compare.variants("MF", sweeps, methods)] == ["bpr", "hetcomp"]
    assert compare.command_line(args) == "hetcomp compare --config configs/citeulike.yaml"


def test_full_takes_every_method_and_the_default_sweeps_a_flag_overrides():
    args = parse("--full", "--sweep-lambda", "1", "--sweep-target-pop", "")
    assert compare.chosen_methods(args) == compare.METHODS
    sweeps = compare.chosen_sweeps(args)
    assert sweeps["A"] == [1.0] and sweeps["P"] == [] and sweeps["B"] == [0.5, 1.0, 2.0]
    keys = [v.key for v in compare.variants("MF", sweeps, compare.chosen_methods(args))]
    assert keys[:4] == ["bpr", "rrd", "ablation", "hetcomp"] and "hetcomp_A1" in keys and "hetcomp_A0.5" not in keys
    assert parse("--full", "--methods", "ablation,hetcomp").full and compare.chosen_methods(
        parse("--full", "--methods", "ablation,hetcomp")) == ("ablation", "hetcomp")


def test_the_ablation_is_final_ensemble_never_mtd():
    ablation = next(v for v in compare.variants("MF", {}) if v.key == "ablation")
    assert (ablation.method, ablation.label) == ("final_ensemble", "HetComp ablation (final ensemble, L_R only)")
    assert "mtd" not in (REPO / "hetcomp_dist" / "compare.py").read_text().lower()


def test_results_doc_flag_defaults_to_docs_results_per_config():
    assert parse("--results-doc").results_doc == ""
    assert compare.default_results_doc("configs/gowalla.yaml") == Path("docs/results/gowalla.md")
    assert parse("--results-doc", "x.md").results_doc == "x.md"
    line = compare.command_line(parse("--set", "run=/tmp/r", "--sweep-ipw", "0.5", "--results-doc", "--log-format", "json"))
    assert line == ("hetcomp compare --config configs/citeulike.yaml --set run=/tmp/r --sweep-ipw 0.5 "
                    "--results-doc")


@pytest.mark.parametrize("argv", [["--methods", "mtd"], ["--sweep-gamma", "a,b"], ["--log-format", "xml"]])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_json_log_lines_are_objects(capsys):
    compare.Log("json")("hello", event="done", variant="bpr")
    compare.Log("text")("plain", event="x")
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0]) == {"message": "hello", "event": "done", "variant": "bpr"} and out[1] == "plain"


# --------------------------------------------------------------------------- hetcomp_dist.benchutil


def test_markdown_table_right_aligns_all_but_the_first_column():
    assert benchutil.markdown_table(["a", "b", "c"], [["x", 1, 2.5]]).splitlines() == [
        "| a | b | c |", "|---|---:|---:|", "| x | 1 | 2.5 |"]
    assert benchutil.markdown_table(["a", "b"], [], numeric=False).splitlines()[1] == "|---|---|"


SCRIPT = '''
from dataclasses import dataclass


@dataclass
class Box:
    n: int


def fill(mib: int) -> dict:
    block = bytearray(mib * 2 ** 20)
    return {"n": Box(len(block) // 2 ** 20).n}


if __name__ == "__main__":
    raise SystemExit("the child must not run the script's main block")
'''


def test_call_in_subprocess_runs_a_script_function_and_measures_its_memory(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    namespace = {"__name__": "__main__"}            # as when the script itself is run
    exec(compile(SCRIPT.replace('if __name__ == "__main__"', "if False"), str(path), "exec"), namespace)
    result, child = benchutil.call_in_subprocess(namespace["fill"], {"mib": 300})
    assert result == {"n": 300} and child.returncode == 0 and child.peak_rss_mib > 300 and child.seconds > 0


def test_call_in_subprocess_reports_failures_and_deadlines():
    assert benchutil.call_in_subprocess(json.dumps, {"obj": [1, 2]})[0] == "[1, 2]"
    with pytest.raises(RuntimeError, match="loads failed"):
        benchutil.call_in_subprocess(json.loads, {"s": "{"})
    with pytest.raises(TimeoutError):
        benchutil.call_in_subprocess(json.dumps, {"obj": 1}, deadline=time.monotonic() - 1)


def test_dataset_folder_needs_a_path_or_the_datasets_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("HETCOMP_DATASETS_DIR", raising=False)
    assert benchutil.dataset_folder("gowalla", tmp_path) == tmp_path
    with pytest.raises(SystemExit, match="HETCOMP_DATASETS_DIR"):
        benchutil.dataset_folder("gowalla")
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(tmp_path))
    assert benchutil.dataset_folder("gowalla") == tmp_path / "gowalla"
