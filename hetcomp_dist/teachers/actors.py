"""Train all teachers of a run: one Ray actor each, concurrently (or one after another without Ray).

The training itself is :func:`hetcomp_dist.teachers.train.train_teacher` either way. Each actor asks
Ray for its teacher's ``cpus`` / ``gpus``, and trains on a GPU exactly when it reserved one
(:func:`hetcomp_dist.device.under_reservation`: ``device: auto`` with ``gpus: 0`` is the CPU, ``cuda``
with ``gpus: 0`` is refused before any work). Without Ray, each teacher's ``device`` is resolved on this
host before any work. If an actor's process dies, Ray restarts it
(``ray.max_restarts``) and retries its ``train`` call, which resumes from the teacher's last
checkpoint. Actors push progress events to a small event-box actor that the driver polls and prints.
A teacher with ``workers > 1`` is trained sharded by a TorchTrainer that its actor launches
(:mod:`hetcomp_dist.teachers.sharded`); the actor then reserves nothing and its workers reserve ``cpus`` /
``gpus`` each. Without Ray such a teacher is refused before any work.

``train_teachers`` holds the lease of ``<run>/teachers`` (:mod:`hetcomp_dist.lease`) throughout: a second
``train-teachers`` on the same run is refused before any work, and every manifest a teacher commits, in
this process, an actor or a sharded teacher's Ray Train worker, checks that lease first.

At the end the summaries (test Recall/NDCG, best epoch, train seconds) are printed as a table and
written to ``<run>/teachers/summary`` (``summary.json`` + manifest). A teacher whose complete
trajectory was written with the same teacher and trajectory settings, on the same dataset (its identity,
:mod:`hetcomp_dist.lineage`), is not trained again (a rerun after a partial failure trains only what is
missing).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from hetcomp_dist import lease, lineage, storage
from hetcomp_dist.config import ConfigError, to_dict
from hetcomp_dist.device import resolve, under_reservation
from hetcomp_dist.progress import TeacherProgress
from hetcomp_dist.ray_cluster import init_ray
from hetcomp_dist.run import RunConfig, ensure_dataset
from hetcomp_dist.teachers.config import TeacherConfig
from hetcomp_dist.teachers.train import same_settings, train_teacher

Event = dict[str, Any]
SUMMARY = "summary"
# The environment variables the actors get from the driver: settings, never credentials. A local Ray's
# processes inherit the driver's environment anyway; a cluster's nodes use their own credentials
# (instance roles, secrets mounted in the pod), and a runtime_env is stored by Ray in its GCS and logs.
FORWARDED_ENV = ("HETCOMP_DATASETS_DIR", "HETCOMP_CACHE_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_DEFAULT_REGION", "AWS_REGION")


class TeachersFailed(RuntimeError):
    """One or more teachers failed for good (after Ray's restarts); the others finished."""


class TeacherActor:
    """Trains one teacher inside a Ray actor; ``report`` events go to the driver's event box.

    The box is an argument of ``train``, not of the constructor: Ray keeps an actor handle given to
    a constructor in the object store, from where a restart may no longer get it.
    """

    def __init__(self, endpoint_url: str | None):
        if endpoint_url:
            storage.configure(endpoint_url=endpoint_url)

    def train(self, cfg: RunConfig, teacher: TeacherConfig, dataset_uri: str, events: Any,
              held: Any = None) -> dict[str, Any]:
        with lineage.worker_scope(cfg.layout.teachers, held, None):    # commits check the driver's lease
            return self._train(cfg, teacher, dataset_uri, events, held)

    def _train(self, cfg: RunConfig, teacher: TeacherConfig, dataset_uri: str, events: Any,
               held: Any) -> dict[str, Any]:
        import ray

        def report(event: Event) -> None:  # waits for the box, so every event is in before train() returns
            ray.get(events.push.remote({**event, "pid": os.getpid()}))

        at = _where(cfg, teacher)
        placed = under_reservation(teacher.device, teacher.gpus, f"{at}.device", f"{at}.gpus")
        if teacher.workers > 1:     # sharded: this actor reserved nothing and waits for its Ray Train workers
            from hetcomp_dist.teachers.sharded import fit

            return fit(cfg, teacher, dataset_uri, events, placed, at, held)
        device = resolve(placed, f"{at}.device")      # Ray gave this actor its GPUs: cuda means the first
        return train_teacher(teacher, dataset_uri, cfg.layout.teacher(teacher.name), cfg.trajectory,
                             tuple(cfg.ks), cfg.eval_batch_size, report, device)


class EventBox:
    """Events pushed by the teacher actors, drained by the driver."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def push(self, event: Event) -> None:
        self._events.append(event)

    def drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def format_summary(summaries: list[dict[str, Any]], ks: list[int]) -> str:
    """Markdown table: one row per teacher, test Recall/NDCG at 20 and 50 (else the config's ks)."""
    cut = [k for k in ks if k in (20, 50)] or list(ks)
    head = ["teacher", "model"] + [f"{m}@{k}" for k in cut for m in ("recall", "ndcg")] + \
           ["best epoch", "epochs", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["teacher"], s["model"]] + [f"{s['test'][f'{m}@{k}']:.4f}" for k in cut for m in ("recall", "ndcg")]
        cells += [str(s["best_epoch"]), str(s["epochs_trained"]), f"{s['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_teachers(cfg: RunConfig, sequential: bool = False,
                   report: Callable[[Event], None] | None = None) -> list[dict[str, Any]]:
    """Train every teacher of ``cfg``; returns their summaries in config order (also written to storage).

    ``report`` receives every progress event of ``train_teacher`` (default: a :class:`~hetcomp_dist.progress.TeacherProgress`),
    plus ``"skipped"`` events; under Ray each event also carries the ``pid`` of the actor's process.
    Raises :class:`ConfigError` when the config lists no teacher (every other setting was checked when
    the config was loaded) and :class:`TeachersFailed` if any teacher failed for good (the others'
    outputs are kept).
    """
    names = [t.name for t in cfg.teachers]
    if not names:
        raise ConfigError("no teachers in the config (teachers: [...])")
    devices = _check_devices(cfg, sequential)
    if cfg.storage.endpoint_url:
        storage.configure(endpoint_url=cfg.storage.endpoint_url)
    report = report or TeacherProgress(cfg.teachers, cfg.layout.tensorboard)
    dataset_uri = ensure_dataset(cfg)
    identity = lineage.dataset_identity(dataset_uri)
    with lease.hold(cfg.layout.teachers, sweep=True) as held:   # LeaseHeld: another train-teachers is writing
        return _train_all(cfg, sequential, report, dataset_uri, identity, devices, held)


def _train_all(cfg: RunConfig, sequential: bool, report: Callable[[Event], None], dataset_uri: str,
               identity: dict[str, Any], devices: dict[str, Any], held: Any) -> list[dict[str, Any]]:
    names = [t.name for t in cfg.teachers]
    results: dict[str, dict[str, Any]] = {}
    for t in cfg.teachers:
        if (summary := finished_summary(cfg, t, identity)) is not None:
            report({"teacher": t.name, "event": "skipped"})
            results[t.name] = summary
    todo = [t for t in cfg.teachers if t.name not in results]
    if sequential:
        for t in todo:
            results[t.name] = train_teacher(t, dataset_uri, cfg.layout.teacher(t.name), cfg.trajectory,
                                            tuple(cfg.ks), cfg.eval_batch_size, report, devices[t.name])
    elif todo:
        results.update(train_on_ray(cfg, todo, dataset_uri, report, held))

    summaries = [results[n] for n in names]
    with storage.open_output(cfg.layout.teachers_summary, kind="teacher-summary",
                             config=to_dict(cfg)) as out:
        out.write_json("summary.json", summaries)
    return summaries


def _where(cfg: RunConfig, teacher: TeacherConfig) -> str:
    """The teacher's config path, for errors: ``teachers[i]``."""
    return f"teachers[{[t.name for t in cfg.teachers].index(teacher.name)}]"


def _check_devices(cfg: RunConfig, sequential: bool) -> dict[str, Any]:
    """Each teacher's device, checked before any work: without Ray resolved on this host (``cuda`` where
    torch sees no GPU is an error); as Ray actors checked against their GPU reservation (the actor resolves
    it where it runs, and a local Ray instance's GPU count is checked when it starts). A sharded teacher
    (workers > 1) needs Ray: refused without it."""
    devices = {}
    for t in cfg.teachers:
        at = _where(cfg, t)
        if sequential and t.workers > 1:
            raise ConfigError(f"{at}.workers: {t.workers} workers train on Ray Train: run train-teachers "
                              "without --sequential, or set workers: 1")
        if sequential:
            devices[t.name] = resolve(t.device, f"{at}.device")
        else:
            devices[t.name] = under_reservation(t.device, t.gpus, f"{at}.device", f"{at}.gpus")
    return devices


def finished_summary(cfg: RunConfig, teacher: TeacherConfig,
                     identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The summary in a complete trajectory written with the same teacher and trajectory settings on the
    same dataset (lineage: its identity, default the run's dataset's), else None."""
    uri = cfg.layout.trajectory(teacher.name)
    if not storage.is_complete(uri):
        return None
    m = storage.read_manifest(uri)
    summary = m.get("summary") or {}
    identity = identity if identity is not None else lineage.dataset_identity(cfg.dataset_uri)
    same = (lineage.same(m.get(lineage.KEY), identity)
            and same_settings(m.get("config"), teacher)
            and (m.get("k"), m.get("observed_k")) == (cfg.trajectory.k, cfg.trajectory.observed_k)
            and m.get("selection", {}).get("fractions") == [float(f) for f in cfg.trajectory.fractions]
            and all(f"recall@{k}" in summary.get("test", {}) for k in cfg.ks))
    return summary if same else None


def forwarded_env() -> dict[str, str]:
    """The driver's settings in :data:`FORWARDED_ENV` that are set (credentials are never among them)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def train_on_ray(cfg: RunConfig, teachers: list[TeacherConfig], dataset_uri: str,
                 report: Callable[[Event], None], held: Any = None) -> dict[str, dict[str, Any]]:
    """Train ``teachers`` on ``dataset_uri`` concurrently, one Ray actor each (the refresh passes a data
    version and warm-starting configs); their summaries by name. ``held``: the driver's lease on
    ``cfg.layout.teachers``, which the actors check before each commit there."""
    import ray

    started = init_ray(cfg.ray)
    if started == "local":  # a fixed-size instance: a teacher asking for more would wait forever
        have = ray.cluster_resources()
        for t in teachers:    # a sharded teacher's workers all run at once, each with cpus / gpus
            cpus, gpus = t.cpus * t.workers, t.gpus * t.workers
            if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
                ray.shutdown()
                raise ConfigError(f"teacher {t.name} asks for {cpus:g} CPUs / {gpus:g} GPUs; the local Ray "
                                  f"instance has {have.get('CPU', 0):g} / {have.get('GPU', 0):g} (see ray.num_cpus)")
    env = forwarded_env()
    box = ray.remote(EventBox).options(num_cpus=0).remote()
    actor_cls = ray.remote(TeacherActor)
    actors, pending = [], {}
    try:
        for t in teachers:
            sharded = t.workers > 1   # its Ray Train workers reserve cpus / gpus each; the actor only waits
            actor = actor_cls.options(
                num_cpus=0 if sharded else t.cpus, num_gpus=0 if sharded else t.gpus, max_restarts=cfg.ray.max_restarts,
                max_task_retries=cfg.ray.max_restarts, runtime_env={"env_vars": env} if env else None,
            ).remote(cfg.storage.endpoint_url)
            actors.append(actor)
            pending[actor.train.remote(cfg, t, dataset_uri, box, held)] = (t.name, actor)
        results, failures = {}, {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for event in ray.get(box.drain.remote()):
                report(event)
            for ref in ready:
                name, actor = pending.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failures[name] = e
                    print(f"[{name}] FAILED:\n{e}", file=sys.stderr, flush=True)
                ray.kill(actor)  # frees its CPUs/GPUs for a teacher still waiting for them
        if failures:
            raise TeachersFailed(f"teacher(s) failed: {', '.join(failures)} (the others finished; "
                                 "rerun to train only the missing ones)")
        return results
    finally:
        for actor in [*actors, box]:
            ray.kill(actor)
        if started:
            ray.shutdown()
