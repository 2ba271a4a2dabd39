"""The distillation loop (ALGORITHM.md §4-6): ensemble targets from trajectories, DKC, AKT.

One flat loop, single process. State per user is O(T x S x K) ints (the trajectories of this
process's users) plus a cached target list; scores are dense only per batch (B x n_items).

Methods:
    hetcomp  - DKC over the trajectories (easy to hard), L_O until every stage is final, then L_R.
    ensemble - the final ensemble as the only target (trajectories unused: DKC off), L_R.
    bpr      - the student trained alone with BPR (no teachers).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from hetcomp_dist import storage
from hetcomp_dist.data.dataset import Dataset, load_dataset
from hetcomp_dist.distill import akt, dkc
from hetcomp_dist.distill.ensemble import ensemble_topk, rank_importance
from hetcomp_dist.evaluate import evaluate_split, topk_items
from hetcomp_dist.models import sampling
from hetcomp_dist.models.tables import Tables
from hetcomp_dist.teachers.trajectory import TrajectoryReader


@dataclass
class DistillConfig:
    method: Literal["hetcomp", "ensemble", "bpr"] = "hetcomp"
    teachers: list[str] = field(default_factory=list)   # default: every teacher of the run config
    dim: int = 6
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024           # train interactions per batch; their unique users form the loss batch
    max_epochs: int = 1000
    eval_every: int = 10             # also the DKC period p
    patience: int = 5                # evaluations without valid improvement
    select_metric: str = "recall@50"
    target_size: int = 100           # |T_u|
    observed_size: int = 10          # |P_u|
    lo_weight: float = 0.01
    lr_weight: float = 0.005
    temperature: float = 10.0        # rank importance exp(-r / temperature)
    alpha: float = 1.05
    decay: float = 0.995
    score_clamp: float = 40.0
    seed: int = 0
    threads: int = 2
    out: str | None = None           # default: <run>/distill/<method>


class Student(torch.nn.Module):
    """MF student: s_ui = <e_u, e_i>, tables on TorchRec (shardable)."""

    def __init__(self, n_users: int, n_items: int, dim: int, device: torch.device | None = None):
        super().__init__()
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std=0.1, device=device)

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.tables(user=users)["user"] @ self.tables.weight("item").T


Report = Callable[[dict[str, Any]], None]


def distill(dataset_uri: str, teacher_uris: list[str], cfg: DistillConfig, out: str,
            ks: tuple[int, ...] = (10, 20, 50), report: Report = lambda e: None) -> dict[str, Any]:
    """Train a student on ``dataset_uri`` from the teachers' trajectories; write results under ``out``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_dataset(dataset_uri)
    n_users, n_items = data.n_users, data.n_items
    student = Student(n_users, n_items, cfg.dim)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    eval_users = data.eval_users()
    importance = rank_importance(100, cfg.temperature)
    dcfg = dkc.DKCConfig(cfg.eval_every, cfg.alpha, cfg.decay)

    if cfg.method != "bpr":
        reader = TrajectoryReader(teacher_uris)
        lists = reader.trajectories(0, n_users)                       # [U, T, S, K]
        n_stages = lists.shape[2]
        stage = torch.zeros(n_users, lists.shape[1], dtype=torch.long)
        if cfg.method == "ensemble":
            stage[:] = n_stages - 1
        observed_rank = _observed_ranking(reader.observed(0, n_users), n_items, cfg.observed_size, importance)
        targets = _targets(lists, stage, n_items, cfg.target_size, importance)
        last = torch.zeros(stage.shape)
        state_bytes = lists.numel() * 4 + targets.numel() * 8 + observed_rank.numel() * 8 + stage.numel() * 8
    history, progress = [], []
    best, best_epoch, bad, best_state = -1.0, 0, 0, None
    train_users, train_items = data.train.users(), data.train.indices
    index = sampling.PairIndex(data.train)
    start_time = time.perf_counter()

    for epoch in range(1, cfg.max_epochs + 1):
        student.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(data.train.nnz)
        epoch_loss, t0 = 0.0, time.perf_counter()
        phase = "bpr" if cfg.method == "bpr" else ("L_O" if bool((stage < n_stages - 1).any()) else "L_R")
        for lo in range(0, len(order), cfg.batch_size):
            rows = order[lo:lo + cfg.batch_size]
            if phase == "bpr":
                u = torch.from_numpy(train_users[rows].astype(np.int64))
                pos = torch.from_numpy(train_items[rows].astype(np.int64))
                neg = torch.from_numpy(sampling.negatives(index, u.numpy(), rng).astype(np.int64))
                e = student.tables(user=u, item=torch.cat([pos, neg]))
                p_e, n_e = e["item"].chunk(2)
                loss = -F.logsigmoid((e["user"] * p_e).sum(-1) - (e["user"] * n_e).sum(-1)).mean()
            else:
                users = torch.from_numpy(np.unique(train_users[rows]).astype(np.int64))
                scores = student.scores(users).clamp(-cfg.score_clamp, cfg.score_clamp)
                observed = _observed_mask(data, users.numpy(), n_items)
                if phase == "L_O":
                    loss = cfg.lo_weight * akt.overall_loss(scores, observed, observed_rank[users], targets[users]).sum()
                else:
                    loss = cfg.lr_weight * akt.ranking_loss(scores, observed, observed_rank[users], targets[users]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item()
        event = {"event": "epoch", "epoch": epoch, "loss": epoch_loss, "phase": phase,
                 "epoch_seconds": time.perf_counter() - t0}

        if epoch % cfg.eval_every == 0:
            student.eval()
            with torch.no_grad():
                valid = evaluate_split(student.scores, data, "valid", ks, users=eval_users)
                if cfg.method == "hetcomp" and bool((stage < n_stages - 1).any()):
                    top = torch.from_numpy(topk_items(student.scores, data.train, k=dkc.DISCREPANCY_K).astype(np.int64))
                    d_next = dkc.discrepancy(top, dkc.next_stage_lists(lists, stage))
                    if epoch == cfg.eval_every:
                        last = d_next
                    else:
                        moved = dkc.advance(stage, last, d_next, n_stages, dkc.threshold(epoch, dcfg))
                        stage = stage + moved.long()
                        changed = moved.any(1)
                        if changed.any():
                            users_changed = torch.nonzero(changed).squeeze(1)
                            last[users_changed] = dkc.discrepancy(top[users_changed],
                                                                  dkc.next_stage_lists(lists[users_changed], stage[users_changed]))
                            targets[users_changed] = _targets(lists[users_changed], stage[users_changed], n_items,
                                                              cfg.target_size, importance)
            stage_info = None
            if cfg.method != "bpr":
                stage_info = {"mean_stage": stage.float().mean(0).tolist(),
                              "final_fraction": float((stage == n_stages - 1).float().mean())}
                progress.append({"epoch": epoch, **stage_info})
            history.append({"epoch": epoch, "valid": valid, "loss": epoch_loss, "phase": phase})
            value = valid[cfg.select_metric]
            if value > best:
                best, best_epoch, bad = value, epoch, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
            event.update(valid=value, best=best, stages=stage_info)
            report(event)
            if bad >= cfg.patience:
                break
        else:
            report(event)

    train_seconds = time.perf_counter() - start_time
    student.load_state_dict(best_state)
    student.eval()
    with torch.no_grad():
        test = evaluate_split(student.scores, data, "test", ks, users=eval_users)
        valid = evaluate_split(student.scores, data, "valid", ks, users=eval_users)
    metrics = {"method": cfg.method, "best_epoch": best_epoch, "epochs": history[-1]["epoch"] if history else 0,
               "train_seconds": train_seconds, "test": test, "valid": valid, "history": history,
               "dkc_progress": progress, "teachers": teacher_uris,
               "state_bytes": None if cfg.method == "bpr" else int(state_bytes)}
    _write_outputs(out, cfg, student, metrics)
    return metrics


def _observed_mask(data: Dataset, users: np.ndarray, n_items: int) -> torch.Tensor:
    """bool [B, n_items]: the users' train items."""
    row, items = data.train.rows(users)
    mask = torch.zeros(len(users), n_items, dtype=torch.bool)
    mask[torch.from_numpy(row), torch.from_numpy(items.astype(np.int64))] = True
    return mask


def _targets(lists: torch.Tensor, stage: torch.Tensor, n_items: int, size: int, importance: torch.Tensor,
             batch: int = 1024) -> torch.Tensor:
    """T_u for every user from the lists at its current stages: int64 [U, size], -1 padded."""
    out = torch.empty(lists.shape[0], size, dtype=torch.long)
    for lo in range(0, lists.shape[0], batch):
        current = dkc.current_lists(lists[lo:lo + batch], stage[lo:lo + batch])
        out[lo:lo + batch] = ensemble_topk(current, n_items, size, importance)
    return out


def _observed_ranking(observed: torch.Tensor, n_items: int, size: int, importance: torch.Tensor,
                      batch: int = 1024) -> torch.Tensor:
    """P_u: train items ordered by summed importance of the teachers' observed rankings, first ``size``."""
    out = torch.empty(observed.shape[0], size, dtype=torch.long)
    for lo in range(0, observed.shape[0], batch):
        out[lo:lo + batch] = ensemble_topk(observed[lo:lo + batch], n_items, size, importance)
    return out


def _write_outputs(out: str, cfg: DistillConfig, student: Student, metrics: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(student.state_dict(), buffer)
    with storage.open_output(out, kind="student", config=asdict(cfg)) as o:
        o.write_bytes("student.pt", buffer.getvalue())
        o.write_json("metrics.json", metrics)
        o.write_bytes("report.md", _report(metrics).encode())


def _report(m: dict[str, Any]) -> str:
    lines = [f"# Student ({m['method']})", "", f"best epoch {m['best_epoch']} of {m['epochs']}, "
             f"{m['train_seconds']:.0f} s", "", "| split | " + " | ".join(k for k in m["test"] if "@" in k) + " |",
             "|---|" + "---|" * sum("@" in k for k in m["test"])]
    for split in ("valid", "test"):
        lines.append(f"| {split} | " + " | ".join(f"{v:.4f}" for k, v in m[split].items() if "@" in k) + " |")
    if m["dkc_progress"]:
        lines += ["", "DKC stage progress (fraction of user-teacher pairs at the final stage):", ""]
        lines += [f"- epoch {p['epoch']}: {p['final_fraction']:.3f}" for p in m["dkc_progress"]]
    return "\n".join(lines) + "\n"
