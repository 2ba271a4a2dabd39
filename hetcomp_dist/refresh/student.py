"""A refresh's student (step 3): continues from the production student, grown (refresh/grow.py), for at
most ``refresh.student_epochs``, distilling from the version's trajectories; without a production
student, a fresh distillation.

Where it trains: in this process (the default), or with ``refresh.ray`` on ``distill.workers`` Ray Train
workers through the same trainer as ``hetcomp distill --ray`` (:mod:`hetcomp_dist.distill.ray_job`; its
worker-group restarts, placement and Ray Train storage settings apply). The warm start needs nothing of
the workers: the grown student is written whole as ``<out>/checkpoints/epoch-000000`` before the loop
starts, and every rank resumes its own user rows (and the shared item table) from that checkpoint, as it
would from a checkpoint written by any other number of workers.

Both ways go through :func:`hetcomp_dist.lineage.student_output`, as the distillation's own entry points
do: ``<out>``'s lease held by this process (the Ray workers check it before each manifest), trajectories of
another dataset refused, the dataset's identity stamped into the student's manifests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from hetcomp_dist import lineage, storage
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.train import checkpointer, distill
from hetcomp_dist.refresh import grow
from hetcomp_dist.refresh.config import RefreshConfig
from hetcomp_dist.refresh.layout import Layout, version_number
from hetcomp_dist.run import RunConfig
from hetcomp_dist.teachers.trajectory import TrajectoryReader

Log = Callable[[str], None]


def train_version_student(layout: Layout, cfg: RunConfig, rcfg: RefreshConfig, number: int, data: Dataset,
                          teachers: list[str], current: dict[str, Any] | None, log: Log) -> dict[str, Any]:
    """The version's student: reused if complete, else distilled (warm-started when production exists).
    Returns ``status``, ``ran`` (``in-process`` / ``ray-train`` / ``none``), ``workers`` and ``metrics``."""
    out = layout.student(number)
    if storage.is_complete(out):
        return {"status": "done before (reused)", "ran": "none", "workers": None,
                "metrics": storage.read_json(out, "metrics.json")}
    uris = [layout.trajectory(number, n) for n in teachers]
    d = dataclasses.replace(cfg.distill, out=out, teachers=teachers)
    warm = current is not None and rcfg.warm_start
    if warm:
        d = dataclasses.replace(d, max_epochs=rcfg.student_epochs)
    dataset_uri = layout.data(number)
    with lineage.student_output(out, dataset_uri, uris) as (held, identity):
        if warm and checkpointer(out, d).load() is None:     # else: a killed refresh's checkpoint, resumed as it is
            prod = grow.load_student_state(layout.student(version_number(current["version"])))
            grow.warm_student(d, data, prod, len(uris), TrajectoryReader(uris).n_snapshots, out)
        if rcfg.ray:
            _on_ray_train(dataclasses.replace(cfg, distill=d), dataset_uri, uris, out, held, identity)
            metrics = storage.read_json(out, "metrics.json")
        else:
            metrics = distill(dataset_uri, uris, d, out, tuple(cfg.ks))
    status = f"warm-started from {current['version']}" if warm else "distilled from scratch"
    ran = "ray-train" if rcfg.ray else "in-process"
    log(f"student: {status} ({ran}, {metrics.get('workers', 1)} worker(s)), best epoch {metrics['best_epoch']} "
        f"of {metrics['epochs']}")
    return {"status": status, "ran": ran, "workers": metrics.get("workers", 1), "metrics": metrics}


def _on_ray_train(cfg: RunConfig, dataset_uri: str, uris: list[str], out: str, held: Any, identity: dict) -> None:
    """The trainer of ``hetcomp distill --ray`` on this version's dataset, trajectories and output.

    ``distill_ray`` itself derives those three from the run's own layout (``<run>/dataset``, ...), which a
    refresh's versions do not use, so its fit step is called with them (the same TorchTrainer, workers,
    FailureConfig, placement and Ray Train storage), under the lease this process holds on ``out``.
    """
    from hetcomp_dist import ray_cluster
    from hetcomp_dist.distill import ray_job

    d: DistillConfig = cfg.distill
    train_path, train_fs = ray_cluster.train_storage(cfg.ray.train_storage_path, cfg.storage.endpoint_url)
    ray_job.fit(cfg, dataset_uri, uris, out, (), "text", train_path, train_fs, held, identity)
    if not storage.is_complete(out):
        raise RuntimeError(f"{out}: Ray Train ({d.workers} workers) finished without a complete student")
