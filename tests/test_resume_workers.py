"""Sharded distillation checkpoints resume under another worker count (2 -> 1 and 1 -> 2), with two
real gloo processes, for both optimizers (dense Adam, and RowwiseAdam with its per-row state in the
shards) and for the item table stepped by rows under the sampled denominator (its row-wise state is
replicated, in the shared part); the synthetic run of tests/test_distill.py. Each worker loads only its users' slice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.train import distill
from test_distill import _cfg, run  # noqa: F401  (the synthetic dataset + trajectories fixture)

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
import torch.distributed as dist
from hetcomp_dist.distill.config import DistillConfig
from hetcomp_dist.distill.train import distill

cfg, ds, uris, out, crash, result = json.loads(sys.argv[1]), *sys.argv[2:4], sys.argv[4], int(sys.argv[5]), sys.argv[6]
dist.init_process_group("gloo")

class Crash(Exception):
    pass

def report(event):
    if crash and event.get("epoch") == crash and "valid" in event:
        raise Crash

try:
    metrics = distill(ds, json.loads(uris), DistillConfig(**cfg), out, ks=(10, 20), report=report)
except Crash:       # as a crash would: no interpreter teardown, where gloo's threads can abort (SIGABRT)
    sys.stderr.flush()
    os._exit(3)
if dist.get_rank() == 0:
    json.dump(metrics, open(result, "w"))
dist.destroy_process_group()
"""


def _two_ranks(cfg: DistillConfig, ds: str, uris: list[str], out: str, crash: int, result: Path) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg.__dict__), ds, json.dumps(uris),
                                       out, str(crash), str(result)], env=env, cwd=REPO_ROOT,
                                      stderr=subprocess.PIPE, text=True))
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode in (0, 3), err[-3000:]
        codes.append(p.returncode)
    return codes


def _config(optimizer: str = "adam") -> DistillConfig:
    """``optimizer``: adam, rowwise_adam, or item_rows (rowwise_adam, and the items by rows: sampled denominator)."""
    extra = {"optimizer": optimizer}
    if optimizer == "item_rows":
        extra = {"optimizer": "rowwise_adam", "item_updates": "rows", "sampled_negatives": 30}
    return DistillConfig(**{**_cfg("hetcomp").__dict__, "max_epochs": 20, **extra})


OPTIMIZERS = pytest.mark.parametrize("optimizer", ["adam", "rowwise_adam", "item_rows"])


def _same_run(resumed: dict, straight: dict) -> None:
    # Two workers sum the same gradients as one process, in another order (the sampled denominator's
    # items too: every rank draws them from the epoch's rng), so the runs agree to float rounding.
    assert resumed["test"]["recall@10"] == straight["test"]["recall@10"]
    assert resumed["test"]["ndcg@10"] == pytest.approx(straight["test"]["ndcg@10"], rel=1e-4)


class _Crash(Exception):
    pass


@OPTIMIZERS
def test_two_workers_then_one(run, tmp_path, optimizer):  # noqa: F811
    ds, uris, _ = run
    out = str(tmp_path / "out")
    assert _two_ranks(_config(optimizer), ds, uris, out, 10, tmp_path / "r.json") == [3, 3]
    shards = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "epoch-000010").glob("rank-*"))
    assert shards == ["rank-00000-of-00002.pt", "rank-00001-of-00002.pt"]          # nothing gathered
    if optimizer == "item_rows":                                   # the item table split by rows too
        items = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "epoch-000010").glob("items-*"))
        assert items == ["items-rank-00000-of-00002.pt", "items-rank-00001-of-00002.pt"]
    resumed = distill(ds, uris, _config(optimizer), out, ks=(10, 20))
    straight = distill(ds, uris, _config(optimizer), str(tmp_path / "straight"), ks=(10, 20))
    assert resumed["resumed_from"] == [10] and resumed["workers"] == 1
    assert [h["epoch"] for h in resumed["history"]] == [5, 10, 15, 20]
    _same_run(resumed, straight)


@OPTIMIZERS
def test_one_worker_then_two(run, tmp_path, optimizer):  # noqa: F811
    ds, uris, _ = run
    out = str(tmp_path / "out")

    def crash(event):
        if event.get("epoch") == 10 and "valid" in event:
            raise _Crash

    with pytest.raises(_Crash):
        distill(ds, uris, _config(optimizer), out, ks=(10, 20), report=crash)
    assert _two_ranks(_config(optimizer), ds, uris, out, 0, tmp_path / "r.json") == [0, 0]
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["resumed_from"] == [10] and resumed["workers"] == 2
    assert [h["epoch"] for h in resumed["history"]] == [5, 10, 15, 20]
    straight = distill(ds, uris, _config(optimizer), str(tmp_path / "straight"), ks=(10, 20))
    _same_run(resumed, straight)
    # each worker holds about half of what one process holds: its users' data, rows and state
    (whole,), halves = straight["rank_bytes"], resumed["rank_bytes"]
    assert len(halves) == 2 and all(h["student"] == halves[0]["student"] for h in halves)
    for part in ("data", "objective"):             # (plus the item-side arrays every worker holds whole)
        assert all(h[part] < 0.75 * whole[part] for h in halves), (part, halves, whole)
