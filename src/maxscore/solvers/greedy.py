"""GShard-style greedy routing with capacity: what overflows is dropped.

Each valid token ranks its top-k experts.  Rank-1 choices fill the experts first, in token
order; then rank-2 choices fill what is left, in token order; and so on.  A choice that finds
its expert full is dropped (``-1``): the token keeps its other experts and, in a model, its
residual connection.  This is the top-k generalization of GShard's top-2 dispatch (Lepikhin
et al., 2021, Algorithm 1) without its random second-expert dropping.

Complexity O(T E K) with ``cumsum``; no Python loop over tokens.  Ties: as ``torch.topk``.
"""

from __future__ import annotations

import torch

from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment


def solve_greedy(problem: Problem) -> Assignment:
    """GShard dispatch: rank by rank, token order within a rank, overflow dropped."""
    scores_TE, capacity = problem.scores_TE, problem.capacity
    experts_TK = torch.topk(scores_TE, problem.k, dim=1).indices
    if problem.valid_T is not None:
        experts_TK[~problem.valid_T] = -1
    num_experts = problem.num_experts
    loads_E = torch.zeros(num_experts, dtype=torch.int64)
    for rank in range(problem.k):  # K is small; tokens are vectorized
        choice_T = experts_TK[:, rank]
        onehot_TE = torch.nn.functional.one_hot(choice_T.clamp(min=0), num_experts) * (choice_T >= 0)[:, None]
        position_TE = torch.cumsum(onehot_TE, dim=0) - 1 + loads_E
        kept_T = (position_TE < capacity).logical_and(onehot_TE.bool()).any(1)
        experts_TK[:, rank] = torch.where(kept_T, choice_T, -1)
        loads_E += (onehot_TE * kept_T[:, None]).sum(0)
    return to_assignment(problem, experts_TK, "greedy", loads_E=loads_E)
