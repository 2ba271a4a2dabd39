"""Subprocess helpers shared by the tests that start real Ray instances and servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGTERMs the child if pytest dies without teardown (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a unique temp dir: only ours)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
    return pids


def kill_mentioning(text: str) -> None:
    for pid in pids_mentioning(text):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without Ray connection/auth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_with_local_ray(cmd: Sequence[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` (which starts its own local Ray instance) with a private RAY_TMPDIR.

    Asserts that the Ray instance is gone within 20 s of the command's exit; whatever is left
    is killed either way, so one test's Ray cannot leak into the next.
    """
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live below it
    try:
        proc = subprocess.run(list(cmd), env=clean_env(RAY_TMPDIR=ray_tmp, **env), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 20
        while pids_mentioning(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_mentioning(ray_tmp), "the local Ray instance outlived the command"
    finally:
        kill_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return proc
