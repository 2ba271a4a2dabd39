"""Benchmark teacher-trajectory storage: bytes per user per snapshot, write and read throughput.

Data: Gowalla-sized top-K lists (29,858 users x 40,981 items, K=100 by default), synthetic but
shaped like a recommender's output: each list mixes globally popular items (popularity ~
(rank+1)^-0.8 over a scrambled id order) with items of the user's "home region" (64 regions,
as in a check-in dataset), ranked by a Plackett-Luce draw (Gumbel noise on log-popularity plus a
home-region boost). Observed rankings: per user a log-normal number of train items (mean ~28).

Per backend (a local folder; a moto S3 server this script starts on 127.0.0.1) and Parquet
compression, it writes ``--snapshots`` snapshots through :class:`TrajectoryWriter` (user batches
of ``--batch``, validation included, progress record included), finishes the trajectory (observed
rankings + manifest), then reads everything back and one shard of ``--row-group-users`` users.

    .venv/bin/python bench/bench_trajectory.py
    .venv/bin/python bench/bench_trajectory.py --compressions zstd --backends local --snapshots 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Iterator

import numpy as np

from hetcomp_dist import storage
from hetcomp_dist.teachers.trajectory import TrajectoryReader, TrajectoryWriter

BUCKET = "bench-trajectory"


def synthetic_topk(n_users: int, n_items: int, k: int, seed: int = 0, regions: int = 64,
                   chunk: int = 2048) -> np.ndarray:
    """int32 [n_users, k]: distinct items per row, in rank order (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pop = (np.arange(n_items) + 1.0) ** -0.8
    pop /= pop.sum()
    ids = rng.permutation(n_items).astype(np.int32)          # popularity rank -> item id
    region_of = rng.integers(0, regions, n_items)            # by popularity rank
    cdf = np.cumsum(pop)
    members = [np.flatnonzero(region_of == r) for r in range(regions)]
    region_cdf = [np.cumsum(pop[m]) / pop[m].sum() for m in members]
    out = np.empty((n_users, k), np.int32)
    for s in range(0, n_users, chunk):
        b = min(chunk, n_users - s)
        home = rng.integers(0, regions, b)
        n_cand = 6 * k
        cand = np.minimum(np.searchsorted(cdf, rng.random((b, n_cand))), n_items - 1)
        local = rng.random((b, n_cand)) < 0.4                  # 40% of candidates from the home region
        for r in np.unique(home):
            rows = np.flatnonzero(home == r)
            mask = local[rows]
            draw = np.searchsorted(region_cdf[r], rng.random(int(mask.sum())))
            sub = cand[rows]
            sub[mask] = members[r][np.minimum(draw, len(members[r]) - 1)]
            cand[rows] = sub
        score = np.log(pop[cand]) + 2.0 * (region_of[cand] == home[:, None]) + rng.gumbel(size=cand.shape)
        order = np.argsort(cand, axis=1, kind="stable")          # drop repeated candidates
        sorted_c = np.take_along_axis(cand, order, 1)
        dup = np.zeros_like(cand, bool)
        np.put_along_axis(dup, order[:, 1:], sorted_c[:, 1:] == sorted_c[:, :-1], 1)
        score[dup] = -np.inf
        top = np.argsort(-score, axis=1)[:, :k]
        if np.isinf(np.take_along_axis(score, top, 1)).any():
            raise RuntimeError("too few distinct candidates; raise n_cand")
        out[s:s + b] = ids[np.take_along_axis(cand, top, 1)]
    return out


def synthetic_observed(n_users: int, n_items: int, width: int = 100, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.round(rng.lognormal(2.9, 0.9, n_users)).astype(int) + 1, n_items)
    out = np.full((n_users, width), -1, np.int32)
    for u, n in enumerate(lengths):
        m = min(n, width)
        out[u, :m] = rng.choice(n_items, m, replace=False)
    return out


def batches(items: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for s in range(0, len(items), size):
        yield np.arange(s, min(s + size, len(items)), dtype=np.int32), items[s:s + size]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tempfile.mkstemp(prefix="moto-", suffix=".log")[1], "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start (log: {log.name})")
            time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=url)
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run(root: str, backend: str, compression: str | None, snaps: list[np.ndarray], observed: np.ndarray,
        args: argparse.Namespace) -> dict:
    uri = storage.join(root, f"{backend}-{compression or 'none'}-{uuid.uuid4().hex[:6]}")
    n, k = snaps[0].shape
    w = TrajectoryWriter(uri, model="bench", n_users=n, k=k, n_items=args.items, compression=compression,
                         row_group_users=args.row_group_users)
    times, sizes = [], []
    for e, snap in enumerate(snaps):
        start = time.perf_counter()
        record = w.write_snapshot(e + 1, {"recall@20": 0.1 * (e + 1)}, batches(snap, args.batch))
        times.append(time.perf_counter() - start)
        sizes.append(record["entry"]["bytes"])
    start = time.perf_counter()
    manifest = w.finish(batches(observed, args.batch))
    finish_s = time.perf_counter() - start
    obs_bytes = manifest["parts"][manifest["observed"]["part"]]["bytes"]
    reader = TrajectoryReader([uri])
    start = time.perf_counter()
    full = reader.trajectories(0, n)
    read_full_s = time.perf_counter() - start
    shard_start = (n // 2) // args.row_group_users * args.row_group_users
    stats: dict = {}
    start = time.perf_counter()
    shard = reader.trajectories(shard_start, min(n, shard_start + args.row_group_users), stats=stats)
    read_shard_s = time.perf_counter() - start
    assert np.array_equal(full[:, 0, -1].numpy(), snaps[-1]) and shard.shape[0] > 0
    write_s = statistics.median(times)
    stored = statistics.median(sizes)
    return {
        "backend": backend, "compression": compression or "none", "bytes_user": stored / n,
        "snapshot_mb": stored / 1e6, "write_s": write_s, "users_s": n / write_s, "mb_s": stored / write_s / 1e6,
        "raw_mb_s": n * k * 4 / write_s / 1e6, "finish_s": finish_s, "obs_bytes_user": obs_bytes / n,
        "read_full_s": read_full_s, "read_shard_s": read_shard_s, "shard_rg": stats.get("row_groups_read", 0),
        "shard_kb": stats.get("bytes_read", 0) / 1e3, "distinct": len(set(manifest["epochs"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=29_858)
    ap.add_argument("--items", type=int, default=40_981)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--snapshots", type=int, default=3, help="snapshots written per run (median time reported)")
    ap.add_argument("--batch", type=int, default=1024, help="users per batch handed to the writer")
    ap.add_argument("--row-group-users", type=int, default=4096)
    ap.add_argument("--compressions", nargs="+", default=["zstd", "snappy", "none"])
    ap.add_argument("--backends", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--workdir", default=None, help="parent of the local output folder (default: a temp dir)")
    args = ap.parse_args()

    t = time.perf_counter()
    snaps = [synthetic_topk(args.users, args.items, args.k, seed=s) for s in range(args.snapshots)]
    observed = synthetic_observed(args.users, args.items)
    print(f"generated {args.snapshots} x {args.users:,} users x K={args.k} lists over {args.items:,} items "
          f"in {time.perf_counter() - t:.1f}s; {len(np.unique(snaps[0])):,} distinct items in snapshot 0",
          flush=True)
    compressions = [None if c == "none" else c for c in args.compressions]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, contextlib.ExitStack() as stack:
        for backend in args.backends:
            if backend == "s3":
                stack.enter_context(moto_server())
                root = f"s3://{BUCKET}/bench"
            else:
                root = tmp
            small = [x[:args.batch] for x in snaps]  # warm-up: imports, connections, first-call costs
            run(root, backend, compressions[0], small, observed[:args.batch], args)
            for c in compressions:
                rows.append(run(root, backend, c, snaps, observed, args))
                print(f"  done {backend} {c or 'none'}", flush=True)

    raw = args.k * 4 + 4
    print(f"\nK={args.k}, {args.users:,} users, batches of {args.batch}, row groups of {args.row_group_users} users; "
          f"raw int32 payload {raw} B/user/snapshot")
    head = (f"{'backend':8s} {'codec':7s} {'B/user/snap':>11s} {'MB/snap':>8s} {'write s':>8s} {'users/s':>10s} "
            f"{'MB/s':>7s} {'raw MB/s':>9s} {'finish s':>9s} {'obs B/user':>10s} {'read all s':>10s} "
            f"{'shard s':>8s} {'shard KB':>9s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:8s} {r['compression']:7s} {r['bytes_user']:11.1f} {r['snapshot_mb']:8.2f} "
              f"{r['write_s']:8.2f} {r['users_s']:10,.0f} {r['mb_s']:7.1f} {r['raw_mb_s']:9.1f} {r['finish_s']:9.2f} "
              f"{r['obs_bytes_user']:10.1f} {r['read_full_s']:10.2f} {r['read_shard_s']:8.3f} {r['shard_kb']:9.0f}")
    print("\nMB/s: stored bytes per second of write_snapshot (median of the snapshots); raw MB/s: the int32 payload "
          "(users x K x 4 B) per second; finish: observed rankings + manifest + removals; read all: the whole "
          "trajectory [users x 1 x S x K]; shard: one row group's users (its row groups and KB fetched).")


if __name__ == "__main__":
    main()
