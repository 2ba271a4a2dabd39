"""Bad inputs to `hetcomp prepare` end in one line on stderr and exit code 2, naming the file and where; nothing is written.

Each case makes a tiny input in tmp_path and runs the CLI in-process (``cli.main``), whose
handler turns DataError / StorageError / ConfigError into ``hetcomp <command>: error: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetcomp_dist.cli import main

GOOD_CSV = "user,item\n" + "".join(f"{u},{i}\n" for u in range(10) for i in range(8))


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
    return make


def _lightgcn(train: bytes) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        (root / "lg").mkdir()
        (root / "lg" / "train.txt").write_bytes(train)
        (root / "lg" / "test.txt").write_bytes(b"0 3\n1 1\n")
        return root / "lg"
    return make


def _parquet(name: str, table: pa.Table, damage: bool = False) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        path = root / name
        pq.write_table(table, path)
        if damage:  # the footer's length field (the 4 bytes before the closing "PAR1") made nonsense
            data = bytearray(path.read_bytes())
            data[-8:-4] = b"\x10\x00\x00\x00"
            data[-40:-12] = b"\xff" * 28
            path.write_bytes(bytes(data))
        return path
    return make


def _given_test_with_folder(root: Path) -> Path:
    (root / "lg" / "test.txt").mkdir(parents=True)
    (root / "lg" / "train.txt").write_bytes(b"0 1 2\n")
    return root / "lg"


_DUPLICATE = pa.Table.from_arrays([pa.array([1, 2]), pa.array([1, 2]), pa.array([3, 4])], names=["user", "item", "user"])


@pytest.mark.parametrize("make, extra, message", [
    (_bytes("users.dat", b"2 1 2\n2 3\x1f4\n"), [], "users.dat, line 2: control character 0x1F"),
    (_lightgcn(b"0 1 2\n1 2\x1f3\n"), [], "train.txt, line 2: control character 0x1F"),
    (_bytes("users.dat", b"2 1 2\n1 \xff\n"), [], "users.dat, line 2: text b'1 \\xff' is not valid UTF-8"),
    (_bytes("bad.csv", b"user,item\n1,2\n2,\xff3\n"), [], "bad.csv, line 3: item value b'\\xff3' is not valid UTF-8"),
    (_bytes("bad.csv", b"us\xe9r,item\n1,2\n"), [], "bad.csv, line 1, byte 3: the header is not valid UTF-8"),
    (_bytes("x.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n2\t\xff\t4\n"), [],
     "x.inter, line 3: item value b'\\xff' is not valid UTF-8"),
    (_bytes("t.csv", b"user,item,t\n1,2,3\n1,3,yesterday\n"), ["--time-col", "t", "--protocol", "leave-last-out"],
     "t.csv, line 3: timestamp value 'yesterday' is not a number"),
    (_bytes("users.dat", b"2 1 2\n1 9223372036854775808\n"), [],
     "users.dat, line 2: '9223372036854775808' is not a non-negative integer id below 2^63"),
    (_lightgcn(b"0 1 2\n18446744073709551616 2\n"), [],
     "train.txt, line 2: '18446744073709551616' is not a non-negative integer id below 2^63"),
    (_bytes("big.csv", b"user,item\n1,2\n2,99999999999999999999\n"), [],
     "big.csv, line 3: item id '99999999999999999999' is not a non-negative integer below 2^63"),
    (_parquet("u64.parquet", pa.table({"user": pa.array([1, 2**63 + 5], pa.uint64()), "item": [1, 2]})), [],
     "u64.parquet, row 1: user id 9223372036854775813 is not in [0, 2^63)"),
    (_parquet("list.parquet", pa.table({"user": [[1], [2]], "item": [1, 2]})), [],
     "list.parquet: user column 'user' has type list<element: int64>; expected integers or strings"),
    (_parquet("ts.parquet", pa.table({"user": [1, 2], "item": [1, 2], "ts": ["monday", "tuesday"]})),
     ["--time-col", "ts", "--protocol", "leave-last-out"],
     "ts.parquet: timestamp column 'ts' has type string; expected numbers or timestamps"),
    (_parquet("dup.parquet", _DUPLICATE), [], "dup.parquet: user column 'user' appears 2 times"),
    (_parquet("damaged.parquet", pa.table({"user": [1, 2], "item": [1, 2]}), damage=True), [],
     "damaged.parquet: not a Parquet file, or its footer is damaged"),
    (_parquet("p.parquet", pa.table({"user": [1, 2], "item": [1, 2]})), ["--format", "citeulike"],
     "p.parquet, line 1: text b'PAR1"),
    (_given_test_with_folder, [], "test.txt: cannot read (Is a directory)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  make: Callable[[Path], Path], extra: list[str], message: str) -> None:
    source = make(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", str(source), "--out", str(out), "--quiet", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hetcomp prepare: error: "), captured.err
    assert message in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("where, message", [
    ("file", "{out}: {out} is a file, not a folder"),
    ("file/sub", "{out}: {file} is a file, not a folder"),
    ("/proc/hetcomp-test-output", "{out}.lease: cannot write (No such file or directory)"),  # its lease: the first write
    ("s3://", "'s3://': an empty location"),
])
def test_out_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                where: str, message: str) -> None:
    source = tmp_path / "ok.csv"
    source.write_text(GOOD_CSV)
    file = tmp_path / "file"
    file.write_text("a file, not a folder")
    out = where if where.startswith(("/", "s3:")) else str(tmp_path / where)
    assert main(["prepare", str(source), "--out", out, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hetcomp prepare: error: " + message.format(out=out, file=file)), captured.err
    assert "\n" not in captured.err.strip() and captured.out == ""
    assert file.read_text() == "a file, not a folder"
    assert not Path("/proc/hetcomp-test-output").exists()


def test_good_input_still_prepares(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "ok.csv"
    source.write_text(GOOD_CSV)
    assert main(["prepare", str(source), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "10 users, 8 items, 80 interactions" in capsys.readouterr().out
