"""Per-worker slices of a prepared dataset: ``load_dataset(uri, users=(start, stop))`` reads only the row
groups that meet the users, holds only their rows, and answers every question about them as the whole
dataset does (global user indices, whole-split item counts, global interaction positions)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hetcomp_dist import storage
from hetcomp_dist.data import dataset as dataset_module
from hetcomp_dist.data import prepare as prepare_module
from hetcomp_dist.data.dataset import SPLITS, load_dataset
from hetcomp_dist.evaluate import evaluate_sums, topk_items

N_USERS, N_ITEMS = 90, 50


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A dataset prepared in row groups of 64 rows (many per split), and the same data whole."""
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(N_USERS), rng.integers(5, 25, N_USERS))
    items = rng.integers(0, N_ITEMS, len(users))
    pq.write_table(pa.table({"user": users, "item": items}), root / "log.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "ROW_GROUP", 64)
        prepare_module.prepare(str(root / "log.parquet"), str(root / "ds"), progress=False)
    return str(root / "ds")


def _check_slice(whole, part, start: int, stop: int) -> None:
    assert part.held_users == (start, stop) and part.n_users == whole.n_users
    for name in SPLITS:
        w, s = whole.split(name), part.split(name)
        assert s.n_users == w.n_users and s.held_users == (start, stop)
        assert s.first_nnz == w.indptr[start] and s.nnz == w.indptr[stop] - w.indptr[start]
        assert s.total_nnz == w.nnz
        assert np.array_equal(s.indices, w.indices[w.indptr[start]:w.indptr[stop]])
        assert np.array_equal(s.held_counts(), w.counts()[start:stop])
        counts = w.counts().copy()
        counts[:start], counts[stop:] = 0, 0
        assert np.array_equal(s.counts(), counts)
        assert np.array_equal(s.users(), w.users()[w.indptr[start]:w.indptr[stop]])
        users = np.arange(start, stop)
        assert np.array_equal(s.padded(users, width=30), w.padded(users, width=30))
        for a, b in zip(s.rows(users), w.rows(users)):
            assert np.array_equal(a, b)
    assert np.array_equal(part.train.item_counts(), whole.train.item_counts())     # the whole split's
    evaluated = whole.eval_users()
    assert np.array_equal(part.eval_users(), evaluated[(evaluated >= start) & (evaluated < stop)])


@pytest.mark.parametrize("users", [(0, N_USERS), (0, 1), (17, 55), (55, N_USERS), (40, 40)])
def test_slice_holds_exactly_its_users(prepared, users):
    whole = load_dataset(prepared)
    _check_slice(whole, load_dataset(prepared, users=users), *users)


def test_prepare_writes_user_sorted_row_groups_with_statistics(prepared):
    for name in SPLITS:
        with storage.parquet_file(prepared, f"{name}.parquet") as pf:
            meta = pf.metadata
            assert meta.num_row_groups > 1 and all(meta.row_group(g).num_rows <= 64 for g in range(meta.num_row_groups))
            bounds = [(meta.row_group(g).column(0).statistics.min, meta.row_group(g).column(0).statistics.max)
                      for g in range(meta.num_row_groups)]
            assert all(lo <= hi for lo, hi in bounds) and all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))
            users = pf.read(columns=["user"]).column("user").to_numpy()
            assert (np.diff(users) >= 0).all()


def test_slice_reads_only_the_row_groups_of_its_users(prepared, monkeypatch):
    """Rows (user and item columns) are read only for row groups meeting the slice; the others give
    their item column to train's item counts (and nothing at all for valid and test)."""
    read = []
    real = dataset_module._read

    def counting(pf, group, columns, where):
        read.append((where.rsplit("/", 1)[-1], tuple(columns)))
        return real(pf, group, columns, where)

    monkeypatch.setattr(dataset_module, "_read", counting)
    load_dataset(prepared, users=(40, 45))
    with storage.parquet_file(prepared, "train.parquet") as pf:
        groups = pf.metadata.num_row_groups
    rows_read = [r for r in read if r[1] == ("user", "item")]
    assert {name for name, _ in rows_read} == {f"{s}.parquet" for s in SPLITS}
    assert sum(name == "train.parquet" for name, _ in rows_read) <= 2 < groups
    assert all(name == "train.parquet" for name, columns in read if columns == ("item",))


def test_old_unsorted_parts_without_statistics_are_still_read_right(prepared, tmp_path):
    """A part written by another writer (shuffled rows, no statistics) is read whole, one row group at a
    time, and still gives the same slice."""
    manifest = storage.read_manifest(prepared)
    old = str(tmp_path / "old")
    rng = np.random.default_rng(5)
    with storage.open_output(old, kind="dataset", config=manifest.get("config")) as o:
        o.extra.update({k: manifest[k] for k in ("meta", "dataset") if k in manifest})
        for name in SPLITS:
            table = storage.read_table(prepared, f"{name}.parquet")
            table = table.take(pa.array(rng.permutation(table.num_rows)))
            with o.parquet_writer(f"{name}.parquet", table.schema, write_statistics=False) as writer:
                writer.write_table(table, row_group_size=50)
        o.write_bytes("meta.json", storage.read_bytes(prepared, "meta.json"))
    whole = load_dataset(prepared)
    assert np.array_equal(load_dataset(old).train.indices, whole.train.indices)
    _check_slice(whole, load_dataset(old, users=(17, 55)), 17, 55)


def test_evaluation_on_slices_adds_up_to_the_whole(prepared):
    """evaluate.py on each worker's slice (its own users), summed, equals the whole dataset's evaluation."""
    whole = load_dataset(prepared)
    gen = torch.Generator().manual_seed(0)
    user_emb, item_emb = torch.randn(N_USERS, 4, generator=gen), torch.randn(whole.n_items, 4, generator=gen)
    scorer = lambda users: user_emb[users] @ item_emb.T  # noqa: E731  (global users)

    def sums(data):
        return evaluate_sums(scorer, data.train, data.test, exclude=[data.valid], ks=(5, 10), users=data.eval_users())

    parts = [load_dataset(prepared, users=r) for r in ((0, 30), (30, 31), (31, N_USERS))]
    merged = sums(parts[0]).merge(sums(parts[1])).merge(sums(parts[2]))
    expected = sums(whole).metrics()
    for key, value in merged.metrics().items():
        assert value == pytest.approx(expected[key]), key
    top = topk_items(scorer, parts[2].train, users=np.arange(31, N_USERS), k=7)
    assert np.array_equal(top, topk_items(scorer, whole.train, users=np.arange(31, N_USERS), k=7))


def test_a_slice_refuses_users_it_does_not_hold(prepared):
    part = load_dataset(prepared, users=(10, 20))
    with pytest.raises(ValueError, match=r"user 20 is not held \(this object holds users \[10, 20\)\)"):
        part.train.padded(np.array([12, 20]))
    with pytest.raises(ValueError, match="user 9 is not held"):
        part.train.items_of(9)
    with pytest.raises(ValueError, match="not within"):
        load_dataset(prepared, users=(5, N_USERS + 1))
