"""Benchmark full-ranking evaluation on Gowalla with a dot-product scorer (random embeddings).

Ranks all 40,981 items for all 29,858 Gowalla test users (LightGCN split) with a dimension-64
dot-product scorer and reports wall time, peak RSS, users/s and the time against an
arithmetic floor: the scorer's matmul FLOPs (2 * U * I * dim) divided by this machine's
float32 GEMM throughput, measured on a large square torch.mm in the same run.

    .venv/bin/python bench/bench_eval.py [--batch-size 1024] [--threads N]
    .venv/bin/python bench/bench_eval.py --sweep 256,512,1024,2048,4096 --plot bench/out/eval_batch.png

Data: a LightGCN-format folder (train.txt, test.txt): --data-dir, default
$HETCOMP_DATASETS_DIR/gowalla; read with hetcomp_dist.data.formats.read_lightgcn.
"""

from __future__ import annotations

import argparse
import time

import torch

from hetcomp_dist.benchutil import dataset_folder, load_lightgcn_dir, peak_rss_mib, pyplot, save_figure
from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.evaluate import dot_scorer, evaluate

# --------------------------------------------------------------------------- measurements


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM throughput (GFLOP/s) of an n x n x n torch.mm, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def score_only_seconds(scorer, n_users: int, batch_size: int) -> float:
    """Time of the scorer calls alone over all users (the part the floor models)."""
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n_users, batch_size):
            out = scorer(torch.arange(s, min(s + batch_size, n_users)))
            del out
    return time.perf_counter() - t


def make_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor, reuse_buffer: bool):
    """users -> user_emb[users] @ item_emb.T: a fresh output tensor per call, or (reuse_buffer)
    hetcomp_dist.evaluate.dot_scorer, which writes every batch into one reused buffer."""
    if reuse_buffer:
        return dot_scorer(user_emb, item_emb)
    item_t = item_emb.T.contiguous()  # same operand layout as dot_scorer
    return lambda u: user_emb[u] @ item_t


def run_eval(train: Interactions, test: Interactions, user_emb, item_emb, batch_size: int,
             reuse_buffer: bool = False) -> tuple[dict, float]:
    scorer = make_scorer(user_emb, item_emb, reuse_buffer)
    t = time.perf_counter()
    metrics = evaluate(scorer, train, test, ks=(10, 20, 50), batch_size=batch_size)
    return metrics, time.perf_counter() - t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="LightGCN-format folder (default: $HETCOMP_DATASETS_DIR/gowalla)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sweep", default=None, help="comma-separated batch sizes to time (one evaluation each)")
    ap.add_argument("--plot", default=None, help="write a time-vs-batch-size plot here (uses --sweep)")
    ap.add_argument("--no-score-only", action="store_true", help="skip the matmul-only timing pass")
    ap.add_argument("--reuse-buffer", action="store_true",
                    help="also time a scorer that writes into one preallocated batch buffer")
    return ap.parse_args(argv)


def measure(args: argparse.Namespace, train: Interactions, test: Interactions, gflops: float) -> list[dict]:
    """One evaluation per batch size (and per scorer output, with --reuse-buffer): a row of measurements each."""
    n_users, n_items, dim = train.n_users, train.n_items, args.dim
    gen = torch.Generator().manual_seed(0)
    user_emb = torch.randn(n_users, dim, generator=gen) / dim ** 0.5
    item_emb = torch.randn(n_items, dim, generator=gen) / dim ** 0.5
    sizes = [args.batch_size]
    if args.sweep or args.plot:
        sizes = [int(s) for s in (args.sweep or "256,512,1024,2048,4096").split(",")]
    rows = []
    variants = [(bs, False) for bs in sizes] + ([(bs, True) for bs in sizes] if args.reuse_buffer else [])
    for bs, reuse in variants:
        metrics, wall = run_eval(train, test, user_emb, item_emb, bs, reuse)
        n_eval = metrics["n_users"]
        floor = 2.0 * n_eval * n_items * dim / (gflops * 1e9)
        score_s = (float("nan") if args.no_score_only
                   else score_only_seconds(make_scorer(user_emb, item_emb, reuse), n_users, bs))
        rows.append(dict(bs=bs, reuse=reuse, wall=wall, users=n_eval, ups=n_eval / wall, floor=floor, score_s=score_s,
                         rss=peak_rss_mib(), batch_mib=bs * n_items * 4 / 2 ** 20,
                         recall20=metrics["recall@20"], cov50=metrics["coverage@50"]))
    return rows


def print_rows(rows: list[dict], n_items: int, dim: int, gflops: float, rss_after_load: float) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"float32 GEMM (2048^3 torch.mm): {gflops:.1f} GFLOP/s")
    print(f"scorer matmul: 2 x {rows[0]['users']} users x {n_items} items x {dim} = "
          f"{2.0 * rows[0]['users'] * n_items * dim / 1e9:.1f} GFLOP; peak RSS after loading data {rss_after_load:.0f} MiB")
    header = (f"{'batch':>6} {'scorer out':>10} {'wall s':>8} {'users/s':>9} {'floor s':>8} {'wall/floor':>10} "
              f"{'scorer-only s':>13} {'scores/batch MiB':>16} {'peak RSS MiB':>12} {'recall@20':>9} {'cov@50':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['bs']:>6} {'reused' if r['reuse'] else 'fresh':>10} {r['wall']:>8.2f} {r['ups']:>9.0f} {r['floor']:>8.2f} {r['wall'] / r['floor']:>10.1f} "
              f"{r['score_s']:>13.2f} {r['batch_mib']:>16.0f} {r['rss']:>12.0f} {r['recall20']:>9.5f} {r['cov50']:>7.3f}")
    print("(random embeddings: recall is chance level; peak RSS is the process maximum so far, monotone)")


def plot(rows: list[dict], n_items: int, dim: int, score_only: bool, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    fresh = [r for r in rows if not r["reuse"]]
    reused = [r for r in rows if r["reuse"]]
    bs = [r["bs"] for r in fresh]
    ax.plot(bs, [r["wall"] for r in fresh], "o-", label="evaluate, fresh scorer output")
    if reused:
        ax.plot(bs, [r["wall"] for r in reused], "^-", label="evaluate, reused output buffer")
    if score_only:
        ax.plot(bs, [r["score_s"] for r in fresh], "s--", label="scorer calls only, fresh output")
        if reused:
            ax.plot(bs, [r["score_s"] for r in reused], "v--", label="scorer calls only, reused buffer")
    ax.axhline(rows[0]["floor"], color="grey", ls=":", label="GEMM floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (users)")
    ax.set_ylabel("seconds")
    ax.set_title(f"Gowalla full ranking, {rows[0]['users']} users x {n_items} items, d={dim}")
    ax.legend()
    print(f"plot: {save_figure(fig, path)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = dataset_folder("gowalla", args.data_dir)
    t = time.perf_counter()
    train, test = load_lightgcn_dir(data_dir)
    load_s = time.perf_counter() - t
    rss_after_load = peak_rss_mib()
    print(f"data: {data_dir}: {train.n_users} users, {train.n_items} items, "
          f"{train.nnz} train + {test.nnz} test pairs, loaded in {load_s:.2f}s")
    gflops = gemm_gflops()
    rows = measure(args, train, test, gflops)
    print_rows(rows, train.n_items, args.dim, gflops, rss_after_load)
    if args.plot:
        plot(rows, train.n_items, args.dim, not args.no_score_only, args.plot)


if __name__ == "__main__":
    main()
