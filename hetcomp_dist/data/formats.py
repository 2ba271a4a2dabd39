"""Readers for raw interaction files. Each streams pyarrow record batches with columns
``user``, ``item`` (int64, or string for token ids) and, when present, ``timestamp`` and
``rating`` (float64). Parsing is columnar (pyarrow compute), never a Python loop over rows,
and every bad input raises :class:`DataError` naming the file and the line or column.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from hetcomp_dist import storage

FORMATS = ("citeulike", "lightgcn", "inter", "csv", "parquet")
BLOCK_BYTES = 16 << 20
_INT = r"^\d+$"
_MAX_ID = str(2**63 - 1)   # ids are int64


class DataError(ValueError):
    """Bad raw input; the message (one line) names the file and the line or column."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message).strip()))  # the CLI prints one line


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
    except OSError as e:  # a folder, no permission
        raise DataError(f"{uri}: cannot read ({e.strerror or e})") from None
    with f:
        if fs.size(path) == 0:
            raise DataError(f"{uri}: file is empty")
        yield f


def _first_failing(column: pa.Array, to: pa.DataType) -> int:
    """Index of the first value of ``column`` that does not cast to ``to`` (bisection: error path only)."""
    lo, hi = 0, len(column)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(column.slice(lo, mid - lo), to)
            lo = mid
        except pa.ArrowException:
            hi = mid
    return lo


def _cast(uri: str, first_line: int, what: str, column: pa.Array, to: pa.DataType, problem: str) -> pa.Array:
    """``column`` cast to ``to``; else a DataError naming the line of the first value that does not convert."""
    try:
        return pc.cast(column, to)
    except pa.ArrowException:
        row = _first_failing(column, to)
        shown = repr(column[row].as_py())
        shown = shown if len(shown) <= 60 else shown[:57] + "..."  # a binary file is one long "line"
        raise DataError(f"{uri}, line {first_line + row}: {what} {shown} {problem}") from None


def _text(uri: str, first_line: int, what: str, column: pa.Array) -> pa.Array:
    """Raw bytes as UTF-8 text (checked: the line of the first invalid value is named)."""
    return _cast(uri, first_line, what, column, pa.string(), "is not valid UTF-8")


class _InvalidRows:
    """pyarrow's invalid_row_handler: rows with the wrong number of fields, reported as a DataError."""

    def __init__(self, uri: str, explain: str):
        self.uri, self.explain, self.rows = uri, explain, []

    def __call__(self, row: pcsv.InvalidRow) -> str:  # pyarrow swallows exceptions raised here
        self.rows.append(row)
        return "skip"

    def check(self, near: int) -> None:
        if self.rows:
            row = self.rows[0]
            where = f"line {row.number}" if row.number is not None else f"a line near {near}"
            raise DataError(f"{self.uri}, {where}: {self.explain.format(row=row)}")


def _line_batches(uri: str) -> Iterator[tuple[int, pa.Array]]:
    """Yield (first line number, 1-based) and the batch's lines as a string array."""
    # Lines are "fields" split at 0x1F (never in a text file): a line holding one is refused.
    invalid = _InvalidRows(uri, "control character 0x1F (not a text line)")
    read = pcsv.ReadOptions(column_names=["line"], block_size=BLOCK_BYTES, use_threads=False)
    parse = pcsv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False,
                              invalid_row_handler=invalid)
    convert = pcsv.ConvertOptions(column_types={"line": pa.binary()}, strings_can_be_null=False)
    with _open(uri) as f, contextlib.closing(_stream(uri, f, (read, parse, convert), invalid, 1)) as batches:
        for line, batch in batches:
            yield line, _text(uri, line, "text", batch.column(0))


def _stream(uri: str, f: Any, options: tuple[pcsv.ReadOptions, pcsv.ParseOptions, pcsv.ConvertOptions],
            invalid: _InvalidRows, line: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first line, batch) of a delimited file. Close it before ``f``: the reader is closed then, else
    its read-ahead thread may outlive the file and abort the process at exit."""
    read, parse, convert = options
    try:  # reads the first block: a parse error there surfaces here
        reader = pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        raise DataError(f"{uri}, in the first {BLOCK_BYTES >> 20} MB: {e}") from None
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                invalid.check(line)
                return
            except pa.ArrowInvalid as e:
                raise DataError(f"{uri}, near line {line}: {e}") from None
            invalid.check(line)
            yield line, batch
            line += batch.num_rows
    finally:
        reader.close()


def _tokens(uri: str, first_line: int, lines: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Split whitespace-separated integer lines: (tokens per line int64 [n_lines], flat int64 tokens)."""
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines))
    flat = pc.list_flatten(lists)
    lengths = pc.list_value_length(lists).to_numpy().astype(np.int64)
    lengths[pc.equal(pc.list_element(lists, 0), "").to_numpy(zero_copy_only=False)] = 0  # blank line
    flat = pc.filter(flat, pc.not_equal(flat, ""))
    ok = pc.match_substring_regex(flat, _INT).to_numpy(zero_copy_only=False) & _fits_int64(flat)
    if not ok.all():
        bad = int(np.argmin(ok))
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise DataError(f"{uri}, line {first_line + row}: {flat[bad].as_py()!r} is not a non-negative integer id "
                        f"below 2^63")
    return lengths, pc.cast(flat, pa.int64()).to_numpy()


def _fits_int64(digits: pa.Array) -> np.ndarray:
    """Per value: a digit string (or anything else: True, judged elsewhere) that is <= 2^63 - 1."""
    stripped = pc.utf8_ltrim(digits, "0")
    n = pc.utf8_length(stripped)
    too_long = pc.or_(pc.greater(n, len(_MAX_ID)),
                      pc.and_(pc.equal(n, len(_MAX_ID)), pc.greater(stripped, _MAX_ID)))
    return ~too_long.to_numpy(zero_copy_only=False)


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


def _header(uri: str, f: Any, delimiter: str) -> list[str]:
    """The first line's fields (read by us: a failed open_csv leaves a reader thread that aborts at exit)."""
    try:
        return f.readline().decode("utf-8").rstrip("\r\n").split(delimiter)
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}, line 1, byte {e.start + 1}: the header is not valid UTF-8") from None


def _csv_batches(uri: str, delimiter: str, names: dict[str, str], header_line: int,
                 types: dict[str, pa.DataType]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream a delimited file, selecting and renaming ``names`` (output -> input column).

    Columns are read as bytes and converted here to ``types`` (string or float64), so that a value
    that is not UTF-8 or not a number is reported with its line.
    """
    invalid = _InvalidRows(uri, "expected {row.expected_columns} fields, found {row.actual_columns}")
    read = pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False)
    parse = pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=invalid)
    convert = pcsv.ConvertOptions(include_columns=list(names.values()), strings_can_be_null=True,
                                  column_types={column: pa.binary() for column in names.values()})
    with _open(uri) as f:
        header = _header(uri, f, delimiter)
        for role, column in names.items():
            if column not in header:
                raise DataError(f"{uri}, line 1: {role} column {column!r} not in the header {header}")
            if header.count(column) > 1:
                raise DataError(f"{uri}, line 1: {role} column {column!r} appears {header.count(column)} times "
                                "in the header")
        f.seek(0)
        with contextlib.closing(_stream(uri, f, (read, parse, convert), invalid, header_line + 1)) as batches:
            for line, batch in batches:
                columns = [_convert(uri, line, role, batch.column(names[role]), types[role]) for role in names]
                yield line, pa.record_batch(columns, names=list(names))


def _convert(uri: str, line: int, role: str, column: pa.Array, to: pa.DataType) -> pa.Array:
    text = _text(uri, line, f"{role} value", column)
    return text if to == pa.string() else _cast(uri, line, f"{role} value", text, to, "is not a number")


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
                digits = pc.utf8_trim_whitespace(text)
                ok = pc.match_substring_regex(digits, _INT).to_numpy(zero_copy_only=False) & _fits_int64(digits)
                if not ok.all():
                    row = int(np.argmin(ok))
                    raise DataError(f"{uri}, line {first_line + row}: {name} id {text[row].as_py()!r} "
                                    f"is not a non-negative integer below 2^63")
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
        header = _header(uri, f, "\t")
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


_PARQUET_TYPES = {  # role -> (accepted Arrow types, in words)
    "user": ((pa.types.is_integer, pa.types.is_string, pa.types.is_large_string), "integers or strings"),
    "item": ((pa.types.is_integer, pa.types.is_string, pa.types.is_large_string), "integers or strings"),
    "timestamp": ((pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp), "numbers or timestamps"),
    "rating": ((pa.types.is_integer, pa.types.is_floating), "numbers"),
}


def _parquet_file(uri: str, f: Any, names: dict[str, str]) -> pq.ParquetFile:
    """Open a Parquet file and check the columns ``names`` asks for: present once, of a usable type."""
    try:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:  # no magic bytes, a damaged footer
        raise DataError(f"{uri}: not a Parquet file, or its footer is damaged ({e})") from None
    missing = [f"{role} column {col!r}" for role, col in names.items() if col not in schema.names]
    if missing:
        raise DataError(f"{uri}: {', '.join(missing)} not found (columns: {schema.names})")
    for role, col in names.items():
        if schema.names.count(col) > 1:
            raise DataError(f"{uri}: {role} column {col!r} appears {schema.names.count(col)} times")
        accepted, words = _PARQUET_TYPES[role]
        kind = schema.field(col).type
        if not any(ok(kind) for ok in accepted):
            raise DataError(f"{uri}: {role} column {col!r} has type {kind}; expected {words}")
    if pf.metadata.num_rows == 0:
        raise DataError(f"{uri}: no rows")
    return pf


def _parquet_column(uri: str, row: int, name: str, col: pa.Array) -> pa.Array:
    """One column of a batch as the readers' types: int64 ids (checked), float64 timestamp/rating."""
    if col.null_count:
        bad = int(np.argmax(pc.is_null(col).to_numpy(zero_copy_only=False)))
        raise DataError(f"{uri}, row {row + bad}: null {name}")
    if name in ("user", "item") and pa.types.is_integer(col.type):
        values = col.to_numpy()
        if (values < 0).any() or (values > 2**63 - 1).any():
            bad = int(np.argmax((values < 0) | (values > 2**63 - 1)))
            raise DataError(f"{uri}, row {row + bad}: {name} id {values[bad]} is not in [0, 2^63)")
        return pc.cast(col, pa.int64())
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.int64())  # its unit's ticks: only the order matters
    return pc.cast(col, pa.float64()) if name in ("timestamp", "rating") else col


def read_parquet(uri: str, columns: Columns = Columns(), id_type: str = "int",
                 batch_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Parquet, streamed by row groups; integer id columns are kept as int64, others per id_type."""
    names = _column_names(columns)
    with _open(uri) as f:
        pf = _parquet_file(uri, f, names)
        row = 0
        batches = pf.iter_batches(batch_size=batch_rows, columns=list(names.values()))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:  # a damaged page or row group
                raise DataError(f"{uri}, near row {row}: unreadable ({e})") from None
            batch = pa.record_batch({name: _parquet_column(uri, row, name, batch.column(col))
                                     for name, col in names.items()})
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
