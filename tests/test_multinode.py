"""A real two-node Ray cluster on this host, each node in its own network namespace, S3 the only shared storage.

    host       NET.1  moto S3 server (bound to the bridge), the test: `ray job submit` to NET.2:8265
    node 1     NET.2  network namespace <tag>n1: `ray start --head --node-ip-address NET.2`
    node 2     NET.3  network namespace <tag>n2: `ray start --address NET.2:6379 --node-ip-address NET.3`

NET is 10.77.<free octet>; scripts/ci/netns.sh makes the namespaces, the bridge, the veth pairs
(and an iptables ACCEPT for the bridge where Docker's FORWARD DROP would filter bridged traffic)
and removes them. Each node has its own Ray temp dir and HOME, its own environment (S3 credentials
and region as a node has its own; no S3 endpoint and no datasets folder: the endpoint comes from the
run config, the data from S3), and gets its own copy of the submitted working dir (a copy of the
repository's files). The jobs read and write only s3:// URIs: the MovieLens-100K file is uploaded
first, and data.source names it.

Integration tier; skipped (one line) where network namespaces cannot be made (`ip netns add` not
permitted, no iproute2). The Ray nodes are stopped by SIGTERM to their `ray start --block` processes,
then whatever is left in the namespaces is killed by pid (never `ray stop`: it stops every Ray on the
host), then the namespaces, links, firewall rule and the moto server go, whether the tests passed or not.

Gloo picks the address it advertises from the hostname, which resolves to 127.0.0.1 on this host and
which the namespaces share: each node's environment sets GLOO_SOCKET_IFNAME=eth0 (its interface), as a
cluster whose hostnames do not resolve to the node's own address must.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from hetcomp_dist import config, storage
from hetcomp_dist.ray_cluster import train_storage
from hetcomp_dist.run import RunConfig
from procs import REPO, VENV_BIN, clean_env, die_with_parent, kill_mentioning
from test_teachers_ray import NAMES, check_run

NETNS_SH = REPO / "scripts" / "ci" / "netns.sh"
TINY = REPO / "configs" / "tiny.yaml"
BUCKET = "hetcomp-multinode"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
DISTILL = ["distill.method=hetcomp", "distill.dim=8", "distill.threads=1", "distill.max_epochs=4",
           "distill.eval_every=2", "distill.batch_size=4096", "distill.target_size=20",
           "distill.select_metric=recall@20", "distill.workers=2", "distill.cpus_per_worker=1",
           "ray.placement_strategy=SPREAD"]
KILL_AFTER_EPOCH = 2

# The driver of the fault test, written into the submitted working dir: distill_ray (what jobs/distill.py
# runs) with a hook that records each rank's node and SIGKILLs the rank on the second node once. The hook
# class lives in __main__, so Ray pickles it by value: the workers need no module of the tests.
DRIVER = '''"""Written by tests/test_multinode.py: distill_ray with a fault hook (see KillOnNode)."""

import json
import os
import signal
import sys
from pathlib import Path

import hetcomp_dist
from hetcomp_dist.distill.ray_job import distill_ray
from hetcomp_dist.run import load_run


class KillOnNode:
    """Every rank records (rank, node address, pid) after each evaluation; after ``epoch``'s evaluation
    and checkpoint, the rank on ``node_ip`` SIGKILLs itself, once (``killed.json`` records that it did)."""

    def __init__(self, epoch, node_ip, folder):
        self.epoch, self.node_ip, self.folder = epoch, node_ip, Path(folder)

    def __call__(self, event, rank, world):
        import ray

        record = {"rank": rank, "world": world, "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                  "epoch": event["epoch"]}
        (self.folder / f"rank{rank}-epoch{event['epoch']}-{os.getpid()}.json").write_text(json.dumps(record))
        marker = self.folder / "killed.json"
        if event["epoch"] == self.epoch and record["ip"] == self.node_ip and not marker.exists():
            marker.write_text(json.dumps(record))
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    epoch, node_ip, folder, *overrides = sys.argv[1:]
    print(f"hetcomp_dist imported from {hetcomp_dist.__file__}", flush=True)
    metrics = distill_ray(load_run("configs/tiny.yaml", overrides), hooks=[KillOnNode(int(epoch), node_ip, folder)])
    print(f"resumed_from {metrics['resumed_from']}", flush=True)
'''


# ----------------------------------------------------------------------------- fast tier: the settings

def test_ray_train_settings_load_and_validate() -> None:
    cfg = config.load(RunConfig, TINY, ["ray.train_storage_path=s3://b/ray", "ray.max_failures=1",
                                        "ray.placement_strategy=SPREAD"])
    assert (cfg.ray.train_storage_path, cfg.ray.max_failures, cfg.ray.placement_strategy) == ("s3://b/ray", 1, "SPREAD")
    assert (cfg.ray.max_restarts, config.load(RunConfig, TINY).ray.placement_strategy) == (3, "PACK")
    for override, message in [
        ("ray.placement_strategy=spread", "ray.placement_strategy: 'spread' is not one of ['PACK', 'SPREAD', "),
        ("ray.max_failures=-2", "ray.max_failures: must be >= -1, got -2"),
        ("ray.train_storage_path=ray_results", "ray.train_storage_path: 'ray_results' is a relative path"),
        ("ray.train_storage_path=file://x/y", "ray.train_storage_path: 'file://x/y' is a relative path"),
        ("ray.train_storage_path=gs://b/x", "ray.train_storage_path: unsupported URI scheme in 'gs://b/x'"),
    ]:
        with pytest.raises(config.ConfigError) as e:
            config.load(RunConfig, TINY, [override])
        assert message in str(e.value) and "\n" not in str(e.value)


def test_train_storage_carries_the_endpoint_not_the_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// train_storage_path gets a pyarrow filesystem made on the driver: pickled (as Ray sends it to
    the controller and the workers) it holds the endpoint, never the driver's credentials."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "driver-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "driver-secret")
    assert train_storage(None) == (None, None)
    assert train_storage("/shared/ray") == ("/shared/ray", None)
    assert train_storage("s3://b/ray") == ("s3://b/ray", None)          # AWS itself: Ray resolves it
    for endpoint, env in (("http://10.0.0.1:9000", None), (None, "http://10.0.0.2:9000")):
        if env:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", env)
        path, fs = train_storage("s3://b/ray/", endpoint)
        options = pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]
        assert path == "b/ray" and options["endpoint_override"] == (endpoint or env)
        assert options["access_key"] is None and options["secret_key"] is None


# ----------------------------------------------------------------------------- the cluster

def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def _check_netns_allowed(tag: str) -> None:
    """Skip (one line) unless this process may create a network namespace."""
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        pytest.skip("network namespaces: needs Linux and the `ip` command (iproute2)")
    probe = _run(["ip", "netns", "add", f"{tag}x"])
    if probe.returncode != 0:
        pytest.skip(f"network namespaces: `ip netns add` not permitted here ({probe.stderr.strip()})")
    _run(["ip", "netns", "delete", f"{tag}x"])


def _free_net() -> str:
    """10.77.X with X not used by any address or route of the host (concurrent runs pick different ones)."""
    used = _run(["ip", "-4", "-o", "addr"]).stdout + _run(["ip", "-4", "route"]).stdout
    for octet in random.sample(range(1, 255), 254):
        if f"10.77.{octet}." not in used:
            return f"10.77.{octet}"
    raise RuntimeError("no free 10.77.X.0/24 network")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    with contextlib.suppress(urllib.error.URLError, OSError):
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    return False


def _wait(what: str, ready: Any, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not come up (exit {proc.poll()}); log tail:\n{tail}")
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM them all, wait up to ``timeout`` seconds in all, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _copy_working_dir(dest: Path) -> None:
    """The repository's files (tracked, and untracked unless ignored) as they are on disk: what a node
    would have from a checkout or an image; no runs/, no venv, no caches."""
    listed = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    names = [n for n in listed.stdout.split("\0") if n] if listed.returncode == 0 else []
    if not names:  # no git here: the package, the entry points and the configs
        names = [str(p.relative_to(REPO)) for d in ("hetcomp_dist", "jobs", "configs") for p in (REPO / d).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in names:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def cluster(datasets_dir: Path) -> Iterator[dict[str, Any]]:
    """Two Ray nodes in two network namespaces, a moto S3 server on the bridge, ML-100K uploaded to it.

    While it lives this process's environment points S3 clients at that server (restored afterwards), so
    the tests read the outputs with hetcomp_dist.storage. Yields the addresses, folders and the run URI.
    """
    tag = f"hc{uuid.uuid4().hex[:6]}"
    _check_netns_allowed(tag)
    temp = Path(tempfile.mkdtemp(prefix="hcmn", dir="/tmp"))  # short: Ray's socket paths live below it
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, temp, ignore_errors=True)
        stack.callback(kill_mentioning, str(temp))       # anything of ours outside the namespaces (none expected)
        net = _free_net()
        host_ip, head_ip, node_ip = f"{net}.1", f"{net}.2", f"{net}.3"
        stack.callback(_run, ["bash", str(NETNS_SH), "down", tag])   # kills what is left in the namespaces
        up = _run(["bash", str(NETNS_SH), "up", tag, net, "2"])
        assert up.returncode == 0, f"netns.sh up failed: {up.stdout}{up.stderr}"

        # S3 on the bridge: every namespace reaches it at NET.1.
        port = _free_port(host_ip)
        endpoint = f"http://{host_ip}:{port}"
        with open(temp / "moto.log", "wb") as log:
            moto = subprocess.Popen([str(VENV_BIN / "python"), "-m", "moto.server", "-H", host_ip, "-p", str(port)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
        stack.callback(_stop, [moto], 10)
        _wait("moto server", lambda: _answers(f"{endpoint}/moto-api/"), moto, temp / "moto.log", 60)
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        missing = str(temp / "no-aws-config")
        aws = {"AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing, "AWS_EC2_METADATA_DISABLED": "true",
               **CREDENTIALS}
        for name, value in {**aws, "AWS_ENDPOINT_URL_S3": endpoint, "RAY_AUTH_MODE": "disabled"}.items():
            mp.setenv(name, value)
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        source = f"s3://{BUCKET}/source/ml-100k.inter"
        fs.put(str(datasets_dir / "ml-100k" / "ml-100k.inter"), source[len("s3://"):])

        # The working dir the jobs are submitted with.
        workdir = temp / "src"
        _copy_working_dir(workdir)
        (workdir / "distill_killed.py").write_text(DRIVER)

        # The nodes: their own temp dir, HOME and environment (no endpoint, no datasets folder).
        base = {k: v for k, v in clean_env().items() if not k.startswith(("AWS_", "HETCOMP_", "GLOO_"))}
        node_env = {**base, **aws, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "GLOO_SOCKET_IFNAME": "eth0"}
        common = ["--block", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
        nodes: list[dict[str, Any]] = []
        # `ray start --block` stops the processes it started on SIGTERM; netns.sh down kills any left after that.
        stack.callback(lambda: _stop([n["proc"] for n in reversed(nodes)], 15))
        for i, args in enumerate([
            ["--head", f"--node-ip-address={head_ip}", "--port=6379", "--include-dashboard=true",
             f"--dashboard-host={head_ip}", "--dashboard-port=8265"],
            [f"--address={head_ip}:6379", f"--node-ip-address={node_ip}"],
        ], start=1):
            home, log_path = temp / f"home{i}", temp / f"node{i}.log"
            home.mkdir()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", f"{tag}n{i}", str(VENV_BIN / "ray"), "start", *args, *common,
                     f"--temp-dir={temp / f'r{i}'}"],
                    env={**node_env, "HOME": str(home)}, cwd=home, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            nodes.append({"ip": (head_ip, node_ip)[i - 1], "proc": proc, "log": log_path, "temp": temp / f"r{i}",
                          "home": home})
            if i == 1:
                dashboard = f"http://{head_ip}:8265"
                _wait("Ray head", lambda: _answers(f"{dashboard}/api/version"), proc, log_path)
        _wait("the second Ray node", lambda: len(_alive_nodes(dashboard)) == 2, nodes[1]["proc"], nodes[1]["log"])
        assert sorted(_alive_nodes(dashboard).values()) == [head_ip, node_ip]

        (temp / "home0").mkdir()  # the submitter's (the host's)
        run = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
        overrides = [f"run={run}", f"data.source={source}", "data.format=inter", "data.protocol=leave-last-out",
                     f"storage.endpoint_url={endpoint}", f"ray.train_storage_path={run}/ray-train"]
        yield {"tag": tag, "dashboard": dashboard, "head_ip": head_ip, "node_ip": node_ip, "nodes": nodes,
               "temp": temp, "workdir": workdir, "run": run, "overrides": overrides,
               "submit_env": {**base, "RAY_AUTH_MODE": "disabled", "HOME": str(temp / "home0")}}


def _alive_nodes(dashboard: str) -> dict[str, str]:
    """node id -> node address of the cluster's alive nodes (Ray's state API, through the dashboard)."""
    from ray.util.state import list_nodes

    with contextlib.suppress(Exception):  # not up yet
        return {n.node_id: n.node_ip for n in list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])}
    return {}


def submit(cluster: dict[str, Any], job_id: str, entrypoint: list[str], timeout: float = 420) -> str:
    """`ray job submit --working-dir <copy>` from the host to the head's dashboard; returns the job's log."""
    proc = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id,
         "--working-dir", str(cluster["workdir"]), "--", *entrypoint],
        env=cluster["submit_env"], cwd=cluster["temp"], capture_output=True, text=True, timeout=timeout,
        preexec_fn=die_with_parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(l for l in log.splitlines() if "Successfully loaded" not in l)[-6000:]
    return log


def no_local_outputs(cluster: dict[str, Any]) -> None:
    """Nothing was written into a working dir: the submitted copy, nor any node's extracted copy of it."""
    copies = [cluster["workdir"]] + [p for n in cluster["nodes"] for p in n["temp"].glob(
        "session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert len(copies) >= 2, copies  # the submitted one and at least the head's
    for copy in copies:
        bad = [p for p in copy.rglob("*") if p.name in ("runs", "s3:", "MANIFEST.json", "ray_results")]
        assert not bad, bad
    for node in cluster["nodes"]:
        assert not (node["home"] / "ray_results").exists()   # Ray Train's own folder went to S3 as well


@pytest.fixture(scope="module")
def teachers(cluster: dict[str, Any]) -> dict[str, Any]:
    """The tiny config's three teachers, trained by `ray job submit ... jobs/train_teachers.py` into S3."""
    log = submit(cluster, f"teachers-{uuid.uuid4().hex[:8]}",
                 ["python", "jobs/train_teachers.py", "--config", "configs/tiny.yaml",
                  *[a for o in cluster["overrides"] for a in ("--set", o)]])
    assert f"summary written to {cluster['run']}/teachers/summary" in log
    check_run(cluster["run"], NAMES)                 # trajectories and summary in S3, with their manifests
    assert storage.is_complete(f"{cluster['run']}/dataset")   # prepared from the s3:// source
    return cluster


# ----------------------------------------------------------------------------- integration tier

@pytest.mark.integration
def test_distill_job_spreads_its_workers_over_both_nodes(teachers: dict[str, Any]) -> None:
    """jobs/distill.py with 2 workers, SPREAD: one worker per node, outputs and Ray Train's folder in S3."""
    from ray.util.state import list_actors, list_jobs

    c = teachers
    job_id = f"distill-{uuid.uuid4().hex[:8]}"
    log = submit(c, job_id, ["python", "jobs/distill.py", "--config", "configs/tiny.yaml",
                             *[a for o in c["overrides"] + DISTILL for a in ("--set", o)]])
    out = f"{c['run']}/distill/hetcomp"
    assert f"written to {out}" in log and "student (hetcomp): test " in log
    manifest = storage.read_manifest(out)
    assert manifest["kind"] == "student"
    assert set(manifest["parts"]) == {"student.pt", "metrics.json", "report.md", "curves.png", "stages.png"}
    metrics = storage.read_json(out, "metrics.json")
    assert metrics["workers"] == 2 and metrics["resumed_from"] == []
    assert [h["epoch"] for h in metrics["history"]] == [2, 4]
    assert not storage.exists(f"{out}/checkpoints")    # removed once the outputs were written
    assert storage.exists(f"{c['run']}/ray-train/distill-hetcomp/.validate_storage_marker")   # Ray Train's, in S3

    (job,) = [j for j in list_jobs(address=c["dashboard"]) if j.submission_id == job_id]
    nodes = _alive_nodes(c["dashboard"])
    workers = list_actors(address=c["dashboard"], filters=[("class_name", "=", "RayTrainWorker"),
                                                           ("job_id", "=", job.job_id)], detail=True)
    assert sorted(nodes[w.node_id] for w in workers) == sorted([c["head_ip"], c["node_ip"]])
    no_local_outputs(c)


@pytest.mark.integration
def test_worker_killed_on_the_second_node_resumes_from_the_s3_checkpoint(teachers: dict[str, Any]) -> None:
    """The rank on node 2 SIGKILLs itself after the epoch-2 checkpoint: Ray Train restarts the group (both
    nodes again), which resumes from <out>/checkpoints in S3 and finishes."""
    c = teachers
    records = c["temp"] / "ranks"   # under /tmp: the namespaces share this host's filesystem
    records.mkdir()
    out = f"{c['run']}/killed"
    log = submit(c, f"killed-{uuid.uuid4().hex[:8]}",
                 ["python", "distill_killed.py", str(KILL_AFTER_EPOCH), c["node_ip"], str(records),
                  *c["overrides"], *DISTILL, f"distill.out={out}", "ray.max_failures=1"])
    # The driver ran on the head, from the head's copy of the working dir.
    head_copies = str(c["nodes"][0]["temp"])
    assert f"hetcomp_dist imported from {head_copies}/session_" in log and "/working_dir_files/" in log
    killed = json.loads((records / "killed.json").read_text())
    assert killed["ip"] == c["node_ip"] and killed["epoch"] == KILL_AFTER_EPOCH
    seen = [json.loads(p.read_text()) for p in records.glob("rank*.json")]
    before = {r["ip"] for r in seen if r["epoch"] == KILL_AFTER_EPOCH}
    after = {r["ip"] for r in seen if r["epoch"] > KILL_AFTER_EPOCH}
    assert before == after == {c["head_ip"], c["node_ip"]}       # both groups spread over both nodes
    assert killed["pid"] not in {r["pid"] for r in seen if r["epoch"] > KILL_AFTER_EPOCH}
    metrics = storage.read_json(out, "metrics.json")
    assert metrics["resumed_from"] == [KILL_AFTER_EPOCH] and metrics["workers"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [2, 4]
    assert storage.read_manifest(out)["kind"] == "student" and not storage.exists(f"{out}/checkpoints")
    assert f"resumed_from [{KILL_AFTER_EPOCH}]" in log
    no_local_outputs(c)
