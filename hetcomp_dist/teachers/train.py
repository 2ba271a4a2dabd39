"""Train one teacher: the loop, with valid evaluation, trajectory snapshots and checkpoints.

Resumable: each evaluation writes the snapshot, then a checkpoint (model, optimiser, stopping
state) through :class:`hetcomp_dist.loop.Checkpointer` under ``<teacher>/checkpoints``; a restarted
run loads the newest complete checkpoint and the trajectory writer drops snapshots taken after it,
so the trajectory has no duplicates. Batches are drawn from an RNG seeded by (seed, epoch), so a
resumed epoch sees the same batches.

A teacher with ``workers > 1`` trains sharded on Ray Train workers instead (:mod:`.sharded`), with the
same checkpoints, evaluations, stopping and trajectory.

Device (``cfg.device``, :mod:`hetcomp_dist.device`): the model, its loss, the optimiser state and the
evaluation's scores and top-K live there; batches are drawn with numpy on the CPU (the same batches on
every device) and moved to it. Results come to the CPU only to be written: top-K lists, metrics,
checkpoints (written with CPU tensors, so a checkpoint resumes on any device).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hetcomp_dist import config, lineage, models, storage
from hetcomp_dist.device import resolve, to_cpu
from hetcomp_dist.data.dataset import Dataset, Interactions, load_dataset
from hetcomp_dist.evaluate import evaluate_split, topk_items
from hetcomp_dist.loop import Checkpointer, Stopping
from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig
from hetcomp_dist.teachers.trajectory import TrajectoryWriter

Report = Callable[[dict[str, Any]], None]


def train_teacher(cfg: TeacherConfig, dataset_uri: str, out: str, trajectory: TrajectoryConfig = TrajectoryConfig(),
                  ks: tuple[int, ...] = (10, 20, 50), eval_batch_size: int = 1024,
                  report: Report = lambda event: None, device: torch.device | None = None) -> dict[str, Any]:
    """Train ``cfg`` on the dataset at ``dataset_uri``; write its trajectory and checkpoints under ``out``.

    ``device``: where to train; default ``cfg.device`` resolved here, before any work (a Ray actor
    passes the device its reservation allows). Returns a summary: best epoch, valid metrics at it, test
    metrics of the best model, timings.
    """
    if cfg.workers > 1:   # never silently whole: another optimizer, and checkpoints a sharded run cannot read
        raise config.ConfigError(f"teacher {cfg.name}: workers {cfg.workers}: a sharded teacher trains on Ray Train "
                                 "(hetcomp train-teachers without --sequential), not in one process")
    device = device if device is not None else resolve(cfg.device, f"teacher {cfg.name}: device")
    torch.set_num_threads(cfg.threads)
    data = load_dataset(dataset_uri)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, data.n_users, data.n_items, data.train, cfg.params, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    stopping = Stopping(cfg.patience, cfg.min_delta, cfg.max_train_seconds)
    checkpoints = checkpointer(out, cfg, lineage.identity_of(data.meta))
    epoch, best_model, writer = _resume(checkpoints, model, optimizer, stopping, out, cfg, data, trajectory, report)
    evaluate = Evaluator(data, ks, eval_batch_size, trajectory.k)

    for epoch in range(epoch + 1, cfg.max_epochs + 1):
        before = stopping.train_seconds
        with stopping.timing("train"):
            loss = _train_epoch(model, optimizer, data.train, cfg, epoch)
        event = {"teacher": cfg.name, "event": "epoch", "epoch": epoch, "loss": loss,
                 "epoch_seconds": stopping.train_seconds - before}
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or stopping.out_of_time:
            value = evaluate.snapshot(model, writer, epoch, cfg.select_metric, stopping)
            new_best, improved = stopping.update(epoch, value)
            if new_best:
                best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if not improved:
                for group in optimizer.param_groups:  # saved with the optimizer, so a resumed run keeps it
                    group["lr"] *= cfg.lr_decay
            with stopping.timing("snapshot"):
                checkpoints.save(epoch, to_cpu({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "epoch": epoch, "stopping": stopping.state_dict(),
                                                "best_model": best_model}))
            event.update(valid=value, best=stopping.best, best_epoch=stopping.best_epoch)
            report(event)
            if stopping.done:
                break
        else:
            report(event)

    model.load_state_dict(best_model)
    summary = evaluate.finish(model, writer, cfg, stopping, epoch, trajectory)
    report({"teacher": cfg.name, "event": "done", **summary})
    return summary


def checkpointer(out: str, cfg: TeacherConfig, dataset: dict[str, Any] | None = None) -> Checkpointer:
    """The teacher's checkpoints: resumed under the same settings (resources and stopping rules aside) and,
    given the dataset's identity (lineage), on the same dataset (checkpoints that record none still resume)."""
    return Checkpointer(storage.join(out, "checkpoints"), "teacher-checkpoint",
                        {"teacher": _run_settings(cfg), **({lineage.KEY: dataset} if dataset else {})},
                        lambda stored: same_settings(stored.get("teacher"), cfg, resuming=True) and (
                            dataset is None or stored.get(lineage.KEY) is None
                            or lineage.same(stored.get(lineage.KEY), dataset)))


def _resume(checkpoints: Checkpointer, model, optimizer, stopping: Stopping, out: str, cfg: TeacherConfig,
            data: Dataset, trajectory: TrajectoryConfig, report: Report):
    """(last epoch done, best weights, trajectory writer): from the newest checkpoint, or a fresh start."""
    state = checkpoints.load()
    if state is None:
        checkpoints.clear()  # another config's: never resumed, nor kept
        return 0, None, trajectory_writer(out, cfg, data, trajectory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    epoch = load_loop_state(state, stopping)
    report({"teacher": cfg.name, "event": "resumed", "epoch": epoch})
    return epoch, state["best_model"], trajectory_writer(out, cfg, data, trajectory, epoch)


def trajectory_writer(out: str, cfg: TeacherConfig, data: Dataset, trajectory: TrajectoryConfig,
                      resumed_at: int | None = None) -> TrajectoryWriter:
    """The teacher's trajectory writer: a new one, or (``resumed_at``) one that drops later snapshots."""
    traj_uri = storage.join(out, "trajectory")
    traj_args = dict(model=cfg.model, n_users=data.n_users, k=trajectory.k, n_items=data.n_items,
                     observed_k=trajectory.observed_k, config=asdict(cfg))
    if resumed_at is None:
        return TrajectoryWriter(traj_uri, **traj_args, overwrite=True)
    return TrajectoryWriter.resume(traj_uri, resumed_at, **traj_args)


def load_loop_state(state: dict[str, Any], stopping: Stopping) -> int:
    """The epoch a checkpoint was written at; its stopping state loaded (also from the older format)."""
    if "stopping" in state:
        stopping.load_state_dict(state["stopping"])
        return state["epoch"]
    loop = state["loop"]                 # checkpoints written before the loop kit
    stopping.load_state_dict({"best": loop["best"], "best_epoch": loop["best_epoch"], "bad": loop["bad_evals"],
                              "train_seconds": loop["train_seconds"]})
    return loop["epoch"]


def _train_epoch(model, optimizer, train: Interactions, cfg: TeacherConfig, epoch: int) -> float:
    """One pass over the train interactions, on the model's device; returns the mean batch loss."""
    model.train()
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    rng = np.random.default_rng([cfg.seed, epoch])
    device = next(model.parameters()).device
    # The losses are summed where they are computed, in float64 as Python's floats were: one host sync
    # per epoch instead of one per step (loss.item()), which would stall a GPU at every batch.
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in model.batches(train, cfg.batch_size, rng):
        # non_blocking: the copy needs no wait for the steps already queued on a GPU; a no-op on the CPU.
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step()
        total += loss.detach().double()
        n += 1
    return total.item() / max(n, 1)


class Evaluator:
    """Valid evaluation with the trajectory snapshot, and the final test evaluation."""

    def __init__(self, data: Dataset, ks: tuple[int, ...], batch_size: int, k: int):
        self.data, self.ks, self.batch_size, self.k = data, ks, batch_size, k
        self.users = data.eval_users()

    def snapshot(self, model, writer: TrajectoryWriter, epoch: int, metric: str, stopping: Stopping) -> float:
        model.eval()
        with torch.no_grad():
            scorer = model.scorer()
            with stopping.timing("eval"):
                metrics = evaluate_split(scorer, self.data, "valid", self.ks, self.batch_size, users=self.users)
            with stopping.timing("snapshot"):
                writer.write_snapshot(epoch, metrics, _snapshot_batches(scorer, self.data.train, self.k, self.batch_size))
        return metrics[metric]

    def finish(self, model, writer: TrajectoryWriter, cfg: TeacherConfig, stopping: Stopping, epoch: int,
               trajectory: TrajectoryConfig) -> dict[str, Any]:
        """Test and valid metrics of the best model; the trajectory finished with its observed ranking."""
        model.eval()
        with torch.no_grad():
            scorer = model.scorer()
            test = evaluate_split(scorer, self.data, "test", self.ks, self.batch_size, users=self.users)
            valid = evaluate_split(scorer, self.data, "valid", self.ks, self.batch_size, users=self.users)
            summary = {"teacher": cfg.name, "model": cfg.model, "best_epoch": stopping.best_epoch,
                       "epochs_trained": epoch, "train_seconds": stopping.train_seconds,
                       "seconds": stopping.seconds(), "valid": valid, "test": test}
            writer.finish(_observed_batches(scorer, self.data.train, trajectory.observed_k, self.batch_size),
                          trajectory.fractions, cfg.select_metric,
                          extra={"summary": summary, lineage.KEY: lineage.identity_of(self.data.meta)})
        return summary


def _snapshot_batches(scorer, train: Interactions, k: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every user's top-k unobserved (non-train) items, in user batches."""
    for start in range(0, train.n_users, batch_size):
        users = np.arange(start, min(start + batch_size, train.n_users))
        yield users, topk_items(scorer, train, users, k, batch_size)


def _observed_batches(scorer, train: Interactions, width: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each user's train items in the model's rank order (best first), at most ``width``, padded with -1."""
    counts = train.counts()
    for start in range(0, train.n_users, batch_size):
        users = np.arange(start, min(start + batch_size, train.n_users))
        row, items = train.rows(users)
        longest = int(counts[users].max(initial=0))
        grid = np.full((len(users), max(longest, 1)), -1, dtype=np.int64)
        col = np.arange(len(row)) - np.repeat(np.cumsum(counts[users]) - counts[users], counts[users])
        grid[row, col] = items
        scores = scorer(torch.from_numpy(users)).float()
        picked = torch.gather(scores, 1, torch.from_numpy(np.maximum(grid, 0)).to(scores.device))
        picked[torch.from_numpy(grid < 0).to(scores.device)] = -torch.inf
        order = torch.argsort(picked, dim=1, descending=True, stable=True).cpu().numpy()
        ranked = np.take_along_axis(grid, order, axis=1)[:, :width]
        yield users, ranked.astype(np.int32)


# Settings that change where or how fast a teacher trains, not what it computes (on a GPU the same
# teacher, up to floating-point rounding): they may differ between a finished teacher and the config
# asking for it. A checkpoint may also be resumed under other
# stopping rules (train a run further, or stop it where it is): the epochs before the stop are the same.
# item_sharding places the item tables differently, with the same updates.
_RESOURCES = ("threads", "cpus", "gpus", "device", "item_sharding")
_STOPPING = ("max_epochs", "max_train_seconds", "patience", "min_delta")


def _run_settings(cfg: TeacherConfig, ignore: tuple[str, ...] = _RESOURCES) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in ignore}


def same_settings(stored: Any, cfg: TeacherConfig, resuming: bool = False) -> bool:
    """Whether ``stored`` (a teacher config as written to storage) trains the same teacher as ``cfg``
    (config.compatible): resources may differ, and with ``resuming`` the stopping rules."""
    return config.compatible(TeacherConfig, stored, cfg, _RESOURCES + (_STOPPING if resuming else ()))


def latest_checkpoint(out: str, cfg: TeacherConfig | None = None) -> dict[str, Any] | None:
    """The newest complete checkpoint of the teacher at ``out`` (weights-only load), or None; with
    ``cfg``, only one written under compatible settings."""
    compatible = (lambda stored: True) if cfg is None else checkpointer(out, cfg).compatible
    return Checkpointer(storage.join(out, "checkpoints"), "teacher-checkpoint", {}, compatible).load()
