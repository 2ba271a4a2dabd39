"""Teacher trajectories: streamed snapshots, selection, crash/resume, shard reads (local disk and moto S3)."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hetcomp_dist import storage
from hetcomp_dist.storage import StorageError
from hetcomp_dist.teachers import trajectory as tj
from hetcomp_dist.teachers.trajectory import (
    TrajectoryReader, TrajectoryWriter, read_observed, read_trajectories, row_groups_for, select_snapshots,
)

N_ITEMS = 300


# ----------------------------------------------------------------------------- helpers

def topk(n_users: int, k: int, seed: int) -> np.ndarray:
    """Deterministic distinct top-k lists, int32 [n_users, k]; different seeds give different lists."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_users, N_ITEMS)), axis=1)[:, :k].astype(np.int32)


def batches(items: np.ndarray, size: int = 37):
    for s in range(0, len(items), size):
        yield np.arange(s, min(s + size, len(items)), dtype=np.int32), items[s:s + size]


def observed_lists(n_users: int, seed: int, max_len: int = 130) -> list[np.ndarray]:
    """Per user, a ranked list of 0..max_len distinct train items (some longer than 100)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, n_users)
    lengths[0] = 0
    return [rng.permutation(N_ITEMS)[:n].astype(np.int32) for n in lengths]


def observed_batches(lists: list[np.ndarray], size: int = 41):
    for s in range(0, len(lists), size):
        chunk = lists[s:s + size]
        width = max(1, max(len(x) for x in chunk))
        block = np.full((len(chunk), width), -1, np.int32)
        for i, x in enumerate(chunk):
            block[i, :len(x)] = x
        yield np.arange(s, s + len(chunk)), block


def observed_expected(lists: list[np.ndarray], width: int = 100) -> np.ndarray:
    out = np.full((len(lists), width), -1, np.int32)
    for i, x in enumerate(lists):
        out[i, :min(len(x), width)] = x[:width]
    return out


def files(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p[len(path) + 1:] for p in fs.find(path))


def snapshot_files(uri: str) -> list[str]:
    return [f for f in files(uri) if f.startswith("snapshots/")]


def progress(uri: str) -> dict:
    fs, path = storage.filesystem(storage.join(uri, tj.PROGRESS))
    return json.loads(fs.cat_file(path))


# ----------------------------------------------------------------------------- round trip

def test_round_trip_two_teachers(storage_root):
    n, k = 230, 8
    uris = [storage.join(storage_root, name) for name in ("mf", "lightgcn")]
    recalls = {2: 0.10, 4: 0.21, 6: 0.30, 8: 0.35, 10: 0.40, 12: 0.39}  # stages: 4, 6, 8, 10
    expected_traj = np.empty((n, 2, 4, k), np.int32)
    lists = []
    for t, uri in enumerate(uris):
        w = TrajectoryWriter(uri, model=["MF", "LightGCN"][t], n_users=n, k=k, n_items=N_ITEMS,
                             row_group_users=50, config={"dim": 64})
        for epoch, recall in recalls.items():
            w.write_snapshot(epoch, {"recall@20": recall, "ndcg@20": recall / 2}, batches(topk(n, k, 100 * t + epoch)))
        assert not storage.is_complete(uri)
        lists.append(observed_lists(n, seed=t))
        manifest = w.finish(observed_batches(lists[-1]))
        assert manifest["epochs"] == [4, 6, 8, 10]
        for s, epoch in enumerate([4, 6, 8, 10]):
            expected_traj[:, t, s] = topk(n, k, 100 * t + epoch)

        m = storage.read_manifest(uri)
        assert m["kind"] == "teacher-trajectory" and m["model"] == ["MF", "LightGCN"][t]
        assert m["k"] == k and m["observed_k"] == 100 and m["n_users"] == n and m["config"] == {"dim": 64}
        assert [p["metrics"]["recall@20"] for p in m["trajectory"]] == [0.21, 0.30, 0.35, 0.40]
        assert [h["epoch"] for h in m["history"]] == list(recalls)
        assert m["selection"]["best"] == 0.40 and m["selection"]["fractions"] == [0.5, 0.7, 0.85]
        # only the kept snapshots remain, each listed with its checksum; no temporary files
        assert sorted(snapshot_files(uri)) == sorted(p["part"] for p in m["trajectory"])
        assert all(set(m["parts"][p]) >= {"bytes", "sha256", "rows", "row_groups"} for p in m["parts"])
        assert sorted(files(uri)) == sorted([*m["parts"], "MANIFEST.json", "progress.json"])

    reader = TrajectoryReader(uris)
    reader.verify()  # sha256 of every part
    assert (reader.n_users, reader.n_teachers, reader.n_snapshots, reader.observed_k) == (n, 2, 4, 100)
    full = read_trajectories(uris, 0, n)
    assert full.dtype == torch.int32 and full.shape == (n, 2, 4, k)
    assert np.array_equal(full.numpy(), expected_traj)
    shard = read_trajectories(uris, 73, 161)
    assert np.array_equal(shard.numpy(), expected_traj[73:161])
    assert np.array_equal(reader.trajectories(73, 161, k=3).numpy(), expected_traj[73:161, :, :, :3])
    assert read_trajectories(uris, 5, 5).shape == (0, 2, 4, k)

    obs = read_observed(uris, 0, n)
    assert obs.dtype == torch.int32 and obs.shape == (n, 2, 100)
    for t in range(2):
        assert np.array_equal(obs[:, t].numpy(), observed_expected(lists[t]))
    assert (obs[0] == -1).all()  # a user with no train item: all padding
    assert np.array_equal(read_observed(uris, 100, 130).numpy(), obs[100:130].numpy())


def test_reads_only_row_groups_covering_the_shard(storage_root, monkeypatch):
    n, k = 1000, 10
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=100)
    for epoch, recall in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]:
        w.write_snapshot(epoch, {"recall@20": recall}, batches(topk(n, k, epoch), size=64))
    m = w.finish(observed_batches(observed_lists(n, 0)), fractions=(0.2, 0.45, 0.7))
    assert m["epochs"] == [1, 2, 3, 4]

    # the manifest's row-group index: aligned user ranges, and the Parquet statistics agree with it
    part = m["trajectory"][0]["part"]
    index = m["parts"][part]["row_groups"]
    assert index == [[a, a + 100] for a in range(0, n, 100)]
    fs, path = storage.filesystem(storage.join(uri, part))
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    assert meta.num_row_groups == 10
    for j, (a, b) in enumerate(index):
        stats = meta.row_group(j).column(0).statistics
        assert (stats.min, stats.max, meta.row_group(j).num_rows) == (a, b - 1, b - a)
    assert row_groups_for(index, 250, 420) == [2, 3, 4]
    assert row_groups_for(index, 300, 400) == [3]
    assert row_groups_for(index, 999, 1000) == [9]

    requested = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        requested.append(list(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    stats: dict = {}
    got = read_trajectories([uri], 250, 420, stats=stats)
    assert np.array_equal(got[:, 0, 0].numpy(), topk(n, k, 1)[250:420])
    assert requested == [[2, 3, 4]] * 4
    assert stats["parts_read"] == 4 and stats["row_groups_read"] == 12 and stats["row_groups_total"] == 40

    requested.clear()
    stats = {}
    read_observed([uri], 300, 400, stats=stats)
    assert requested == [[3]] and stats["row_groups_read"] == 1

    requested.clear()
    stats = {}
    final = TrajectoryReader([uri]).final(250, 420, k=5, stats=stats)   # the best (last kept) snapshot only
    assert final.shape == (170, 1, 5)
    assert m["trajectory"][-1]["epoch"] == 4
    assert np.array_equal(final[:, 0].numpy(), topk(n, k, 4)[250:420, :5])
    assert requested == [[2, 3, 4]] and stats["parts_read"] == 1


def test_partial_read_fetches_a_fraction_of_the_bytes(storage_root):
    n, k = 6000, 100
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=600, compression=None)
    w.write_snapshot(1, {"recall@20": 0.5}, batches(topk(n, k, 1), size=1000))
    m = w.finish(observed_batches(observed_lists(n, 0, max_len=5), size=1000))
    size = m["parts"][m["trajectory"][0]["part"]]["bytes"]
    stats: dict = {}
    read_trajectories([uri], 1200, 1800, stats=stats)  # one row group of ten, one distinct part
    assert stats["row_groups_read"] == 1
    # Parquet fetches the footer with one read of the file's last 64 KiB, then only that row group
    assert stats["bytes_read"] < 64 * 1024 + 1.5 * size / 10, (stats, size)
    assert stats["bytes_read"] < 0.4 * size, (stats, size)


def test_repeated_snapshot_is_read_once(storage_root):
    n, k = 120, 5
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=50)
    w.write_snapshot(1, {"recall@20": 0.9}, batches(topk(n, k, 1)))
    w.write_snapshot(2, {"recall@20": 1.0}, batches(topk(n, k, 2)))
    m = w.finish(observed_batches(observed_lists(n, 0)))
    assert m["epochs"] == [1, 1, 1, 2]
    assert len(snapshot_files(uri)) == 2
    stats: dict = {}
    got = read_trajectories([uri], 0, n, stats=stats).numpy()
    assert stats["parts_read"] == 2
    for s, epoch in enumerate([1, 1, 1, 2]):
        assert np.array_equal(got[:, 0, s], topk(n, k, epoch))


# ----------------------------------------------------------------------------- selection rule

H = {5: 0.10, 10: 0.30, 15: 0.50, 20: 0.55, 25: 0.60, 30: 0.58}


@pytest.mark.parametrize("history, fractions, expected", [
    (H, (0.5, 0.7, 0.85), [10, 15, 20, 25]),                     # thresholds .30 (equal counts) .42 .51
    ({5: 0.6, 10: 0.5, 15: 0.4}, (0.5, 0.7, 0.85), [5, 5, 5, 5]),  # best at the first evaluation
    ({5: 0.55, 10: 0.6}, (0.5, 0.7, 0.85), [5, 5, 5, 10]),        # first evaluation already past 0.85
    ({5: 0.3, 10: 0.6, 15: 0.6}, (0.5, 0.7, 0.85), [5, 10, 10, 10]),  # ties for best: the earliest
    ({5: 0.2, 10: 0.8, 15: 0.3}, (0.5, 0.7, 0.85), [10, 10, 10, 10]),  # never after the best
    ({0: 0.0, 1: 0.0}, (0.5, 0.7, 0.85), [0, 0, 0, 0]),           # all zero: the first
    ({3: 0.1, 1: 0.05, 2: 0.2, 4: 0.4}, (0.25, 0.5, 0.75), [2, 2, 4, 4]),  # given in any order; not monotone
    ({1: 0.1, 2: 0.3}, (), [2]),                                  # no fractions: only the best
    ({1: 0.1, 2: 0.3, 3: 0.2}, (1.0,), [2, 2]),
])
def test_select_snapshots(history, fractions, expected):
    hist = {e: {"recall@20": v, "ndcg@20": 0.0} for e, v in history.items()}
    assert select_snapshots(hist, fractions, "recall@20") == expected
    assert select_snapshots(list(hist.items())[::-1], fractions, "recall@20") == expected
    result = select_snapshots(hist, fractions)
    assert result == sorted(result) and len(result) == len(fractions) + 1


def test_select_snapshots_other_metric_and_missing_values():
    hist = [(1, {"recall@50": None}), (2, {"recall@50": 0.2}), (3, {"recall@50": math.nan}), (4, {"recall@50": 0.4})]
    assert select_snapshots(hist, (0.5, 0.7, 0.85), "recall@50") == [2, 4, 4, 4]


@pytest.mark.parametrize("history, fractions, message", [
    ({}, (0.5,), "empty history"),
    ({5: {"ndcg@20": 0.1}}, (0.5,), "epoch 5 has no metric 'recall@20'"),
    ([(5, {"recall@20": 0.1}), (5, {"recall@20": 0.2})], (0.5,), "duplicate epochs"),
    ({5: {"recall@20": 0.1}}, (0.7, 0.5), "strictly increasing"),
    ({5: {"recall@20": 0.1}}, (0.5, 0.5), "strictly increasing"),
    ({5: {"recall@20": 0.1}}, (0.0, 0.5), "in \\(0, 1\\]"),
    ({5: {"recall@20": 0.1}}, (0.5, 1.2), "in \\(0, 1\\]"),
    ({5: {"recall@20": math.nan}}, (0.5,), "no evaluation has a finite"),
    ({5: {"recall@20": -0.1}}, (0.5,), "must be >= 0"),
])
def test_select_snapshots_errors(history, fractions, message):
    with pytest.raises(ValueError, match=message):
        select_snapshots(history, fractions, "recall@20")


# ----------------------------------------------------------------------------- crashes and resume

def test_resume_after_crash_discards_snapshots_after_the_checkpoint(storage_root):
    n, k = 150, 6
    uri = storage.join(storage_root, "gnn")
    w = TrajectoryWriter(uri, model="LightGCN", n_users=n, k=k, row_group_users=40)
    old = {5: 0.20, 10: 0.30, 15: 0.45}
    for epoch, recall in old.items():
        w.write_snapshot(epoch, {"recall@20": recall}, batches(topk(n, k, epoch)))
    old15 = snapshot_files(uri)[-1]
    del w  # crash: the actor dies after epoch 15, its last checkpoint was epoch 10

    w2 = TrajectoryWriter.resume(uri, checkpoint_epoch=10)
    assert (w2.model, w2.n_users, w2.k) == ("LightGCN", n, k)
    assert w2.epochs == [5, 10]
    assert [e["epoch"] for e in progress(uri)["evaluations"]] == [5, 10]
    assert old15 not in snapshot_files(uri) and len(snapshot_files(uri)) == 2
    new = {15: 0.34, 20: 0.40}  # thresholds .20 .28 .34: stages 5, 10, 15, 20
    for epoch, recall in new.items():
        w2.write_snapshot(epoch, {"recall@20": recall}, batches(topk(n, k, 1000 + epoch)))
    m = w2.finish(observed_batches(observed_lists(n, 0)))

    assert [h["epoch"] for h in m["history"]] == [5, 10, 15, 20]
    assert m["epochs"] == [5, 10, 15, 20]
    assert m["trajectory"][2]["metrics"]["recall@20"] == 0.34
    assert len(snapshot_files(uri)) == 4 and old15 not in snapshot_files(uri)
    got = read_trajectories([uri], 0, n).numpy()[:, 0]
    for s, seed in enumerate([5, 10, 1015, 1020]):
        assert np.array_equal(got[:, s], topk(n, k, seed))
    TrajectoryReader([uri]).verify()


def test_rewriting_an_epoch_overwrites_it_and_drops_later_ones(storage_root):
    n, k = 60, 4
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k)
    for epoch in (5, 10, 15):
        w.write_snapshot(epoch, {"recall@20": epoch / 100}, batches(topk(n, k, epoch)))
    w.write_snapshot(10, {"recall@20": 0.5}, batches(topk(n, k, 77)))  # a resumed run, without resume()
    assert w.epochs == [5, 10] and len(snapshot_files(uri)) == 2
    w.write_snapshot(10, {"recall@20": 0.6}, batches(topk(n, k, 78)))  # the same epoch again
    assert w.history == [(5, {"recall@20": 0.05}), (10, {"recall@20": 0.6})]
    assert len(snapshot_files(uri)) == 2
    m = w.finish(observed_batches(observed_lists(n, 0)))
    assert m["epochs"] == [10, 10, 10, 10]  # 0.05 < 0.5 * 0.6
    assert np.array_equal(read_trajectories([uri], 0, n)[:, 0, 3].numpy(), topk(n, k, 78))


def test_crash_inside_a_snapshot_keeps_earlier_ones_and_shows_nothing_partial(storage_root):
    n, k = 200, 5
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=30)
    for epoch in (5, 10):
        w.write_snapshot(epoch, {"recall@20": epoch / 10}, batches(topk(n, k, epoch)))
    before = snapshot_files(uri)

    def dying():
        gen = batches(topk(n, k, 15))
        for _ in range(3):
            yield next(gen)
        raise RuntimeError("teacher killed mid-evaluation")

    with pytest.raises(RuntimeError, match="killed"):
        w.write_snapshot(15, {"recall@20": 2.0}, dying())
    assert snapshot_files(uri) == before
    assert w.epochs == [5, 10] and [e["epoch"] for e in progress(uri)["evaluations"]] == [5, 10]
    assert not storage.is_complete(uri)

    # a new process resuming from the epoch-10 checkpoint sees the same state
    w2 = TrajectoryWriter.resume(uri, checkpoint_epoch=10)
    assert w2.epochs == [5, 10]
    # a hard kill can leave an unreferenced file: finish removes it
    fs, path = storage.filesystem(storage.join(uri, "snapshots/epoch-000015-deadbeef.parquet"))
    fs.pipe_file(path, b"partial")
    m = w2.finish(observed_batches(observed_lists(n, 0)))
    assert m["epochs"] == [5, 10, 10, 10]
    assert snapshot_files(uri) == before
    got = read_trajectories([uri], 0, n).numpy()[:, 0]
    assert np.array_equal(got[:, 0], topk(n, k, 5)) and np.array_equal(got[:, 3], topk(n, k, 10))


def test_no_manifest_until_finish(storage_root):
    n, k = 50, 4
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k)
    w.write_snapshot(1, {"recall@20": 0.3}, batches(topk(n, k, 1)))
    assert not storage.is_complete(uri)
    with pytest.raises(StorageError, match="no MANIFEST.json"):
        read_trajectories([uri], 0, n)

    def failing_observed():
        yield from observed_batches(observed_lists(n, 0)[:20], size=20)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        w.finish(failing_observed())
    assert not storage.is_complete(uri)
    assert not [f for f in files(uri) if f.startswith("observed/")]
    w.finish(observed_batches(observed_lists(n, 0)))  # finish can be retried
    assert storage.is_complete(uri)
    with pytest.raises(StorageError, match="already finished"):
        w.write_snapshot(2, {"recall@20": 0.4}, batches(topk(n, k, 2)))
    # resuming a finished trajectory (the actor died before reporting) withdraws the manifest first
    w3 = TrajectoryWriter.resume(uri, checkpoint_epoch=0)
    assert not storage.is_complete(uri) and w3.epochs == []


def test_new_writer_refuses_an_existing_trajectory(storage_root):
    n, k = 20, 3
    uri = storage.join(storage_root, "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k)
    w.write_snapshot(1, {"recall@20": 0.3}, batches(topk(n, k, 1)))
    with pytest.raises(StorageError, match="resume"):
        TrajectoryWriter(uri, model="MF", n_users=n, k=k)
    with pytest.raises(StorageError, match="k=4"):
        TrajectoryWriter.resume(uri, 1, k=4)
    fresh = TrajectoryWriter(uri, model="MF", n_users=n, k=k, overwrite=True)
    assert fresh.epochs == [] and snapshot_files(uri) == []
    # resume where nothing was recorded yet (died before its first snapshot): a fresh writer
    other = storage.join(storage_root, "other")
    with pytest.raises(StorageError, match="no progress.json"):
        TrajectoryWriter.resume(other, 5)
    assert TrajectoryWriter.resume(other, 5, model="MF", n_users=n, k=k).epochs == []


# ----------------------------------------------------------------------------- validation

def _bad(users, items):
    def gen():
        yield from batches(topk(10, 4, 0)[:3], size=3)  # users 0..2
        yield np.asarray(users), np.asarray(items, np.int32)
    return gen()


@pytest.mark.parametrize("users, items, message", [
    ([4, 5], topk(2, 4, 1), "snapshot epoch 7: gap or out-of-order users: expected user 3, got 4"),
    ([2, 3], topk(2, 4, 1), "snapshot epoch 7: user 2 is duplicated or out of order"),
    ([3, 3], topk(2, 4, 1), "snapshot epoch 7: user 3 is duplicated or out of order"),
    ([4, 3], topk(2, 4, 1), "expected user 3, got 4"),
    ([3, 4], topk(2, 5, 1), "must have 4 columns"),
    ([3, 4], [[1, 2, 3, 4], [1, 2, 3, N_ITEMS]], f"user 4: item id >= n_items \\({N_ITEMS}\\)"),
    ([3, 4], [[1, 2, 3, 4], [1, -1, 3, 5]], "user 4: padding"),
    ([3, 4], [[1, 2, 3, -2], [1, 2, 3, 5]], "user 3: item ids must be >= 0"),
    ([3, 4], [[1, 2, 1, 4], [1, 2, 3, 5]], "user 3: an item appears twice"),
    ([3, 4, 5, 6, 7, 8, 9, 10], topk(8, 4, 1), "user 10 is out of range"),
    ([3, 4], topk(2, 4, 1), "users 5..9 are missing"),
])
def test_user_and_item_validation_names_the_snapshot(tmp_path, users, items, message):
    uri = str(tmp_path / "t")
    w = TrajectoryWriter(uri, model="MF", n_users=10, k=4, n_items=N_ITEMS, row_group_users=2)
    w.write_snapshot(3, {"recall@20": 0.1}, batches(topk(10, 4, 3)))
    with pytest.raises(ValueError, match=message):
        w.write_snapshot(7, {"recall@20": 0.2}, _bad(users, items))
    assert w.epochs == [3] and len(snapshot_files(uri)) == 1


def test_padding_at_the_end_is_accepted(tmp_path):
    uri = str(tmp_path / "t")
    w = TrajectoryWriter(uri, model="MF", n_users=2, k=4, observed_k=3)
    w.write_snapshot(1, {"recall@20": 0.1}, [(np.array([0, 1]), np.array([[3, 2, 1, 0], [5, 6, -1, -1]]))])
    w.finish([(np.array([0, 1]), np.array([[9, 8, 7, 6, 5], [-1, -1, -1, -1, -1]]))])
    assert read_trajectories([uri], 0, 2)[1, 0, 0].tolist() == [5, 6, -1, -1]
    assert read_observed([uri], 0, 2)[:, 0].tolist() == [[9, 8, 7], [-1, -1, -1]]


def test_reader_checks(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for uri, n, k in ((a, 40, 5), (b, 40, 7)):
        w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=16)
        w.write_snapshot(1, {"recall@20": 0.1}, batches(topk(n, k, 1)))
        w.finish(observed_batches(observed_lists(n, 0)))
    with pytest.raises(StorageError, match="different K"):
        read_trajectories([a, b], 0, 10)
    assert read_trajectories([a, b], 0, 10, k=5).shape == (10, 2, 4, 5)
    with pytest.raises(ValueError, match="not within"):
        read_trajectories([a], 30, 41)
    c = str(tmp_path / "c")
    w = TrajectoryWriter(c, model="MF", n_users=41, k=5)
    w.write_snapshot(1, {"recall@20": 0.1}, batches(topk(41, 5, 1)))
    w.finish(observed_batches(observed_lists(41, 0)))
    with pytest.raises(StorageError, match="disagree on n_users"):
        TrajectoryReader([a, c])

    # a corrupted data page (same size) fails the page checksum; verify() catches any change
    m = storage.read_manifest(a)
    part = m["trajectory"][0]["part"]
    path = tmp_path / "a" / part
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(0).column(1)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    pos = start + meta.total_compressed_size - 8  # inside the last data page of row group 0's items
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError):
        read_trajectories([a], 0, 10)
    with pytest.raises(StorageError, match="does not match the manifest"):
        TrajectoryReader([a]).verify()


# ----------------------------------------------------------------------------- bounded memory

def test_row_groups_are_written_as_batches_arrive(tmp_path, monkeypatch):
    events = []
    original = pq.ParquetWriter.write_table

    def spy(self, table, *args, **kwargs):
        events.append(("write", table.column("user")[0].as_py(), table.num_rows))
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy)
    n, k = 130, 4
    items = topk(n, k, 1)

    def arriving():
        for users, block in batches(items, size=25):
            events.append(("batch", int(users[0]), len(users)))
            yield users, block

    uri = str(tmp_path / "t")
    w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, row_group_users=50)
    record = w.write_snapshot(1, {"recall@20": 0.1}, arriving())
    assert events == [
        ("batch", 0, 25), ("batch", 25, 25), ("write", 0, 50),
        ("batch", 50, 25), ("batch", 75, 25), ("write", 50, 50),
        ("batch", 100, 25), ("batch", 125, 5), ("write", 100, 30),
    ]
    assert record["entry"]["row_groups"] == [[0, 50], [50, 100], [100, 130]]
    fs, path = storage.filesystem(storage.join(uri, record["part"]))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3


def test_writer_memory_does_not_grow_with_users(tmp_path):
    n, k, batch = 40_000, 100, 500
    payload = n * k * 4  # 16 MB if it were accumulated

    def arriving():
        for s in range(0, n, batch):
            users = np.arange(s, s + batch, dtype=np.int32)
            yield users, np.arange(k, dtype=np.int32)[None, :] + (users % 1000 * 100)[:, None]

    w = TrajectoryWriter(str(tmp_path / "t"), model="MF", n_users=n, k=k, row_group_users=2000)
    tracemalloc.start()
    try:
        record = w.write_snapshot(1, {"recall@20": 0.1}, arriving())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(record["entry"]["row_groups"]) == 20
    assert peak < payload / 4, (peak, payload)


def test_stored_list_scorer_reads_only_the_spans_of_its_users(tmp_path):
    """Sparse users in any order: the lists equal a whole read, and no read spans more than ``span`` users."""
    from hetcomp_dist.distill.objectives import StoredListScorer
    from hetcomp_dist.teachers.trajectory import TrajectoryReader

    n, k, uris = 2000, 10, []
    for t in range(2):
        uri = str(tmp_path / f"t{t}")
        w = TrajectoryWriter(uri, model="MF", n_users=n, k=k, n_items=N_ITEMS, row_group_users=100)
        for epoch in (1, 2):
            w.write_snapshot(epoch, {"recall@20": 0.1 * epoch}, batches(topk(n, k, 10 * t + epoch)))
        w.finish(observed_batches(observed_lists(n, seed=t)))
        uris.append(uri)
    reader = TrajectoryReader(uris)
    users = torch.tensor([1999, 3, 700, 3, 1500, 0, 701, 1200])
    for stage in (None, 0):
        scorer = StoredListScorer(reader, N_ITEMS, 10.0, stage=stage, span=300)
        spans = []
        read = scorer._read
        scorer._read = lambda lo, hi: spans.append((lo, hi)) or read(lo, hi)
        whole = reader.final(0, n) if stage is None else reader.lists_at(0, n, torch.zeros(n, 2, dtype=torch.long))
        assert torch.equal(scorer.lists(users), whole[users])
        assert max(hi - lo for lo, hi in spans) <= 300 and sum(hi - lo for lo, hi in spans) < 700, spans
        assert torch.equal(scorer(users), StoredListScorer(reader, N_ITEMS, 10.0, stage=stage, span=n)(users))
