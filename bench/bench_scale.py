"""Scale-out of the distillation: users 100k, 500k, 2M over a 100k-item catalogue, 1 and 2 workers on this host.

Per size, synthetic data is written once (under ``--workdir``, default /tmp/scale_bench; removed after the
size's runs) and reused by every run of that size:

- a prepared dataset (``storage.open_output``, the layout ``hetcomp prepare`` writes: each split sorted by
  user, row groups of at most 2^20 rows with statistics and page checksums) over 100,000 items with a
  power-law popularity (draws p(rank r) ~ (r + 10)^-0.8, items shuffled against their ranks), 10-20 train
  items per user. Only a fixed subset of 5,000 users (evenly spread over the ids, so every worker has
  its share) gets one valid and one test item: the full-ranking evaluation (every valid / test call, the
  four trajectory-stage ensembles at the end) then costs the same at every size, and what grows with
  the users is the training, the targets and DKC;
- 6 teachers x 4 snapshots x top-100 (the trajectory shape of the real runs) plus each teacher's
  observed ranking, written with the real ``TrajectoryWriter`` streamed in blocks of 65,536 users. Each
  user has a pool of 322 distinct power-law items (its train, valid and test items and 300 candidates);
  every list is 100 distinct pool items outside the user's train items, so lists of one user overlap.
  The pools are kept in a memmap while the trajectories are written: no dense users x items matrix and
  no whole trajectory is ever held.

Each run is the REAL :func:`hetcomp_dist.distill.train.distill` in W spawned processes (a gloo group on
127.0.0.1, as tests/test_resume_workers.py; also for W = 1), one torch thread each (OMP_NUM_THREADS=1,
``distill.threads: 1``), ``method: hetcomp``, ``batch_unit: users`` (batch_size 1024), ``sampled_negatives:
1000`` (the exact softmax over 100k items, a B x 100k score matrix per batch, is out of reach on the 2
shared cores of this host), ``max_epochs: 1``, ``eval_every: 1`` (one evaluation: DKC's start, the best
state, one checkpoint), ``checkpoint: true``. Optimizers: ``rowwise_adam`` at every size and W; dense
``adam`` at ``--adam-sizes`` with W = 1, for the slope side by side.

Per rank it records:

- peak RSS (/proc VmHWM, and getrusage's ru_maxrss of the process from its parent), with the RSS after
  the imports apart; the checkpoint read below is excluded from the run's peak (VmHWM is reset around it);
- ``rank_bytes`` of metrics.json (what the rank holds by part), divided by users;
- the epoch's ``epoch_seconds`` (the loop's own: training batches only), the setup before the first
  batch (load, student build, P_u and T_u), ``seconds.eval`` (valid evaluation + DKC's first discrepancy
  over every user) and the wall time; beside each, the process's CPU seconds over the same block (every
  thread; ``Stopping.timing`` is wrapped, the loop is unchanged), steadier than wall time on a shared host;
- checkpoint write: ``seconds.snapshot`` of the run (``Stopping.timing("snapshot")`` around
  ``_save_checkpoint``: the rank's ``Checkpointer.save_shards``, rank 0's shared part and manifest
  included, barriers too);
- checkpoint read: a hook (``distill(hooks=...)``, called on every rank right after the evaluation's
  checkpoint) times ``checkpointer(out, cfg).load_shards(start, stop)`` on the checkpoint the run has
  just written, every rank at once, as a resume does. Both go to and from the page cache of a local
  disk (no fsync): they measure serialisation, hashing and copying, not a disk or an object store. A
  real resume also rebuilds T_u from the trajectories (``KDObjective.load_state_dict``), the same
  cost as the setup's T_u build; that is not in the read time.

    nice -n 5 .venv/bin/python bench/bench_scale.py --sizes 100k 500k          # ~25 min at load 3-6 on 2 CPUs
    nice -n 5 .venv/bin/python bench/bench_scale.py --sizes 2M --adam-sizes    # ~65 min there (10 of them data)
    nice -n 5 .venv/bin/python bench/bench_scale.py --render                   # table + plot from the results

Results accumulate in <workdir>/results.json (one entry per size, W, optimizer; without it, in the copy
embedded at the end of bench/out/scale.md, so a later call for another size adds to the committed
table); each call rewrites bench/out/scale.md and bench/out/scale.png from all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hetcomp_dist.benchutil import call_in_subprocess, load_average, markdown_table, pyplot, save_figure

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]

N_ITEMS, ALPHA, R0 = 100_000, 0.8, 10
TEACHERS, SNAPSHOTS, K = 6, 4, 100
RECALLS = (0.5, 0.7, 0.85, 1.0)                 # snapshot metrics: finish() keeps all four
TRAIN_MIN, TRAIN_MAX, POOL = 10, 20, 300
SLOTS = TRAIN_MAX + 2 + POOL                    # per user: train slots, valid, test, list candidates
EVAL_USERS = 5_000
BLOCK = 65_536                                  # users per generated block (~2^20 train rows)
RESULTS_MARK = "<!-- bench_scale results: "


# ----------------------------------------------------------------------------- data generation

def _pools(seed: int, block: int, n: int, item_of_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [n, SLOTS] distinct items per user in random order, int64 [n] train counts) of one block.

    Ranks are drawn by inverting p(r) ~ (r + R0)^-ALPHA on [0, n_items - SLOTS) (n_items: the length of
    ``item_of_rank``), sorted per user, and
    made distinct by pushing repeats to the next free ranks (a running maximum): exactly SLOTS distinct
    items per user, no rejection loop.
    """
    rng = np.random.default_rng([seed, block])
    n_items, a = len(item_of_rank), 1.0 - ALPHA
    lo, hi = R0 ** a, (n_items - SLOTS + R0) ** a
    ranks = ((lo + rng.random((n, SLOTS)) * (hi - lo)) ** (1 / a) - R0).astype(np.int64)
    ranks.sort(axis=1)
    step = np.arange(SLOTS)
    ranks = np.maximum.accumulate(np.minimum(ranks, n_items - SLOTS - 1) - step, axis=1) + step
    order = np.argsort(rng.random((n, SLOTS)), axis=1)          # random roles, not popularity order
    return item_of_rank[np.take_along_axis(ranks, order, 1)].astype(np.int32), rng.integers(
        TRAIN_MIN, TRAIN_MAX + 1, n)


def _write_dataset(uri: str, n_users: int, seed: int, pool_path: Path, n_items: int = N_ITEMS,
                   eval_users: int = EVAL_USERS) -> dict:
    """The prepared dataset, streamed block by block; the pools go to a memmap for the trajectories."""
    import pyarrow as pa

    from hetcomp_dist import storage
    from hetcomp_dist.data.prepare import ROW_GROUP

    item_of_rank = np.random.default_rng([seed, 99]).permutation(n_items)
    pools = np.lib.format.open_memmap(pool_path, mode="w+", dtype=np.int32, shape=(n_users, SLOTS))
    n_train = np.lib.format.open_memmap(pool_path.with_suffix(".train.npy"), mode="w+", dtype=np.int8,
                                        shape=(n_users,))
    stride = max(1, n_users // eval_users)
    counts = {"train": 0, "valid": 0, "test": 0}
    schema = pa.schema([("user", pa.int32()), ("item", pa.int32())])
    options = {"write_statistics": True, "write_page_checksum": True}
    with storage.open_output(uri, kind="dataset", config={"synthetic": "bench_scale", "seed": seed}) as out, \
            contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(out.parquet_writer(f"{name}.parquet", schema, **options))
                   for name in counts}
        for b, lo in enumerate(range(0, n_users, BLOCK)):
            hi = min(n_users, lo + BLOCK)
            pool, n = _pools(seed, b, hi - lo, item_of_rank)
            pools[lo:hi], n_train[lo:hi] = pool, n
            users = np.arange(lo, hi, dtype=np.int32)
            mask = np.arange(TRAIN_MAX)[None, :] < n[:, None]
            held = users % stride == 0
            held &= users // stride < eval_users
            rows = {"train": (np.repeat(users, n), pool[:, :TRAIN_MAX][mask]),
                    "valid": (users[held], pool[held, TRAIN_MAX]), "test": (users[held], pool[held, TRAIN_MAX + 1])}
            for name, (u, i) in rows.items():
                writers[name].write_table(pa.table({"user": u, "item": i}, schema=schema), row_group_size=ROW_GROUP)
                counts[name] += len(u)
        meta = {"source": f"synthetic power-law (bench_scale, seed {seed})", "n_users": n_users, "n_items": n_items,
                "n_interactions": sum(counts.values()), "n_interactions_kept": sum(counts.values()),
                "splits": counts, "n_eval_users": {"valid": counts["valid"], "test": counts["test"],
                                                   "valid_and_test": counts["valid"]}}
        out.write_json("meta.json", meta)
        out.extra.update(meta=meta)
    pools.flush(), n_train.flush()
    return counts


def _list_batches(pools: np.ndarray, seed: int, t: int, s: int):
    """Teacher t's snapshot s: per user 100 distinct items of its candidate pool (a fixed permutation of
    the pool's slots, cyclically shifted per user), in blocks of users."""
    pick = np.random.default_rng([seed, 1000 + t * SNAPSHOTS + s]).permutation(POOL)[:K]
    for b, lo in enumerate(range(0, len(pools), BLOCK)):
        hi = min(len(pools), lo + BLOCK)
        shift = np.random.default_rng([seed, 2000 + t * SNAPSHOTS + s, b]).integers(0, POOL, hi - lo)
        cols = TRAIN_MAX + 2 + (pick[None, :] + shift[:, None]) % POOL
        yield np.arange(lo, hi, dtype=np.int64), np.take_along_axis(np.asarray(pools[lo:hi]), cols, 1)


def _observed_batches(pools: np.ndarray, n_train: np.ndarray, t: int):
    """Teacher t's observed ranking: the user's train items, rotated by t (-1 padded), in blocks of users."""
    j = np.arange(TRAIN_MAX)[None, :]
    for lo in range(0, len(pools), BLOCK):
        hi = min(len(pools), lo + BLOCK)
        n = np.asarray(n_train[lo:hi]).astype(np.int64)[:, None]
        items = np.take_along_axis(np.asarray(pools[lo:hi, :TRAIN_MAX]), (j + t) % n, 1)
        yield np.arange(lo, hi, dtype=np.int64), np.where(j < n, items, -1).astype(np.int32)


def generate(root: str, n_users: int, seed: int = 0, n_items: int = N_ITEMS, eval_users: int = EVAL_USERS) -> dict:
    """Dataset + 6 trajectories of ``n_users`` users over ``n_items`` items under ``root`` (run in a child process)."""
    from hetcomp_dist.teachers.trajectory import TrajectoryWriter

    root_p = Path(root)
    root_p.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool_path = root_p / "pools.npy"
    counts = _write_dataset(str(root_p / "dataset"), n_users, seed, pool_path, n_items, eval_users)
    t_data = time.perf_counter()
    pools = np.load(pool_path, mmap_mode="r")
    n_train = np.load(pool_path.with_suffix(".train.npy"), mmap_mode="r")
    uris, on_disk = [], 0
    for t in range(TEACHERS):
        uri = str(root_p / f"teacher{t}")
        writer = TrajectoryWriter(uri, model=f"synthetic{t}", n_users=n_users, k=K, n_items=n_items)
        for s in range(SNAPSHOTS):
            writer.write_snapshot(10 * (s + 1), {"recall@20": RECALLS[s]}, _list_batches(pools, seed, t, s))
        manifest = writer.finish(_observed_batches(pools, n_train, t))
        on_disk += sum(p["bytes"] for p in manifest["parts"].values())
        uris.append(uri)
    del pools, n_train
    pool_path.unlink()
    pool_path.with_suffix(".train.npy").unlink()
    return {"dataset": str(root_p / "dataset"), "teachers": uris, "n_users": n_users, "counts": counts,
            "data_seconds": t_data - t0, "trajectory_seconds": time.perf_counter() - t_data,
            "trajectory_bytes": on_disk}


# ----------------------------------------------------------------------------- one rank of a run

def rank_main(spec: dict) -> None:
    """One rank (``--rank-worker``): the real distill() in the gloo group, its measurements to a JSON file."""
    from hetcomp_dist.benchutil import reset_peak_rss, rss_mib
    import torch.distributed as dist

    from hetcomp_dist.distill.config import DistillConfig
    from hetcomp_dist.distill.student import user_range
    from hetcomp_dist.distill.train import checkpointer, distill

    import_rss = rss_mib("VmHWM")
    cpu = _count_cpu_seconds()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DistillConfig(**spec["cfg"])
    rec = {"rank": rank, "world": world, "import_rss_mb": import_rss}
    start, stop = user_range(spec["n_users"], rank, world)

    def read_checkpoint(event: dict, r: int, w: int) -> None:
        rec["peak_before_read_mb"] = rss_mib("VmHWM")
        rec["t_hook"], rec["cpu_hook"] = time.perf_counter(), time.process_time()
        reset_peak_rss()
        t0 = time.perf_counter()
        loaded = checkpointer(spec["out"], cfg).load_shards(start, stop)
        rec["read_seconds"] = time.perf_counter() - t0
        rec["read_ok"] = isinstance(loaded, tuple) and len(loaded[1]["user"]) == stop - start
        rec["read_peak_mb"] = rss_mib("VmHWM")
        del loaded
        reset_peak_rss()
        rec["t_after_hook"] = time.perf_counter()

    events: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = distill(spec["dataset"], spec["teachers"], cfg, spec["out"], report=events.append,
                      hooks=[read_checkpoint])
    t_end = time.perf_counter()
    epoch = next(e for e in events if e.get("event") == "epoch")
    sec = metrics["seconds"]
    rec.update(epoch_seconds=epoch["epoch_seconds"], eval_seconds=sec["eval"], write_seconds=sec["snapshot"],
               setup_seconds=rec["t_hook"] - t0 - sec["train"] - sec["eval"] - sec["snapshot"],
               finish_seconds=t_end - rec["t_after_hook"], wall_seconds=t_end - t0,
               peak_rss_mb=max(rec["peak_before_read_mb"], rss_mib("VmHWM")), rank_bytes=metrics["rank_bytes"],
               held_users=stop - start, recall50=metrics["test"]["recall@50"],
               epoch_cpu=cpu["train"], eval_cpu=cpu["eval"], write_cpu=cpu["snapshot"],
               setup_cpu=rec["cpu_hook"] - c0 - cpu["train"] - cpu["eval"] - cpu["snapshot"])
    Path(spec["result"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


def _count_cpu_seconds() -> dict[str, float]:
    """Process CPU seconds (every thread) of each ``Stopping.timing`` block (train, eval, snapshot), beside
    the loop's own wall seconds: the host is shared, so wall time carries the other jobs' load. The loop
    runs unchanged; only the timer is wrapped."""
    from hetcomp_dist import loop

    cpu = {"train": 0.0, "eval": 0.0, "snapshot": 0.0}
    wall_timing = loop.Stopping.timing

    @contextlib.contextmanager
    def timing(self, what: str):
        c0 = time.process_time()
        try:
            with wall_timing(self, what):
                yield
        finally:
            cpu[what] = cpu.get(what, 0.0) + time.process_time() - c0

    loop.Stopping.timing = timing
    return cpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> list[float]:
    """Reap every rank (os.wait4: its own ru_maxrss, MiB); all are killed if one fails or the deadline passes."""
    peaks, left, failed = {}, {p.pid: p for p in procs}, None
    while left:
        for pid in list(left):
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got:
                code = os.waitstatus_to_exitcode(status)
                left.pop(pid).returncode = code
                peaks[pid] = usage.ru_maxrss / 1024
                failed = failed or (f"a rank exited with status {code}" if code else None)
        if left and (failed or time.monotonic() > deadline):
            for p in left.values():
                p.kill()
            for pid in list(left):
                os.wait4(pid, 0)
            raise RuntimeError(failed or "killed: the budget's deadline passed")
        time.sleep(0.5)
    return [peaks[p.pid] for p in procs]


# ----------------------------------------------------------------------------- runs

def run_config(data: dict, world: int, optimizer: str, root: Path, deadline: float,
               extra: dict | None = None, label: str | None = None) -> dict:
    """One distill() run in ``world`` spawned ranks; the per-rank records and the run's summary.
    ``extra``: distill settings on top of this bench's; ``label`` names the run (default: the optimizer)."""
    label = label or optimizer
    out = root / f"student-w{world}-{label}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"method": "hetcomp", "batch_unit": "users", "sampled_negatives": 1000, "optimizer": optimizer,
           "max_epochs": 1, "eval_every": 1, "checkpoint": True, "threads": 1, "seed": 0, **(extra or {})}
    result = root / f"w{world}-{label}"
    spec = {"cfg": cfg, "dataset": data["dataset"], "teachers": data["teachers"], "n_users": data["n_users"],
            "out": str(out), "result": str(result)}
    port, load_before, code = _free_port(), os.getloadavg()[0], code_version()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", json.dumps(spec)], env=env, cwd=REPO))
    t0 = time.perf_counter()
    child_peaks = _wait_all(procs, deadline)
    wall = time.perf_counter() - t0
    ranks = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out, ignore_errors=True)
    for r, peak in zip(ranks, child_peaks):
        r["child_maxrss_mb"] = peak
    row = summarize(data["n_users"], world, optimizer, ranks, wall, (load_before + os.getloadavg()[0]) / 2)
    return {**row, "code": code, "started": time.strftime("%H:%M:%S", time.gmtime(time.time() - wall))}


def code_version() -> str:
    """The commit the ranks import, and the package files changed on top of it (other engineers edit the tree)."""
    git = lambda *a: subprocess.run(["git", "--no-optional-locks", *a], cwd=REPO, capture_output=True,  # noqa: E731
                                    text=True).stdout
    changed = [line[3:] for line in git("status", "--porcelain", "--", "hetcomp_dist").splitlines() if line.strip()]
    head = git("rev-parse", "--short", "HEAD").strip()
    return head + (f" + uncommitted {', '.join(changed)}" if changed else "")


def summarize(n_users: int, world: int, optimizer: str, ranks: list[dict], wall: float, load: float) -> dict:
    """The run's row: per-worker figures are the worst rank's (the step is synchronous)."""
    worst = lambda key: max(r[key] for r in ranks)  # noqa: E731
    held = [sum(r["rank_bytes"][r["rank"]].values()) for r in ranks]
    epoch = worst("epoch_seconds")
    return {"users": n_users, "world": world, "optimizer": optimizer, "load": load, "wall_seconds": wall,
            "peak_rss_mb": worst("peak_rss_mb"), "child_maxrss_mb": worst("child_maxrss_mb"),
            "import_rss_mb": worst("import_rss_mb"), "resident_mb": max(held) / 2 ** 20,
            "bytes_per_user": max(held) / n_users, "bytes_per_held_user": max(b / r["held_users"] for b, r in zip(held, ranks)),
            "rank_bytes": ranks[0]["rank_bytes"], "epoch_seconds": epoch, "s_per_1000_users": epoch / (n_users / 1000),
            "setup_seconds": worst("setup_seconds"), "eval_seconds": worst("eval_seconds"),
            "finish_seconds": worst("finish_seconds"), "write_seconds": worst("write_seconds"),
            "read_seconds": worst("read_seconds"), "read_ok": all(r["read_ok"] for r in ranks),
            "read_peak_mb": worst("read_peak_mb"), "recall50": ranks[0]["recall50"],
            "epoch_cpu": worst("epoch_cpu"), "cpu_s_per_1000_users": worst("epoch_cpu") / (n_users / 1000),
            "setup_cpu": worst("setup_cpu"), "eval_cpu": worst("eval_cpu"), "write_cpu": worst("write_cpu")}


def run_size(args: argparse.Namespace, n_users: int, results: dict, deadline: float) -> None:
    """Generate one size, run its configurations (results saved after each), remove its data."""
    root = Path(args.workdir) / f"u{n_users}"
    shutil.rmtree(root, ignore_errors=True)
    data, child = call_in_subprocess(generate, {"root": str(root), "n_users": n_users}, deadline=deadline)
    print(f"{n_users:,} users: data {data['data_seconds']:.0f} s, trajectories {data['trajectory_seconds']:.0f} s "
          f"({data['trajectory_bytes'] / 1e9:.2f} GB), {data['counts']}; {load_average()}", flush=True)
    results.setdefault("generation", {})[str(n_users)] = {**data, "peak_rss_mb": child.peak_rss_mib}
    configs = [(w, "rowwise_adam") for w in args.workers]
    configs += [(1, "adam")] if n_users in args.adam_sizes else []
    try:
        for world, optimizer in configs:
            key = f"{n_users}/{world}/{optimizer}"
            try:
                results["runs"][key] = row = run_config(data, world, optimizer, root, deadline)
            except (RuntimeError, OSError, StopIteration, KeyError) as e:
                results["missing"][key] = str(e)
                print(f"  {key}: NOT MEASURED ({e})", flush=True)
                continue
            results["missing"].pop(key, None)
            save_results(args, results)
            print(f"  W={world} {optimizer}: epoch {row['epoch_seconds']:.1f} s, setup {row['setup_seconds']:.0f} s, "
                  f"eval {row['eval_seconds']:.0f} s, peak RSS {row['peak_rss_mb']:,.0f} MB, "
                  f"{row['bytes_per_user']:.0f} B/user, ckpt write {row['write_seconds']:.2f} s read "
                  f"{row['read_seconds']:.2f} s, wall {row['wall_seconds']:.0f} s; {load_average()}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def save_results(args: argparse.Namespace, results: dict) -> None:
    path = Path(args.workdir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- table and plot

def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def series(results: dict) -> dict[tuple[int, str], list[dict]]:
    """Runs by (workers, optimizer), in order of users."""
    out: dict[tuple[int, str], list[dict]] = {}
    for row in sorted(results["runs"].values(), key=lambda r: (r["world"], r["optimizer"], r["users"])):
        out.setdefault((row["world"], row["optimizer"]), []).append(row)
    return out


def _both(r: dict, wall: str, cpu: str, fmt: str = "{:,.0f}") -> str:
    """'wall / cpu' seconds (cpu: '-' for runs recorded before CPU times were)."""
    return fmt.format(r[wall]) + " / " + (fmt.format(r[cpu]) if cpu in r else "-")


def table(results: dict) -> list[str]:
    head = ["users", "W", "optimizer", "peak RSS / worker MB", "of it imports MB", "resident MB / worker",
            "B / user / worker", "B / held user", "epoch s wall / cpu", "s / 1000 users wall / cpu",
            "setup s wall / cpu", "eval + DKC s wall / cpu", "ckpt write s", "ckpt read s", "run wall s", "load"]
    rows = [[f"{r['users']:,}", r["world"], r["optimizer"], f"{r['peak_rss_mb']:,.0f}", f"{r['import_rss_mb']:,.0f}",
             f"{r['resident_mb']:,.1f}", f"{r['bytes_per_user']:,.0f}", f"{r['bytes_per_held_user']:,.0f}",
             _both(r, "epoch_seconds", "epoch_cpu", "{:,.1f}"), _both(r, "s_per_1000_users", "cpu_s_per_1000_users", "{:.3f}"),
             _both(r, "setup_seconds", "setup_cpu"), _both(r, "eval_seconds", "eval_cpu"), f"{r['write_seconds']:.2f}",
             f"{r['read_seconds']:.2f}", f"{r['wall_seconds']:,.0f}", f"{r['load']:.1f}"]
            for rows_ in series(results).values() for r in rows_]
    return [markdown_table(head, rows)]


def slopes(results: dict) -> list[str]:
    """Log-log slopes against users, per (W, optimizer) with two sizes or more."""
    head = ["W", "optimizer", "sizes", "epoch s wall", "epoch s cpu", "s / 1000 users wall", "s / 1000 users cpu",
            "peak RSS", "peak RSS - imports", "resident bytes", "setup s cpu", "eval + DKC s cpu", "ckpt write s",
            "ckpt read s"]
    rows = []
    for (world, optimizer), runs in series(results).items():
        if len(runs) < 2:
            continue
        u = [r["users"] for r in runs]

        def col(key: str) -> str:
            ys = [r.get(key) for r in runs]
            return "-" if any(y is None or y <= 0 for y in ys) else f"{slope(u, ys):.2f}"

        for r in runs:
            r["rss_above_imports"] = r["peak_rss_mb"] - r["import_rss_mb"]
        rows.append([world, optimizer, " / ".join(f"{x:,}" for x in u)] + [col(k) for k in (
            "epoch_seconds", "epoch_cpu", "s_per_1000_users", "cpu_s_per_1000_users", "peak_rss_mb", "rss_above_imports",
            "resident_mb", "setup_cpu", "eval_cpu", "write_seconds", "read_seconds")])
    return [markdown_table(head, rows)] if rows else ["(one size only: no slope)"]


def parts_table(results: dict) -> list[str]:
    """rank_bytes of rank 0 by part, MB (the item-side arrays are in every rank's)."""
    head = ["users", "W", "optimizer", "data", "student", "optimizer state", "objective", "total"]
    rows = []
    for runs in series(results).values():
        for r in runs:
            b = r["rank_bytes"][0]
            rows.append([f"{r['users']:,}", r["world"], r["optimizer"]] +
                        [f"{b[k] / 2 ** 20:,.1f}" for k in ("data", "student", "optimizer", "objective")] +
                        [f"{sum(b.values()) / 2 ** 20:,.1f}"])
    return [markdown_table(head, rows)]


def plot(path: Path, results: dict) -> None:
    """Four panels against users: RSS per worker, bytes per user per worker, s per 1000 users, checkpoint times."""
    from matplotlib.ticker import NullFormatter

    fig, axes = pyplot().subplots(2, 2, figsize=(11, 8))
    sizes = sorted({r["users"] for r in results["runs"].values()})
    (rss, per_user), (speed, ckpt) = axes
    for i, ((world, optimizer), runs) in enumerate(series(results).items()):
        u = np.array([r["users"] for r in runs], float)
        label, style = f"W={world} {optimizer}", {"color": f"C{i}", "marker": "o" if optimizer == "rowwise_adam" else "s"}
        rss.plot(u, [r["peak_rss_mb"] for r in runs], "-", label=label, **style)
        per_user.plot(u, [r["bytes_per_user"] for r in runs], "-", label=label, **style)
        speed.plot(u, [r["s_per_1000_users"] for r in runs], "-", label=f"{label} wall", **style)
        if all("cpu_s_per_1000_users" in r for r in runs):
            speed.plot(u, [r["cpu_s_per_1000_users"] for r in runs], ":", label=f"{label} cpu", **style)
        ckpt.plot(u, [r["write_seconds"] for r in runs], "-", label=f"{label} write", **style)
        ckpt.plot(u, [r["read_seconds"] for r in runs], ":", label=f"{label} read", **style)
    titles = (("peak RSS per worker", "MB"), ("resident bytes per user, per worker (rank_bytes / users)", "bytes"),
              ("epoch seconds per 1,000 users (wall, and process CPU)", "seconds"), ("checkpoint write (snapshot) and read (load_shards)", "seconds"))
    for ax, (title, unit) in zip(axes.flat, titles):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_title(title, fontsize=9)
        ax.set_xlabel("users"), ax.set_ylabel(unit), ax.legend(fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sizes, [f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" for n in sizes])
    save_figure(fig, path)


def render(results: dict, command: str) -> str:
    gen = results.get("generation", {})
    lines = [f"# Distillation scale-out: users x workers ({N_ITEMS:,} items)", "", f"    $ {command}", "",
             f"Synthetic power-law data, {TEACHERS} teachers x {SNAPSHOTS} snapshots x top-{K}, {TRAIN_MIN}-{TRAIN_MAX} "
             f"train items per user, valid/test items for {EVAL_USERS:,} users only. The real `distill()` in W "
             "gloo processes on one 2-core host shared with other jobs (nice 5), one thread each; `hetcomp`, "
             "`batch_unit: users` (1024), `sampled_negatives: 1000`, `max_epochs: 1`, `eval_every: 1`, checkpoints "
             "on. See bench/bench_scale.py's docstring for what each column measures.", "",
             "Per worker = the worst rank. B / user / worker = the rank's `rank_bytes` / all users (wants 1/W); "
             "B / held user = / the rank's own users. epoch s = the loop's `epoch_seconds` (training batches "
             "only); cpu = the process's CPU seconds over the same block (every thread), steadier than wall time "
             "on this shared host. setup = load + student build + P_u + T_u, before the first batch. eval + DKC = the valid "
             "evaluation (5,000 users) and DKC's first discrepancy (the student's top-50 over all items for every "
             "user). ckpt write = `seconds.snapshot` (save_shards), ckpt read = `load_shards` of that checkpoint, "
             "all ranks at once; both through the page cache. load = 1-min load average (2 CPUs), mean of start "
             "and end.", ""]
    lines += table(results) + ["", "Log-log slopes against users (1 = linear; epoch s wants <= 1.05, "
                                   "s / 1000 users wants ~0):", ""] + slopes(results)
    lines += ["", "rank_bytes of rank 0 by part (MB):", ""] + parts_table(results)
    lines += ["", "Data generation (not measured): " + "; ".join(
        f"{int(n):,} users {g['data_seconds'] + g['trajectory_seconds']:.0f} s, trajectories "
        f"{g['trajectory_bytes'] / 1e9:.2f} GB on disk" for n, g in sorted(gen.items(), key=lambda kv: int(kv[0])))]
    codes = {k: r.get("code", "not recorded (see the docs)") for k, r in sorted(results["runs"].items())}
    lines += ["", "Code each run imported (commit + package files uncommitted at its start):"]
    lines += [f"- {k}: {v}" for k, v in codes.items()]
    if results.get("missing"):
        lines += ["", "Not measured:"] + [f"- {k}: {v}" for k, v in sorted(results["missing"].items())]
    kept = {k: results.get(k) for k in ("runs", "missing", "generation", "commands")}
    lines += ["", f"{RESULTS_MARK}{json.dumps(kept, separators=(',', ':'))} -->"]   # for a later size's call to merge
    return "\n".join(lines) + "\n"


def earlier_results(workdir: str) -> dict:
    """<workdir>/results.json, else the results embedded in bench/out/scale.md (the data is removed after a bench)."""
    path = Path(workdir) / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    md = OUT / "scale.md"
    text = md.read_text() if md.exists() else ""
    if RESULTS_MARK not in text:
        return {}
    return json.loads(text.split(RESULTS_MARK, 1)[1].rsplit(" -->", 1)[0])


def write_outputs(results: dict, command: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    text = render(results, command)
    (OUT / "scale.md").write_text(text)
    if results["runs"]:
        plot(OUT / "scale.png", results)
    print("\n" + text)


# ----------------------------------------------------------------------------- command line

def users_arg(text: str) -> int:
    """100k, 2M or a plain number."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=users_arg, nargs="*", default=[100_000, 500_000], help="users (100k, 2M, ...)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (rowwise_adam)")
    ap.add_argument("--adam-sizes", type=users_arg, nargs="*", default=[100_000, 500_000],
                    help="sizes also run with dense adam, W = 1")
    ap.add_argument("--workdir", default="/tmp/scale_bench", help="generated data and results.json")
    ap.add_argument("--budget-minutes", type=float, default=240, help="a run still going then is killed")
    ap.add_argument("--render", action="store_true", help="only rewrite scale.md / scale.png from results.json")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in results.json")
    ap.add_argument("--rank-worker", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.rank_worker:
        rank_main(json.loads(args.rank_worker))
        return
    if os.nice(0) < 5:
        os.nice(5 - os.nice(0))
    command = "nice -n 5 .venv/bin/python bench/bench_scale.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = {} if args.fresh else earlier_results(args.workdir)
    results.setdefault("runs", {}), results.setdefault("missing", {})
    results.setdefault("commands", [])
    if not args.render:
        results["commands"].append(command)
    if not args.render:
        print(f"$ {command}\n{load_average()} at the start", flush=True)
        deadline = time.monotonic() + 60 * args.budget_minutes
        for n_users in sorted(args.sizes):
            if time.monotonic() > deadline:
                results["missing"][f"{n_users}"] = "not run: the budget was spent"
                continue
            run_size(args, n_users, results, deadline)
            save_results(args, results)
    write_outputs(results, " ; ".join(dict.fromkeys(results["commands"])))


if __name__ == "__main__":
    main()
