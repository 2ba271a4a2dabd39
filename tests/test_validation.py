"""Settings and names are refused when the config is loaded, before any work; part names never leave their output.

Every range is checked by the config layer (each config dataclass's ``validate``, called by
``config.from_dict``) and reported as one line naming the file and the key path. Names that
become path components are checked at load time, and part names read back from manifests and
progress records go through ``storage.child`` before anything is read or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from hetcomp_dist import config, storage
from hetcomp_dist.cli import main
from hetcomp_dist.config import ConfigError
from hetcomp_dist.run import RunConfig, RunLayout
from hetcomp_dist.storage import StorageError
from hetcomp_dist.teachers.trajectory import TrajectoryWriter

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _teacher(**changes: object) -> str:
    """``teachers=[...]``: tiny's bpr_mf teacher with ``changes``, as a --set override."""
    (teacher,) = [t for t in yaml.safe_load(TINY.read_text())["teachers"] if t["name"] == "bpr_mf"]
    return "teachers=" + json.dumps([{**teacher, **changes}])


@pytest.mark.parametrize("override, message", [
    ("distill.max_epochs=-5", "distill.max_epochs: must be >= 1, got -5"),
    ("distill.batch_size=-1", "distill.batch_size: must be >= 1, got -1"),
    ("distill.eval_every=0", "distill.eval_every: must be >= 1, got 0"),
    ("distill.threads=0", "distill.threads: must be >= 1, got 0"),
    ("distill.select_metric=foo@3", "distill.select_metric: must be recall@K or ndcg@K with K >= 1, got 'foo@3'"),
    ("distill.select_metric=recall@3", "distill.select_metric: must be recall@K or ndcg@K with K in ks [20, 50], "
                                       "got 'recall@3'"),
    ("ks=[0, -5]", "ks[0]: must be >= 1, got 0"),
    ("ks=[]", "ks: must list at least one cutoff"),
    ("distill.lr=0", "distill.lr: must be > 0, got 0.0"),
    ("distill.lr=-0.001", "distill.lr: must be > 0, got -0.001"),
    ("distill.patience=0", "distill.patience: must be >= 1, got 0"),
    ("distill.temperature=0", "distill.temperature: must be > 0, got 0.0"),
    ("distill.target_size=0", "distill.target_size: must be >= 1, got 0"),
    ("distill.dim=0", "distill.dim: must be >= 1, got 0"),
    ("distill.workers=0", "distill.workers: must be >= 1, got 0"),
    ("distill.cpus_per_worker=-1", "distill.cpus_per_worker: must be >= 0, got -1.0"),
    ("distill.gpus_per_worker=-0.5", "distill.gpus_per_worker: must be >= 0, got -0.5"),
    ("distill.init_std=0", "distill.init_std: must be > 0, got 0.0"),
    ("distill.max_train_seconds=.nan", "distill.max_train_seconds: must be a finite number, got nan"),
    ("distill.out=../elsewhere", "distill.out: '../elsewhere' is not a valid location"),
    ("distill.teachers=[bpr_mf, bpr_mf]", "distill.teachers: must be unique, 'bpr_mf' repeated"),
    ("distill.teachers=[../x]", "distill.teachers[0]: '../x' is not a valid name"),
    ("trajectory.fractions=[0, 0.5]", "trajectory.fractions[0]: must be > 0, got 0.0"),
    ("trajectory.fractions=[0.5, 1.5]", "trajectory.fractions[1]: must be <= 1, got 1.5"),
    ("trajectory.fractions=[0.7, 0.5]", "trajectory.fractions[1]: must be > the fraction before it (0.7), got 0.5"),
    ("trajectory.k=0", "trajectory.k: must be >= 1, got 0"),
    ("eval_batch_size=0", "eval_batch_size: must be >= 1, got 0"),
    ("ray.num_cpus=0", "ray.num_cpus: must be >= 1, got 0"),
    ("data.protocol=random", "data.protocol: 'random' is not one of"),
    ("run=ftp://host/run", "run: unsupported URI scheme in 'ftp://host/run'"),
    ("run=''", "run: '' is not a valid location"),
    (_teacher(max_epochs=-3), "teachers[0].max_epochs: must be >= 1, got -3"),
    (_teacher(lr=0), "teachers[0].lr: must be > 0, got 0.0"),
    (_teacher(patience=0), "teachers[0].patience: must be >= 1, got 0"),
    (_teacher(threads=0), "teachers[0].threads: must be >= 1, got 0"),
    (_teacher(cpus=-1), "teachers[0].cpus: must be >= 0, got -1.0"),
    (_teacher(gpus=-1), "teachers[0].gpus: must be >= 0, got -1.0"),
    (_teacher(name="../../outside"), "teachers[0].name: '../../outside' is not a valid name"),
    (_teacher(name="a/b"), "teachers[0].name: 'a/b' is not a valid name"),
    (_teacher(name=""), "teachers[0].name: '' is not a valid name"),
    (_teacher(model="bpr"), "teachers[0].model: unknown model 'bpr' (registered: "),
    (_teacher(params={"dims": 8}), "teachers[0].params: not accepted by bpr_mf: "),
    (_teacher(select_metric="recall@10"), "teachers[0].select_metric: must be recall@K or ndcg@K with K in ks [20, 50]"),
])
def test_a_bad_setting_is_one_line_naming_the_file_and_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(RunConfig, TINY, [override])
    text = str(caught.value)
    assert text.startswith(f"{TINY}: {message}") and "\n" not in text, text


def test_duplicate_teacher_names_are_refused() -> None:
    data = yaml.safe_load(TINY.read_text())
    data["teachers"].append(dict(data["teachers"][0]))
    with pytest.raises(ConfigError, match=r"^stored: teachers: must be unique, 'bpr_mf' repeated$"):
        config.from_dict(RunConfig, data, "stored")


@pytest.mark.parametrize("command", ["train-teachers", "distill", "ensemble"])
def test_commands_refuse_bad_settings_before_any_work(command: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main([command, "--config", str(TINY), "--set", f"run={run}", "--set", "distill.max_epochs=-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hetcomp {command}: error: {TINY}: distill.max_epochs: must be >= 1, got -5"
    assert not run.exists()  # no dataset prepared, nothing trained


@pytest.mark.parametrize("args, message", [
    (["--set", "ks=[1, 2"], "--set 'ks=[1, 2': invalid YAML value (line 1, column 6: expected ',' or ']'"),
    (["--set", "distill..lr=1"], "--set 'distill..lr=1': empty key in 'distill..lr'"),
    (["--set", "ks.x=1"], "--set 'ks.x=1': ks is not a mapping"),
])
def test_malformed_overrides_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train-teachers", "--config", str(TINY), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hetcomp train-teachers: error: {message}") and "\n" not in err, err


def test_config_that_is_a_folder_or_not_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train-teachers", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"hetcomp train-teachers: error: {tmp_path}: is a directory, not a config file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: x\ndata: [unclosed\n")
    assert main(["train-teachers", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hetcomp train-teachers: error: {bad}: invalid YAML at line ") and "\n" not in err
    listed = tmp_path / "list.yaml"
    listed.write_text("- run: x\n")
    assert main(["train-teachers", "--config", str(listed)]) == 2
    assert "expected a mapping of settings, got list" in capsys.readouterr().err


def test_valid_configs_still_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = config.load(RunConfig, path)
        assert cfg.teachers, path


# ----------------------------------------------------------------------------- names and paths

@pytest.mark.parametrize("name", ["../victim", "a/../../victim", "/etc/passwd", "", "a//b", "a/./b", "a\\b",
                                  "snap\nshot", None, 3])
def test_child_refuses_names_that_leave_the_prefix(tmp_path: Path, name: object) -> None:
    with pytest.raises(StorageError, match="is not a relative path inside it"):
        storage.child(str(tmp_path), name)  # type: ignore[arg-type]


def test_child_refuses_a_symbolic_link_out(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "snapshots").symlink_to(outside)
    with pytest.raises(StorageError, match="resolves outside"):
        storage.child(str(out), "snapshots/x.parquet")
    assert storage.child(str(out), "observed/x.parquet") == f"{out}/observed/x.parquet"


def test_layout_refuses_a_teacher_that_leaves_the_run() -> None:
    with pytest.raises(ConfigError, match="teacher name: '../../outside' is not a valid name"):
        RunLayout("/tmp/run").trajectory("../../outside")


def _snapshot(writer: TrajectoryWriter, epoch: int) -> None:
    items = np.tile(np.arange(4, dtype=np.int32), (3, 1))
    writer.write_snapshot(epoch, {"recall@20": 0.1 * epoch}, [(np.arange(3), items)])


def test_tampered_progress_record_deletes_nothing_outside(tmp_path: Path) -> None:
    """A progress.json part named ../../victim: resume refuses it and deletes nothing, not even the manifest."""
    uri = tmp_path / "run" / "teachers" / "t" / "trajectory"
    writer = TrajectoryWriter(str(uri), model="m", n_users=3, k=4, n_items=10)
    _snapshot(writer, 1)
    _snapshot(writer, 2)
    victim = Path(os.path.normpath(uri / "../../victim"))
    victim.write_text("precious")
    progress_path = uri / "progress.json"
    progress = json.loads(progress_path.read_text())
    kept = progress["evaluations"][1]["part"]
    progress["evaluations"][1]["part"] = "../../victim"   # epoch 2: dropped by a resume from epoch 1
    progress_path.write_text(json.dumps(progress))
    (uri / "MANIFEST.json").write_text("{}")
    with pytest.raises(StorageError, match=r"progress\.json: epoch 2: .*'\.\./\.\./victim' is not a relative path"):
        TrajectoryWriter.resume(str(uri), checkpoint_epoch=1)
    assert victim.read_text() == "precious"
    assert (uri / kept).exists() and (uri / "MANIFEST.json").exists()
    assert json.loads(progress_path.read_text()) == progress   # not rewritten


def test_manifest_part_outside_the_output_is_not_read(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    secret = b"not yours"
    (tmp_path / "secret.txt").write_bytes(secret)
    entry = {"bytes": len(secret), "sha256": hashlib.sha256(secret).hexdigest()}
    storage.commit_manifest(str(out), "x", {"../secret.txt": entry})
    with pytest.raises(StorageError, match="is not a relative path inside it"):
        storage.read_bytes(str(out), "../secret.txt")
    with pytest.raises(StorageError, match="is not a relative path inside it"):
        with storage.parquet_file(str(out), "../secret.txt"):
            pass
