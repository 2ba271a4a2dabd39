"""A refresh's teachers (step 2): each continues from the newest earlier version's checkpoint, grown
(refresh/grow.py), trains from scratch without one, or is reused when a killed refresh finished it.

Where they train:

- in this process, one after another (the default);
- with ``refresh.ray``, concurrently on the Ray actors of ``hetcomp train-teachers``
  (:func:`hetcomp_dist.teachers.actors.train_on_ray`: one actor per teacher, its ``cpus`` / ``gpus``,
  restarted up to ``ray.max_restarts`` times, each restart resuming from the teacher's newest checkpoint).
  The warm start's preparation (the grown epoch-0 checkpoint and the epoch-0 snapshot, one evaluation per
  teacher) is written by the driver first, because the actor only runs ``train_teacher``, which resumes
  from that checkpoint.

Either way a teacher that fails (its preparation, its training, or its actor after its restarts) keeps the
previous version's trajectory (users new since then get empty lists); one without any earlier trajectory
is left out. Each teacher's record says what happened to it and where it ran (``ran``: ``in-process``,
``ray-actor`` with the actors' pids, or ``none`` when reused or failed before training).
"""

from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hetcomp_dist import storage
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.refresh import grow
from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.refresh.layout import Layout, version_name
from hetcomp_dist.run import RunConfig
from hetcomp_dist.teachers import train as teacher_train
from hetcomp_dist.teachers.config import TeacherConfig
from hetcomp_dist.teachers.trajectory import TrajectoryReader, TrajectoryWriter

Log = Callable[[str], None]


@dataclass
class _Plan:
    """One teacher of the version: its record, and what is left to train (None: nothing)."""
    teacher: TeacherConfig
    record: dict[str, Any]
    prev: int | None
    train: TeacherConfig | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def train_version_teachers(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, data: Dataset,
                           log: Log) -> list[dict[str, Any]]:
    """Every distilled teacher of version ``number``: prepared, trained (here or on Ray actors), settled.
    Returns their records in config order."""
    names = cfg.teacher_names()
    plans = [_plan(layout, cfg, rcfg, number, t, data, log) for t in cfg.teachers if t.name in names]
    todo = [p for p in plans if p.train is not None and p.error is None]
    if todo and rcfg.ray:
        _on_actors(layout, cfg, number, todo, log)
    elif todo:
        _in_process(layout, cfg, number, todo, log)
    for p in plans:
        _settle(layout, number, p, data, log)
    return [p.record for p in plans]


def previous_with(layout: Layout, number: int, name: str) -> int | None:
    """The newest version before ``number`` where teacher ``name`` has a complete trajectory."""
    for v in range(number - 1, 0, -1):
        if storage.is_complete(layout.trajectory(v, name)):
            return v
    return None


def _plan(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, t: TeacherConfig, data: Dataset,
          log: Log) -> _Plan:
    uri = layout.teacher(number, t.name)
    prev = previous_with(layout, number, t.name)
    plan = _Plan(t, {"name": t.name, "previous": None if prev is None else version_name(prev), "ran": "none"}, prev)
    if storage.is_complete(storage.join(uri, "trajectory")):
        plan.record["status"] = "done before (reused)"
        return plan
    try:
        if prev is not None and rcfg.warm_start:
            plan.train = grow.warm_teacher_config(t, rcfg.teacher_epochs)
            plan.record.update(status="warm-started", **_prepare_warm(layout, cfg, prev, t, plan.train, data, uri))
        else:
            plan.train = t
            plan.record["status"] = "trained from scratch"
    except Exception as e:  # noqa: BLE001 - a failed teacher must not stop the refresh
        plan.error = _failure(t.name, e, log)
    return plan


def _prepare_warm(layout: Layout, cfg: RunConfig, prev: int, t: TeacherConfig, warm: TeacherConfig, data: Dataset,
                  uri: str) -> dict[str, Any]:
    """Write the grown epoch-0 checkpoint and snapshot that ``train_teacher(warm, ..., uri)`` resumes from,
    unless a killed refresh left a checkpoint there (resumed as it is)."""
    if teacher_train.checkpointer(uri, warm).load() is not None:
        return {"start_valid": None}
    old = grow.latest_model_state(layout.teacher(prev, t.name), t)
    if old is None:
        raise RuntimeError(f"{layout.teacher(prev, t.name)}: no checkpoint to continue from")
    info = grow.warm_teacher(warm, data, old, uri, cfg.trajectory, tuple(cfg.ks), cfg.eval_batch_size)
    return {"start_valid": info.get("start_valid")}


def _in_process(layout: Layout, cfg: RunConfig, number: int, todo: list[_Plan], log: Log) -> None:
    for p in todo:
        p.record["ran"] = "in-process"
        try:
            p.summary = teacher_train.train_teacher(p.train, layout.data(number), layout.teacher(number, p.teacher.name),
                                                    cfg.trajectory, tuple(cfg.ks), cfg.eval_batch_size)
        except Exception as e:  # noqa: BLE001 - a failed teacher must not stop the refresh
            p.error = _failure(p.teacher.name, e, log)


def _on_actors(layout: Layout, cfg: RunConfig, number: int, todo: list[_Plan], log: Log) -> None:
    """All of ``todo`` at once on the actors of ``hetcomp train-teachers``; the outcome is read from storage
    (a complete trajectory), as the actors' call reports failures only by name."""
    from hetcomp_dist.teachers import actors

    # A version's folder holds its teachers as a run does (<version>/teachers/<name>), so a run config
    # rooted at the version makes each actor write where this refresh reads; checked, not assumed.
    at_version = dataclasses.replace(cfg, run=layout.version(number))
    for p in todo:
        if at_version.layout.teacher(p.teacher.name) != layout.teacher(number, p.teacher.name):
            raise RuntimeError(f"{p.teacher.name}: the run layout and the refresh layout disagree on its folder")
    pids: dict[str, set[int]] = {p.teacher.name: set() for p in todo}

    def report(event: dict[str, Any]) -> None:
        if event.get("teacher") in pids and event.get("pid"):
            pids[event["teacher"]].add(int(event["pid"]))
        if event.get("event") in ("resumed", "done"):
            log(f"teacher {event['teacher']} (Ray actor, pid {event.get('pid')}): {event['event']}"
                + (f" at epoch {event['epoch']}" if event["event"] == "resumed" else ""))

    failed = ""
    try:
        actors.train_on_ray(at_version, [p.train for p in todo], layout.data(number), report)
    except actors.TeachersFailed as e:
        failed = str(e)
    for p in todo:
        p.record.update(ran="ray-actor", actor_pids=sorted(pids[p.teacher.name]))
        trajectory = layout.trajectory(number, p.teacher.name)
        if storage.is_complete(trajectory):
            p.summary = storage.read_manifest(trajectory).get("summary") or {}
        else:
            p.error = f"failed on its Ray actor ({failed or 'no trajectory written'})"
            log(f"teacher {p.teacher.name} failed on its Ray actor")


def _settle(layout: Layout, number: int, p: _Plan, data: Dataset, log: Log) -> None:
    """The record's outcome: the trained (or reused) trajectory, else the previous version's carried over."""
    name = p.teacher.name
    if p.error is None:
        if p.summary:
            p.record.update(best_epoch=p.summary.get("best_epoch"), epochs_trained=p.summary.get("epochs_trained"))
        p.record["trajectory"] = layout.trajectory(number, name)
    else:
        p.record.update(status="failed", error=p.error, trajectory=None)
        if p.prev is not None:
            p.record["trajectory"] = carry_trajectory(layout.trajectory(p.prev, name), layout.trajectory(number, name),
                                                      data)
            p.record["status"] = f"failed: kept {version_name(p.prev)}'s trajectory"
    log(f"teacher {name}: {p.record['status']}")


def carry_trajectory(old: str, new: str, data: Dataset) -> str:
    """Copy a finished trajectory to ``new`` for the (larger) version ``data``: same stages and lists,
    users added since then with empty (-1) lists. Returns ``new``."""
    reader = TrajectoryReader([old])
    m, n_old = reader.manifests[0], reader.n_users
    lists = reader.trajectories(0, n_old)[:, 0].numpy()            # [users, stages, k]
    observed = reader.observed(0, n_old)[:, 0].numpy()
    writer = TrajectoryWriter(new, model=m["model"], n_users=data.n_users, k=m["k"], n_items=data.n_items,
                              observed_k=m["observed_k"], config=m.get("config"), overwrite=True)

    def padded(block: np.ndarray):
        full = np.full((data.n_users, block.shape[1]), -1, np.int32)
        full[:n_old] = block
        yield np.arange(data.n_users), full

    written = set()
    for s, point in enumerate(m["trajectory"]):
        if point["epoch"] not in written:
            writer.write_snapshot(point["epoch"], point["metrics"], padded(lists[:, s]))
            written.add(point["epoch"])
    writer.finish(padded(observed), m["selection"]["fractions"], m["selection"]["metric"],
                  extra={"carried_from": old, "summary": m.get("summary")})
    return new


def _failure(name: str, e: BaseException, log: Log) -> str:
    log(f"teacher {name} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    return f"{type(e).__name__}: {e}"
