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


def drop_overflow(choices_GSK: torch.Tensor, num_experts: int, capacity_G: torch.Tensor) -> torch.Tensor:
    """Keeps each group's choices rank by rank, in token order, while the expert has room.

    Args:
        choices_GSK: int64 [G, S, K] experts in preference order per token, ``-1`` for none.
        num_experts: E.
        capacity_G: int64 [G] tokens per expert in each group.

    Returns:
        int64 [G, S, K]: ``choices_GSK`` with the overflowing choices set to ``-1``.
    """
    kept_GSK = choices_GSK.clone()
    loads_GE = torch.zeros(choices_GSK.shape[0], num_experts, dtype=torch.int64, device=choices_GSK.device)
    for rank in range(choices_GSK.shape[2]):  # K is small; tokens are vectorized
        choice_GS = choices_GSK[:, :, rank]
        onehot_GSE = (
            torch.nn.functional.one_hot(choice_GS.clamp(min=0), num_experts) * (choice_GS >= 0)[..., None]
        )
        position_GSE = torch.cumsum(onehot_GSE, dim=1) - 1 + loads_GE[:, None, :]
        fits_GS = ((position_GSE < capacity_G[:, None, None]) & onehot_GSE.bool()).any(2)
        kept_GSK[:, :, rank] = torch.where(fits_GS, choice_GS, -1)
        loads_GE += (onehot_GSE * fits_GS[..., None]).sum(1)
    return kept_GSK


def solve_greedy(problem: Problem) -> Assignment:
    """GShard dispatch: rank by rank, token order within a rank, overflow dropped."""
    experts_TK = torch.topk(problem.scores_TE, problem.k, dim=1).indices
    if problem.valid_T is not None:
        experts_TK[~problem.valid_T] = -1
    capacity_G = torch.tensor([problem.capacity])
    experts_TK = drop_overflow(experts_TK[None], problem.num_experts, capacity_G)[0]
    return to_assignment(problem, experts_TK, "greedy")
