"""Shared fixtures: a real moto S3 server, a storage root per backend, the shared datasets folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from hetcomp_dist import storage
from procs import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[1]
S3_BUCKET = "hetcomp-test"
_S3_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on a free port; retry a few ports in case one is taken meanwhile."""
    last_error = ""
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # Server logs every request: send them to a file, never to a pipe nobody drains.
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        deadline = time.monotonic() + _S3_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _answers(url):
                return proc, url
            time.sleep(0.05)
        _stop(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto server did not start; log tail:\n{last_error}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto S3 server (subprocess) on 127.0.0.1; yields its endpoint URL.

    While it runs, the environment points every S3 client at it (dummy credentials,
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``), so subprocesses started by tests inherit it;
    the bucket :data:`S3_BUCKET` exists. Environment restored and server stopped at session end.
    """
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    proc, url = _start_moto(log_path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
                mp.delenv(name, raising=False)
            missing = str(log_path.parent / "no-such-aws-config")
            mp.setenv("AWS_CONFIG_FILE", missing)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")  # not region_name in client_kwargs: breaks bucket creation
            mp.setenv("AWS_ENDPOINT_URL_S3", url)
            fs, bucket = storage.filesystem(f"s3://{S3_BUCKET}")
            fs.mkdir(bucket)
            yield url
    finally:
        _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """Name of the bucket that exists on :func:`s3_server`."""
    return S3_BUCKET


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root URI: ``tmp_path`` (local) or ``s3://<bucket>/<uuid>`` (moto server).

    Tests using it run once per backend with the same code; the S3 server starts only if needed.
    """
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        return str(root)
    request.getfixturevalue("s3_server")
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared datasets folder: ``$HETCOMP_DATASETS_DIR`` or ``<repo>/../shared/datasets``; skip if absent."""
    env = os.environ.get("HETCOMP_DATASETS_DIR")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "datasets"
    path = path.resolve()
    if not path.is_dir():
        message = f"datasets folder {path} not found (set HETCOMP_DATASETS_DIR)"
        if os.environ.get("CI"):  # CI has shared/ beside the checkout: a skip there would hide a break
            pytest.fail(message)
        pytest.skip(message)
    return path
