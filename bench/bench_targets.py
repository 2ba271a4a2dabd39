"""Strategy A's rules measured on the target itself, without training a student.

    .venv/bin/python bench/bench_targets.py --config configs/gowalla.yaml [--users 6000]
        [--rules consensus:0.5,0.8,1 contested:0.5,1,2 popularity:0.15,0.25,0.35] [--plot FILE.png]

A student distilled with L_R follows its target list, so a rule that cannot lower the popularity
lift of the target cheaply will not lower the student's. For each rule and strength this ranks
the teachers' final snapshots, merged by rank importance exp(-r / distill.temperature) with the
rule's discount (:func:`hetcomp_dist.distill.dissensus.discount`, the code the distillation uses),
and evaluates that ranking on test like any model: recall/NDCG@50, popularity lift@50,
coverage@50. Users: the evaluated users among the first --users user ids (the lists of all
teachers for them are held in memory: users x teachers x K ids).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hetcomp_dist.benchutil import markdown_table, pyplot, save_figure


def parse_rules(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for item in items:
        rule, _, values = item.partition(":")
        out += [(rule, float(v)) for v in values.split(",") if v.strip()]
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--users", type=int, default=6000, help="evaluate the evaluated users among the first N ids")
    ap.add_argument("--rules", nargs="+", default=["consensus:0.5,0.8,1", "contested:0.5,1,2",
                                                   "popularity:0.15,0.25,0.35"], metavar="RULE:V1,V2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", metavar="FILE.png")
    return ap.parse_args()


def measure(cfg, n_users: int, rules: list[tuple[str, float]]) -> tuple[list[tuple], int, int]:
    """(rule, strength, test metrics, seconds) per rule, "none" first; the users evaluated; K."""
    import torch

    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.distill import dissensus
    from hetcomp_dist.distill.ensemble import ensemble_scores, rank_importance
    from hetcomp_dist.distill.ensemble_eval import teacher_names, trajectory_uris
    from hetcomp_dist.evaluate import evaluate_sums
    from hetcomp_dist.teachers.trajectory import TrajectoryReader

    data = load_dataset(cfg.dataset_uri)
    reader = TrajectoryReader(trajectory_uris(cfg, teacher_names(cfg)))
    users = data.eval_users()
    users = users[users < n_users]
    k = min(reader.ks)
    lists = reader.final(0, int(users[-1]) + 1, k=k)                         # [U, T, K], row = user id
    counts = dissensus.agreement_counts(lists, data.n_items)
    train_counts = data.train.item_counts()
    pop = dissensus.popularity_percentile(train_counts)
    item_counts = torch.from_numpy(train_counts).float()
    importance = rank_importance(k, cfg.distill.temperature)
    rows = []
    for rule, strength in [("none", 0.0), *rules]:
        t0 = time.perf_counter()
        weights = None if rule == "none" else dissensus.discount(rule, lists, counts, pop, item_counts, strength)

        def scorer(u, weights=weights):
            s = ensemble_scores(lists[u], data.n_items, importance, None if weights is None else weights[u])
            return s.masked_fill_(s <= 0, float("-inf"))      # items in no list: no rank

        m = evaluate_sums(scorer, data.train, data.split("test"), exclude=[data.held_out_besides("test")],
                          ks=(50,), batch_size=512, users=users).metrics()
        rows.append((rule, strength, m, time.perf_counter() - t0))
        print(f"{rule:>10} {strength:<5g} R@50 {m['recall@50']:.4f} N@50 {m['ndcg@50']:.4f} "
              f"lift {m['popularity_lift@50']:+.1f}% cov {m['coverage@50']:.3f}", flush=True)
    return rows, len(users), k


def render(rows: list[tuple]) -> str:
    """Markdown: one row per rule and strength, with its change against no discount."""
    base = rows[0][2]
    body = [[rule, f"{strength:g}", f"{m['recall@50']:.4f}", f"{m['ndcg@50']:.4f}", f"{m['popularity_lift@50']:+.1f}%",
             f"{m['coverage@50']:.3f}", f"{m['recall@50'] / base['recall@50'] - 1:+.1%}",
             f"{m['popularity_lift@50'] / base['popularity_lift@50'] - 1:+.0%}"] for rule, strength, m, _ in rows]
    return markdown_table(["rule", "strength", "R@50", "N@50", "popularity lift@50", "coverage@50", "R@50 vs none",
                           "lift vs none"], body)


def plot(rows: list[tuple], title: str, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4.2))
    for rule in dict.fromkeys(r[0] for r in rows[1:]):
        pts = [rows[0]] + [r for r in rows if r[0] == rule]
        ax.plot([p[2]["popularity_lift@50"] for p in pts], [p[2]["recall@50"] for p in pts], "o-", label=rule)
        for _, s, m, _ in pts[1:]:
            ax.annotate(f"{s:g}", (m["popularity_lift@50"], m["recall@50"]), xytext=(3, 3),
                        textcoords="offset points", fontsize=7)
    ax.set_xlabel("popularity lift@50 of the target (%)")
    ax.set_ylabel("test recall@50 of the target")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    print(f"plot: {save_figure(fig, path)}")


def main() -> None:
    args = parse_args()
    import torch

    from hetcomp_dist import config
    from hetcomp_dist.run import RunConfig

    torch.set_num_threads(args.threads)
    cfg = config.load(RunConfig, args.config, args.set)
    rows, n_users, k = measure(cfg, args.users, parse_rules(args.rules))
    print(f"\n{Path(args.config).name}: {n_users} users, T={cfg.distill.temperature:g}, K={k}; "
          f"target = the final ensemble with strategy A's discount\n")
    print(render(rows))
    if args.plot:
        plot(rows, f"strategy A rules on the target ({Path(args.config).stem})", args.plot)


if __name__ == "__main__":
    main()
