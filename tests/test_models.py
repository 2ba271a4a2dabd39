"""Model families: the fast paths (fused softmax loss, embedding-bag graph product, scorers) equal
their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetcomp_dist import models
from hetcomp_dist.data.dataset import Interactions
from hetcomp_dist.models.lightgcn import normalized_adjacency
from hetcomp_dist.models.vae import multinomial_nll

N_USERS, N_ITEMS = 12, 17


@pytest.fixture(scope="module")
def train() -> Interactions:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, N_USERS, 80), rng.integers(0, N_ITEMS, 80)
    users[:N_USERS] = np.arange(N_USERS)  # every user and item has a train pair
    items[:N_ITEMS] = np.arange(N_ITEMS)
    keys = np.unique(users * N_ITEMS + items)  # prepared data holds each pair once
    return Interactions.from_pairs(keys // N_ITEMS, keys % N_ITEMS, N_USERS, N_ITEMS)


def _dense_adjacency(train: Interactions) -> torch.Tensor:
    n = train.n_users + train.n_items
    a = torch.zeros(n, n, dtype=torch.float64)
    u, i = torch.from_numpy(train.users().astype(np.int64)), torch.from_numpy(train.indices.astype(np.int64))
    a[u, i + train.n_users] = 1.0
    a[i + train.n_users, u] = 1.0
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def test_adjacency_product_and_its_gradient_match_the_dense_matrix(train):
    adj, dense = normalized_adjacency(train), _dense_adjacency(train)
    x = torch.randn(N_USERS + N_ITEMS, 5, requires_grad=True)
    y = adj @ x
    torch.testing.assert_close(y.double(), dense @ x.detach().double(), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), dense.T @ g.double(), atol=1e-5, rtol=1e-5)


def test_lightgcn_propagation_is_the_mean_of_the_layers(train):
    torch.manual_seed(0)
    m = models.build("lightgcn", N_USERS, N_ITEMS, train, {"dim": 4, "layers": 2})
    x = torch.cat([m.tables.weight("user"), m.tables.weight("item")]).detach().double()
    a = _dense_adjacency(train)
    final = (x + a @ x + a @ a @ x) / 3
    users, items = m.propagate()
    torch.testing.assert_close(users.detach().double(), final[:N_USERS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(items.detach().double(), final[N_USERS:], atol=1e-5, rtol=1e-5)


def test_lightgcn_bpr_averages_over_negatives(train):
    torch.manual_seed(0)
    m = models.build("lightgcn", N_USERS, N_ITEMS, train, {"dim": 4, "n_neg": 3, "reg": 0.0})
    batch = next(m.batches(train, 8, np.random.default_rng(0)))
    assert batch["neg"].shape == (8, 3)
    users, items = m.propagate()
    u, p, n = users[batch["user"]], items[batch["pos"]], items[batch["neg"]]
    expected = -F.logsigmoid((u * p).sum(-1, keepdim=True) - (u[:, None] * n).sum(-1)).mean()
    torch.testing.assert_close(m.loss(batch), expected)


def test_multinomial_nll_equals_log_softmax_and_has_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    row = torch.tensor([0, 0, 1, 3, 3, 3, 5])  # rows 2 and 4 have no pairs
    col = torch.tensor([1, 4, 2, 0, 5, 8, 3])
    expected = -F.log_softmax(h @ w.T + b, -1)[row, col].sum()
    torch.testing.assert_close(multinomial_nll(h, w, b, row, col), expected)
    assert torch.autograd.gradcheck(lambda h, w, b: multinomial_nll(h, w, b, row, col) * 0.3, (h, w, b))


@pytest.mark.parametrize("name,params", [("multvae", {"hidden": 8, "latent": 3, "decoder_hidden": 0}),
                                         ("multvae", {"hidden": 8, "latent": 3, "decoder_hidden": 5}),
                                         ("item_ae", {"hidden": 6})])
def test_autoencoders_train_and_score(train, name, params):
    torch.manual_seed(0)
    m = models.build(name, N_USERS, N_ITEMS, train, params)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    for batch in m.batches(train, 5, np.random.default_rng(0)):
        loss = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    m.eval()
    with torch.no_grad():
        scores = m.scorer()(torch.arange(N_USERS))
    assert scores.shape == (N_USERS, N_ITEMS) and torch.isfinite(scores).all()


def test_neumf_scorer_equals_the_pairwise_logits(train):
    torch.manual_seed(0)
    m = models.build("neumf", N_USERS, N_ITEMS, train, {"dim": 4, "layers": [6, 5, 3], "score_chunk": 5})
    for p in m.parameters():
        torch.nn.init.normal_(p)
    m.eval()
    with torch.no_grad():
        users = torch.arange(N_USERS)
        pairs = m._logits(users.repeat_interleave(N_ITEMS), torch.arange(N_ITEMS).repeat(N_USERS))
        torch.testing.assert_close(m.scorer()(users), pairs.view(N_USERS, N_ITEMS), atol=1e-4, rtol=1e-4)


def test_cml_scorer_ranks_by_distance(train):
    torch.manual_seed(0)
    m = models.build("cml", N_USERS, N_ITEMS, train, {"dim": 4})
    with torch.no_grad():
        u, i = m.tables.weight("user"), m.tables.weight("item")
        neg_dist = -torch.cdist(u, i).pow(2)
        scores = m.scorer()(torch.arange(N_USERS))
        # equal up to the per-user constant ||u||^2
        torch.testing.assert_close(scores - u.pow(2).sum(1, keepdim=True), neg_dist, atol=1e-5, rtol=1e-5)
