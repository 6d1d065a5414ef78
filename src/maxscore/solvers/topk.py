"""Plain top-k routing with no capacity (the dropless baseline).

Every valid token takes its k highest-scoring experts; loads may exceed the capacity, which
is reported but not enforced.  O(T E) via ``torch.topk``.  Ties: as ``torch.topk``.
"""

from __future__ import annotations

import torch

from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment


def solve_topk(problem: Problem) -> Assignment:
    """Top-k of every valid token's scores, best first."""
    experts_TK = torch.topk(problem.scores_TE, problem.k, dim=1).indices
    if problem.valid_T is not None:
        experts_TK[~problem.valid_T] = -1
    return to_assignment(problem, experts_TK, "topk")
