"""Reference recommenders (no training loop): sanity baselines for evaluation and the pipeline.

Each is ``fit(train)`` then a scorer ``model(users: LongTensor[B]) -> FloatTensor[B, n_items]``
usable with :mod:`hetcomp_dist.evaluate`. Scores of a user's own train items are not masked
here; evaluation excludes them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp_dist.data.dataset import Interactions


def _binary_csr(train: Interactions) -> sp.csr_matrix:
    """Users x items binary matrix (float32) sharing the CSR arrays' content."""
    data = np.ones(train.nnz, dtype=np.float32)
    return sp.csr_matrix((data, train.indices, train.indptr), shape=(train.n_users, train.n_items))


def _user_index(users: torch.Tensor) -> np.ndarray:
    return users.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)


class MostPopular:
    """score(u, i) = number of train users of item i (the same list for everyone)."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def fit(self, train: Interactions) -> "MostPopular":
        self.counts = torch.from_numpy(train.item_counts().astype(np.float32))
        return self

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            raise RuntimeError("MostPopular: call fit() first")
        return self.counts.unsqueeze(0).repeat(len(users), 1)


class ItemKNN:
    """Item-based k-nearest-neighbours on the binary train matrix.

    sim(i, j) = |U_i & U_j| / (sqrt(|U_i|) * sqrt(|U_j|) + shrink)  (cosine when shrink = 0),
    with sim(j, j) = 0. For every target item j only its ``k`` most similar items i are kept
    (non-zero similarities only); score(u, j) = sum over i in train(u) of sim(i, j).

    ``fit`` computes the similarities ``block_size`` target items at a time: one dense
    block_size x n_items block (float32) at once, never an n_items x n_items matrix. The kept
    neighbourhoods form a sparse n_items x n_items matrix with at most n_items * k entries.

    Args:
        k: neighbours kept per target item.
        shrink: added to the cosine denominator (damps similarities of rare items).
        block_size: target items per block (memory ~ 4 bytes x block_size x n_items, twice that
            with shrink > 0).
    """

    def __init__(self, k: int = 100, shrink: float = 0.0, block_size: int = 1024) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.k, self.shrink, self.block_size = int(k), float(shrink), int(block_size)
        self.x: sp.csr_matrix | None = None
        self.sim: sp.csr_matrix | None = None  # [source i, target j] -> sim(i, j), top-k per column

    def fit(self, train: Interactions) -> "ItemKNN":
        n_items = train.n_items
        x = _binary_csr(train)
        xt = x.T.tocsr()  # items x users
        norms = torch.from_numpy(np.sqrt(train.item_counts()).astype(np.float32))
        # an item nobody has co-occurs with nothing: any finite factor keeps its similarities 0
        inv_norms = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-12), torch.zeros(()))
        k = min(self.k, max(n_items - 1, 1))
        rows_max = min(self.block_size, n_items)
        block_buf = np.empty((rows_max, n_items), dtype=np.float32)  # reused: no page faults per block
        denom_buf = torch.empty(rows_max, n_items) if self.shrink > 0 else None
        rows, cols, vals = [], [], []
        with torch.inference_mode():
            for start in range(0, n_items, self.block_size):
                stop = min(start + self.block_size, n_items)
                r = stop - start
                block = torch.from_numpy((xt[start:stop] @ x).toarray(out=block_buf[:r]))  # co-occurrence
                if denom_buf is None:  # cosine: scale rows and columns in place
                    block.mul_(inv_norms[start:stop, None]).mul_(inv_norms[None, :])
                else:
                    denom = torch.outer(norms[start:stop], norms, out=denom_buf[:r]).add_(self.shrink)
                    block.div_(denom)
                local = torch.arange(r)
                block[local, local + start] = 0.0  # no self-similarity
                val, idx = torch.topk(block, k, dim=1)
                keep = val > 0
                rows.append((local[:, None] + start).expand(-1, k)[keep].numpy())
                cols.append(idx[keep].numpy())
                vals.append(val[keep].numpy())
        target = np.concatenate(rows)
        source = np.concatenate(cols)
        sim = np.concatenate(vals)
        self.sim = sp.csr_matrix((sim, (source, target)), shape=(n_items, n_items), dtype=np.float32)
        self.x = x
        return self

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        if self.x is None or self.sim is None:
            raise RuntimeError("ItemKNN: call fit() first")
        scores = (self.x[_user_index(users)] @ self.sim).toarray()
        return torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))


class EASE:
    """EASE^R (Steck, WWW 2019): closed-form item-item linear model with a zero diagonal.

    P = (X^T X + lam I)^-1;  B_ij = -P_ij / P_jj (i != j), B_jj = 0;  score(u) = x_u B.
    Needs a dense n_items x n_items matrix (and its inverse), so it refuses catalogues larger
    than ``max_items`` (default 20,000 items: ~1.6 GB per float32 matrix, 3.2 GB in float64).
    """

    def __init__(self, lam: float = 500.0, max_items: int = 20_000, dtype: torch.dtype = torch.float64) -> None:
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam, self.max_items, self.dtype = float(lam), int(max_items), dtype
        self.train: Interactions | None = None
        self.weights: torch.Tensor | None = None

    def fit(self, train: Interactions) -> "EASE":
        n_items = train.n_items
        if n_items > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n_items} x {n_items} matrix; n_items exceeds max_items={self.max_items} "
                "(raise max_items only with enough memory, or use ItemKNN)"
            )
        x = _binary_csr(train).astype(np.float64)
        gram = torch.from_numpy((x.T @ x).toarray()).to(self.dtype)
        gram.diagonal().add_(self.lam)
        p = torch.linalg.inv(gram)
        del gram
        weights = p / (-p.diagonal())[None, :]
        weights.diagonal().zero_()
        self.weights = weights.to(torch.float32)
        self.train = train
        return self

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        if self.train is None or self.weights is None:
            raise RuntimeError("EASE: call fit() first")
        u = _user_index(users)
        row, item = self.train.rows(u)
        x = torch.zeros(len(u), self.train.n_items, dtype=torch.float32)
        x[torch.from_numpy(row), torch.from_numpy(item.astype(np.int64))] = 1.0
        return x @ self.weights


def evaluate_references(dataset_uri: str, names: list[str], ks: list[int], out: str | None = None) -> dict[str, dict]:
    """Fit and evaluate reference recommenders on a prepared dataset (valid and test metrics).

    Writes ``metrics.json`` under ``out`` (with a manifest) when given. Returns
    {name: {"valid": metrics, "test": metrics, "seconds": fit + evaluation time}}.
    """
    import time

    from hetcomp_dist import storage
    from hetcomp_dist.data.dataset import load_dataset
    from hetcomp_dist.evaluate import evaluate_split

    factories = {"mostpop": MostPopular, "itemknn": ItemKNN, "ease": EASE}
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown reference model(s) {unknown}; choose from {sorted(factories)}")
    data = load_dataset(dataset_uri)
    results = {}
    for name in names:
        start = time.perf_counter()
        model = factories[name]().fit(data.train)
        results[name] = {split: evaluate_split(model, data, split, ks) for split in ("valid", "test")}
        results[name]["seconds"] = time.perf_counter() - start
    if out is not None:
        with storage.open_output(out, kind="reference-metrics",
                                 config={"dataset": dataset_uri, "models": names, "ks": ks}) as o:
            o.write_json("metrics.json", results)
    return results
