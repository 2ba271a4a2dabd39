"""The distillation's collectives in two real gloo processes against their one-process meaning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

WORKER = r"""
import json, sys
import numpy as np, torch, torch.distributed as dist
from hetcomp_dist import distributed as D
from hetcomp_dist.evaluate import RankingSums

dist.init_process_group("gloo")
rank = dist.get_rank()
local = torch.arange(3 * (rank + 1), dtype=torch.float32).view(-1, 1) + 10 * rank      # ranks own 3 and 6 rows
weight = torch.nn.Parameter(torch.zeros(2))
weight.grad = torch.full((2,), float(rank + 1))
D.all_reduce_grad(weight)
table = torch.nn.Parameter(torch.zeros(6, 2))          # rank 0 looked rows 1, 3, 1 up; rank 1 rows 3, 4
rows = torch.tensor([1, 3, 1]) if rank == 0 else torch.tensor([3, 4])
torch.nn.functional.embedding(rows, table, sparse=True).mul(torch.arange(1.0, 3.0) * (rank + 1)).sum().backward()
D.sum_sparse_grad(table)
empty = torch.nn.Parameter(torch.zeros(6, 2))           # no rank looked anything up
D.sum_sparse_grad(empty)
covered = np.zeros(5, dtype=bool)
covered[rank] = True
sums = RankingSums(ks=(5,), n_users=rank + 1, gap_profile=0.5, n_profile=1, recall=np.array([0.25 * (rank + 1)]),
                   ndcg=np.array([0.1]), gap_rec=np.array([1.0]), arp=np.array([2.0]), covered=covered)
total = D.all_reduce_ranking_sums(sums)
out = {"sum": D.sum_over_ranks(float(rank + 1)), "gathered": D.gather_cat(local).view(-1).tolist(),
       "grad": weight.grad.tolist(), "n_users": total.n_users, "recall": total.recall.tolist(),
       "covered": total.covered.tolist(), "distributed": D.is_distributed(),
       "sparse_rows": table.grad.indices()[0].tolist(), "sparse_dense": table.grad.to_dense().tolist(),
       "empty_rows": empty.grad.indices()[0].tolist()}
first = D.gather_cat_to_first(local)
out["to_first"] = None if first is None else first.view(-1).tolist()
json.dump(out, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp / f"{rank}.json")], env=env,
                                      cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(WORLD)]


def test_collectives_over_two_gloo_processes(results):
    for r in results:
        assert r["distributed"] and r["sum"] == 3.0
        assert r["gathered"] == [0, 1, 2, 10, 11, 12, 13, 14, 15]        # rank 0's rows first, on every rank
        assert r["grad"] == [3.0, 3.0]                                    # item gradients summed
        assert r["n_users"] == 3 and r["recall"] == pytest.approx([0.75])
        assert r["covered"] == [True, True, False, False, False]          # coverage: the union (MAX)
        # sparse item gradients: the rows any rank looked up, each summed over ranks and repeats
        assert r["sparse_rows"] == [1, 3, 4] and r["empty_rows"] == []
        assert r["sparse_dense"] == [[0, 0], [2, 4], [0, 0], [3, 6], [2, 4], [0, 0]]
    assert results[0]["to_first"] == [0, 1, 2, 10, 11, 12, 13, 14, 15]   # the whole table on rank 0 only
    assert results[1]["to_first"] is None


def test_collectives_are_no_ops_in_one_process():
    import torch

    from hetcomp_dist import distributed as D

    assert not D.is_distributed() and D.sum_over_ranks(2.5) == 2.5
    x = torch.arange(4.0)
    assert torch.equal(D.gather_cat(x), x)
    first = D.gather_cat_to_first(x)
    assert torch.equal(first, x) and first is not x
