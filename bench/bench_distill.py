"""Benchmark the distillation loop (ALGORITHM.md §4-6): epoch time, peak memory and per-worker state vs users.

One worker, ``--threads`` torch threads (default 2), CiteULike-sized data: 5,219 users x 25,181 items,
~79k train interactions, 6 teachers x 4 snapshots x K=100, and synthetic copies of it with 10x and 100x
the users (``--sizes``) over the same items.

Data (all under a temp dir, removed at the end):

- 1x: CiteULike-t prepared by ``hetcomp_dist.data.prepare`` (the real data and split; its mirror
  under $HETCOMP_DATASETS_DIR if set, else the registry's download).
- Fx: F copies of every real user (copy c of user u is user c*5219+u) with the same train / valid /
  test counts; copy c > 0 maps items through a bijection that shuffles items only within blocks of 16
  neighbours in popularity rank, so per-user counts and the popularity shape stay those of CiteULike
  while copies differ. Written with ``storage.open_output`` in the prepared-dataset layout.
- Trajectories (every size, 1x included: no real teacher run is assumed): 6 synthetic teachers x 4
  snapshots of popularity-shaped top-100 lists (teacher t draws items ~ (train count + 1)^e_t without
  the user's train items, distinct per list), plus each teacher's observed ranking (the train items in a
  random order). They are written with the real :class:`TrajectoryWriter` (4 snapshots at recall@20
  0.5 / 0.7 / 0.85 / 1.0, so ``finish`` keeps all four), streamed one user copy (5,219 users) at a
  time: no dense users x items matrix and no whole trajectory is held while writing, at any size.
  List contents matter for model quality, not for the step's cost (shapes: users per batch, K, the
  train items excluded, n_items).

What is measured, each in its own subprocess (so ``ru_maxrss`` is that run's own peak):

- ``loop`` (1x only): the real :func:`hetcomp_dist.distill.train.distill` with ``max_epochs=1``,
  ``eval_every=1`` (it needs one evaluation to have a best state), ``checkpoint=False``: the epoch time
  is the loop's own ``epoch_seconds`` (the training batches only; the evaluation, DKC's first
  discrepancy and writing the outputs come after and are in the wall time), ``state_bytes`` is
  ``metrics["state_bytes"]``, peak RSS is the whole run's.
- ``setup`` (every size): what ``distill()`` does before its first batch, on one worker owning every
  user: load the dataset, read all users' trajectories and observed rankings
  (``TrajectoryReader``), P_u (``_observed_ranking``), T_u at stage 0 (``TargetBuilder``), the
  sampler's ``PairIndex`` and the student. Seconds, peak RSS after it, and the state bytes counted as
  ``distill()`` counts them (lists x 4 + targets x 8 + P x 8 + stages x 8).
- ``steps`` (every size, same subprocess as setup): the L_O step of the loop (epoch 1 of ``hetcomp``)
  called piece by piece as ``distill()`` calls it: batches drawn as the loop draws them
  (``default_rng([seed, epoch]).permutation`` over train interactions, or over users with train items
  for ``batch_unit=users``), ``np.unique`` users, ``Interactions.padded`` + T_u as the exclusion,
  ``akt.unobserved_exp_sum`` (exact, or ``sampled_negatives`` = 1000 / 4000), ``akt.list_scores``,
  ``akt.overall_loss``, ``zero_grad`` / ``backward`` / ``optimizer.step`` / ``loss.item()``, on a
  ``Student`` with fused Adam. Each variant times ``--batches`` batches after ``--warmup`` untimed ones;
  the variants alternate in chunks of ``--chunk`` batches so background load falls on all alike. All six
  variants (exact / s1000 / s4000 x interactions / users) run at the smallest size; the larger sizes run
  ``--scaling-variants`` (default exact/interactions: the per-batch cost does not depend on the number
  of users, the number of batches does). Wall and process-CPU seconds per batch are both reported.
  Epoch time is PROJECTED: mean seconds per batch x batches per epoch (no per-epoch overheads).

P_u and T_u (ensemble_topk through a dense 1024 x n_items buffer per 1024 users) are built and timed for
the first ``--max-setup-batches`` x 1024 users; past that their time is projected (x users) and the
remaining rows are filled by tiling, so the memory (and the measured peak RSS) is that of a full build.

    nice -n 5 .venv/bin/python bench/bench_distill.py --plot            # 1x, 10x, 100x (~17 min at load 12)
    nice -n 5 .venv/bin/python bench/bench_distill.py --sizes 1 10      # quick (~6 min at load 12)
    ... --loop-units users interactions      # also the real 78-batch epoch at 1x (~8 min at load 15)

Writes bench/out/distill_scaling.txt (the tables) and, with --plot, bench/out/distill_scaling.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetcomp_dist.benchutil import call_in_subprocess, load_average, peak_rss_mib, pyplot, save_figure

OUT = Path(__file__).resolve().parent / "out"

TEACHERS, SNAPSHOTS, K, OBSERVED_K = 6, 4, 100, 100
EXPONENTS = (0.6, 0.8, 1.0, 1.2, 0.9, 0.7)        # teacher t: p(item) ~ (train count + 1)^e_t
RECALLS = (0.5, 0.7, 0.85, 1.0)                    # snapshot metrics: finish() keeps all four
BLOCK = 16                                         # copies shuffle items within popularity blocks of this size
VARIANTS = ("exact/interactions", "s1000/interactions", "s4000/interactions",
            "exact/users", "s1000/users", "s4000/users")


# ----------------------------------------------------------------------------- data generation

def make_base(base: str, seed: int = 0) -> dict:
    """Prepare CiteULike-t and draw the prototype trajectories of its users (numpy files)."""
    base = Path(base)
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.data.prepare import prepare

    prepare("citeulike-t", str(base / "dataset"), progress=False)
    data = load_dataset(str(base / "dataset"))
    n_users, n_items = data.n_users, data.n_items
    train = data.train
    counts = train.item_counts().astype(np.float64)
    keys = np.sort(train.users().astype(np.int64) * n_items + train.indices)
    rng = np.random.default_rng(seed)
    lists = np.empty((n_users, TEACHERS, SNAPSHOTS, K), np.int32)
    for t, e in enumerate(EXPONENTS):
        cdf = np.cumsum((counts + 1) ** e)
        cdf /= cdf[-1]
        for s in range(SNAPSHOTS):
            lists[:, t, s] = _draw_lists(np.arange(n_users), cdf, keys, n_items, rng)
    observed = np.full((n_users, TEACHERS, OBSERVED_K), -1, np.int32)
    for u in range(n_users):
        own = train.items_of(u)
        for t in range(TEACHERS):
            ranked = rng.permutation(own)[:OBSERVED_K]
            observed[u, t, :len(ranked)] = ranked
    np.save(base / "lists.npy", lists)
    np.save(base / "observed.npy", observed)
    return {"n_users": n_users, "n_items": n_items, "train": train.nnz}


def _draw_lists(users: np.ndarray, cdf: np.ndarray, train_keys: np.ndarray, n_items: int,
                rng: np.random.Generator, n_cand: int = 4 * K) -> np.ndarray:
    """int32 [len(users), K]: distinct items drawn from ``cdf``, none of them the user's train items."""
    out = np.empty((len(users), K), np.int32)
    todo = np.arange(len(users))
    while len(todo):
        cand = np.minimum(np.searchsorted(cdf, rng.random((len(todo), n_cand))), n_items - 1)
        key = users[todo, None].astype(np.int64) * n_items + cand
        pos = np.minimum(np.searchsorted(train_keys, key), len(train_keys) - 1)
        bad = train_keys[pos] == key                                     # the user's train item
        order = np.argsort(cand, axis=1, kind="stable")                  # repeats after their first draw
        sorted_c = np.take_along_axis(cand, order, 1)
        dup = np.zeros_like(bad)
        np.put_along_axis(dup, order[:, 1:], sorted_c[:, 1:] == sorted_c[:, :-1], 1)
        ok = ~(bad | dup)
        enough = ok.sum(1) >= K
        first = np.argsort(~ok, axis=1, kind="stable")[:, :K]           # first K valid draws, in draw order
        out[todo[enough]] = np.take_along_axis(cand, first, 1)[enough]
        todo = todo[~enough]
        n_cand *= 2
    return out


def copy_perm(c: int, order_by_pop: np.ndarray) -> np.ndarray | None:
    """Item bijection of copy ``c`` (None: identity), shuffling items within popularity blocks."""
    if c == 0:
        return None
    rng = np.random.default_rng([7, c])
    n = len(order_by_pop)
    ranks = np.arange(n)
    shuffled = ranks.copy()
    for lo in range(0, n, BLOCK):
        shuffled[lo:lo + BLOCK] = rng.permutation(ranks[lo:lo + BLOCK])
    perm = np.empty(n, np.int32)
    perm[order_by_pop] = order_by_pop[shuffled]
    return perm


def _apply(perm: np.ndarray | None, items: np.ndarray) -> np.ndarray:
    if perm is None:
        return items
    return np.where(items >= 0, perm[np.maximum(items, 0)], items).astype(items.dtype)


def make_size(base: str, f: int, root: str) -> dict:
    """Write the dataset and the 6 trajectories of size ``f`` (x users) under ``root``."""
    base, root = Path(base), Path(root)
    import pyarrow as pa

    from hetcomp_dist import storage
    from hetcomp_dist.data.dataset import SPLITS, load_dataset
    from hetcomp_dist.teachers.trajectory import TrajectoryWriter

    t0 = time.perf_counter()
    data = load_dataset(str(base / "dataset"))
    n0, n_items = data.n_users, data.n_items
    order_by_pop = np.argsort(-data.train.item_counts(), kind="stable")
    perms = [copy_perm(c, order_by_pop) for c in range(f)]
    ds_uri = str(root / "dataset")
    if f == 1:
        ds_uri = str(base / "dataset")
    else:
        meta = dict(data.meta)
        meta.update(source=f"synthetic {f}x users of citeulike-t", n_users=n0 * f,
                    n_interactions_kept=meta["n_interactions_kept"] * f,
                    splits={k: v * f for k, v in meta["splits"].items()},
                    n_eval_users={k: v * f for k, v in meta["n_eval_users"].items()})
        with storage.open_output(ds_uri, kind="dataset", config={"synthetic": f}) as out:
            for name in SPLITS:
                split = data.split(name)
                users0, items0 = split.users(), split.indices
                users = np.concatenate([users0 + c * n0 for c in range(f)]).astype(np.int32)
                items = np.concatenate([_apply(perms[c], items0) for c in range(f)]).astype(np.int32)
                out.write_table(f"{name}.parquet", pa.table({"user": users, "item": items}), row_group_size=1 << 20)
            out.write_json("meta.json", meta)
    del data
    data_s = time.perf_counter() - t0
    lists = np.load(base / "lists.npy", mmap_mode="r")
    observed = np.load(base / "observed.npy", mmap_mode="r")

    def batches(t: int, s: int | None):
        for c in range(f):
            rows = np.asarray(lists[:, t, s] if s is not None else observed[:, t])
            yield np.arange(c * n0, (c + 1) * n0, dtype=np.int64), _apply(perms[c], rows)

    uris, bytes_on_disk = [], 0
    for t in range(TEACHERS):
        uri = str(root / f"teacher{t}")
        writer = TrajectoryWriter(uri, model=f"synthetic{t}", n_users=n0 * f, k=K, n_items=n_items)
        for s in range(SNAPSHOTS):
            writer.write_snapshot(10 * (s + 1), {"recall@20": RECALLS[s]}, batches(t, s))
        manifest = writer.finish(batches(t, None))
        bytes_on_disk += sum(p["bytes"] for p in manifest["parts"].values())
        uris.append(uri)
    return {"dataset": ds_uri, "teachers": uris, "n_users": n0 * f, "n_items": n_items,
            "data_seconds": data_s, "write_seconds": time.perf_counter() - t0 - data_s,
            "trajectory_bytes_on_disk": bytes_on_disk}


# ----------------------------------------------------------------------------- measured runs

def run_loop(spec: dict, batch_unit: str, threads: int, out: str) -> dict:
    """The real distill() for one epoch (1x)."""
    from hetcomp_dist.distill.config import DistillConfig
    from hetcomp_dist.distill.train import distill

    cfg = DistillConfig(method="hetcomp", max_epochs=1, eval_every=1, checkpoint=False, threads=threads,
                        batch_unit=batch_unit)
    events = []
    t0 = time.perf_counter()
    metrics = distill(spec["dataset"], spec["teachers"], cfg, out, report=events.append)
    wall = time.perf_counter() - t0
    epoch = next(e for e in events if e.get("event") == "epoch")
    return {"epoch_seconds": epoch["epoch_seconds"], "wall_seconds": wall, "train_seconds": metrics["train_seconds"],
            "state_bytes": metrics["state_bytes"], "peak_rss_mb": peak_rss_mib()}


@dataclass
class State:
    """What distill() holds before its first batch, on one worker owning every user."""

    data: Any
    observed_rank: Any             # P_u, [U, observed_size]
    targets: Any                   # T_u at stage 0, [U, target_size]
    train_users: np.ndarray        # the user of each train interaction
    units: np.ndarray              # the users with train items
    setup: dict                    # seconds, memory and sizes of the setup


def build_state(spec: dict, cfg, max_setup_batches: int) -> State:
    """Setup as distill() does it: load the dataset, then the KD objective (P_u and T_u at stage 0,
    built from the trajectories read by row group in blocks of users; the lists are not kept) and
    the sampler's PairIndex. ``max_setup_batches`` is kept for the command line; the build is whole."""
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.distill.objectives import KDObjective
    from hetcomp_dist.distill.student import build_student
    from hetcomp_dist.models import sampling
    from hetcomp_dist.teachers.trajectory import TrajectoryReader

    rss_start, t0 = peak_rss_mib(), time.perf_counter()
    data = load_dataset(spec["dataset"])
    n_users, n_items = data.n_users, data.n_items
    t_data = time.perf_counter()
    reader = TrajectoryReader(spec["teachers"])
    student = build_student(n_users, n_items, cfg.dim, cfg.init_std, 0, n_users)
    objective = KDObjective(cfg, data, student, reader, 0, n_users, 0)
    t_targets = time.perf_counter()
    train_users, units = data.train.users(), np.flatnonzero(data.train.counts() > 0)
    sampling.PairIndex(data.train)                       # distill() builds it before the loop; its memory counts
    lists_bytes = n_users * reader.n_teachers * reader.n_snapshots * min(reader.ks) * 4
    setup = {"setup_seconds": t_targets - t0, "load_seconds": t_data - t0, "read_seconds": 0.0,
             "observed_seconds": 0.0, "targets_seconds": t_targets - t_data, "build_projected": False,
             "built_users": n_users, "setup_rss_mb": peak_rss_mib(), "import_rss_mb": rss_start,
             "state_bytes": objective.state_bytes(), "lists_bytes": lists_bytes, "n_users": n_users,
             "nnz": data.train.nnz, "n_units": len(units), "stages": reader.n_snapshots}
    return State(data, objective.observed.long(), objective.targets.long(), train_users, units, setup)


class StepVariant:
    """One L_O step variant ("exact/interactions", "s1000/users", ...), on its own student and optimizer."""

    def __init__(self, name: str, cfg, state: State):
        import torch

        from hetcomp_dist.distill.student import Student

        self.name, self.cfg, self.state = name, cfg, state
        neg, self.unit = name.split("/")
        self.sampled = 0 if neg == "exact" else int(neg[1:])
        data = state.data
        torch.manual_seed(cfg.seed)
        self.student = Student(data.n_users, data.n_items, cfg.dim)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.item_weight = self.student.tables.weight("item")
        for p in self.student.parameters():
            p.grad = torch.zeros_like(p)
        self.sampler = np.random.default_rng(cfg.seed)
        rng = np.random.default_rng([cfg.seed, 1])                     # epoch 1's order, as the loop draws it
        self.order = rng.permutation(data.train.nnz if self.unit == "interactions" else len(state.units))
        self.batches_per_epoch = -(-len(self.order) // cfg.batch_size)
        self.next = 0
        self.times: list[list[float]] = []
        self.cpu: list[float] = []
        self.users: list[int] = []

    def _draw(self):
        """The next batch's users (as a tensor), their P_u, T_u and exclusion lists."""
        import torch

        lo = (self.next % self.batches_per_epoch) * self.cfg.batch_size
        self.next += 1
        rows = self.order[lo:lo + self.cfg.batch_size]
        users = np.unique(self.state.train_users[rows] if self.unit == "interactions" else self.state.units[rows])
        local = torch.from_numpy(users.astype(np.int64))
        p, t = self.state.observed_rank[local], self.state.targets[local]
        return local, p, t, torch.cat([torch.from_numpy(self.state.data.train.padded(users)), t], 1)

    def step(self, timed: bool) -> None:
        import torch

        from hetcomp_dist import distributed
        from hetcomp_dist.distill import akt

        cfg = self.cfg
        c0, t0 = time.process_time(), time.perf_counter()
        local, p, t, exclude = self._draw()
        t1 = time.perf_counter()
        u_emb = self.student.tables(user=local)["user"]
        sample = torch.from_numpy(self.sampler.integers(0, self.item_weight.shape[0], self.sampled)) if self.sampled else None
        rest = akt.unobserved_exp_sum(u_emb, self.item_weight, exclude, cfg.score_clamp, sample)
        s_p = akt.list_scores(u_emb, self.item_weight, p, cfg.score_clamp)
        s_t = akt.list_scores(u_emb, self.item_weight, t, cfg.score_clamp)
        loss = cfg.lo_weight * akt.overall_loss(s_p, s_t, p, t, rest, None).sum()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        t3 = time.perf_counter()
        distributed.all_reduce_grad(self.item_weight)
        self.opt.step()
        loss.item()
        t4, c4 = time.perf_counter(), time.process_time()
        if timed:
            self.times.append([t1 - t0, t2 - t1, t3 - t2, t4 - t3])
            self.cpu.append(c4 - c0)
            self.users.append(len(local))

    def summary(self) -> dict:
        parts = np.array(self.times)
        per_batch = parts.sum(1)
        return {"batches_timed": len(per_batch), "s_per_batch": float(per_batch.mean()),
                "s_per_batch_median": float(np.median(per_batch)), "cpu_s_per_batch": float(np.mean(self.cpu)),
                "parts_ms": (parts.mean(0) * 1e3).tolist(), "users_per_batch": float(np.mean(self.users)),
                "batches_per_epoch": self.batches_per_epoch,
                "epoch_projected_s": float(per_batch.mean()) * self.batches_per_epoch}


def run_steps(spec: dict, threads: int, batches: int, warmup: int, chunk: int, max_setup_batches: int) -> dict:
    """Setup as distill() does it, then the timed L_O steps of each variant, alternating in chunks."""
    import torch

    from hetcomp_dist.distill.config import DistillConfig

    cfg = DistillConfig(threads=threads)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    state = build_state(spec, cfg, max_setup_batches)
    variants = [StepVariant(v, cfg, state) for v in spec["variants"]]
    for v in variants:
        for _ in range(warmup):
            v.step(timed=False)
    load_before = os.getloadavg()[0]
    t_steps = time.perf_counter()
    while any(len(v.times) < batches for v in variants):
        for v in variants:
            for _ in range(min(chunk, batches - len(v.times))):
                v.step(timed=True)
    return {**state.setup, "steps": {v.name: v.summary() for v in variants},
            "steps_wall_seconds": time.perf_counter() - t_steps,
            "load_during_steps": (load_before + os.getloadavg()[0]) / 2, "peak_rss_mb": peak_rss_mib()}


def child(fn, kwargs: dict, deadline: float) -> dict:
    """``fn(**kwargs)`` in a fresh process (its own peak RSS), killed at ``deadline`` (TimeoutError)."""
    try:
        result, proc = call_in_subprocess(fn, kwargs, deadline=deadline)
    except TimeoutError as e:
        raise TimeoutError(f"{fn.__name__} {e} (--budget-minutes reached)") from None
    return {**result, "child_seconds": proc.seconds, "child_peak_rss_mb": proc.peak_rss_mib}


# ----------------------------------------------------------------------------- report

def table_loop(loop: dict, steps: dict) -> list[str]:
    """A: the real distill() epoch at 1x."""
    lines = ["", "A. MEASURED: the real distill() loop, 1x (CiteULike-t), max_epochs=1, exact denominator, phase L_O",
             f"{'batch_unit':12s} {'batches/ep':>10s} {'epoch s':>8s} {'s/batch':>8s} {'run wall s':>10s} "
             f"{'state MB':>9s} {'peak RSS MB':>11s}"]
    for unit, r in loop.items():
        nb = steps[1]["steps"][f"exact/{unit}"]["batches_per_epoch"] if 1 in steps and f"exact/{unit}" in steps[1]["steps"] else None
        spb = f"{r['epoch_seconds'] / nb:8.3f}" if nb else f"{'':8s}"
        lines.append(f"{unit:12s} {nb if nb else '':>10} {r['epoch_seconds']:8.1f} {spb} {r['wall_seconds']:10.1f} "
                     f"{r['state_bytes'] / 1e6:9.1f} {r['child_peak_rss_mb']:11,.0f}")
    lines.append("epoch s: the loop's own epoch_seconds (training batches only); run wall: the whole distill() "
                 "call (load, setup, the epoch, one valid evaluation + DKC discrepancy, final test/valid "
                 "evaluation, outputs written).")
    return lines


def table_setup(gen: dict, steps: dict) -> list[str]:
    """B: the setup per size."""
    sizes = sorted(steps)
    lines = ["", "B. setup per size (what distill() does before its first batch, all users on one worker); "
             "* = PROJECTED from the first built users (see note), everything else MEASURED",
             f"{'size':>5s} {'users':>9s} {'train nnz':>11s} {'load s':>7s} {'read traj s':>11s} {'P_u s':>8s} "
             f"{'T_u s':>8s} {'setup s':>9s} {'state MB':>9s} {'state B/user':>12s} {'lists MB':>9s} "
             f"{'setup peak RSS MB':>17s} {'- imports':>9s} {'traj on disk MB':>15s}"]
    for f in sizes:
        r, g = steps[f], gen[f]
        star = "*" if r["build_projected"] else " "
        lines.append(f"{f:4d}x {r['n_users']:9,d} {r['nnz']:11,d} {r['load_seconds']:7.1f} {r['read_seconds']:11.1f} "
                     f"{r['observed_seconds']:7.1f}{star} {r['targets_seconds']:7.1f}{star} {r['setup_seconds']:8.1f}{star} "
                     f"{r['state_bytes'] / 1e6:9.1f} {r['state_bytes'] / r['n_users']:12,.0f} {r['lists_bytes'] / 1e6:9.1f} "
                     f"{r['setup_rss_mb']:17,.0f} {r['setup_rss_mb'] - r['import_rss_mb']:9,.0f} "
                     f"{g['trajectory_bytes_on_disk'] / 1e6:15.0f}")
    partial = [f"{f}x: {steps[f]['built_users']:,} of {steps[f]['n_users']:,}" for f in sizes if steps[f]["build_projected"]]
    lines.append("read traj: TrajectoryReader.trajectories + .observed for all users (4 x 6 snapshot parts + 6 "
                 "observed parts); P_u: _observed_ranking; T_u: TargetBuilder at stage 0 (both ensemble_topk over a "
                 "dense 1024 x n_items buffer per 1024 users). "
                 + (f"* P_u / T_u built and timed for the first users only ({'; '.join(partial)}), time scaled by "
                    "users (a constant cost per 1024-user batch); the other rows are filled by tiling the built "
                    "ones, so the state's memory is all there and the peak RSS is MEASURED."
                    if partial else ""))
    lines.append(f"state = lists (U x {TEACHERS} x {SNAPSHOTS} x {K} int32 = {TEACHERS * SNAPSHOTS * K * 4:,} B/user) + "
                 "T_u (U x 100 int64) + P_u (U x 10 int64) + stages (U x 6 int64), as distill() counts "
                 "metrics['state_bytes']; setup peak RSS includes the interpreter + torch "
                 f"(~{steps[sizes[0]]['import_rss_mb']:.0f} MB after imports).")
    return lines


def table_steps(warmup: int, loop: dict, steps: dict) -> list[str]:
    """C: the L_O step per variant and size, and the projection checked against the real loop."""
    lines = ["", "C. MEASURED per batch / PROJECTED per epoch: the L_O step (exact vs sampled denominator, "
             "batches of 1024 interactions vs 1024 users), variants alternating in one process per size",
             f"{'size':>5s} {'variant':20s} {'users/batch':>11s} {'timed':>5s} {'s/batch':>8s} {'median':>7s} {'cpu s':>6s} "
             f"{'draw ms':>7s} {'fwd ms':>7s} {'bwd ms':>7s} {'step ms':>7s} {'batches/ep':>10s} {'proj. epoch s':>13s} "
             f"{'load':>5s}"]
    for f in sorted(steps):
        r = steps[f]
        for name, s in r["steps"].items():
            d, fw, bw, st = s["parts_ms"]
            lines.append(f"{f:4d}x {name:20s} {s['users_per_batch']:11.0f} {s['batches_timed']:5d} {s['s_per_batch']:8.3f} "
                         f"{s['s_per_batch_median']:7.3f} {s['cpu_s_per_batch']:6.2f} {d:7.1f} {fw:7.1f} {bw:7.1f} {st:7.1f} "
                         f"{s['batches_per_epoch']:10,d} {s['epoch_projected_s']:13,.1f} {r['load_during_steps']:5.1f}")
    lines.append(f"timed: batches measured after {warmup} warm-up batches; s/batch: their mean wall time (median "
                 "beside it; cpu s: process CPU seconds per batch, all threads, spin-waits included); "
                 "draw: batch users + exclusion lists; fwd: exp-sum + list scores + L_O; bwd: backward; step: Adam "
                 "(+ all-reduce, a no-op on 1 worker) + loss.item(). proj. epoch s = s/batch x batches/ep: PROJECTED, "
                 "not run (no full epoch is run at any size in this table).")
    for unit, r in (loop.items() if 1 in steps else ()):
        s = steps[1]["steps"].get(f"exact/{unit}")
        if s:
            lines.append(f"check at 1x, exact/{unit}: projected {s['epoch_projected_s']:.1f} s vs the real loop's "
                         f"measured {r['epoch_seconds']:.1f} s per epoch (x{r['epoch_seconds'] / s['epoch_projected_s']:.2f})")
    return lines


def growth(steps: dict) -> list[str]:
    """Log-log slopes from the smallest to the largest size."""
    sizes = sorted(steps)
    if len(sizes) < 2:
        return []
    lo, hi = sizes[0], sizes[-1]
    a, b = steps[lo], steps[hi]
    slope = lambda y0, y1: np.log(y1 / y0) / np.log(b["n_users"] / a["n_users"])  # noqa: E731
    name = next((n for n in b["steps"] if n in a["steps"]), None)      # a variant timed at both sizes
    timed = ""
    if name:
        e0, e1 = a["steps"][name], b["steps"][name]
        timed = (f"{name} projected epoch {slope(e0['epoch_projected_s'], e1['epoch_projected_s']):.2f}, s/batch "
                 f"{slope(e0['s_per_batch'], e1['s_per_batch']):.2f}, ")
    return ["", f"growth {lo}x -> {hi}x users (log-log slopes; 1 = linear): {timed}state bytes "
                f"{slope(a['state_bytes'], b['state_bytes']):.2f}, setup peak RSS "
                f"{slope(a['setup_rss_mb'], b['setup_rss_mb']):.2f}, setup seconds "
                f"{slope(a['setup_seconds'], b['setup_seconds']):.2f}"]


def tables(args: argparse.Namespace, gen: dict, loop: dict, steps: dict) -> list[str]:
    lines = [f"distillation loop, 1 worker, {args.threads} threads, batch_size 1024, dim 6, "
             f"{TEACHERS} teachers x {SNAPSHOTS} snapshots x K={K}, 25,181 items"]
    lines += (table_loop(loop, steps) if loop else []) + table_setup(gen, steps) + table_steps(args.warmup, loop, steps)
    lines += growth(steps)
    lines += ["", "data generation (not part of the measurement): " + ", ".join(
        f"{f}x {g['data_seconds'] + g['write_seconds']:.0f} s (trajectories written {g['write_seconds']:.0f} s, "
        f"writer peak RSS {g['child_peak_rss_mb']:,.0f} MB)" for f, g in sorted(gen.items()))]
    return lines


def plot_time(ax, steps: dict, loop: dict, sizes: list[int], users: np.ndarray) -> None:
    names = [n for n in steps[sizes[-1]]["steps"] if all(n in steps[f]["steps"] for f in sizes)]
    for name in names:
        y = np.array([steps[f]["steps"][name]["epoch_projected_s"] for f in sizes])
        ax.plot(users, y, "o-", label=f"{name} (projected epoch)")
    if 1 in steps:
        for unit, r in loop.items():
            ax.plot([steps[1]["n_users"]], [r["epoch_seconds"]], "*", ms=12, label=f"real distill() epoch, {unit} (measured)")
    setup_s = np.array([steps[f]["setup_seconds"] for f in sizes])
    built = min(steps[f]["built_users"] for f in sizes)
    ax.plot(users, setup_s, "s--", color="k", label=f"setup (P_u/T_u build projected past {built:,} users)")
    ref = steps[sizes[0]]["steps"][names[0]]["epoch_projected_s"] if names else setup_s[0]
    ax.plot(users, ref * users / users[0], ":", color="grey", label="linear in users")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("users (1 worker)"), ax.set_ylabel("seconds")
    ax.set_title("distillation: epoch time"), ax.legend(fontsize=7)


def plot(path: Path, steps: dict, loop: dict) -> None:
    from matplotlib.ticker import NullFormatter

    sizes = sorted(steps)
    users = np.array([steps[f]["n_users"] for f in sizes], float)
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 4))
    plot_time(a, steps, loop, sizes, users)
    rss = np.array([steps[f]["setup_rss_mb"] for f in sizes]) / 1024
    state = np.array([steps[f]["state_bytes"] for f in sizes]) / 2 ** 30
    base_rss = np.array([steps[f]["import_rss_mb"] for f in sizes]) / 1024
    b.plot(users, rss, "o-", label="setup peak RSS")
    b.plot(users, rss - base_rss, "o--", label="setup peak RSS minus imports")
    b.plot(users, state, "s-", label="trajectory + target state")
    b.plot(users, state[0] * users / users[0], ":", color="grey", label="linear in users")
    b.set_xscale("log"), b.set_yscale("log"), b.set_xlabel("users (1 worker)"), b.set_ylabel("GiB")
    b.set_title("distillation: memory"), b.legend(fontsize=7)
    for ax in (a, b):
        ax.xaxis.set_minor_formatter(NullFormatter())
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="x CiteULike's users")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per variant and size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per variant first")
    ap.add_argument("--chunk", type=int, default=2, help="batches per turn when variants alternate")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="loss-step variants timed at the smallest size")
    ap.add_argument("--scaling-variants", nargs="+", default=["exact/interactions"], choices=VARIANTS,
                    help="variants timed at the larger sizes")
    ap.add_argument("--loop-units", nargs="*", default=["users"], choices=["interactions", "users"],
                    help="batch units of the real distill() epoch at 1x (none: skip; interactions: 78 batches, "
                         "~8 min under a load of 15)")
    ap.add_argument("--max-setup-batches", type=int, default=30,
                    help="user batches of 1024 for which P_u and T_u are built (and timed); more users: projected")
    ap.add_argument("--budget-minutes", type=float, default=15,
                    help="wall-clock budget: a child still running then is killed and its size reported as not measured")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default: the system's)")
    ap.add_argument("--plot", action="store_true", help="draw bench/out/distill_scaling.png")
    return ap.parse_args()


def measure_size(args: argparse.Namespace, base: Path, f: int, root: Path, deadline: float,
                 gen: dict, loop: dict, steps: dict) -> None:
    """Generate size ``f``, then (at 1x) the real loop, then setup + steps; results go into the dicts."""
    gen[f] = g = child(make_size, {"base": str(base), "f": f, "root": str(root)}, deadline)
    print(f"{f}x: data + trajectories written in {g['child_seconds']:.0f} s "
          f"({g['trajectory_bytes_on_disk'] / 1e6:,.0f} MB of trajectories); {load_average()}", flush=True)
    spec = {"dataset": g["dataset"], "teachers": g["teachers"]}
    if f == 1:
        for unit in args.loop_units:
            loop[unit] = child(run_loop, {"spec": spec, "batch_unit": unit, "threads": args.threads,
                                          "out": str(root / f"student-{unit}")}, deadline)
            print(f"  1x distill() one epoch, {unit}: {loop[unit]['epoch_seconds']:.1f} s (run "
                  f"{loop[unit]['wall_seconds']:.0f} s, peak RSS {loop[unit]['child_peak_rss_mb']:,.0f} MB)", flush=True)
    names = args.variants if f == min(args.sizes) else args.scaling_variants
    steps[f] = child(run_steps, {"spec": {**spec, "variants": names}, "threads": args.threads, "batches": args.batches,
                                 "warmup": args.warmup, "chunk": args.chunk,
                                 "max_setup_batches": args.max_setup_batches}, deadline)
    print(f"  {f}x setup {steps[f]['setup_seconds']:.0f} s, peak RSS {steps[f]['setup_rss_mb']:,.0f} MB; "
          f"steps {steps[f]['steps_wall_seconds']:.0f} s; {load_average()}", flush=True)


def run_sizes(args: argparse.Namespace, tmp: Path, deadline: float) -> tuple[dict, dict, dict, list[str]]:
    """Every size of --sizes within the budget: (gen, loop, steps, the sizes not measured)."""
    gen, loop, steps, missing = {}, {}, {}, []
    base = tmp / "base"
    base.mkdir()
    b = child(make_base, {"base": str(base)}, deadline)
    print(f"base: CiteULike-t {b['n_users']:,} users x {b['n_items']:,} items, {b['train']:,} train; "
          f"prototype trajectories drawn in {b['child_seconds']:.0f} s", flush=True)
    for f in sorted(args.sizes):
        root = tmp / f"x{f}"
        root.mkdir()
        try:
            measure_size(args, base, f, root, deadline, gen, loop, steps)
        except (TimeoutError, RuntimeError) as e:
            missing.append(f"{f}x: NOT MEASURED, {e}")
            print(f"  {missing[-1]}", flush=True)
            gen.pop(f, None)
            steps.pop(f, None)
        shutil.rmtree(root, ignore_errors=True)     # the 100x trajectories are GBs
        if time.monotonic() > deadline:
            missing += [f"{x}x: NOT MEASURED (budget spent)" for x in sorted(args.sizes) if x > f]
            break
    return gen, loop, steps, missing


def main() -> None:
    args = parse_args()
    if os.nice(0) < 5:
        os.nice(5 - os.nice(0))
    command = "nice -n 5 .venv/bin/python bench/bench_distill.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"$ {command}\n{load_average()} at the start", flush=True)
    t_all = time.perf_counter()
    deadline = time.monotonic() + 60 * args.budget_minutes
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_distill-") as tmp:
        gen, loop, steps, missing = run_sizes(args, Path(tmp), deadline)
    if not steps:
        print("\n".join(missing))
        return
    lines = [f"$ {command}", ""] + tables(args, gen, loop, steps) + ([""] + missing if missing else [])
    lines += ["", f"total {time.perf_counter() - t_all:.0f} s; {load_average()} at the end (other jobs share the 2 CPUs: "
                  "absolute times are inflated, variants of one size alternate so they share the load alike)"]
    text = "\n".join(lines)
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distill_scaling.txt").write_text(text + "\n")
    if args.plot:
        plot(OUT / "distill_scaling.png", steps, loop)
        print(f"plot: {OUT / 'distill_scaling.png'}")


if __name__ == "__main__":
    main()
