"""The distillation report: report.md with its two plots, rendered from metrics.json's content.

:func:`render` is pure (a dict in, file contents out); the caller writes the files through the
storage seam next to metrics.json, so report.md refers to the images by relative name. Plots use
matplotlib's Agg canvas directly (no pyplot, no global figure state, no display needed).

Input: the metrics dict written by :func:`hetcomp_dist.distill.train.distill`: ``method``,
``best_epoch``, ``epochs``, ``train_seconds``, ``test`` / ``valid`` (``name@K`` metrics and
``n_users``), ``history`` (one entry per evaluation: ``epoch``, ``valid``, ``loss``, ``phase``),
``dkc_progress`` (per evaluation while DKC runs: ``epoch``, ``mean_stage`` per teacher,
``final_fraction``), ``teachers`` (trajectory URIs), ``workers``, ``resumed_from``,
``state_bytes``, ``trajectory_stages`` (per teacher the epochs of its stages, and the test metrics
of each stage's ensemble). Missing optional keys are skipped.
"""

from __future__ import annotations

import io
import math
from typing import Any

CURVES = "curves.png"
STAGES = "stages.png"
REPORT = "report.md"
DEFAULT_SELECT = "recall@50"

_FORMATS = {"popularity_lift": "{:.1f}", "arp": "{:.1f}", "coverage": "{:.3f}"}
_LABELS = {"popularity_lift": "popularity lift (%)"}


def render(metrics: dict[str, Any], select_metric: str | None = None) -> dict[str, bytes]:
    """File name -> content: ``report.md`` and ``curves.png`` always, ``stages.png`` when
    ``metrics["dkc_progress"]`` is not empty.

    Args:
        metrics: metrics.json's content (module docstring).
        select_metric: the valid metric used for model selection (plotted and tabulated); default
            ``metrics["select_metric"]`` if present, else recall@50 (else the first recall@K).
    """
    select = select_metric or metrics.get("select_metric") or _default_select(metrics)
    files = {REPORT: b"", CURVES: _curves_png(metrics, select)}
    if metrics.get("dkc_progress"):
        files[STAGES] = _stages_png(metrics)
    files[REPORT] = _markdown(metrics, select).encode()
    return files


# --------------------------------------------------------------------------- markdown


def _markdown(m: dict[str, Any], select: str) -> str:
    history = m.get("history") or []
    best_valid = next((h["valid"].get(select) for h in history if h["epoch"] == m.get("best_epoch")), None)
    selected = f" (selected on valid {select}" + (f" = {best_valid:.4f}" if _is_number(best_valid) else "") + ")"
    lines = [f"# Student ({m.get('method', '?')})", ""]
    lines.append(f"- best epoch {m.get('best_epoch')} of {m.get('epochs')}{selected}, "
                 f"{m.get('train_seconds', float('nan')):.0f} s of training, {m.get('workers', 1)} worker(s)")
    if m.get("teachers"):
        lines.append("- teachers: " + ", ".join(teacher_label(u) for u in m["teachers"]))
    if m.get("resumed_from"):
        lines.append("- resumed after the evaluations of epochs " + ", ".join(str(e) for e in m["resumed_from"]))
    if m.get("state_bytes"):
        lines.append(f"- per-user distillation state: {m['state_bytes'] / 2**20:.1f} MiB")
    for split in ("test", "valid"):
        if split in m:
            n = m[split].get("n_users")
            lines += ["", f"## {split.capitalize()}" + (f" ({n} users)" if n is not None else ""), ""]
            lines += metric_table(m[split])
    lines += ["", "## Training", "", f"![training loss and valid {select} per evaluation]({CURVES})", ""]
    if history:
        lines += [f"| epoch | phase | loss | valid {select} |", "|---|---|---|---|"]
        for h in history:
            v = h.get("valid", {}).get(select)
            mark = " (best)" if h["epoch"] == m.get("best_epoch") else ""
            lines.append(f"| {h['epoch']}{mark} | {h.get('phase', '')} | {_fmt(h.get('loss'), '{:.4g}')} | "
                         f"{_fmt(v, '{:.4f}')} |")
    else:
        lines.append("No evaluation was recorded.")
    progress = m.get("dkc_progress") or []
    if progress:
        names = _stage_names(m, len(progress[0]["mean_stage"]))
        lines += ["", "## DKC stage progress", "", f"![DKC stage progress]({STAGES})", "",
                  "Fraction of (user, teacher) pairs at the final stage, and each teacher's mean stage "
                  "over users (0 = the easiest snapshot).", "",
                  "| epoch | at final stage | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for p in progress:
            lines.append(f"| {p['epoch']} | {p['final_fraction']:.3f} | "
                         + " | ".join(f"{s:.2f}" for s in p["mean_stage"]) + " |")
    lines += _stage_lines(m.get("trajectory_stages"))
    return "\n".join(lines) + "\n"


def _stage_lines(stages: dict[str, Any] | None) -> list[str]:
    """Which epochs each trajectory stage comes from, and the test metrics of each stage's ensemble."""
    if not stages:
        return []
    n = len(stages["ensemble_test"])
    lines = ["", "## Trajectory stages", "", "Training epoch of each teacher's snapshot per stage, and the "
             "test metrics of the teachers' ensemble built from that stage alone.", "",
             "| teacher | " + " | ".join(f"stage {s}" for s in range(n)) + " |", "|---|" + "---|" * n]
    for uri, epochs in stages["epochs"].items():
        lines.append(f"| {teacher_label(uri)} | " + " | ".join(str(e) for e in epochs) + " |")
    for key in ("recall@50", "ndcg@50", "recall@20"):
        if key in stages["ensemble_test"][0]:
            lines.append(f"| ensemble {key} | " + " | ".join(f"{e[key]:.4f}" for e in stages["ensemble_test"]) + " |")
    return lines


def metric_table(split: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per metric (recall, ndcg, popularity lift, ARP, coverage, ...), one
    column per cutoff K; keys without ``@K`` are left out."""
    names: list[str] = []
    ks: set[int] = set()
    for key in split:
        if "@" in key:
            name, k = key.rsplit("@", 1)
            if name not in names:
                names.append(name)
            ks.add(int(k))
    order = sorted(ks)
    lines = ["| metric | " + " | ".join(f"@{k}" for k in order) + " |", "|---|" + "---|" * len(order)]
    for name in names:
        fmt = _FORMATS.get(name, "{:.4f}")
        lines.append(f"| {_LABELS.get(name, name)} | " + " | ".join(_fmt(split.get(f"{name}@{k}"), fmt) for k in order)
                     + " |")
    return lines


def teacher_label(uri: str) -> str:
    """``.../teachers/MF/trajectory`` -> ``MF``; otherwise the last path component."""
    parts = str(uri).rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 and parts[-1] == "trajectory" else parts[-1]


# --------------------------------------------------------------------------- plots


def _curves_png(m: dict[str, Any], select: str) -> bytes:
    fig, (ax_loss, ax_valid) = _figure(2)
    history = m.get("history") or []
    if not history:
        ax_loss.text(0.5, 0.5, "no evaluation recorded", ha="center", va="center", transform=ax_loss.transAxes)
    epochs = [h["epoch"] for h in history]
    phases = [h.get("phase", "") for h in history]
    for phase in dict.fromkeys(phases):                               # in order of appearance
        xs = [e for e, p in zip(epochs, phases) if p == phase]
        ys = [h.get("loss", math.nan) for h, p in zip(history, phases) if p == phase]
        ax_loss.plot(xs, ys, marker="o", markersize=3, label=phase or "loss")
    ax_loss.set_ylabel("training loss (epoch sum)")
    if len(set(phases)) > 1:
        ax_loss.legend(title="phase", fontsize="small")
    values = [h.get("valid", {}).get(select, math.nan) for h in history]
    ax_valid.plot(epochs, values, marker="o", markersize=3, color="tab:green")
    ax_valid.set_ylabel(f"valid {select}")
    ax_valid.set_xlabel("epoch")
    best = m.get("best_epoch")
    if best in epochs:
        for ax in (ax_loss, ax_valid):
            ax.axvline(best, color="grey", linestyle="--", linewidth=1)
        ax_valid.annotate(f"best: epoch {best}", (best, values[epochs.index(best)]), textcoords="offset points",
                          xytext=(5, -12), fontsize="small")
    fig.suptitle(f"Student ({m.get('method', '?')}): training")
    return _png(fig)


def _stages_png(m: dict[str, Any]) -> bytes:
    progress = m["dkc_progress"]
    fig, (ax_final, ax_mean) = _figure(2)
    epochs = [p["epoch"] for p in progress]
    ax_final.plot(epochs, [p["final_fraction"] for p in progress], marker="o", markersize=3, color="tab:purple")
    ax_final.set_ylim(-0.02, 1.02)
    ax_final.set_ylabel("(user, teacher) pairs\nat the final stage")
    names = _stage_names(m, len(progress[0]["mean_stage"]))
    for t, name in enumerate(names):
        ax_mean.plot(epochs, [p["mean_stage"][t] for p in progress], marker="o", markersize=3, label=name)
    ax_mean.set_ylabel("mean stage")
    ax_mean.set_xlabel("epoch")
    ax_mean.legend(fontsize="small", ncol=min(len(names), 3))
    fig.suptitle(f"Student ({m.get('method', '?')}): DKC progress")
    return _png(fig)


def _figure(rows: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------- helpers


def _default_select(m: dict[str, Any]) -> str:
    keys = list((m.get("valid") or {}).keys())
    for h in m.get("history") or []:
        keys = list(h.get("valid", {}).keys()) or keys
        break
    if DEFAULT_SELECT in keys or not keys:
        return DEFAULT_SELECT
    return next((k for k in keys if k.startswith("recall@")), keys[0])


def _stage_names(m: dict[str, Any], n: int) -> list[str]:
    names = [teacher_label(u) for u in m.get("teachers") or []]
    return names if len(names) == n else [f"teacher {t}" for t in range(n)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, fmt: str) -> str:
    return fmt.format(v) if _is_number(v) else "-"
