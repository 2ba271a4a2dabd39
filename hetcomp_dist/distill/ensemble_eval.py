"""Each teacher alone and the teachers' ensemble, evaluated on the run's dataset (ALGORITHM.md §4, §8).

The rows of the "each teacher alone" and "the ensemble" baselines: every teacher's FINAL
trajectory snapshot (its best model's top-K unobserved items per user) ranks items by itself,
and the ensemble ranks them by summed rank importance exp(-r / temperature) over the teachers'
final lists (:class:`~hetcomp_dist.distill.ensemble.ListScorer`, the target HetComp distils
once every DKC stage is final). Evaluation is the full-ranking protocol of
:func:`hetcomp_dist.evaluate.evaluate_sums` (valid and test, the dataset's evaluated users).

Streaming: users are taken in contiguous id blocks of ``block_users``; for each block only the
final snapshot's rows of that block are read (the Parquet row groups covering it), every model
is evaluated on the block's evaluated users, and the additive :class:`RankingSums` are merged.
Memory is one block's lists (``block_users x teachers x K`` int32, 38 MiB for 16,384 users, 6
teachers, K=100) plus the evaluator's ``eval_batch_size x n_items`` scores, whatever the
number of users.

A single teacher's ranking is its list order (scored exp(-r / K): positive and strictly
decreasing, so independent of ``temperature``). Items in no list (score 0) are unranked, as in
:func:`~hetcomp_dist.distill.ensemble.ensemble_topk`: where a user's lists hold fewer than K
rankable items (after excluding the other held-out split) the remaining ranks stay empty (never
hits, not in popularity lift / ARP / coverage) rather than being filled with arbitrary items. The
metric cutoffs must not exceed the teachers' K.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from hetcomp_dist import lineage, storage
from hetcomp_dist.config import ConfigError
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.distill import teacher_weights
from hetcomp_dist.distill.ensemble import ListScorer, shifted_scorer
from hetcomp_dist.evaluate import RankingSums, evaluate_sums
from hetcomp_dist.run import RunConfig
from hetcomp_dist.storage import StorageError
from hetcomp_dist.teachers.trajectory import TrajectoryReader


ENSEMBLE = "ensemble"
WEIGHTED = "ensemble (valid-weighted)"
KIND = "ensemble-evaluation"
POP_K = 50                       # popularity lift, ARP and coverage are reported at this cutoff
COMPARE_METRIC = "recall@50"     # the ensemble-vs-best-teacher check (test split)
SPLITS = ("test", "valid")
DEFAULT_BLOCK_USERS = 16384      # a multiple of the trajectories' row groups (4096 users by default)


def teacher_names(cfg: RunConfig) -> list[str]:
    """The evaluated teachers: ``distill.teachers`` if set, else every teacher of the run config."""
    names = cfg.teacher_names()
    if not names:
        raise ConfigError("no teachers: the run config lists none (teachers: [...] or distill.teachers)")
    if len(set(names)) != len(names):
        raise ConfigError(f"teacher names repeat: {names}")
    return names


def trajectory_uris(cfg: RunConfig, names: list[str]) -> list[str]:
    """Each teacher's trajectory URI; a StorageError naming it if its trajectory is not complete."""
    uris = cfg.layout.trajectories(names)
    for name, uri in zip(names, uris):
        if not storage.is_complete(uri):
            raise StorageError(f"teacher {name!r}: no complete trajectory at {uri} "
                               f"(no {storage.MANIFEST}; train it with `hetcomp train-teachers`)")
    return uris


def evaluate_ensemble(cfg: RunConfig, temperature: float | None = None,
                      block_users: int = DEFAULT_BLOCK_USERS,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate each teacher's final snapshot and the ensemble of all of them on valid and test.

    Args:
        cfg: the run config: its dataset (``<run>/dataset``, already prepared), teachers
            (``distill.teachers`` or all), ``ks``, ``eval_batch_size``, ``distill.temperature``.
        temperature: rank-importance temperature of the ensemble (default ``cfg.distill.temperature``).
        block_users: users per streamed block (memory ~ block_users x teachers x K x 4 bytes).
        progress: called as ``progress(users_done, n_users)`` after each block.

    Returns:
        ``{"models": {name: {"test": metrics, "valid": metrics, "seconds": s}}`` with one entry
        per teacher (config order) then ``"ensemble"``; each metrics dict is
        :meth:`RankingSums.metrics` for ``ks = cfg.ks + [50]``. Also ``"comparison"`` (the best
        teacher on test recall@50 and the ensemble's relative gain over it), ``"teachers"``
        (name, uri, model, final epoch), ``"temperature"``, ``"ks"``, ``"dataset"``,
        ``"n_users"``, ``"seconds"``.
    """
    t_start = time.perf_counter()
    temperature = cfg.distill.temperature if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature}")
    if block_users < 1:
        raise ValueError(f"block_users must be >= 1, got {block_users}")
    names = teacher_names(cfg)
    uris = trajectory_uris(cfg, names)
    data, reader = _open(cfg, names, uris)
    ks = tuple(sorted(set(int(k) for k in cfg.ks) | {POP_K}))
    k_list = min(reader.ks)
    if max(ks) > k_list:
        raise ConfigError(f"cutoff {max(ks)} exceeds the teachers' list length K={k_list}")

    weighted = _weight_candidates(cfg, reader, uris)
    models = [*names, ENSEMBLE, *weighted]
    results_models = _stream(cfg, data, reader, names, models, weighted, ks, k_list, temperature, block_users, progress)
    weights_record = None
    if weighted:
        results_models, weights_record = _choose_weighted(cfg, results_models, weighted)
    teachers = [{"name": n, "uri": u, "model": m.get("model"), "final_epoch": m["trajectory"][-1]["epoch"]}
                for n, u, m in zip(names, uris, reader.manifests)]
    return {
        "dataset": cfg.dataset_uri,
        "temperature": temperature,
        "ks": list(ks),
        "report_ks": [int(k) for k in cfg.ks],
        "list_k": k_list,
        "n_users": int(len(data.eval_users())),
        "teachers": teachers,
        "models": results_models,
        "comparison": compare(results_models, names),
        "teacher_weights": weights_record,
        "seconds": time.perf_counter() - t_start,
    }


def _weight_candidates(cfg: RunConfig, reader: TrajectoryReader, uris: list[str]) -> dict[str, torch.Tensor]:
    """Model name -> teacher weights to evaluate besides the equal-weight ensemble (distill.teacher_weights)."""
    if cfg.distill.teacher_weights == "equal":
        return {}
    values = teacher_weights.valid_metrics(reader.manifests, uris, cfg.distill.select_metric)
    return {f"ensemble (weights p={p:g})": w for p, w in teacher_weights.candidates(values).items()}


def _stream(cfg: RunConfig, data, reader: TrajectoryReader, names: list[str], models: list[str],
            weighted: dict[str, torch.Tensor], ks: tuple[int, ...], k_list: int, temperature: float,
            block_users: int, progress) -> dict[str, dict[str, Any]]:
    """Every model's valid and test metrics, the users streamed in blocks of ``block_users``."""
    n_items = data.n_items
    sums = {split: {m: RankingSums.zeros(ks, n_items) for m in models} for split in SPLITS}
    seconds = dict.fromkeys(models, 0.0)
    eval_users = data.eval_users()
    for lo in range(0, data.n_users, block_users):
        hi = min(lo + block_users, data.n_users)
        users = eval_users[(eval_users >= lo) & (eval_users < hi)]
        if len(users) == 0:
            continue
        first, stop = int(users[0]), int(users[-1]) + 1
        lists = reader.final(first, stop, k=k_list)                           # [stop-first, T, K]
        scorers = {name: shifted_scorer(ListScorer(lists[:, t:t + 1], n_items, temperature=float(k_list)), first)
                   for t, name in enumerate(names)}
        scorers[ENSEMBLE] = shifted_scorer(ListScorer(lists, n_items, temperature=temperature), first)
        for name, w in weighted.items():
            scorers[name] = shifted_scorer(ListScorer(lists, n_items, temperature, w), first)
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            for split in SPLITS:
                part = evaluate_sums(scorer, data.train, data.split(split),
                                     exclude=[data.held_out_besides(split)], ks=ks,
                                     batch_size=cfg.eval_batch_size, users=users)
                sums[split][name] = sums[split][name].merge(part)
            seconds[name] += time.perf_counter() - t0
        if progress is not None:
            progress(hi, data.n_users)
    return {m: {**{split: sums[split][m].metrics() for split in SPLITS}, "seconds": seconds[m]} for m in models}


def _choose_weighted(cfg: RunConfig, models: dict[str, Any], weighted: dict[str, torch.Tensor]):
    """The weight candidate best on valid becomes "ensemble (valid-weighted)"; the others are dropped."""
    metric = cfg.distill.select_metric
    best = max(weighted, key=lambda n: (models[n]["valid"][metric], -list(weighted).index(n)))
    record = {"chosen": best, "weights": weighted[best].tolist(),
              "valid": {n: models[n]["valid"][metric] for n in weighted}}
    kept = {n: m for n, m in models.items() if n not in weighted}
    kept[WEIGHTED] = models[best]
    return kept, record


def _open(cfg: RunConfig, names: list[str], uris: list[str]) -> tuple[Any, TrajectoryReader]:
    """The run's dataset and the teachers' trajectories, checked to belong together."""
    if not storage.is_complete(cfg.dataset_uri):
        raise StorageError(f"{cfg.dataset_uri}: no prepared dataset (run `hetcomp train-teachers` or "
                           "`hetcomp prepare` for this run first)")
    data = load_dataset(cfg.dataset_uri)
    lineage.check_trajectories(cfg.dataset_uri, uris)     # written for this very dataset
    reader = TrajectoryReader(uris)
    if reader.n_users != data.n_users:
        raise StorageError(f"trajectories have {reader.n_users} users, the dataset at {cfg.dataset_uri} "
                           f"{data.n_users}: they come from another dataset")
    for name, uri, m in zip(names, uris, reader.manifests):
        if m.get("n_items") not in (None, data.n_items):
            raise StorageError(f"teacher {name!r} ({uri}): {m['n_items']} items, the dataset {data.n_items}")
    return data, reader


def compare(models: dict[str, dict[str, Any]], teachers: list[str],
            metric: str = COMPARE_METRIC, split: str = "test") -> dict[str, Any]:
    """The best single teacher on ``split`` ``metric`` and the ensemble's gain over it."""
    best = max(teachers, key=lambda n: _finite(models[n][split][metric]))
    b, e = models[best][split][metric], models[ENSEMBLE][split][metric]
    out = {"metric": metric, "split": split, "best_teacher": best, "best_value": b, "ensemble_value": e,
           "relative_gain": (e - b) / b if b else float("nan")}
    if WEIGHTED in models:
        w = models[WEIGHTED][split][metric]
        out.update(weighted_value=w, weighted_gain=(w - b) / b if b else float("nan"))
    return out


def format_table(results: dict[str, Any], split: str = "test") -> str:
    """Markdown table of ``split``: one row per teacher then the ensemble; recall/NDCG at the
    run's cutoffs, popularity lift (%), ARP and coverage at 50."""
    ks = results.get("report_ks", results["ks"])
    head = ["model"] + [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + \
        [f"popularity_lift@{POP_K}", f"arp@{POP_K}", f"coverage@{POP_K}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["models"].items():
        t = r[split]
        cells = [f"**{name}**" if name == ENSEMBLE else name]
        cells += [f"{t[f'{m}@{k}']:.4f}" for k in ks for m in ("recall", "ndcg")]
        cells += [f"{t[f'popularity_lift@{POP_K}']:.1f}", f"{t[f'arp@{POP_K}']:.1f}", f"{t[f'coverage@{POP_K}']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_comparison(results: dict[str, Any]) -> str:
    """One line: the best single teacher and the ensemble's relative gain over it."""
    c = results["comparison"]
    line = (f"best single teacher on {c['split']} {c['metric']}: {c['best_teacher']} ({c['best_value']:.4f}); "
            f"ensemble {c['ensemble_value']:.4f} ({c['relative_gain'] * 100:+.1f}% relative)")
    if "weighted_value" in c:
        line += f"; valid-weighted ensemble {c['weighted_value']:.4f} ({c['weighted_gain'] * 100:+.1f}% relative)"
    return line


def format_report(results: dict[str, Any]) -> str:
    """report.md: settings, the test and valid tables, the comparison, the teachers' trajectories."""
    lines = [
        "# Teachers and their ensemble",
        "",
        f"Dataset `{results['dataset']}`, {results['n_users']} evaluated users; each teacher's final "
        f"snapshot (top-{results['list_k']}) alone, and the ensemble of all of them with rank importance "
        f"exp(-r / {results['temperature']:g}). Full ranking over all items; popularity lift in percent.",
        "",
        "## Test",
        "",
        format_table(results, "test"),
        "",
        "## Valid",
        "",
        format_table(results, "valid"),
        "",
        format_comparison(results),
        "",
        "## Teachers",
        "",
        "| teacher | model | final epoch | trajectory |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['name']} | {t['model']} | {t['final_epoch']} | `{t['uri']}` |" for t in results["teachers"]]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: str) -> dict[str, Any]:
    """Write metrics.json and report.md under ``out`` (manifest last); returns the manifest."""
    config = {"temperature": results["temperature"], "ks": results["ks"],
              "teachers": [t["name"] for t in results["teachers"]], "dataset": results["dataset"]}
    with storage.open_output(out, kind=KIND, config=config) as o:
        o.write_json("metrics.json", results)
        o.write_bytes("report.md", format_report(results).encode())
    return storage.read_manifest(out)


# --------------------------------------------------------------------------- internals


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -math.inf
