"""Repeated fault trials of the nightly refresh (MovieLens-100K by time, configs/refresh_tiny.yaml, the CLI):

- race: two `hetcomp refresh` processes on the same run and the same day, the second started 0-2 s after
  the first: exactly one may run (exit 0 or 1), the other must be refused (exit 3, or 2 when it came after
  the winner and the day is then a repeat); the history grows by one only when one promoted; current valid.
- kill: one refresh SIGKILLed (its whole process group) at a random moment of its run; current must be
  valid (a complete export whose manifest matches the pointer) and either unchanged or the new version;
  a retry of the same day must then run (exit 0 or 1; exit 2, the day refused as a repeat, only when the
  killed one had finished) and leave current valid. The step the kill landed in is read from the killed process's step log.

- at each step: a refresh that kills itself (SIGKILL, job.refresh's hooks) as each step starts, one trial per
  step (data, teachers, student, gate, export, promote): current valid and unchanged, then a retry runs.

Counts per check and a table under --out (faults.md, faults.json).

    .venv/bin/python bench/bench_refresh_faults.py --out bench/out/refresh_faults --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from hetcomp_dist import storage
from hetcomp_dist.benchutil import time_slices
from hetcomp_dist.refresh import promote
from hetcomp_dist.refresh.layout import Layout

REPO = Path(__file__).resolve().parents[1]
STEPS = ("data", "teachers", "student", "gate", "export", "promote")
FAST = ["distill.max_epochs=10", "refresh.student_epochs=5", "refresh.teacher_epochs=2", "refresh.gate.tolerance=0.5"]
# Kills only: a short TTL, as a killed holder on another host would block a retry for the TTL (on this host its
# dead pid already frees the lease). Not for the races: a holder starved past a TTL this short could lose it.
KILL_TTL = ["--set", "refresh.lease_ttl_s=3"]


def cli(run: str, day: str, log: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "hetcomp_dist.cli", "refresh", "--config", str(REPO / "configs" / "refresh_tiny.yaml"),
            "--set", f"run={run}", *[x for s in FAST for x in ("--set", s)], *extra, "--new-data", day]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}       # the step log up to the kill, not lost in a buffer
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def valid_current(layout: Layout) -> dict | None:
    """The pointer, verified (its export complete and its manifest's sha256 the pointer's); None if none yet."""
    return promote.read_current(layout)


def race(run: str, day: str, folder: Path, rng: random.Random, trial: int) -> dict:
    layout = Layout(run)
    before = len(promote.history(layout))
    delay = rng.uniform(0.0, 2.0)
    first = cli(run, day, folder / f"race{trial}-a.log", "--owner", "a")
    time.sleep(delay)
    second = cli(run, day, folder / f"race{trial}-b.log", "--owner", "b")
    codes = sorted([first.wait(timeout=900), second.wait(timeout=900)])
    grew = len(promote.history(layout)) - before
    one_ran = codes[0] in (0, 1) and codes[1] in (2, 3)
    ok_history = grew == (1 if codes[0] == 0 else 0)
    current = valid_current(layout)
    return {"trial": trial, "delay_s": round(delay, 2), "codes": codes, "promotions": grew,
            "exactly_one_ran": one_ran, "history_ok": ok_history, "current_valid": current is not None,
            "ok": one_ran and ok_history and current is not None}


def kill(run: str, day: str, folder: Path, rng: random.Random, trial: int, span: float) -> dict:
    layout = Layout(run)
    before = valid_current(layout)
    log = folder / f"kill{trial}.log"
    proc = cli(run, day, log, *KILL_TTL)
    at = rng.uniform(1.0, span)
    time.sleep(at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = re.findall(r"^\[(\w+)\] [0-9.]+ s$", log.read_text(), re.M)
    after = valid_current(layout)
    new = f"v{len(layout.data_versions()):04d}"
    unchanged_or_new = after is not None and (after["manifest_sha256"] == before["manifest_sha256"]
                                              or after["version"] == new)
    time.sleep(3.5)                                     # a dead holder's lease: expired by its TTL (and its pid)
    retry_log = folder / f"kill{trial}-retry.log"
    rc = cli(run, day, retry_log, *KILL_TTL).wait(timeout=900)
    final = valid_current(layout)
    # Exit 2 is right only when the killed refresh had finished (the day is then a repeat); else it must run.
    retry_ok = rc in (0, 1) or (rc == 2 and "repeat rows" in retry_log.read_text()
                                and storage.is_complete(layout.report(len(layout.data_versions()))))
    ok = unchanged_or_new and retry_ok and final is not None
    return {"trial": trial, "killed_at_s": round(at, 1), "steps_done_before_kill": steps,
            "current_after_kill": after and after["version"], "retry_rc": rc, "current_valid_after_kill": after is not None,
            "unchanged_or_new": unchanged_or_new, "retry_ok": retry_ok, "current_after_retry": final and final["version"],
            "ok": ok}


# A refresh that SIGKILLs itself when step ``at`` is about to run (job.refresh's hooks): every step boundary is
# hit for certain, where random moments rarely fall in the short steps (gate, export, promote).
KILL_AT = """
import os, signal, sys
from hetcomp_dist.refresh import job, loading
run, day, at, *overrides = sys.argv[1:]
def hook(step):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)
cfg, rcfg = loading.load("configs/refresh_tiny.yaml", [f"run={run}", *overrides])
job.refresh(cfg, rcfg, day, log=print, hooks=(hook,))
"""


def kill_at(run: str, day: str, folder: Path, step: str) -> dict:
    layout = Layout(run)
    before = valid_current(layout)
    with open(folder / f"at-{step}.log", "w") as out:
        rc = subprocess.run([sys.executable, "-c", KILL_AT, run, day, step, *FAST], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    after = valid_current(layout)
    unchanged = after is not None and after["manifest_sha256"] == before["manifest_sha256"]
    retry = cli(run, day, folder / f"at-{step}-retry.log").wait(timeout=900)
    final = valid_current(layout)
    ok = rc == -signal.SIGKILL and unchanged and retry in (0, 1) and final is not None
    return {"step": step, "killed": rc == -signal.SIGKILL, "current_unchanged": unchanged, "retry_rc": retry,
            "current_after_retry": final and final["version"], "ok": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "refresh_faults"))
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mirror = Path(os.environ.get("HETCOMP_DATASETS_DIR", REPO.parent / "shared" / "datasets"))
    days = time_slices(mirror / "ml-100k" / "ml-100k.inter", out / "days", 2 * args.trials + len(STEPS), 0.7)
    rng = random.Random(args.seed)
    run = str(out / f"run-{int(time.time())}")
    t0 = time.perf_counter()
    assert cli(run, days[0], logs / "v0001.log").wait(timeout=900) == 0, (logs / "v0001.log").read_text()[-3000:]
    span = time.perf_counter() - t0                      # kills land anywhere in a refresh's run, startup included
    races = [race(run, days[1 + k], logs, rng, k) for k in range(args.trials)]
    kills = [kill(run, days[1 + args.trials + k], logs, rng, k, span) for k in range(args.trials)]
    steps = [kill_at(run, days[1 + 2 * args.trials + k], logs, step) for k, step in enumerate(STEPS)]
    for r in races + kills + steps:
        print(json.dumps(r), flush=True)
    table = render(races, kills, steps, span)
    (out / "faults.md").write_text(table)
    (out / "faults.json").write_text(json.dumps({"races": races, "kills": kills, "at_steps": steps, "span_s": span},
                                                indent=2))
    print(table)
    sys.exit(0 if all(r["ok"] for r in races + kills + steps) else 1)


def render(races: list[dict], kills: list[dict], steps: list[dict], span: float) -> str:
    count = lambda rows, key: f"{sum(bool(r[key]) for r in rows)}/{len(rows)}"  # noqa: E731
    lines = ["| trial | check | passed |", "|---|---|---|",
             f"| two concurrent refreshes | exactly one ran, the other refused | {count(races, 'exactly_one_ran')} |",
             f"| | history grew by one only when one promoted | {count(races, 'history_ok')} |",
             f"| | current valid | {count(races, 'current_valid')} |",
             f"| kill -9 at a random moment (0-{span:.0f} s) | current valid after the kill | "
             f"{count(kills, 'current_valid_after_kill')} |",
             f"| | current unchanged or the new version | {count(kills, 'unchanged_or_new')} |",
             f"| | retry ran (or refused the day as a repeat when the killed one had finished) | "
             f"{count(kills, 'retry_ok')} |",
             f"| | current valid after the retry | {count(kills, 'current_after_retry')} |",
             f"| kill -9 as each step starts ({', '.join(r['step'] for r in steps)}) | current valid and unchanged | "
             f"{count(steps, 'current_unchanged')} |",
             f"| | retry ran and current valid | {sum(r['retry_rc'] in (0, 1) and bool(r['current_after_retry']) for r in steps)}"
             f"/{len(steps)} |",
             "", "| kill | at s | steps done before it | current after kill | retry exit | current after retry |",
             "|---|---|---|---|---|---|"]
    for r in kills:
        lines.append(f"| {r['trial']} | {r['killed_at_s']} | {', '.join(r['steps_done_before_kill']) or '(none)'} | "
                     f"{r['current_after_kill']} | {r['retry_rc']} | {r['current_after_retry']} |")
    lines += ["", "| race | delay s | exit codes | promotions |", "|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['delay_s']} | {r['codes']} | {r['promotions']} |" for r in races]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
