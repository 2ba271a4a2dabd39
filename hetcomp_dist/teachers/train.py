"""Train one teacher: the flat loop, with valid evaluation, trajectory snapshots and checkpoints.

Resumable: each evaluation writes the snapshot, then a checkpoint (model, optimiser, loop state)
under ``<teacher>/checkpoints/epoch-N``; a restarted run loads the newest complete checkpoint and
the trajectory writer drops snapshots taken after it, so the trajectory has no duplicates.
Batches are drawn from an RNG seeded by (seed, epoch), so a resumed epoch sees the same batches.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hetcomp_dist import config, models, storage
from hetcomp_dist.data.dataset import Interactions, load_dataset
from hetcomp_dist.evaluate import evaluate_split, topk_items
from hetcomp_dist.teachers.config import TeacherConfig, TrajectoryConfig
from hetcomp_dist.teachers.trajectory import TrajectoryWriter


Report = Callable[[dict[str, Any]], None]


def train_teacher(cfg: TeacherConfig, dataset_uri: str, out: str, trajectory: TrajectoryConfig = TrajectoryConfig(),
                  ks: tuple[int, ...] = (10, 20, 50), eval_batch_size: int = 1024,
                  report: Report = lambda event: None) -> dict[str, Any]:
    """Train ``cfg`` on the dataset at ``dataset_uri``; write its trajectory and checkpoints under ``out``.

    Returns a summary: best epoch, valid metrics at it, test metrics of the best model, timings.
    """
    torch.set_num_threads(cfg.threads)
    data = load_dataset(dataset_uri)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, data.n_users, data.n_items, data.train, cfg.params)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    eval_users = data.eval_users()

    state = latest_checkpoint(out, cfg)
    traj_uri = storage.join(out, "trajectory")
    traj_args = dict(model=cfg.model, n_users=data.n_users, k=trajectory.k, n_items=data.n_items,
                     observed_k=trajectory.observed_k)
    if state is None:
        storage.remove(storage.join(out, "checkpoints"))  # another config's: never resumed, nor kept
        loop = {"epoch": 0, "best_epoch": 0, "best": -1.0, "bad_evals": 0, "train_seconds": 0.0}
        best_model = None
        writer = TrajectoryWriter(traj_uri, **traj_args, config=asdict(cfg), overwrite=True)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loop, best_model = state["loop"], state["best_model"]
        writer = TrajectoryWriter.resume(traj_uri, loop["epoch"], **traj_args, config=asdict(cfg))
        report({"teacher": cfg.name, "event": "resumed", "epoch": loop["epoch"]})

    for epoch in range(loop["epoch"] + 1, cfg.max_epochs + 1):
        model.train()
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        rng = np.random.default_rng([cfg.seed, epoch])
        start, total, n = time.perf_counter(), 0.0, 0
        for batch in model.batches(data.train, cfg.batch_size, rng):
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.after_step()
            total, n = total + loss.item(), n + 1
        loop["train_seconds"] += time.perf_counter() - start
        event = {"teacher": cfg.name, "event": "epoch", "epoch": epoch, "loss": total / max(n, 1),
                 "epoch_seconds": time.perf_counter() - start}
        out_of_time = 0 < cfg.max_seconds <= loop.get("seconds", 0.0) + time.perf_counter() - start
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or out_of_time:  # out of time: last evaluation
            model.eval()
            with torch.no_grad():
                scorer = model.scorer()
                metrics = evaluate_split(scorer, data, "valid", ks, eval_batch_size, users=eval_users)
                writer.write_snapshot(epoch, metrics, _snapshot_batches(scorer, data.train, trajectory.k, eval_batch_size))
            value = metrics[cfg.select_metric]
            improved = value > loop["best"] + cfg.min_delta
            if value > loop["best"]:
                loop.update(best=value, best_epoch=epoch)
                best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if improved:
                loop["bad_evals"] = 0
            else:
                loop["bad_evals"] += 1
                for group in optimizer.param_groups:  # saved with the optimizer, so a resumed run keeps it
                    group["lr"] *= cfg.lr_decay
            loop["epoch"] = epoch
            loop["seconds"] = loop.get("seconds", 0.0) + time.perf_counter() - start  # with evaluations
            _save_checkpoint(out, epoch, cfg, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "loop": dict(loop), "best_model": best_model})
            event.update(valid=value, best=loop["best"], best_epoch=loop["best_epoch"])
            report(event)
            if loop["bad_evals"] >= cfg.patience or 0 < cfg.max_seconds <= loop["seconds"]:
                break
        else:
            loop["seconds"] = loop.get("seconds", 0.0) + time.perf_counter() - start
            report(event)

    model.load_state_dict(best_model)
    model.eval()
    with torch.no_grad():
        scorer = model.scorer()
        test = evaluate_split(scorer, data, "test", ks, eval_batch_size, users=eval_users)
        valid = evaluate_split(scorer, data, "valid", ks, eval_batch_size, users=eval_users)
        summary = {"teacher": cfg.name, "model": cfg.model, "best_epoch": loop["best_epoch"],
                   "epochs_trained": loop["epoch"], "train_seconds": loop["train_seconds"],
                   "valid": valid, "test": test}
        writer.finish(_observed_batches(scorer, data.train, trajectory.observed_k, eval_batch_size),
                      trajectory.fractions, cfg.select_metric, extra={"summary": summary})
    report({"teacher": cfg.name, "event": "done", **summary})
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
        picked = torch.gather(scores, 1, torch.from_numpy(np.maximum(grid, 0)))
        picked[torch.from_numpy(grid < 0)] = -torch.inf
        order = torch.argsort(picked, dim=1, descending=True, stable=True).numpy()
        ranked = np.take_along_axis(grid, order, axis=1)[:, :width]
        yield users, ranked.astype(np.int32)


def _checkpoint_uri(out: str, epoch: int) -> str:
    return storage.join(out, "checkpoints", f"epoch-{epoch:06d}")


# Settings that change where or how fast a teacher trains, not what it computes: they may differ
# between a finished teacher and the config asking for it. A checkpoint may also be resumed under other
# stopping rules (train a run further, or stop it where it is): the epochs before the stop are the same.
_RESOURCES = ("threads", "cpus", "gpus")
_STOPPING = ("max_epochs", "max_seconds", "patience", "min_delta")


def _run_settings(cfg: TeacherConfig, ignore: tuple[str, ...] = _RESOURCES) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in ignore}


def same_settings(stored: Any, cfg: TeacherConfig, resuming: bool = False) -> bool:
    """Whether ``stored`` (a teacher config as written to storage) trains the same teacher as ``cfg``
    (config.compatible): resources may differ, and with ``resuming`` the stopping rules."""
    return config.compatible(TeacherConfig, stored, cfg, _RESOURCES + (_STOPPING if resuming else ()))


def _save_checkpoint(out: str, epoch: int, cfg: TeacherConfig, state: dict[str, Any]) -> None:
    """Write the checkpoint of ``epoch`` (complete once its manifest exists), then drop older ones."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with storage.open_output(_checkpoint_uri(out, epoch), kind="teacher-checkpoint",
                             config={"epoch": epoch, "teacher": _run_settings(cfg)}) as o:
        o.write_bytes("state.pt", buffer.getvalue())
    for older in _checkpoint_epochs(out):
        if older < epoch:
            storage.remove(_checkpoint_uri(out, older))


def _checkpoint_epochs(out: str) -> list[int]:
    fs, path = storage.filesystem(storage.join(out, "checkpoints"))
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("epoch-"))


def latest_checkpoint(out: str, cfg: TeacherConfig | None = None) -> dict[str, Any] | None:
    """The newest complete checkpoint (weights-only load), or None; with ``cfg``, only one written under it."""
    for epoch in reversed(_checkpoint_epochs(out)):
        uri = _checkpoint_uri(out, epoch)
        if not storage.is_complete(uri):
            continue
        if cfg is not None and not same_settings(storage.read_manifest(uri)["config"].get("teacher"), cfg, resuming=True):
            return None
        return torch.load(io.BytesIO(storage.read_bytes(uri, "state.pt")), weights_only=True)
    return None

