"""GShard-style greedy routing with capacity: what overflows is dropped.

Each valid token ranks its top-k experts.  Rank-1 choices fill the experts first, in token
order; then rank-2 choices fill what is left, in token order; and so on.  A choice that finds
its expert full is dropped (``-1``): the token keeps its other experts and, in a model, its
residual connection.  This is the top-k generalization of GShard's top-2 dispatch (Lepikhin
et al., 2021, Algorithm 1) without its random second-expert dropping.

Complexity O(T E K) with ``cumsum``; no Python loop over tokens, no host sync (routers run it
on the device, batched over routing groups).  Ties: as ``torch.topk``.
"""

from __future__ import annotations

import torch

from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment


def drop_overflow(choices_GNK: torch.Tensor, num_experts: int, capacity_G: torch.Tensor) -> torch.Tensor:
    """Keeps each group's choices rank by rank, in token order, while the expert has room.

    Args:
        choices_GNK: int64 [G, N, K] experts in preference order per token, ``-1`` for none.
        num_experts: E.
        capacity_G: int64 [G] tokens per expert in each group.

    Returns:
        int64 [G, N, K]: ``choices_GNK`` with the overflowing choices set to ``-1``.
    """
    kept_GNK = choices_GNK.clone()
    loads_GE = torch.zeros(choices_GNK.shape[0], num_experts, dtype=torch.int64, device=choices_GNK.device)
    for rank in range(choices_GNK.shape[2]):  # K is small; tokens are vectorized
        choice_GN = choices_GNK[:, :, rank]
        onehot_GNE = (
            torch.nn.functional.one_hot(choice_GN.clamp(min=0), num_experts) * (choice_GN >= 0)[..., None]
        )
        position_GNE = torch.cumsum(onehot_GNE, dim=1) - 1 + loads_GE[:, None, :]
        fits_GN = ((position_GNE < capacity_G[:, None, None]) & onehot_GNE.bool()).any(2)
        kept_GNK[:, :, rank] = torch.where(fits_GN, choice_GN, -1)
        loads_GE += (onehot_GNE * fits_GN[..., None]).sum(1)
    return kept_GNK


def solve_greedy(problem: Problem) -> Assignment:
    """GShard dispatch: rank by rank, token order within a rank, overflow dropped."""
    experts_TK = torch.topk(problem.scores_TE, problem.k, dim=1).indices
    if problem.valid_T is not None:
        experts_TK[~problem.valid_T] = -1
    capacity_G = torch.tensor([problem.capacity])
    experts_TK = drop_overflow(experts_TK[None], problem.num_experts, capacity_G)[0]
    return to_assignment(problem, experts_TK, "greedy")
