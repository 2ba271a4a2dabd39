"""The exact softmax denominator (``akt.unobserved_exp_sum`` without sampling), forward + backward.

It is most of an exact-softmax epoch (the reference regime). Variants, side by side in one process,
alternating call by call so background load falls on all alike:

- ``before``: the first code: 4,096-item chunks, each chunk scanning the whole padded exclusion for
  its excluded entries, the backward recomputing and rescaling every chunk (copied below);
- ``c1024``: 1,024-item chunks, one scan of the padded exclusion and then a mask of the compact
  entries per chunk, the same backward (copied below);
- ``recompute``: today's code with its cache off (``akt.CACHE_BYTES = 0``): the compact entries
  sorted by chunk once, no clamp pass where no score can reach the clamp, and a backward of two
  products with the gradient folded into the small operands;
- ``bound``: the keep rule until 2026-12-03, on today's code: the forward's chunks kept for the
  backward only where the norm bound shows no score can reach the clamp, recomputed otherwise;
- ``now``: today's code: as ``recompute``, with the forward's chunks (clamped entries zeroed) kept
  for the backward whether or not scores reach the clamp.

Two students: ``--std 0.3`` (random, as early in training: no score near the clamp of 40) and
``--std 2.7`` (about 3% of scores beyond +-40, mostly below, as the reference-regime student on
CiteULike at epoch 410: scores from -243 to 49, 2.7% beyond the clamp).

Shapes are a real step's: a batch of 1,024 train interactions of a prepared dataset, its distinct
users (B), their padded train items plus 50 target items as the exclusion, dim 6, one thread. With
``--widen`` the catalogue is widened F times (the exclusion keeps its shape) to show the cost
against n_items.

    .venv/bin/python bench/bench_exact_sum.py --dataset runs/citeulike/dataset --widen 1 2 4

Writes bench/out/exact_sum.txt and bench/out/exact_sum.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hetcomp_dist.benchutil import load_average
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.distill import akt

OUT = Path(__file__).parent / "out"
VARIANTS = ("before", "c1024", "recompute", "bound", "now")


def _scan_per_chunk(exclude, n_items, chunk):
    """The exclusion as found first: one scan of the padded [B, L] per chunk."""
    out = []
    for c0 in range(0, n_items, chunk):
        rows, k = torch.nonzero((exclude >= c0) & (exclude < c0 + chunk), as_tuple=True)
        out.append((c0, (rows, exclude[rows, k] - c0)))
    return out


def _scan_masks(exclude, n_items, chunk):
    """The exclusion as found by the 1,024-item-chunk code: one scan, then a mask of the entries per chunk."""
    rows, k = torch.nonzero(exclude >= 0, as_tuple=True)
    items = exclude[rows, k]
    which = torch.div(items, chunk, rounding_mode="floor")
    out = []
    for c0 in range(0, n_items, chunk):
        mine = which == c0 // chunk
        out.append((c0, (rows[mine], items[mine] - c0)))
    return out


class _Earlier(torch.autograd.Function):
    """The earlier forward and backward: clamp always, the backward recomputes each chunk and rescales it."""

    @staticmethod
    def forward(ctx, user_emb, item_weight, exclude, clamp, chunk, scan):
        hits = scan(exclude, item_weight.shape[0], chunk)
        item_t = item_weight.T.contiguous()
        total = user_emb.new_zeros(user_emb.shape[0])
        for c0, (rows, cols) in hits:
            e = (user_emb @ item_t[:, c0:c0 + chunk]).clamp_(-clamp, clamp).exp_()
            e[rows, cols] = 0
            total += e.sum(1)
        ctx.save_for_backward(user_emb, item_weight, item_t)
        ctx.hits, ctx.clamp, ctx.chunk = hits, clamp, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        user_emb, item_weight, item_t = ctx.saved_tensors
        grad_user, grad_item = torch.zeros_like(user_emb), torch.zeros_like(item_weight)
        for c0, (rows, cols) in ctx.hits:
            s = user_emb @ item_t[:, c0:c0 + ctx.chunk]
            lo, hi = torch.aminmax(s)
            clamped = bool(lo < -ctx.clamp or hi > ctx.clamp)
            g = (s.clamp(-ctx.clamp, ctx.clamp) if clamped else s).exp_()
            g[rows, cols] = 0
            g.mul_(grad_total[:, None])
            if clamped:
                g.masked_fill_(s.abs() > ctx.clamp, 0)
            grad_user.addmm_(g, item_weight[c0:c0 + ctx.chunk])
            grad_item[c0:c0 + ctx.chunk] = (user_emb.T @ g).T
        return grad_user, grad_item, None, None, None, None


def _call(name, u, w, exclude):
    if name == "before":
        return _Earlier.apply(u, w, exclude, 40.0, 4096, _scan_per_chunk)
    if name == "c1024":
        return _Earlier.apply(u, w, exclude, 40.0, 1024, _scan_masks)
    cache = akt.CACHE_BYTES
    akt.CACHE_BYTES = 0 if name == "recompute" or (name == "bound" and not akt.within_clamp(u, w, 40.0)) else cache
    try:
        return akt.unobserved_exp_sum(u, w, exclude, 40.0)
    finally:
        akt.CACHE_BYTES = cache


def step(name, u0, w0, exclude):
    u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    t = time.perf_counter()
    _call(name, u, w, exclude).log().sum().backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="runs/citeulike/dataset")
    ap.add_argument("--widen", type=int, nargs="+", default=[1], help="catalogue = F x the dataset's items")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--std", type=float, nargs="+", default=[0.3, 2.7], help="the embeddings' N(0, std) per regime")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = load_dataset(args.dataset).split("train")
    rng = np.random.default_rng(0)
    users_of = np.repeat(np.arange(train.n_users), train.counts())
    users = np.unique(users_of[rng.permutation(len(users_of))[:1024]])
    observed = torch.from_numpy(train.padded(users))
    rows = []
    for std, n_items in [(std, f * train.n_items) for std in args.std for f in args.widen]:
        g = torch.Generator().manual_seed(0)
        targets = torch.randint(0, n_items, (len(users), 50), generator=g)
        exclude = torch.cat([observed, targets], 1)
        u0 = std * torch.randn(len(users), args.dim, generator=g)
        w0 = std * torch.randn(n_items, args.dim, generator=g)
        beyond = ((u0 @ w0.T).abs() > 40).float().mean().item()
        times = {name: [] for name in VARIANTS}
        for _ in range(args.reps + 2):
            for name in VARIANTS:
                times[name].append(step(name, u0, w0, exclude))
        med = {name: 1000 * statistics.median(v[2:]) for name, v in times.items()}
        rows.append((std, beyond, n_items, len(users), exclude.shape[1], med))
        print(f"std {std}, n_items {n_items:,}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), flush=True)
    base = "before"
    lines = [f"# exact denominator, forward + backward, median ms per call of {args.reps} (1 thread, dim {args.dim})",
             f"# {args.dataset}: B distinct users of 1,024 train interactions; {load_average()}", "",
             "| std | scores beyond +-40 | n_items | B | exclusion width | " + " | ".join(VARIANTS)
             + " | now / before | now / c1024 | now / bound |",
             "|---:|---:|---:|---:|---:|" + "---:|" * (len(VARIANTS) + 3)]
    for std, beyond, n_items, b, width, med in rows:
        lines.append(f"| {std} | {beyond:.1%} | {n_items:,} | {b} | {width} | " + " | ".join(f"{med[k]:.1f}" for k in VARIANTS)
                     + f" | {med['now'] / med[base]:.2f} | {med['now'] / med['c1024']:.2f} | {med['now'] / med['bound']:.2f} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "exact_sum.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for (std, style) in zip(args.std, ("-", "--", ":")):
        mine = [r for r in rows if r[0] == std]
        for k, name in enumerate(VARIANTS):
            ax.plot([r[2] for r in mine], [r[5][name] for r in mine], style, marker="o", color=f"C{k}",
                    label=f"{name}, std {std}")
    ax.set(xscale="log", yscale="log", xlabel="items", ylabel="ms per call (forward + backward)",
           title="exact softmax denominator, one batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "exact_sum.png", dpi=120)


if __name__ == "__main__":
    main()
