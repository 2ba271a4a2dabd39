"""Dataset versions with stable ids: ``<run>/data/v0001``, ``v0002``, ... each a complete dataset
(``hetcomp prepare``'s parts, readable by :func:`hetcomp_dist.data.dataset.load_dataset`) plus:

- ``user_map.parquet`` / ``item_map.parquet``: append-only. Every original id keeps its index in
  every later version; ids first seen in a version get the next indices (in sorted order among
  themselves), so a version's tables are the previous version's tables with rows appended.
- ``events.parquet``: the rows this version added (dense user, item, timestamp), the lineage's data;
  a version's interactions are the events of every version up to it.
- ``meta.json`` (and the manifest's ``lineage``): which version it extends, the new data's URI and
  sha256, row counts (new, repeated pairs dropped), the time range and the holdout's cut.

Splits. The newest new rows (``refresh.holdout_fraction`` of them by time, or those within
``refresh.holdout_seconds`` of the newest) are the test split: the gate's fresh holdout, kept
only where the item occurs in train. Every other pair is valid or train by a hash of
(seed, user, item) < ``valid_fraction``: a pair keeps its label in every version, so a warm-started
model never saw a pair that is now valid (a previous holdout pair becomes train or valid).

Bad new data writes nothing and raises a one-line DataError: unreadable or empty, missing or
unknown columns, no timestamp, ids of another type than the run's, rows repeating rows of an
earlier version, timestamps older than the previous version's newest.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetcomp_dist import storage
from hetcomp_dist.data import prepare as prep
from hetcomp_dist.data.formats import Columns, DataError
from hetcomp_dist.refresh.config import NewDataConfig, RefreshConfig
from hetcomp_dist.refresh.layout import Layout, version_name

TRAIN, VALID, TEST = prep.TRAIN, prep.VALID, prep.TEST
_KNOWN_INTER = {"user_id", "item_id", "rating", "timestamp"}


# ----------------------------------------------------------------------------- reading new data

def read_new(uri: str, new: NewDataConfig, id_type: str | None = None) -> dict[str, Any]:
    """The rows of a new-data file: original ids (pa arrays), timestamps (float64), its sha256."""
    columns = Columns(new.user, new.item, new.timestamp)
    source, _ = prep.resolve_source(uri, new.format, columns, id_type or new.id_type, new.delimiter)
    if set(source.files) != {"interactions"}:
        raise DataError(f"{uri}: new data must be one interactions file (format {source.format} has no timestamps)")
    _check_columns(uri, source, new)
    raw = prep.read_source(source, progress=False, extras=("timestamp",))
    if raw.timestamp is None:
        raise DataError(f"{uri}: no timestamp column (refresh needs one: refresh.new_data.timestamp)")
    ts = raw.timestamp.astype(np.float64)
    if not np.isfinite(ts).all():
        raise DataError(f"{uri}, row {int(np.argmin(np.isfinite(ts))) + 1}: timestamp is not a finite number")
    return {"uri": uri, "user": raw.user_ids.take(pa.array(raw.user)), "item": raw.item_ids.take(pa.array(raw.item)),
            "timestamp": ts, "sha256": prep.source_sha256(source)["interactions"], "format": source.format,
            "id_type": source.id_type}


def _check_columns(uri: str, source: prep.Source, new: NewDataConfig) -> None:
    """Columns besides user, item, timestamp (and rating) are refused: a file of another schema."""
    fs, path = storage.filesystem(uri)
    if source.format == "parquet":
        try:
            with fs.open(path, "rb") as f:
                names = pq.ParquetFile(f).schema_arrow.names
        except Exception:  # noqa: BLE001 - the reader names the problem itself
            return
        known = {new.user, new.item, new.timestamp, "rating"}
    elif source.format in ("csv", "inter"):
        with fs.open(path, "rb") as f:
            line = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        delimiter = "\t" if source.format == "inter" else source.delimiter
        names = [n.strip().strip('"').split(":")[0] for n in line.split(delimiter)]
        known = _KNOWN_INTER if source.format == "inter" else {new.user, new.item, new.timestamp, "rating"}
    else:
        return
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"{uri}: unknown column(s) {unknown} (expected {sorted(known)}; "
                        "refresh.new_data names the user, item and timestamp columns)")


# ----------------------------------------------------------------------------- previous versions

def load_maps(uri: str) -> tuple[pa.Array, pa.Array]:
    """(user originals, item originals) of a data version: index i is the original at position i."""
    manifest = storage.read_manifest(uri)
    out = []
    for name in ("user_map.parquet", "item_map.parquet"):
        table = storage.read_table(uri, name, manifest=manifest).sort_by("index")
        out.append(table.column("original").combine_chunks())
    return out[0], out[1]


def load_events(layout: Layout, upto: int) -> dict[str, np.ndarray]:
    """Every version's added rows, versions 1..upto (user, item int32; timestamp float64)."""
    parts = {"user": [], "item": [], "timestamp": []}
    for v in range(1, upto + 1):
        table = storage.read_table(layout.data(v), "events.parquet")
        for key in parts:
            parts[key].append(table.column(key).to_numpy())
    return {k: (np.concatenate(v) if v else np.zeros(0, np.int32 if k != "timestamp" else np.float64))
            for k, v in parts.items()}


def read_meta(layout: Layout, version: int) -> dict[str, Any]:
    return storage.read_json(layout.data(version), "meta.json")


# ----------------------------------------------------------------------------- building a version

def _append_ids(uri: str, old: pa.Array | None, originals: pa.Array, what: str) -> tuple[np.ndarray, pa.Array]:
    """Dense indices of ``originals`` under the append-only map ``old``; the grown map."""
    if old is None or len(old) == 0:
        old = pa.array([], type=originals.type)
    if old.type != originals.type:
        raise DataError(f"{uri}: {what} ids are {originals.type}, the run's are {old.type} "
                        "(refresh.new_data.id_type)")
    index = pc.index_in(originals, value_set=old)
    missing = pc.is_null(index)
    fresh = pc.unique(originals.filter(missing))
    fresh = fresh.take(pc.sort_indices(fresh))
    grown = pa.concat_arrays([old, fresh])
    dense = pc.index_in(originals, value_set=grown).to_numpy(zero_copy_only=False).astype(np.int32)
    return dense, grown


def _stable_valid(user: np.ndarray, item: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Per pair, whether it is valid: splitmix64(seed, user, item) / 2^64 < fraction (the same in every version)."""
    x = (user.astype(np.uint64) << np.uint64(32)) | item.astype(np.uint64)
    x = x + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _check_against_old(uri: str, user: np.ndarray, item: np.ndarray, ts: np.ndarray,
                       old: dict[str, np.ndarray], last_ts: float, previous: str) -> None:
    """Rows repeating an earlier version's rows, or older than its newest row, are refused."""
    early = ts <= last_ts
    if not early.any():
        return
    old_keys = {(int(u), int(i), float(t)) for u, i, t in zip(old["user"], old["item"], old["timestamp"])
                if t >= ts[early].min()}
    repeats = [r for r in np.flatnonzero(early) if (int(user[r]), int(item[r]), float(ts[r])) in old_keys]
    if repeats:
        r = repeats[0]
        raise DataError(f"{uri}: {len(repeats)} row(s) repeat rows of {previous} (first: row {r + 1}, "
                        f"timestamp {ts[r]:g}); send only new interactions")
    older = np.flatnonzero(ts < last_ts)
    if older.size:
        r = int(older[0])
        raise DataError(f"{uri}, row {r + 1}: timestamp {ts[r]:g} is older than {previous}'s newest ({last_ts:g}); "
                        f"{older.size} row(s) are")


def _dedup_new(user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int):
    """The latest row of each (user, item) pair of the new data; the number of rows dropped."""
    key = user.astype(np.int64) * n_items + item
    order = np.lexsort((-ts, key))
    key = key[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    rows = order[first]
    return user[rows], item[rows], ts[rows], int(len(user) - len(rows))


def _holdout(ts: np.ndarray, cfg: RefreshConfig) -> tuple[np.ndarray, float]:
    """Which new rows are the holdout (the newest), and the cut: rows with timestamp >= cut."""
    if cfg.holdout_seconds > 0:
        cut = float(ts.max()) - cfg.holdout_seconds
        return ts > cut, cut
    n = max(1, math.ceil(cfg.holdout_fraction * len(ts)))
    cut = float(np.sort(ts)[len(ts) - n])
    return ts >= cut, cut


def build_version(layout: Layout, number: int, new: dict[str, Any], cfg: RefreshConfig) -> dict[str, Any]:
    """Write data version ``number`` = version ``number - 1`` (if any) + the rows ``new`` (:func:`read_new`).

    Everything is checked before the first byte is written; returns meta.json's content.
    """
    uri, previous = new["uri"], (number - 1 if number > 1 else None)
    old_users = old_items = None
    old = {"user": np.zeros(0, np.int32), "item": np.zeros(0, np.int32), "timestamp": np.zeros(0)}
    last_ts, prev_meta = -math.inf, None
    if previous is not None:
        prev_meta = read_meta(layout, previous)
        old_users, old_items = load_maps(layout.data(previous))
        old = load_events(layout, previous)
        last_ts = float(prev_meta["lineage"]["max_timestamp"])
    user, users_map = _append_ids(uri, old_users, new["user"], "user")
    item, items_map = _append_ids(uri, old_items, new["item"], "item")
    ts = new["timestamp"]
    if previous is not None:
        _check_against_old(uri, user, item, ts, old, last_ts, version_name(previous))
    n_users, n_items = len(users_map), len(items_map)
    user, item, ts, n_dup = _dedup_new(user, item, ts, n_items)
    old_keys = np.unique(old["user"].astype(np.int64) * n_items + old["item"])
    repeat = np.isin(user.astype(np.int64) * n_items + item, old_keys)
    user, item, ts = user[~repeat], item[~repeat], ts[~repeat]
    if len(user) == 0:
        raise DataError(f"{uri}: no new (user, item) pair: every row repeats an interaction the run already has")
    held, cut = _holdout(ts, cfg)
    splits = _split(old, user, item, held, n_users, n_items, cfg)
    lineage = {"version": version_name(number), "extends": None if previous is None else version_name(previous),
               "new_data": uri, "new_data_sha256": new["sha256"], "new_rows": int(len(new["timestamp"])),
               "added_pairs": int(len(user)), "duplicate_rows_dropped": n_dup,
               "repeated_pairs_dropped": int(repeat.sum()),
               "new_users": n_users - (0 if old_users is None else len(old_users)),
               "new_items": n_items - (0 if old_items is None else len(old_items)),
               "min_timestamp": float(ts.min()), "max_timestamp": float(ts.max()), "holdout_from": cut,
               "holdout_rows": int(held.sum())}
    return _write_version(layout.data(number), splits, users_map, items_map, (user, item, ts), lineage, new, cfg)


def _split(old: dict[str, np.ndarray], user: np.ndarray, item: np.ndarray, held: np.ndarray,
           n_users: int, n_items: int, cfg: RefreshConfig) -> dict[str, np.ndarray]:
    """Labels of every pair of the version: holdout -> test (if its item is in train), else valid/train by hash."""
    pool_u = np.concatenate([old["user"], user[~held]]).astype(np.int32)
    pool_i = np.concatenate([old["item"], item[~held]]).astype(np.int32)
    valid = _stable_valid(pool_u, pool_i, cfg.seed, cfg.valid_fraction)
    in_train = np.bincount(pool_i[~valid], minlength=n_items) > 0
    test_u, test_i = user[held], item[held]
    keep = in_train[test_i]
    return {"user": np.concatenate([pool_u, test_u[keep]]), "item": np.concatenate([pool_i, test_i[keep]]),
            "label": np.concatenate([np.where(valid, VALID, TRAIN).astype(np.int8),
                                     np.full(int(keep.sum()), TEST, np.int8)]),
            "unseen_test_dropped": int((~keep).sum()), "n_users": n_users, "n_items": n_items}


def _write_version(out: str, s: dict[str, Any], users_map: pa.Array, items_map: pa.Array,
                   events: tuple[np.ndarray, np.ndarray, np.ndarray], lineage: dict[str, Any],
                   new: dict[str, Any], cfg: RefreshConfig) -> dict[str, Any]:
    label, users = s["label"], s["user"]
    per_split = {name: int((label == code).sum()) for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST))}
    has = {name: np.bincount(users[label == code], minlength=s["n_users"]) > 0 for name, code in (("valid", VALID), ("test", TEST))}
    meta = {"source": lineage["new_data"], "format": new["format"], "id_type": new["id_type"],
            "protocol": {"name": "refresh", "holdout_fraction": cfg.holdout_fraction,
                         "holdout_seconds": cfg.holdout_seconds, "valid_fraction": cfg.valid_fraction,
                         "seed": cfg.seed},
            "n_users": s["n_users"], "n_items": s["n_items"], "n_interactions": int(len(label)),
            "n_interactions_kept": int(len(label)), "splits": per_split, "unseen_test_dropped": s["unseen_test_dropped"],
            "n_eval_users": {"valid": int(has["valid"].sum()), "test": int(has["test"].sum()),
                             "valid_and_test": int((has["valid"] & has["test"]).sum())},
            "item_ids": "dense int32, append-only across versions (see item_map.parquet)", "lineage": lineage}
    with storage.open_output(out, kind="dataset", config={"refresh": asdict(cfg), "lineage": lineage}) as o:
        for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
            mask = label == code
            o.write_table(f"{name}.parquet", pa.table({"user": s["user"][mask], "item": s["item"][mask]}),
                          row_group_size=prep.ROW_GROUP)
        for name, ids in (("user", users_map), ("item", items_map)):
            o.write_table(f"{name}_map.parquet", pa.table({"original": ids, "index": np.arange(len(ids), dtype=np.int32)}),
                          row_group_size=prep.ROW_GROUP)
        u, i, t = events
        o.write_table("events.parquet", pa.table({"user": u.astype(np.int32), "item": i.astype(np.int32), "timestamp": t}))
        o.write_json("meta.json", meta)
        o.extra["lineage"] = lineage
    return meta
