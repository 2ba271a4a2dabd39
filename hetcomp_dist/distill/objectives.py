"""What the student learns from, one objective per method:

- :class:`BPRObjective` (``bpr``): the student alone, BPR on the train interactions;
- :class:`KDObjective` (``hetcomp``, ``final_ensemble``): AKT's losses on the ensemble target
  T_u and the observed ranking P_u, with DKC moving each (user, teacher) pair along its trajectory
  (``final_ensemble`` starts every pair at the final stage: no DKC, L_R from the start).

Each objective gives the epoch's units (train interactions, or users: ``n_units`` over every rank,
and the contiguous range ``unit_range`` of them that belong to this rank's users), the loss of one
global batch restricted to this rank's users (:class:`Batch`, from :func:`epoch_batches`), its phase,
and what a checkpoint must keep. Both work on a dataset slice holding only the rank's users
(``load_dataset(uri, users=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hetcomp_dist import distributed
from hetcomp_dist.data.dataset import Dataset
from hetcomp_dist.distill import akt, baselines, dissensus, dkc, teacher_weights
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.ensemble import ListScorer, ensemble_topk, rank_importance, shifted_scorer
from hetcomp_dist.distill.student import Student
from hetcomp_dist.evaluate import rows_per_buffer, topk_items
from hetcomp_dist.models import sampling
from hetcomp_dist.teachers.trajectory import TrajectoryReader


@dataclass(frozen=True)
class Batch:
    """This rank's part of one global batch: its units (0 = the rank's first unit) in batch order, their
    positions within the global batch, and the global batch's size."""

    units: np.ndarray
    positions: np.ndarray
    size: int


def epoch_batches(rng: np.random.Generator, n_units: int, unit_range: tuple[int, int],
                  batch_size: int) -> Iterator[Batch]:
    """The epoch's global batches (``rng.permutation(n_units)`` in slices of ``batch_size``: the same on
    every rank, whatever the number of ranks), each as this rank's part of it.

    The permutation over every rank's units is the one O(all units) array (8 bytes per unit) a rank
    builds; it lives only until this rank's units are picked out of it, before the first batch.
    """
    order = rng.permutation(n_units)
    lo, hi = unit_range
    mine = np.flatnonzero((order >= lo) & (order < hi))          # positions in the epoch, ascending
    units = order[mine] - lo
    del order
    firsts = np.arange(0, n_units, batch_size)
    bounds = np.searchsorted(mine, np.append(firsts, n_units))
    for b, first in enumerate(firsts):
        a, z = bounds[b], bounds[b + 1]
        yield Batch(units[a:z], mine[a:z] - first, int(min(batch_size, n_units - first)))


class BPRObjective:
    """BPR with one uniform negative per train interaction of this rank's users."""

    phase = "bpr"

    def __init__(self, data: Dataset, student: Student, start: int, stop: int):
        _check_held(data, start, stop)
        self.student, self.start, self.stop = student, start, stop
        self.users, self.items = data.train.users(), data.train.indices       # this rank's interactions
        self.index = sampling.PairIndex(data.train)
        self.n_units = data.train.total_nnz
        self.unit_range = (data.train.first_nnz, data.train.first_nnz + data.train.nnz)

    def loss(self, batch: Batch, rng: np.random.Generator) -> torch.Tensor:
        users = self.users[batch.units]
        neg = self._negatives(users, batch, rng)          # drawn for the global batch, on every rank (numpy)
        dev = self.student.tables.weight("item").device
        if not len(users):
            return torch.zeros((), device=dev)
        pos = torch.from_numpy(self.items[batch.units].astype(np.int64)).to(dev)
        u_e = self.student.user_rows(torch.from_numpy(users.astype(np.int64)).to(dev) - self.start)
        neg = torch.from_numpy(neg.astype(np.int64)).to(dev)
        p_e, n_e = self.student.tables(item=torch.cat([pos, neg]))["item"].chunk(2)
        return -F.logsigmoid((u_e * p_e).sum(-1) - (u_e * n_e).sum(-1)).sum() / batch.size

    def _negatives(self, users: np.ndarray, batch: Batch, rng: np.random.Generator) -> np.ndarray:
        """:func:`sampling.negatives` for the whole global batch, of which this rank knows only its own
        users: whether a draw hit a positive is summed over ranks, so every rank redraws the same
        positions from the same ``rng`` (one process: exactly ``sampling.negatives``)."""
        n_items = self.index.n_items
        items = rng.integers(0, n_items, batch.size)
        for _ in range(3):
            hit = np.zeros(batch.size, dtype=bool)
            hit[batch.positions] = self.index.contains(users, items[batch.positions])
            if distributed.is_distributed():
                hit = distributed.sum_over_ranks(torch.from_numpy(hit.astype(np.float64))).numpy() > 0
            if not hit.any():
                break
            items[hit] = rng.integers(0, n_items, int(hit.sum()))
        return items[batch.positions]

    def start_epoch(self) -> None:
        pass

    def after_evaluation(self, epoch: int, gain: float | None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"stage": torch.zeros(0), "last": torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def info(self) -> dict[str, Any] | None:
        return None

    def resident_bytes(self) -> int:
        """This rank's own arrays (the users of its interactions and their sorted keys)."""
        return int(self.users.nbytes + self.index.keys.nbytes)


class KDObjective:
    """AKT on targets built from the teachers' trajectories at each pair's DKC stage.

    Resident per user: the target T_u (int32), P_u (int32), the stages (int8) and DKC's last
    distances (float64); the trajectories stay in storage and are read by row group, in blocks of
    ``block`` users, when targets are built and at each DKC check.
    """

    def __init__(self, cfg: DistillConfig, data: Dataset, student: Student, reader: TrajectoryReader,
                 start: int, stop: int, rank: int, block: int = 16384):
        _check_held(data, start, stop)
        self.cfg, self.data, self.student, self.reader = cfg, data, student, reader
        self.start, self.stop, self.block, self.n_users = start, stop, block, data.n_users
        self.n_stages = reader.n_snapshots
        first = self.n_stages - 1 if cfg.method == "final_ensemble" else 0
        self.stage = torch.full((stop - start, reader.n_teachers), first, dtype=torch.int8)
        self.last = torch.zeros(self.stage.shape, dtype=torch.float64)
        importance = rank_importance(100, cfg.temperature)
        self.observed = self._observed_ranking(importance)
        counts = data.train.item_counts()
        weights, self.weights_record = self._teacher_weights()
        self.build = TargetBuilder(cfg, data.n_items, importance, dissensus.popularity_percentile(counts),
                                   torch.from_numpy(counts).float(), weights)
        self.targets = torch.empty(stop - start, cfg.target_size, dtype=torch.int32)
        self.weights = torch.ones(self.targets.shape) if (cfg.dissensus_weight or cfg.ipw) else None
        self._rebuild(torch.arange(stop - start))
        self.units, self.n_units, self.unit_range = _units(cfg, data, rank)
        self.train_users = data.train.users()                     # this rank's interactions (global users)
        self.dkc = dkc.DKCConfig(cfg.eval_every, cfg.alpha, cfg.decay, cfg.dkc_schedule, cfg.dkc_stall)
        self.phase = "L_O"

    def _blocks(self, rows: torch.Tensor):
        """Local rows in blocks of at most ``block`` users: (rows, global start, global stop) each."""
        for lo in range(0, len(rows), self.block):
            part = rows[lo:lo + self.block]
            yield part, self.start + int(part[0]), self.start + int(part[-1]) + 1

    def _lists(self, lo: int, hi: int, rows: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """int [len(rows), T, K]: the lists of local ``rows`` (within global [lo, hi)) at ``stage``."""
        full = torch.full((hi - lo, self.stage.shape[1]), -1, dtype=torch.long)    # -1: not needed, not read
        full[rows + self.start - lo] = stage.long()
        return self.reader.lists_at(lo, hi, full)[rows + self.start - lo]

    def _rebuild(self, rows: torch.Tensor) -> None:
        """T_u (and its loss weights) of local ``rows`` from the lists at their current stages."""
        for part, lo, hi in self._blocks(rows):
            targets, weights = self.build(self._lists(lo, hi, part, self.stage[part]))
            self.targets[part] = targets.int()
            if self.weights is not None:
                self.weights[part] = weights

    def _observed_ranking(self, importance: torch.Tensor) -> torch.Tensor:
        """P_u: train items ordered by summed importance of the teachers' observed rankings, first ``size``."""
        out = torch.empty(self.stop - self.start, self.cfg.observed_size, dtype=torch.int32)
        for part, lo, hi in self._blocks(torch.arange(self.stop - self.start)):
            observed = self.reader.observed(lo, hi)
            for b in range(0, len(part), 1024):     # ensemble_topk's temporaries: a few [1024, T x K] tensors
                out[part[b:b + 1024]] = ensemble_topk(observed[b:b + 1024], self.data.n_items,
                                                      self.cfg.observed_size, importance).int()
        return out

    def _teacher_weights(self) -> tuple[torch.Tensor | None, dict | None]:
        """None (equal), or weights chosen on valid by the final ensemble (a collective: every rank)."""
        if self.cfg.teacher_weights == "equal":
            return None, None
        cfg, data, reader = self.cfg, self.data, self.reader
        values = teacher_weights.valid_metrics(reader.manifests, reader.uris, cfg.select_metric)
        users = data.eval_users()                                 # this rank's (its slice's)
        k = int(cfg.select_metric.rsplit("@", 1)[1])

        def valid_of(weights: torch.Tensor) -> float:
            scorer = StoredListScorer(reader, data.n_items, cfg.temperature, weights=weights)
            return distributed.evaluate(scorer, data, "valid", (k,), users)[cfg.select_metric]

        return teacher_weights.choose(values, valid_of)

    @property
    def switched(self) -> bool:
        """Whether DKC is over (every rank agrees: the mean stages are all-reduced)."""
        return dkc.switched(self.mean_stage(), self.n_stages, self.cfg.dkc_switch)

    def start_epoch(self) -> None:
        """Fix the epoch's phase (a collective: every rank calls it, once per epoch)."""
        self.phase = "L_R" if self.switched else "L_O"

    def mean_stage(self) -> list[float]:
        """Each teacher's mean stage over every rank's users (float64: the switch rule rounds it)."""
        return (distributed.sum_over_ranks(self.stage.double().sum(0)) / self.n_users).tolist()

    def loss(self, batch: Batch, rng: np.random.Generator) -> torch.Tensor:
        dev = self.student.tables.weight("item").device    # the resident state stays on the CPU; the batch's part moves
        batch_users = self.train_users[batch.units] if self.units is None else self.units[batch.units]
        # drawn for the global batch, on every rank, from the epoch's rng: the same items whatever the
        # number of ranks, and a resumed epoch draws what the uninterrupted one did
        sample = (torch.from_numpy(rng.integers(0, self.data.n_items, self.cfg.sampled_negatives)).to(dev)
                  if self.cfg.sampled_negatives else None)
        users = np.unique(batch_users)
        local = torch.from_numpy(users.astype(np.int64)) - self.start
        p, t, cfg = self.observed[local].long().to(dev), self.targets[local].long().to(dev), self.cfg
        # a split item table: the rows this step looks up, from their owners (every rank, every step)
        needed = torch.cat([sample, p[p >= 0], t[t >= 0]]) if self.student.items_split else None
        items = self.student.step_items(needed)
        if not len(batch_users):
            return torch.zeros((), device=dev)
        u_emb = self.student.user_rows(local.to(dev))
        exclude = torch.cat([torch.from_numpy(self.data.train.padded(users)).to(dev), t], 1)   # N_u \ T_u is the rest
        sample_rows = None if items.ids is None else items.index(sample)
        rest = akt.unobserved_exp_sum(u_emb, items.weight, exclude, cfg.score_clamp, sample,
                                      sample_rows=sample_rows, n_items=self.data.n_items)
        s_p = akt.list_scores(u_emb, items.weight, items.index(p), cfg.score_clamp)
        s_t = akt.list_scores(u_emb, items.weight, items.index(t), cfg.score_clamp)
        w = None if self.weights is None else self.weights[local].to(dev)
        if self.phase == "L_O":
            return cfg.lo_weight * akt.overall_loss(s_p, s_t, p, t, rest, w).sum()
        return cfg.lr_weight * akt.ranking_loss(s_p, s_t, p, t, rest, w).sum()

    def after_evaluation(self, epoch: int, gain: float | None) -> None:
        """One DKC check every evaluation until DKC ends; targets rebuilt for users whose stage moved.
        ``gain``: valid select_metric's relative change since the previous evaluation (the same on every rank)."""
        if self.cfg.method != "hetcomp" or self.switched:
            return
        moved = []
        for part, lo, hi in self._blocks(torch.arange(self.stop - self.start)):
            top = torch.from_numpy(topk_items(self.student.scores, self.data.train, users=np.arange(lo, hi),
                                              k=dkc.DISCREPANCY_K).astype(np.int64))
            stage = self.stage[part].long()

            def next_lists(st: torch.Tensor, part=part, lo=lo, hi=hi) -> torch.Tensor:
                return self._lists(lo, hi, part, st + 1)          # clamped to the last stage by the reader

            if epoch == self.cfg.eval_every:
                self.last[part] = dkc.discrepancy(top, next_lists(stage)).to(self.last.dtype)
                continue
            new, last = dkc.step_with(stage, self.last[part], top, next_lists, self.n_stages,
                                      dkc.threshold(epoch, self.dkc, gain))
            self.stage[part], self.last[part] = new.to(self.stage.dtype), last
            moved.append(part[(new != stage).any(1)])
        changed = torch.cat(moved) if moved else torch.zeros(0, dtype=torch.long)
        if len(changed):
            self._rebuild(changed)

    def state_dict(self) -> dict[str, Any]:
        """This rank's rows: stages and last distances."""
        return {"stage": self.stage.long(), "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's rows, then its targets rebuilt at those stages."""
        self.stage = state["stage"].to(torch.int8).clone()
        self.last = state["last"].clone().double()
        self._rebuild(torch.arange(self.stop - self.start))

    def info(self) -> dict[str, Any]:
        """Stage progress for the history: each teacher's mean stage and the share of final pairs."""
        final = distributed.sum_over_ranks((self.stage == self.n_stages - 1).float().sum())
        return {"mean_stage": self.mean_stage(), "final_fraction": float(final / self.stage.shape[1] / self.n_users)}

    def state_bytes(self) -> int:
        """Resident distillation state over every rank (targets, P_u, stages, last distances, weights)."""
        tensors = [self.targets, self.observed, self.stage, self.last]
        if self.weights is not None:
            tensors.append(self.weights)
        return int(distributed.sum_over_ranks(sum(t.numel() * t.element_size() for t in tensors)))

    def resident_bytes(self) -> int:
        """This rank's own: the state above, the users of its interactions (or its user units), and the
        item-side arrays of the target builder."""
        tensors = [self.targets, self.observed, self.stage, self.last, self.build.pop, self.build.item_counts]
        tensors += [self.weights] if self.weights is not None else []
        arrays = [self.train_users] + ([self.units] if self.units is not None else [])
        return int(sum(t.numel() * t.element_size() for t in tensors) + sum(a.nbytes for a in arrays))


class StoredListScorer:
    """An ensemble scorer over global user ids that reads the lists it needs from storage per batch:
    every teacher's final list, or each teacher's list at ``stage`` (one stage for all).

    A batch's users are read in runs of at most ``span`` consecutive ids, so sparse users (e.g. the
    evaluated ones) cost the row groups they sit in, not every list between the lowest and highest id.
    """

    def __init__(self, reader: TrajectoryReader, n_items: int, temperature: float, stage: int | None = None,
                 weights: torch.Tensor | None = None, span: int = 8192):
        self.reader, self.n_items, self.temperature, self.stage, self.weights = reader, n_items, temperature, stage, weights
        self.span = span

    def _read(self, lo: int, hi: int) -> torch.Tensor:
        if self.stage is None:
            return self.reader.final(lo, hi)
        return self.reader.lists_at(lo, hi, torch.full((hi - lo, self.reader.n_teachers), self.stage))

    def lists(self, users: torch.Tensor) -> torch.Tensor:
        """int32 [len(users), T, K]: the lists of ``users`` (any order, repeats allowed)."""
        order = torch.argsort(users)
        ordered = users[order]
        parts, i = [], 0
        while i < len(ordered):
            lo = int(ordered[i])
            j = int(torch.searchsorted(ordered, lo + self.span))
            parts.append(self._read(lo, int(ordered[j - 1]) + 1)[ordered[i:j] - lo])
            i = j
        if not parts:
            return torch.zeros(0, self.reader.n_teachers, 1, dtype=torch.int32)
        out = torch.cat(parts)
        out[order] = out.clone()              # back to the callers' order
        return out

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        scorer = ListScorer(self.lists(users), self.n_items, self.temperature, self.weights)
        return shifted_scorer(scorer, 0)(torch.arange(len(users)))


def _check_held(data: Dataset, start: int, stop: int) -> None:
    """The data must hold exactly the rank's users: its units are what the data holds."""
    if data.held_users != (start, stop):
        raise ValueError(f"the objective of users [{start}, {stop}) needs their slice of the dataset, "
                         f"not users {list(data.held_users)}")


def _units(cfg: DistillConfig, data: Dataset, rank: int) -> tuple[np.ndarray | None, int, tuple[int, int]]:
    """(this rank's user units or None for interactions, units over every rank, this rank's unit range).

    Train interactions: the rank's users own a contiguous run of the whole split's CSR order, which its
    slice knows. Users with a train item: ranks hold contiguous users in rank order, so the rank's units
    follow every lower rank's (a count per rank, gathered once).
    """
    if cfg.batch_unit != "users":
        return None, data.train.total_nnz, (data.train.first_nnz, data.train.first_nnz + data.train.nnz)
    units = np.flatnonzero(data.train.held_counts() > 0) + data.train.first_user
    counts = distributed.gather_cat(torch.tensor([len(units)], dtype=torch.int64))
    first = int(counts[:rank].sum())
    return units, int(counts.sum()), (first, first + len(units))


def build_objective(cfg: DistillConfig, data: Dataset, student: Student, teacher_uris: list[str],
                    start: int, stop: int, rank: int) -> BPRObjective | KDObjective:
    if cfg.method == "bpr":
        return BPRObjective(data, student, start, stop)
    return KDObjective(cfg, data, student, TrajectoryReader(teacher_uris), start, stop, rank)


class TargetBuilder:
    """T_u from the lists at the users' current stages, with the debiasing switches: strategy A
    reshapes the ensemble scores; strategy B and IPW give per-target-item loss weights."""

    def __init__(self, cfg: DistillConfig, n_items: int, importance: torch.Tensor, pop: torch.Tensor,
                 item_counts: torch.Tensor, teacher_weights: torch.Tensor | None = None, batch: int = 1024):
        self.cfg, self.n_items, self.importance, self.pop, self.item_counts = cfg, n_items, importance, pop, item_counts
        # dissensus' agreement counts are a dense [batch, n_items] buffer
        self.teacher_weights, self.batch = teacher_weights, min(batch, rows_per_buffer(n_items))

    def __call__(self, lists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each user's lists at their stages (int [U, T, K]) -> targets int64 [U, size] (-1 padded),
        weights float [U, size] or None (all terms weigh 1)."""
        cfg = self.cfg
        targets = torch.empty(lists.shape[0], cfg.target_size, dtype=torch.long)
        weights = torch.ones(targets.shape) if (cfg.dissensus_weight or cfg.ipw) else None
        for lo in range(0, lists.shape[0], self.batch):
            part = slice(lo, lo + self.batch)
            current = lists[part]
            counts = dissensus.agreement_counts(current, self.n_items) if cfg.dissensus_target or cfg.dissensus_weight else None
            discount = teacher_weights.per_entry(self.teacher_weights, current)
            if cfg.dissensus_target:
                rule = dissensus.discount(cfg.dissensus_rule, current, counts, self.pop, self.item_counts,
                                          cfg.dissensus_target)
                discount = rule if discount is None else rule * discount
            targets[part] = t = ensemble_topk(current, self.n_items, cfg.target_size, self.importance, discount)
            if cfg.dissensus_weight:
                weights[part] *= dissensus.transfer_weights(t, counts, current.shape[1], self.pop, cfg.dissensus_weight)
            if cfg.ipw:
                weights[part] *= baselines.ipw_weights(t, self.item_counts, cfg.ipw)
        if weights is not None:
            weights = dissensus.mean_one(weights, targets >= 0)
        return targets, weights
