"""Chaos probes: bad inputs, bad settings and traversal names through the real CLI: exit 2, one stderr line,
nothing written (no output, no lease), nothing outside the output touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from chaoslib import REPO, Tally, assert_committed, cli, lease_uri, names_under, one_line_error, tiny_config, verify
from hetcomp_dist import storage

pytestmark = pytest.mark.integration

BAD_INPUTS = [  # (file, bytes, extra arguments, what the one line says); a few of tests/test_bad_inputs.py's
    ("users.dat", b"2 1 2\n2 3\x1f4\n", [], "users.dat, line 2: control character 0x1F"),
    ("bad.csv", b"user,item\n1,2\n2,\xff3\n", [], "bad.csv, line 3: item value b'\\xff3' is not valid UTF-8"),
    ("big.dat", b"2 1 2\n1 9223372036854775808\n", ["--format", "citeulike"],
     "'9223372036854775808' is not a non-negative integer id below 2^63"),
    ("t.csv", b"user,item,t\n1,2,3\n1,3,yesterday\n", ["--time-col", "t", "--protocol", "leave-last-out"],
     "t.csv, line 3: timestamp value 'yesterday' is not a number"),
]
BAD_SETTINGS = [  # a few of tests/test_validation.py's
    ("distill.max_epochs=-5", "distill.max_epochs: must be >= 1, got -5"),
    ("trajectory.fractions=[0.7, 0.5]", "trajectory.fractions[1]: must be > the fraction before it (0.7), got 0.5"),
    ("ks=[1, 2", "invalid YAML value"),
    ("data.protocol=random", "data.protocol: 'random' is not one of"),
]


def test_bad_inputs_and_settings(storage_root: str, tmp_path: Path, datasets_env: Path) -> None:
    backend = "s3" if storage_root.startswith("s3://") else "local"
    tally = Tally("bad inputs and settings (CLI)", backend)
    cases = BAD_INPUTS if backend == "local" else BAD_INPUTS[:2]
    for name, data, extra, message in cases:
        with tally.trial(name):
            source = tmp_path / name
            source.write_bytes(data)
            out = storage.join(storage_root, f"out-{name}")
            one_line_error(cli("prepare", str(source), "--out", out, "--quiet", *extra), "prepare", message)
            assert names_under(out) == [] and not storage.exists(lease_uri(out)), names_under(out)
    settings = BAD_SETTINGS[:2] if backend == "local" else BAD_SETTINGS[2:3]   # each starts a CLI importing torch
    for override, message in settings:
        with tally.trial(override):
            run = storage.join(storage_root, "run")
            config = tiny_config(tmp_path / "c.yaml", run)
            one_line_error(cli("train-teachers", "--config", str(config), "--set", override, "--sequential"),
                           "train-teachers", message)
            assert names_under(run) == []
    tally.check()


def test_traversal_names(tmp_path: Path, datasets_env: Path) -> None:
    tally = Tally("traversal names (CLI)", "local")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "deep" / "run"
    config = tiny_config(tmp_path / "c.yaml", str(run))
    teacher = json.dumps([{"name": "../../../victim", "model": "bpr_mf"}])
    for command, override, message in [
            ("train-teachers", f"teachers={teacher}", "teachers[0].name: '../../../victim' is not a valid name"),
            ("distill", "distill.teachers=[../../victim]", "distill.teachers[0]: '../../victim' is not a valid name"),
            ("distill", "distill.out=../victim", "distill.out: '../victim' is not a valid location")]:
        with tally.trial(override):
            one_line_error(cli(command, "--config", str(config), "--set", override), command, message)
            assert victim.read_text() == "precious" and not run.exists()

    # A dataset whose manifest was tampered with to list ../victim: readers refuse it; a rewrite of the
    # dataset (which removes the parts the old manifest listed) does not delete the victim.
    source = tmp_path / "in.csv"
    source.write_text("user,item\n" + "".join(f"{u},{(u * 7 + i) % 40}\n" for u in range(30) for i in range(12)))
    out = str(tmp_path / "ds")
    assert cli("prepare", str(source), "--out", out, "--quiet").returncode == 0
    manifest = json.loads((Path(out) / storage.MANIFEST).read_text())
    manifest["parts"]["../victim"] = {"bytes": 8, "sha256": hashlib.sha256(b"precious").hexdigest()}
    (Path(out) / storage.MANIFEST).write_text(json.dumps(manifest))
    with tally.trial("manifest part ../victim, then a rewrite"):
        assert storage.exists(str(victim))
        with pytest.raises(storage.StorageError, match="is not a relative path inside it"):
            verify(out)
        rewrite = cli("prepare", str(source), "--out", out, "--quiet", "--seed", "1")
        assert rewrite.returncode == 0, rewrite.stderr
        assert victim.read_text() == "precious"
        assert_committed(out)
        assert storage.read_json(out, "meta.json")["seed"] == 1
    tally.check()
    assert REPO.is_dir()
