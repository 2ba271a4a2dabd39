"""Chaos probes on a tiny run (MovieLens-100K, configs/tiny.yaml's bpr_mf teacher, the final-ensemble student):
kill -9 a teacher while it checkpoints, kill -9 a distillation (and damage its newest checkpoint), flip bytes
in datasets, trajectories and manifests.

A killed teacher or student resumes from its newest complete, intact checkpoint and finishes with a manifest
that verifies (the student's metrics.json is the one the command printed); a flipped byte anywhere a reader
trusts makes it refuse with one StorageError line, never use it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from chaoslib import (Tally, assert_committed, cli, copy_tree, flip_byte, kill9, lease_uri, leftovers, one_line_error,
                      rng, start, tiny_config, verify, wait_for)
from hetcomp_dist import storage
from hetcomp_dist.teachers.trajectory import TrajectoryReader

pytestmark = pytest.mark.integration

TEACHER_KILLS = 3
DISTILL_KILLS = {"local": 2, "s3": 1}


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _complete_epochs(root: str) -> list[int]:
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(int(n[6:]) for n in names if n.startswith("epoch-")
                  and storage.is_complete(storage.join(root, n)))


def test_teacher_killed_while_checkpointing(tmp_path: Path, tiny_run: Path) -> None:
    tally = Tally("kill -9 a teacher (train-teachers --sequential), rerun", "local")
    r = rng("kill-teacher")
    for i in range(TEACHER_KILLS):
        run = tmp_path / f"run{i}"
        run.mkdir()
        shutil.copytree(tiny_run / "dataset", run / "dataset")
        config = tiny_config(tmp_path / f"run{i}.yaml", str(run),
                             **{"teachers.0.eval_every": 1, "teachers.0.max_epochs": 20})
        checkpoints = str(run / "teachers" / "bpr_mf" / "checkpoints")
        delay = r.uniform(0.0, 3.0)
        with tally.trial(f"killed {delay:.2f} s after the first checkpoint"):
            proc = start("train-teachers", "--config", str(config), "--sequential", "--log-format", "json")
            assert wait_for(lambda: _complete_epochs(checkpoints), 300, proc), proc.communicate()[1][-2000:]
            time.sleep(delay)
            rc, _, _ = kill9(proc)
            complete = _complete_epochs(checkpoints)
            finished = storage.is_complete(str(run / "teachers" / "bpr_mf" / "trajectory"))
            again = cli("train-teachers", "--config", str(config), "--sequential", "--log-format", "json")
            assert again.returncode == 0, again.stderr[-3000:]
            kinds = [e.get("event") for e in _events(again.stdout)]
            if rc == 0 or finished:
                tally.note("finished before the kill")
                assert "skipped" in kinds
            else:
                resumed = [e for e in _events(again.stdout) if e.get("event") == "resumed"]
                assert resumed and resumed[0]["epoch"] in complete, (kinds, complete)
                tally.note("resumed")
            uri = str(run / "teachers" / "bpr_mf" / "trajectory")
            manifest = verify(uri)
            dataset = storage.read_manifest(str(run / "dataset")).get("dataset")   # lineage: the dataset's identity
            assert dataset is not None and manifest.get("dataset") == dataset
            epochs = [h["epoch"] for h in manifest["history"]]
            assert epochs == sorted(set(epochs)) == list(range(1, epochs[-1] + 1)), epochs   # no duplicate snapshots
            reader = TrajectoryReader([uri])
            assert reader.trajectories(0, reader.n_users).shape[0] == reader.n_users
            assert leftovers(uri) == []
    tally.check()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_distillation_killed_then_resumed(backend: str, tmp_path: Path, tiny_run: Path,
                                          request: pytest.FixtureRequest) -> None:
    tally = Tally("kill -9 `hetcomp distill`, (damage its newest checkpoint), rerun", backend)
    r = rng(f"kill-distill-{backend}")
    for i in range(DISTILL_KILLS[backend]):
        if backend == "s3":
            request.getfixturevalue("s3_server")
            run = f"s3://hetcomp-test/chaos-{r.getrandbits(32):08x}/run"
            copy_tree(str(tiny_run), run)
        else:
            run = str(tmp_path / f"run{i}")
            shutil.copytree(tiny_run, run)
        config = tiny_config(tmp_path / f"run{i}.yaml", run)
        out = storage.join(run, "distill", "final_ensemble")
        checkpoints = storage.join(out, "checkpoints")
        damage = i % 2 == 1                             # the second trial: after two checkpoints, damage the newest
        delay = r.uniform(5.0, 9.0) if damage else r.uniform(0.0, 6.0)
        with tally.trial(f"killed {delay:.2f} s after the first checkpoint" + (", newest damaged" if damage else "")):
            proc = start("distill", "--config", str(config), "--log-format", "json")
            assert wait_for(lambda: _complete_epochs(checkpoints), 300, proc, every=0.2), proc.communicate()[1][-2000:]
            time.sleep(delay)
            rc, _, _ = kill9(proc)
            complete = _complete_epochs(checkpoints)
            if rc == 0 or storage.is_complete(out):
                tally.note("finished before the kill")
                continue
            expected = complete[-1] if complete else None
            if damage and complete:
                newest = storage.join(checkpoints, f"epoch-{complete[-1]:06d}")
                part = sorted(n for n in storage.read_manifest(newest)["parts"] if n.endswith(".pt"))[0]
                flip_byte(storage.join(newest, part), r, 0.3, 0.9)
                expected = complete[-2] if len(complete) > 1 else None
            again = cli("distill", "--config", str(config), "--log-format", "json")
            assert again.returncode == 0, again.stderr[-3000:]
            summary = [e for e in _events(again.stdout) if e.get("event") == "summary"]
            manifest = assert_committed(out)                    # metrics.json among the verified parts
            metrics = storage.read_json(out, "metrics.json", manifest)
            assert summary and summary[0]["test"] == metrics["test"]
            assert metrics["resumed_from"] == ([expected] if expected else []), (metrics["resumed_from"], complete)
            tally.note("resumed" if expected else "started afresh (no intact checkpoint)")
            dataset = storage.read_manifest(storage.join(run, "dataset")).get("dataset")
            assert dataset is not None and manifest.get("dataset") == dataset
            assert not storage.exists(checkpoints) and not storage.exists(lease_uri(out))
    tally.check()


# What a dataset loader reads (the id maps are not read by it).
DATASET_TARGETS = ["train.parquet", "valid.parquet", "test.parquet", "meta.json", "MANIFEST.json"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_flipped_bytes_are_refused(backend: str, tmp_path: Path, tiny_run: Path,
                                   request: pytest.FixtureRequest) -> None:
    tally = Tally("flip a byte (dataset, trajectory, manifests), read", backend)
    r = rng(f"flip-{backend}")
    targets = DATASET_TARGETS if backend == "local" else ["train.parquet", "meta.json", "MANIFEST.json"]
    for name in targets:
        with tally.trial(f"dataset {name}"):
            if backend == "s3":
                request.getfixturevalue("s3_server")
                ds = f"s3://hetcomp-test/flip-{r.getrandbits(32):08x}/dataset"
                copy_tree(str(tiny_run / "dataset"), ds)
            else:
                ds = str(tmp_path / f"ds-{name}")
                shutil.copytree(tiny_run / "dataset", ds)
            flip_byte(storage.join(ds, name), r)
            one_line_error(cli("reference", ds, "--models", "mostpop", "--ks", "20"), "reference")
    if backend == "local":
        teacher = tiny_run / "teachers" / "bpr_mf" / "trajectory"
        manifest = storage.read_manifest(str(teacher))
        snapshot = r.choice([point["part"] for point in manifest["trajectory"]])
        for name, command in [(snapshot, "distill"), (manifest["observed"]["part"], "ensemble"),
                              ("MANIFEST.json", "distill")]:
            with tally.trial(f"trajectory {name}, read by {command}"):
                run = tmp_path / f"run-{name.replace('/', '-')}"
                shutil.copytree(tiny_run, run)
                flip_byte(str(run / "teachers" / "bpr_mf" / "trajectory" / name), r)
                config = tiny_config(tmp_path / "flip.yaml", str(run))
                one_line_error(cli(command, "--config", str(config), *(["--quiet"] if command == "ensemble" else [])),
                               command)
                assert not (run / "distill").exists() and not (run / "ensemble").exists()
    tally.check()
