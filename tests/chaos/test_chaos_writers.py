"""Chaos probes: two `hetcomp prepare` racing on one --out, and `hetcomp prepare` killed with SIGKILL at random
times, on local disk and the moto S3 server.

Every committed manifest must list only existing parts with matching sha256 (and nothing else left in the
output, no writer's temporaries, no lease); the loser of a race exits 2 with one line naming the holder;
a killed rewrite leaves either the old complete dataset or nothing a reader trusts, and a rerun takes the
dead writer's lease over at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chaoslib import (Tally, assert_committed, cli, kill9, lease_uri, leftovers, one_line_error, rng, start, verify,
                      wait_for)
from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError

pytestmark = pytest.mark.integration

RACES = {"local": 20, "s3": 4}
KILLS = {"local": 10, "s3": 3}


def _source(tmp_path: Path) -> Path:
    """~40k interactions: prepare takes long enough (reading, hashing, six parts) for races and kills."""
    path = tmp_path / "interactions.csv"
    rows = [f"{u},{(u * 31 + i * 7) % 3000}" for u in range(4000) for i in range(10)]
    path.write_text("user,item\n" + "\n".join(rows) + "\n")
    return path


def _backend(root: str) -> str:
    return "s3" if root.startswith("s3://") else "local"


def test_two_writers_race_on_one_out(storage_root: str, tmp_path: Path) -> None:
    backend = _backend(storage_root)
    tally = Tally("two `hetcomp prepare` on one --out", backend)
    source, out = _source(tmp_path), storage.join(storage_root, "dataset")
    for i in range(RACES[backend]):
        seeds = (2 * i, 2 * i + 1)
        with tally.trial(f"seeds {seeds}"):
            procs = [start("prepare", str(source), "--out", out, "--quiet", "--seed", str(s)) for s in seeds]
            outputs = [p.communicate(timeout=300) for p in procs]
            done = [(p.returncode, o, e) for p, (o, e) in zip(procs, outputs)]
            winners = [s for s, (rc, _, _) in zip(seeds, done) if rc == 0]
            assert winners, done
            for seed, result in zip(seeds, done):
                if result[0] != 0:
                    one_line_error(result, "prepare", f"{out}: another writer holds it (owner ")
            tally.note("one refused (LeaseHeld)" if len(winners) == 1 else "both, one after the other")
            assert_committed(out)
            assert storage.read_json(out, "meta.json")["seed"] in winners
            assert leftovers(out) == []
    tally.check()


def test_prepare_killed_at_random_times(storage_root: str, tmp_path: Path) -> None:
    backend = _backend(storage_root)
    tally = Tally("kill -9 `hetcomp prepare` (a rewrite), rerun", backend)
    source, out = _source(tmp_path), storage.join(storage_root, "dataset")
    held = lambda: storage.exists(lease_uri(out))  # noqa: E731  (the writer's work has begun)
    t0 = time.perf_counter()
    first = start("prepare", str(source), "--out", out, "--quiet")
    if wait_for(held, 120, first, every=0.01):      # (a version without leases: from the start)
        t0 = time.perf_counter()
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    work = time.perf_counter() - t0                 # from taking the lease to the commit
    rewrite = start("prepare", str(source), "--out", out, "--quiet")
    assert wait_for(lambda: not storage.is_complete(out), 120, rewrite, every=0.005)
    t0 = time.perf_counter()
    assert wait_for(lambda: storage.is_complete(out), 120, rewrite, every=0.005)
    writing_s = time.perf_counter() - t0            # from removing the old manifest to committing the new one
    assert rewrite.wait(timeout=300) == 0, rewrite.communicate()[1]
    r = rng(f"kill-prepare-{backend}")
    for i in range(KILLS[backend]):
        seed = i + 1
        # Even trials: a random time of its work (from taking the lease); odd ones: of its writing (from the
        # old manifest's removal), a shorter window a wall-clock kill seldom hits.
        writing = i % 2 == 1
        delay = r.uniform(0.0, writing_s) if writing else r.uniform(0.0, work * 1.1)
        with tally.trial(f"seed {seed}, killed {delay:.2f} s into its {'writing' if writing else 'work'}"):
            old_seed = storage.read_json(out, "meta.json")["seed"]
            proc = start("prepare", str(source), "--out", out, "--quiet", "--seed", str(seed))
            wait_for((lambda: not storage.is_complete(out)) if writing else held, 120, proc, every=0.01)
            time.sleep(delay)
            rc, _, err = kill9(proc)
            if rc == 0:
                tally.note("finished before the kill")
            if storage.is_complete(out):
                verify(out)                  # a complete manifest: its parts, all of them, verified
                stored = storage.read_json(out, "meta.json")["seed"]
                assert stored in (old_seed, seed)
                tally.note("the new dataset complete" if stored == seed else "the old one intact")
            else:
                with pytest.raises(StorageError, match="no MANIFEST.json"):
                    storage.read_json(out, "meta.json")
                tally.note("nothing to trust after the kill")
                if storage.exists(storage.join(out, "meta.json")):
                    tally.note("an old meta.json survived (killed between the manifest and the old parts)")
            again = cli("prepare", str(source), "--out", out, "--quiet", "--seed", str(seed))
            assert again.returncode == 0, again.stderr[-2000:]
            assert_committed(out)
            assert storage.read_json(out, "meta.json")["seed"] == seed
            assert leftovers(out) == []
    tally.check()
