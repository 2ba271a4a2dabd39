"""GPU check: the same work timed on each device, side by side (bench/gpu_check.sh installs and runs it).

On a small real dataset (CiteULike-t by default), with the MF and LightGCN teachers of
configs/citeulike.yaml:

1. two teacher epochs of each (the first pays CUDA's start-up: context, kernels, library handles).
   Models are built on the CPU and moved, and batches are drawn on the CPU, so every device starts
   from the same weights and sees the same batches: the epochs' mean losses (the check column) agree
   across devices up to float rounding, or the device path computes something else;
2. the LightGCN teacher's full-ranking evaluation (valid Recall/NDCG@10,20,50) and its trajectory
   snapshot (every user's top-100), each timed on its second run; the check column gives recall@20
   and, per device, the share of users whose top-10 equals the first device's;
3. a distillation (`hetcomp distill --set distill.device=<device>`, one process, then Ray Train with one
   worker: gloo on cpu, nccl on cuda) of two epochs, from trajectories of short teacher runs; the first
   row's check is the wall time of the command, the second's the valid metric. (A config that refuses
   the setting, as before the loop followed distill.device, gives one skipped line instead.)

    .venv/bin/python bench/gpu_check.py [--devices cpu,cuda] [--dataset citeulike-t] [--threads N]

Writes the table to bench/out/gpu_check.md and the numbers to bench/out/gpu_check.json; work files
(the run: dataset, teachers, students) go under bench/out/gpu_check/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from hetcomp_dist import models
from hetcomp_dist.config import ConfigError
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.device import resolve
from hetcomp_dist.evaluate import evaluate_split
from hetcomp_dist.run import ensure_dataset, load_run
from hetcomp_dist.teachers.train import _snapshot_batches, _train_epoch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
HETCOMP = str(Path(sys.executable).with_name("hetcomp"))
TEACHERS = ("MF", "GNN")          # configs/citeulike.yaml's bpr_mf and lightgcn teachers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda")
    ap.add_argument("--dataset", default="citeulike-t", help="a registered dataset (hetcomp datasets)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on every device")
    ap.add_argument("--teacher-epochs", type=int, default=4, help="epochs of the teachers the student learns from")
    ap.add_argument("--work", default=str(OUT / "gpu_check"), help="folder of the run (dataset, teachers, students)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Train distillation")
    return ap.parse_args(argv)


def environment(devices: list[str], threads: int) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "host": platform.node(),
            "cpus": os.cpu_count(), "threads": threads, "devices": devices}


def write_config(args: argparse.Namespace) -> Path:
    """configs/citeulike.yaml cut to the MF and LightGCN teachers, short, in ``--work``."""
    data = yaml.safe_load((REPO / "configs" / "citeulike.yaml").read_text())
    data["run"] = str(Path(args.work) / "run")
    data["data"]["source"] = args.dataset
    data["teachers"] = [{**t, "max_epochs": args.teacher_epochs, "eval_every": 1, "patience": 100,
                         "threads": args.threads} for t in data["teachers"] if t["name"] in TEACHERS]
    data["distill"].update(max_epochs=2, eval_every=2, threads=args.threads, checkpoint=False)
    path = Path(args.work) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed(fn, device: torch.device):
    """(seconds, result) of ``fn()``, with the device's queued work finished on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def row(step: str) -> dict:
    return {"step": step, "seconds": {}, "check": {}}


def teacher_rows(cfg, data, devices: list[str]) -> tuple[list[dict], dict]:
    """Two epochs of each teacher per device; returns the rows and the trained models by (teacher, device)."""
    rows, trained = [], {}
    for t in (t for t in cfg.teachers if t.name in TEACHERS):
        first, second = row(f"teacher epoch 1, {t.name} ({t.model})"), row(f"teacher epoch 2, {t.name} ({t.model})")
        for name in devices:
            device = resolve(name, "--devices")
            torch.manual_seed(t.seed)
            model = models.build(t.model, data.n_users, data.n_items, data.train, t.params, device)
            optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
            for epoch, r in ((1, first), (2, second)):
                seconds, loss = timed(lambda: _train_epoch(model, optimizer, data.train, t, epoch), device)
                r["seconds"][name], r["check"][name] = seconds, f"loss {loss:.6f}"
            trained[t.name, name] = model
        rows += [first, second]
    return rows, trained


def evaluation_rows(trained: dict, data, devices: list[str], batch_size: int) -> list[dict]:
    """The LightGCN teacher's valid evaluation and trajectory snapshot, each timed on its second run."""
    evaluation = row("evaluation: valid, all items, GNN (2nd run)")
    snapshot = row("trajectory snapshot: top-100 of every user, GNN (2nd run)")
    reference = None
    for name in devices:
        device, model = resolve(name, "--devices"), trained["GNN", name].eval()
        with torch.no_grad():
            scorer = model.scorer()
            for _ in range(2):
                seconds, metrics = timed(lambda: evaluate_split(scorer, data, "valid", (10, 20, 50), batch_size),
                                         device)
            evaluation["seconds"][name], evaluation["check"][name] = seconds, f"recall@20 {metrics['recall@20']:.5f}"
            for _ in range(2):
                seconds, top = timed(lambda: np.concatenate([b for _, b in _snapshot_batches(
                    scorer, data.train, 100, batch_size)]), device)
        reference = top if reference is None else reference
        same = np.mean([set(a) == set(b) for a, b in zip(top[:, :10], reference[:, :10])])
        snapshot["seconds"][name], snapshot["check"][name] = seconds, f"top-10 as {devices[0]}: {same:.1%}"
    return [evaluation, snapshot]


def distill_supported(config: Path, device: str) -> str | None:
    """None if the run config loads with ``distill.device=<device>``, else why not (one line)."""
    try:
        load_run(str(config), [f"distill.device={device}"])
        return None
    except ConfigError as e:
        return str(e)


def hetcomp_distill(config: Path, work: Path, device: str, ray: bool, threads: int) -> tuple[float, list[dict], str]:
    """(wall seconds, epoch events, error tail or '') of a two-epoch ``hetcomp distill`` on ``device``."""
    out = work / f"distill-{device}{'-ray' if ray else ''}"
    shutil.rmtree(out, ignore_errors=True)          # a complete output would be reused, not timed
    cmd = [HETCOMP, "distill", "--config", str(config), "--log-format", "json",
           "--set", f"distill.device={device}", "--set", f"distill.out={out}"]
    if ray:
        cmd += ["--ray", "--set", "distill.workers=1", "--set", f"distill.cpus_per_worker={threads}",
                "--set", f"distill.gpus_per_worker={1 if device == 'cuda' else 0}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall, events = time.perf_counter() - start, []
    for line in done.stdout.splitlines():            # Ray prefixes a worker's lines with "(pid=...)"
        if "{" in line:
            try:
                event = json.loads(line[line.index("{"):])
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == "epoch":
                events.append(event)
    error = "" if done.returncode == 0 else f"rc {done.returncode}: " + (done.stderr.strip().splitlines() or [""])[-1]
    return wall, events, error


def distill_rows(config: Path, work: Path, devices: list[str], args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Rows of the distillation epochs, and the lines saying what was skipped or failed."""
    notes = [f"distillation skipped on {d}: hetcomp distill does not accept --set distill.device={d} ({why})"
             for d in devices if (why := distill_supported(config, d))]
    if notes:
        return [], notes
    subprocess.run([HETCOMP, "train-teachers", "--config", str(config), "--sequential"], cwd=REPO, check=True)
    rows = []
    for ray in ([False] if args.no_ray else [False, True]):
        what = "Ray Train, 1 worker" if ray else "one process"
        first, second = row(f"distillation epoch 1, hetcomp ({what})"), row(f"distillation epoch 2, hetcomp ({what})")
        for name in devices:
            wall, events, error = hetcomp_distill(config, work, name, ray, args.threads)
            if error or len(events) < 2:
                notes.append(f"distillation ({what}) on {name} failed: {error or 'no epoch events'}")
                continue
            first["seconds"][name], first["check"][name] = events[0]["epoch_seconds"], f"wall {wall:.1f} s"
            second["seconds"][name] = events[1]["epoch_seconds"]
            second["check"][name] = f"valid {events[1].get('valid', float('nan')):.5f}"
        rows += [first, second]
    return rows, notes


def table(rows: list[dict], devices: list[str]) -> str:
    head = ["step"] + [f"{d} s" for d in devices]
    if devices[0] != devices[-1]:
        head.append(f"{devices[0]} / {devices[-1]}")
    head += [f"check ({d})" for d in devices]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["seconds"]
        cells = [r["step"]] + [f"{s[d]:.3f}" if d in s else "-" for d in devices]
        if devices[0] != devices[-1]:
            both = devices[0] in s and devices[-1] in s and s[devices[-1]] > 0
            cells.append(f"{s[devices[0]] / s[devices[-1]]:.1f}x" if both else "-")
        cells += [r["check"].get(d, "-") for d in devices]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for d in devices:
        resolve(d, "--devices")              # cuda where torch sees no GPU: one line, before any work
    torch.set_num_threads(args.threads)
    env = environment(devices, args.threads)
    print("environment: " + json.dumps(env), flush=True)
    config = write_config(args)
    cfg = load_run(str(config))
    data = load_dataset(ensure_dataset(cfg))
    print(f"dataset {args.dataset}: {data.n_users} users, {data.n_items} items, {data.train.nnz} train interactions",
          flush=True)
    rows, trained = teacher_rows(cfg, data, devices)
    rows += evaluation_rows(trained, data, devices, cfg.eval_batch_size)
    more, notes = distill_rows(config, Path(args.work), devices, args)
    rows += more
    text = (f"# GPU check\n\n{json.dumps(env)}\n\ndataset {args.dataset}: {data.n_users} users, {data.n_items} items, "
            f"{data.train.nnz} train interactions\n\n{table(rows, devices)}\n" + "".join(f"\n{n}\n" for n in notes))
    print("\n" + text, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.md").write_text(text)
    (OUT / "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows, "notes": notes}, indent=1))
    print(f"written: {OUT / 'gpu_check.md'}, {OUT / 'gpu_check.json'}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"gpu_check: error: {e}")
