"""Reference recommenders (MostPopular, ItemKNN, optionally EASE) on a dataset: accuracy and time.

    # raw LightGCN files (train/test only; test ranks all items excluding train):
    .venv/bin/python bench/bench_reference.py                     # $HETCOMP_DATASETS_DIR/gowalla
    .venv/bin/python bench/bench_reference.py --data-dir DIR --models mostpop,itemknn
    # a dataset prepared by `hetcomp prepare` (test excludes train and valid, ALGORITHM.md section 2):
    .venv/bin/python bench/bench_reference.py --dataset-uri runs/data/citeulike --models mostpop,itemknn,ease
"""

from __future__ import annotations

import argparse
import time

import torch

from hetcomp_dist.benchutil import dataset_folder, load_lightgcn_dir, peak_rss_mib
from hetcomp_dist.evaluate import evaluate
from hetcomp_dist.reference import EASE, ItemKNN, MostPopular

KS = (10, 20, 50)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--dataset-uri", default=None, help="prepared dataset (hetcomp_dist.data.dataset.load_dataset)")
    src.add_argument("--data-dir", default=None, help="LightGCN-format folder (default: $HETCOMP_DATASETS_DIR/gowalla)")
    ap.add_argument("--split", default="test", choices=("valid", "test"), help="with --dataset-uri")
    ap.add_argument("--models", default="mostpop,itemknn", help="comma-separated: mostpop, itemknn, ease")
    ap.add_argument("--knn-k", type=int, default=100)
    ap.add_argument("--knn-shrink", type=float, default=0.0)
    ap.add_argument("--knn-block", type=int, default=1024)
    ap.add_argument("--ease-lambda", type=float, default=500.0)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def load(args: argparse.Namespace):
    """(train, ground truth, the splits to exclude besides train, a description of the source)."""
    if args.dataset_uri:
        from hetcomp_dist.data.dataset import load_dataset

        ds = load_dataset(args.dataset_uri)
        other = "test" if args.split == "valid" else "valid"
        return (ds.train, ds.split(args.split), [ds.split(other)],
                f"{args.dataset_uri} ({args.split}; excluding train + {other})")
    data_dir = dataset_folder("gowalla", args.data_dir)
    train, truth = load_lightgcn_dir(data_dir)
    return train, truth, [], f"{data_dir} (test.txt; excluding train)"


def fit_and_evaluate(args: argparse.Namespace, train, truth, exclude) -> list[tuple]:
    """(name, fit s, eval s, peak RSS MiB, metrics) per model of --models that fits."""
    factories = {
        "mostpop": lambda: MostPopular(),
        "itemknn": lambda: ItemKNN(k=args.knn_k, shrink=args.knn_shrink, block_size=args.knn_block),
        "ease": lambda: EASE(lam=args.ease_lambda),
    }
    rows = []
    for name in (n.strip() for n in args.models.split(",")):
        if name not in factories:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(factories)}")
        model = factories[name]()
        t = time.perf_counter()
        try:
            model.fit(train)
        except ValueError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        m = evaluate(model, train, truth, exclude, ks=KS, batch_size=args.batch_size)
        rows.append((name, fit_s, time.perf_counter() - t, peak_rss_mib(), m))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    train, truth, exclude, source = load(args)
    print(f"data: {source}: {train.n_users} users, {train.n_items} items, {train.nnz} train pairs, "
          f"{truth.nnz} ground-truth pairs, loaded in {time.perf_counter() - t:.1f}s; torch threads {torch.get_num_threads()}")
    rows = fit_and_evaluate(args, train, truth, exclude)
    label = {"itemknn": f"itemknn(k={args.knn_k},shrink={args.knn_shrink:g})", "mostpop": "mostpop",
             "ease": f"ease(lam={args.ease_lambda:g})"}
    header = (f"{'model':<26} {'fit s':>7} {'eval s':>7} {'R@10':>7} {'R@20':>7} {'N@20':>7} {'R@50':>7} {'N@50':>7} "
              f"{'PL@20 %':>8} {'cov@50':>7} {'RSS MiB':>8}")
    print(header)
    print("-" * len(header))
    for name, fit_s, eval_s, rss, m in rows:
        print(f"{label[name]:<26} {fit_s:>7.1f} {eval_s:>7.1f} {m['recall@10']:>7.4f} {m['recall@20']:>7.4f} "
              f"{m['ndcg@20']:>7.4f} {m['recall@50']:>7.4f} {m['ndcg@50']:>7.4f} {m['popularity_lift@20']:>8.1f} "
              f"{m['coverage@50']:>7.3f} {rss:>8.0f}")
    if rows:
        print(f"evaluated users: {rows[0][4]['n_users']}; RSS = process peak so far (monotone)")


if __name__ == "__main__":
    main()
