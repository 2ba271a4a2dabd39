"""``hetcomp compare``: the method comparison of ALGORITHM.md §7-8 for one run config, end to end.

    hetcomp compare --config configs/citeulike.yaml [--set k=v ...] [--out DIR] [--results-doc [PATH]]
        [--methods bpr,rrd,ablation,hetcomp] [--full] [--sweep-lambda 0.25,0.5,1] [--sweep-gamma 0.5,1,2]
        [--sweep-contested 1,2] [--sweep-target-pop 0.25] [--sweep-ipw 0.25,0.5,1]
        [--sweep-penalty 0.1,0.25,0.5,1] [--quick] [--redo-stale] [--log-format text|json]

With no method or sweep flag it compares the student alone (bpr) with HetComp, the two students of
``hetcomp demo``; ``--full`` adds rrd, the ablation and every sweep at its default values. Steps
(each reuses what storage already holds, so a rerun only fills gaps):

1. teachers: reused when every ``<run>/teachers/<name>/trajectory`` is complete, of the run's dataset
   and of the teacher's settings (train-teachers' own skip rule), else trained (``hetcomp
   train-teachers``; ``--sequential-teachers``: without Ray);
2. each teacher alone (its summary: the best valid epoch's model on test) and their ensemble
   (``<run>/ensemble/metrics.json`` if ``hetcomp ensemble`` wrote it for these teachers, else
   computed here by the same code, over the final snapshots);
3. students, each ``pipeline.distill_run`` in this process into ``<run>/distill/<variant>``
   (``<run>/distill_quick/<variant>`` with --quick, so smoke students never pass for real ones),
   skipped when that output is complete and its config matches (``--redo-stale`` retrains one that
   does not; one distilled from another dataset is always retrained): bpr (no teachers), rrd
   (listwise distillation of the best teacher by VALID recall@50, so the choice does not peek at
   test), ablation (method final_ensemble: the final ensemble with L_R from epoch 1, no DKC),
   hetcomp, hetcomp + A(lambda) / B(gamma) / IPW(eta);
4. hetcomp + penalty(beta): the saved hetcomp student re-ranked post hoc (no training).

Writes report.md (the table, the gains of HetComp over bpr and the ablation), tradeoff.png (test
recall@50 vs popularity lift@50 per debiasing method), accuracy.png (recall/NDCG@50 bars) and
results.json into --out (default runs/compare/<config name>[-quick]); ``--results-doc`` also writes
the results to docs/results/<config name>.md (or PATH): created when absent, else only the block
between its markers is replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetcomp_dist.benchutil import markdown_table, pyplot, save_figure

POP_K = 50
ACCURACY, LIFT = f"recall@{POP_K}", f"popularity_lift@{POP_K}"
SELECT_TEACHER = f"recall@{POP_K}"          # on valid: picks rrd's teacher
# smoke run: few epochs, and KD batches of users (a few steps an epoch instead of one per 1024 interactions)
QUICK_SETS = ("distill.max_epochs=6", "distill.eval_every=2", "distill.patience=2", "distill.batch_unit=users",
              "distill.batch_size=256")
METHODS = ("bpr", "rrd", "ablation", "hetcomp")   # the base students, in table order
DEFAULT_METHODS = ("bpr", "hetcomp")              # no flags: the demo's two students
ABLATION_LABEL = "HetComp ablation (final ensemble, L_R only)"
# debiasing family -> (DistillConfig field, symbol, other --set overrides, label); hetcomp with the field
# at 0 starts each curve. C and P are strategy A under dissensus_rule contested / popularity.
FAMILIES = {"A": ("dissensus_target", "λ", (), "A"),
            "C": ("dissensus_target", "η", ("distill.dissensus_rule=contested",), "A-contested"),
            "P": ("dissensus_target", "η", ("distill.dissensus_rule=popularity",), "A-popularity"),
            "B": ("dissensus_weight", "γ", (), "B"),
            "IPW": ("ipw", "η", (), "IPW"), "penalty": ("pop_penalty", "β", (), "penalty")}
# debiasing family -> (its sweep flag, the values --full sweeps, help)
SWEEPS = {"A": ("--sweep-lambda", "0.25,0.5,1", "strategy A values (rule consensus)"),
          "C": ("--sweep-contested", "1,2", "strategy A, rule contested: eta values"),
          "P": ("--sweep-target-pop", "0.25", "strategy A, rule popularity (no dissensus): eta values"),
          "B": ("--sweep-gamma", "0.5,1,2", "strategy B values"),
          "IPW": ("--sweep-ipw", "0.25,0.5,1", "IPW eta values"),
          "penalty": ("--sweep-penalty", "0.1,0.25,0.5,1", "post-hoc penalty beta values")}
COLUMNS = [("R@10", "recall@10"), ("N@10", "ndcg@10"), ("R@20", "recall@20"), ("N@20", "ndcg@20"),
           ("R@50", "recall@50"), ("N@50", "ndcg@50"), ("popularity lift@50", LIFT), ("ARP@50", f"arp@{POP_K}"),
           ("coverage@50", f"coverage@{POP_K}")]
DRIFT_IGNORES = ("out", "threads", "workers", "cpus_per_worker", "gpus_per_worker", "checkpoint", "device")


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Variant:
    """One student: ``sets`` are its --set overrides; post-hoc variants re-rank hetcomp's student."""

    key: str                       # its directory under <run>/distill
    label: str
    method: str
    sets: tuple[str, ...] = ()
    family: str | None = None      # a key of FAMILIES
    param: float | None = None
    post_hoc: bool = False


@dataclass
class Row:
    key: str                       # a Variant key, "teacher:<name>" or "ensemble"
    label: str
    test: dict[str, float]
    train_seconds: float | None = None
    family: str | None = None
    param: float | None = None
    kind: str = "student"          # teacher | ensemble | student
    valid: dict[str, float] = field(default_factory=dict)


def variants(best_teacher: str, sweeps: dict[str, list[float]], methods: tuple[str, ...] = METHODS) -> list[Variant]:
    """The students of the comparison, in table order: the base ``methods`` (keys of METHODS), then
    the sweeps; ``sweeps`` maps a FAMILIES key to its values."""
    base = {"bpr": Variant("bpr", "bpr (student alone)", "bpr"),
            "rrd": Variant("rrd", f"rrd ({best_teacher})", "final_ensemble", (f"distill.teachers=[{best_teacher}]",)),
            "ablation": Variant("ablation", ABLATION_LABEL, "final_ensemble"),
            "hetcomp": Variant("hetcomp", "HetComp", "hetcomp")}
    out = [base[m] for m in METHODS if m in methods]
    for family in ("penalty", "A", "C", "P", "B", "IPW"):   # the post-hoc baseline first: it needs only hetcomp
        name, symbol, sets, label = FAMILIES[family]
        for value in sweeps.get(family, []):
            out.append(Variant(f"hetcomp_{family}{value:g}", f"HetComp+{label}({symbol}={value:g})", "hetcomp",
                               (f"distill.{name}={value!r}", *sets), family, float(value), post_hoc=family == "penalty"))
    return out


def _cell(value: float | None, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key.startswith("popularity_lift"):
        return f"{value:+.1f}%"
    if key.startswith("arp"):
        return f"{value:.1f}"
    return f"{value:.3f}" if key.startswith("coverage") else f"{value:.4f}"


def render_table(rows: list[Row]) -> str:
    """Markdown: one row per method, test metrics (– where the run's ks lack a cutoff), train s."""
    body = []
    for r in rows:
        label = f"**{r.label}**" if r.key == "hetcomp" else r.label
        cells = [label] + [_cell(r.test.get(key), key) for _, key in COLUMNS]
        body.append(cells + ["–" if r.train_seconds is None else f"{r.train_seconds:.0f}"])
    return markdown_table(["method"] + [c for c, _ in COLUMNS] + ["train s"], body)


def relative_gains(target: Row, base: Row) -> dict[str, float]:
    """Recall/NDCG columns: (target - base) / base; popularity lift and coverage: target - base."""
    out = {}
    for _, key in COLUMNS:
        t, b = target.test.get(key), base.test.get(key)
        if t is None or b is None:
            continue
        if key.startswith(("recall", "ndcg")):
            out[key] = (t - b) / b if b else float("nan")
        else:
            out[key] = t - b
    return out


def _gain_cell(g: float | None, key: str) -> str:
    if g is None:
        return "–"
    if key.startswith(("recall", "ndcg")):
        return f"{g * 100:+.1f}%"
    return f"{g:+.1f} pts" if key.startswith("popularity_lift") else f"{g:+.3f}"


def render_gains(target: Row, bases: list[Row]) -> str:
    """Markdown: HetComp's relative gain over each base (absolute differences for lift and coverage)."""
    keys = [(c, k) for c, k in COLUMNS if k in target.test]
    body = []
    for base in bases:
        gains = relative_gains(target, base)
        body.append([base.label] + [_gain_cell(gains.get(k), k) for _, k in keys])
    return markdown_table(["HetComp vs"] + [c for c, _ in keys], body)


def tradeoff_curves(rows: list[Row], x: str = LIFT, y: str = ACCURACY) -> dict[str, list[tuple[float, float, float]]]:
    """Per debiasing family: (param, x, y) sorted by param, starting at HetComp as param 0."""
    start = next((r for r in rows if r.key == "hetcomp"), None)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for family in FAMILIES:
        points = sorted((r.param, r.test[x], r.test[y]) for r in rows
                        if r.family == family and x in r.test and y in r.test)
        if points:
            curves[family] = ([(0.0, start.test[x], start.test[y])] if start else []) + points
    return curves


def render_curves(curves: dict[str, list[tuple[float, float, float]]]) -> str:
    """Markdown: per debiasing family, each parameter's popularity lift@50 and recall@50."""
    body = []
    for family, points in curves.items():
        symbol, label = FAMILIES[family][1], FAMILIES[family][3]
        body.append([label, ", ".join(f"{symbol}={p:g}: {x:+.1f}% / {y:.4f}" for p, x, y in points)])
    return markdown_table(["debiasing", "parameter: popularity lift@50 / recall@50"], body, numeric=False)


def results_markers(name: str) -> tuple[str, str]:
    """The comments that delimit config ``name``'s results block in its results doc."""
    return f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"


def splice_results(text: str, block: str, name: str) -> str:
    """``text`` with ``block`` between config ``name``'s results markers; adds a "### name"
    subsection holding them at the end (under a new "## Results" if absent) when they are missing.
    Everything outside the markers is kept byte for byte."""
    start, end = results_markers(name)
    has_start, has_end = start in text, end in text
    if has_start != has_end or (has_start and text.index(start) > text.index(end)):
        raise ValueError(f"results doc: {start} and {end} must both appear, in that order")
    if not has_start:
        head = text.rstrip("\n") + ("" if "\n## Results\n" in text else "\n\n## Results")
        return f"{head}\n\n### {name}\n\n{start}\n{block.strip()}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block.strip()}\n{end}{tail}"


def new_results_doc(block: str, name: str) -> str:
    """A results doc for config ``name`` that holds only its generated block."""
    start, end = results_markers(name)
    return (f"# Results: {name}\n\nGenerated by `hetcomp compare --results-doc`: a rerun replaces the text "
            f"between the markers and keeps the rest.\n\n{start}\n{block.strip()}\n{end}\n")


def write_results_doc(path: Path, block: str, name: str) -> None:
    """Create ``path`` holding config ``name``'s results, or replace only its block if it exists."""
    text = splice_results(path.read_text(), block, name) if path.exists() else new_results_doc(block, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def results_block(dataset: str, command: str, table: str, gains: str, notes: list[str]) -> str:
    lines = [f"Dataset `{dataset}`, test split, full ranking over all items. Produced by", "",
             "```bash", command, "```", "", table, "", gains, ""]
    return "\n".join(lines + [f"- {n}" for n in notes])


def inference_section(path: Path) -> str:
    """The serving-cost table bench/bench_inference.py left in the same folder (without its title), or ""."""
    if not path.exists():
        return ""
    body = path.read_text().split("\n", 1)[1].strip()
    return f"\n\nServing cost, from `{path.name}` (bench/bench_inference.py, run separately):\n\n{body}"


def parse_sweep(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def default_out(config_path: str | Path, quick: bool = False) -> Path:
    """Where ``hetcomp compare`` writes by default (bench/bench_inference.py writes beside it)."""
    return Path("runs") / "compare" / (Path(config_path).stem + ("-quick" if quick else ""))


def default_results_doc(config_path: str | Path) -> Path:
    return Path("docs") / "results" / f"{Path(config_path).stem}.md"


# --------------------------------------------------------------------------- plots


def _plot_curves(ax, curves: dict[str, list[tuple[float, float, float]]], anchors: list[Row]) -> None:
    for family, points in curves.items():
        symbol, label = FAMILIES[family][1], FAMILIES[family][3]
        _, xs, ys = zip(*points)
        ax.plot(xs, ys, "o-", label=f"HetComp+{label} ({symbol})")
        for p, x, y in points[1:]:
            ax.annotate(f"{p:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for r in anchors:
        if LIFT in r.test and ACCURACY in r.test:
            star = r.key == "hetcomp"
            ax.plot(r.test[LIFT], r.test[ACCURACY], "*" if star else "s", ms=14 if star else 6,
                    color="k" if star else "0.6", zorder=5)
            ax.annotate(r.label, (r.test[LIFT], r.test[ACCURACY]), textcoords="offset points",
                        xytext=(5, -10), fontsize=8)


def _zoom(ax, curves: dict[str, list[tuple[float, float, float]]], anchors: list[Row], hetcomp: Row) -> None:
    """Limit ``ax`` to the points within 10% of HetComp's recall."""
    close = lambda y: abs(y / hetcomp.test[ACCURACY] - 1) <= 0.1   # noqa: E731
    near = [(x, y) for pts in curves.values() for _, x, y in pts if close(y)]
    near += [(r.test[LIFT], r.test[ACCURACY]) for r in anchors
             if LIFT in r.test and ACCURACY in r.test and close(r.test[ACCURACY])]
    xs, ys = zip(*near)
    pad_x, pad_y = max(5.0, 0.1 * (max(xs) - min(xs))), 0.1 * (max(ys) - min(ys)) + 1e-3
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)


def plot_tradeoff(curves: dict[str, list[tuple[float, float, float]]], anchors: list[Row], path: Path) -> None:
    """Test recall@50 against popularity lift@50: a line per debiasing family, HetComp starred; the
    right panel zooms on the points within 10% of HetComp's recall (a collapsed penalty squeezes them)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    hetcomp = next((r for r in anchors if r.key == "hetcomp" and ACCURACY in r.test and LIFT in r.test), None)
    for zoom, ax in enumerate(axes):
        _plot_curves(ax, curves, anchors)
        if zoom and hetcomp is not None:
            _zoom(ax, curves, anchors, hetcomp)
            ax.set_title("zoom: within 10% of HetComp's recall")
        else:
            ax.set_title("accuracy / popularity-lift trade-off")
        ax.set_xlabel("popularity lift@50 (%)  ← less popularity bias")
        ax.set_ylabel("test recall@50")
        ax.grid(alpha=0.3)
    if curves:
        axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_accuracy(rows: list[Row], path: Path) -> None:
    import numpy as np

    rows = [r for r in rows if ACCURACY in r.test]
    x = np.arange(len(rows))
    fig, ax = pyplot().subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4.5))
    for j, key in enumerate((ACCURACY, f"ndcg@{POP_K}")):
        ax.bar(x + (j - 0.5) * 0.4, [r.test.get(key, 0) for r in rows], 0.4, label=f"test {key}")
    ax.set_xticks(x, [r.label for r in rows], rotation=60, ha="right", fontsize=8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# --------------------------------------------------------------------------- running


class Log:
    """``log(message, **fields)``: the message alone (text), or one JSON object per line (json)."""

    def __init__(self, fmt: str = "text"):
        self.json = fmt == "json"

    def __call__(self, message: str, **fields: Any) -> None:
        print(json.dumps({"message": message, **fields}, default=str) if self.json else message, flush=True)


def teachers_current(cfg) -> bool:
    """Whether every teacher has a complete trajectory of the run's dataset with its settings (the rule
    by which train-teachers skips one)."""
    from hetcomp_dist import lineage, storage
    from hetcomp_dist.teachers.actors import finished_summary

    if not storage.is_complete(cfg.dataset_uri):
        return False
    identity = lineage.dataset_identity(cfg.dataset_uri)
    return all(finished_summary(cfg, t, identity) is not None for t in cfg.teachers)


def ensure_teachers(cfg, sequential: bool, log: Log) -> None:
    """Train the run's teachers (preparing its dataset first) unless every one is current."""
    if teachers_current(cfg):
        return
    from hetcomp_dist.run import ensure_dataset
    from hetcomp_dist.teachers.actors import TeachersFailed, train_teachers

    log("teachers incomplete: training them (hetcomp train-teachers)", event="teachers", sequential=sequential)
    ensure_dataset(cfg)
    # text: train-teachers' own progress lines; json: each of its events as one more JSON line
    report = (lambda e: log(f"teacher {e.get('teacher')}: {e.get('event')}", event="teacher", detail=e)) if log.json else None
    try:
        train_teachers(cfg, sequential=sequential, report=report)
    except TeachersFailed as e:   # each failure's traceback is printed above
        raise SystemExit(f"hetcomp compare: error: {e}") from None


def teacher_summaries(cfg) -> list[dict[str, Any]]:
    """Each teacher's summary: ``<run>/teachers/summary`` if complete, else its trajectory manifest's."""
    from hetcomp_dist import storage

    uri = cfg.layout.teachers_summary
    if storage.is_complete(uri):
        by_name = {s["teacher"]: s for s in storage.read_json(uri, "summary.json")}
        if all(t.name in by_name for t in cfg.teachers):
            return [by_name[t.name] for t in cfg.teachers]
    return [storage.read_manifest(cfg.layout.trajectory(t.name))["summary"] for t in cfg.teachers]


def best_teacher(summaries: list[dict[str, Any]], metric: str = SELECT_TEACHER) -> str:
    return max(summaries, key=lambda s: s["valid"].get(metric, -1.0))["teacher"]


def ensemble_metrics(cfg) -> tuple[dict[str, Any], str]:
    """The ensemble of all the run's teachers: ``<run>/ensemble`` if written for them, else computed."""
    from hetcomp_dist import storage
    from hetcomp_dist.distill import ensemble_eval

    uri = cfg.layout.ensemble
    names = [t.name for t in cfg.teachers]
    if storage.is_complete(uri):
        results = storage.read_json(uri, "metrics.json")
        if [t["name"] for t in results["teachers"]] == names and results["temperature"] == cfg.distill.temperature:
            return results, f"read from {uri}/metrics.json"
    every = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teachers=[]))
    return ensemble_eval.evaluate_ensemble(every), "computed here (hetcomp_dist.distill.ensemble_eval)"


def config_drift(stored: dict[str, Any], wanted) -> list[str]:
    """Settings of a stored student that differ from the wanted DistillConfig (worker layout ignored;
    config.differences: fields added since take their defaults; an unreadable config differs in all)."""
    from hetcomp_dist import config
    from hetcomp_dist.distill.config import DistillConfig

    drift = config.differences(DistillConfig, stored, wanted, DRIFT_IGNORES)
    return ["<unreadable stored config>"] if drift is None else drift


def run_student(args: argparse.Namespace, v: Variant, root: str, log: Log) -> tuple[dict[str, Any], str]:
    """Train variant ``v`` unless its output is complete and of the run's dataset; returns (metrics.json,
    what happened)."""
    from hetcomp_dist import config, lineage, storage
    from hetcomp_dist.pipeline import distill_run
    from hetcomp_dist.run import RunConfig

    out = storage.join(root, v.key)
    overrides = [*args.overrides, f"distill.method={v.method}", f"distill.out={out}", *v.sets,
                 *(args.bpr_overrides if v.method == "bpr" else ()), *(QUICK_SETS if args.quick else ())]
    cfg = config.load(RunConfig, args.config, overrides)
    if storage.is_complete(out):
        manifest = storage.read_manifest(out)
        drift = config_drift(manifest.get("config", {}), cfg.distill)
        if not lineage.same(manifest.get(lineage.KEY), lineage.dataset_identity(cfg.dataset_uri)):
            log(f"{out} was distilled from another dataset ({lineage.describe(manifest.get(lineage.KEY))}): "
                "retraining it", event="foreign", variant=v.key)
        elif not drift or not args.redo_stale:
            note = f"reused {out}" + (f" (differs from the asked config in {', '.join(drift)}; "
                                      "--redo-stale retrains)" if drift else "")
            return storage.read_json(out, "metrics.json"), note
    t0 = time.perf_counter()

    def show(event: dict) -> None:
        if "valid" in event:
            log(f"  [{v.key}] epoch {event['epoch']} {event.get('phase', '')} valid {event['valid']:.4f}",
                event="epoch", variant=v.key, epoch=event["epoch"], phase=event.get("phase"), valid=event["valid"])

    metrics = distill_run(cfg, show)
    return metrics, f"trained into {out} ({time.perf_counter() - t0:.0f} s wall)"


def penalised_metrics(cfg, student_uri: str, beta: float) -> dict[str, dict[str, float]]:
    """Test/valid metrics of the stored student re-ranked by s_ui - beta * std_u(s) * pop(i)."""
    import io

    import torch

    from hetcomp_dist import storage
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.distill.baselines import penalised_scorer
    from hetcomp_dist.distill.dissensus import popularity_percentile
    from hetcomp_dist.distill.train import ITEM_KEY, Student
    from hetcomp_dist.evaluate import evaluate_split

    data = load_dataset(cfg.dataset_uri)
    state = torch.load(io.BytesIO(storage.read_bytes(student_uri, "student.pt")), weights_only=True)
    student = Student(data.n_users, data.n_items, state[ITEM_KEY].shape[1])
    student.load_state_dict(state)
    scorer = penalised_scorer(student.scores, popularity_percentile(data.train.item_counts()), beta)
    with torch.no_grad():
        return {split: evaluate_split(scorer, data, split, tuple(cfg.ks), cfg.eval_batch_size) for split in ("test", "valid")}


def reference_rows(cfg) -> tuple[list[Row], list[str], str]:
    """The teachers' and their ensemble's rows, a note on how they were made, the best teacher."""
    summaries = teacher_summaries(cfg)
    rows = [Row(f"teacher:{s['teacher']}", s["teacher"], s["test"], s["train_seconds"], kind="teacher",
                valid=s["valid"]) for s in summaries]
    ensemble, how = ensemble_metrics(cfg)
    rows.append(Row("ensemble", "ensemble", ensemble["models"]["ensemble"]["test"], kind="ensemble",
                    valid=ensemble["models"]["ensemble"]["valid"]))
    note = (f"teachers: each one's best valid epoch (`<run>/teachers/summary`); ensemble: their final snapshots "
            f"merged by rank importance exp(-r/{ensemble['temperature']:g}), {how}")
    return rows, [note], best_teacher(summaries)


def method_notes(methods: tuple[str, ...], sweeps: dict[str, list[float]], best: str, quick: bool) -> list[str]:
    """The report's notes on the students compared."""
    notes = []
    if "rrd" in methods:
        notes.append(f"rrd distils {best}, the best teacher by valid {SELECT_TEACHER}")
    if "ablation" in methods:
        notes.append("the ablation is method final_ensemble: the teachers' final ensemble as the target "
                     "with L_R from epoch 1, no DKC")
    if sweeps.get("penalty"):
        notes.append("penalty rows re-rank the HetComp student post hoc; their train s is HetComp's")
    notes.append("ARP@50: average recommendation popularity, the mean train count of the top-50 items")
    if quick:
        notes.append("--quick: " + ", ".join(QUICK_SETS) + " (a smoke run, not results)")
    return notes


def run_variant(args: argparse.Namespace, cfg, v: Variant, root: str, hetcomp: dict | None,
                log: Log) -> tuple[dict[str, Any], str]:
    """One student's metrics (trained, reused or re-ranked) and what happened."""
    from hetcomp_dist import storage

    if not v.post_hoc:
        return run_student(args, v, root, log)
    if hetcomp is None:
        raise RuntimeError("no hetcomp student to re-rank")
    m = {**penalised_metrics(cfg, storage.join(root, "hetcomp"), v.param), "train_seconds": hetcomp["train_seconds"]}
    return m, "re-ranked the hetcomp student (no training)"


def collect(args: argparse.Namespace, cfg, progress=lambda rows, notes: None,
            log: Log = Log()) -> tuple[list[Row], list[str]]:
    """Every row of the comparison (training what storage lacks), and notes on how each was made;
    ``progress(rows, notes)`` after each student, so an interrupted run still leaves a report."""
    from hetcomp_dist import storage

    ensure_teachers(cfg, args.sequential_teachers, log)
    methods, sweeps = chosen_methods(args), chosen_sweeps(args)
    rows, notes, best = reference_rows(cfg)
    notes += method_notes(methods, sweeps, best, args.quick)
    root = storage.join(cfg.run, "distill_quick" if args.quick else "distill")
    hetcomp = None
    for v in variants(best, sweeps, methods):
        log(f"{v.label}: ...", event="variant", variant=v.key)
        try:
            m, what = run_variant(args, cfg, v, root, hetcomp, log)
        except Exception as e:  # one failed variant leaves the rest of the comparison standing
            log(f"{v.label}: FAILED ({type(e).__name__}: {e})", event="failed", variant=v.key, error=str(e))
            notes.append(f"{v.label} failed: {type(e).__name__}: {e}")
            continue
        log(f"{v.label}: {what}; test {ACCURACY} {m['test'].get(ACCURACY, float('nan')):.4f}", event="done",
            variant=v.key, what=what, test=m["test"])
        if "differs" in what:                  # a reused student trained with other settings: say so in the report
            notes.append(f"{v.label}: {what}")
        hetcomp = m if v.key == "hetcomp" else hetcomp
        rows.append(Row(v.key, v.label, m["test"], m.get("train_seconds"), v.family, v.param, valid=m["valid"]))
        progress(rows, notes)
    return rows, notes


def write(rows: list[Row], notes: list[str], dataset: str, command: str, title: str, out_dir: Path,
          results_doc: Path | None) -> str:
    """report.md, the plots and results.json into ``out_dir`` (and the results doc); the report text."""
    by_key = {r.key: r for r in rows}
    bases = [by_key[k] for k in ("bpr", "ablation") if k in by_key]
    gains = render_gains(by_key["hetcomp"], bases) if "hetcomp" in by_key and bases else "(no HetComp student: no gains)"
    curves = tradeoff_curves(rows)
    block = results_block(dataset, command, render_table(rows), gains, notes)
    if curves:
        block += f"\n\nTrade-off (test), per debiasing method and strength:\n\n{render_curves(curves)}"
    block += inference_section(out_dir / "inference.md")
    text = f"# Method comparison ({title})\n\n{block}\n\n![trade-off](tradeoff.png)\n\n![accuracy](accuracy.png)\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps({"command": command, "rows": [dataclasses.asdict(r) for r in rows]},
                                                     indent=1))
    plot_tradeoff(curves, [by_key[k] for k in ("hetcomp", "ensemble", "bpr", "ablation") if k in by_key],
                  out_dir / "tradeoff.png")
    plot_accuracy(rows, out_dir / "accuracy.png")
    if results_doc is not None:
        write_results_doc(results_doc, block, Path(title).stem)
    return text


# --------------------------------------------------------------------------- the command


def chosen_methods(args: argparse.Namespace) -> tuple[str, ...]:
    """--methods, else all of METHODS with --full, else DEFAULT_METHODS."""
    if args.methods:
        return args.methods
    return METHODS if args.full else DEFAULT_METHODS


def chosen_sweeps(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each family's values: its flag's, else (with --full) SWEEPS' defaults, else none."""
    out = {}
    for family, (flag, full, _) in SWEEPS.items():
        given = getattr(args, _dest(flag))
        out[family] = parse_sweep(given if given is not None else full if args.full else "")
    return out


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _methods(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(METHODS)} (got {text!r})")
    return chosen


def _sweep(text: str) -> str:
    try:
        parse_sweep(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return text


def command_line(args: argparse.Namespace) -> str:
    """The ``hetcomp compare`` command that reproduces ``args`` (for the report)."""
    parts = ["hetcomp", "compare", "--config", args.config]
    parts += [a for s in args.overrides for a in ("--set", s)] + [a for s in args.bpr_overrides for a in ("--bpr-set", s)]
    if args.methods:
        parts += ["--methods", ",".join(args.methods)]
    parts += [flag for flag, on in (("--full", args.full), ("--quick", args.quick), ("--redo-stale", args.redo_stale),
                                    ("--sequential-teachers", args.sequential_teachers)) if on]
    for flag, _, _ in SWEEPS.values():
        if getattr(args, _dest(flag)) is not None:
            parts += [flag, getattr(args, _dest(flag))]
    parts += ["--out", args.out] if args.out else []
    parts += ["--results-doc"] + ([args.results_doc] if args.results_doc else []) if args.results_doc is not None else []
    return shlex.join(parts)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``compare`` subcommand of ``hetcomp``."""
    p = sub.add_parser("compare", help="compare students (bpr and HetComp; --full: baselines and debiasing sweeps) "
                       "with the teachers and their ensemble; report, plots, results doc",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--bpr-set", dest="bpr_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the bpr student only, e.g. its own distill.batch_size (repeatable)")
    p.add_argument("--methods", type=_methods, metavar="M1,M2",
                   help=f"base students, of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; --full: all)")
    p.add_argument("--full", action="store_true", help="the whole comparison: every base student, and each sweep "
                   "not given takes its default values (" + "; ".join(f"{f} {v}" for f, v, _ in SWEEPS.values()) + ")")
    for flag, full, text in SWEEPS.values():
        p.add_argument(flag, type=_sweep, metavar="V1,V2", help=f"{text} (default: none; --full: {full})")
    p.add_argument("--out", help="output folder (default: runs/compare/<config name>[-quick])")
    p.add_argument("--results-doc", nargs="?", const="", metavar="PATH",
                   help="also write the results to PATH (default: docs/results/<config name>.md)")
    p.add_argument("--quick", action="store_true", help="smoke run: " + " ".join(QUICK_SETS) + ", under <run>/distill_quick")
    p.add_argument("--redo-stale", action="store_true", help="retrain stored students whose config differs")
    p.add_argument("--sequential-teachers", action="store_true", help="train missing teachers without Ray")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="progress lines as text, or one JSON object per line")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> None:
    """``hetcomp compare``: collect every row (training what is missing), then write the outputs."""
    from hetcomp_dist import config
    from hetcomp_dist.run import RunConfig, configure_storage

    cfg = config.load(RunConfig, args.config, args.overrides)
    configure_storage(cfg)
    log = Log(args.log_format)
    out_dir = Path(args.out) if args.out else default_out(args.config, args.quick)
    doc = None if args.results_doc is None else Path(args.results_doc or default_results_doc(args.config))
    command, title = command_line(args), Path(args.config).name

    def partial(rows: list[Row], notes: list[str]) -> None:
        write(rows, [*notes, "(partial: the run is still going)"], cfg.dataset_uri, command, title, out_dir, None)

    rows, notes = collect(args, cfg, partial, log)
    text = write(rows, notes, cfg.dataset_uri, command, title, out_dir, doc)
    if args.log_format == "text":
        print("\n" + text)
    files = ["report.md", "tradeoff.png", "accuracy.png", "results.json"]
    log(f"written to {out_dir}: {', '.join(files)}" + (f"; results in {doc}" if doc else ""),
        event="written", out=str(out_dir), files=files, results_doc=None if doc is None else str(doc))
