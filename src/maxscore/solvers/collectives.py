"""Counted host-side collectives for the global solver: all-reduces and all-gathers of small
summaries over a process group (a no-op on a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from maxscore._distributed import rank, world_size


class Reducer:
    """All-reduces on the host over ``group``, counted; a no-op on a single process."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.ranks = world_size(group)
        self.distributed = self.ranks > 1
        self.rank = rank(group)
        # NCCL reduces device tensors only: the summaries make a round trip to the GPU
        self.device = "cuda" if self.distributed and dist.get_backend(group) == "nccl" else "cpu"
        self.calls = self.bytes = 0

    def __call__(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if not self.distributed:
            return tensor
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.cpu()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[R, *shape]: every rank's ``tensor`` (just ``tensor[None]`` on a single process)."""
        if not self.distributed:
            return tensor[None]
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        moved = tensor.to(self.device).contiguous()
        out = moved.new_empty((self.ranks * moved.shape[0],) + tuple(moved.shape[1:]))
        dist.all_gather_into_tensor(out, moved, group=self.group)
        return out.cpu().view((self.ranks,) + tuple(tensor.shape))
