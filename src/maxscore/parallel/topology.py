"""Who is who in a run: world size, rank, and the expert-parallel and replica process groups.

With world size W and expert-parallel size P (P divides W), ranks ``i*P ... (i+1)*P - 1``
form expert-parallel group i (together they hold every expert once) and ranks
``j, j+P, j+2P, ...`` form replica group j (they hold the same expert shard).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maxscore._distributed import world_size


@dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    world_size: int = 1
    rank: int = 0
    expert_size: int = 1
    expert_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_topology(expert_parallel: int = 0) -> Topology:
    """The topology of the initialized process group (a single process without one).

    Args:
        expert_parallel: expert-parallel size P (0: every rank, P = W).  Collective: every rank
            must call it with the same value.
    """
    if world_size() == 1:
        return Topology()
    world, rank = dist.get_world_size(), dist.get_rank()
    size = expert_parallel or world
    if world % size:
        raise ValueError(f"expert_parallel={expert_parallel} must divide the world size {world}")
    expert_groups = [dist.new_group(list(range(i, i + size))) for i in range(0, world, size)]
    replica_groups = [dist.new_group(list(range(j, world, size))) for j in range(size)]
    return Topology(
        world_size=world,
        rank=rank,
        expert_size=size,
        expert_group=expert_groups[rank // size],
        replica_group=replica_groups[rank % size],
    )


def check_same_on_all_ranks(name: str, text: str) -> None:
    """Raises on every rank when ``text`` (e.g. a config as JSON) differs between ranks."""
    if world_size() == 1:
        return
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    low = torch.tensor([digest], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise ValueError(
            f"the {name} differs between ranks (rank {dist.get_rank()} has digest {digest:x}); "
            "start every rank with the same settings"
        )


def mean_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The mean of each value over all ranks (the values themselves on a single process)."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()
