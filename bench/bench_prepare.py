"""Benchmark `hetcomp prepare`: Gowalla (1.03M interactions) and synthetic power-law Parquet inputs.

Each prepare runs in a fresh subprocess so its peak RSS (os.wait4) is its own. Gowalla comes from
the registry: its mirror under $HETCOMP_DATASETS_DIR if set, else the registry's download.

    .venv/bin/python bench/bench_prepare.py --sizes 5 10 20 50 --plot bench/out/prepare.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hetcomp_dist.benchutil import pyplot, run_measured, save_figure


def synthetic(path: Path, n_rows: int, seed: int = 0, chunk: int = 5_000_000) -> None:
    """Power-law item popularity (p(rank) ~ (rank+1)^-0.9), ~25 interactions per user, int64 ids."""
    n_items = max(1000, n_rows // 250)
    n_users = max(100, n_rows // 25)
    p = (np.arange(n_items) + 1.0) ** -0.9
    cdf = np.cumsum(p / p.sum())
    rng = np.random.default_rng(seed)
    id_scramble = rng.permutation(n_items).astype(np.int64) * 7 + 1_000_000  # sparse, unsorted original ids
    schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("timestamp", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n_rows, chunk):
            n = min(chunk, n_rows - start)
            items = np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)
            writer.write_table(pa.table({"user": rng.integers(0, n_users, n, dtype=np.int64),
                                         "item": id_scramble[items],
                                         "timestamp": rng.random(n) * 1e9}, schema=schema),
                               row_group_size=1 << 20)


def run_prepare(args: list[str]) -> tuple[float, float]:
    """Run `hetcomp prepare ARGS` in a subprocess; return (seconds, peak RSS in MB)."""
    child = run_measured([sys.executable, "-m", "hetcomp_dist.cli", "prepare", *args, "--quiet"], capture=True)
    if child.returncode != 0:
        raise RuntimeError(f"prepare {args} failed with status {child.returncode}")
    return child.seconds, child.peak_rss_mib


def plot(synth: list[tuple[int, float, float]], path: str) -> None:
    n, s, m = map(np.array, zip(*synth))
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    a.plot(n / 1e6, s, "o-"), a.set_xlabel("interactions (M)"), a.set_ylabel("seconds"), a.set_title("prepare time")
    b.plot(n / 1e6, m / 1024, "o-"), b.axhline(4, color="r", ls="--", label="4 GB target")
    b.set_xlabel("interactions (M)"), b.set_ylabel("peak RSS (GB)"), b.set_title("prepare peak memory"), b.legend()
    print(f"plot: {save_figure(fig, path)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="*", default=[5, 10, 20, 50], help="synthetic sizes, millions of rows")
    ap.add_argument("--no-gowalla", action="store_true")
    ap.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temp dir)")
    ap.add_argument("--plot", help="PNG path for time and memory vs size")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if not args.no_gowalla:
            seconds, mb = run_prepare(["gowalla", "--out", str(tmp / "gowalla")])
            rows.append(("gowalla (LightGCN split)", 1_027_370, seconds, mb))
        for millions in args.sizes:
            n = int(millions * 1_000_000)
            src = tmp / f"synthetic_{n}.parquet"
            synthetic(src, n)
            seconds, mb = run_prepare([str(src), "--out", str(tmp / f"out_{n}")])
            rows.append((f"synthetic power-law {millions:g}M", n, seconds, mb))
            src.unlink()
    print(f"\n{'input':32s} {'rows':>12s} {'seconds':>9s} {'rows/s':>12s} {'peak RSS MB':>12s}")
    for name, n, seconds, mb in rows:
        print(f"{name:32s} {n:12,d} {seconds:9.1f} {n / seconds:12,.0f} {mb:12,.0f}")
    synth = [(n, s, m) for name, n, s, m in rows if name.startswith("synthetic")]
    if len(synth) >= 2:
        (n0, s0, _), (n1, s1, _) = synth[0], synth[-1]
        print(f"\ntime growth {n0 / 1e6:g}M -> {n1 / 1e6:g}M: x{s1 / s0:.1f} for x{n1 / n0:.1f} rows "
              f"(log-log slope {np.log(s1 / s0) / np.log(n1 / n0):.2f})")
    if args.plot and synth:
        plot(synth, args.plot)


if __name__ == "__main__":
    main()
