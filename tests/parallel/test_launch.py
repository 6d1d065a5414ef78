"""Process groups: a stalled rank makes the others stop with a message, not hang; config checks."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from maxscore.parallel.launch import explain_timeouts, spawn
from maxscore.parallel.topology import check_same_on_all_ranks, make_topology


def _stalled(rank, world_size):
    if rank == 1:
        time.sleep(30)  # never joins the collective
        return
    with explain_timeouts(2.0):
        dist.all_reduce(torch.zeros(1))


@pytest.mark.distributed
def test_a_stalled_rank_makes_the_others_stop_with_a_message():
    begin = time.monotonic()
    with pytest.raises(Exception, match="rank 0: a collective timed out after 2 s"):
        spawn(_stalled, 2, timeout_s=2.0)
    assert time.monotonic() - begin < 25  # stopped by the timeout, long before the stalled rank


def _mismatched(rank, world_size):
    check_same_on_all_ranks("training configuration", f'{{"seed": {rank}}}')


@pytest.mark.distributed
def test_mismatched_configs_across_ranks_raise():
    with pytest.raises(Exception, match="training configuration differs between ranks"):
        spawn(_mismatched, 2)


def _topology(rank, world_size, out):
    topology = make_topology(expert_parallel=2)
    experts = torch.tensor([float(rank)])
    dist.all_reduce(experts, group=topology.expert_group)  # sums over the ranks holding all experts
    replicas = torch.tensor([float(rank)])
    dist.all_reduce(replicas, group=topology.replica_group)  # sums over the copies of one shard
    torch.save(torch.cat([experts, replicas]), f"{out}/rank{rank}.pt")


@pytest.mark.distributed
def test_topology_groups_for_four_ranks_with_expert_parallel_two(tmp_path):
    spawn(_topology, 4, str(tmp_path))
    sums = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True).tolist() for r in range(4)]
    # expert groups {0, 1} and {2, 3}; replica groups {0, 2} and {1, 3}
    assert sums == [[1.0, 2.0], [1.0, 4.0], [5.0, 2.0], [5.0, 4.0]]
