"""The distillation's collectives in two real gloo processes against their one-process meaning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
# an item table of 6 rows split by rows: rank 0 holds rows 0-2, rank 1 rows 3-5; row r holds (10r, 10r + 1)
from hetcomp_dist.distill.student import Student, item_range
student = Student(1, 6, 2, items=item_range(6, rank, 2))
with torch.no_grad():
    lo = student.item_range[0]
    student.tables.weight("item").copy_(torch.arange(lo, lo + 3).repeat_interleave(2).view(3, 2) * 10.0
                                        + torch.tensor([0.0, 1.0]))
needed = torch.tensor([1, 4, 1]) if rank == 0 else torch.tensor([4, 5])    # rank 0 looks row 1 up twice
step = student.step_items(needed)
looked = step.weight[step.index(needed)]
looked.mul(torch.arange(1.0, 3.0) * (rank + 1)).sum().backward()
student.owned_item_grad()
student_grad = student.tables.weight("item").grad.to_dense().tolist()
with student.every_item():
    whole = student.item_table().tolist()
none = student.step_items(torch.zeros(0, dtype=torch.long))                # no rank looks anything up
student.owned_item_grad()
covered = np.zeros(5, dtype=bool)
covered[rank] = True
sums = RankingSums(ks=(5,), n_users=rank + 1, gap_profile=0.5, n_profile=1, recall=np.array([0.25 * (rank + 1)]),
                   ndcg=np.array([0.1]), gap_rec=np.array([1.0]), arp=np.array([2.0]), covered=covered)
total = D.all_reduce_ranking_sums(sums)
out = {"sum": D.sum_over_ranks(float(rank + 1)), "gathered": D.gather_cat(local).view(-1).tolist(),
       "grad": weight.grad.tolist(), "n_users": total.n_users, "recall": total.recall.tolist(),
       "covered": total.covered.tolist(), "distributed": D.is_distributed(),
       "union": step.ids.tolist(), "looked": looked.tolist(), "item_range": list(student.item_range),
       "owned_grad": student_grad, "whole": whole, "none_rows": none.ids.tolist(),
       "none_grad": student.tables.weight("item").grad.coalesce().indices()[0].tolist()}
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
        # a split item table: every rank gets the union of the rows any rank needs, from their owners
        assert r["union"] == [1, 4, 5] and r["none_rows"] == [] and r["none_grad"] == []
        assert r["whole"] == [[10.0 * i, 10.0 * i + 1] for i in range(6)]    # assembled for scoring only
    assert results[0]["looked"] == [[10, 11], [40, 41], [10, 11]] and results[1]["looked"] == [[40, 41], [50, 51]]
    # each owner gets its rows' gradient, summed over ranks and repeats (rank r's coefficients (1, 2) x (r + 1))
    assert results[0]["item_range"] == [0, 3] and results[1]["item_range"] == [3, 6]
    assert results[0]["owned_grad"] == [[0, 0], [2, 4], [0, 0]]
    assert results[1]["owned_grad"] == [[0, 0], [3, 6], [2, 4]]
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
