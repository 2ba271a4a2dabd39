"""Raw readers: each format's content, and the errors that name the file and the line or column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetcomp_dist.data import formats
from hetcomp_dist.data.formats import Columns, DataError


def _read(it) -> pa.Table:
    return pa.Table.from_batches(list(it))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_citeulike_line_index_is_user(tmp_path):
    uri = _write(tmp_path / "users.dat", "2 5 7\n0\n3 1 2 3\n")
    t = _read(formats.read_citeulike(uri))
    assert t.column("user").to_pylist() == [0, 0, 2, 2, 2]
    assert t.column("item").to_pylist() == [5, 7, 1, 2, 3]


def test_citeulike_count_mismatch_names_line(tmp_path):
    uri = _write(tmp_path / "users.dat", "2 5 7\n3 1 2\n")
    with pytest.raises(DataError, match=r"users\.dat, line 2: count field says 3 items, line has 2"):
        list(formats.read_citeulike(uri))


def test_citeulike_non_integer_names_line(tmp_path):
    uri = _write(tmp_path / "users.dat", "1 5\n1 5\n2 7 x9\n")
    with pytest.raises(DataError, match=r"users\.dat, line 3: 'x9' is not a non-negative integer id"):
        list(formats.read_citeulike(uri))


def test_lightgcn_reads_users_and_skips_blank_lines(tmp_path):
    uri = _write(tmp_path / "train.txt", "0 1 2 3\n\n5 9\n7\n")
    t = _read(formats.read_lightgcn(uri))
    assert list(zip(t.column("user").to_pylist(), t.column("item").to_pylist())) == [(0, 1), (0, 2), (0, 3), (5, 9)]


def test_lightgcn_bad_token_names_line(tmp_path):
    uri = _write(tmp_path / "train.txt", "0 1 2\n1 -3\n")
    with pytest.raises(DataError, match=r"train\.txt, line 2: '-3'"):
        list(formats.read_lightgcn(uri))


def test_inter_header_types_and_optional_columns(tmp_path):
    uri = _write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       "u1\ti9\t4\t100\nu2\ti9\t2.5\t50\n")
    t = _read(formats.read_inter(uri))
    assert t.column("user").to_pylist() == ["u1", "u2"]
    assert t.column("rating").to_pylist() == [4.0, 2.5]
    assert t.column("timestamp").to_pylist() == [100.0, 50.0]


def test_inter_missing_item_column(tmp_path):
    uri = _write(tmp_path / "x.inter", "user_id:token\tthing:token\nu1\ti1\n")
    with pytest.raises(DataError, match=r"x\.inter, line 1: item column 'item_id' not in header"):
        list(formats.read_inter(uri))


def test_csv_custom_columns_and_int_check(tmp_path):
    uri = _write(tmp_path / "log.csv", "uid,iid,ts\n1,10,5\n2,11,6\n")
    t = _read(formats.read_csv(uri, Columns("uid", "iid", "ts")))
    assert t.column("user").to_pylist() == [1, 2] and t.column("timestamp").to_pylist() == [5.0, 6.0]
    bad = _write(tmp_path / "bad.csv", "uid,iid\n1,10\n2,eleven\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: item id 'eleven' is not a non-negative integer"):
        list(formats.read_csv(bad, Columns("uid", "iid")))
    assert _read(formats.read_csv(bad, Columns("uid", "iid"), id_type="str")).column("item").to_pylist() == ["10", "eleven"]


def test_csv_ragged_row_and_missing_column(tmp_path):
    ragged = _write(tmp_path / "r.csv", "user,item\n1,2\n3,4\n5\n")
    with pytest.raises(DataError, match=r"r\.csv, line 4: expected 2 fields, found 1"):
        list(formats.read_csv(ragged))
    nouser = _write(tmp_path / "n.csv", "who,item\n1,2\n")
    with pytest.raises(DataError, match=r"n\.csv, line 1: user column 'user' not in the header"):
        list(formats.read_csv(nouser))


def test_csv_empty_id_names_line(tmp_path):
    uri = _write(tmp_path / "e.csv", "user,item\n1,2\n,4\n")
    with pytest.raises(DataError, match=r"e\.csv, line 3: empty user id"):
        list(formats.read_csv(uri))


def test_parquet_streams_row_groups_and_checks_columns(tmp_path):
    path = tmp_path / "log.parquet"
    table = pa.table({"u": np.arange(10, dtype=np.int32), "i": np.arange(10, 20), "r": np.ones(10)})
    pq.write_table(table, path, row_group_size=3)
    t = _read(formats.read_parquet(str(path), Columns("u", "i", rating="r"), batch_rows=4))
    assert t.column("user").type == pa.int64() and t.column("item").to_pylist() == list(range(10, 20))
    with pytest.raises(DataError, match=r"log\.parquet: item column 'item' not found"):
        list(formats.read_parquet(str(path), Columns("u", "item")))
    pq.write_table(pa.table({"user": [1, None], "item": [1, 2]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet, row 1: null user"):
        list(formats.read_parquet(str(tmp_path / "null.parquet")))


def test_parquet_wrong_format_and_missing_and_empty(tmp_path):
    not_parquet = _write(tmp_path / "fake.parquet", "user,item\n1,2\n")
    with pytest.raises(DataError, match=r"fake\.parquet: not a Parquet file"):
        list(formats.read_parquet(not_parquet))
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        list(formats.read_csv(str(tmp_path / "nope.csv")))
    with pytest.raises(DataError, match=r"empty\.dat: file is empty"):
        list(formats.read_citeulike(_write(tmp_path / "empty.dat", "")))


def test_readers_stream_in_blocks(tmp_path, monkeypatch):
    """A file larger than one block is read as several batches with correct line numbers."""
    monkeypatch.setattr(formats, "BLOCK_BYTES", 1 << 10)
    lines = [f"{u} " + " ".join(str(u + k) for k in range(5)) for u in range(500)]
    lines[437] = "437 1 2 oops"
    uri = _write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.txt, line 438: 'oops'"):
        list(formats.read_lightgcn(uri))
    lines[437] = "437 1 2"
    uri = _write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    batches = list(formats.read_lightgcn(uri))
    assert len(batches) > 1
    assert sum(b.num_rows for b in batches) == 499 * 5 + 2
