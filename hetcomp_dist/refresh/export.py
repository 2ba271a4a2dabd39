"""Export for serving, per version: ``<run>/versions/vNNNN/export/``

    users.parquet      original (the run's id type), index int32, embedding list<float32>[dim]
    items.parquet      the same for items
    topk.parquet       user (original), items list<original>, scores list<float32>: each user's top-K,
                       every known interaction (train, valid, holdout) excluded; sorted by original user
                       id, row groups of ``ROW_GROUP_USERS`` users
    MANIFEST.json      written last; ``topk_index``: each row group's first and last original user id

:func:`recommend` reads the manifest, picks the one row group that can hold the user from the index
and reads only that row group (a ranged read on S3).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hetcomp_dist import storage
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.distill.student import ITEM_KEY, USER_KEY
from hetcomp_dist.storage import StorageError

ROW_GROUP_USERS = 1024
KIND = "refresh-export"


def _embeddings(originals: pa.Array, weight: torch.Tensor) -> pa.Table:
    dim = weight.shape[1]
    flat = pa.array(weight.detach().float().numpy().reshape(-1))
    return pa.table({"original": originals, "index": np.arange(len(originals), dtype=np.int32),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})


def _topk(state: dict[str, torch.Tensor], data: Dataset, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [B, k] (-1 where fewer are rankable) and scores [B, k] of ``users``, known items excluded."""
    u, items = state[USER_KEY].float(), state[ITEM_KEY].float()
    scores = u[torch.from_numpy(users)] @ items.T
    for split in (data.train, data.valid, data.test):
        row, col = split.rows(users)
        scores[torch.from_numpy(row), torch.from_numpy(col.astype(np.int64))] = -torch.inf
    k = min(k, data.n_items)
    top, idx = torch.topk(scores, k, dim=1)
    idx = torch.where(torch.isinf(top), torch.full_like(idx, -1), idx)
    return idx.numpy(), top.numpy()


def write_export(out: str, state: dict[str, torch.Tensor], data: Dataset, user_map: pa.Array, item_map: pa.Array,
                 k: int, version: str, batch_users: int = ROW_GROUP_USERS) -> dict[str, Any]:
    """Write the export of ``state`` (a student's weights) for the dataset version; returns its manifest."""
    order = np.asarray(user_map.to_numpy(zero_copy_only=False).argsort(kind="stable"))
    index = []
    with storage.open_output(out, kind=KIND, config={"version": version, "k": k}) as o:
        o.write_table("users.parquet", _embeddings(user_map, state[USER_KEY]))
        o.write_table("items.parquet", _embeddings(item_map, state[ITEM_KEY]))
        schema = pa.schema([("user", user_map.type), ("items", pa.list_(item_map.type)), ("scores", pa.list_(pa.float32()))])
        with o.parquet_writer("topk.parquet", schema) as writer:
            for lo in range(0, len(order), batch_users):
                users = order[lo:lo + batch_users].astype(np.int64)
                items, scores = _topk(state, data, users, k)
                keep = items >= 0
                lengths = keep.sum(1)
                offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
                originals = user_map.take(pa.array(users))
                table = pa.table({
                    "user": originals,
                    "items": pa.ListArray.from_arrays(offsets, item_map.take(pa.array(items[keep]))),
                    "scores": pa.ListArray.from_arrays(offsets, pa.array(scores[keep].astype(np.float32)))}, schema=schema)
                writer.write_table(table, row_group_size=len(users))
                index.append([originals[0].as_py(), originals[-1].as_py()])
        o.extra.update({"version": version, "k": k, "n_users": len(user_map), "n_items": len(item_map),
                        "dim": int(state[USER_KEY].shape[1]), "id_type": str(user_map.type), "topk_index": index})
    return storage.read_manifest(out)


def recommend(export_uri: str, user: str, k: int | None = None, stats: dict | None = None) -> list[tuple[Any, float]]:
    """The top-k (item original id, score) of ``user`` (an original id, as text) from an export.

    Reads the manifest and the one row group of topk.parquet whose range holds the user.
    """
    manifest = storage.read_manifest(export_uri)
    key: Any = user
    if manifest["id_type"] != "string" and manifest["id_type"] != "large_string":
        if not user.strip().isdigit():
            raise StorageError(f"user {user!r}: this run's user ids are integers")
        key = int(user)
    index = manifest["topk_index"]
    g = bisect.bisect_right([first for first, _ in index], key) - 1
    if g < 0 or key > index[g][1]:
        raise KeyError(user)
    with storage.parquet_file(export_uri, "topk.parquet", manifest) as pf:
        table = pf.read_row_group(g)
    if stats is not None:
        stats["row_groups_read"] = stats.get("row_groups_read", 0) + 1
        stats["row_groups_total"] = pf.metadata.num_row_groups
    users = table.column("user").to_pylist()
    pos = bisect.bisect_left(users, key)
    if pos >= len(users) or users[pos] != key:
        raise KeyError(user)
    items = table.column("items")[pos].as_py()
    scores = table.column("scores")[pos].as_py()
    n = len(items) if k is None else min(k, len(items))
    return list(zip(items[:n], scores[:n]))
