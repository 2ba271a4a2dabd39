"""The student's item table under the sampled denominator, in the real distillation: ``item_updates: dense``
(every worker holds the whole table, its whole gradient all-reduced and every row stepped) against ``rows``
(the table split by rows across workers, the looked-up rows fetched from their owners, their gradients
summed back, each owner stepping its rows by row-wise Adam), by catalogue size and workers.

Data: bench_scale.py's synthetic generator (power-law items, 10-20 train items per user, 6 teachers x 4
snapshots x top-100) with ``--users`` users over each ``--items`` catalogue. Each run is the real
``distill()`` in W gloo processes through bench_scale's rank worker (one thread each): ``final_ensemble``
(L_R on the final lists: the step of HetComp's L_R phase, without DKC's first check, which ranks every
user against the whole catalogue and would dwarf the epoch at 1M items), batches of 1,024 users, ``sampled_negatives: 1000``, ``optimizer: rowwise_adam`` (so the user table costs the same
on both sides), one epoch with its evaluation and checkpoint. Reported per run: the epoch's wall and CPU
seconds (the training batches only: what the item updates change), peak RSS per worker, and the student
and optimizer state the largest worker holds during training (``rank_bytes``: tables, best copies, moments).

    nice -n 5 .venv/bin/python bench/bench_item_updates.py                      # 50k users; 100k and 1M items; W 1, 2

Writes bench/out/item_updates.md and bench/out/item_updates.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # bench_scale, also in the generator's child process
import bench_scale  # noqa: E402
from hetcomp_dist.benchutil import call_in_subprocess, load_average, markdown_table, pyplot, save_figure  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
UPDATES = ("dense", "rows")


def generate(root: str, n_users: int, n_items: int, eval_users: int) -> dict:
    """bench_scale's data (called in a child process, by this script's path)."""
    return bench_scale.generate(root, n_users, n_items=n_items, eval_users=eval_users)


def run(data: dict, world: int, updates: str, root: Path) -> dict:
    """One distill() in ``world`` ranks (bench_scale's run); the worst rank's figures."""
    row = bench_scale.run_config(data, world, "rowwise_adam", root, float("inf"), label=f"items-{updates}",
                                 extra={"method": "final_ensemble", "item_updates": updates})
    held = max(r["student"] + r["optimizer"] for r in row["rank_bytes"]) / 2 ** 20
    return {"world": world, "updates": updates, "epoch_s": row["epoch_seconds"], "epoch_cpu": row["epoch_cpu"],
            "peak_mb": row["peak_rss_mb"], "held_mb": held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    # each evaluation ranks these users against the whole catalogue (eight of them at the end): the
    # training step, what the setting changes, is what is measured here
    ap.add_argument("--eval-users", type=int, default=500)
    ap.add_argument("--workdir", default="/tmp/item_updates_bench")
    args = ap.parse_args()
    rows = []
    for n_items in args.items:
        root = Path(args.workdir) / f"i{n_items}"
        shutil.rmtree(root, ignore_errors=True)
        data, _ = call_in_subprocess(generate, {"root": str(root), "n_users": args.users,
                                                            "n_items": n_items, "eval_users": args.eval_users})
        for world in args.workers:
            for updates in UPDATES:
                t0 = time.perf_counter()
                row = {"items": n_items, **run(data, world, updates, root)}
                rows.append(row)
                print(f"{n_items:>9,} items  W={world}  {updates:5s}  epoch {row['epoch_s']:6.1f} s "
                      f"(cpu {row['epoch_cpu']:6.1f} s)  peak {row['peak_mb']:5.0f} MB/worker  "
                      f"student+optimizer {row['held_mb']:5.1f} MB/worker  "
                      f"[{time.perf_counter() - t0:.0f} s; {load_average()}]", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    by = {(r["items"], r["world"], r["updates"]): r for r in rows}
    table = []
    for n_items, world in sorted({(r["items"], r["world"]) for r in rows}):
        d, s = by[(n_items, world, "dense")], by[(n_items, world, "rows")]
        table.append([f"{n_items:,}", world, f"{d['epoch_s']:.1f}", f"{s['epoch_s']:.1f}",
                      f"{d['epoch_cpu']:.1f}", f"{s['epoch_cpu']:.1f}", f"{s['epoch_cpu'] / d['epoch_cpu']:.2f}",
                      f"{d['peak_mb']:.0f}", f"{s['peak_mb']:.0f}", f"{d['held_mb']:.1f}", f"{s['held_mb']:.1f}"])
    head = ["items", "W", "dense epoch s", "rows epoch s", "dense epoch CPU s", "rows epoch CPU s",
            "rows / dense (CPU)", "dense peak MB/worker", "rows peak MB/worker",
            "dense student+optimizer MB/worker", "rows student+optimizer MB/worker"]
    command = "bench/bench_item_updates.py " + " ".join(sys.argv[1:])
    text = [f"# The item table under the sampled denominator: item_updates dense vs rows ({args.users:,} users)",
            "", f"    $ {command}", "", markdown_table(head, table), ""]
    OUT.mkdir(exist_ok=True)
    (OUT / "item_updates.md").write_text("\n".join(text))
    print("\n".join(text))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for world in sorted({r["world"] for r in rows}):
        for updates, marker in zip(UPDATES, "os"):
            pts = sorted((r["items"], r["epoch_cpu"]) for r in rows if r["world"] == world and r["updates"] == updates)
            ax.plot(*zip(*pts), marker=marker, label=f"{updates} W={world}")
    ax.set(xscale="log", yscale="log", xlabel="items", ylabel="epoch CPU s (worst worker)",
           title=f"Item table updates, sampled denominator, {args.users:,} users")
    ax.legend()
    save_figure(fig, OUT / "item_updates.png")


if __name__ == "__main__":
    main()
