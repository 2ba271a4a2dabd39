"""No credential reaches Ray's files, and a locally started Ray listens on loopback only.

`hetcomp train-teachers` runs (one small teacher, a local Ray with its own temp dir) with canary
values in AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_ACCESS_KEY_ID. While it runs, the
listening TCP sockets of its process tree (the driver, GCS, raylet, agents, workers) are
sampled from /proc; afterwards every file under Ray's temp dir and the run is searched for the
canaries. Before the fix the actors' runtime_env carried every AWS_* variable (Ray stores and
logs it) and Ray's servers listened on all interfaces.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from procs import REPO, VENV_BIN, clean_env, die_with_parent, kill_mentioning, pids_mentioning

CANARIES = {"AWS_SECRET_ACCESS_KEY": "canary-secret-5f1d0c7e", "AWS_SESSION_TOKEN": "canary-token-9a3b27d4",
            "AWS_ACCESS_KEY_ID": "CANARYKEYID71C2"}


def _listening() -> dict[int, str]:
    """Socket inode -> "address:port" of every listening TCP socket (IPv4 and IPv6) in this namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, host order
                found[int(fields[9])] = f"{ipaddress.ip_address(raw)}:{int(port, 16)}"
    return found


def _tree(root: int) -> set[int]:
    """``root`` and its descendants."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _sockets_of(pids: set[int], listening: dict[int, str]) -> set[tuple[str, str]]:
    """(process name, address:port) of the listening sockets ``pids`` hold."""
    held = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in listening:
                held.add((name, listening[int(target[8:-1])]))
    return held


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _files_with(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                hits += [f"{path}: {needle.decode()}" for needle in needles if needle in data]
    return hits


@pytest.mark.integration
def test_no_credentials_in_ray_files_and_ray_on_loopback(datasets_dir: Path, tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    (teacher,) = [t for t in data["teachers"] if t["name"] == "bpr_mf"]
    data["teachers"] = [{**teacher, "max_epochs": 2, "eval_every": 2}]   # one actor is enough
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    (tmp_path / "home").mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rays", dir="/tmp"))  # short: Ray's socket paths live below it
    env = clean_env(RAY_TMPDIR=str(ray_tmp), HOME=str(tmp_path / "home"), HETCOMP_DATASETS_DIR=str(datasets_dir),
                    RAY_USAGE_STATS_ENABLED="0", **CANARIES)
    seen: set[tuple[str, str]] = set()
    try:
        with open(tmp_path / "out.log", "wb") as log:
            proc = subprocess.Popen([str(VENV_BIN / "hetcomp"), "train-teachers", "--config", str(config_path),
                                     "--set", f"run={run}"], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            deadline = time.monotonic() + 400
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= _sockets_of(_tree(proc.pid) | set(pids_mentioning(str(ray_tmp))), _listening())
                time.sleep(0.3)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        output = (tmp_path / "out.log").read_text(errors="replace")
        assert proc.returncode == 0, output[-3000:]
        names = {name for name, _ in seen}
        assert {"gcs_server", "raylet"} <= names, seen   # the sampling saw Ray's servers
        assert all(_is_loopback(address) for _, address in seen), sorted(seen)
        needles = [v.encode() for v in CANARIES.values()]
        assert not any(n.decode() in output for n in needles)
        deadline = time.monotonic() + 20
        while pids_mentioning(str(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)  # let Ray flush and close its logs
        hits = _files_with(ray_tmp, needles) + _files_with(run, needles)
        assert not hits, hits
    finally:
        kill_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_actors_get_settings_never_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from hetcomp_dist.teachers.actors import forwarded_env

    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", "/data")
    monkeypatch.setenv("HETCOMP_API_TOKEN", "canary-not-on-the-list")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000" and env["HETCOMP_DATASETS_DIR"] == "/data"
    assert not set(env) & {*CANARIES, "HETCOMP_API_TOKEN"}
