"""``hetcomp prepare``: raw interactions -> train / valid / test Parquet with dense int32 ids.

All steps are vectorised over numpy / pyarrow arrays (no loop over rows or users), so 50M
interactions fit in a few GB: ids are hashed to compact codes while reading, pairs are
deduplicated by sorting one int64 key, and splits are decided per row from per-user ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from hetcomp_dist import lease, lineage, storage
from hetcomp_dist.data import formats, registry
from hetcomp_dist.data.formats import Columns, DataError

TRAIN, VALID, TEST = 0, 1, 2
PROTOCOLS = ("hetcomp", "given-test", "leave-last-out")
ROW_GROUP = 1 << 20


@dataclass(frozen=True)
class Protocol:
    """How interactions become splits. Defaults per name come from :func:`default_protocol`."""

    name: str
    seed: int = 0
    min_user_items: int = 1
    valid_fraction: float = 0.2   # hetcomp: floor(f*n) per user; given-test: ceil(f*n), kept < n
    test_fraction: float = 0.2    # hetcomp only
    drop_unseen: bool = True      # drop valid/test items that never occur in train
    rating_threshold: float | None = None  # keep rows with rating >= threshold


def default_protocol(name: str, **overrides: Any) -> Protocol:
    defaults = {
        "hetcomp": dict(min_user_items=5, valid_fraction=0.2, test_fraction=0.2, drop_unseen=True),
        "given-test": dict(min_user_items=1, valid_fraction=0.1, drop_unseen=False),
        "leave-last-out": dict(min_user_items=1, drop_unseen=True),
    }
    if name not in defaults:
        raise DataError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    values = {**defaults[name], **{k: v for k, v in overrides.items() if v is not None}}
    return Protocol(name=name, **values)


@dataclass(frozen=True)
class Source:
    """What to read: one interactions file, or (train, test) files for the given-test protocol."""

    format: str
    files: dict[str, str]  # role ("interactions" | "train" | "test") -> URI
    columns: Columns = Columns()
    id_type: str = "int"
    delimiter: str = ","


def resolve_source(name_or_path: str, fmt: str | None = None, columns: Columns = Columns(),
                   id_type: str | None = None, delimiter: str = ",") -> tuple[Source, str]:
    """Map a registry name or a path/URI to a Source and its default protocol name."""
    if name_or_path in registry.REGISTRY:
        spec = registry.REGISTRY[name_or_path]
        folder = registry.fetch(name_or_path)
        files = {f.name: str(folder / f.name) for f in spec.files}
        if spec.format == "lightgcn":
            files = {"train": files["train.txt"], "test": files["test.txt"]}
        else:
            files = {"interactions": next(iter(files.values()))}
        id_type = id_type or ("str" if spec.format == "inter" else "int")
        return Source(spec.format, files, id_type=id_type), spec.protocol
    fs, path = storage.filesystem(name_or_path)
    if fs.isdir(path):
        if fs.exists(f"{path}/train.txt") and fs.exists(f"{path}/test.txt"):
            fmt = fmt or "lightgcn"
            files = {"train": storage.join(name_or_path, "train.txt"), "test": storage.join(name_or_path, "test.txt")}
            return Source(fmt, files, columns, id_type or "int", delimiter), "given-test"
        if fs.exists(f"{path}/users.dat"):
            return resolve_source(storage.join(name_or_path, "users.dat"), fmt, columns, id_type, delimiter)
        raise DataError(f"{name_or_path}: a directory without train.txt/test.txt or users.dat")
    if not fs.exists(path):
        raise DataError(f"{name_or_path}: no such file, directory or registered dataset "
                        f"(known: {', '.join(sorted(registry.REGISTRY))})")
    fmt = fmt or _guess_format(name_or_path)
    if fmt not in formats.FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(formats.FORMATS)}")
    if id_type is None:
        id_type = "str" if fmt == "inter" else "int"
    protocol = "hetcomp" if fmt in ("citeulike", "csv", "parquet") else "leave-last-out"
    return Source(fmt, {"interactions": str(name_or_path)}, columns, id_type, delimiter), protocol


def _guess_format(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix, fmt in ((".dat", "citeulike"), (".inter", "inter"), (".csv", "csv"), (".tsv", "csv"),
                        (".parquet", "parquet"), (".txt", "lightgcn")):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{uri}: cannot tell the format from the name; pass --format ({', '.join(formats.FORMATS)})")


def _batches(source: Source, uri: str) -> Iterator[pa.RecordBatch]:
    if source.format == "citeulike":
        return formats.read_citeulike(uri)
    if source.format == "lightgcn":
        return formats.read_lightgcn(uri)
    if source.format == "inter":
        return formats.read_inter(uri, source.id_type)
    if source.format == "csv":
        return formats.read_csv(uri, source.columns, source.id_type, source.delimiter)
    return formats.read_parquet(uri, source.columns, source.id_type)


@dataclass
class Raw:
    """Interactions as compact codes: user/item int32 index into the sorted original ids."""

    user: np.ndarray
    item: np.ndarray
    user_ids: pa.Array
    item_ids: pa.Array
    origin: np.ndarray | None = None     # TRAIN / TEST per row for given-test sources
    timestamp: np.ndarray | None = None
    rating: np.ndarray | None = None


def read_source(source: Source, progress: bool = True, extras: tuple[str, ...] = ("timestamp", "rating")) -> Raw:
    """Read all files of a source into compact codes (ids hashed per column, then sorted).

    Only the optional columns named in ``extras`` are kept (each costs 8 bytes per row).
    """
    users, items, origin = [], [], []
    extra: dict[str, list[np.ndarray]] = {name: [] for name in extras}
    with tqdm(desc="reading", unit=" rows", disable=not progress or None, unit_scale=True) as bar:
        for role, uri in source.files.items():
            n_before = sum(len(u) for u in users)
            for batch in _batches(source, uri):
                users.append(batch.column("user"))
                items.append(batch.column("item"))
                for name in extra:
                    if name in batch.schema.names:
                        extra[name].append(batch.column(name).to_numpy())
                bar.update(batch.num_rows)
            n_rows = sum(len(u) for u in users) - n_before
            if n_rows == 0:
                raise DataError(f"{uri}: no interactions")
            origin.append(np.full(n_rows, TEST if role == "test" else TRAIN, dtype=np.int8))
    user, user_ids = _codes(users)
    del users
    item, item_ids = _codes(items)
    del items
    cat = {k: np.concatenate(v) if v else None for k, v in extra.items()}
    return Raw(user, item, user_ids, item_ids, np.concatenate(origin) if len(origin) > 1 else None, **cat)


def _codes(chunks: list[pa.Array]) -> tuple[np.ndarray, pa.Array]:
    """Hash-encode id chunks: int32 codes into the sorted distinct ids."""
    column = pa.chunked_array(chunks)
    distinct = pc.unique(column)
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = pc.index_in(column, value_set=distinct)
    return codes.to_numpy().astype(np.int32, copy=False), distinct


def _ranks(user: np.ndarray, order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """0-based rank of each row of ``order`` within its user, for rows sorted by user first."""
    starts = np.cumsum(counts) - counts
    return np.arange(len(order), dtype=np.int64) - starts[user[order]]


def _dedup(raw: Raw) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Unique (user, item) pairs sorted by user then item, with their timestamp and origin.

    Duplicates keep the train-file row over the test-file one, then the latest timestamp. With no
    timestamp or origin the pairs are sorted in place as one int64 key (no index arrays), which
    keeps 50M rows within a few GB.
    """
    n_items = len(raw.item_ids)
    key = raw.user.astype(np.int64) * n_items + raw.item
    if raw.timestamp is None and raw.origin is None:
        key.sort()
        first = np.empty(len(key), dtype=bool)
        first[0], first[1:] = True, key[1:] != key[:-1]
        key = key[first]
        return (key // n_items).astype(np.int32), (key % n_items).astype(np.int32), None, None
    tiebreak = [x for x in (None if raw.timestamp is None else -raw.timestamp, raw.origin) if x is not None]
    order = np.lexsort((*tiebreak, key))
    key = key[order]
    first = np.empty(len(key), dtype=bool)
    first[0], first[1:] = True, key[1:] != key[:-1]
    rows = order[first]
    pick = (lambda x: None if x is None else x[rows])
    return raw.user[rows], raw.item[rows], pick(raw.timestamp), pick(raw.origin)


def split(raw: Raw, protocol: Protocol) -> dict[str, Any]:
    """Filter, deduplicate, remap and split. Returns users/items (int32), split labels and maps."""
    if protocol.name == "leave-last-out" and raw.timestamp is None:
        raise DataError("protocol leave-last-out needs a timestamp column (none in the input)")
    if protocol.name == "given-test" and raw.origin is None:
        raise DataError("protocol given-test needs separate train and test files")
    if protocol.rating_threshold is not None:
        if raw.rating is None:
            raise DataError("rating_threshold given but the input has no rating column")
        keep = raw.rating >= protocol.rating_threshold
        raw = dataclasses.replace(raw, user=raw.user[keep], item=raw.item[keep], rating=None,
                                  **{k: None if getattr(raw, k) is None else getattr(raw, k)[keep]
                                     for k in ("timestamp", "origin")})
        if len(raw.user) == 0:
            raise DataError(f"no interaction has rating >= {protocol.rating_threshold}")
    user_ids, item_ids = raw.user_ids, raw.item_ids
    user, item, timestamp, origin = _dedup(raw)
    del raw

    # Keep users with enough items (one pass), then give dense ids in sorted original-id order.
    counts = np.bincount(user, minlength=len(user_ids))
    kept_user = counts >= protocol.min_user_items
    if not kept_user.all():
        mask = kept_user[user]
        user, item = user[mask], item[mask]
        timestamp = None if timestamp is None else timestamp[mask]
        origin = None if origin is None else origin[mask]
    if len(user) == 0:
        raise DataError(f"no user has >= {protocol.min_user_items} items")
    used_item = np.bincount(item, minlength=len(item_ids)) > 0
    user = (np.cumsum(kept_user, dtype=np.int64) - 1).astype(np.int32)[user]
    item = (np.cumsum(used_item, dtype=np.int64) - 1).astype(np.int32)[item]
    n_users, n_items = int(kept_user.sum()), int(used_item.sum())

    label = _labels(user, item, timestamp, origin, protocol)
    n_interactions = len(user)
    if protocol.drop_unseen:
        in_train = np.bincount(item[label == TRAIN], minlength=n_items) > 0
        mask = (label == TRAIN) | in_train[item]
        user, item, label = user[mask], item[mask], label[mask]
    has = {name: np.bincount(user[label == s], minlength=n_users) > 0 for name, s in (("valid", VALID), ("test", TEST))}
    evaluable = {name: int(h.sum()) for name, h in has.items()}
    evaluable["valid_and_test"] = int((has["valid"] & has["test"]).sum())
    if evaluable["valid_and_test"] == 0:
        raise DataError(f"protocol {protocol.name} leaves no evaluable user (none has both a valid and a test item)")
    return dict(user=user, item=item, label=label, n_users=n_users, n_items=n_items,
                n_interactions=n_interactions, evaluable=evaluable,
                user_ids=user_ids.filter(pa.array(kept_user)), item_ids=item_ids.filter(pa.array(used_item)))


def _labels(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray | None, origin: np.ndarray | None,
            protocol: Protocol) -> np.ndarray:
    """TRAIN / VALID / TEST per row (rows sorted by user), decided from each row's rank within its user."""
    n = len(user)
    label = np.full(n, TRAIN, dtype=np.int8)
    counts = np.bincount(user)
    rng = np.random.default_rng(protocol.seed)
    if protocol.name == "hetcomp":
        # Per user: shuffle, test = first floor(0.2 n), valid = next floor(0.2 n), train = rest.
        # One int64 sort key (user, random 32 bits) shuffles within users without a lexsort.
        order = np.argsort((user.astype(np.int64) << 32) | rng.integers(0, 1 << 32, n, dtype=np.int64))
        rank = _ranks(user, order, counts)
        n_test = np.floor(protocol.test_fraction * counts).astype(np.int64)[user[order]]
        n_valid = np.floor(protocol.valid_fraction * counts).astype(np.int64)[user[order]]
        label[order] = np.where(rank < n_test, TEST, np.where(rank < n_test + n_valid, VALID, TRAIN))
    elif protocol.name == "given-test":
        # The test file stays as it is; carve ceil(f * n) of each user's train rows (at least one kept).
        label[origin == TEST] = TEST
        train_rows = np.flatnonzero(origin == TRAIN)
        tu = user[train_rows]
        n_train = np.bincount(tu, minlength=len(counts))
        n_valid = np.minimum(np.ceil(protocol.valid_fraction * n_train), np.maximum(n_train - 1, 0)).astype(np.int64)
        order = np.lexsort((rng.random(len(tu)), tu))
        rank = _ranks(tu, order, n_train)
        label[train_rows[order[rank < n_valid[tu[order]]]]] = VALID
    else:
        # leave-last-out: latest -> test, second latest -> valid (users with >= 3 items; 2 -> test only).
        order = np.lexsort((item, timestamp, user))
        rank = _ranks(user, order, counts)
        n_u = counts[user[order]]
        from_end = n_u - 1 - rank
        label[order] = np.where((from_end == 0) & (n_u >= 2), TEST,
                                np.where((from_end == 1) & (n_u >= 3), VALID, TRAIN))
    return label


def source_sha256(source: Source) -> dict[str, str]:
    digests = {}
    for role, uri in source.files.items():
        fs, path = storage.filesystem(uri)
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        digests[role] = h.hexdigest()
    return digests


def prepare(name_or_path: str, out: str, protocol: str | None = None, fmt: str | None = None,
            columns: Columns = Columns(), id_type: str | None = None, delimiter: str = ",",
            progress: bool = True, **protocol_options: Any) -> dict[str, Any]:
    """Prepare a dataset and write it under ``out``; returns meta.json's content.

    Everything is validated before the first byte is written, so bad input writes nothing; an
    output location that cannot be written is refused before the input is read. One writer at a
    time: ``out``'s lease (:mod:`hetcomp_dist.lease`) is held from before the input is read until the
    manifest is committed (LeaseHeld if another live writer has it). Everything a reader trusts is
    in the manifest: the parts with their sha256, meta.json's content (``meta``) and the dataset's
    identity (``dataset``, :mod:`hetcomp_dist.lineage`).
    """
    storage.check_writable(out)
    source, default = resolve_source(name_or_path, fmt, columns, id_type, delimiter)
    proto = default_protocol(protocol or default, **protocol_options)
    with lease.hold(out, sweep=True):
        return _prepare(name_or_path, out, source, proto, fmt, columns, progress)


def _prepare(name_or_path: str, out: str, source: Source, proto: Protocol, fmt: str | None, columns: Columns,
             progress: bool) -> dict[str, Any]:
    """Read, split and write (under the lease)."""
    extras = tuple(name for name, needed in (("timestamp", proto.name == "leave-last-out"),
                                             ("rating", proto.rating_threshold is not None)) if needed)
    raw = read_source(source, progress, extras)
    result = split(raw, proto)
    del raw
    label = result["label"]
    per_split = {name: int((label == s).sum()) for name, s in (("train", TRAIN), ("valid", VALID), ("test", TEST))}
    meta = {
        "source": name_or_path, "format": source.format, "files": source.files,
        "source_sha256": source_sha256(source),
        "protocol": dataclasses.asdict(proto), "seed": proto.seed,
        "n_users": result["n_users"], "n_items": result["n_items"],
        "n_interactions": result["n_interactions"], "n_interactions_kept": int(len(label)),
        "splits": per_split, "n_eval_users": result["evaluable"],
        "item_ids": "dense int32 in sorted order of the original ids (see item_map.parquet)",
    }
    config = {"input": name_or_path, "format": fmt, "protocol": dataclasses.asdict(proto),
              "columns": dataclasses.asdict(columns), "id_type": source.id_type}
    with storage.open_output(out, kind="dataset", config=config) as output:
        output.extra.update(meta=meta, dataset=lineage.identity_of(meta))
        for name, s in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
            mask = label == s
            write_split(output, f"{name}.parquet", result["user"][mask], result["item"][mask])
        for name, ids in (("user", result["user_ids"]), ("item", result["item_ids"])):
            table = pa.table({"original": ids, "index": np.arange(len(ids), dtype=np.int32)})
            output.write_table(f"{name}_map.parquet", table, row_group_size=ROW_GROUP)
        output.write_json("meta.json", meta)
    return meta


def write_split(output: storage.Output, name: str, user: np.ndarray, item: np.ndarray) -> None:
    """One split as Parquet sorted by user, in row groups of at most ROW_GROUP rows with the ``user``
    column's statistics and page checksums: a worker that needs only a range of users reads only the
    row groups whose statistics meet it, and can check those pages without reading the whole part
    (data/dataset.py, ``load_dataset(uri, users=...)``)."""
    if len(user) > 1 and (np.diff(user) < 0).any():      # split() yields user order; keep it so if that changes
        order = np.argsort(user, kind="stable")
        user, item = user[order], item[order]
    table = pa.table({"user": user, "item": item})
    with output.parquet_writer(name, table.schema, write_statistics=True, write_page_checksum=True) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)


def _defaults(name_or_path: str, fmt: str | None) -> tuple[str | None, str | None]:
    """(format, protocol name) a source is prepared with by default, without reading it; None where unknown."""
    if name_or_path in registry.REGISTRY:
        spec = registry.REGISTRY[name_or_path]
        return spec.format, spec.protocol
    try:
        source, protocol = resolve_source(name_or_path, fmt)
    except (DataError, storage.StorageError, OSError):
        return fmt, None                    # the source is gone: compare only what is asked explicitly
    return source.format, protocol


def _same_source(a: Any, b: Any) -> bool:
    if a == b:
        return True
    local = lambda x: isinstance(x, str) and ("://" not in x or x.startswith("file://"))  # noqa: E731
    return local(a) and local(b) and storage.filesystem(a)[1] == storage.filesystem(b)[1]


def check_settings(uri: str, source: str, protocol: str | None, fmt: str | None, seed: int) -> None:
    """Refuse (one-line StorageError naming the stored and the asked settings) to reuse the complete dataset at
    ``uri`` for other data settings (source, protocol, seed, format): a run never silently keeps a dataset
    prepared another way. Defaults (protocol/format None) are resolved as :func:`prepare` would."""
    identity = lineage.dataset_identity(uri)
    stored_protocol = identity.get("protocol") or {}
    stored = {"source": identity.get("source"), "protocol": stored_protocol.get("name"),
              "seed": identity.get("seed", stored_protocol.get("seed")), "format": identity.get("format")}
    default_format, default_protocol_name = _defaults(source, fmt)
    asked = {"source": source, "protocol": protocol or default_protocol_name, "seed": seed,
             "format": fmt or default_format}
    differs = [k for k in stored if asked[k] is not None and not (
        _same_source(stored[k], asked[k]) if k == "source" else stored[k] == asked[k])]
    if differs:
        show = lambda d: ", ".join(f"{k}={d[k]!r}" for k in ("source", "protocol", "seed", "format"))  # noqa: E731
        raise storage.StorageError(
            f"{uri}: this run's dataset was prepared with {show(stored)}, but the config asks for {show(asked)} "
            f"({', '.join(differs)} differ): use another run location, or remove {uri} to prepare it again")


def describe(meta: dict[str, Any]) -> str:
    s = meta["splits"]
    return (f"{meta['source']}: {meta['n_users']:,} users, {meta['n_items']:,} items, "
            f"{meta['n_interactions']:,} interactions; train {s['train']:,} / valid {s['valid']:,} / "
            f"test {s['test']:,}; evaluated users (a valid and a test item) "
            f"{meta['n_eval_users']['valid_and_test']:,}")


def protocol_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(Protocol) if f.name != "name"]

