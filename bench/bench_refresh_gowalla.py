"""A day's delta at Gowalla scale: one refresh against the full pipeline from scratch, side by side.

Data: Gowalla as split by the LightGCN authors (train.txt + test.txt from $HETCOMP_DATASETS_DIR/gowalla), all
pairs together. It has no timestamps, so they are synthetic: a day's delta of about ``--delta`` of the rows,
made of every row of ``--new-users`` random users and of ``--new-items`` random items (so that they first
appear in the delta) plus random other rows; the rest is the base, every row older than every delta row.

Runs, all in this process unless ``--ray`` (and every step timed by the refresh's own step log):

- full: v0001 from the base, the full pipeline from scratch: prepare (the data version), teachers, student
  (then its gate, export and promotion, which a first version also pays);
- refresh: v0002 from the delta on that run: teachers and student warm-started;
- retrain (with ``--retrain``): v0002 from the same delta on a copy of the run after v0001, with
  ``refresh.warm_start=false``: the full pipeline from scratch on exactly the refresh's data.

Teachers and epochs: ``configs/gowalla.yaml``'s MF and LightGCN (one thread each) and its student, with
reduced epochs (``--teacher-epochs`` / ``--student-epochs`` from scratch, ``--refresh-teacher-epochs`` /
``--refresh-student-epochs`` warm) so that the whole bench fits a contended 2-core host. Writes table.md,
results.json and refresh_vs_full.png under ``--out``.

    .venv/bin/python bench/bench_refresh_gowalla.py --out bench/out/refresh_gowalla
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hetcomp_dist.refresh import job, loading

REPO = Path(__file__).resolve().parents[1]
STEPS = ("data", "teachers", "student", "gate", "export", "promote")
DAY_S = 86_400.0


def read_gowalla(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every (user, item) pair of train.txt and test.txt ("user item item ..." per line)."""
    users, items = [], []
    for name in ("train.txt", "test.txt"):
        for line in (folder / name).read_text().splitlines():
            ids = line.split()
            if len(ids) > 1:
                users.append(np.full(len(ids) - 1, int(ids[0]), np.int64))
                items.append(np.asarray(ids[1:], np.int64))
    return np.concatenate(users), np.concatenate(items)


def split_day(user: np.ndarray, item: np.ndarray, delta: float, new_users: int, new_items: int,
              seed: int = 0) -> tuple[np.ndarray, dict]:
    """Which rows are the day's delta: every row of ``new_users`` users and ``new_items`` items, topped up with
    random rows to ``delta`` of all rows; and a description of it."""
    rng = np.random.default_rng(seed)
    fresh_users = rng.choice(np.unique(user), new_users, replace=False)
    counts = np.bincount(item)
    rare = np.flatnonzero((counts > 0) & (counts <= np.quantile(counts[counts > 0], 0.5)))  # new items are not yet popular
    fresh_items = rng.choice(rare, new_items, replace=False)
    day = np.isin(user, fresh_users) | np.isin(item, fresh_items)
    top_up = int(delta * len(user)) - int(day.sum())
    if top_up > 0:
        day[rng.choice(np.flatnonzero(~day), top_up, replace=False)] = True
    return day, {"rows": int(len(user)), "delta_rows": int(day.sum()), "delta_fraction": float(day.mean()),
                 "new_users": int(new_users), "new_items": int(new_items)}


def write_files(user: np.ndarray, item: np.ndarray, day: np.ndarray, out: Path, seed: int = 0) -> tuple[str, str]:
    """base.parquet (timestamps spread over 100 days) and day.parquet (the next day), columns user, item, timestamp."""
    rng = np.random.default_rng(seed + 1)
    ts = np.where(day, 100 * DAY_S + rng.uniform(1.0, DAY_S, len(user)), rng.uniform(0.0, 100 * DAY_S, len(user)))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("base.parquet", ~day), ("day.parquet", day)):
        pq.write_table(pa.table({"user": user[rows], "item": item[rows], "timestamp": ts[rows]}), out / name)
        paths.append(str(out / name))
    return paths[0], paths[1]


def bench_config(args: argparse.Namespace, path: Path) -> Path:
    """configs/gowalla.yaml's data, trajectory and student sections with MF and LightGCN, epochs reduced."""
    base = yaml.safe_load((REPO / "configs" / "gowalla.yaml").read_text())
    keep = {t["name"]: t for t in base["teachers"] if t["name"] in ("MF", "GNN")}
    teachers = [{**t, "max_epochs": args.teacher_epochs, "eval_every": min(5, args.teacher_epochs), "patience": 100,
                 "max_train_seconds": 0, "threads": 1, "cpus": 1} for t in keep.values()]
    distill = {**base["distill"], "max_epochs": args.student_epochs, "eval_every": min(5, args.student_epochs),
               "patience": 100, "threads": 1}
    cfg = {"run": "unused", "data": base["data"], "ks": base["ks"], "trajectory": base["trajectory"],
           "teachers": teachers, "distill": distill, "ray": {"num_cpus": 2},
           "refresh": {"holdout_fraction": 0.2, "valid_fraction": 0.1, "teacher_epochs": args.refresh_teacher_epochs,
                       "student_epochs": args.refresh_student_epochs, "export_k": 50,
                       "gate": {"metrics": ["recall@20", "ndcg@20"], "tolerance": 0.05, "min_coverage": 0.001}}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def timed_refresh(config: Path, run: str, new_data: str, overrides: list[str]) -> dict:
    """One refresh; its report's figures, each step's wall seconds (the refresh's own step log) and CPU
    seconds of this process (what the step cost, less exposed than wall time to other load on the host)."""
    steps: dict[str, float] = {}
    cpu: dict[str, float] = {}
    last = [time.process_time()]

    def log(message: str) -> None:
        match = re.fullmatch(r"\[(\w+)\] ([0-9.]+) s", message)
        if match:
            steps[match.group(1)] = float(match.group(2))
            now = time.process_time()
            cpu[match.group(1)], last[0] = now - last[0], now
        print(f"  {message.splitlines()[0]}", flush=True)

    cfg, rcfg = loading.load(config, [f"run={run}", *overrides])
    t0, c0 = time.perf_counter(), time.process_time()
    report = job.refresh(cfg, rcfg, new_data, log=log)
    cand, prod = report["gate"]["candidate"], report["gate"]["production"]
    return {"version": report["version"], "promote": report["promote"], "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "steps": steps, "cpu": cpu, "candidate": cand["metrics"],
            "holdout_users": cand["n_users"], "production": prod and prod["metrics"],
            "teachers": [(t["name"], t["status"]) for t in report["teachers"]], "student": report["student"]["status"],
            "lineage": report["lineage"], "inside": inside(cfg.run, report)}


def inside(run: str, report: dict) -> dict:
    """Training against evaluation (valid metrics, snapshots) seconds of the teachers (summed) and the student,
    from their own records: with few epochs, evaluation is much of what a step costs."""
    from hetcomp_dist import storage
    from hetcomp_dist.refresh.layout import Layout, version_number

    layout, number = Layout(run), version_number(report["version"])
    out = {"teachers_train": 0.0, "teachers_eval": 0.0, "teacher_epochs": {}}
    for t in report["teachers"]:
        summary = storage.read_manifest(layout.trajectory(number, t["name"])).get("summary") or {}
        seconds = summary.get("seconds", {})
        out["teachers_train"] += seconds.get("train", 0.0)
        out["teachers_eval"] += seconds.get("eval", 0.0) + seconds.get("snapshot", 0.0)
        out["teacher_epochs"][t["name"]] = summary.get("epochs_trained")
    metrics = storage.read_json(layout.student(number), "metrics.json")
    out.update(student_train=metrics["seconds"]["train"], student_eval=metrics["seconds"]["eval"],
               student_epochs=metrics["epochs"])
    return out


def copy_run(src: Path, dst: Path) -> None:
    """The run as it was after v0001 (data, version, pointer, history) for the retrain."""
    for part in ("data", "versions", "promotions"):
        shutil.copytree(src / part, dst / part)
    shutil.copy2(src / "current", dst / "current")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "refresh_gowalla"))
    p.add_argument("--delta", type=float, default=0.007, help="the day's share of all rows")
    p.add_argument("--new-users", type=int, default=100)
    p.add_argument("--new-items", type=int, default=200)
    p.add_argument("--teacher-epochs", type=int, default=10, help="from scratch")
    p.add_argument("--student-epochs", type=int, default=20, help="from scratch")
    p.add_argument("--refresh-teacher-epochs", type=int, default=2)
    p.add_argument("--refresh-student-epochs", type=int, default=5)
    p.add_argument("--retrain", action="store_true", help="also the full pipeline from scratch on the refresh's data "
                   "(v0002 of a copy of the run; about as long again as the full pipeline)")
    p.add_argument("--ray", action="store_true", help="teachers on Ray actors, the student on Ray Train (refresh.ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    mirror = Path(os.environ.get("HETCOMP_DATASETS_DIR", REPO.parent / "shared" / "datasets"))
    user, item = read_gowalla(mirror / "gowalla")
    day, shape = split_day(user, item, args.delta, args.new_users, args.new_items)
    base, delta = write_files(user, item, day, out / "input")
    config = bench_config(args, out / "config.yaml")
    overrides = [*(["refresh.ray=true"] if args.ray else []), *args.overrides]
    print(json.dumps(shape), flush=True)
    runs = {}
    print("full pipeline (v0001, from scratch):", flush=True)
    runs["full"] = timed_refresh(config, str(out / "full"), base, overrides)
    if args.retrain:
        copy_run(out / "full", out / "retrain")
    print("refresh (v0002, warm start):", flush=True)
    runs["refresh"] = timed_refresh(config, str(out / "full"), delta, overrides)
    if args.retrain:
        print("retrain (v0002, from scratch):", flush=True)
        runs["retrain"] = timed_refresh(config, str(out / "retrain"), delta, ["refresh.warm_start=false", *overrides])
    table = render(runs, shape, args)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"shape": shape, "args": vars(args), "runs": runs}, indent=2))
    plot(runs, out / "refresh_vs_full.png")
    print(table)


def render(runs: dict, shape: dict, args: argparse.Namespace) -> str:
    names = [n for n in ("full", "refresh", "retrain") if n in runs]
    heads = {"full": "full pipeline v0001", "refresh": "refresh v0002", "retrain": "retrain v0002"}
    lin = runs["refresh"]["lineage"]
    lines = [f"Gowalla, {shape['rows']:,} pairs; the day: {shape['delta_rows']:,} rows "
             f"({100 * shape['delta_fraction']:.2f}%), {lin['new_users']} new users, {lin['new_items']} new items; "
             f"epochs from scratch: teachers {args.teacher_epochs}, student {args.student_epochs}; warm: teachers "
             f"{args.refresh_teacher_epochs}, student {args.refresh_student_epochs}", "",
             "| step | " + " | ".join(f"{heads[n]} wall s | CPU s" for n in names) + " | refresh / full, wall | CPU |",
             "|---|" + "---|---|" * len(names) + "---|---|"]
    for step in (*STEPS, "total"):
        wall = (lambda n: runs[n]["seconds"]) if step == "total" else (lambda n: runs[n]["steps"].get(step, 0.0))
        cpu = (lambda n: runs[n]["cpu_seconds"]) if step == "total" else (lambda n: runs[n]["cpu"].get(step, 0.0))
        ratio = lambda f: f"{f('refresh') / f('full'):.2f}" if f("full") > 0.05 else "-"  # noqa: E731
        lines.append(f"| {step} | " + " | ".join(f"{wall(n):.1f} | {cpu(n):.1f}" for n in names)
                     + f" | {ratio(wall)} | {ratio(cpu)} |")
    lines += ["", "| inside (wall s) | " + " | ".join(heads[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("teachers_train", "teachers: training"), ("teachers_eval", "teachers: evaluation + snapshots"),
                       ("student_train", "student: training"), ("student_eval", "student: evaluation")):
        lines.append(f"| {label} | " + " | ".join(f"{runs[n]['inside'][key]:.1f}" for n in names) + " |")
    lines.append("| epochs (teachers; student) | " + " | ".join(
        f"{', '.join(map(str, runs[n]['inside']['teacher_epochs'].values()))}; {runs[n]['inside']['student_epochs']}"
        for n in names) + " |")
    lines += ["", "| v0002 holdout (gate) | users | recall@20 | ndcg@20 |", "|---|---|---|---|"]
    rows = [("production (v0001's student)", runs["refresh"]["production"])]
    rows += [(f"{n} candidate", runs[n]["candidate"]) for n in names if n != "full"]
    for label, m in rows:
        lines.append(f"| {label} | {runs['refresh']['holdout_users']} | {m['recall@20']:.4f} | {m['ndcg@20']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    ax = fig.add_subplot()
    names = list(runs)
    bottom = np.zeros(len(names))
    for step in STEPS:
        values = np.array([runs[n]["steps"].get(step, 0.0) for n in names])
        ax.bar(names, values, bottom=bottom, label=step)
        bottom += values
    ax.set_ylabel("wall seconds")
    ax.set_title("Gowalla: one refresh against the full pipeline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
