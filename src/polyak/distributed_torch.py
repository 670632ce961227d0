"""The few ``torch.distributed`` facts every torch module of polyak asks.

A leaf module: it imports only torch, so the optimizers, the averagers, the
AlgoPerf adapter and the workloads share one answer to "which rank am I, of how
many?" and one way to unwrap a DDP / ``torch.compile`` module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world(process_group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def is_distributed() -> bool:
    """Whether more than one process trains (gradients must be all-reduced)."""
    return rank_and_world()[1] > 1


def all_gather_flat(full: torch.Tensor, local: torch.Tensor) -> None:
    """Gathers every rank's equal-sized ``local`` into ``full``, in rank order."""
    # all_gather_single replaces all_gather_into_tensor in recent torch;
    # AlgoPerf pins a torch that has only the latter.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(full, local)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def unwrap_module(module: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
