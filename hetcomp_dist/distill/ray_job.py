"""Distillation on Ray Train: a TorchTrainer of ``distill.workers`` workers running the one loop.

    hetcomp distill --ray --config configs/citeulike.yaml --set distill.workers=2
    ray job submit --working-dir . -- python jobs/distill.py --config configs/citeulike.yaml

The driver prepares the dataset (if missing) and starts the trainer; each worker joins the process
group that Ray Train made and calls :func:`hetcomp_dist.distill.train.distill`, which
splits the users by contiguous ranges over the ranks (see its module docstring: user rows local to
their owner, the item table whole with its gradient all-reduced or split by rows, evaluation sums all-reduced,
rank 0 writes). The driver reads the result from ``<out>/metrics.json``.

Fault tolerance: the loop writes ``<out>/checkpoints/epoch-N`` (with a manifest) at every evaluation. If a
worker dies, Ray Train restarts the whole worker group (``FailureConfig(max_failures=ray.max_failures)``)
and the new workers resume from that checkpoint: our storage checkpoints, not Ray Train's, so a
rerun by hand, a different worker count and the one-process path resume the same way.

Device: the workers compute where ``distill.device`` says, read against their reservation
(:func:`hetcomp_dist.device.under_reservation`): cuda exactly when ``distill.gpus_per_worker > 0``
(``auto`` then means cuda; ``cuda`` without GPUs and ``cpu`` with GPUs are refused before any work).
``use_gpu`` and the process group's backend follow (nccl on cuda, gloo on cpu), and a cuda worker's
current CUDA device is its assigned GPU (``ray.train.torch.get_device()``), which is what
``device.resolve`` gives the loop there.

Placement: ``ray.placement_strategy`` (the workers' placement group: PACK, SPREAD, STRICT_*). Ray Train's
own run folder: ``ray.train_storage_path`` (s3:// or a path every node shares; see :func:`hetcomp_dist.ray_cluster.train_storage`).

Fault injection for tests: ``hooks`` (picklable callables) are called on every worker after each
evaluation and its checkpoint, as :func:`hetcomp_dist.distill.train.distill` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from hetcomp_dist import device, lineage, storage
from hetcomp_dist.ray_cluster import init_ray, train_storage
from hetcomp_dist.run import RunConfig, ensure_dataset


def distill_ray(cfg: RunConfig, report: Callable[[dict], None] | None = None,
                storage_path: str | None = None, hooks: Sequence[Callable] = (),
                log_format: str = "text") -> dict[str, Any]:
    """Run the distillation on Ray Train with ``cfg.distill.workers`` workers; returns metrics.json's content.

    Args:
        cfg: the run config (``distill.workers``, ``cpus_per_worker``, ``gpus_per_worker``;
            ``ray.address`` / $RAY_ADDRESS to join a cluster, else a local instance; ``ray.max_failures``
            worker-group restarts after a failure; ``ray.placement_strategy``; ``ray.train_storage_path``).
        report: called on the driver with the final metrics' summary line data (progress is printed
            by rank 0 inside the workers and reaches the driver's log through Ray).
        storage_path: Ray Train's own run folder, instead of ``ray.train_storage_path`` (default: Ray's,
            ~/ray_results); our checkpoints and outputs live under the run URI regardless.
    """
    uris = cfg.layout.trajectories(cfg.teacher_names())
    out = cfg.student_uri()
    cfg = workers_config(cfg)                          # the device checked before any work
    dataset_uri = ensure_dataset(cfg)
    train_path, train_fs = train_storage(storage_path or cfg.ray.train_storage_path, cfg.storage.endpoint_url)
    with lineage.student_output(out, dataset_uri, uris) as (held, identity):   # the driver holds <out>'s lease
        fit(cfg, dataset_uri, uris, out, hooks, log_format, train_path, train_fs, held, identity)
    metrics = storage.read_json(out, "metrics.json")
    if report:
        report(metrics)
    return metrics


def fit(cfg: RunConfig, dataset_uri: str, uris: list[str], out: str, hooks: Sequence[Callable], log_format: str,
        train_path: str | None, train_fs: Any, held: Any, identity: dict) -> None:
    """Ray Train's run of :func:`_worker` on explicit inputs (the refresh passes a data version's): the
    workers check the driver's lease ``held`` before each manifest."""
    import ray
    from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distill
    placed = workers_device(d)
    started = init_ray(cfg.ray)
    try:
        resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg, "dataset_uri": dataset_uri, "teacher_uris": uris, "out": out,
                               "hooks": list(hooks), "log_format": log_format, "lease": held, "dataset": identity,
                               "device": placed},
            torch_config=TorchConfig(backend=device.backend(placed)),
            # use_gpu equals placed == "cuda": under_reservation ties cuda to GPUs reserved (and refuses cpu with them)
            scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=placed == "cuda",
                                         resources_per_worker=resources, placement_strategy=cfg.ray.placement_strategy),
            run_config=TrainRunConfig(name=f"distill-{d.method}", storage_path=train_path, storage_filesystem=train_fs,
                                      failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()


def workers_device(d: Any) -> str:
    """The workers' device, cpu or cuda, from ``distill.device`` and ``distill.gpus_per_worker``."""
    return device.under_reservation(d.device, d.gpus_per_worker, "distill.device", "distill.gpus_per_worker")


def workers_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``distill.device`` set to the workers' device (see :func:`workers_device`): a worker
    resolves what the driver placed, never ``auto`` again on a node whose GPUs it did not reserve."""
    placed = workers_device(cfg.distill)
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, device=placed))


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the distillation loop on this rank's users."""
    import ray.train
    import ray.train.torch
    import torch

    from hetcomp_dist.progress import Progress

    from hetcomp_dist.distill.train import distill

    cfg: RunConfig = config["cfg"]
    if cfg.storage.endpoint_url:
        storage.configure(endpoint_url=cfg.storage.endpoint_url)
    if config.get("device") == "cuda":
        device.resolve("cuda", "distill.device")           # one line if this worker's torch sees no GPU
        # Ray Train sets it too (when torch sees a GPU); set here so the loop's resolve("cuda") is this
        # worker's assigned GPU whatever Ray does, and nccl's object collectives use it.
        torch.cuda.set_device(ray.train.torch.get_device())
    rank = ray.train.get_context().get_world_rank()

    d = cfg.distill
    show = Progress(f"student {d.method} rank 0", d.max_epochs, d.select_metric, config.get("log_format", "text"))

    def report(event: dict) -> None:
        if rank == 0:                          # every rank sees the same all-reduced figures: one prints them
            show(event)
        if "valid" in event:  # every rank evaluates, so every rank reports (Ray Train's report is collective)
            ray.train.report({"epoch": event["epoch"], "valid": event["valid"], "best": event["best"]})

    with lineage.worker_scope(config["out"], config.get("lease"), config.get("dataset")):
        distill(config["dataset_uri"], config["teacher_uris"], cfg.distill, config["out"], tuple(cfg.ks), report,
                config.get("hooks", ()))
