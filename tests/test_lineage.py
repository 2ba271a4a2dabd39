"""Lineage: the dataset's identity is recorded by every stage and checked whenever one stage reads another's output.

A small synthetic CSV dataset, one small teacher trained in this process (no Ray), and the
final-ensemble student: the trajectory manifest, the teacher's checkpoints and the student's manifest
carry the dataset's identity; distillation refuses trajectories written for another dataset;
train-teachers retrains a finished teacher of another dataset; a rerun whose data settings changed is
refused with the stored and the asked settings, never silently reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hetcomp_dist import config, lease, lineage, storage
from hetcomp_dist.cli import main
from hetcomp_dist.data import prepare as prep
from hetcomp_dist.lease import LeaseHeld, LeaseLost
from hetcomp_dist.pipeline import distill_run
from hetcomp_dist.run import RunConfig, ensure_dataset
from hetcomp_dist.storage import StorageError
from hetcomp_dist.teachers.actors import train_teachers


def _csv(path: Path, shift: int = 0) -> Path:
    rows = [f"{u},{(u * 7 + i * 3 + shift) % 60}" for u in range(80) for i in range(14)]
    path.write_text("user,item\n" + "\n".join(rows) + "\n")
    return path


def _config(tmp_path: Path, source: Path, run: str | None = None, **data: object) -> Path:
    cfg = {
        "run": run or str(tmp_path / "run"), "data": {"source": str(source), **data}, "ks": [10, 20],
        "trajectory": {"k": 10, "observed_k": 10},
        "teachers": [{"name": "mf", "model": "bpr_mf", "params": {"dim": 4}, "lr": 0.05, "batch_size": 256,
                      "max_epochs": 2, "eval_every": 1, "patience": 5, "threads": 1, "select_metric": "recall@10"}],
        "distill": {"method": "final_ensemble", "dim": 4, "lr": 0.01, "max_epochs": 2, "eval_every": 1, "threads": 1,
                    "select_metric": "recall@10", "target_size": 10, "observed_size": 5, "sampled_negatives": 20},
    }
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _load(path: Path, *overrides: str) -> RunConfig:
    return config.load(RunConfig, path, list(overrides))


def _trained(tmp_path: Path, source: Path, run: str | None = None) -> RunConfig:
    cfg = _load(_config(tmp_path, source, run))
    train_teachers(cfg, sequential=True, report=lambda e: None)
    return cfg


def test_prepare_records_the_identity_in_the_manifest(tmp_path: Path) -> None:
    out = str(tmp_path / "ds")
    meta = prep.prepare(str(_csv(tmp_path / "a.csv")), out, seed=3, progress=False)
    identity = lineage.dataset_identity(out)
    assert identity == lineage.identity_of(meta) == storage.read_manifest(out)["dataset"]
    assert identity["seed"] == 3 and identity["protocol"]["name"] == "hetcomp"
    assert set(identity["source_sha256"]) == {"interactions"} and identity["n_users"] == 80
    # a dataset written before the identity was recorded: derived from its verified meta.json
    manifest = storage.read_manifest(out)
    del manifest["dataset"], manifest["meta"]
    storage.commit_manifest(out, manifest["kind"], manifest["parts"], manifest["config"])
    assert lineage.dataset_identity(out) == identity


def test_every_stage_records_the_dataset(tmp_path: Path) -> None:
    cfg = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    identity = lineage.dataset_identity(cfg.dataset_uri)
    trajectory = storage.read_manifest(cfg.layout.trajectory("mf"))
    assert trajectory["dataset"] == identity
    root = cfg.layout.teacher_checkpoints("mf")
    epochs = sorted(p.name for p in Path(root).iterdir())
    assert epochs and all(storage.read_manifest(f"{root}/{e}")["config"]["dataset"] == identity for e in epochs)
    distill_run(cfg)
    assert storage.read_manifest(cfg.student_uri())["dataset"] == identity
    assert not storage.exists(lease.lease_uri(cfg.student_uri()))


def test_distillation_refuses_trajectories_of_another_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    other = _load(_config(tmp_path, _csv(tmp_path / "b.csv", shift=1), str(tmp_path / "other")))
    ensure_dataset(other)
    shutil.copytree(first.layout.teacher("mf"), other.layout.teacher("mf"))   # a teacher of the first dataset
    with pytest.raises(StorageError) as caught:
        distill_run(other)
    message = str(caught.value)
    assert message.startswith(f"{other.layout.trajectory('mf')}: this trajectory was written for dataset [source ")
    assert str(tmp_path / "a.csv") in message and str(tmp_path / "b.csv") in message and "\n" not in message
    assert not storage.exists(other.student_uri())
    # through the command: exit 2, one line
    assert main(["distill", "--config", _config(tmp_path, tmp_path / "b.csv", str(tmp_path / "other")).as_posix()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetcomp distill: error: ") and err.count("\n") == 1 and "this trajectory was written" in err
    # the ensemble stage refuses them too
    assert main(["ensemble", "--config", str(tmp_path / "run-2.yaml"), "--quiet"]) == 2
    assert "this trajectory was written for dataset" in capsys.readouterr().err


def test_a_finished_teacher_of_another_dataset_is_trained_again(tmp_path: Path) -> None:
    source = _csv(tmp_path / "a.csv")
    cfg = _trained(tmp_path, source)
    events: list[dict] = []
    train_teachers(cfg, sequential=True, report=events.append)
    assert [e["event"] for e in events] == ["skipped"]                 # same dataset: not trained again
    # The same settings, other bytes: the dataset prepared again from a changed file.
    _csv(source, shift=2)
    storage.remove(cfg.dataset_uri)
    events.clear()
    train_teachers(cfg, sequential=True, report=events.append)
    assert "skipped" not in [e["event"] for e in events] and events[-1]["event"] == "done"
    assert storage.read_manifest(cfg.layout.trajectory("mf"))["dataset"] == lineage.dataset_identity(cfg.dataset_uri)


def test_compare_reuses_only_teachers_and_students_of_the_runs_dataset(tmp_path: Path) -> None:
    import argparse

    from hetcomp_dist import compare

    source = _csv(tmp_path / "a.csv")
    path = _config(tmp_path, source)
    cfg = _load(path)
    train_teachers(cfg, sequential=True, report=lambda e: None)
    args = argparse.Namespace(config=str(path), overrides=[], quick=False, redo_stale=False, bpr_overrides=[])
    variant = compare.Variant("ablation", "ablation", "final_ensemble")
    root = str(tmp_path / "run" / "distill")
    log = compare.Log()
    assert compare.teachers_current(cfg)
    assert compare.run_student(args, variant, root, log)[1].startswith("trained into")
    assert compare.run_student(args, variant, root, log)[1].startswith("reused")
    # The same settings, other bytes: the dataset prepared again from a changed file.
    _csv(source, shift=2)
    storage.remove(cfg.dataset_uri)
    ensure_dataset(cfg)
    assert not compare.teachers_current(cfg)                  # their trajectories are of the old dataset
    train_teachers(cfg, sequential=True, report=lambda e: None)
    assert compare.teachers_current(cfg)
    metrics, note = compare.run_student(args, variant, root, log)
    assert note.startswith("trained into")                     # not reused: distilled from the old dataset
    manifest = storage.read_manifest(storage.join(root, "ablation"))
    assert manifest["dataset"] == lineage.dataset_identity(cfg.dataset_uri)


def test_a_checkpoint_of_another_dataset_is_not_resumed(tmp_path: Path) -> None:
    from hetcomp_dist.teachers import train

    source = _csv(tmp_path / "a.csv")
    cfg = _trained(tmp_path, source)
    teacher = cfg.teachers[0]
    out = cfg.layout.teacher("mf")
    identity = lineage.dataset_identity(cfg.dataset_uri)
    assert train.checkpointer(out, teacher, identity).load() is not None
    assert train.checkpointer(out, teacher, {**identity, "seed": 99}).load() is None


@pytest.mark.parametrize("override, differs", [
    ("data.seed=1", "seed differ"),
    ("data.protocol=leave-last-out", "protocol differ"),
    ("data.format=parquet", "format differ"),
])
def test_a_rerun_with_other_data_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     override: str, differs: str) -> None:
    source = _csv(tmp_path / "a.csv")
    path = _config(tmp_path, source)
    ensure_dataset(_load(path))
    before = storage.read_manifest(str(tmp_path / "run" / "dataset"))
    with pytest.raises(StorageError) as caught:
        ensure_dataset(_load(path, override))
    message = str(caught.value)
    assert f"this run's dataset was prepared with source='{source}', protocol='hetcomp', seed=0, format='csv'" \
        in message and f"({differs})" in message and "remove" in message and "\n" not in message
    assert main(["train-teachers", "--config", str(path), "--set", override, "--sequential"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetcomp train-teachers: error: ") and err.count("\n") == 1
    assert storage.read_manifest(str(tmp_path / "run" / "dataset")) == before        # untouched
    # the same settings spelled out (the defaults) are the same dataset
    ensure_dataset(_load(path, "data.protocol=hetcomp", "data.format=csv", "data.seed=0"))


def test_a_changed_source_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path, _csv(tmp_path / "a.csv"))
    ensure_dataset(_load(path))
    with pytest.raises(StorageError, match=r"source='.*b\.csv'.*\(source differ\)"):
        ensure_dataset(_load(path, f"data.source={_csv(tmp_path / 'b.csv')}"))


def test_the_distillation_holds_its_outputs_lease(tmp_path: Path) -> None:
    cfg = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    with lease.hold(cfg.student_uri(), owner="another distillation"):
        with pytest.raises(LeaseHeld, match="owner 'another distillation'"):
            distill_run(cfg)
    assert not storage.is_complete(cfg.student_uri())


def test_a_distillation_that_lost_its_lease_commits_nothing(tmp_path: Path) -> None:
    cfg = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    uri = lease.lease_uri(cfg.student_uri())

    def steal(event: dict) -> None:           # after the first evaluation: another writer takes the lease over
        if event.get("event") == "epoch" and "valid" in event:
            record = json.loads(Path(uri).read_text())
            Path(uri).write_text(json.dumps({**record, "token": "someone-else", "owner": "thief"}))

    with pytest.raises(LeaseLost, match=r"taken over \(owner 'thief'"):
        distill_run(cfg, steal)
    assert not storage.is_complete(cfg.student_uri())
    assert Path(uri).exists()                 # the thief's lease is left to the thief


def test_train_teachers_holds_the_teachers_lease(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, _csv(tmp_path / "a.csv"))
    cfg = _load(path)
    ensure_dataset(cfg)
    with lease.hold(cfg.layout.teachers, owner="another train-teachers"):
        with pytest.raises(LeaseHeld, match="owner 'another train-teachers'"):
            train_teachers(cfg, sequential=True, report=lambda e: None)
        assert main(["train-teachers", "--config", str(path), "--sequential"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetcomp train-teachers: error: ") and err.count("\n") == 1
    assert "another train-teachers" in err
    assert not storage.exists(cfg.layout.teacher("mf"))                  # nothing trained, nothing written
    train_teachers(cfg, sequential=True, report=lambda e: None)          # released: trains
    assert storage.is_complete(cfg.layout.trajectory("mf"))
    assert not Path(lease.lease_uri(cfg.layout.teachers)).exists()       # and releases it


def test_a_teacher_whose_run_lost_the_lease_commits_nothing(tmp_path: Path) -> None:
    cfg = _load(_config(tmp_path, _csv(tmp_path / "a.csv")))
    uri = lease.lease_uri(cfg.layout.teachers)

    def steal(event: dict) -> None:            # at the first evaluation: another writer takes the lease over
        if event.get("event") == "epoch" and "valid" in event and Path(uri).exists():
            record = json.loads(Path(uri).read_text())
            Path(uri).write_text(json.dumps({**record, "token": "someone-else", "owner": "thief"}))

    with pytest.raises(LeaseLost, match=r"taken over \(owner 'thief'"):
        train_teachers(cfg, sequential=True, report=steal)
    assert not storage.is_complete(cfg.layout.trajectory("mf"))


def test_distillation_refuses_a_damaged_trajectory(tmp_path: Path) -> None:
    """Trajectories are read by row group (page checksums only): their sha256 is checked before the distillation."""
    cfg = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    uri = cfg.layout.trajectory("mf")
    part = storage.read_manifest(uri)["trajectory"][0]["part"]
    path = Path(uri, part)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=f"{part}: content does not match the manifest"):
        distill_run(cfg)
    assert not storage.exists(cfg.student_uri())


def test_train_teachers_removes_a_killed_writers_temporaries(tmp_path: Path) -> None:
    """Under its lease, train-teachers removes ``<name>.<token>.tmp`` files a killed writer left (no live
    writer's: the lease is ours); a finished teacher is still skipped, not written again."""
    cfg = _trained(tmp_path, _csv(tmp_path / "a.csv"))
    strays = [Path(cfg.layout.trajectory("mf")) / "lists.parquet.c8bd9749f494.tmp",
              Path(cfg.layout.teachers) / "other" / ("summary.json.tmp-" + "0" * 32)]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    events: list[dict] = []
    train_teachers(cfg, sequential=True, report=events.append)
    assert [e["event"] for e in events] == ["skipped"] and not any(p.exists() for p in strays)
