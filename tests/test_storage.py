"""The storage seam, against both backends (local folder and a real moto S3 server)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pytest

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({
        "user": pa.array(range(start, start + n), pa.int64()),
        "score": pa.array([float(i) / 7 for i in range(start, start + n)], pa.float32()),
        "tag": pa.array([f"t{i % 5}" for i in range(start, start + n)], pa.string()),
    })


def _raw(uri: str, name: str) -> bytes:
    """The stored bytes of a part, read straight from the filesystem (no manifest involved)."""
    fs, path = storage.filesystem(storage.join(uri, name))
    return fs.cat_file(path)


def _overwrite(uri: str, name: str, data: bytes) -> None:
    fs, path = storage.filesystem(storage.join(uri, name))
    fs.pipe_file(path, data)


def _part_exists(uri: str, name: str) -> bool:
    return storage.exists(storage.join(uri, name))


def _manifest_like_files(uri: str) -> list[str]:
    """Every object under ``uri`` whose name starts with MANIFEST (final or temporary)."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    return [p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith(storage.MANIFEST)]


def _write_sample(uri: str, config: dict | None = None) -> dict:
    with storage.open_output(uri, "sample", config or {"v": 1}) as out:
        out.write_table("a.parquet", _table(50))
        out.write_json("meta.json", {"n": 50})
    return storage.read_manifest(uri)


# ----------------------------------------------------------------------------- round trips

def test_parquet_parts_round_trip(storage_root):
    uri = storage.join(storage_root, "out")
    whole = _table(1000)
    batches = [_table(100, start=100 * k) for k in range(5)]
    with storage.open_output(uri, "scores", {"seed": 3}) as out:
        out.write_table("whole.parquet", whole, row_group_size=256)
        with out.parquet_writer("stream/part-0.parquet", batches[0].schema, compression="zstd") as w:
            for b in batches:
                w.write_table(b)
    assert storage.is_complete(uri)
    manifest = storage.read_manifest(uri)
    assert manifest["parts"]["whole.parquet"]["rows"] == 1000
    assert manifest["parts"]["stream/part-0.parquet"]["rows"] == 500

    assert storage.read_table(uri, "whole.parquet").equals(whole)
    streamed = storage.read_table(uri, "stream/part-0.parquet", manifest=manifest)
    assert streamed.equals(pa.concat_tables(batches))
    only = storage.read_table(uri, "whole.parquet", columns=["user", "tag"])
    assert only.column_names == ["user", "tag"] and only.equals(whole.select(["user", "tag"]))

    with storage.parquet_file(uri, "whole.parquet") as pf:
        assert pf.metadata.num_row_groups == 4  # 256 + 256 + 256 + 232
    with storage.parquet_file(uri, "stream/part-0.parquet") as pf:
        assert pf.metadata.num_row_groups == 5  # one per write_table call


def test_json_and_bytes_parts_round_trip(storage_root):
    uri = storage.join(storage_root, "blobs")
    blob = bytes(range(256)) * 1000
    obj = {"b": [1, 2.5, None], "a": "ü", "nested": {"k": True}}
    with storage.open_output(uri, "blobs") as out:
        out.write_bytes("raw.bin", blob)
        out.write_json("deep/obj.json", obj)
        out.write_bytes("empty.bin", b"")
        with out.open_part("chunks.bin") as f:
            for i in range(10):
                f.write(bytes([i]) * 1000)
            f.write(memoryview(b"tail"))
    assert storage.read_bytes(uri, "raw.bin") == blob
    assert storage.read_json(uri, "deep/obj.json") == obj
    assert storage.read_bytes(uri, "empty.bin") == b""
    assert storage.read_bytes(uri, "chunks.bin") == b"".join(bytes([i]) * 1000 for i in range(10)) + b"tail"
    manifest = storage.read_manifest(uri)
    assert all(manifest["parts"][n]["rows"] is None for n in ("raw.bin", "deep/obj.json", "empty.bin"))


def test_manifest_content(storage_root):
    uri = storage.join(storage_root, "m")
    config = {"model": "bpr", "dims": [32, 64], "lr": 0.01, "nested": {"x": None}}
    with storage.open_output(uri, "teacher_scores", config) as out:
        out.write_table("t.parquet", _table(123), row_group_size=50)
        out.write_bytes("b.bin", b"hello world")
        out.write_json("j.json", {"x": 1})
        out.extra["shards"] = 3
    manifest = storage.read_manifest(uri)

    assert manifest["kind"] == "teacher_scores"
    assert manifest["format_version"] == 1
    assert manifest["config"] == config
    assert manifest["shards"] == 3
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert set(manifest["parts"]) == {"t.parquet", "b.bin", "j.json"}
    assert manifest["parts"]["t.parquet"]["rows"] == 123
    for name, entry in manifest["parts"].items():
        raw = _raw(uri, name)  # independent of storage's own hashing
        assert entry["bytes"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        fs, path = storage.filesystem(storage.join(uri, name))
        assert fs.size(path) == entry["bytes"]
    assert _raw(uri, "b.bin") == b"hello world"

    versions = manifest["versions"]
    for dist in ("pyarrow", "s3fs", "hetcomp_dist"):
        assert versions[dist] == metadata.version(dist)
    # The manifest on storage is plain JSON, identical to what read_manifest returns.
    assert json.loads(_raw(uri, storage.MANIFEST)) == manifest
    assert _manifest_like_files(uri) == [storage.filesystem(storage.join(uri, storage.MANIFEST))[1]]


def test_config_is_copied_not_referenced(storage_root):
    uri = storage.join(storage_root, "c")
    config = {"a": 1}
    with storage.open_output(uri, "k", config) as out:
        config["a"] = 2  # mutating the caller's dict after opening must not change the record
        out.write_bytes("x", b"x")
    assert storage.read_manifest(uri)["config"] == {"a": 1}


def test_output_without_parts(storage_root):
    uri = storage.join(storage_root, "not", "yet", "there")
    with storage.open_output(uri, "marker", {"k": 1}) as out:
        out.extra["note"] = "no parts"
    manifest = storage.read_manifest(uri)
    assert manifest["parts"] == {} and manifest["note"] == "no parts"


def test_part_written_twice_or_named_manifest(storage_root):
    uri = storage.join(storage_root, "dup")
    with pytest.raises(StorageError, match="written twice"):
        with storage.open_output(uri, "k") as out:
            out.write_bytes("x.bin", b"1")
            out.write_bytes("x.bin", b"2")
    assert not storage.is_complete(uri)
    with pytest.raises(StorageError):
        with storage.open_output(uri, "k") as out:
            out.write_bytes(storage.MANIFEST, b"{}")
    assert not storage.is_complete(uri)


# ----------------------------------------------------------------------------- failures

class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["between_parts", "inside_parquet_part", "inside_bytes_part", "interrupt"])
def test_failed_write_leaves_no_manifest_and_no_parts(storage_root, where):
    uri = storage.join(storage_root, "failed")
    exc = KeyboardInterrupt if where == "interrupt" else Boom
    with pytest.raises(exc):
        with storage.open_output(uri, "k", {"x": 1}) as out:
            out.write_table("done.parquet", _table(10))
            out.write_json("sub/done.json", [1, 2])
            if where == "inside_parquet_part":
                with out.parquet_writer("half.parquet", _table(1).schema) as w:
                    w.write_table(_table(100))
                    raise Boom
            if where == "inside_bytes_part":
                with out.open_part("half.bin") as f:
                    f.write(b"partial" * 1000)
                    raise Boom
            raise exc
    assert not storage.is_complete(uri)
    for name in ("done.parquet", "sub/done.json", "half.parquet", "half.bin"):
        assert not _part_exists(uri, name), name
    assert _manifest_like_files(uri) == []
    with pytest.raises(StorageError, match=re.escape(uri)):
        storage.read_manifest(uri)
    with pytest.raises(StorageError, match=re.escape(uri)):
        storage.read_table(uri, "done.parquet")


def test_missing_output(storage_root):
    uri = storage.join(storage_root, "never-written")
    assert not storage.exists(uri)
    assert not storage.is_complete(uri)
    with pytest.raises(StorageError, match=re.escape(uri)):
        storage.read_manifest(uri)
    with pytest.raises(StorageError, match=re.escape(uri)):
        storage.read_bytes(uri, "x")


def test_invalid_manifest(storage_root):
    uri = storage.join(storage_root, "bad")
    _write_sample(uri)
    _overwrite(uri, storage.MANIFEST, b"{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        storage.read_manifest(uri)
    _overwrite(uri, storage.MANIFEST, b'{"kind": "x"}')
    with pytest.raises(StorageError, match="no 'parts'"):
        storage.read_manifest(uri)


def test_rewrite_removes_old_manifest_first(storage_root):
    uri = storage.join(storage_root, "re")
    old = _write_sample(uri, {"v": 1})
    assert old["config"] == {"v": 1}

    # A rewrite that crashes midway: the old manifest must already be gone, so the half-new
    # parts are never read through the old manifest.
    with pytest.raises(Boom):
        with storage.open_output(uri, "sample", {"v": 2}) as out:
            assert not storage.is_complete(uri)
            with pytest.raises(StorageError, match=re.escape(uri)):
                storage.read_manifest(uri)
            out.write_table("a.parquet", _table(7))
            raise Boom
    assert not storage.is_complete(uri)
    assert _manifest_like_files(uri) == []
    with pytest.raises(StorageError):
        storage.read_table(uri, "a.parquet", manifest=None)

    # A successful rewrite replaces the content entirely.
    with storage.open_output(uri, "sample", {"v": 3}) as out:
        out.write_table("a.parquet", _table(7))
    new = storage.read_manifest(uri)
    assert new["config"] == {"v": 3}
    assert set(new["parts"]) == {"a.parquet"}
    assert storage.read_table(uri, "a.parquet").num_rows == 7
    # The stale part of the first version is not reachable through the new manifest.
    with pytest.raises(StorageError, match="not in the manifest"):
        storage.read_json(uri, "meta.json")


def test_stale_manifest_passed_in_is_caught_by_verification(storage_root):
    uri = storage.join(storage_root, "stale")
    old = _write_sample(uri)
    with storage.open_output(uri, "sample") as out:
        out.write_table("a.parquet", _table(60))
        out.write_json("meta.json", {"n": 60})
    with pytest.raises(StorageError, match="does not match"):
        storage.read_table(uri, "a.parquet", manifest=old)


def test_tampered_part_is_rejected(storage_root):
    uri = storage.join(storage_root, "t")
    _write_sample(uri)

    data = bytearray(_raw(uri, "meta.json"))
    data[-2] ^= 0x01  # same length, different content
    _overwrite(uri, "meta.json", bytes(data))
    with pytest.raises(StorageError, match=re.escape(storage.join(uri, "meta.json"))):
        storage.read_bytes(uri, "meta.json")
    with pytest.raises(StorageError):
        storage.read_json(uri, "meta.json")

    pq_data = bytearray(_raw(uri, "a.parquet"))
    pq_data[len(pq_data) // 2] ^= 0xFF
    _overwrite(uri, "a.parquet", bytes(pq_data))
    with pytest.raises(StorageError, match="does not match"):
        storage.read_table(uri, "a.parquet")
    with pytest.raises(StorageError, match="does not match"):
        storage.read_bytes(uri, "a.parquet")

    # A different length is caught even by the size-only partial reader.
    _overwrite(uri, "a.parquet", bytes(pq_data) + b"extra")
    with pytest.raises(StorageError, match="manifest says"):
        with storage.parquet_file(uri, "a.parquet"):
            pass
    with pytest.raises(StorageError):
        storage.read_table(uri, "a.parquet")


def test_deleted_part_is_reported(storage_root):
    uri = storage.join(storage_root, "d")
    _write_sample(uri)
    fs, path = storage.filesystem(storage.join(uri, "a.parquet"))
    fs.rm(path)
    with pytest.raises(StorageError, match="missing"):
        storage.read_table(uri, "a.parquet")
    with pytest.raises(StorageError, match="missing"):
        with storage.parquet_file(uri, "a.parquet"):
            pass
    with pytest.raises(StorageError, match="not in the manifest"):
        storage.read_bytes(uri, "nope.bin")


def test_parquet_file_reads_one_row_group(storage_root):
    uri = storage.join(storage_root, "rg")
    table = _table(1000)
    with storage.open_output(uri, "k") as out:
        out.write_table("t.parquet", table, row_group_size=100)
    with storage.parquet_file(uri, "t.parquet") as pf:
        assert pf.metadata.num_rows == 1000
        assert pf.metadata.num_row_groups == 10
        assert pf.metadata.row_group(3).num_rows == 100
        group = pf.read_row_group(3)
        assert group.equals(table.slice(300, 100))
        col = pf.read_row_group(9, columns=["score"])
        assert col.column_names == ["score"] and col.column("score").equals(table.slice(900, 100).column("score"))


# ----------------------------------------------------------------------------- URIs

def test_file_uri_and_plain_path_are_equivalent(tmp_path):
    plain = str(tmp_path / "o")
    as_uri = "file://" + plain
    fs1, p1 = storage.filesystem(plain)
    fs2, p2 = storage.filesystem(as_uri)
    assert p1 == p2 == plain and type(fs1) is type(fs2)

    with storage.open_output(as_uri, "k", {"via": "uri"}) as out:
        out.write_table("t.parquet", _table(20))
    assert (tmp_path / "o" / storage.MANIFEST).is_file()
    assert storage.is_complete(plain)
    assert storage.read_manifest(plain) == storage.read_manifest(as_uri)
    assert storage.read_table(plain, "t.parquet").equals(storage.read_table(as_uri + "/", "t.parquet"))

    with storage.open_output(tmp_path / "p", "k") as out:  # a Path works too
        out.write_bytes("b", b"x")
    assert storage.read_bytes("file://" + str(tmp_path / "p"), "b") == b"x"


def test_relative_and_user_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.filesystem("rel/out")[1] == str(tmp_path / "rel" / "out")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.filesystem("~/x")[1] == str(tmp_path / "x")


def test_join():
    assert storage.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert storage.join("/tmp/a", "b.parquet") == "/tmp/a/b.parquet"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x", "hdfs:///data", "memory://x"])
def test_unsupported_scheme_raises(uri):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.filesystem(uri)
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_manifest(uri)
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        with storage.open_output(uri, "k"):
            pass


def test_s3_server_fixture(s3_server, s3_bucket):
    assert s3_server.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server
    fs, path = storage.filesystem(f"s3://{s3_bucket}")
    assert fs.exists(path)


def test_configure_endpoint_overrides_environment(s3_server, s3_bucket, monkeypatch):
    uri = f"s3://{s3_bucket}/configured"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    try:
        storage.configure(endpoint_url=s3_server)
        with storage.open_output(uri, "k") as out:
            out.write_bytes("b", b"y")
        assert storage.read_bytes(uri, "b") == b"y"
    finally:
        storage.configure()


# ----------------------------------------------------------------------------- killed writer

_SLOW_WRITER = r"""
import os, sys, time
import pyarrow as pa
from hetcomp_dist import storage

uri = sys.argv[1]
parent, deadline = os.getppid(), time.monotonic() + 60
schema = pa.schema([("i", pa.int64()), ("payload", pa.binary())])
with storage.open_output(uri, "killed", {"slow": True}) as out:
    out.write_bytes("first.bin", b"x" * 1_000_000)
    with out.parquet_writer("big.parquet", schema) as w:
        for k in range(100_000):  # ~25 GB if ever left to finish
            w.write_table(pa.table({"i": list(range(k * 1000, (k + 1) * 1000)),
                                    "payload": [bytes(256)] * 1000}, schema=schema))
            if k == 3:
                print("MIDWAY", flush=True)
            if os.getppid() != parent or time.monotonic() > deadline:
                raise SystemExit("orphaned or never killed: aborting")  # never outlive the test
            time.sleep(0.02)
print("DONE", flush=True)
"""


def _wait_for_line(proc: subprocess.Popen, expected: str, timeout: float) -> None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    break
                if line.strip() == expected:
                    return
    finally:
        sel.close()
    proc.kill()
    _, err = proc.communicate(timeout=10)
    pytest.fail(f"writer never printed {expected!r} (rc={proc.returncode}):\n{err[-3000:]}")


def test_killed_writer_leaves_no_manifest(storage_root, tmp_path):
    uri = storage.join(storage_root, "killed")
    _write_sample(uri)  # a previous complete version: its manifest must not survive either
    assert storage.is_complete(uri)

    script = tmp_path / "slow_writer.py"
    script.write_text(_SLOW_WRITER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(REPO_ROOT))
    try:
        _wait_for_line(proc, "MIDWAY", timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "DONE" not in out

    assert not storage.is_complete(uri)
    assert _manifest_like_files(uri) == []
    with pytest.raises(StorageError, match=re.escape(uri)):
        storage.read_manifest(uri)
    with pytest.raises(StorageError):
        storage.read_table(uri, "big.parquet")

    # The location is reusable: a clean rewrite after the crash is complete and verified.
    with storage.open_output(uri, "killed", {"slow": False}) as out:
        out.write_table("big.parquet", _table(5))
    assert storage.read_manifest(uri)["config"] == {"slow": False}
    assert storage.read_table(uri, "big.parquet").num_rows == 5


def test_remove_deletes_a_folder_and_everything_under_it(storage_root: str) -> None:
    def put(uri: str) -> None:
        fs, path = storage.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local disk needs the folders; S3 has none
        fs.pipe_file(path, b"x")

    uri, keep = storage.join(storage_root, "gone"), storage.join(storage_root, "kept")
    for name in ("a/b.bin", "c.bin"):
        put(storage.join(uri, name))
    put(storage.join(keep, "d.bin"))
    storage.remove(uri)
    assert not storage.exists(uri) and not _part_exists(uri, "a/b.bin")
    assert _part_exists(keep, "d.bin")
    storage.remove(uri)  # nothing there: not an error
