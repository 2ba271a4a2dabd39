"""The container image: hadolint on the Dockerfile, then a real `docker build` and the tiny pipeline
run inside the image.

The build needs a Docker daemon with BuildKit and the local base image; on a Debian host
`bash scripts/ci/docker.sh install start base` provides both (.ci/run calls it). It reads the same
package sources as the host's pip (index settings, CA bundle), so it works where only the package
registries are reachable.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("HETCOMP_BASE_IMAGE", "hetcomp-base:bookworm")
TAG = "hetcomp:test"
HADOLINT = REPO / ".tools" / "hadolint" / "bin" / "hadolint"
# The tiny config's teachers plus a short student, as in test_pipeline.
DISTILL = ("distill={dim: 8, lr: 0.01, batch_unit: users, batch_size: 256, eval_every: 2, max_epochs: 6, "
           "threads: 1, select_metric: recall@20}")


def _missing(message: str) -> None:
    if os.environ.get("CI"):  # CI installs the tools first: a skip there would hide a break
        pytest.fail(message)
    pytest.skip(message)


def test_dockerfile_is_hadolint_clean():
    if not HADOLINT.exists():
        _missing(f"{HADOLINT.relative_to(REPO)} not installed (bash scripts/ci/docker.sh install)")
    lint = subprocess.run([str(HADOLINT), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _docker_cli() -> str | None:
    # docker.io's own CLI (20.10) has BuildKit built in; a newer CLI on PATH may need the buildx plugin.
    if os.environ.get("HETCOMP_DOCKER"):
        return os.environ["HETCOMP_DOCKER"]
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker")


def _docker(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([_docker_cli(), *args], capture_output=True, text=True, timeout=timeout, **kw)


def _host_pip(key: str) -> str:
    """A pip setting as the host's pip sees it: the PIP_* variable, else the config files."""
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env is not None:
        return env
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():  # one line per key with its effective value: global.key='value'
        name, _, value = line.partition("=")
        if name == f"global.{key}":
            return value.strip().strip("'\"")
    return ""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def pip_sources() -> Iterator[dict[str, str]]:
    """The host's index-url / extra-index-url / find-links as build args. Local paths (file://) are
    served read-only over http on 127.0.0.1 for the build's duration: docker.io's builder has no extra
    build contexts to bind them from, and copying gigabytes of wheels into the context would be slow."""
    servers: dict[Path, ThreadingHTTPServer] = {}

    def reachable(location: str) -> str:
        if not (location.startswith("file://") or location.startswith("/")):
            return location
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)).resolve()
        # The parent, so that an index's relative links (simple/x/ -> ../../files/) stay inside.
        root = path.parent
        if root not in servers:
            handler = functools.partial(_Quiet, directory=str(root))
            try:  # the same port each run keeps the build args, and so Docker's layer cache, valid
                server = ThreadingHTTPServer(("127.0.0.1", 38100 + len(servers)), handler)
            except OSError:
                server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers[root] = server
        return f"http://127.0.0.1:{servers[root].server_address[1]}/{urllib.parse.quote(path.name)}/"

    args = {}
    for key, arg in [("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
                     ("find-links", "PIP_FIND_LINKS")]:
        value = " ".join(reachable(item) for item in _host_pip(key).split())
        if value:
            args[arg] = value
    try:
        yield args
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def image(pip_sources: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    if _docker_cli() is None or _docker("info", timeout=60).returncode != 0:
        pytest.skip("no Docker daemon (bash scripts/ci/docker.sh install start runs one as root on Debian)")
    if _docker("image", "inspect", BASE_IMAGE).returncode != 0:
        base = subprocess.run(["bash", "scripts/ci/docker.sh", "base"], cwd=REPO, capture_output=True, text=True,
                              timeout=1800)
        assert base.returncode == 0, base.stdout + base.stderr
    args = ["build", "--network", "host", "--progress", "plain", "-t", TAG,
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "TARGET=cpu",
            # The host's own sources already hold torch 2.13.0+cpu (it is how .venv got it).
            "--build-arg", "TORCH_CPU_INDEX="]
    for name, value in pip_sources.items():
        args += ["--build-arg", f"{name}={value}"]
    cert = _host_pip("cert")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]  # a BuildKit secret: never written to a layer
    previous = _docker("image", "inspect", "--format", "{{.Id}}", TAG).stdout.strip()
    log = tmp_path_factory.mktemp("image") / "build.log"
    with open(log, "w") as out:
        build = subprocess.run([_docker_cli(), *args, str(REPO)], stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=3600)
    assert build.returncode == 0, log.read_text()[-4000:]
    if previous and previous != _docker("image", "inspect", "--format", "{{.Id}}", TAG).stdout.strip():
        _docker("rmi", previous)  # the image this test built last time, now untagged (2 GB)
    return TAG


def _lock_version(name: str) -> str:
    for line in (REPO / "requirements" / "cpu.lock").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} not in cpu.lock")


@pytest.mark.integration
def test_image_runs_as_non_root_with_the_locked_stack(image: str):
    help_ = _docker("run", "--rm", image)  # the default command
    assert help_.returncode == 0 and "usage: hetcomp" in help_.stdout, help_.stderr
    probe = ("import importlib.metadata as m, json, os, shutil, torch, hetcomp_dist; "
             "d = m.distribution('hetcomp_dist'); "
             "print(json.dumps({'uid': os.getuid(), 'hetcomp': shutil.which('hetcomp'), 'torch': torch.__version__, "
             "'torchrec': m.version('torchrec'), 'fbgemm': m.version('fbgemm_gpu-cpu'), "
             "'package': hetcomp_dist.__file__, 'direct_url': json.loads(d.read_text('direct_url.json') or '{}')}))")
    facts = _docker("run", "--rm", image, "python", "-c", probe)
    assert facts.returncode == 0, facts.stderr
    facts = json.loads(facts.stdout)
    assert facts["uid"] != 0
    assert facts["hetcomp"] == "/opt/venv/bin/hetcomp"
    assert (facts["torch"], facts["torchrec"], facts["fbgemm"]) == (
        _lock_version("torch"), _lock_version("torchrec"), _lock_version("fbgemm_gpu-cpu"))
    # installed from a wheel into site-packages, not editable (no source tree in the image)
    assert facts["package"].startswith("/opt/venv/lib/python3.11/site-packages/hetcomp_dist/")
    assert "archive_info" in facts["direct_url"], facts["direct_url"]
    assert not facts["direct_url"].get("dir_info", {}).get("editable")
    for job in ("train_teachers", "distill"):          # the entry points the KubeRay manifests run in /app
        ran = _docker("run", "--rm", image, "python", f"jobs/{job}.py", "--help")
        assert ran.returncode == 0 and "--config" in ran.stdout, ran.stderr


@pytest.mark.integration
def test_tiny_pipeline_in_the_image(image: str, datasets_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 10001) writes the run here
    # Ray keeps its object store (30% of memory by default) in /dev/shm, 64 MB in a container unless
    # raised; a tmpfs limit, not a reservation.
    shm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    run = _docker("run", "--rm", "--shm-size", str(shm),
                  "-v", f"{datasets_dir}:/data:ro", "-e", "HETCOMP_DATASETS_DIR=/data", "-v", f"{out}:/out",
                  image, "hetcomp", "demo", "--config", "configs/tiny.yaml", "--set", "run=/out/run", "--set", DISTILL,
                  timeout=2400)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    report = out / "run" / "report"
    assert (report / "report.md").is_file()
    results = json.loads((report / "results.json").read_text())
    for name in ["bpr_mf", "lightgcn", "multvae", "ensemble", "student (bpr)", "student (hetcomp)"]:
        assert 0 < results["test"][name]["recall@50"] <= 1
    assert "run written to /out/run" in run.stdout
