"""`hetcomp train-teachers` / jobs/train_teachers.py: sequential, on a local Ray, as a Ray job, after a kill.

The fast tier trains the tiny config (configs/tiny.yaml, MovieLens 100K) in-process without Ray.
The integration tier starts real Ray: a local instance from the CLI (writing to the moto S3
server), and a Ray head (`ray start --head --block`, on loopback with free ports, its own temp
dir and HOME, token auth disabled for it and its clients) for `ray job submit` and for a driver
whose teacher actor is SIGKILLed mid-training. The head is stopped by signalling its own
`ray start` process, never with `ray stop` (that stops every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from hetcomp_dist import config, lease, storage
from hetcomp_dist.cli import main
from hetcomp_dist.run import RunConfig
from hetcomp_dist.progress import TeacherLines as ProgressPrinter
from hetcomp_dist.teachers.actors import FORWARDED_ENV, TeachersFailed, format_summary, train_teachers
from hetcomp_dist.teachers.trajectory import read_trajectories
from hetcomp_dist.teachers.config import TeacherConfig
from hetcomp_dist.loop import Checkpointer
from hetcomp_dist.teachers.train import latest_checkpoint
from procs import REPO, VENV_BIN, clean_env, die_with_parent, kill_mentioning, run_with_local_ray

TINY = REPO / "configs" / "tiny.yaml"
NAMES = ["bpr_mf", "lightgcn", "multvae"]
BUCKET = "hetcomp-test"  # the bucket of conftest's s3_server


# ----------------------------------------------------------------------------- helpers

def write_config(path: Path, run: str, teachers: list[dict] | None = None, **top: Any) -> Path:
    """configs/tiny.yaml with ``run`` (and optionally other teachers / top-level keys), written to ``path``."""
    data = yaml.safe_load(TINY.read_text())
    data["run"] = run
    if teachers is not None:
        data["teachers"] = teachers
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_teacher(name: str, **changes: Any) -> dict:
    (teacher,) = [t for t in yaml.safe_load(TINY.read_text())["teachers"] if t["name"] == name]
    return {**teacher, **changes}


def check_run(run: str, names: list[str]) -> list[dict]:
    """Every teacher's trajectory is complete (4 stages, evaluations once each, in order); the summary lists them."""
    for name in names:
        m = storage.read_manifest(storage.join(run, "teachers", name, "trajectory"))
        assert m["kind"] == "teacher-trajectory"
        assert len(m["trajectory"]) == 4
        epochs = [h["epoch"] for h in m["history"]]
        assert epochs and epochs == sorted(set(epochs)), epochs
        assert m["summary"]["best_epoch"] in epochs
    summary_uri = storage.join(run, "teachers", "summary")
    assert storage.read_manifest(summary_uri)["kind"] == "teacher-summary"
    summaries = storage.read_json(summary_uri, "summary.json")
    assert [s["teacher"] for s in summaries] == names
    for s in summaries:
        assert 0 < s["test"]["recall@20"] <= s["test"]["recall@50"] <= 1
        assert s["train_seconds"] > 0
    return summaries


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# ----------------------------------------------------------------------------- fast tier

def test_sequential_cli_run(tmp_path: Path, datasets_dir: Path, capsys: pytest.CaptureFixture,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run = str(tmp_path / "run")
    threads = torch.get_num_threads()
    try:
        assert main(["train-teachers", "--config", str(TINY), "--set", f"run={run}", "--sequential"]) == 0
        out = capsys.readouterr().out
        summaries = check_run(run, NAMES)
        for name in NAMES:
            assert f"[{name:<8}] epoch    2/6" in out and "valid recall@20" in out
            assert f"[{name:<8}] done: best epoch" in out
            assert f"| {name} | {name} | " in out
        assert "| teacher | model | recall@20 | ndcg@20 | recall@50 | ndcg@50 | best epoch | epochs | train s |" in out

        # A rerun finds the complete trajectories and trains nothing again, also when a trajectory was
        # written before a TeacherConfig field existed (it takes its default) or with other threads.
        manifest = Path(run) / "teachers" / "bpr_mf" / "trajectory" / "MANIFEST.json"
        written = json.loads(manifest.read_text())
        del written["config"]["lr_decay"]
        written["config"]["threads"] = 2
        manifest.write_text(json.dumps(written))
        assert main(["train-teachers", "--config", str(TINY), "--set", f"run={run}", "--sequential"]) == 0
        out = capsys.readouterr().out
        assert out.count("not trained again") == 3 and "] epoch" not in out
        assert check_run(run, NAMES) == summaries
    finally:
        torch.set_num_threads(threads)


def test_lr_decays_at_each_evaluation_without_improvement(tmp_path: Path, datasets_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """lr_decay multiplies the learning rate once per non-improving evaluation, and the checkpoint keeps it."""
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run = str(tmp_path / "run")
    # lr 0.2 overshoots on ML-100K, so some evaluations do not improve.
    teacher = tiny_teacher("bpr_mf", lr=0.2, lr_decay=0.5, eval_every=1, max_epochs=8, patience=100)
    path = write_config(tmp_path / "c.yaml", run, [teacher])
    threads = torch.get_num_threads()
    try:
        assert main(["train-teachers", "--config", str(path), "--sequential"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = storage.join(run, "teachers", "bpr_mf")
    history = storage.read_manifest(storage.join(out, "trajectory"))["history"]
    values = [h["metrics"]["recall@20"] for h in history]
    misses = sum(v <= max(values[:i], default=-1.0) for i, v in enumerate(values))
    assert len(values) == 8 and 0 < misses < 8, values
    state = latest_checkpoint(out)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(0.2 * 0.5 ** misses)]


def test_min_delta_stops_on_small_gains_but_keeps_the_best_state(tmp_path: Path, datasets_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Gains below min_delta count against patience (and decay lr), while the best evaluation is still kept."""
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run = str(tmp_path / "run")
    teacher = tiny_teacher("bpr_mf", lr=0.2, lr_decay=0.5, eval_every=1, max_epochs=8, patience=2, min_delta=1.0)
    threads = torch.get_num_threads()
    try:
        assert main(["train-teachers", "--config", str(write_config(tmp_path / "c.yaml", run, [teacher])),
                     "--sequential"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = storage.join(run, "teachers", "bpr_mf")
    history = storage.read_manifest(storage.join(out, "trajectory"))["history"]
    values = [h["metrics"]["recall@20"] for h in history]
    assert len(values) == 3, values                  # one improvement (from nothing), then 2 below min_delta
    state = latest_checkpoint(out)
    assert state["stopping"]["best_epoch"] == 1 + values.index(max(values))
    assert state["stopping"]["best"] == pytest.approx(max(values))
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(0.2 * 0.5 ** 2)]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path: Path, datasets_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed teacher retrains from epoch 1 and leaves no checkpoint of the old config; threads and stopping rules may differ."""
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run, out = str(tmp_path / "run"), storage.join(str(tmp_path / "run"), "teachers", "bpr_mf")
    threads = torch.get_num_threads()
    try:
        first = tiny_teacher("bpr_mf", max_epochs=4, eval_every=1)
        assert main(["train-teachers", "--config", str(write_config(tmp_path / "a.yaml", run, [first])), "--sequential"]) == 0
        assert _checkpoint_epochs(out) == [3, 4]        # the newest two: a crash mid-write keeps one
        assert latest_checkpoint(out, TeacherConfig(**{**first, "threads": 2})) is not None
        assert latest_checkpoint(out, TeacherConfig(**{**first, "max_epochs": 9, "patience": 1})) is not None
        second = {**first, "lr": 0.02, "max_epochs": 2}
        assert latest_checkpoint(out, TeacherConfig(**second)) is None
        assert main(["train-teachers", "--config", str(write_config(tmp_path / "b.yaml", run, [second])), "--sequential"]) == 0
    finally:
        torch.set_num_threads(threads)
    history = storage.read_manifest(storage.join(out, "trajectory"))["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert _checkpoint_epochs(out) == [1, 2]
    assert storage.read_manifest(storage.join(out, "checkpoints", "epoch-000002"))["config"]["teacher"]["lr"] == 0.02


def _checkpoint_epochs(out: str) -> list[int]:
    return Checkpointer(storage.join(out, "checkpoints"), "teacher-checkpoint", {}, lambda s: True).epochs()


@pytest.mark.parametrize("teachers, message", [
    ([], "no teachers"),
    ([tiny_teacher("bpr_mf"), tiny_teacher("bpr_mf")], "c.yaml: teachers: must be unique, 'bpr_mf' repeated"),
    ([tiny_teacher("bpr_mf", model="bpr")], "c.yaml: teachers[0].model: unknown model 'bpr' (registered: "),
    ([tiny_teacher("bpr_mf", params={"dims": 8})], "c.yaml: teachers[0].params: not accepted by bpr_mf: "),
    ([tiny_teacher("bpr_mf", select_metric="recall@10")],
     "c.yaml: teachers[0].select_metric: must be recall@K or ndcg@K with K in ks [20, 50], got 'recall@10'"),
])
def test_bad_teacher_list_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              teachers: list, message: str) -> None:
    path = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), teachers)
    assert main(["train-teachers", "--config", str(path), "--sequential"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetcomp train-teachers: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # checked before the dataset is prepared


def test_unknown_config_key_is_a_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["train-teachers", "--config", str(TINY), "--set", "ray.workers=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key(s) workers for RayConfig" in err and "\n" not in err


def test_tiny_config_loads() -> None:
    cfg = config.load(RunConfig, TINY)
    assert [t.name for t in cfg.teachers] == NAMES
    assert all(t.cpus == 1 and t.threads == 1 for t in cfg.teachers)


def test_format_summary() -> None:
    metrics = {f"{m}@{k}": 0.5 for m in ("recall", "ndcg") for k in (10, 20, 50)}
    table = format_summary([{"teacher": "a", "model": "bpr_mf", "best_epoch": 4, "epochs_trained": 6,
                             "train_seconds": 1.25, "test": metrics}], [10, 20, 50])
    assert table.splitlines()[0] == ("| teacher | model | recall@20 | ndcg@20 | recall@50 | ndcg@50 "
                                     "| best epoch | epochs | train s |")
    assert table.splitlines()[2] == "| a | bpr_mf | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 4 | 6 | 1.2 |"


# ----------------------------------------------------------------------------- integration tier

@pytest.mark.integration
def test_cli_on_local_ray_writes_to_s3(s3_server: str, datasets_dir: Path, tmp_path: Path) -> None:
    """The CLI starts a local Ray (3 teachers, 2 CPUs), writes to moto S3, and leaves no ~/.ray/auth_token."""
    run = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    home = tmp_path / "home"
    home.mkdir()
    proc = run_with_local_ray([str(VENV_BIN / "hetcomp"), "train-teachers", "--config", str(TINY), "--set", f"run={run}"],
                              cwd=tmp_path, timeout=400, HOME=str(home), HETCOMP_DATASETS_DIR=str(datasets_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_run(run, NAMES)
    for name in NAMES:
        assert f"[{name:<8}] done: best epoch" in proc.stdout
    assert "| multvae | multvae | " in proc.stdout
    assert not (home / ".ray" / "auth_token").exists()


@pytest.fixture(scope="module")
def ray_head(datasets_dir: Path, s3_server: str) -> Iterator[dict[str, Any]]:
    """A Ray head on loopback (`ray start --head --block`): yields its addresses and the env for its clients.

    Its environment has the S3 server's credentials, as a node has its own (the driver forwards
    none), but not its endpoint or region (teacher actors must get those settings from the driver);
    a temp HOME and RAY_AUTH_MODE=disabled; the venv's bin comes first in PATH so a job's `python`
    has the package. Stopped by SIGTERM to its `ray start` process, which stops the processes it started.
    """
    temp = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's socket paths live below it
    (temp / "home").mkdir()
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    env = {k: v for k, v in clean_env().items() if k not in FORWARDED_ENV}
    env.update(HOME=str(temp / "home"), RAY_AUTH_MODE="disabled", HETCOMP_DATASETS_DIR=str(datasets_dir),
               RAY_USAGE_STATS_ENABLED="0")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--temp-dir={temp / 'r'}", "--disable-usage-stats"]
    with open(temp / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": dashboard, "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        time.sleep(1)
        kill_mentioning(str(temp))  # anything of this head still alive (its temp dir is unique)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
def test_ray_job_submit(ray_head: dict[str, Any], tmp_path: Path) -> None:
    """The documented `ray job submit ... -- python jobs/train_teachers.py` against a real head."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run = str(tmp_path / "run")
    job_id = f"hetcomp-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", job_id,
         "--working-dir", ".", "--", "python", "jobs/train_teachers.py", "--config", "configs/tiny.yaml",
         "--set", f"run={run}"],
        env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=400, preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert JobSubmissionClient(ray_head["dashboard"]).get_job_status(job_id) == JobStatus.SUCCEEDED
    check_run(run, NAMES)
    assert "| lightgcn | lightgcn | " in proc.stdout  # the job's log streams back to the submitter


@pytest.mark.integration
def test_killed_teacher_resumes_from_its_checkpoint(ray_head: dict[str, Any], s3_server: str, datasets_dir: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL a teacher's actor once its first checkpoint exists: Ray restarts it, it resumes, the run completes."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head's mode
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    run = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    bpr = tiny_teacher("bpr_mf", max_epochs=20, patience=100)
    path = write_config(tmp_path / "c.yaml", run, [bpr, tiny_teacher("multvae")],
                        ray={"address": ray_head["gcs"], "max_restarts": 2})
    cfg = config.load(RunConfig, path)
    checkpoints = storage.join(run, "teachers", "bpr_mf", "checkpoints")
    events: list[dict] = []
    killed: list[int] = []
    printer = ProgressPrinter(cfg.teachers, interval=0)

    def first_checkpoint() -> str | None:
        fs, folder = storage.filesystem(checkpoints)
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)) if fs.exists(folder) else []
        return next((n for n in names if storage.is_complete(storage.join(checkpoints, n))), None)

    def on_event(event: dict) -> None:
        events.append(event)
        printer(event)
        if event["teacher"] == "bpr_mf" and not killed:
            deadline = time.monotonic() + 120
            while first_checkpoint() is None:  # poll storage (the actor keeps training meanwhile)
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.2)
            os.kill(event["pid"], signal.SIGKILL)
            killed.append(event["pid"])

    summaries = train_teachers(cfg, report=on_event)

    assert [s["teacher"] for s in summaries] == ["bpr_mf", "multvae"]
    mine = [e for e in events if e["teacher"] == "bpr_mf"]
    resumed = [e for e in mine if e["event"] == "resumed"]
    assert killed and len(resumed) == 1 and resumed[0]["epoch"] >= 2
    assert resumed[0]["pid"] != killed[0]
    assert mine[-1]["event"] == "done" and mine[-1]["epochs_trained"] == 20
    check_run(run, ["bpr_mf", "multvae"])
    traj = storage.join(run, "teachers", "bpr_mf", "trajectory")
    manifest = storage.read_manifest(traj)
    assert [h["epoch"] for h in manifest["history"]] == list(range(2, 21, 2))  # each evaluation once
    tops = read_trajectories([traj], 0, manifest["n_users"])
    assert tuple(tops.shape) == (manifest["n_users"], 1, 4, 50)
    assert int(tops.min()) >= 0 and int(tops.max()) < manifest["n_items"]
    json.dumps(summaries)  # plain data


@pytest.mark.integration
def test_an_actor_commits_nothing_once_the_run_lost_its_lease(ray_head: dict[str, Any], datasets_dir: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The actors check the driver's lease on <run>/teachers before each commit: taken over, they commit nothing."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head's mode
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    bpr = tiny_teacher("bpr_mf", max_epochs=200, patience=1000, eval_every=1)
    path = write_config(tmp_path / "c.yaml", str(tmp_path / "run"), [bpr],
                        ray={"address": ray_head["gcs"], "max_restarts": 0})
    cfg = config.load(RunConfig, path)
    uri = Path(lease.lease_uri(cfg.layout.teachers))
    stolen: list[int] = []

    def on_event(event: dict) -> None:          # at the first event from the actor: another writer takes over
        if not stolen:
            record = json.loads(uri.read_text())
            uri.write_text(json.dumps({**record, "token": "someone-else", "owner": "thief"}))
            stolen.append(event["pid"])

    with pytest.raises(TeachersFailed, match="bpr_mf"):
        train_teachers(cfg, report=on_event)
    assert stolen and stolen[0] != os.getpid()           # the commit that failed was the actor's
    assert not storage.is_complete(cfg.layout.trajectory("bpr_mf"))
    assert json.loads(uri.read_text())["owner"] == "thief"   # the thief's lease is left to the thief
