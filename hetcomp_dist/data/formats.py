"""Readers for raw interaction files. Each streams pyarrow record batches with columns
``user``, ``item`` (int64, or string for token ids) and, when present, ``timestamp`` and
``rating`` (float64). Parsing is columnar (pyarrow compute), never a Python loop over rows,
and every bad input raises :class:`DataError` naming the file and the line or column.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from hetcomp_dist import storage

FORMATS = ("citeulike", "lightgcn", "inter", "csv", "parquet")
BLOCK_BYTES = 16 << 20
_INT = r"^\d+$"


class DataError(ValueError):
    """Bad raw input; the message names the file and the line or column."""


@dataclass(frozen=True)
class Columns:
    """Names of the input columns for tabular formats (csv, parquet)."""

    user: str = "user"
    item: str = "item"
    timestamp: str | None = None
    rating: str | None = None


@contextlib.contextmanager
def _open(uri: str) -> Iterator:
    fs, path = storage.filesystem(uri)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    with f:
        if fs.size(path) == 0:
            raise DataError(f"{uri}: file is empty")
        yield f


def _line_batches(uri: str) -> Iterator[tuple[int, pa.Array]]:
    """Yield (first line number, 1-based) and the batch's lines as a string array."""
    read = pcsv.ReadOptions(column_names=["line"], block_size=BLOCK_BYTES)
    parse = pcsv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False)
    convert = pcsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False)
    line = 1
    with _open(uri) as f:
        for batch in pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
            yield line, batch.column(0)
            line += batch.num_rows


def _tokens(uri: str, first_line: int, lines: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Split whitespace-separated integer lines: (tokens per line int64 [n_lines], flat int64 tokens)."""
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines))
    flat = pc.list_flatten(lists)
    lengths = pc.list_value_length(lists).to_numpy().astype(np.int64)
    lengths[pc.equal(pc.list_element(lists, 0), "").to_numpy(zero_copy_only=False)] = 0  # blank line
    flat = pc.filter(flat, pc.not_equal(flat, ""))
    ok = pc.match_substring_regex(flat, _INT).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad = int(np.argmin(ok))
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise DataError(f"{uri}, line {first_line + row}: {flat[bad].as_py()!r} is not a non-negative integer id")
    return lengths, pc.cast(flat, pa.int64()).to_numpy()


def read_citeulike(uri: str) -> Iterator[pa.RecordBatch]:
    """CiteULike ``users.dat``: line i (0-based) is user i: ``count item item ...``."""
    for first, lines in _line_batches(uri):
        lengths, flat = _tokens(uri, first, lines)
        if (lengths == 0).any():
            raise DataError(f"{uri}, line {first + int(np.argmax(lengths == 0))}: empty line (expected 'count item ...')")
        starts = np.cumsum(lengths) - lengths
        counts = flat[starts]
        mismatch = counts != lengths - 1
        if mismatch.any():
            row = int(np.argmax(mismatch))
            raise DataError(f"{uri}, line {first + row}: count field says {counts[row]} items, "
                            f"line has {lengths[row] - 1}")
        is_item = np.ones(len(flat), dtype=bool)
        is_item[starts] = False
        users = np.repeat(np.arange(first - 1, first - 1 + len(lengths), dtype=np.int64), lengths - 1)
        yield pa.record_batch({"user": users, "item": flat[is_item]})


def read_lightgcn(uri: str) -> Iterator[pa.RecordBatch]:
    """LightGCN ``train.txt`` / ``test.txt``: one line per user, ``user item item ...``; blank lines skipped."""
    for first, lines in _line_batches(uri):
        lengths, flat = _tokens(uri, first, lines)
        lengths = lengths[lengths > 0]
        starts = np.cumsum(lengths) - lengths
        is_item = np.ones(len(flat), dtype=bool)
        is_item[starts] = False
        yield pa.record_batch({"user": np.repeat(flat[starts], lengths - 1), "item": flat[is_item]})


def _csv_batches(uri: str, delimiter: str, names: dict[str, str], header_line: int,
                 types: dict[str, pa.DataType]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream a delimited file, selecting and renaming ``names`` (output -> input column)."""
    invalid: list[pcsv.InvalidRow] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:  # pyarrow swallows exceptions raised here
        invalid.append(row)
        return "skip"

    def check_invalid() -> None:
        if invalid:
            row = invalid[0]
            where = f"line {row.number}" if row.number is not None else f"a line near {line}"
            raise DataError(f"{uri}, {where}: expected {row.expected_columns} fields, found {row.actual_columns}")

    read = pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False)
    parse = pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid)
    convert = pcsv.ConvertOptions(include_columns=list(names.values()), strings_can_be_null=True,
                                  column_types={names[k]: t for k, t in types.items() if k in names})
    line = header_line + 1
    with _open(uri) as f:
        # Check the header ourselves: a failed open_csv leaves a reader thread that aborts at exit.
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split(delimiter)
        for role, column in names.items():
            if column not in header:
                raise DataError(f"{uri}, line 1: {role} column {column!r} not in the header {header}")
        f.seek(0)
        reader = pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                check_invalid()
                return
            except pa.ArrowInvalid as e:
                raise DataError(f"{uri}, near line {line}: {e}") from None
            check_invalid()
            yield line, pa.record_batch([batch.column(src) for src in names.values()], names=list(names))
            line += batch.num_rows


def _check_ids(uri: str, first_line: int, batch: pa.RecordBatch, id_type: str) -> pa.RecordBatch:
    """Cast id columns to int64 (id_type='int', errors name the line) or keep them as strings."""
    columns = {}
    for name in batch.schema.names:
        col = batch.column(name)
        if name in ("user", "item"):
            text = pc.cast(col, pa.string())
            if col.null_count:
                row = int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False)))
                raise DataError(f"{uri}, line {first_line + row}: empty {name} id")
            if id_type == "int":
                ok = pc.match_substring_regex(pc.utf8_trim_whitespace(text), _INT).to_numpy(zero_copy_only=False)
                if not ok.all():
                    row = int(np.argmin(ok))
                    raise DataError(f"{uri}, line {first_line + row}: {name} id {text[row].as_py()!r} "
                                    f"is not a non-negative integer")
                col = pc.cast(pc.utf8_trim_whitespace(text), pa.int64())
            else:
                col = text
        elif col.null_count:
            row = int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False)))
            raise DataError(f"{uri}, line {first_line + row}: empty {name} value")
        columns[name] = col
    return pa.record_batch(columns)


def read_inter(uri: str, id_type: str = "str") -> Iterator[pa.RecordBatch]:
    """RecBole / MovieLens atomic ``.inter`` TSV; header fields are ``name:type``."""
    with _open(uri) as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
    fields = {h.split(":")[0]: h for h in header}
    names = {"user": "user_id", "item": "item_id"}
    for role in ("user", "item"):
        if names[role] not in fields:
            raise DataError(f"{uri}, line 1: {role} column {names[role]!r} not in header {header}")
    names = {k: fields[v] for k, v in names.items()}
    for role, col in (("timestamp", "timestamp"), ("rating", "rating")):
        if col in fields:
            names[role] = fields[col]
    types = {"user": pa.string(), "item": pa.string(), "timestamp": pa.float64(), "rating": pa.float64()}
    for first, batch in _csv_batches(uri, "\t", names, 1, types):
        yield _check_ids(uri, first, batch, id_type)


def read_csv(uri: str, columns: Columns = Columns(), id_type: str = "int",
             delimiter: str = ",") -> Iterator[pa.RecordBatch]:
    """Delimited text with a header row naming the columns."""
    names = _column_names(columns)
    types = {"user": pa.string(), "item": pa.string(), "timestamp": pa.float64(), "rating": pa.float64()}
    for first, batch in _csv_batches(uri, delimiter, names, 1, types):
        yield _check_ids(uri, first, batch, id_type)


def read_parquet(uri: str, columns: Columns = Columns(), id_type: str = "int",
                 batch_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Parquet, streamed by row groups; integer id columns are kept as int64, others per id_type."""
    names = _column_names(columns)
    with _open(uri) as f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise DataError(f"{uri}: not a Parquet file ({e})") from None
        missing = [f"{role} column {col!r}" for role, col in names.items() if col not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{uri}: {', '.join(missing)} not found (columns: {pf.schema_arrow.names})")
        if pf.metadata.num_rows == 0:
            raise DataError(f"{uri}: no rows")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(names.values())):
            batch = pa.record_batch([batch.column(c) for c in names.values()], names=list(names))
            cols = {}
            for name in batch.schema.names:
                col = batch.column(name)
                if col.null_count:
                    bad = int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False)))
                    raise DataError(f"{uri}, row {row + bad}: null {name}")
                if name in ("user", "item") and pa.types.is_integer(col.type):
                    if pc.min(col).as_py() < 0:
                        raise DataError(f"{uri}, row {row + int(np.argmax(col.to_numpy() < 0))}: negative {name} id")
                    col = pc.cast(col, pa.int64())
                elif name in ("timestamp", "rating"):
                    col = pc.cast(col, pa.float64())
                cols[name] = col
            batch = pa.record_batch(cols)
            if any(not pa.types.is_integer(batch.column(n).type) for n in ("user", "item")):
                batch = _check_ids(uri, row + 1, batch, id_type)  # string ids: checked like text
            row += batch.num_rows
            yield batch


def _column_names(columns: Columns) -> dict[str, str]:
    names = {"user": columns.user, "item": columns.item}
    if columns.timestamp:
        names["timestamp"] = columns.timestamp
    if columns.rating:
        names["rating"] = columns.rating
    return names
