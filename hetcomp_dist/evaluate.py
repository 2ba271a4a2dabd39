"""Full-ranking evaluation of any scorer: Recall/NDCG@K, popularity lift, ARP and coverage.

A *scorer* is any callable ``scorer(users) -> scores`` taking a LongTensor of B user indices
and returning a float tensor B x n_items (higher = better). Every item is ranked for every
evaluated user; the user's own train items (and, per ALGORITHM.md section 2, the items of the
other held-out split) are excluded by setting their scores to -inf before the top-K.

Memory is bounded by one batch: B x n_items scores (the only large buffer), plus per-batch
index arrays proportional to the batch's interactions and B x max(K) top-K results. Per-user
arrays (train and truth counts, profile popularity sums) cover only the users the splits hold, so a
rank evaluating its dataset slice allocates nothing for the other ranks' users. Nothing is looped
over in Python per user.

Devices: the scores, their exclusion and the top-K stay on the scorer's device (a GPU's for a
model on one); only the B x max(K) top-K lists come to the CPU, where the metrics are summed
with numpy. Users are passed to the scorer as CPU tensors; scorers move them to their device.

Sharding: :func:`evaluate_sums` returns a :class:`RankingSums` of additive sums over the users
it saw; partial sums from disjoint user shards combine with :meth:`RankingSums.merge` (or an
all-reduce: SUM for the sums, MAX/OR for the coverage masks) and :meth:`RankingSums.metrics`
turns them into the final averages, identical to evaluating all users at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from hetcomp_dist.data.dataset import Dataset, Interactions

Scorer = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_KS = (10, 20, 50)


@dataclass
class RankingSums:
    """Additive per-user sums behind the metrics, for one set of users (mergeable across shards).

    Per K (index j into ``ks``): ``recall[j]``, ``ndcg[j]``, ``gap_rec[j]``, ``arp[j]`` are sums
    over users; ``covered[j]`` is a bool [n_items] mask of items appearing in some top-K list.
    ``gap_profile`` sums GAP(train profile) over the ``n_profile`` users with a non-empty profile.
    """

    ks: tuple[int, ...]
    n_users: int
    recall: np.ndarray
    ndcg: np.ndarray
    gap_rec: np.ndarray
    arp: np.ndarray
    covered: np.ndarray
    gap_profile: float
    n_profile: int

    @classmethod
    def zeros(cls, ks: Sequence[int], n_items: int) -> "RankingSums":
        nk = len(ks)
        return cls(
            ks=tuple(ks), n_users=0,
            recall=np.zeros(nk), ndcg=np.zeros(nk), gap_rec=np.zeros(nk), arp=np.zeros(nk),
            covered=np.zeros((nk, n_items), dtype=bool), gap_profile=0.0, n_profile=0,
        )

    def merge(self, other: "RankingSums") -> "RankingSums":
        """Sums of two disjoint user sets."""
        if self.ks != other.ks or self.covered.shape != other.covered.shape:
            raise ValueError("cannot merge RankingSums with different ks or n_items")
        return RankingSums(
            ks=self.ks, n_users=self.n_users + other.n_users,
            recall=self.recall + other.recall, ndcg=self.ndcg + other.ndcg,
            gap_rec=self.gap_rec + other.gap_rec, arp=self.arp + other.arp,
            covered=self.covered | other.covered,
            gap_profile=self.gap_profile + other.gap_profile, n_profile=self.n_profile + other.n_profile,
        )

    def metrics(self) -> dict[str, float]:
        """User-averaged metrics: ``recall@K``, ``ndcg@K``, ``popularity_lift@K``, ``arp@K``,
        ``coverage@K`` for each K, and ``n_users``. With no users every average is NaN."""
        n = self.n_users
        out: dict[str, float] = {}
        gap_profile = self.gap_profile / self.n_profile if self.n_profile else float("nan")
        n_items = self.covered.shape[1]
        for j, k in enumerate(self.ks):
            out[f"recall@{k}"] = self.recall[j] / n if n else float("nan")
            out[f"ndcg@{k}"] = self.ndcg[j] / n if n else float("nan")
            gap_rec = self.gap_rec[j] / n if n else float("nan")
            out[f"popularity_lift@{k}"] = (gap_rec - gap_profile) / gap_profile * 100.0 if gap_profile else float("nan")
            out[f"arp@{k}"] = self.arp[j] / n if n else float("nan")
            out[f"coverage@{k}"] = float(self.covered[j].sum()) / n_items if n_items else float("nan")
        out = {key: float(v) for key, v in out.items()}
        out["n_users"] = n
        return out


SCORE_BUFFER_ELEMENTS = 2**25


def rows_per_buffer(n_items: int) -> int:
    """Users per dense users x items buffer: at most 2^25 elements (128 MiB of float32), so what a worker
    holds while it ranks or builds targets does not grow with the catalogue."""
    return max(1, SCORE_BUFFER_ELEMENTS // max(n_items, 1))


def evaluate(
    scorer: Scorer,
    train: Interactions,
    truth: Interactions,
    exclude: Sequence[Interactions] = (),
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    users: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Rank all items for each user and score the top-K lists against ``truth``.

    Args:
        scorer: ``scorer(LongTensor[B]) -> Tensor[B, n_items]`` (any floating dtype, any device).
            A fresh contiguous output is overwritten in place (-inf at excluded items); views
            and non-contiguous outputs are copied first, so a scorer may return a cached view.
        train: train interactions; always excluded from ranking, and the popularity source:
            phi(i) = (users with i in train) / train.n_users, count(i) = users with i in train.
        truth: ground truth (held-out split). Recall@K = hits / |truth_u|;
            NDCG@K = sum over hit ranks r (0-based) of 1/log2(r+2), divided by the IDCG over
            min(|truth_u|, K) ranks (binary relevance).
        exclude: further splits whose items are excluded (e.g. valid when testing).
        ks: cutoffs; all come from one top-max(K).
        batch_size: users per scorer call (peak memory ~ batch_size x n_items scores), at most
            :func:`rows_per_buffer`.
        users: users to evaluate; default every user with a non-empty ``truth``. A user given
            here with an empty truth counts with recall = ndcg = 0.
        progress: show a tqdm bar over batches.

    Returns:
        ``recall@K``, ``ndcg@K``: means over evaluated users.
        ``popularity_lift@K`` (Abdollahpouri et al., RecSys 2020), in percent:
            100 * (GAP_rec - GAP_profile) / GAP_profile with GAP(list) = mean phi over the list,
            where GAP_rec is the mean over evaluated users of GAP(top-K list) and GAP_profile
            the mean over evaluated users (with a non-empty train profile) of GAP(train
            profile). This is the paper's group-level definition: a ratio of user-averaged
            GAPs, not an average of per-user ratios (which a few tiny, niche profiles would
            dominate).
        ``arp@K``: mean over users of the mean train count of the recommended items.
        ``coverage@K``: distinct items in the union of all users' top-K lists / n_items.
        ``n_users``: users evaluated.
        Ranks holding an excluded item (only when a user has fewer than K rankable items)
        are empty: never hits, not in GAP/ARP/coverage (which average over the filled ranks).
    """
    return evaluate_sums(
        scorer, train, truth, exclude, ks=ks, batch_size=batch_size, users=users, progress=progress
    ).metrics()


def evaluate_split(
    scorer: Scorer,
    dataset: Dataset,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    users: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` on a prepared dataset with the protocol of ALGORITHM.md section 2.

    ``split="test"`` excludes train and valid items; ``split="valid"`` excludes train and test
    items. By default the dataset's evaluated users (:meth:`Dataset.eval_users`: a valid and a
    test item each) are evaluated, the same users for valid and test.
    """
    if users is None:
        users = dataset.eval_users()
    other = dataset.held_out_besides(split)
    return evaluate(
        scorer, dataset.train, dataset.split(split), exclude=[other],
        ks=ks, batch_size=batch_size, users=users, progress=progress,
    )


def evaluate_sums(
    scorer: Scorer,
    train: Interactions,
    truth: Interactions,
    exclude: Sequence[Interactions] = (),
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    users: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    progress: bool = False,
) -> RankingSums:
    """Like :func:`evaluate` but returns the mergeable sums (for evaluating user shards)."""
    ks = _check_ks(ks)
    n_items = train.n_items
    _check_same_shape(train, [truth, *exclude])
    if users is None:
        users = np.flatnonzero(truth.held_counts() > 0) + truth.first_user
    users = _as_users(users, train.n_users)
    kmax = max(ks)

    # Per-user arrays over the held users only (a slice's own: a rank allocates nothing per user of the
    # others); the evaluated users must be held by train and truth, as the ranking needs their items anyway.
    item_counts = train.item_counts().astype(np.float64)
    phi = item_counts / max(train.n_users, 1)
    profile_len = train.held_counts()[_held_rows(train, users)]
    profile_sum = np.bincount(train.users() - train.first_user, weights=phi[train.indices],
                              minlength=train.held_count)[_held_rows(train, users)]
    truth_len = truth.held_counts()[_held_rows(truth, users)]            # per evaluated user, in order
    discount = 1.0 / np.log2(np.arange(kmax) + 2.0)
    idcg_table = np.concatenate([[1.0], np.cumsum(discount)])  # [m] = IDCG with m relevant ranks; [0] avoids 0/0

    sums = RankingSums.zeros(ks, n_items)
    sums.n_users = len(users)
    has_profile = profile_len > 0
    sums.n_profile = int(has_profile.sum())
    sums.gap_profile = float((profile_sum[has_profile] / profile_len[has_profile]).sum())

    done = 0
    for ub, top, filled in _ranked_batches(scorer, users, n_items, [train, *exclude], kmax, batch_size, progress):
        hit = _hits(truth, ub, top, n_items) & filled
        gt, done = truth_len[done:done + len(ub)], done + len(ub)
        safe_top = np.where(filled, top, 0)
        phi_top = np.where(filled, phi[safe_top], 0.0)
        cnt_top = np.where(filled, item_counts[safe_top], 0.0)
        for j, k in enumerate(ks):
            h = hit[:, :k]
            sums.recall[j] += (h.sum(1) / np.maximum(gt, 1)).sum()
            sums.ndcg[j] += ((h * discount[:k]).sum(1) / idcg_table[np.minimum(gt, k)]).sum()
            n_filled = np.maximum(filled[:, :k].sum(1), 1)
            sums.gap_rec[j] += (phi_top[:, :k].sum(1) / n_filled).sum()
            sums.arp[j] += (cnt_top[:, :k].sum(1) / n_filled).sum()
            sums.covered[j, top[:, :k][filled[:, :k]]] = True
    return sums


def topk_items(
    scorer: Scorer,
    train: Interactions,
    users: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    k: int = 50,
    batch_size: int = 1024,
    exclude: Sequence[Interactions] = (),
    progress: bool = False,
) -> np.ndarray:
    """Top-k unobserved items per user: int32 [len(users) x k], best first.

    Train items (and those of ``exclude``) are never returned; where a user has fewer than k
    rankable items the remaining slots are -1. ``users`` defaults to all users. Ties among
    equal scores are broken as ``torch.topk`` breaks them.
    """
    k = _check_ks([k])[0]
    _check_same_shape(train, list(exclude))
    users = _as_users(np.arange(train.n_users) if users is None else users, train.n_users)
    out = np.empty((len(users), k), dtype=np.int32)
    start = 0
    for ub, top, filled in _ranked_batches(scorer, users, train.n_items, [train, *exclude], k, batch_size, progress):
        out[start:start + len(ub)] = np.where(filled, top, -1)
        start += len(ub)
    return out


def dot_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor) -> Scorer:
    """Scorer ``users -> user_emb[users] @ item_emb.T`` that writes into one reused output buffer.

    A fresh B x n_items tensor per call costs page faults on every batch (large allocations are
    mmapped and returned to the OS when freed); bench/bench_eval.py --reuse-buffer measures what
    the reused buffer saves. The buffer is sized by the first call
    (grown if a later call is larger; a smaller call, such as the last batch, gets a fresh
    tensor). Each call's result is overwritten by a later call, which suits :func:`evaluate`
    and :func:`topk_items` (they finish with a batch before asking for the next); callers
    that keep scores across calls must copy them.

    Args:
        user_emb: n_users x d; item_emb: n_items x d (same dtype and device).
    """
    item_t = item_emb.detach().T.contiguous()  # d x n_items: the faster operand layout here
    user_emb = user_emb.detach()
    state: dict[str, torch.Tensor] = {}

    def scorer(users: torch.Tensor) -> torch.Tensor:
        users = users.to(user_emb.device)
        buf = state.get("buf")
        if buf is None or len(users) > buf.shape[0]:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buf = torch.empty(len(users), item_t.shape[1], dtype=item_t.dtype, device=item_t.device)
            state["buf"] = buf
        if len(users) == buf.shape[0]:
            return torch.mm(user_emb[users], item_t, out=buf)
        return user_emb[users] @ item_t

    return scorer


# --------------------------------------------------------------------------- internals


def _ranked_batches(
    scorer: Scorer,
    users: np.ndarray,
    n_items: int,
    exclude: Sequence[Interactions],
    k: int,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (batch users int64 [B], top items int64 [B x k], filled bool [B x k]) per batch.

    ``filled`` is False at ranks holding an excluded item (or past n_items when k > n_items).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, rows_per_buffer(n_items))
    k_eff = min(k, n_items)
    starts = range(0, len(users), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=len(starts), desc="evaluate", unit="batch")
    with torch.inference_mode():
        for s in starts:
            ub = users[s:s + batch_size]
            scores = _own_scores(scorer(torch.from_numpy(ub)), len(ub), n_items)
            flat = _excluded_flat(exclude, ub, n_items)
            if flat.size:
                scores.view(-1).index_fill_(0, torch.from_numpy(flat).to(scores.device), float("-inf"))
            vals, idx = torch.topk(scores, k_eff, dim=1, largest=True, sorted=True)
            del scores
            vals = vals.cpu().numpy()
            if np.isnan(vals).any():  # topk ranks NaN above everything, so any NaN shows here
                raise ValueError("scorer returned NaN scores")
            top = idx.cpu().numpy().astype(np.int64, copy=False)
            filled = vals > -np.inf
            if k_eff < k:
                pad = k - k_eff
                top = np.concatenate([top, np.zeros((len(ub), pad), dtype=np.int64)], axis=1)
                filled = np.concatenate([filled, np.zeros((len(ub), pad), dtype=bool)], axis=1)
            yield ub, top, filled


def _own_scores(scores: torch.Tensor, b: int, n_items: int) -> torch.Tensor:
    """Validate the scorer output and return a tensor safe to modify in place."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scorer must return a torch.Tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != (b, n_items):
        raise ValueError(f"scorer returned shape {tuple(scores.shape)}, expected ({b}, {n_items})")
    if not scores.is_floating_point():
        return scores.float()
    if scores._base is not None or not scores.is_contiguous():
        return scores.clone(memory_format=torch.contiguous_format)
    return scores


def _excluded_flat(exclude: Sequence[Interactions], ub: np.ndarray, n_items: int) -> np.ndarray:
    """Flat indices row * n_items + item of all excluded (batch row, item) pairs, int64."""
    parts = []
    for inter in exclude:
        row, item = inter.rows(ub)
        if row.size:
            parts.append(row.astype(np.int64) * n_items + item)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _hits(truth: Interactions, ub: np.ndarray, top: np.ndarray, n_items: int) -> np.ndarray:
    """bool [B x k]: top[r, j] is in truth for user ub[r] (searchsorted on row*n_items+item keys)."""
    row, item = truth.rows(ub)
    if row.size == 0:
        return np.zeros(top.shape, dtype=bool)
    keys = np.sort(row.astype(np.int64) * n_items + item)
    query = np.arange(len(ub), dtype=np.int64)[:, None] * n_items + top
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return keys[pos] == query


def _as_users(users: np.ndarray | torch.Tensor | Sequence[int], n_users: int) -> np.ndarray:
    if isinstance(users, torch.Tensor):
        users = users.cpu().numpy()
    users = np.ascontiguousarray(np.asarray(users).reshape(-1))
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise TypeError(f"users must be integers, got dtype {users.dtype}")
    users = users.astype(np.int64, copy=False)
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"user index out of range [0, {n_users})")
    return users


def _held_rows(inter: Interactions, users: np.ndarray) -> np.ndarray:
    """Rows of ``inter``'s held users for global ``users``; a user it does not hold is an error."""
    rows = users - inter.first_user
    if rows.size and (rows.min() < 0 or rows.max() >= inter.held_count):
        start, stop = inter.held_users
        raise ValueError(f"evaluated users must be held: user {int(users[(rows < 0) | (rows >= inter.held_count)][0])} "
                         f"is not (this split holds users [{start}, {stop}))")
    return rows


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_same_shape(train: Interactions, others: Sequence[Interactions]) -> None:
    for other in others:
        if other.n_users != train.n_users or other.n_items != train.n_items:
            raise ValueError(
                f"interaction shapes differ: train {train.n_users}x{train.n_items}, "
                f"other {other.n_users}x{other.n_items}"
            )
