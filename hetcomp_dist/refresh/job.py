"""One refresh of a run: data version, teachers, student, gate, export, promotion (``hetcomp refresh``).

    1. data: the next version (refresh/versions.py) from ``--new-data`` (without it, and before any
       version, v0001 from the config's ``data.source``); a refresh killed after this step and retried
       with the same file continues that version instead of refusing the file as a repeat, until that
       version's refresh finished (the gate refused it, or its promotion took effect).
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
       lists); one without any earlier trajectory is left out. The report says which (refresh/teachers.py).
    3. student: continues from the production student (grown) for at most ``refresh.student_epochs``,
       distilling from the version's trajectories; without production, a fresh distillation (refresh/student.py).
    4. gate (refresh/gate.py), decision and reasons in ``versions/vNNNN/report``.
    5. if promoted: the export (refresh/export.py), then the ``current`` pointer (refresh/promote.py).

Steps 2 and 3 run in this process, or with ``refresh.ray`` (``hetcomp refresh --ray``, jobs/nightly_refresh.py)
on Ray: the teachers concurrently on the actors of ``hetcomp train-teachers``, the student on the Ray Train
workers of ``hetcomp distill --ray``. Everything else, the lease included, stays in this process (the driver).

All of it holds the run's lease (renewed by its thread while actors and workers train); ``current`` only
ever moves by one atomic write after the export is complete, so a refresh killed anywhere leaves it at a
complete, valid version.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from hetcomp_dist import storage
from hetcomp_dist.config import ConfigError
from hetcomp_dist.data.dataset import Dataset, load_dataset
from hetcomp_dist.refresh import export as export_mod
from hetcomp_dist import lease as leases
from hetcomp_dist.refresh import gate, grow, promote, versions
from hetcomp_dist.refresh import student as version_student
from hetcomp_dist.refresh import teachers as version_teachers
from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.refresh.layout import Layout, version_name, version_number
from hetcomp_dist.run import RunConfig

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
        teachers = step("teachers", lambda: version_teachers.train_version_teachers(layout, cfg, rcfg, number, data, log))
        current = promote.read_current(layout)
        used = [t["name"] for t in teachers if t["trajectory"]]
        if not used:
            raise RuntimeError(f"{version_name(number)}: no teacher has a trajectory; nothing to distil")
        student = step("student", lambda: version_student.train_version_student(layout, cfg, rcfg, number, data, used,
                                                                                current, log))
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
        # Only checked here: lease.hold's thread renews it. A second renewal from this thread could race that
        # one (both write the lease's one temporary file, and the loser's rename fails), failing the refresh.
        if hasattr(self.lease, "check"):
            self.lease.check()
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
        if meta["lineage"]["new_data_sha256"] == new["sha256"] and not _finished(layout, done[-1]):
            log(f"continuing {version_name(done[-1])} (built from this file by a refresh that did not finish)")
            return done[-1]
    number = (done[-1] if done else 0) + 1
    meta = versions.build_version(layout, number, new, rcfg)
    lin = meta["lineage"]
    log(f"{version_name(number)}: {meta['n_users']} users (+{lin['new_users']}), {meta['n_items']} items "
        f"(+{lin['new_items']}), {lin['added_pairs']} new pairs, holdout {meta['splits']['test']} rows")
    return number


def _finished(layout: Layout, number: int) -> bool:
    """Whether version ``number``'s refresh finished: the gate refused it, or its promotion took effect. A refresh
    killed after the gate passed but before the pointer moved (export, promotion) is continued by a retry of the
    same file, not refused as a repeat: the version passed the gate and would otherwise never be promoted."""
    if not storage.is_complete(layout.report(number)):
        return False
    return not storage.read_json(layout.report(number), "report.json")["promote"] or promote.promoted(layout, number)


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
              "teachers": teachers, "student": {"status": student["status"], "ran": student.get("ran"),
                                                "workers": student.get("workers"),
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
    lines += ["", "## Teachers", ""] + [f"- {t['name']}: {t['status']}" + _where(t) + (f" ({t['error']})" if t.get("error")
                                                                                      else "")
                                         for t in report["teachers"]]
    lines += ["", f"## Student: {report['student']['status']}{_where(report['student'])}", "", "## Lineage", "",
              "```json", json.dumps(report["lineage"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _where(record: dict[str, Any]) -> str:
    """Where a teacher or the student ran, for report.md (records of earlier versions have no ``ran``)."""
    ran = record.get("ran")
    if ran == "ray-actor":
        return f", on a Ray actor (pid {', '.join(map(str, record.get('actor_pids') or [])) or '?'})"
    if ran == "ray-train":
        return f", on Ray Train ({record.get('workers')} workers)"
    return ", in the refresh's process" if ran == "in-process" else ""


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

