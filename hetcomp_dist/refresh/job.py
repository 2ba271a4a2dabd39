"""One refresh of a run: data version, teachers, student, gate, export, promotion (``hetcomp refresh``).

    1. data: the next version (refresh/versions.py) from ``--new-data`` (without it, and before any
       version, v0001 from the config's ``data.source``); a refresh killed after this step and retried
       with the same file continues that version instead of refusing the file as a repeat.
    2. teachers: each continues from the newest earlier version's checkpoint, grown (refresh/grow.py),
       for at most ``refresh.teacher_epochs`` epochs or its own stopping rule, and writes the version's
       trajectory. Trajectory of a warm-started teacher: its epoch-0 snapshot is the previous model as it
       is (grown: new users' and items' rows freshly initialised), then one snapshot per evaluation of
       the continuation; the stages are selected by the same rule as ever (first evaluation reaching
       each fraction of the best, then the best). Easy to hard still holds: the epoch-0 lists are what
       the production student was already distilled towards (the previous teacher's final lists), the
       later ones add what the new interactions taught the teacher (new items, new users, moved tastes),
       the hardest part to imitate. When the continuation improves little, several stages hold the same
       snapshot and DKC moves a pair through them at once, as with a teacher that converges fast.
       A teacher that fails keeps the previous version's trajectory (users new since then get empty
       lists); one without any earlier trajectory is left out. The report says which.
    3. student: continues from the production student (grown) for at most ``refresh.student_epochs``,
       distilling from the version's trajectories; without production, a fresh distillation.
    4. gate (refresh/gate.py), decision and reasons in ``versions/vNNNN/report``.
    5. if promoted: the export (refresh/export.py), then the ``current`` pointer (refresh/promote.py).

All of it holds the run's lease; ``current`` only ever moves by one atomic write after the export is
complete, so a refresh killed anywhere leaves it at a complete, valid version.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from typing import Any, Callable

import numpy as np

from hetcomp_dist import storage
from hetcomp_dist.config import ConfigError
from hetcomp_dist.data.dataset import Dataset, load_dataset
from hetcomp_dist.distill.train import distill
from hetcomp_dist.refresh import export as export_mod
from hetcomp_dist import lease as leases
from hetcomp_dist.refresh import gate, grow, promote, versions
from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.refresh.layout import Layout, version_name, version_number
from hetcomp_dist.run import RunConfig
from hetcomp_dist.teachers.train import train_teacher
from hetcomp_dist.teachers.trajectory import TrajectoryReader, TrajectoryWriter

Log = Callable[[str], None]
Hook = Callable[[str], None]       # called with a step's name before it runs (tests kill the process there)


def refresh(cfg: RunConfig, rcfg: RefreshConfig, new_data: str | None, log: Log = print, owner: str | None = None,
            hooks: tuple[Hook, ...] = ()) -> dict[str, Any]:
    """Run one refresh under the run's lease; returns the version's report."""
    layout = Layout(cfg.run)
    with leases.hold(layout.lease, owner, rcfg.lease_ttl_s) as lease:
        step = _Steps(hooks, log, lease)
        number = step("data", lambda: _data_version(layout, cfg, rcfg, new_data, log))
        data = load_dataset(layout.data(number))
        teachers = step("teachers", lambda: _teachers(layout, cfg, rcfg, number, data, log))
        current = promote.read_current(layout)
        used = [t["name"] for t in teachers if t["trajectory"]]
        if not used:
            raise RuntimeError(f"{version_name(number)}: no teacher has a trajectory; nothing to distil")
        student = step("student", lambda: _student(layout, cfg, rcfg, number, data, used, current, log))
        report = step("gate", lambda: _gate(layout, cfg, rcfg, number, data, current, teachers, student))
        if report["promote"]:
            step("export", lambda: export_version(layout, number, rcfg.export_k))
            pointer = step("promote", lambda: promote.move_pointer(layout, number, "promote", report["gate"], lease))
            log(f"promoted {pointer['version']} (promotion {pointer['promotion']})")
        else:
            log(f"{version_name(number)} not promoted: " + "; ".join(report["reasons"][:3]))
        return report


class _Steps:
    def __init__(self, hooks: tuple[Hook, ...], log: Log, lease: Any):
        self.hooks, self.log, self.lease = hooks, log, lease

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        for hook in self.hooks:
            hook(name)
        if hasattr(self.lease, "renew"):
            self.lease.renew()
        t0 = time.perf_counter()
        out = fn()
        self.log(f"[{name}] {time.perf_counter() - t0:.1f} s")
        return out


def _data_version(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, new_data: str | None, log: Log) -> int:
    done = layout.data_versions()
    if new_data is None:
        if done:
            raise ConfigError("give --new-data: the run has data versions already")
        new_data = cfg.data.source
    id_type = versions.read_meta(layout, done[-1]).get("id_type") if done else None
    new = versions.read_new(new_data, rcfg.new_data, id_type)
    if done:
        meta = versions.read_meta(layout, done[-1])
        if meta["lineage"]["new_data_sha256"] == new["sha256"] and not storage.is_complete(layout.report(done[-1])):
            log(f"continuing {version_name(done[-1])} (built from this file by a refresh that did not finish)")
            return done[-1]
    number = (done[-1] if done else 0) + 1
    meta = versions.build_version(layout, number, new, rcfg)
    lin = meta["lineage"]
    log(f"{version_name(number)}: {meta['n_users']} users (+{lin['new_users']}), {meta['n_items']} items "
        f"(+{lin['new_items']}), {lin['added_pairs']} new pairs, holdout {meta['splits']['test']} rows")
    return number


def _previous_with(layout: Layout, number: int, name: str) -> int | None:
    """The newest version before ``number`` where teacher ``name`` has a complete trajectory."""
    for v in range(number - 1, 0, -1):
        if storage.is_complete(layout.trajectory(v, name)):
            return v
    return None


def _teachers(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, data: Dataset,
              log: Log) -> list[dict[str, Any]]:
    out = []
    for t in cfg.teachers:
        if t.name not in cfg.teacher_names():
            continue
        uri = layout.teacher(number, t.name)
        prev = _previous_with(layout, number, t.name)
        record = {"name": t.name, "previous": None if prev is None else version_name(prev)}
        try:
            if storage.is_complete(storage.join(uri, "trajectory")):
                record.update(status="done before (reused)")
            elif prev is not None and rcfg.warm_start:
                record.update(status="warm-started", **_warm_teacher(layout, cfg, rcfg, prev, t, data, uri))
            else:
                train_teacher(t, layout.data(number), uri, cfg.trajectory, tuple(cfg.ks), cfg.eval_batch_size)
                record.update(status="trained from scratch")
            record["trajectory"] = storage.join(uri, "trajectory")
        except Exception as e:  # noqa: BLE001 - a failed teacher must not stop the refresh
            log(f"teacher {t.name} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
            record.update(status="failed", error=f"{type(e).__name__}: {e}", trajectory=None)
            if prev is not None:
                record["trajectory"] = carry_trajectory(layout.trajectory(prev, t.name), storage.join(uri, "trajectory"), data)
                record["status"] = f"failed: kept {version_name(prev)}'s trajectory"
        log(f"teacher {t.name}: {record['status']}")
        out.append(record)
    return out


def _warm_teacher(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, prev: int, t, data: Dataset,
                  uri: str) -> dict[str, Any]:
    warm = grow.warm_teacher_config(t, rcfg.teacher_epochs)
    info: dict[str, Any] = {}
    from hetcomp_dist.teachers.train import checkpointer
    if checkpointer(uri, warm).load() is None:          # else: a killed refresh's checkpoint, resumed as it is
        old = grow.latest_model_state(layout.teacher(prev, t.name), t)
        if old is None:
            raise RuntimeError(f"{layout.teacher(prev, t.name)}: no checkpoint to continue from")
        info = grow.warm_teacher(warm, data, old, uri, cfg.trajectory, tuple(cfg.ks), cfg.eval_batch_size)
    summary = train_teacher(warm, layout.data(data_number(data)), uri, cfg.trajectory, tuple(cfg.ks), cfg.eval_batch_size)
    return {"start_valid": info.get("start_valid"), "best_epoch": summary["best_epoch"],
            "epochs_trained": summary["epochs_trained"]}


def data_number(data: Dataset) -> int:
    return version_number(data.meta["lineage"]["version"])


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


def _student(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, data: Dataset,
             teachers: list[str], current: dict[str, Any] | None, log: Log) -> dict[str, Any]:
    out = layout.student(number)
    if storage.is_complete(out):
        return {"status": "done before (reused)", "metrics": storage.read_json(out, "metrics.json")}
    uris = [layout.trajectory(number, n) for n in teachers]
    d = dataclasses.replace(cfg.distill, out=out, teachers=teachers)
    status = "distilled from scratch"
    if current is not None and rcfg.warm_start:
        d = dataclasses.replace(d, max_epochs=rcfg.student_epochs)
        from hetcomp_dist.distill.train import checkpointer
        if checkpointer(out, d).load() is None:
            prod = grow.load_student_state(layout.student(version_number(current["version"])))
            n_stages = TrajectoryReader(uris).n_snapshots
            grow.warm_student(d, data, prod, len(uris), n_stages, out)
        status = f"warm-started from {current['version']}"
    metrics = distill(layout.data(number), uris, d, out, tuple(cfg.ks))
    log(f"student: {status}, best epoch {metrics['best_epoch']} of {metrics['epochs']}")
    return {"status": status, "metrics": metrics}


def _gate(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, data: Dataset,
          current: dict[str, Any] | None, teachers: list[dict[str, Any]], student: dict[str, Any]) -> dict[str, Any]:
    ks = tuple(cfg.ks)
    cand = gate.evaluate_state(grow.load_student_state(layout.student(number)), data, ks, cfg.eval_batch_size)
    prod = None
    if current is not None:
        prod_state = grow.load_student_state(layout.student(version_number(current["version"])))
        prod = gate.evaluate_state(prod_state, data, ks, cfg.eval_batch_size)
    ok, reasons = gate.decide(cand, prod, rcfg.gate, ks)
    figures = {"candidate": cand, "production": prod, "production_version": current and current["version"],
               "metrics": rcfg.gate.metrics, "tolerance": rcfg.gate.tolerance}
    report = {"version": version_name(number), "promote": ok, "reasons": reasons, "gate": figures,
              "teachers": teachers, "student": {"status": student["status"],
                                                "test": student["metrics"].get("test"),
                                                "best_epoch": student["metrics"].get("best_epoch"),
                                                "epochs": student["metrics"].get("epochs")},
              "lineage": data.meta["lineage"]}
    with storage.open_output(layout.report(number), kind="refresh-report") as o:
        o.write_json("report.json", report)
        o.write_bytes("report.md", render(report).encode())
    return report


def render(report: dict[str, Any]) -> str:
    g = report["gate"]
    lines = [f"# Refresh {report['version']}: {'PROMOTED' if report['promote'] else 'NOT promoted'}", "",
             "## Gate", ""] + [f"- {r}" for r in report["reasons"]]
    lines += ["", "| | " + " | ".join(g["metrics"]) + " | holdout users |", "|---|" + "---|" * (len(g["metrics"]) + 1)]
    for who in ("candidate", "production"):
        if g[who] is not None:
            lines.append(f"| {who} | " + " | ".join(f"{g[who]['metrics'].get(m, float('nan')):.4f}" for m in g["metrics"])
                         + f" | {g[who]['n_users']} |")
    lines += ["", "## Teachers", ""] + [f"- {t['name']}: {t['status']}" + (f" ({t['error']})" if t.get("error") else "")
                                         for t in report["teachers"]]
    lines += ["", f"## Student: {report['student']['status']}", "", "## Lineage", "",
              "```json", json.dumps(report["lineage"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def export_version(layout: Layout, number: int, k: int) -> dict[str, Any]:
    """Write (or keep, if complete) the export of version ``number``'s student."""
    out = layout.export(number)
    if storage.is_complete(out):
        return storage.read_manifest(out)
    data = load_dataset(layout.data(number))
    users, items = versions.load_maps(layout.data(number))
    state = grow.load_student_state(layout.student(number))
    return export_mod.write_export(out, state, data, users, items, k, version_name(number))


def rollback(cfg: RunConfig, rcfg: RefreshConfig, to: str | None, owner: str | None = None) -> dict[str, Any]:
    layout = Layout(cfg.run)
    with leases.hold(layout.lease, owner, rcfg.lease_ttl_s) as lease:
        target = promote.rollback_target(layout, to)
        current = promote.read_current(layout, verify=False)
        promoted = {h["version"] for h in promote.history(layout) if h.get("action") == "promote"}
        if version_name(target) not in promoted or not storage.is_complete(layout.export(target)):
            raise storage.StorageError(f"{version_name(target)} was never promoted (only a promoted version, "
                                       f"with its complete export, can be rolled back to: {sorted(promoted)})")
        return promote.move_pointer(layout, target, "rollback", None, lease,
                                    reason=f"rollback from {current['version']}")

