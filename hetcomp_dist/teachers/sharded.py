"""A teacher with ``workers > 1``: its tables sharded across Ray Train workers under TorchRec DMP.

    teachers:
      - {name: MF, model: bpr_mf, params: {dim: 64}, workers: 4, table_optimizer: rowwise_adagrad, cpus: 1}

Where it runs: the teacher's Ray actor (:class:`hetcomp_dist.teachers.actors.TeacherActor`, which then
reserves nothing itself) launches a TorchTrainer of ``workers`` workers, each reserving the teacher's
``cpus`` / ``gpus``, and waits for it. Launching from the actor keeps every teacher, sharded or not, one
actor that the driver waits on and restarts the same way, so sharded and unsharded teachers still train
concurrently. The actor owns the trainer's controller actor, so Ray's ownership rule should tear the
trainer down with the actor (not tested here); a dead Ray Train worker restarts the worker group
(``ray.max_failures``), which resumes from the checkpoint (tested).

What each worker does (:func:`train_sharded`): loads the dataset, builds the model with its tables on the
meta device and shards it (:mod:`hetcomp_dist.sharding`: user tables row_wise, item tables
``item_sharding``; the fused ``table_optimizer`` on the tables, Adam on NeuMF's dense layers under DDP),
and trains on its ``batch_size // workers`` rows of every global batch (the same batches as an unsharded
teacher draws, seeded by (seed, epoch)). Epochs, evaluation points, early stopping, ``lr_decay``, the
time budget (rank 0's clock, so every rank stops together), snapshots, checkpoints and the trajectory
follow :func:`hetcomp_dist.teachers.train.train_teacher`.

Evaluation and trajectories gather the whole state on rank 0: at each evaluation every table is gathered
to rank 0 (``ShardedModel.full_state_dict``), loaded into an unsharded copy of the model that rank 0 holds
for the whole run, and evaluated and snapshotted there as an unsharded teacher is; the other ranks wait.
Rank 0 therefore holds, on top of its shard: the unsharded model (on its device), the gathered state and
the best state (CPU), and at a checkpoint the gathered optimizer state (rowwise_adagrad: one float per
row; adagrad: a table's size). Checkpoints are whole (the same format as an unsharded teacher's, plus the
table optimizer's moments and learning-rate factor), written by rank 0; a resume reads the whole checkpoint on
every rank and each keeps its rows. ``workers`` and ``table_optimizer`` are teacher settings (another
optimizer, or another split of each batch, which drops ``batch_size % workers`` rows), so a checkpoint
resumes under the same ones; ``item_sharding`` only places rows and may differ.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from hetcomp_dist import device, lineage, models, sharding, storage
from hetcomp_dist.data.dataset import Interactions, load_dataset
from hetcomp_dist.loop import Checkpointer, Stopping
from hetcomp_dist.run import RunConfig
from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig
from hetcomp_dist.teachers.train import Evaluator, checkpointer, load_loop_state, trajectory_writer

Report = Callable[[dict[str, Any]], None]


def fit(cfg: RunConfig, teacher: TeacherConfig, dataset_uri: str, events: Any, placed: str, at: str,
        held: Any = None) -> dict[str, Any]:
    """In the teacher's actor: train ``teacher`` on a TorchTrainer of ``teacher.workers`` workers; returns
    its summary (from its trajectory's manifest, which rank 0 wrote last). The workers check the driver's
    lease ``held`` before each commit."""
    from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hetcomp_dist.ray_cluster import train_storage

    out = cfg.layout.teacher(teacher.name)
    path, fs = train_storage(cfg.ray.train_storage_path, cfg.storage.endpoint_url)
    resources = {"CPU": teacher.cpus, **({"GPU": teacher.gpus} if teacher.gpus else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "teacher": teacher, "dataset_uri": dataset_uri, "out": out,
                           "events": events, "device": placed, "at": at, "lease": held},
        torch_config=TorchConfig(backend=device.backend(placed)),
        scaling_config=ScalingConfig(num_workers=teacher.workers, use_gpu=placed == "cuda",
                                     resources_per_worker=resources, placement_strategy=cfg.ray.placement_strategy),
        run_config=TrainRunConfig(name=f"teacher-{teacher.name}", storage_path=path, storage_filesystem=fs,
                                  failure_config=FailureConfig(max_failures=cfg.ray.max_failures)))
    trainer.fit()
    return storage.read_manifest(storage.join(out, "trajectory"))["summary"]


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a sharded teacher; rank 0 pushes the progress events to the driver's box."""
    import ray
    import ray.train
    import ray.train.torch

    cfg: RunConfig = config["cfg"]
    if cfg.storage.endpoint_url:
        storage.configure(endpoint_url=cfg.storage.endpoint_url)
    if config["device"] == "cuda":
        device.resolve("cuda", f"{config['at']}.device")     # one line if this worker's torch sees no GPU
        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU, also for nccl's collectives
    rank = ray.train.get_context().get_world_rank()
    events = config["events"]

    def report(event: dict[str, Any]) -> None:   # waits for the box, as an unsharded teacher's actor does
        if rank == 0:
            ray.get(events.push.remote({**event, "pid": os.getpid()}))

    with lineage.worker_scope(cfg.layout.teachers, config.get("lease"), None):
        train_sharded(config["teacher"], config["dataset_uri"], config["out"], cfg.trajectory, tuple(cfg.ks),
                      cfg.eval_batch_size, report, device.resolve(config["device"], f"{config['at']}.device"))


def train_sharded(cfg: TeacherConfig, dataset_uri: str, out: str, trajectory: TrajectoryConfig,
                  ks: tuple[int, ...], eval_batch_size: int, report: Report,
                  where: torch.device) -> dict[str, Any] | None:
    """Train ``cfg`` sharded over the joined process group (every rank calls it); rank 0 writes the
    trajectory and checkpoints under ``out`` and returns the summary, the other ranks None."""
    torch.set_num_threads(cfg.threads)
    env = sharding.DistEnv.current(where)
    lead = env.rank == 0
    data = load_dataset(dataset_uri)
    model = sharding.build_meta(cfg.model, data.n_users, data.n_items, data.train, cfg.params)
    run = sharding.shard_model(model, sharding.plan(model, cfg.item_sharding), lr=cfg.lr,
                               table_optimizer=cfg.table_optimizer, weight_decay=cfg.weight_decay,
                               seed=cfg.seed, env=env)
    stopping = Stopping(cfg.patience, cfg.min_delta, cfg.max_train_seconds)
    checkpoints = checkpointer(out, cfg, lineage.identity_of(data.meta))
    # Rank 0 evaluates an unsharded copy loaded from the gathered state: the scorers read whole tables.
    whole = models.build(cfg.model, data.n_users, data.n_items, data.train, cfg.params, where) if lead else None
    evaluate = Evaluator(data, ks, eval_batch_size, trajectory.k) if lead else None
    epoch, best, writer = _resume(checkpoints, run, stopping, out, cfg, data, trajectory, report, lead)

    for epoch in range(epoch + 1, cfg.max_epochs + 1):
        start = time.perf_counter()
        loss = _train_epoch(run, data.train, cfg, epoch)
        seconds = _from_rank0(time.perf_counter() - start)   # one clock, so every rank stops at the same epoch
        stopping.train_seconds += seconds
        event = {"teacher": cfg.name, "event": "epoch", "epoch": epoch, "loss": loss, "epoch_seconds": seconds}
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or stopping.out_of_time:
            best, value = _evaluate(run, whole, evaluate, writer, stopping, checkpoints, cfg, epoch, best)
            event.update(valid=value, best=stopping.best, best_epoch=stopping.best_epoch)
            report(event)
            if stopping.done:
                break
        else:
            report(event)

    summary = None
    if lead:
        whole.load_state_dict(best)
        summary = evaluate.finish(whole, writer, cfg, stopping, epoch, trajectory)
        report({"teacher": cfg.name, "event": "done", **summary})
    dist.barrier()               # the trajectory is complete before any worker returns
    return summary


def _from_rank0(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _evaluate(run: sharding.ShardedModel, whole, evaluate: Evaluator | None, writer, stopping: Stopping,
              checkpoints: Checkpointer, cfg: TeacherConfig, epoch: int, best: Any) -> tuple[Any, float]:
    """Valid evaluation and snapshot of the gathered state on rank 0, stopping and lr_decay on every rank,
    then the whole checkpoint (rank 0); returns (the best state (rank 0's; None elsewhere), the valid value)."""
    state = run.full_state_dict(dst=0)                      # every table whole on rank 0 (collective)
    value = None
    if state is not None:
        whole.load_state_dict(state)
        value = evaluate.snapshot(whole, writer, epoch, cfg.select_metric, stopping)
    value = _from_rank0(value)
    new_best, improved = stopping.update(epoch, value)
    if new_best and state is not None:
        best = state
    if not improved:
        run.scale_lr(cfg.lr_decay)                          # saved with the optimizer, so a resumed run keeps it
    optimizer = run.full_optimizer_state(dst=0)            # collective
    if state is not None:
        with stopping.timing("snapshot"):
            checkpoints.save(epoch, {"model": state, "optimizer": optimizer, "epoch": epoch,
                                     "stopping": stopping.state_dict(), "best_model": best})
    return best, value


def _resume(checkpoints: Checkpointer, run: sharding.ShardedModel, stopping: Stopping, out: str, cfg: TeacherConfig,
            data, trajectory: TrajectoryConfig, report: Report, lead: bool):
    """(last epoch done, best state (rank 0), trajectory writer (rank 0)): from the newest checkpoint, which
    every rank reads whole and keeps its rows of, or a fresh start. Rank 0 decides which."""
    state = checkpoints.load()
    found = _from_rank0(state is not None)
    if found != (state is not None):
        raise RuntimeError(f"teacher {cfg.name}: rank 0 and this rank see different checkpoints under {out}")
    if state is None:
        dist.barrier()              # every rank has looked before rank 0 deletes another config's checkpoints
        if lead:
            checkpoints.clear()
        return 0, None, trajectory_writer(out, cfg, data, trajectory) if lead else None
    if "lr_scale" not in state["optimizer"]:   # e.g. a refresh's warm start, written in the one-process format
        raise RuntimeError(f"teacher {cfg.name}: the checkpoint under {out} was not written by a sharded run "
                           "(its optimizer state is Adam's); sharded teachers resume only their own checkpoints")
    run.load_full_state_dict(state["model"])
    run.load_full_optimizer_state(state["optimizer"])
    epoch = load_loop_state(state, stopping)
    report({"teacher": cfg.name, "event": "resumed", "epoch": epoch})
    if not lead:
        return epoch, None, None
    return epoch, state["best_model"], trajectory_writer(out, cfg, data, trajectory, epoch)


def _train_epoch(run: sharding.ShardedModel, train: Interactions, cfg: TeacherConfig, epoch: int) -> float:
    """One pass over this rank's part of every global batch; the mean batch loss over all ranks."""
    run.train()
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    rng = np.random.default_rng([cfg.seed, epoch])           # the same global batches on every rank
    total = torch.zeros(2, dtype=torch.float64, device=run.env.device)
    for batch in run.batches(train, cfg.batch_size, rng):
        loss = run.loss(batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()                                      # the table rows are updated here (fused)
        run.optimizer.step()                                 # the dense layers
        run.after_step()
        total[0] += loss.detach().double()
        total[1] += 1
    dist.all_reduce(total)                                   # each rank's loss is the mean over its rows
    return (total[0] / total[1].clamp(min=1)).item()
