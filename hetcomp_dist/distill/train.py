"""The distillation loop: a student trained by an objective (distill/objectives.py), evaluated on
valid every ``eval_every`` epochs, early-stopped, checkpointed, then tested and written.

Shard-aware (data parallel over users; in one process the collectives are no-ops). With W
processes in the default process group (Ray Train's TorchTrainer, see
:mod:`hetcomp_dist.distill.ray_job`, or torchrun), rank r owns the users [start, stop)
(:func:`~hetcomp_dist.distill.student.user_range`):

- it loads only those users' interactions (``load_dataset(uri, users=(start, stop))``, by Parquet row
  group; one process loads the whole dataset) and reads only their part of the trajectories;
- its student holds those user rows and the whole item table (``item_updates: rows``: its item rows)
  (distill/student.py), drawn as one process draws them, without the whole user table ever being built;
- every rank draws the same global batches (an RNG seeded by (seed, epoch)) and keeps its own part
  of each (:func:`~hetcomp_dist.distill.objectives.epoch_batches`);
- the loss is a sum over users, so the item-table gradient is all-reduced with SUM before Adam's
  step: one W-process step equals one single-process step on the same global batch;
- ``distill.optimizer``: ``adam`` steps both tables densely (every user row, every step);
  ``rowwise_adam`` steps only the user rows of the batch (distill/optim.py), the item table densely;
- ``distill.item_updates: rows`` (sampled denominator only): the item table is split by rows too
  (:func:`~hetcomp_dist.distill.student.item_range`). Each step gathers the rows any rank looks up
  from their owners, sums their gradients over ranks, and each owner steps its own rows with
  row-wise Adam; evaluation assembles the whole table for its duration;
- evaluation sums are all-reduced, so every rank takes the same stopping and DKC decisions;
- after every evaluation every rank writes its own rows of a checkpoint (loop.Checkpointer under
  ``<out>/checkpoints``, nothing gathered); a restarted run resumes from it with any number of
  workers. The checkpoints are removed once the outputs are written.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hetcomp_dist import config, device, distributed, storage
from hetcomp_dist.data.dataset import Dataset, dataset_meta, load_dataset
from hetcomp_dist.distill import baselines, dissensus
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.objectives import StoredListScorer, build_objective, epoch_batches
from hetcomp_dist.distill.optim import RowwiseAdam
from hetcomp_dist.distill.student import (ITEM_KEY, USER_KEY, Student, build_student, gather_rows, item_range,
                                          optimizer_rows, rows, user_range)
from hetcomp_dist.loop import Checkpointer, Stopping

Report = Callable[[dict[str, Any]], None]
Hook = Callable[[dict[str, Any], int, int], None]    # (evaluation event, rank, world size), after its checkpoint

# Settings a checkpoint may be resumed under when they differ: where and how long it runs.
# The device too: a checkpoint is written with CPU tensors and resumes on any device (and the Ray driver
# rewrites distill.device from auto to the placed cpu or cuda, so stored settings differ from the YAML's).
RESUMABLE_IGNORES = ("workers", "cpus_per_worker", "gpus_per_worker", "threads", "max_epochs", "max_train_seconds",
                     "out", "checkpoint", "device")


def distill(dataset_uri: str, teacher_uris: list[str], cfg: DistillConfig, out: str,
            ks: tuple[int, ...] = (10, 20, 50), report: Report = lambda e: None,
            hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train a student on ``dataset_uri`` from the teachers' trajectories; write results under ``out``.

    In a process group of W ranks every rank calls it; rank 0 writes, every rank returns the same
    metrics. ``hooks`` are called on every rank after each evaluation (tests inject faults there).
    """
    dev = _device(cfg)                                        # before any work: cuda without a GPU is one line
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, load_rank_dataset(dataset_uri), teacher_uris, ks, dev)
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


def _device(cfg: DistillConfig) -> torch.device:
    """The loop's device (``distill.device``). Under Ray Train a cuda worker's current device is its assigned
    GPU (ray_job._worker sets it). Under torchrun (TORCHELASTIC_RUN_ID set; Ray Train sets LOCAL_RANK too, but
    not that) with nccl, this rank takes the GPU of its LOCAL_RANK."""
    if (cfg.device != "cpu" and "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ
            and dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.is_available()):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return device.resolve(cfg.device, "distill.device")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def load_rank_dataset(uri: str) -> Dataset:
    """This rank's slice of the dataset (its ``user_range``); one process: the whole, sha256-verified."""
    rank, world = _rank_world()
    if world == 1:
        return load_dataset(uri)
    return load_dataset(uri, users=user_range(int(dataset_meta(uri)["n_users"]), rank, world))


def checkpointer(out: str, cfg: DistillConfig) -> Checkpointer:
    """The student's checkpoints: resumed under the same settings (config.compatible, RESUMABLE_IGNORES aside)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_IGNORES}
    return Checkpointer(storage.join(out, "checkpoints"), "student-checkpoint", {"distill": settings},
                        lambda stored: config.compatible(DistillConfig, stored.get("distill"), cfg, RESUMABLE_IGNORES))


class _Run:
    """One rank's distillation: the student, its optimizer, its objective and the loop's state."""

    def __init__(self, cfg: DistillConfig, data: Dataset, teacher_uris: list[str], ks: tuple[int, ...],
                 dev: torch.device = torch.device("cpu")):
        self.cfg, self.data, self.teacher_uris, self.ks, self.device = cfg, data, teacher_uris, ks, dev
        self.rank, self.world = _rank_world()
        self.start, self.stop = user_range(data.n_users, self.rank, self.world)
        if data.held_users != (self.start, self.stop):
            raise ValueError(f"rank {self.rank} of {self.world} owns users [{self.start}, {self.stop}), "
                             f"the dataset holds {list(data.held_users)}")
        self.items = item_range(data.n_items, self.rank, self.world) if cfg.item_updates == "rows" else None
        # drawn on the CPU (the same start on every device), then moved before the optimizer exists
        self.student = build_student(data.n_users, data.n_items, cfg.dim, cfg.init_std, self.start, self.stop,
                                     items=self.items).to(dev)
        self.optimizer, self.rows = _optimizers(cfg, self.student)
        self.eval_users = data.eval_users()                       # the slice's own
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
        loaded = (checkpoints.load_shards(self.start, self.stop, self.items)
                  or _legacy_checkpoint(checkpoints.root, self.cfg))
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
        items = local.get("items") or self._item_slice(shared)
        self.student.load_state_dict({USER_KEY: local["user"], ITEM_KEY: items["item"]})
        self.best_state = {USER_KEY: local["best_user"].to(self.device), ITEM_KEY: items["best_item"].to(self.device)}
        optimizer = shared["optimizer"]      # CPU tensors: Adam's load_state_dict moves them to each param's device
        if "user" in self.rows:                   # rowwise_adam: the user rows' own state; the dense Adam the items'
            if self.optimizer is not None:
                self.optimizer.load_state_dict(optimizer)
            self.rows["user"].load_state_dict({"exp_avg": local["exp_avg"], "exp_avg_sq": local["exp_avg_sq"],
                                               "step": local["row_step"]})
        else:
            optimizer["state"][0] = {**optimizer["state"][0], "exp_avg": local["exp_avg"],
                                     "exp_avg_sq": local["exp_avg_sq"]}
            self.optimizer.load_state_dict(optimizer)
        if "item" in self.rows:
            self.rows["item"].load_state_dict({k: items[f"row_{k}"] for k in ("exp_avg", "exp_avg_sq", "step")})
        self.objective.load_state_dict({"stage": local["stage"], "last": local["last"]})
        return shared

    def _item_slice(self, shared: dict[str, Any]) -> dict[str, Any]:
        """This rank's item state from a checkpoint's shared part (the whole table: written with dense item
        updates, or with rows before the item table was split)."""
        first, stop = self.items or (0, shared["item"].shape[0])
        out = {"item": shared["item"][first:stop], "best_item": shared["best_item"][first:stop]}
        for k, v in (shared.get("item_rows") or {}).items():
            out[f"row_{k}"] = v[first:stop]
        return out

    def _load_whole(self, state: dict[str, Any]) -> dict[str, Any]:
        start, stop = self.start, self.stop
        self.student.load_state_dict(rows(state["student"], start, stop, self.items))
        self.best_state = {k: v.to(self.device) for k, v in rows(state["best_state"], start, stop, self.items).items()}
        _load_dense_state(optimizer_rows(state["optimizer"], start, stop, self.items), self.optimizer, self.rows)
        self.objective.load_state_dict({"stage": state["stage"][start:stop], "last": state["last"][start:stop]})
        return state

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the epoch's global batches; returns the epoch event."""
        self.student.train()
        self.objective.start_epoch()
        rng = np.random.default_rng([self.cfg.seed, epoch])     # the same batches on every rank
        item_weight = self.student.tables.weight("item")
        # summed on the device in float64 (a step does not wait for the host): on the CPU the same sum as
        # adding loss.item()'s, bit for bit
        total, before = torch.zeros((), dtype=torch.float64, device=self.device), self.stopping.train_seconds
        with self.stopping.timing("train"):
            for batch in epoch_batches(rng, self.objective.n_units, self.objective.unit_range, self.cfg.batch_size):
                loss = self.objective.loss(batch, rng)
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=False)
                for table in self.rows.values():
                    table.zero_grad()
                if loss.requires_grad:
                    loss.backward()
                if "item" in self.rows:                           # items: the sum of every rank's users, over
                    self.student.owned_item_grad()                # ... the rows looked up, to their owners
                else:
                    distributed.all_reduce_grad(item_weight)
                if self.optimizer is not None:
                    self.optimizer.step()
                for table in self.rows.values():
                    table.step()                                  # the batch's rows only
                total += loss.detach().double()
            loss_sum = total.item()                    # inside the timing: waits for the device's queued steps
        self.epoch = epoch
        return {"event": "epoch", "epoch": epoch, "loss": distributed.sum_over_ranks(loss_sum),
                "phase": self.objective.phase, "epoch_seconds": self.stopping.train_seconds - before}

    def evaluate(self, epoch: int, loss: float) -> dict[str, Any]:
        """Valid metrics, the DKC check, early stopping and the checkpoint; returns the event's additions."""
        self.student.eval()
        with torch.no_grad(), self.stopping.timing("eval"), self.student.every_item():
            valid = distributed.evaluate(self.student.scores, self.data, "valid", self.ks, self.eval_users)
            self.objective.after_evaluation(epoch, self._gain(valid[self.cfg.select_metric]))
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

    def _gain(self, value: float) -> float | None:
        """Valid select_metric's relative change since the previous evaluation (None at the first)."""
        previous = self.history[-1]["valid"][self.cfg.select_metric] if self.history else 0.0
        return value / previous - 1.0 if previous > 0 else None

    def _save_checkpoint(self, epoch: int) -> None:
        """Every rank writes its own rows (nothing is gathered); rank 0 also the shared state and,
        once every rank's part is written, the manifest."""
        if self.checkpoints is None:
            return
        optimizer = None if self.optimizer is None else self.optimizer.state_dict()
        local = {"user": self.student.state_dict()[USER_KEY], "best_user": self.best_state[USER_KEY],
                 **self.objective.state_dict()}
        if "user" in self.rows:                   # rowwise_adam: the dense optimizer is the items' alone (or none)
            rows = self.rows["user"].state_dict()
            local.update(exp_avg=rows["exp_avg"], exp_avg_sq=rows["exp_avg_sq"], row_step=rows["step"])
        else:
            user_moments = optimizer["state"].get(0, {})             # param 0: the user table
            local.update(exp_avg=user_moments.get("exp_avg"), exp_avg_sq=user_moments.get("exp_avg_sq"))
            optimizer["state"] = {**optimizer["state"], 0: {k: v for k, v in user_moments.items()
                                                           if k not in ("exp_avg", "exp_avg_sq")}}
        shared = {"epoch": epoch, "optimizer": optimizer, "history": self.history, "progress": self.progress,
                  "stopping": self.stopping.state_dict(), "resumes": self.resumes}
        items = {"item": self.student.state_dict()[ITEM_KEY], "best_item": self.best_state[ITEM_KEY]}
        split = None
        if "item" in self.rows:                   # split by item rows: each rank its own, with their Adam state
            items.update({f"row_{k}": v for k, v in self.rows["item"].state_dict().items()})
            split = (device.to_cpu(items), self.items)
        else:
            shared.update(items)
        self.checkpoints.save_shards(epoch, device.to_cpu(shared), device.to_cpu(local), (self.start, self.stop),
                                     self.rank, self.world, items=split)

    def finish(self, out: str) -> dict[str, Any]:
        """Test the best state, write student.pt, metrics.json and the report (rank 0); returns the metrics."""
        if self.best_state is not None:          # None only when no evaluation ran (max_epochs < eval_every)
            self.student.load_state_dict(self.best_state)
        self.student.eval()
        scorer = self.student.scores             # the post-hoc popularity penalty applies only to the final ranking
        if self.cfg.pop_penalty:
            pop = dissensus.popularity_percentile(self.data.train.item_counts())
            scorer = baselines.penalised_scorer(self.student.scores, pop, self.cfg.pop_penalty)
        with torch.no_grad(), self.student.every_item():
            test = distributed.evaluate(scorer, self.data, "test", self.ks, self.eval_users)
            valid = distributed.evaluate(scorer, self.data, "valid", self.ks, self.eval_users)
            stages = self._trajectory_stages()
        metrics = self._metrics(test, valid, stages)
        full = gather_rows(self.student.state_dict(), self.student.items_split)   # whole, on rank 0 only, on the CPU
        if full is not None:
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
                "rank_bytes": self._rank_bytes(), "optimizer": self.cfg.optimizer,
                "teacher_weights": getattr(self.objective, "weights_record", None)}

    def _rank_bytes(self) -> list[dict[str, int]]:
        """What each rank holds during training, in bytes (a collective): its dataset slice, its student
        (rows and best rows), its optimizer state (moments, kept gradients) and its objective's arrays."""
        size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors if t is not None)  # noqa: E731
        splits = (self.data.train, self.data.valid, self.data.test)
        data = sum(s.indptr.nbytes + s.indices.nbytes + (0 if s.item_totals is None else s.item_totals.nbytes)
                   for s in splits)
        student = size(self.student.state_dict().values()) + size((self.best_state or {}).values())
        dense = {} if self.optimizer is None else self.optimizer.state
        optimizer = size(v for state in dense.values() for v in state.values() if isinstance(v, torch.Tensor))
        optimizer += size(p.grad for p in self.student.parameters() if p.grad is not None and not p.grad.is_sparse)
        optimizer += sum(size(table.state_dict().values()) for table in self.rows.values())
        mine = torch.tensor([[data, student, optimizer, self.objective.resident_bytes()]], dtype=torch.int64)
        keys = ("data", "student", "optimizer", "objective")
        return [dict(zip(keys, map(int, row))) for row in distributed.gather_cat(mine).tolist()]


def _optimizers(cfg: DistillConfig, student: Student) -> tuple[torch.optim.Optimizer | None, dict[str, RowwiseAdam]]:
    """(the dense Adam of the tables stepped whole, or None; {table: RowwiseAdam} of the tables stepped by rows).

    ``optimizer: rowwise_adam`` steps the user table by rows, ``item_updates: rows`` the item table.
    Dense gradients are kept (zeroed, not freed) between steps: every rank all-reduces and steps every
    batch, also one whose batch held none of its users. ``adam`` with dense items keeps earlier versions'
    optimizer (and checkpoint layout): one Adam over both tables, param 0 the user table.
    """
    if cfg.optimizer not in ("adam", "rowwise_adam"):
        raise ValueError(f"distill.optimizer: expected adam or rowwise_adam, got {cfg.optimizer!r}")
    by_rows = {"user": cfg.optimizer == "rowwise_adam", "item": cfg.item_updates == "rows"}
    dense = [student.tables.weight(t) for t in ("user", "item") if not by_rows[t]]
    optimizer = torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True) if dense else None
    for p in dense:
        p.grad = torch.zeros_like(p)
    student.sparse_user_grad = by_rows["user"]
    return optimizer, {t: RowwiseAdam(student.tables.weight(t), cfg.lr, weight_decay=cfg.weight_decay)
                       for t, on in by_rows.items() if on}


def _load_dense_state(state: dict[str, Any], dense: torch.optim.Optimizer | None, rows: dict[str, RowwiseAdam]) -> None:
    """A whole checkpoint's two-table Adam state (param 0 the users, already cut to this rank's rows; param 1
    the items; ``refresh``'s warm start writes one under any settings) into this run's optimizers. A table
    stepped by rows takes its moments with every row at the dense step count (dense Adam stepped every row
    at every step)."""
    tables = ("user", "item")
    kept = [i for i, t in enumerate(tables) if t not in rows]
    if dense is not None:
        group = {**state["param_groups"][0], "params": list(range(len(kept)))}
        dense.load_state_dict({"state": {j: state["state"][i] for j, i in enumerate(kept) if i in state["state"]},
                               "param_groups": [group]})
    for i, table in enumerate(tables):
        moments = state["state"].get(i)
        if table in rows and moments:
            step = torch.full((moments["exp_avg"].shape[0],), int(moments["step"]), dtype=torch.int32)
            rows[table].load_state_dict({"exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"],
                                         "step": step})


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
