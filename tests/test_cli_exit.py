"""The process entry point (``cli.run``): the exit status is the command's, and Python's own exit work
(non-daemon threads, atexit, buffered output) still happens although the C++ teardown is skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A process that leaves work for the interpreter's exit: a non-daemon thread that prints late, an
# atexit function, and buffered stdout (a pipe, so not line-buffered), then runs ``cli.run(ARGS)`` (with BUG set, a
# ``main`` that raises; with WAIT, one that waits to be interrupted).
SCRIPT = """
import atexit, os, sys, threading, time
from hetcomp_dist import cli
if os.environ.get("BUG"):
    cli.main = lambda argv: 1 / 0
if os.environ.get("WAIT"):                # a shell's background job starts with SIGINT ignored: undo that
    import signal; signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.main = lambda argv: (print("ready", file=sys.stderr, flush=True), time.sleep(60))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
atexit.register(print, "atexit ran")
print("buffered", end=" ")
cli.run(sys.argv[1:])
print("not reached")
"""


def _run(*args: str, bug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"BUG": "1"} if bug else {})}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_bad_input_exits_2_after_exit_work(tmp_path: Path) -> None:
    out = _run("reference", str(tmp_path / "missing"), "--models", "mostpop")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("hetcomp reference: error: ") and len(out.stderr.strip().splitlines()) == 1
    assert out.stdout.split() == ["buffered", "thread", "done", "atexit", "ran"]


def test_help_exits_0_and_usage_error_exits_2() -> None:
    helped = _run("--help")
    assert helped.returncode == 0 and "usage: " in helped.stdout and "atexit ran" in helped.stdout
    wrong = _run("no-such-command")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_a_bug_exits_1_with_its_traceback() -> None:
    out = _run("demo", bug=True)
    assert out.returncode == 1
    assert "ZeroDivisionError" in out.stderr and "Traceback" in out.stderr
    assert out.stdout.split() == ["buffered", "thread", "done", "atexit", "ran"]


def test_ctrl_c_dies_of_sigint_after_exit_work() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WAIT": "1"})
    assert proc.stderr.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert err.strip() == "hetcomp: interrupted"
    assert out.split() == ["buffered", "thread", "done", "atexit", "ran"]
