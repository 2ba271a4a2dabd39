"""Collectives of the data-parallel distillation (no-ops in one process).

Every rank of a distillation calls these at the same points of the loop, so each is a collective
over the default process group, made by Ray Train or torchrun with the backend of the loop's device
(:func:`hetcomp_dist.device.backend`: gloo on the CPU, nccl on CUDA). NCCL moves only CUDA tensors
and gloo is used here with CPU tensors, so each collective communicates on :func:`comm_device` and
hands results back on the device its input came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hetcomp_dist.evaluate import RankingSums


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(x: Any) -> Any:
    """The sum over ranks of a number or tensor (float64; a tensor comes back on its own device)."""
    if not is_distributed():
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(comm_device()).clone()
    dist.all_reduce(t)
    return t.to(x.device) if isinstance(x, torch.Tensor) else t.item()


def all_reduce_grad(weight: torch.Tensor) -> None:
    """Sum ``weight.grad`` over ranks in place (the weight lives on the loop's device, the group's own)."""
    if is_distributed():
        dist.all_reduce(weight.grad)


def union_over_ranks(ids: torch.Tensor) -> torch.Tensor:
    """The sorted distinct ids (int64, 1-D) that any rank passed, the same on every rank, on ``ids``' device."""
    mine = torch.unique(ids)
    if not is_distributed():
        return mine
    return torch.unique(torch.cat(_gather_rows(mine, to_first=False))).to(ids.device)


def _gather_rows(local: torch.Tensor, to_first: bool) -> list[torch.Tensor]:
    """Every rank's ``local`` in rank order, on comm_device: on every rank, or (``to_first``) on rank 0 only
    (the others get []). Tensor collectives need equal sizes, so each rank pads to the longest and the parts
    are trimmed again: plain gathers on gloo and nccl alike, nothing pickled."""
    dev, world = comm_device(), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=dev))
    sizes = [int(c.item()) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]), device=dev)
    padded[:local.shape[0]] = local.detach()
    receiving = not to_first or dist.get_rank() == 0
    parts = [torch.empty_like(padded) for _ in range(world)] if receiving else None
    if to_first:
        dist.gather(padded, parts, dst=0)
    else:
        dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, sizes)] if receiving else []


def owned_rows(shard: torch.Tensor, first: int, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``ids`` (global, sorted, the same on every rank) of a table split by rows, every rank holding
    ``shard`` = rows [first, first + len(shard)): each owner fills its rows, and a SUM all-reduce of zeros
    and owned values gives every rank the exact rows, O(len(ids)) values however large the table."""
    mine = (ids >= first) & (ids < first + shard.shape[0])
    rows = shard.new_zeros(len(ids), shard.shape[1])
    rows[mine] = shard[ids[mine] - first]
    return sum_rows(rows)


def sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` summed over ranks (SUM all-reduce), on ``rows``' device; one process: ``rows`` itself."""
    if not is_distributed():
        return rows
    out = rows.to(comm_device())
    out = out.clone() if out is rows else out
    dist.all_reduce(out)
    return out.to(rows.device)


def gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (users in rank order), concatenated; on every rank, on ``local``'s device."""
    if not is_distributed():
        return local.detach().clone()
    return torch.cat(_gather_rows(local, to_first=False)).to(local.device)


def gather_cat_to_first(local: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows (users in rank order), concatenated on rank 0 only, on the CPU (it is gathered to be
    written); every other rank gets None and keeps nothing beyond its own rows. One process: a CPU copy."""
    if not is_distributed():
        return local.detach().cpu().clone()
    parts = _gather_rows(local, to_first=True)
    return torch.cat(parts).cpu() if dist.get_rank() == 0 else None


def all_reduce_ranking_sums(sums: RankingSums) -> RankingSums:
    """Evaluation sums over every rank's users (SUM for the sums, MAX for the coverage masks)."""
    if not is_distributed():
        return sums
    device = comm_device()
    vector = torch.from_numpy(np.concatenate([[sums.n_users, sums.gap_profile, sums.n_profile],
                                              sums.recall, sums.ndcg, sums.gap_rec, sums.arp])).to(device)
    dist.all_reduce(vector)
    covered = torch.from_numpy(sums.covered.astype(np.uint8)).to(device)
    dist.all_reduce(covered, op=dist.ReduceOp.MAX)
    v, nk, covered = vector.cpu().numpy(), len(sums.ks), covered.cpu()
    return RankingSums(ks=sums.ks, n_users=int(round(v[0])), gap_profile=float(v[1]), n_profile=int(round(v[2])),
                       recall=v[3:3 + nk], ndcg=v[3 + nk:3 + 2 * nk], gap_rec=v[3 + 2 * nk:3 + 3 * nk],
                       arp=v[3 + 3 * nk:3 + 4 * nk], covered=covered.numpy().astype(bool))


def evaluate(scorer, data, split: str, ks: tuple[int, ...], users: np.ndarray) -> dict[str, float]:
    """Metrics of ``scorer`` over every rank's users: this rank's sums (its ``users``), all-reduced."""
    from hetcomp_dist.evaluate import evaluate_sums

    sums = evaluate_sums(scorer, data.train, data.split(split), exclude=[data.held_out_besides(split)],
                         ks=ks, users=users)
    return all_reduce_ranking_sums(sums).metrics()
