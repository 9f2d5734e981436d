"""Collectives of data-parallel base training: this process's rank, and sums over ranks.

Outside a process group every call is a no-op, so :func:`fewseg.train.train_base` runs the same code in one
process and in N ranks. The launcher that starts the ranks is :mod:`fewseg.distributed`; it depends on training,
training depends on this module, and this module depends on no other fewseg module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of every rank, flattened into one buffer (one collective per step, as DDP buckets do).

    Done once after gradient accumulation, so accumulation needs no ``no_sync``. Parameters without a gradient
    (the instance type token) have none on every rank alike and stay untouched, as in one process.
    """
    if rank_and_world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(summed.view_as(g))
