"""Sharded training (hetcomp_dist.sharding) against the one-process model: two real gloo processes.

The correspondence checked here, for W = 2 processes and a global batch of B rows:

* each rank takes its own b = B // W rows (``local_batch``; the last B % W rows are dropped, so the
  reference uses the first W * b rows) and computes the model's loss on them, a mean over its b rows;
* TorchRec's backward scales the table gradients by 1 / W and sums the ranks' contributions on the
  rank that holds each row; DDP averages the dense gradients. Both therefore see the gradient of
  (1/W) * sum_r loss_r, the gradient of the one-process model's loss on the whole batch;
* so one sharded step with learning rate lr equals one one-process step on the whole batch with the
  same lr and optimizer (plain SGD for ``sgd``; for ``rowwise_adagrad`` the fbgemm rule
  s_row += mean_j(g_row,j^2), w_row -= lr * g_row / (sqrt(s_row) + eps), written out below).

Before the last step every case halves the learning rates (``scale_lr``, the teachers' lr_decay), and
the reference does the same, so the fused kernels are seen to take the new lr. A model rebuilt from the
gathered state and optimizer state after step 2 (a resumed teacher) takes the same step 3.

Each rank writes its results to a file and the test compares them with a one-process reference
computed here (a rare gloo abort at interpreter exit after the files are complete does not fail it).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 11          # odd on purpose: each rank gets 5 rows, the 11th is dropped
STEPS = 3
DECAY = 0.5                # applied before the last step
N_USERS, N_ITEMS = 7, 11   # few rows: ids repeat within and across the ranks' halves

# name -> model, params, sharding per table, table optimizer and lr, how the sharded side is built
CASES = {
    "bpr_mf_sgd": dict(model="bpr_mf", params={"dim": 8, "reg": 0.01},
                       sharding={"user": "row_wise", "item": "table_wise"}, opt="sgd", lr=0.5, build="meta"),
    "bpr_mf_rowwise_adagrad": dict(model="bpr_mf", params={"dim": 8, "reg": 0.01},
                                   sharding={"user": "row_wise", "item": "row_wise"},
                                   opt="rowwise_adagrad", lr=0.1, build="cpu"),
    # init_std 0.5 in dim 8: norms above 1, so after_step's projection acts
    "cml_sgd": dict(model="cml", params={"dim": 8, "n_neg": 3, "init_std": 0.5},
                    sharding={"user": "row_wise", "item": "table_wise"}, opt="sgd", lr=0.5, build="cpu"),
    # dense MLP layers: DDP inside DMP, Adam on them (same lr), SGD on the tables; the two item tables
    # table_wise round-robin: one on each rank
    "neumf_sgd_adam": dict(model="neumf", params={"dim": 8, "layers": [8, 4], "n_neg": 2, "init_std": 0.3},
                           sharding={"gmf_user": "row_wise", "gmf_item": "table_wise",
                                     "mlp_user": "row_wise", "mlp_item": "table_wise"},
                           opt="sgd", lr=0.05, build="meta"),
}
RESUMED = ("bpr_mf_rowwise_adagrad", "neumf_sgd_adam")
EPS = 1e-8
META_INIT = dict(n_users=400, n_items=300, dim=16, init_std=0.1)


def _train():
    from hetcomp_dist.data.dataset import Interactions

    rng = np.random.default_rng(0)
    pairs = np.unique(np.stack([rng.integers(0, N_USERS, 40), rng.integers(0, N_ITEMS, 40)], 1), axis=0)
    return Interactions.from_pairs(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)


def _build(case: dict, meta: bool = False):
    from hetcomp_dist import models, sharding

    torch.manual_seed(1234)
    if meta:
        return sharding.build_meta(case["model"], N_USERS, N_ITEMS, _train(), dict(case["params"]))
    return models.build(case["model"], N_USERS, N_ITEMS, _train(), dict(case["params"]))


def _table_keys(state: dict) -> list[str]:
    return [k for k in state if ".embedding_bags." in k]


# ----------------------------------------------------------------------------- worker (one rank)

def _shard(case: dict, meta: bool):
    from hetcomp_dist import sharding as S

    sharded = S.shard_model(_build(case, meta), case["sharding"], lr=case["lr"], table_optimizer=case["opt"], eps=EPS)
    if meta:
        sharded.load_full_state_dict(_build(case).state_dict())
    return sharded.train()


def _step(sharded, batch) -> float:
    loss = sharded.loss(batch)
    sharded.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sharded.optimizer.step()
    sharded.after_step()
    return loss.item()


def _run_case(name: str, case: dict) -> dict:
    import torch.distributed as dist

    sharded = _shard(case, case["build"] == "meta")
    batches = list(itertools.islice(sharded.batches(_train(), GLOBAL_BATCH, np.random.default_rng(7)), STEPS))
    losses, saved = [], None
    for step, batch in enumerate(batches):
        if step == STEPS - 1:
            saved = [sharded.full_state_dict(dst=0), sharded.full_optimizer_state(dst=0)]
            sharded.scale_lr(DECAY)
        losses.append(_step(sharded, batch))
    local = {t: sharded.model.tables.weight(t).detach().clone() for t in case["sharding"]}
    out = {"losses": losses, "local": local, "full": sharded.full_state_dict(dst=0)}
    if name in RESUMED:                     # a teacher resumed from the checkpoint written after step 2
        dist.broadcast_object_list(saved, src=0)
        again = _shard(case, meta=True)
        again.load_full_state_dict(saved[0])
        again.load_full_optimizer_state(saved[1])
        again.scale_lr(DECAY)
        out["resumed_loss"] = _step(again, batches[-1])
        out["resumed_full"] = again.full_state_dict(dst=0)
    return out


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    from hetcomp_dist import sharding as S
    from hetcomp_dist.models.mf import BPRMF

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict = {name: _run_case(name, case) for name, case in CASES.items()}
    # Meta-built rows, not overwritten: the tables' own init, drawn per rank.
    m = META_INIT
    model = BPRMF(m["n_users"], m["n_items"], None, dim=m["dim"], init_std=m["init_std"], device=torch.device("meta"))
    results["meta_init"] = S.shard_model(model, {"user": "row_wise", "item": "table_wise"}, lr=0.1, seed=3).full_state_dict()
    rank = dist.get_rank()
    tmp = out_dir / f"rank{rank}.pt.tmp"
    torch.save(results, tmp)
    tmp.rename(out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- one-process reference

def _reference(case: dict) -> dict:
    """The one-process model trained on the same global batches (first WORLD * b rows of each)."""
    from hetcomp_dist.sharding import local_batch

    model = _build(case)
    model.train()
    tables = [p for n, p in model.named_parameters() if ".embedding_bags." in n]
    dense = [p for n, p in model.named_parameters() if ".embedding_bags." not in n]
    adam = torch.optim.Adam(dense, lr=case["lr"]) if dense else None
    adagrad_sums = [torch.zeros(p.shape[0]) for p in tables]
    losses, rank_losses, lr = [], [], case["lr"]
    for step, batch in enumerate(itertools.islice(model.batches(_train(), GLOBAL_BATCH, np.random.default_rng(7)), STEPS)):
        if step == STEPS - 1:
            lr *= DECAY
            if adam is not None:
                adam.param_groups[0]["lr"] *= DECAY
        b = GLOBAL_BATCH // WORLD
        with torch.no_grad():
            rank_losses.append([model.loss(local_batch(batch, r, WORLD)).item() for r in range(WORLD)])
        loss = model.loss({k: v[:WORLD * b] for k, v in batch.items()})
        for p in model.parameters():
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p, s in zip(tables, adagrad_sums):
                if case["opt"] == "sgd":
                    p -= lr * p.grad
                else:  # fbgemm's exact row-wise Adagrad
                    s += p.grad.pow(2).mean(1)
                    p -= lr * p.grad / (s.sqrt() + EPS)[:, None]
        if adam is not None:
            adam.step()
        model.after_step()
        losses.append(loss.item())
    return {"losses": losses, "rank_losses": rank_losses, "state": model.state_dict()}


# ----------------------------------------------------------------------------- the test

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out_dir: Path, port: int) -> tuple[list, list]:
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
        log = open(out_dir / f"rank{rank}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir)], cwd=REPO_ROOT, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _run_ranks(out_dir: Path) -> list[dict]:
    """Start WORLD worker processes (env:// variables, as torchrun sets them); return their results."""
    last = ""
    for _ in range(2):  # a second try only if the free port was taken meanwhile
        procs, logs = _start(out_dir, _free_port())
        try:
            for p in procs:
                p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:        # only the processes this test started
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        files = [out_dir / f"rank{r}.pt" for r in range(WORLD)]
        if all(f.exists() for f in files):  # judge the work, not the exit code (rare gloo abort at exit)
            return [torch.load(f, weights_only=False) for f in files]
        last = "\n".join(f"--- rank {r} (exit {p.returncode}):\n"
                         + (out_dir / f"rank{r}.log").read_text(errors="replace")[-3000:]
                         for r, p in enumerate(procs))
        if "address already in use" not in last.lower():
            break
    pytest.fail(f"sharded workers wrote no results:\n{last}")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory.mktemp("sharded"))


def _assert_state(got: dict, want: dict, name: str) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.integration  # two gloo processes: ~30 s on 2 shared cores, mostly importing torchrec
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_step_equals_one_process(rank_results, name):
    case = CASES[name]
    ref = _reference(case)
    ranks = [r[name] for r in rank_results]
    # losses: each rank's equals the reference's on its rows; their mean, the whole-batch loss
    for step in range(STEPS):
        got = [ranks[r]["losses"][step] for r in range(WORLD)]
        assert got == pytest.approx(ref["rank_losses"][step], rel=1e-5, abs=1e-6), (step, got)
        assert float(np.mean(got)) == pytest.approx(ref["losses"][step], rel=1e-5, abs=1e-6), step
    # every rank's own rows are a slice of the reference table (row_wise: its block; table_wise: all or none)
    for table in case["sharding"]:
        (key,) = [k for k in _table_keys(ref["state"]) if k.endswith(f".{table}.weight")]
        held = [ranks[r]["local"][table] for r in range(WORLD)]
        assert sum(len(h) for h in held) == len(ref["state"][key]), table
        torch.testing.assert_close(torch.cat(held), ref["state"][key], rtol=1e-5, atol=1e-6, msg=f"{name}: {table}")
    # the gathered full state_dict (tables and dense layers) equals the reference's, on rank 0 only
    _assert_state(ranks[0]["full"], ref["state"], name)
    assert all(r["full"] is None for r in ranks[1:])
    init = _build(case).state_dict()
    assert all(not torch.allclose(init[k], ranks[0]["full"][k]) for k in _table_keys(init))
    if name in RESUMED:      # rebuilt from the gathered model and optimizer state: the same last step
        assert [r["resumed_loss"] for r in ranks] == pytest.approx([r["losses"][-1] for r in ranks], rel=1e-6)
        _assert_state(ranks[0]["resumed_full"], ref["state"], f"{name} resumed")


@pytest.mark.integration
def test_meta_built_rows_use_the_tables_init_per_rank(rank_results):
    state = rank_results[0]["meta_init"]
    users = state["tables.ebc.embedding_bags.user.weight"]
    items = state["tables.ebc.embedding_bags.item.weight"]
    assert users.shape == (META_INIT["n_users"], META_INIT["dim"]) and items.shape == (META_INIT["n_items"], META_INIT["dim"])
    for table in (users, items):
        assert table.std().item() == pytest.approx(META_INIT["init_std"], rel=0.1)  # N(0, std^2), not TorchRec's uniform
    half = META_INIT["n_users"] // WORLD
    assert not torch.allclose(users[:half], users[half:])  # rank 1's rows are not a copy of rank 0's
    assert rank_results[1]["meta_init"] is None


def test_shard_model_refuses_whole_table_families_and_bad_settings():
    from hetcomp_dist import sharding as S

    env = S.DistEnv(rank=0, world_size=2, local_world_size=2, device=torch.device("cpu"))
    for name in ("lightgcn", "multvae", "item_ae"):
        model = _build({"model": name, "params": {}})
        with pytest.raises(TypeError, match="cannot be sharded"):
            S.shard_model(model, {n: "row_wise" for n in model.tables.names}, lr=0.1, env=env)
        with pytest.raises(TypeError, match="cannot be sharded"):
            S.build_meta(name, N_USERS, N_ITEMS, _train(), {})
    model = _build(CASES["bpr_mf_sgd"])
    with pytest.raises(ValueError, match="no CPU kernel"):
        S.shard_model(model, {"user": "row_wise", "item": "row_wise"}, lr=0.1, table_optimizer="adam", env=env)
    with pytest.raises(ValueError, match="missing"):
        S.shard_model(model, {"user": "row_wise"}, lr=0.1, table_optimizer="sgd", env=env)
    with pytest.raises(ValueError, match="multiples of 4"):
        S.shard_model(_build({"model": "bpr_mf", "params": {"dim": 6}}), {"user": "row_wise", "item": "row_wise"},
                      lr=0.1, table_optimizer="sgd", env=env)


def test_plan_puts_user_tables_row_wise():
    from hetcomp_dist import sharding as S

    neumf = _build(CASES["neumf_sgd_adam"], meta=True)
    assert S.plan(neumf, "table_wise") == {"gmf_user": "row_wise", "gmf_item": "table_wise",
                                           "mlp_user": "row_wise", "mlp_item": "table_wise"}
    assert S.plan(_build(CASES["cml_sgd"])) == {"user": "row_wise", "item": "row_wise"}


def test_local_batch_splits_evenly_and_drops_the_remainder():
    from hetcomp_dist.sharding import local_batch

    batch = {"user": torch.arange(11), "neg": torch.arange(22).view(11, 2)}
    parts = [local_batch(batch, r, 2) for r in range(2)]
    assert [p["user"].tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert parts[1]["neg"].tolist() == batch["neg"][5:10].tolist()
    assert local_batch({"user": torch.arange(1)}, 0, 2) is None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
