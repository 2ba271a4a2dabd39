"""Strict typed config loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from hetcomp_dist import config
from hetcomp_dist.config import ConfigError, load


@dataclass
class Opt:
    lr: float = 1e-3
    kind: Literal["adam", "sgd"] = "adam"


@dataclass
class Run:
    name: str
    epochs: int = 10
    ks: list[int] = field(default_factory=lambda: [10, 20])
    opt: Opt = field(default_factory=Opt)
    out: str | None = None


def test_load_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\nepochs: 3\nopt:\n  lr: 1\n")
    run = load(Run, path, ["opt.kind=sgd", "ks=[5, 50]", "out=s3://b/p"])
    assert run == Run(name="demo", epochs=3, ks=[5, 50], opt=Opt(lr=1.0, kind="sgd"), out="s3://b/p")


def test_unknown_key_names_file_and_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\nopt:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: opt: unknown key\(s\) momentum for Opt"):
        load(Run, path)


@pytest.mark.parametrize("override, message", [
    ("epochs=ten", r"config: epochs: expected int, got 'ten'"),
    ("epochs=true", r"config: epochs: expected int, got True"),
    ("opt.kind=rmsprop", r"config: opt\.kind: 'rmsprop' is not one of"),
    ("ks=[1, x]", r"config: ks\[1\]: expected int"),
    ("epochs", r"expected key\.path=value"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load(Run, None, ["name=x", override])


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key\\(s\\) name"):
        load(Run, None, [])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load(Run, tmp_path / "nope.yaml")


def test_extends_merges_mappings_replaces_values_and_appends_plus_lists(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nepochs: 3\nks: [1, 2]\nopt:\n  lr: 0.5\n  kind: sgd\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text("extends: ../base.yaml\nepochs: 7\nks+: [3]\nopt:\n  lr: 2\n")
    run = load(Run, tmp_path / "sub" / "variant.yaml", ["opt.kind=adam"])
    assert run == Run(name="base", epochs=7, ks=[1, 2, 3], opt=Opt(lr=2.0, kind="adam"))
    assert load(Run, tmp_path / "base.yaml").ks == [1, 2]          # the base itself is untouched


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nopt:\n  lr: 0.5\n")
    cases = {
        "extends: base.yaml\nopt:\n  speed: 1\n": r"v\.yaml extending .*base\.yaml: opt: unknown key\(s\) speed",
        "extends: gone.yaml\n": r"v\.yaml: extends: .*gone\.yaml is not a config file",
        "extends: v.yaml\n": r"v\.yaml: extends itself through",
        "extends: base.yaml\nname+: [x]\n": r"v\.yaml: name\+: appends a list to a list",
        "extends: [base.yaml]\n": r"v\.yaml: extends: expected a config file name",
    }
    for text, message in cases.items():
        (tmp_path / "v.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load(Run, tmp_path / "v.yaml")


def test_weak_teacher_configs_are_their_bases_plus_one_teacher():
    from pathlib import Path

    from hetcomp_dist.run import RunConfig
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("citeulike", "gowalla"):
        base, weak = load(RunConfig, configs / f"{name}.yaml"), load(RunConfig, configs / f"{name}_weak_teacher.yaml")
        assert weak.teachers[:-1] == base.teachers and weak.teachers[-1].name == "MF-weak"
        assert (weak.distill, weak.data, weak.run) == (base.distill, base.data, base.run)


def test_compatible_is_one_rule_built_on_from_dict():
    from hetcomp_dist.distill.config import DistillConfig

    now = DistillConfig(lr=0.01, threads=2)
    assert config.compatible(DistillConfig, {"lr": 0.01, "threads": 1}, now, ignore=("threads",))
    assert config.differences(DistillConfig, {"lr": 0.01, "threads": 1}, now) == ["threads"]
    # a field added since the config was stored takes its default; a field set away from it differs
    assert config.compatible(DistillConfig, {"lr": 0.01}, now, ignore=("threads",))
    assert config.differences(DistillConfig, {"lr": 0.01}, DistillConfig(lr=0.01, ipw=0.5)) == ["ipw"]
    # unreadable stored configs (unknown key, wrong type, not a mapping) are never compatible
    for stored in ({"lr": 0.01, "gone": 1}, {"lr": "fast"}, None, []):
        assert config.differences(DistillConfig, stored, now) is None
        assert not config.compatible(DistillConfig, stored, now)


def test_relative_outputs_are_refused_under_a_ray_job(tmp_path, monkeypatch):
    from hetcomp_dist.config import ConfigError
    from hetcomp_dist.run import load_run

    path = tmp_path / "c.yaml"
    path.write_text("run: runs/x\ndata: {source: ml-100k}\n")
    assert load_run(str(path)).run == "runs/x"                       # on a laptop: relative to the cwd
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")          # what `ray job submit` sets for the driver
    with pytest.raises(ConfigError, match="run: 'runs/x' is a relative path; under a Ray job"):
        load_run(str(path))
    assert load_run(str(path), [f"run={tmp_path}/abs"]).run == f"{tmp_path}/abs"
    assert load_run(str(path), ["run=s3://bucket/x"]).run == "s3://bucket/x"
    with pytest.raises(ConfigError, match="distill.out"):
        load_run(str(path), ["run=s3://bucket/x", "distill.out=out/here"])


def test_stored_configs_are_read_under_renamed_keys():
    from hetcomp_dist.teachers.config import TeacherConfig

    now = TeacherConfig(name="MF", model="bpr_mf", max_train_seconds=100.0)
    assert config.compatible(TeacherConfig, {"name": "MF", "model": "bpr_mf", "max_seconds": 100.0}, now)
    assert config.differences(TeacherConfig, {"name": "MF", "model": "bpr_mf", "max_seconds": 5.0}, now) == \
        ["max_train_seconds"]
    with pytest.raises(ConfigError, match="max_seconds"):        # a user's config gets no such leniency
        config.from_dict(TeacherConfig, {"name": "MF", "model": "bpr_mf", "max_seconds": 1.0})
