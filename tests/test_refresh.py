"""The nightly refresh's pieces without training: data versions, growth, the gate, the pointer, the export."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetcomp_dist import storage
from hetcomp_dist.data.dataset import load_dataset
from hetcomp_dist.data.formats import DataError
from hetcomp_dist.distill.student import ITEM_KEY, USER_KEY
from hetcomp_dist import lease as leases
from hetcomp_dist.refresh import export, gate, grow, job, promote, versions
from hetcomp_dist.refresh.config import GateConfig, RefreshConfig
from hetcomp_dist.refresh.layout import Layout

REPO = Path(__file__).resolve().parents[1]
CFG = RefreshConfig(holdout_fraction=0.3, valid_fraction=0.2)


def _csv(path: Path, rows, header="user,item,timestamp") -> str:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def _day(rng, users, items, t0, n=300):
    return [(int(rng.choice(users)), int(rng.choice(items)), t0 + k) for k in range(n)]


@pytest.fixture
def days(tmp_path):
    rng = np.random.default_rng(0)
    first = _day(rng, np.arange(100, 140), np.arange(1000, 1060), 1_000, 2000)
    second = _day(rng, np.arange(100, 150), np.arange(1000, 1070), 10_000, 400)   # 10 new users, 10 new items
    return _csv(tmp_path / "d1.csv", first), _csv(tmp_path / "d2.csv", second), first, second


def test_versions_keep_ids_and_record_lineage(storage_root, days):
    d1, d2, first, second = days
    layout = Layout(storage_root)
    m1 = versions.build_version(layout, 1, versions.read_new(d1, CFG.new_data), CFG)
    m2 = versions.build_version(layout, 2, versions.read_new(d2, CFG.new_data), CFG)
    assert layout.data_versions() == [1, 2]
    u1, i1 = versions.load_maps(layout.data(1))
    u2, i2 = versions.load_maps(layout.data(2))
    assert u2.slice(0, len(u1)).equals(u1) and i2.slice(0, len(i1)).equals(i1)       # append-only
    assert set(u2.to_pylist()[len(u1):]).isdisjoint(u1.to_pylist())
    lin = m2["lineage"]
    assert lin["extends"] == "v0001" and lin["version"] == "v0002" and m1["lineage"]["extends"] is None
    assert lin["new_data_sha256"] == versions.read_new(d2, CFG.new_data)["sha256"]
    assert storage.read_manifest(layout.data(2))["lineage"] == lin
    data = load_dataset(layout.data(2))
    assert data.n_users == len(u2) and data.n_items == len(i2)
    # The holdout is the newest of the new rows: every test pair is from day 2's last 30%.
    ts = {(u, i): t for u, i, t in second}
    test_pairs = [(u2[u].as_py(), i2[i].as_py()) for u in range(data.n_users) for i in data.test.items_of(u)]
    assert test_pairs and all(ts[p] >= lin["holdout_from"] for p in test_pairs)
    # A pair's train/valid label never changes between versions.
    d1v = load_dataset(layout.data(1))
    valid1 = {(u, int(i)) for u in range(d1v.n_users) for i in d1v.valid.items_of(u)}
    train2 = {(u, int(i)) for u in range(data.n_users) for i in data.train.items_of(u)}
    assert not valid1 & train2


@pytest.mark.parametrize("case", ["empty", "columns", "unknown", "older", "repeat", "no_ts"])
def test_bad_new_data_is_one_line_and_writes_nothing(tmp_path, days, case):
    d1, _, first, _ = days
    layout = Layout(str(tmp_path / "run"))
    versions.build_version(layout, 1, versions.read_new(d1, CFG.new_data), CFG)
    path = tmp_path / f"{case}.csv"
    if case == "empty":
        path.write_text("")
    elif case == "columns":
        _csv(path, [(1, 2, 3)], header="who,what,when")
    elif case == "unknown":
        _csv(path, [(1, 2, 5000, 7)], header="user,item,timestamp,price")
    elif case == "older":
        _csv(path, [(100, 1000, 1500)])
    elif case == "repeat":
        _csv(path, first[-5:])
    else:
        _csv(path, [(1, 2)], header="user,item")
    with pytest.raises(DataError) as err:
        versions.build_version(layout, 2, versions.read_new(str(path), CFG.new_data), CFG)
    assert "\n" not in str(err.value)
    assert {"repeat": "repeat rows", "older": "older than"}.get(case, "") in str(err.value)
    assert layout.data_versions() == [1] and not storage.exists(layout.data(2))
    if case not in ("older", "unknown"):   # the command: exit 2 and one line (two cases: each starts Python)
        return
    cfg = tmp_path / "c.yaml"
    cfg.write_text((REPO / "configs" / "refresh_tiny.yaml").read_text())
    out = subprocess.run([sys.executable, "-m", "hetcomp_dist.cli", "refresh", "--config", str(cfg), "--set",
                          f"run={layout.run}", "--new-data", str(path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error" in out.stderr, out.stderr


def test_grow_state_keeps_old_rows_and_inits_new_ones():
    old = {"t": torch.arange(6.).view(3, 2), "b": torch.ones(3), "w": torch.full((2, 2), 5.)}
    fresh = {"t": torch.zeros(5, 2) - 1, "b": torch.zeros(4), "w": torch.zeros(2, 2), "new": torch.zeros(1)}
    grown, untouched = grow.grow_state(old, fresh)
    assert torch.equal(grown["t"][:3], old["t"]) and torch.equal(grown["t"][3:], fresh["t"][3:])
    assert torch.equal(grown["b"], torch.tensor([1., 1., 1., 0.])) and torch.equal(grown["w"], old["w"])
    assert untouched == ["new"]


def _state(n_users, n_items, dim=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {USER_KEY: torch.randn(n_users, dim, generator=g) * scale, ITEM_KEY: torch.randn(n_items, dim, generator=g)}


def test_gate_decisions():
    cfg = GateConfig(metrics=["recall@20"], tolerance=0.1, min_coverage=0.1)
    good = {"finite": True, "n_users": 10, "metrics": {"recall@20": 0.30, "coverage@50": 0.5}}
    prod = {"finite": True, "n_users": 10, "metrics": {"recall@20": 0.32, "coverage@50": 0.5}}
    assert gate.decide(good, prod, cfg, (20, 50))[0]
    assert not gate.decide({**good, "metrics": {"recall@20": 0.2, "coverage@50": 0.5}}, prod, cfg, (20, 50))[0]
    assert not gate.decide({**good, "finite": False}, None, cfg, (20, 50))[0]
    ok, reasons = gate.decide({**good, "metrics": {"recall@20": 0.4, "coverage@50": 0.01}}, prod, cfg, (20, 50))
    assert not ok and "coverage@50" in reasons[0]


def _fake_student(layout, number, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with storage.open_output(layout.student(number), kind="student") as o:
        o.write_bytes("student.pt", buffer.getvalue())


def test_promote_rollback_and_recommend(storage_root, days):
    d1, d2, _, _ = days
    layout = Layout(storage_root)
    for v, d in ((1, d1), (2, d2)):
        versions.build_version(layout, v, versions.read_new(d, CFG.new_data), CFG)
        data = load_dataset(layout.data(v))
        _fake_student(layout, v, _state(data.n_users, data.n_items, seed=v))
    evaluated = gate.evaluate_state(_state(3, 3), load_dataset(layout.data(2)), (20, 50))   # grown with zeros
    assert evaluated["finite"] and evaluated["n_users"] > 0
    assert promote.read_current(layout) is None
    job.export_version(layout, 1, 10)
    p1 = promote.move_pointer(layout, 1, "promote", {"x": 1}, None)
    first_manifest = storage.read_bytes(layout.export(1), "users.parquet")
    sha1 = promote.manifest_sha256(layout.export(1))
    job.export_version(layout, 2, 10)
    promote.move_pointer(layout, 2, "promote", {"x": 2}, None)
    assert promote.read_current(layout)["version"] == "v0002"
    back = promote.rollback_target(layout, None)
    assert back == 1
    with leases.hold(layout.lease, "test") as lease:
        pointer = promote.move_pointer(layout, back, "rollback", None, lease)
    assert pointer["version"] == "v0001" and pointer["manifest_sha256"] == sha1 == p1["manifest_sha256"]
    assert storage.read_bytes(layout.export(1), "users.parquet") == first_manifest
    assert [h["action"] for h in promote.history(layout)] == ["promote", "promote", "rollback"]
    # recommend reads one row group of several
    users, items = versions.load_maps(layout.data(2))
    data = load_dataset(layout.data(2))
    out = storage.join(storage_root, "small-groups")
    export.write_export(out, _state(data.n_users, data.n_items), data, users, items, 5, "v0002", batch_users=8)
    stats: dict = {}
    user = sorted(users.to_pylist())[20]
    recs = export.recommend(out, str(user), 5, stats)
    assert len(recs) == 5 and stats == {"row_groups_read": 1, "row_groups_total": -(-len(users) // 8)}
    known = {items[int(i)].as_py() for s in (data.train, data.valid, data.test)
             for i in s.items_of(users.to_pylist().index(user))}
    assert not known & {i for i, _ in recs}
    assert [s for _, s in recs] == sorted((s for _, s in recs), reverse=True)


def test_lease_excludes_a_second_holder(storage_root):
    layout = Layout(storage_root)
    with leases.hold(layout.lease, "a"):
        with pytest.raises(leases.LeaseHeld):
            with leases.hold(layout.lease, "b"):
                pass
    with leases.hold(layout.lease, "b"):
        pass


def _fake_trajectory(uri: str, n_users: int, n_items: int, summary: dict | None = None) -> None:
    """A small complete trajectory (two evaluations, k=5) for ``n_users`` x ``n_items``."""
    from hetcomp_dist.teachers.trajectory import TrajectoryWriter

    writer = TrajectoryWriter(uri, model="bpr_mf", n_users=n_users, k=5, n_items=n_items, observed_k=5, overwrite=True)
    lists = np.arange(n_users * 5).reshape(n_users, 5) % n_items
    for epoch, value in ((2, 0.1), (4, 0.2)):
        writer.write_snapshot(epoch, {"recall@20": value}, [(np.arange(n_users), lists)])
    writer.finish([(np.arange(n_users), lists)], extra={"summary": summary or {}})


def test_teachers_on_ray_actors_map_failures_and_pids(tmp_path, days, monkeypatch):
    """With refresh.ray the teachers go to the actors of `hetcomp train-teachers` (their call faked here), rooted
    at the version's folder; a teacher whose actor failed keeps the previous version's trajectory."""
    from hetcomp_dist.refresh import loading, teachers
    from hetcomp_dist.teachers import actors

    d1, d2, _, _ = days
    layout = Layout(str(tmp_path / "run"))
    for v, d in ((1, d1), (2, d2)):
        versions.build_version(layout, v, versions.read_new(d, CFG.new_data), CFG)
    old, data = load_dataset(layout.data(1)), load_dataset(layout.data(2))
    for name in ("bpr_mf", "lightgcn"):
        _fake_trajectory(layout.trajectory(1, name), old.n_users, old.n_items)
    cfg, rcfg = loading.load(REPO / "configs" / "refresh_tiny.yaml", [f"run={layout.run}", "refresh.ray=true",
                                                                        "refresh.warm_start=false"])
    calls = []

    def fake_train_on_ray(run_cfg, todo, dataset_uri, report):
        calls.append(([t.name for t in todo], dataset_uri, run_cfg.layout.trajectory("bpr_mf")))
        _fake_trajectory(run_cfg.layout.trajectory("bpr_mf"), data.n_users, data.n_items,
                         {"best_epoch": 4, "epochs_trained": 4})
        report({"teacher": "bpr_mf", "event": "done", "pid": 4242})
        report({"teacher": "lightgcn", "event": "epoch", "pid": 4343})
        raise actors.TeachersFailed("teacher(s) failed: lightgcn (the others finished; ...)")

    monkeypatch.setattr(actors, "train_on_ray", fake_train_on_ray)
    records = {r["name"]: r for r in teachers.train_version_teachers(layout, cfg, rcfg, 2, data, lambda m: None)}
    assert calls == [(["bpr_mf", "lightgcn"], layout.data(2), layout.trajectory(2, "bpr_mf"))]
    bpr, gcn = records["bpr_mf"], records["lightgcn"]
    assert (bpr["status"], bpr["ran"], bpr["actor_pids"], bpr["best_epoch"]) == ("trained from scratch", "ray-actor",
                                                                                 [4242], 4)
    assert (gcn["status"], gcn["ran"], gcn["actor_pids"]) == ("failed: kept v0001's trajectory", "ray-actor", [4343])
    assert "lightgcn" in gcn["error"] and gcn["trajectory"] == layout.trajectory(2, "lightgcn")
    carried = storage.read_manifest(layout.trajectory(2, "lightgcn"))
    assert carried["carried_from"] == layout.trajectory(1, "lightgcn") and carried["n_users"] == data.n_users
    report = {"version": "v0002", "promote": True, "reasons": [], "lineage": {}, "teachers": list(records.values()),
              "gate": {"metrics": [], "candidate": None, "production": None},
              "student": {"status": "warm-started from v0001", "ran": "ray-train", "workers": 2}}
    text = job.render(report)
    assert "bpr_mf: trained from scratch, on a Ray actor (pid 4242)" in text and "on Ray Train (2 workers)" in text


def test_all_scores_finite_bound_and_fallback():
    small = torch.randn(50, 4), torch.randn(70, 4)
    assert gate.all_scores_finite(*small, batch_size=16)
    huge = torch.full((3, 2), 1e20), torch.full((4, 2), 1e20)              # u . v = 2e40: inf in float32
    assert not gate.all_scores_finite(*huge)
    apart = torch.tensor([[1e20, 0.0]]), torch.tensor([[0.0, 1e20]])       # the bound fails, the scores are 0
    assert gate.all_scores_finite(*apart)
    assert not gate.all_scores_finite(torch.tensor([[float("nan"), 0.0]]), torch.ones(2, 2))


def test_a_refresh_killed_after_the_gate_is_continued_not_refused(tmp_path, days):
    """A version whose gate passed but whose pointer never moved (killed in the export or the promotion, or
    between the history entry and the pointer) is unfinished: a retry of its file continues it."""
    d1, d2, _, _ = days
    layout = Layout(str(tmp_path / "run"))
    for v, d in ((1, d1), (2, d2)):
        versions.build_version(layout, v, versions.read_new(d, CFG.new_data), CFG)
        data = load_dataset(layout.data(v))
        _fake_student(layout, v, _state(data.n_users, data.n_items, seed=v))
        with storage.open_output(layout.report(v), kind="refresh-report") as o:
            o.write_json("report.json", {"promote": True})
        job.export_version(layout, v, 10)
    promote.move_pointer(layout, 1, "promote", None, None)
    assert job._finished(layout, 1) and not job._finished(layout, 2) and not promote.promoted(layout, 2)
    orphan = {"version": "v0002", "action": "promote", "promotion": 2}     # the entry, but not the pointer
    storage.write_atomic(layout.promotion(2), json.dumps(orphan).encode())
    assert not job._finished(layout, 2)
    promote.move_pointer(layout, 2, "promote", None, None)
    assert job._finished(layout, 2) and promote.read_current(layout)["promotion"] == 3


def test_warm_start_checkpoints_keep_the_loops_fused_adam(tmp_path, days):
    """A resumed Adam takes its settings from the checkpoint: the warm start's must be fused like the loops'."""
    from hetcomp_dist.distill.config import DistillConfig
    from hetcomp_dist.distill.train import checkpointer as student_checkpointer
    from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig
    from hetcomp_dist.teachers.train import checkpointer as teacher_checkpointer

    d1, _, _, _ = days
    layout = Layout(str(tmp_path / "run"))
    versions.build_version(layout, 1, versions.read_new(d1, CFG.new_data), CFG)
    data = load_dataset(layout.data(1))
    teacher = TeacherConfig(name="mf", model="bpr_mf", params={"dim": 4}, select_metric="recall@20")
    out = str(tmp_path / "teacher")
    grow.warm_teacher(teacher, data, {}, out, TrajectoryConfig(k=5, observed_k=5), (20,), 1024)
    assert teacher_checkpointer(out, teacher).load()["optimizer"]["param_groups"][0]["fused"] is True
    student = DistillConfig(dim=4)
    grow.warm_student(student, data, _state(3, 3), 1, 1, str(tmp_path / "student"))
    state = student_checkpointer(str(tmp_path / "student"), student).load()
    assert state["optimizer"]["param_groups"][0]["fused"] is True
