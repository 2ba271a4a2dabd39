"""Sharded teachers (``workers > 1``): the config rules, the refusal without Ray, and (integration)
`hetcomp train-teachers` on configs/tiny_sharded.yaml: the MF teacher whole and on 2 Ray Train workers,
on a local Ray instance that the command starts, as tests/test_teachers_ray.py's CLI test does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hetcomp_dist import config, storage
from hetcomp_dist.cli import main
from hetcomp_dist.run import RunConfig
from procs import REPO, VENV_BIN, run_with_local_ray
from test_teachers_ray import ray_head  # noqa: F401 - the Ray head fixture (its own temp dir, ports, HOME)

TINY_SHARDED = REPO / "configs" / "tiny_sharded.yaml"
NAMES = ["bpr_mf", "bpr_mf_sharded"]


def _teacher(**changes) -> dict:
    (teacher,) = [t for t in yaml.safe_load(TINY_SHARDED.read_text())["teachers"] if t["name"] == "bpr_mf_sharded"]
    return {**teacher, **changes}


def _write(path: Path, run: str, teachers: list[dict]) -> Path:
    data = yaml.safe_load(TINY_SHARDED.read_text())
    data.update(run=run, teachers=teachers)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"model": "lightgcn", "params": {"dim": 16}},
     "teachers[0].workers: 2 workers shard the tables, which only bpr_mf, cml, neumf allow"),
    ({"table_optimizer": None}, "teachers[0].table_optimizer: required with workers > 1: one of sgd, adagrad"),
    ({"table_optimizer": "adamw"}, "teachers[0].table_optimizer: expected one of sgd, adagrad, rowwise_adagrad"),
    ({"table_optimizer": "adam"}, "teachers[0].table_optimizer: adam has no CPU kernel in fbgemm"),
    ({"params": {"dim": 18}}, "teachers[0].params.dim: must be a multiple of 4 with workers > 1 (fbgemm's fused"),
    ({"model": "neumf", "params": {}}, None),                     # neumf's default dim, 32: accepted
    ({"model": "cml", "params": {"dim": 10}}, "teachers[0].params.dim: must be a multiple of 4"),
    ({"batch_size": 1}, "teachers[0].batch_size: must be >= workers (2)"),
    ({"workers": 1}, "teachers[0].table_optimizer: only with workers > 1"),
    ({"workers": 1, "table_optimizer": None, "item_sharding": "table_wise"},
     "teachers[0].item_sharding: only with workers > 1"),
    ({"item_sharding": "column_wise"}, "teachers[0].item_sharding: "),
    ({"workers": 0}, "teachers[0].workers: must be >= 1, got 0"),
])
def test_sharding_settings_are_checked_at_load(tmp_path: Path, changes: dict, message: str | None) -> None:
    path = _write(tmp_path / "c.yaml", str(tmp_path / "run"), [_teacher(**changes)])
    if message is None:
        assert config.load(RunConfig, path).teachers[0].workers == 2
        return
    with pytest.raises(config.ConfigError) as e:
        config.load(RunConfig, path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_adam_on_tables_is_accepted_with_gpus(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", str(tmp_path / "run"), [_teacher(table_optimizer="adam", gpus=1)])
    assert config.load(RunConfig, path).teachers[0].table_optimizer == "adam"


def test_sequential_refuses_a_sharded_teacher_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train-teachers", "--config", str(TINY_SHARDED), "--set", f"run={tmp_path / 'run'}",
                 "--sequential"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hetcomp train-teachers: error: teachers[1].workers: 2 workers train on Ray Train: run "
                   "train-teachers without --sequential, or set workers: 1")
    assert not (tmp_path / "run").exists()      # before any work


def test_train_teacher_never_trains_a_sharded_teacher_whole(tmp_path: Path) -> None:
    """The one-process loop (also refresh's in-process path) refuses workers > 1 before any work."""
    from hetcomp_dist.teachers.config import TeacherConfig
    from hetcomp_dist.teachers.train import train_teacher

    t = TeacherConfig(name="mf", model="bpr_mf", params={"dim": 16}, workers=2, table_optimizer="sgd")
    with pytest.raises(config.ConfigError, match="teacher mf: workers 2: a sharded teacher trains on Ray Train"):
        train_teacher(t, str(tmp_path / "no-dataset"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_trajectory_from_before_the_sharding_settings_is_still_the_same_teacher() -> None:
    """Stored configs without workers / table_optimizer / item_sharding read them as their defaults."""
    from hetcomp_dist.teachers.config import TeacherConfig
    from hetcomp_dist.teachers.train import same_settings

    whole = TeacherConfig(name="mf", model="bpr_mf", params={"dim": 16})
    stored = {"name": "mf", "model": "bpr_mf", "params": {"dim": 16}}
    assert same_settings(stored, whole)
    sharded = TeacherConfig(name="mf", model="bpr_mf", params={"dim": 16}, workers=2, table_optimizer="sgd")
    assert not same_settings(stored, sharded)
    moved = {**stored, "workers": 2, "table_optimizer": "sgd", "item_sharding": "table_wise"}
    assert same_settings(moved, sharded)          # item placement only: the same updates


@pytest.mark.integration  # a local Ray, then a Ray Train group of 2 gloo workers: ~2-3 min on 2 shared cores
def test_train_teachers_trains_mf_sharded_on_two_workers(datasets_dir: Path, tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    home = tmp_path / "home"
    home.mkdir()
    proc = run_with_local_ray([str(VENV_BIN / "hetcomp"), "train-teachers", "--config", str(TINY_SHARDED),
                               "--set", f"run={run}"], cwd=tmp_path, timeout=600, HOME=str(home),
                              HETCOMP_DATASETS_DIR=str(datasets_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in NAMES:
        m = storage.read_manifest(storage.join(run, "teachers", name, "trajectory"))
        assert m["kind"] == "teacher-trajectory" and len(m["trajectory"]) == 4
        assert [h["epoch"] for h in m["history"]] == [2, 4, 6]          # the same evaluation points
        assert f"[{name}" in proc.stdout and "done: best epoch" in proc.stdout
    summaries = {s["teacher"]: s for s in storage.read_json(storage.join(run, "teachers", "summary"), "summary.json")}
    whole, sharded = (summaries[n]["test"]["recall@20"] for n in NAMES)
    # Not bit-equal (fused row-wise Adagrad against Adam), but the same quality range: measured 0.134 whole
    # and 0.140 sharded (train_sharded in a one-rank group) on ML-100K.
    assert 0 < whole <= 1 and 0.5 * whole <= sharded <= min(1.0, 2 * whole), (whole, sharded)
    assert summaries["bpr_mf_sharded"]["test"]["recall@20"] <= summaries["bpr_mf_sharded"]["test"]["recall@50"]

    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.teachers.load import load_teacher

    cfg = config.load(RunConfig, TINY_SHARDED, [f"run={run}"])
    data = load_dataset(storage.join(run, "dataset"))
    model = load_teacher(cfg.teachers[1], run, data)          # a whole checkpoint, as an unsharded teacher's
    assert tuple(model.tables.weight("user").shape) == (data.n_users, 16)


@pytest.mark.integration  # a Ray head, 2 Ray Train workers, one of them SIGKILLed: ~3 min on 2 shared cores
def test_killed_worker_restarts_the_group_which_resumes(ray_head, datasets_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL rank 0's worker once the first checkpoint exists: Ray Train restarts the worker group
    (ray.max_failures), the new workers resume from the checkpoint, each evaluation is in the trajectory once."""
    import os
    import signal
    import time

    from hetcomp_dist.progress import TeacherLines
    from hetcomp_dist.teachers.actors import train_teachers

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head's mode
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run = str(tmp_path / "run")
    path = _write(tmp_path / "c.yaml", run, [_teacher(max_epochs=8)])
    data = yaml.safe_load(path.read_text())
    data["ray"] = {"address": ray_head["gcs"], "max_restarts": 1, "max_failures": 2}
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(RunConfig, path)
    checkpoints = storage.join(run, "teachers", "bpr_mf_sharded", "checkpoints")
    events: list[dict] = []
    killed: list[int] = []
    printer = TeacherLines(cfg.teachers, interval=0)

    def on_event(event: dict) -> None:
        events.append(event)
        printer(event)
        if event.get("event") == "epoch" and event.get("valid") is not None and not killed:
            deadline = time.monotonic() + 60
            while not any(storage.is_complete(storage.join(checkpoints, f"epoch-{e:06d}")) for e in (2, 4)):
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.2)
            os.kill(event["pid"], signal.SIGKILL)
            killed.append(event["pid"])

    (summary,) = train_teachers(cfg, report=on_event)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert killed and len(resumed) == 1 and resumed[0]["epoch"] >= 2 and resumed[0]["pid"] != killed[0]
    assert events[-1]["event"] == "done" and summary["epochs_trained"] == 8
    m = storage.read_manifest(storage.join(run, "teachers", "bpr_mf_sharded", "trajectory"))
    assert [h["epoch"] for h in m["history"]] == [2, 4, 6, 8] and len(m["trajectory"]) == 4
    assert 0 < summary["test"]["recall@20"] <= 1


# ----------------------------------------------------------------------------- the loop in 2 gloo processes

RESUME_TEACHERS = {   # MF row_wise; CML (after_step on shards) and NeuMF (DDP, two item tables) table_wise
    "mf": dict(model="bpr_mf", params={"dim": 16}, lr=0.2, table_optimizer="rowwise_adagrad"),
    "cml": dict(model="cml", params={"dim": 16, "n_neg": 4}, lr=0.1, table_optimizer="adagrad",
                item_sharding="table_wise"),
    "neumf": dict(model="neumf", params={"dim": 8, "layers": [8, 4]}, lr=0.05, table_optimizer="rowwise_adagrad",
                  item_sharding="table_wise", lr_decay=0.5, min_delta=1.0, eval_every=1),
    # min_delta 1: every evaluation after the first decays the lr, so the resumed epochs 3-4 must take the
    # decayed lr from the checkpoint of epoch 2

}


def _loop_worker(out_dir: Path, datasets: str) -> None:
    """One rank: each teacher trained 4 epochs straight, and 2 epochs then resumed to 4."""
    import dataclasses
    import os

    import torch
    import torch.distributed as dist

    from hetcomp_dist.run import ensure_dataset
    from hetcomp_dist.teachers.config import TeacherConfig
    from hetcomp_dist.teachers.sharded import train_sharded
    from hetcomp_dist.teachers.train import latest_checkpoint

    os.environ["HETCOMP_DATASETS_DIR"] = datasets
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = config.load(RunConfig, TINY_SHARDED, [f"run={out_dir / 'run'}"])
    if rank == 0:
        ensure_dataset(cfg)
    dist.barrier()
    results, events = {}, []
    for name, settings in RESUME_TEACHERS.items():
        t = TeacherConfig(**{"name": name, "workers": 2, "batch_size": 2048, "max_epochs": 4, "eval_every": 2,
                             "patience": 10, **settings})
        runs = {}
        for label, stops in (("straight", [4]), ("resumed", [2, 4])):
            out = str(out_dir / "run" / label / name)
            for stop in stops:
                summary = train_sharded(dataclasses.replace(t, max_epochs=stop), cfg.dataset_uri, out, cfg.trajectory,
                                        tuple(cfg.ks), cfg.eval_batch_size, events.append, torch.device("cpu"))
            runs[label] = {"summary": summary, "checkpoint": latest_checkpoint(out) if rank == 0 else None,
                           "trajectory": storage.read_manifest(storage.join(out, "trajectory")) if rank == 0 else None}
        results[name] = runs
    results["events"] = events
    torch.save(results, out_dir / f"rank{rank}.pt.tmp")
    (out_dir / f"rank{rank}.pt.tmp").rename(out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.integration  # two gloo processes, 3 teachers x 3 short trainings on ML-100K: ~1-2 min
def test_sharded_loop_resumes_where_it_stopped(datasets_dir: Path, tmp_path: Path) -> None:
    """A sharded teacher stopped after its first evaluation and resumed ends where a straight run ends: the
    same trajectory (evaluations, metrics), the same weights and optimizer state (bit for bit)."""
    import torch

    ranks = _run_two(tmp_path, datasets_dir)
    for name in RESUME_TEACHERS:
        straight, resumed = ranks[0][name]["straight"], ranks[0][name]["resumed"]
        assert ranks[1][name]["straight"]["summary"] is None                       # rank 0 writes
        every = RESUME_TEACHERS[name].get("eval_every", 2)
        assert [h["epoch"] for h in resumed["trajectory"]["history"]] == list(range(every, 5, every))
        assert resumed["trajectory"]["history"] == straight["trajectory"]["history"], name
        assert resumed["summary"]["test"] == straight["summary"]["test"], name
        a, b = straight["checkpoint"], resumed["checkpoint"]
        for part in ("model", "best_model"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)
        assert a["optimizer"]["lr_scale"] == b["optimizer"]["lr_scale"]
        for key, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][key][s]) for s, v in state.items()), (name, key)
        assert 0 < straight["summary"]["test"]["recall@20"] < 1
    assert ranks[0]["neumf"]["straight"]["checkpoint"]["optimizer"]["lr_scale"] == pytest.approx(0.5 ** 3)
    resumes = [e for e in ranks[0]["events"] if e["event"] == "resumed"]
    assert [(e["teacher"], e["epoch"]) for e in resumes] == [(n, 2) for n in RESUME_TEACHERS]


def _run_two(tmp_path: Path, datasets_dir: Path) -> list[dict]:
    import os
    import socket
    import subprocess
    import sys

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1",
                   PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
        with open(tmp_path / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path), str(datasets_dir)], cwd=REPO,
                                          env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=500)
    finally:
        for p in procs:            # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    files = [tmp_path / f"rank{r}.pt" for r in range(2)]
    if not all(f.exists() for f in files):   # judge the work, not the exit code (rare gloo abort at exit)
        pytest.fail("\n".join((tmp_path / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(2)))
    return [torch.load(f, weights_only=False) for f in files]


if __name__ == "__main__":
    import sys

    _loop_worker(Path(sys.argv[1]), sys.argv[2])
