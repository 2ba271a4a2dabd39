"""Wall time of training a run's teachers concurrently (one Ray actor each) vs one after another.

Both modes train the same teachers with the same epochs (``--epochs``, evaluated every
``--eval-every``) into fresh run folders that share one prepared dataset, in one invocation, so
the ratio is measured side by side. Each mode is its own ``hetcomp train-teachers`` subprocess.

    .venv/bin/python bench/bench_concurrency.py --config configs/citeulike.yaml --epochs 10 [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from hetcomp_dist.benchutil import markdown_table, pyplot, save_figure

REPO = Path(__file__).resolve().parents[1]


def config_for(base: dict, run: str, epochs: int, eval_every: int, threads: int | None = None) -> dict:
    data = dict(base, run=run)
    data["teachers"] = [dict(t, max_epochs=epochs, eval_every=eval_every, patience=1000, max_train_seconds=0)
                        for t in base["teachers"]]
    if threads:                                            # one teacher at a time may use every core
        for t in data["teachers"]:
            t["threads"] = threads
    return data


def time_modes(base: dict, epochs: int, eval_every: int) -> dict[str, float]:
    """Wall seconds of ``hetcomp train-teachers`` per mode, each into a fresh run sharing one prepared dataset."""
    work = Path(tempfile.mkdtemp(prefix="bench_concurrency-"))
    results = {}
    try:
        # "sequential" keeps each teacher's configured threads; "sequential-all-cores" gives the one
        # running teacher every core, the fair baseline when the config pins one thread per teacher.
        for mode in ("concurrent", "sequential", "sequential-all-cores"):
            run = work / mode
            run.mkdir()
            if mode != "concurrent":                       # same prepared dataset, not timed twice
                shutil.copytree(work / "concurrent" / "dataset", run / "dataset")
            else:
                subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", "prepare", base["data"]["source"],
                                "--out", str(run / "dataset")], check=True, capture_output=True)
            cfg = work / f"{mode}.yaml"
            threads = os.cpu_count() if mode == "sequential-all-cores" else None
            cfg.write_text(yaml.safe_dump(config_for(base, str(run), epochs, eval_every, threads)))
            cmd = [sys.executable, "-m", "hetcomp_dist.cli", "train-teachers", "--config", str(cfg)]
            cmd += ["--sequential"] if mode != "concurrent" else []
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            results[mode] = time.perf_counter() - t0
            print(f"{mode:>10}: {results[mode]:7.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "citeulike.yaml"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--plot", help="bar chart of the two wall times")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    results = time_modes(base, args.epochs, args.eval_every)
    names = ", ".join(t["name"] for t in base["teachers"])
    print(f"\n{len(base['teachers'])} teachers ({names}), {args.epochs} epochs each, eval every {args.eval_every}; "
          f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}")
    body = [[mode, f"{s:.1f}"] for mode, s in results.items()]
    body += [[f"{mode} / concurrent", f"{results[mode] / results['concurrent']:.2f}x"]
             for mode in ("sequential", "sequential-all-cores")]
    print(markdown_table(["mode", "wall s"], body, numeric=False))
    if args.plot:
        fig, ax = pyplot().subplots(figsize=(4, 3))
        ax.bar(list(results), list(results.values()), color=["tab:blue", "tab:gray", "tab:olive"])
        ax.set_ylabel("wall seconds")
        ax.set_title(f"{len(base['teachers'])} teachers, {args.epochs} epochs each")
        save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
