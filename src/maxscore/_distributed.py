"""Process-group helpers for every layer: whether torch.distributed is running, and the size of
a group and this process's rank in it (1 and 0 without an initialized process group)."""

from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (default: the world); 1 without an initialized process group."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if initialized() else 0


def average_over_ranks(tensor, group: dist.ProcessGroup | None = None) -> None:
    """Replaces ``tensor`` by its mean over the ranks of ``group`` (default: the world), in place
    on its device (no host sync); nothing without a process group of more than one rank."""
    size = world_size(group)
    if size > 1:
        sum_over_ranks(tensor, group)  # then divided: gloo has no AVG
        tensor.div_(size)


def sum_over_ranks(tensor, group: dist.ProcessGroup | None = None) -> None:
    """Replaces ``tensor`` by its sum over the ranks of ``group`` (default: the world), in place
    on its device (no host sync); nothing without a process group of more than one rank."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
