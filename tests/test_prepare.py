"""`prepare`: protocols, determinism, bad inputs writing nothing, real datasets, both storage backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetcomp_dist import storage
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.data.formats import Columns, DataError
from hetcomp_dist.data.prepare import prepare


def _users_dat(path: Path, rows: list[list[int]]) -> str:
    path.write_text("".join(f"{len(r)} {' '.join(map(str, r))}\n" for r in rows))
    return str(path)


def _pairs(ds, split):
    s = ds.split(split)
    return set(zip(s.users().tolist(), s.indices.tolist()))


def test_hetcomp_protocol_per_user_split(tmp_path):
    # user 0: 10 items -> 2 test, 2 valid, 6 train; user 1: 4 items (dropped, < 5); user 2: 5 items -> 1/1/3
    rows = [list(range(10)), [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    out = str(tmp_path / "ds")
    meta = prepare(_users_dat(tmp_path / "users.dat", rows), out, progress=False, drop_unseen=False)
    ds = load_dataset(out)
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (2, 10, 15)
    assert ds.train.counts().tolist() == [6, 3]
    assert ds.valid.counts().tolist() == [2, 1] and ds.test.counts().tolist() == [2, 1]
    every = _pairs(ds, "train") | _pairs(ds, "valid") | _pairs(ds, "test")
    assert every == {(0, i) for i in range(10)} | {(1, i) for i in range(5)}
    umap = pq.read_table(f"{out}/user_map.parquet").to_pydict()
    assert umap == {"original": [0, 2], "index": [0, 1]}  # line index = original user id


def test_hetcomp_drops_unseen_valid_test_items(tmp_path):
    rows = [[0, 1, 2, 3, 4]] * 4 + [[0, 1, 2, 3, 99]]
    out = str(tmp_path / "ds")
    for seed in range(20):  # find a seed where item 99 (only user 2 has it) lands outside train
        meta = prepare(_users_dat(tmp_path / "users.dat", rows), out, seed=seed, progress=False)
        ds = load_dataset(out)
        item99 = 5  # dense index: items 0..4 then 99
        if item99 not in ds.train.indices:
            assert item99 not in ds.valid.indices and item99 not in ds.test.indices
            assert meta["n_items"] == 6 and meta["n_interactions_kept"] == 24
            return
    pytest.fail("no seed put item 99 outside train")


def test_split_is_deterministic_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    rows = [sorted(rng.choice(200, size=rng.integers(5, 30), replace=False).tolist()) for _ in range(50)]
    src = _users_dat(tmp_path / "users.dat", rows)
    a, b, c = (str(tmp_path / n) for n in "abc")
    prepare(src, a, seed=1, progress=False)
    prepare(src, b, seed=1, progress=False)
    prepare(src, c, seed=2, progress=False)
    da, db, dc = load_dataset(a), load_dataset(b), load_dataset(c)
    assert _pairs(da, "test") == _pairs(db, "test") and _pairs(da, "valid") == _pairs(db, "valid")
    assert _pairs(da, "test") != _pairs(dc, "test")
    assert json.loads(Path(a, "meta.json").read_text())["seed"] == 1


def test_input_row_order_does_not_change_the_split(tmp_path):
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(40), 12)
    items = rng.integers(0, 100, size=len(users))
    table = pa.table({"user": users, "item": items})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(table.take(rng.permutation(len(users))), tmp_path / "b.parquet")
    prepare(str(tmp_path / "a.parquet"), str(tmp_path / "A"), progress=False)
    prepare(str(tmp_path / "b.parquet"), str(tmp_path / "B"), progress=False)
    for split in ("train", "valid", "test"):
        assert _pairs(load_dataset(str(tmp_path / "A")), split) == _pairs(load_dataset(str(tmp_path / "B")), split)


def test_given_test_carves_valid_from_train(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "train.txt").write_text("0 " + " ".join(map(str, range(20))) + "\n1 0 1\n2 5\n")
    (d / "test.txt").write_text("0 20 21\n1 2\n2 6\n")
    out = str(tmp_path / "ds")
    meta = prepare(str(d), out, progress=False)
    ds = load_dataset(out)
    assert meta["protocol"]["name"] == "given-test"
    assert _pairs(ds, "test") == {(0, 20), (0, 21), (1, 2), (2, 6)}  # untouched
    # ceil(0.1 * n) carved, at least one train item kept: 20 -> 2, 2 -> 1, 1 -> 0
    assert ds.valid.counts().tolist() == [2, 1, 0]
    assert ds.train.counts().tolist() == [18, 1, 1]
    assert _pairs(ds, "valid") <= {(0, i) for i in range(20)} | {(1, 0), (1, 1)}


def test_leave_last_out_by_timestamp_and_dedup_keeps_latest(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("u,i,t\n"
                   "a,x,1\na,y,5\na,z,3\na,w,4\na,x,6\n"  # a: x re-seen at t=6 -> latest x, then y
                   "b,x,1\nb,y,2\n"                       # b: 2 items -> test only
                   "c,y,1\n")                             # c: 1 item -> train only
    out = str(tmp_path / "ds")
    meta = prepare(str(csv), out, protocol="leave-last-out", id_type="str",
                   columns=Columns("u", "i", "t"), progress=False)
    ds = load_dataset(out)
    items = pq.read_table(f"{out}/item_map.parquet").column("original").to_pylist()  # sorted: w x y z
    name = {k: v for k, v in enumerate(items)}
    assert items == ["w", "x", "y", "z"]
    assert {(u, name[i]) for u, i in _pairs(ds, "test")} == {(0, "x"), (1, "y")}
    assert {(u, name[i]) for u, i in _pairs(ds, "valid")} == {(0, "y")}
    assert meta["n_interactions"] == 7  # the duplicate (a, x) collapsed


def test_rating_threshold(tmp_path):
    inter = tmp_path / "r.inter"
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\ti{i}\t{1 + (i % 5)}\t{i}" for u in range(3) for i in range(10)]
    inter.write_text("\n".join(lines) + "\n")
    meta = prepare(str(inter), str(tmp_path / "ds"), rating_threshold=4, drop_unseen=False, progress=False)
    assert meta["n_interactions"] == 3 * 4  # ratings 4 and 5 only


def test_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "ids.csv").write_text("user,item\n1,2\n1,3.5\n")
    cases = {
        str(tmp_path / "nope.dat"): "nope.dat: no such file",
        str(tmp_path / "e.csv"): "e.csv: file is empty",
        str(tmp_path / "ids.csv"): "ids.csv, line 3: item id '3.5'",
        _users_dat(tmp_path / "few.dat", [[1, 2, 3]]): "no user has >= 5 items",
    }
    for src, message in cases.items():
        with pytest.raises(DataError, match=message):
            prepare(src, str(out), progress=False)
        assert not out.exists(), src
    with pytest.raises(DataError, match="leaves no evaluable user"):
        prepare(str(tmp_path / "few.dat"), str(out), progress=False, min_user_items=1)
    assert not out.exists()


def test_failed_rewrite_keeps_old_output(tmp_path):
    src = _users_dat(tmp_path / "users.dat", [list(range(10))] * 3)
    out = str(tmp_path / "ds")
    prepare(src, out, progress=False)
    before = storage.read_manifest(out)
    with pytest.raises(DataError):
        prepare(str(tmp_path / "missing.dat"), out, progress=False)
    assert storage.read_manifest(out) == before  # validation fails before anything is touched


def test_prepare_round_trips_on_both_backends(storage_root):
    raw = storage.join(storage_root, "raw", "log.parquet")
    rng = np.random.default_rng(0)
    table = pa.table({"user": np.repeat(np.arange(30), 10), "item": rng.integers(0, 80, 300)})
    fs, path = storage.filesystem(raw)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    out = storage.join(storage_root, "ds")
    meta = prepare(raw, out, progress=False)
    ds = load_dataset(out)
    assert ds.n_users == meta["n_users"] and ds.train.nnz == meta["splits"]["train"]
    manifest = storage.read_manifest(out)
    assert set(manifest["parts"]) == {"train.parquet", "valid.parquet", "test.parquet",
                                      "user_map.parquet", "item_map.parquet", "meta.json"}
    assert manifest["parts"]["train.parquet"]["rows"] == meta["splits"]["train"]
    assert manifest["config"]["protocol"]["name"] == "hetcomp"


def test_citeulike_expected_counts(datasets_dir, tmp_path):
    meta = prepare(str(datasets_dir / "citeulike-t" / "users.dat"), str(tmp_path / "c"), progress=False)
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (5219, 25181, 125580)
    s = meta["splits"]
    assert 78_000 < s["train"] < 80_000 and 20_000 < s["valid"] < 22_000 and 20_000 < s["test"] < 22_000
    assert 4_600 < meta["n_eval_users"]["valid_and_test"] < 4_800  # reference: about 4,700


def test_registry_names_use_the_mirror(datasets_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATASETS_DIR", str(datasets_dir))
    meta = prepare("gowalla", str(tmp_path / "g"), progress=False)
    assert (meta["n_users"], meta["n_items"]) == (29858, 40981)
    assert meta["splits"]["test"] == 217242 and meta["splits"]["train"] + meta["splits"]["valid"] == 810128
    meta = prepare("ml-100k", str(tmp_path / "m"), progress=False)
    assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (943, 1682, 100000)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_bad_input_is_one_line_error(tmp_path):
    (tmp_path / "bad.csv").write_text("user,item\n1,2\n1,zz\n")
    r = _cli("prepare", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.csv, line 3" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sub", ["prepare", "datasets"])
def test_cli_help(sub):
    r = _cli(sub, "--help")
    assert r.returncode == 0 and "usage: hetcomp" in r.stdout
