"""The paper's two-stage approximation, for any k.

Stage 1 gives every valid token one expert: the optimal top-1 routing under the capacity
(computed exactly by the compiled core with k = 1).  Stage 2 routes the remaining (k-1) units
of every token optimally on the residual capacities ``capacity - stage-1 loads``, with each
token's stage-1 expert forbidden.  This is what the authors' code does per 512-token sequence
with a Kuhn-Munkres matching on residual slots (O(T^3)); here both stages use the exact
core, so it costs about twice ``exact``.  It is feasible whenever the joint problem is, except
that forbidden pairs can make stage 2 infeasible: then the joint exact solution is returned.

Not optimal in general: stage 1 commits each token's first expert before stage 2 sees the
other units (PAPER.md §5.3).  Ties: as ``exact``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment
from maxscore.solvers.exact._native import run_core
from maxscore.solvers.exact.host import solve_exact


def first_stage(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Optimal top-1 routing under the capacity: (first expert [T] (-1 = invalid), loads [E])."""
    result = run_core(problem, k=1)
    return result.experts_TK[:, 0], result.loads_E


def without_first(problem: Problem, first_T: np.ndarray) -> torch.Tensor:
    """The scores with each valid token's stage-1 expert forbidden (-inf)."""
    residual_TE = problem.scores_TE.clone()
    first = torch.from_numpy(first_T)
    rows_T = (first >= 0).nonzero().flatten()
    residual_TE[rows_T, first[rows_T]] = -math.inf
    return residual_TE


def solve_two_stage(problem: Problem) -> Assignment:
    """Top-1 under capacity, then the other k-1 units optimally on the residual capacity."""
    first_T, loads_E = first_stage(problem)
    if problem.k == 1:
        return to_assignment(problem, first_T[:, None], "two_stage", loads_E=loads_E)
    residual_capacity_E = problem.capacity - loads_E
    try:
        rest = run_core(
            problem,
            k=problem.k - 1,
            scores_TE=without_first(problem, first_T),
            capacity_E=residual_capacity_E,
        )
    except ValueError:  # forbidden pairs left stage 2 infeasible: route all units jointly
        joint = solve_exact(problem)
        return to_assignment(problem, joint.experts.cpu(), "two_stage", loads_E=joint.loads.cpu())
    experts_TK = np.concatenate([first_T[:, None], rest.experts_TK], axis=1)
    return to_assignment(problem, experts_TK, "two_stage", loads_E=loads_E + rest.loads_E)
