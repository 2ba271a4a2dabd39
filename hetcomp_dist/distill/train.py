"""The distillation loop: a student trained by an objective (distill/objectives.py), evaluated on
valid every ``eval_every`` epochs, early-stopped, checkpointed, then tested and written.

Shard-aware (data parallel over users; in one process the collectives are no-ops). With W
processes in the default process group (Ray Train's TorchTrainer, see
:mod:`hetcomp_dist.distill.ray_job`, or torchrun), rank r owns the users [start, stop)
(:func:`~hetcomp_dist.distill.student.user_range`):

- its student holds those user rows and the whole item table (distill/student.py);
- every rank draws the same global batches (an RNG seeded by (seed, epoch)) and keeps the rows of
  its own users; it reads only its users' part of the trajectories;
- the loss is a sum over users, so the item-table gradient is all-reduced with SUM before Adam's
  step: one W-process step equals one single-process step on the same global batch;
- evaluation sums are all-reduced, so every rank takes the same stopping and DKC decisions;
- after every evaluation rank 0 writes a checkpoint (loop.Checkpointer under ``<out>/checkpoints``,
  gathered from all ranks); a restarted run resumes from it with any number of workers. The
  checkpoints are removed once the outputs are written.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hetcomp_dist import config, distributed, storage
from hetcomp_dist.data.dataset import Dataset, load_dataset
from hetcomp_dist.distill import baselines, dissensus
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.objectives import StoredListScorer, build_objective
from hetcomp_dist.distill.student import (ITEM_KEY, USER_KEY, Student, build_student, gather_rows, optimizer_rows,
                                          rows, user_range)
from hetcomp_dist.loop import Checkpointer, Stopping

Report = Callable[[dict[str, Any]], None]
Hook = Callable[[dict[str, Any], int, int], None]    # (evaluation event, rank, world size), after its checkpoint

# Settings a checkpoint may be resumed under when they differ: where and how long it runs.
RESUMABLE_IGNORES = ("workers", "cpus_per_worker", "gpus_per_worker", "threads", "max_epochs", "max_train_seconds",
                     "out", "checkpoint")


def distill(dataset_uri: str, teacher_uris: list[str], cfg: DistillConfig, out: str,
            ks: tuple[int, ...] = (10, 20, 50), report: Report = lambda e: None,
            hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train a student on ``dataset_uri`` from the teachers' trajectories; write results under ``out``.

    In a process group of W ranks every rank calls it; rank 0 writes, every rank returns the same
    metrics. ``hooks`` are called on every rank after each evaluation (tests inject faults there).
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, load_dataset(dataset_uri), teacher_uris, ks)
    run.resume(checkpointer(out, cfg), report)
    first = cfg.max_epochs + 1 if run.stopping.done else run.epoch + 1     # a resumed run that had stopped
    for epoch in range(first, cfg.max_epochs + 1):
        event = run.train_epoch(epoch)
        if epoch % cfg.eval_every:
            report(event)
            continue
        event.update(run.evaluate(epoch, event["loss"]))      # the budget is checked here, not mid-way
        report(event)
        for hook in hooks:
            hook(event, run.rank, run.world)
        if run.stopping.done:
            break
    metrics = run.finish(out)
    if run.rank == 0 and cfg.checkpoint:
        checkpointer(out, cfg).clear()
    if run.world > 1:
        dist.barrier()
    return metrics


def checkpointer(out: str, cfg: DistillConfig) -> Checkpointer:
    """The student's checkpoints: resumed under the same settings (config.compatible, RESUMABLE_IGNORES aside)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_IGNORES}
    return Checkpointer(storage.join(out, "checkpoints"), "student-checkpoint", {"distill": settings},
                        lambda stored: config.compatible(DistillConfig, stored.get("distill"), cfg, RESUMABLE_IGNORES))


class _Run:
    """One rank's distillation: the student, its optimizer, its objective and the loop's state."""

    def __init__(self, cfg: DistillConfig, data: Dataset, teacher_uris: list[str], ks: tuple[int, ...]):
        self.cfg, self.data, self.teacher_uris, self.ks = cfg, data, teacher_uris, ks
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.start, self.stop = user_range(data.n_users, self.rank, self.world)
        self.student = build_student(data.n_users, data.n_items, cfg.dim, cfg.init_std, self.start, self.stop)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        for p in self.student.parameters():                       # kept (zeroed, not freed) between steps:
            p.grad = torch.zeros_like(p)                          # every rank all-reduces and steps every batch
        users = data.eval_users()
        self.eval_users = users[(users >= self.start) & (users < self.stop)]
        self.objective = build_objective(cfg, data, self.student, teacher_uris, self.start, self.stop, self.rank)
        self.stopping = Stopping(cfg.patience, 0.0, cfg.max_train_seconds)
        self.epoch, self.best_state, self.history, self.progress, self.resumes = 0, None, [], [], []
        self.checkpoints: Checkpointer | None = None

    def resume(self, checkpoints: Checkpointer, report: Report) -> None:
        """Continue from the newest compatible checkpoint: per-rank shards (any earlier worker count),
        or a whole gathered state (earlier versions, including their single-slot ``<out>/checkpoint``)."""
        if not self.cfg.checkpoint:
            return
        self.checkpoints = checkpoints
        loaded = checkpoints.load_shards(self.start, self.stop) or _legacy_checkpoint(checkpoints.root, self.cfg)
        if loaded is None:
            return
        shared = self._load_shards(*loaded) if isinstance(loaded, tuple) else self._load_whole(loaded)
        self.history, self.progress = shared["history"], shared["progress"]
        self.stopping.load_state_dict(shared.get("stopping") or {
            "best": shared["best"], "best_epoch": shared["best_epoch"], "bad": shared["bad"],
            "train_seconds": shared.get("train_seconds", 0.0)})
        self.epoch, self.resumes = shared["epoch"], shared["resumes"] + [shared["epoch"]]
        report({"event": "resumed", "epoch": shared["epoch"]})

    def _load_shards(self, shared: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
        self.student.load_state_dict({USER_KEY: local["user"], ITEM_KEY: shared["item"]})
        self.best_state = {USER_KEY: local["best_user"], ITEM_KEY: shared["best_item"]}
        optimizer = shared["optimizer"]
        optimizer["state"][0] = {**optimizer["state"][0], "exp_avg": local["exp_avg"], "exp_avg_sq": local["exp_avg_sq"]}
        self.optimizer.load_state_dict(optimizer)
        self.objective.load_state_dict({"stage": local["stage"], "last": local["last"]})
        return shared

    def _load_whole(self, state: dict[str, Any]) -> dict[str, Any]:
        start, stop = self.start, self.stop
        self.student.load_state_dict(rows(state["student"], start, stop))
        self.best_state = rows(state["best_state"], start, stop)
        self.optimizer.load_state_dict(optimizer_rows(state["optimizer"], start, stop))
        self.objective.load_state_dict({"stage": state["stage"][start:stop], "last": state["last"][start:stop]})
        return state

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the epoch's global batches; returns the epoch event."""
        self.student.train()
        self.objective.start_epoch()
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(self.objective.n_units)        # the same on every rank
        item_weight = self.student.tables.weight("item")
        total, before = 0.0, self.stopping.train_seconds
        with self.stopping.timing("train"):
            for lo in range(0, len(order), self.cfg.batch_size):
                loss = self.objective.loss(order[lo:lo + self.cfg.batch_size], rng)
                self.optimizer.zero_grad(set_to_none=False)
                if loss.requires_grad:
                    loss.backward()
                distributed.all_reduce_grad(item_weight)          # items: the sum of every rank's users
                self.optimizer.step()
                total += loss.item()
        self.epoch = epoch
        return {"event": "epoch", "epoch": epoch, "loss": distributed.sum_over_ranks(total),
                "phase": self.objective.phase, "epoch_seconds": self.stopping.train_seconds - before}

    def evaluate(self, epoch: int, loss: float) -> dict[str, Any]:
        """Valid metrics, the DKC check, early stopping and the checkpoint; returns the event's additions."""
        self.student.eval()
        with torch.no_grad(), self.stopping.timing("eval"):
            valid = distributed.evaluate(self.student.scores, self.data, "valid", self.ks, self.eval_users)
            self.objective.after_evaluation(epoch)
        stages = self.objective.info()
        if stages is not None:
            self.progress.append({"epoch": epoch, **stages})
        self.history.append({"epoch": epoch, "valid": valid, "loss": loss, "phase": self.objective.phase})
        value = valid[self.cfg.select_metric]                   # all-reduced: every rank decides alike
        if self.stopping.update(epoch, value)[0]:
            self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        with self.stopping.timing("snapshot"):
            self._save_checkpoint(epoch)
        return {"valid": value, "best": self.stopping.best, "best_epoch": self.stopping.best_epoch, "stages": stages,
                "eval_seconds": self.stopping.eval_seconds}

    def _save_checkpoint(self, epoch: int) -> None:
        """Every rank writes its own rows (nothing is gathered); rank 0 also the shared state and,
        once every rank's part is written, the manifest."""
        if self.checkpoints is None:
            return
        optimizer = self.optimizer.state_dict()
        user_moments = optimizer["state"].get(0, {})                 # param 0: the user table
        local = {"user": self.student.state_dict()[USER_KEY], "best_user": self.best_state[USER_KEY],
                 "exp_avg": user_moments.get("exp_avg"), "exp_avg_sq": user_moments.get("exp_avg_sq"),
                 **self.objective.state_dict()}
        optimizer["state"] = {**optimizer["state"], 0: {k: v for k, v in user_moments.items()
                                                       if k not in ("exp_avg", "exp_avg_sq")}}
        shared = {"epoch": epoch, "item": self.student.state_dict()[ITEM_KEY], "best_item": self.best_state[ITEM_KEY],
                  "optimizer": optimizer, "history": self.history, "progress": self.progress,
                  "stopping": self.stopping.state_dict(), "resumes": self.resumes}
        self.checkpoints.save_shards(epoch, shared, local, (self.start, self.stop), self.rank, self.world)

    def finish(self, out: str) -> dict[str, Any]:
        """Test the best state, write student.pt, metrics.json and the report (rank 0); returns the metrics."""
        if self.best_state is not None:          # None only when no evaluation ran (max_epochs < eval_every)
            self.student.load_state_dict(self.best_state)
        self.student.eval()
        scorer = self.student.scores             # the post-hoc popularity penalty applies only to the final ranking
        if self.cfg.pop_penalty:
            pop = dissensus.popularity_percentile(self.data.train.item_counts())
            scorer = baselines.penalised_scorer(self.student.scores, pop, self.cfg.pop_penalty)
        with torch.no_grad():
            test = distributed.evaluate(scorer, self.data, "test", self.ks, self.eval_users)
            valid = distributed.evaluate(scorer, self.data, "valid", self.ks, self.eval_users)
            stages = self._trajectory_stages()
        metrics = self._metrics(test, valid, stages)
        full = gather_rows(self.student.state_dict())
        if self.rank == 0:
            _write_outputs(out, self.cfg, full, metrics)
        return metrics

    def _trajectory_stages(self) -> dict[str, Any] | None:
        """Per teacher the epochs of its stages, and the test metrics of each stage's ensemble."""
        reader = getattr(self.objective, "reader", None)
        if reader is None:
            return None
        ks = tuple(sorted(set(self.ks) | {50}))
        ensembles = [distributed.evaluate(StoredListScorer(reader, self.data.n_items, self.cfg.temperature, stage=s),
                               self.data, "test", ks, self.eval_users) for s in range(reader.n_snapshots)]
        return {"epochs": dict(zip(self.teacher_uris, reader.stage_epochs())), "ensemble_test": ensembles}

    def _metrics(self, test: dict, valid: dict, stages: dict | None) -> dict[str, Any]:
        state_bytes = getattr(self.objective, "state_bytes", None)
        return {"method": self.cfg.method, "best_epoch": self.stopping.best_epoch,
                "epochs": self.history[-1]["epoch"] if self.history else 0,
                "train_seconds": self.stopping.train_seconds, "seconds": self.stopping.seconds(),
                "test": test, "valid": valid, "history": self.history, "dkc_progress": self.progress,
                "teachers": self.teacher_uris, "workers": self.world, "resumed_from": self.resumes,
                "trajectory_stages": stages, "state_bytes": None if state_bytes is None else state_bytes(),
                "teacher_weights": getattr(self.objective, "weights_record", None)}


def _legacy_checkpoint(root: str, cfg: DistillConfig) -> dict[str, Any] | None:
    """The single-slot ``<out>/checkpoint`` that versions before the loop kit wrote, if compatible."""
    uri = storage.join(root.rstrip("/").rsplit("/", 1)[0], "checkpoint")
    if not storage.is_complete(uri):
        return None
    stored = storage.read_manifest(uri).get("config")
    if not config.compatible(DistillConfig, stored, cfg, RESUMABLE_IGNORES):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(uri, "state.pt")), weights_only=True)


def _write_outputs(out: str, cfg: DistillConfig, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    from hetcomp_dist.distill.report import render as render_report  # matplotlib: imported only here

    with storage.open_output(out, kind="student", config=asdict(cfg)) as o:
        o.write_bytes("student.pt", buffer.getvalue())
        o.write_json("metrics.json", metrics)
        for name, data in render_report(metrics, cfg.select_metric).items():  # report.md, curves.png[, stages.png]
            o.write_bytes(name, data)


__all__ = ["ITEM_KEY", "USER_KEY", "Student", "distill", "checkpointer", "user_range", "RESUMABLE_IGNORES"]
