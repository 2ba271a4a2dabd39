"""The distillation loop (ALGORITHM.md §4-6): ensemble targets from trajectories, DKC, AKT.

One flat loop. State per user is O(T x S x K) ints (the trajectories of this process's users)
plus a cached target list; scores are dense only per batch (B x n_items).

Shard-aware (data parallel over users; the same loop runs in one process, where the collectives
below are no-ops). With W processes in the default process group (Ray Train's TorchTrainer, see
:mod:`hetcomp_dist.distill.ray_job`, or torchrun), rank r owns the contiguous user range
[start, stop) = :func:`user_range`:

- its student holds only the user rows [start, stop) (the user table is split by rows) and the
  whole item table (replicated: every user is scored against every item, which a row-sharded item
  table would turn into an all-gather per step);
- every rank draws the same global batches (an RNG seeded by (seed, epoch)) and keeps the rows of
  its own users; it reads only its users' part of the trajectories, and keeps DKC stages and
  targets only for them;
- the loss is a sum over users, so the item-table gradient is all-reduced with SUM before Adam's
  step: one W-process step equals one single-process step on the same global batch (user rows get
  gradients only from their owner; a rank with no rows in a batch still steps, with zero gradients,
  as the single process does for rows outside the batch);
- evaluation: each rank ranks its users with :func:`evaluate_sums`, the sums are all-reduced (SUM,
  coverage masks MAX), so every rank sees the same metrics and takes the same early-stopping and
  phase decisions; whether any (teacher, user) stage is not final is all-reduced too;
- after every evaluation rank 0 writes a checkpoint under ``<out>/checkpoint`` (whole tables,
  Adam state, stages, best state, history; gathered from all ranks; visible only with its
  manifest). A restarted run (Ray Train after a worker died, or a rerun by hand) resumes from it,
  each rank taking its rows, with any number of workers. It is removed once the outputs are written.

Methods:
    hetcomp        - DKC over the trajectories (easy to hard), L_O until DKC ends (dkc.switched), then L_R.
    final_ensemble - the ablation of HetComp without DKC and L_O: the final ensemble is the only
                     target and L_R runs from epoch 1 (not the literature's MTD).
    bpr            - the student trained alone with BPR (no teachers).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hetcomp_dist import config, distributed, storage
from hetcomp_dist.data.dataset import Dataset, load_dataset
from hetcomp_dist.distill import akt, baselines, dissensus, dkc
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.ensemble import ListScorer, ensemble_topk, rank_importance, shifted_scorer
from hetcomp_dist.evaluate import evaluate_sums, topk_items
from hetcomp_dist.models import sampling
from hetcomp_dist.models.tables import Tables
from hetcomp_dist.teachers.trajectory import TrajectoryReader


class Student(torch.nn.Module):
    """MF student: s_ui = <e_u, e_i>, tables on TorchRec (shardable).

    Args:
        n_users: rows of the user table (a worker's own users: ``stop - start``).
        first_user: the global index of user row 0; ``scores`` takes global user indices.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, device: torch.device | None = None,
                 first_user: int = 0, init_std: float = 0.01):
        super().__init__()
        self.first_user = first_user
        self.tables = Tables({"user": (n_users, dim), "item": (n_items, dim)}, init_std=init_std, device=device)

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Global user indices (B) -> B x n_items."""
        return self.tables(user=users - self.first_user)["user"] @ self.tables.weight("item").T


USER_KEY, ITEM_KEY = "tables.ebc.embedding_bags.user.weight", "tables.ebc.embedding_bags.item.weight"


def user_range(n_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous users [start, stop) of ``rank``: near-equal splits in rank order."""
    return n_users * rank // world_size, n_users * (rank + 1) // world_size


Report = Callable[[dict[str, Any]], None]


def distill(dataset_uri: str, teacher_uris: list[str], cfg: DistillConfig, out: str,
            ks: tuple[int, ...] = (10, 20, 50), report: Report = lambda e: None) -> dict[str, Any]:
    """Train a student on ``dataset_uri`` from the teachers' trajectories; write results under ``out``.

    In a process group of W ranks (module docstring) every rank calls it; rank 0 writes, every
    rank returns the same metrics.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data = load_dataset(dataset_uri)
    n_users, n_items = data.n_users, data.n_items
    start, stop = user_range(n_users, rank, world)
    whole = Student(n_users, n_items, cfg.dim, init_std=cfg.init_std)   # seeded as in one process; this rank keeps its rows
    student = Student(stop - start, n_items, cfg.dim, first_user=start, init_std=cfg.init_std)
    student.load_state_dict({USER_KEY: whole.state_dict()[USER_KEY][start:stop], ITEM_KEY: whole.state_dict()[ITEM_KEY]})
    del whole
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    item_weight = student.tables.weight("item")
    for p in student.parameters():                                # kept (zeroed, not freed) between steps:
        p.grad = torch.zeros_like(p)                              # every rank all-reduces and steps every batch
    eval_users = data.eval_users()
    eval_users = eval_users[(eval_users >= start) & (eval_users < stop)]
    importance = rank_importance(100, cfg.temperature)
    dcfg = dkc.DKCConfig(cfg.eval_every, cfg.alpha, cfg.decay)
    stage = torch.zeros(stop - start, 0, dtype=torch.long)
    last, n_stages = torch.zeros(stage.shape, dtype=torch.float64), 1

    if cfg.method != "bpr":
        reader = TrajectoryReader(teacher_uris)
        lists = reader.trajectories(start, stop)                      # [U_local, T, S, K]
        n_stages = lists.shape[2]
        stage = torch.zeros(stop - start, lists.shape[1], dtype=torch.long)
        if cfg.method == "final_ensemble":
            stage[:] = n_stages - 1
        observed_rank = _observed_ranking(reader.observed(start, stop), n_items, cfg.observed_size, importance)
        last = torch.zeros(stage.shape, dtype=torch.float64)
    history, progress = [], []
    best, best_epoch, bad, best_state, first_epoch, resumes, spent = -1.0, 0, 0, None, 1, [], 0.0
    checkpoint_uri = storage.join(out, "checkpoint")
    if cfg.checkpoint and storage.is_complete(checkpoint_uri) and _same_run(checkpoint_uri, cfg):
        ckpt = torch.load(io.BytesIO(storage.read_bytes(checkpoint_uri, "state.pt")), weights_only=True)
        student.load_state_dict(_rows(ckpt["student"], start, stop))
        best_state = _rows(ckpt["best_state"], start, stop)
        optimizer.load_state_dict(_optimizer_rows(ckpt["optimizer"], start, stop))
        stage, last = ckpt["stage"][start:stop].clone(), ckpt["last"][start:stop].clone().double()
        history, progress = ckpt["history"], ckpt["progress"]
        best, best_epoch, bad = ckpt["best"], ckpt["best_epoch"], ckpt["bad"]
        resumes = ckpt["resumes"] + [ckpt["epoch"]]
        spent = ckpt.get("train_seconds", 0.0)   # time budget and reported time span every attempt
        first_epoch = ckpt["epoch"] + 1 if bad < cfg.patience else cfg.max_epochs + 1
        report({"event": "resumed", "epoch": ckpt["epoch"]})
    train_counts = data.train.item_counts()
    pop = dissensus.popularity_percentile(train_counts)
    if cfg.method != "bpr":
        build = _TargetBuilder(cfg, n_items, importance, pop, torch.from_numpy(train_counts).float())
        targets, target_weights = build(lists, stage)
        state_bytes = distributed.sum_over_ranks(lists.numel() * 4 + targets.numel() * 8 + observed_rank.numel() * 8
                                                 + stage.numel() * 8 + (0 if target_weights is None else target_weights.numel() * 4))
    sampler = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_users, train_items = data.train.users(), data.train.indices
    units = None                                                  # None: batches of train interactions
    if cfg.batch_unit == "users" and cfg.method != "bpr":
        units = np.flatnonzero(data.train.counts() > 0)
    index = sampling.PairIndex(data.train)
    start_time = time.perf_counter() - spent

    for epoch in range(first_epoch, cfg.max_epochs + 1):
        student.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(data.train.nnz if units is None else len(units))   # the same on every rank
        epoch_loss, t0 = 0.0, time.perf_counter()
        switched = cfg.method != "bpr" and dkc.switched(_mean_stage(stage, n_users), n_stages, cfg.dkc_switch)
        phase = "bpr" if cfg.method == "bpr" else ("L_R" if switched else "L_O")
        for lo in range(0, len(order), cfg.batch_size):
            rows = order[lo:lo + cfg.batch_size]
            batch_users = train_users[rows] if units is None else units[rows]
            own = (batch_users >= start) & (batch_users < stop)
            loss = torch.zeros(())
            if phase == "bpr":
                neg = sampling.negatives(index, train_users[rows], rng)[own]   # drawn for the global batch
                rows = rows[own]
                if len(rows):
                    u = torch.from_numpy(train_users[rows].astype(np.int64))
                    pos = torch.from_numpy(train_items[rows].astype(np.int64))
                    e = student.tables(user=u - start, item=torch.cat([pos, torch.from_numpy(neg.astype(np.int64))]))
                    p_e, n_e = e["item"].chunk(2)
                    loss = -F.logsigmoid((e["user"] * p_e).sum(-1) - (e["user"] * n_e).sum(-1)).sum() / len(own)
            elif own.any():
                users = np.unique(batch_users[own])
                local = torch.from_numpy(users.astype(np.int64)) - start
                p, t = observed_rank[local], targets[local]
                u_emb = student.tables(user=local)["user"]
                seen = torch.from_numpy(data.train.padded(users))
                exclude = torch.cat([seen, t], 1)                               # N_u \ T_u is everything else
                rest = akt.unobserved_exp_sum(u_emb, item_weight, exclude, cfg.score_clamp, cfg.sampled_negatives, sampler)
                s_p = akt.list_scores(u_emb, item_weight, p, cfg.score_clamp)
                s_t = akt.list_scores(u_emb, item_weight, t, cfg.score_clamp)
                w = None if target_weights is None else target_weights[local]
                if phase == "L_O":
                    loss = cfg.lo_weight * akt.overall_loss(s_p, s_t, p, t, rest, w).sum()
                else:
                    loss = cfg.lr_weight * akt.ranking_loss(s_p, s_t, p, t, rest, w).sum()
            optimizer.zero_grad(set_to_none=False)
            if loss.requires_grad:
                loss.backward()
            distributed.all_reduce_grad(item_weight)                             # items: sum of every rank's users
            optimizer.step()
            epoch_loss += loss.item()
        event = {"event": "epoch", "epoch": epoch, "loss": distributed.sum_over_ranks(epoch_loss), "phase": phase,
                 "epoch_seconds": time.perf_counter() - t0}

        if epoch % cfg.eval_every == 0:
            student.eval()
            with torch.no_grad():
                valid = _evaluate(student.scores, data, "valid", ks, eval_users)
                if cfg.method == "hetcomp" and not switched:
                    top = torch.from_numpy(topk_items(student.scores, data.train, users=np.arange(start, stop),
                                                      k=dkc.DISCREPANCY_K).astype(np.int64))
                    if epoch == cfg.eval_every:
                        last = dkc.start(stage, top, lists)
                    else:
                        before = stage
                        stage, last = dkc.step(stage, last, top, lists, dkc.threshold(epoch, dcfg))
                        users_changed = torch.nonzero((stage != before).any(1)).squeeze(1)
                        if len(users_changed):
                            new_targets, new_weights = build(lists[users_changed], stage[users_changed])
                            targets[users_changed] = new_targets
                            if target_weights is not None:
                                target_weights[users_changed] = new_weights
            stage_info = None
            if cfg.method != "bpr":
                stage_info = {"mean_stage": _mean_stage(stage, n_users),
                              "final_fraction": float(distributed.sum_over_ranks((stage == n_stages - 1).float().sum()) / stage.shape[1] / n_users)}
                progress.append({"epoch": epoch, **stage_info})
            history.append({"epoch": epoch, "valid": valid, "loss": event["loss"], "phase": phase})
            value = valid[cfg.select_metric]                          # all-reduced: every rank decides alike
            if value > best:
                best, best_epoch, bad = value, epoch, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
            if cfg.checkpoint:
                _save_checkpoint(checkpoint_uri, cfg, rank, {
                    "epoch": epoch, "student": _gather_rows(student.state_dict()), "best_state": _gather_rows(best_state),
                    "optimizer": _gather_optimizer(optimizer.state_dict()), "stage": distributed.gather_cat(stage),
                    "last": distributed.gather_cat(last), "history": history, "progress": progress,
                    "best": best, "best_epoch": best_epoch, "bad": bad, "resumes": resumes,
                    "train_seconds": time.perf_counter() - start_time})
            event.update(valid=value, best=best, stages=stage_info)
            report(event)
            if bad >= cfg.patience or (cfg.max_train_seconds and time.perf_counter() - start_time > cfg.max_train_seconds):
                break
        else:
            report(event)

    train_seconds = time.perf_counter() - start_time
    if best_state is not None:                    # None only when no evaluation ran (max_epochs < eval_every)
        student.load_state_dict(best_state)
    student.eval()
    scorer = student.scores                       # the post-hoc popularity penalty applies only to the final ranking
    if cfg.pop_penalty:
        scorer = baselines.penalised_scorer(student.scores, pop, cfg.pop_penalty)
    with torch.no_grad():
        test = _evaluate(scorer, data, "test", ks, eval_users)
        valid = _evaluate(scorer, data, "valid", ks, eval_users)
        stages = None if cfg.method == "bpr" else {
            "epochs": dict(zip(teacher_uris, reader.stage_epochs())),
            "ensemble_test": _stage_ensembles(lists, data, ks, eval_users, start, cfg.temperature)}
    metrics = {"method": cfg.method, "best_epoch": best_epoch, "epochs": history[-1]["epoch"] if history else 0,
               "train_seconds": train_seconds, "test": test, "valid": valid, "history": history,
               "dkc_progress": progress, "teachers": teacher_uris, "workers": world,
               "resumed_from": resumes, "trajectory_stages": stages,
               "state_bytes": None if cfg.method == "bpr" else int(state_bytes)}
    full = _gather_rows(student.state_dict())
    if rank == 0:
        _write_outputs(out, cfg, full, metrics)
        if cfg.checkpoint:
            storage.remove(checkpoint_uri)
    if world > 1:
        dist.barrier()
    return metrics


def _stage_ensembles(lists: torch.Tensor, data: Dataset, ks: tuple[int, ...], users: np.ndarray, first: int,
                     temperature: float) -> list[dict[str, float]]:
    """Test metrics of the teachers' ensemble built from each trajectory stage alone (is stage 0 easier?)."""
    ks = tuple(sorted(set(ks) | {50}))
    return [_evaluate(shifted_scorer(ListScorer(lists[:, :, s], data.n_items, temperature), first), data, "test", ks, users)
            for s in range(lists.shape[2])]


def _mean_stage(stage: torch.Tensor, n_users: int) -> list[float]:
    """Each teacher's mean stage over every rank's users (float64: the switch rule rounds it)."""
    return (distributed.sum_over_ranks(stage.double().sum(0)) / n_users).tolist()


def _evaluate(scorer, data: Dataset, split: str, ks: tuple[int, ...], users: np.ndarray) -> dict[str, float]:
    """Metrics over every rank's users: this rank's sums, all-reduced."""
    sums = evaluate_sums(scorer, data.train, data.split(split), exclude=[data.held_out_besides(split)],
                         ks=ks, users=users)
    return distributed.all_reduce_ranking_sums(sums).metrics()


def _gather_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A student state_dict with the whole user table (gathered) and the item table."""
    return {USER_KEY: distributed.gather_cat(state[USER_KEY]), ITEM_KEY: state[ITEM_KEY].detach().clone()}


def _rows(state: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {USER_KEY: state[USER_KEY][start:stop].clone(), ITEM_KEY: state[ITEM_KEY].clone()}


def _gather_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """Adam's state_dict with the user table's moments gathered (param 0 is the user table)."""
    out = {"param_groups": state["param_groups"], "state": dict(state["state"])}
    if 0 in out["state"]:
        user = out["state"][0]
        out["state"][0] = {k: distributed.gather_cat(v) if v.dim() == 2 else v for k, v in user.items()}
    return out


def _optimizer_rows(state: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    out = {"param_groups": state["param_groups"], "state": dict(state["state"])}
    if 0 in out["state"]:
        out["state"][0] = {k: v[start:stop].clone() if v.dim() == 2 else v for k, v in out["state"][0].items()}
    return out


# Settings a checkpoint may be resumed under when they differ: where and how long it runs.
RESUMABLE_IGNORES = ("workers", "cpus_per_worker", "gpus_per_worker", "threads", "max_epochs", "max_train_seconds",
                     "out", "checkpoint")


def _run_config(cfg: DistillConfig) -> dict[str, Any]:
    """The settings stored with a checkpoint."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_IGNORES}


def _same_run(uri: str, cfg: DistillConfig) -> bool:
    """Whether the checkpoint at ``uri`` was written under ``cfg``'s settings (config.compatible)."""
    return config.compatible(DistillConfig, storage.read_manifest(uri).get("config"), cfg, RESUMABLE_IGNORES)


def _save_checkpoint(uri: str, cfg: DistillConfig, rank: int, state: dict[str, Any]) -> None:
    """Rank 0 writes ``state.pt`` + manifest; the others wait, so no rank runs ahead of a checkpoint."""
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with storage.open_output(uri, kind="student-checkpoint", config=_run_config(cfg)) as o:
            o.extra["epoch"] = state["epoch"]
            o.write_bytes("state.pt", buffer.getvalue())
    if distributed.is_distributed():
        dist.barrier()


class _TargetBuilder:
    """T_u from the lists at the users' current stages (ALGORITHM.md §4), with the debiasing switches:
    strategy A reshapes the ensemble scores; strategy B and IPW give per-target-item loss weights."""

    def __init__(self, cfg: DistillConfig, n_items: int, importance: torch.Tensor, pop: torch.Tensor,
                 item_counts: torch.Tensor, batch: int = 1024):
        self.cfg, self.n_items, self.importance, self.pop, self.item_counts = cfg, n_items, importance, pop, item_counts
        self.batch = batch

    def __call__(self, lists: torch.Tensor, stage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> targets int64 [U, size] (-1 padded), weights float [U, size] or None (all terms weigh 1)."""
        cfg = self.cfg
        weighted = bool(cfg.dissensus_weight or cfg.ipw)
        targets = torch.empty(lists.shape[0], cfg.target_size, dtype=torch.long)
        weights = torch.ones(targets.shape) if weighted else None
        for lo in range(0, lists.shape[0], self.batch):
            current = dkc.current_lists(lists[lo:lo + self.batch], stage[lo:lo + self.batch])
            counts = dissensus.agreement_counts(current, self.n_items) if cfg.dissensus_target or cfg.dissensus_weight else None
            discount = None
            if cfg.dissensus_target:
                discount = dissensus.discount(cfg.dissensus_rule, current, counts, self.pop, self.item_counts,
                                              cfg.dissensus_target)
            t = ensemble_topk(current, self.n_items, cfg.target_size, self.importance, discount)
            targets[lo:lo + self.batch] = t
            if cfg.dissensus_weight:
                weights[lo:lo + self.batch] *= dissensus.transfer_weights(t, counts, current.shape[1], self.pop, cfg.dissensus_weight)
            if cfg.ipw:
                weights[lo:lo + self.batch] *= baselines.ipw_weights(t, self.item_counts, cfg.ipw)
        if weights is not None:
            weights = dissensus.mean_one(weights, targets >= 0)
        return targets, weights


def _observed_ranking(observed: torch.Tensor, n_items: int, size: int, importance: torch.Tensor,
                      batch: int = 1024) -> torch.Tensor:
    """P_u: train items ordered by summed importance of the teachers' observed rankings, first ``size``."""
    out = torch.empty(observed.shape[0], size, dtype=torch.long)
    for lo in range(0, observed.shape[0], batch):
        out[lo:lo + batch] = ensemble_topk(observed[lo:lo + batch], n_items, size, importance)
    return out


def _write_outputs(out: str, cfg: DistillConfig, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    from hetcomp_dist.distill.report import render as render_report  # matplotlib: imported only here

    with storage.open_output(out, kind="student", config=asdict(cfg)) as o:
        o.write_bytes("student.pt", buffer.getvalue())
        o.write_json("metrics.json", metrics)
        for name, data in render_report(metrics, cfg.select_metric).items():  # report.md, curves.png[, stages.png]
            o.write_bytes(name, data)
