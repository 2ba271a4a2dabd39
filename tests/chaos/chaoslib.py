"""Helpers of the chaos suite: the real CLI in subprocesses, per-probe tallies, output checks, byte flips."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from hetcomp_dist import storage

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("HETCOMP_CHAOS_SEED", "20261202"))
RESULTS: list["Tally"] = []      # every probe's tally, printed as a table at the end of the session


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m hetcomp_dist.cli ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m hetcomp_dist.cli ARGS`` started (its output to pipes)."""
    return subprocess.Popen([sys.executable, "-m", "hetcomp_dist.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_die_with_parent)


def kill9(proc: subprocess.Popen) -> tuple[int, str, str]:
    """SIGKILL (if still running) and collect; (returncode, stdout, stderr)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def wait_for(predicate: Any, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05) -> bool:
    """Poll ``predicate`` until true (True), the timeout, or ``proc`` exiting (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(every)
    return False


@dataclass
class Tally:
    """One probe on one backend: trials run and the failures among them (with what failed)."""

    probe: str
    backend: str
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        RESULTS.append(self)
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def trial(self, label: str = "") -> Iterator[None]:
        """One trial: an AssertionError (or any error) is recorded as its failure, and the probe goes on."""
        self.trials += 1
        try:
            yield
        except Exception as e:  # noqa: BLE001  (every failure is counted and reported)
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            self.failures.append(f"trial {self.trials} {label}: {detail[:1500]}")
        finally:
            self.seconds = time.perf_counter() - self._t0

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1

    def check(self) -> None:
        assert not self.failures, f"{self.probe} ({self.backend}): {len(self.failures)} of {self.trials} failed:\n" + \
            "\n".join(self.failures)


def table() -> str:
    lines = ["| probe | backend | trials | failures | seconds | outcomes |", "|---|---|---|---|---|---|"]
    for t in RESULTS:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t.notes.items()))
        lines.append(f"| {t.probe} | {t.backend} | {t.trials} | {len(t.failures)} | {t.seconds:.0f} | {outcomes} |")
    return "\n".join(lines)


def rng(name: str) -> random.Random:
    """A random stream per probe, reproducible from HETCOMP_CHAOS_SEED."""
    return random.Random(f"{SEED}:{name}")


# ----------------------------------------------------------------------------- checks
# (self-contained: the suite also runs against versions without hetcomp_dist.lease or storage.verify)

def lease_uri(prefix: str) -> str:
    """Where hetcomp_dist.lease keeps a prefix's lease: beside it."""
    return prefix.rstrip("/") + ".lease"


def verify(uri: str) -> dict[str, Any]:
    """The manifest of the output at ``uri``, after checking every part it lists (size and sha256)."""
    manifest = storage.read_manifest(uri)
    for name, entry in manifest["parts"].items():
        fs, path = storage.filesystem(storage.child(uri, name))
        assert fs.exists(path), f"{uri}: {name} is listed in the manifest but missing"
        data = fs.cat_file(path)
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], \
            f"{uri}: {name} does not match the manifest"
    return manifest


def one_line_error(proc: subprocess.CompletedProcess | tuple[int, str, str], command: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line ``hetcomp <command>: error: ...`` containing ``needles``."""
    rc, err = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else (proc[0], proc[2])
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith(f"hetcomp {command}: error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def names_under(uri: str) -> list[str]:
    """Every object / file under ``uri`` (relative names); [] if nothing."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p[len(path) + 1:] for p in fs.find(path))


_LEFTOVER = re.compile(r"\.[0-9a-f]{12}\.tmp$|\.tmp-[0-9a-f]{32}$")


def assert_committed(uri: str) -> dict[str, Any]:
    """A complete output: every part the manifest lists exists with its sha256; nothing else but the manifest
    (no writer's temporaries); no lease left beside it. Returns the manifest."""
    manifest = verify(uri)
    listed = {*manifest["parts"], storage.MANIFEST}
    names = [n for n in names_under(uri) if not n.startswith("checkpoints/")]
    stray = [n for n in names if n not in listed]
    assert not stray, f"{uri}: not in the manifest: {stray}"
    assert not storage.exists(lease_uri(uri)), f"{uri}: its lease was left behind"
    return manifest


def leftovers(uri: str) -> list[str]:
    return [n for n in names_under(uri) if _LEFTOVER.search(n)]


def flip_byte(uri: str, rand: random.Random, lo: float = 0.0, hi: float = 1.0) -> int:
    """XOR one byte (at a random offset in [lo, hi) of the object) with 0xFF; returns the offset."""
    fs, path = storage.filesystem(uri)
    data = bytearray(fs.cat_file(path))
    offset = min(len(data) - 1, int(len(data) * lo) + rand.randrange(max(1, int(len(data) * (hi - lo)))))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    return offset


# ----------------------------------------------------------------------------- configs

def tiny_config(path: Path, run: str, **changes: Any) -> Path:
    """configs/tiny.yaml with its first teacher only (bpr_mf), ``run`` and nested ``changes`` (dotted keys)."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["teachers"] = data["teachers"][:1]
    data["run"] = run
    data["distill"] = {"method": "final_ensemble", "dim": 8, "lr": 0.01, "max_epochs": 6, "eval_every": 1,
                       "patience": 10, "threads": 1, "select_metric": "recall@20", "target_size": 20,
                       "observed_size": 5, "sampled_negatives": 50}
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def copy_tree(src: str, dst: str) -> None:
    """Copy an output folder (local -> local or local -> s3)."""
    fs, dst_path = storage.filesystem(dst)
    if storage._is_local(fs):
        import shutil

        shutil.copytree(src, dst_path)
    else:
        for name in names_under(src):
            fs.pipe_file(f"{dst_path}/{name}", Path(src, name).read_bytes())
