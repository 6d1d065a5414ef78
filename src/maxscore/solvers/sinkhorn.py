"""The paper's fast approximation: top-1, then Sinkhorn on the residual, then a feasible rounding.

Stage 1 is the optimal top-1 routing under the capacity (as ``two_stage``).  Stage 2 runs
log-domain Sinkhorn (entropic optimal transport, Cuturi 2013; GPU friendly, fixed shapes) from
the valid tokens, each with mass k-1, to the experts' residual capacities as upper bounds,
with the stage-1 expert forbidden.  Its column potentials g are prices in score units,
``p = -temperature_scale * g``, and rounding the plan (each token takes its k-1 largest plan
entries) is the same as taking the top-(k-1) of ``scores - p``.  The compiled core does
exactly that rounding as its first phase, then moves the units it puts over capacity (its
price steps and auction, then shortest paths with ``p`` as potentials): the result never exceeds capacity,
drops nothing when the problem is feasible, and is the optimum of stage 2, as in
``two_stage``; Sinkhorn only changes how much repair is left.  ``converged`` reports
whether the plan's column overflow met ``tolerance`` within ``iterations``.

Complexity O(iterations x T E) tensor ops plus the repair.  Not optimal overall (stage 1
commits first).  Ties: as ``exact``.
"""

from __future__ import annotations

import numpy as np
import torch

from maxscore._checks import check_int
from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment
from maxscore.solvers.exact._native import run_core
from maxscore.solvers.two_stage import first_stage, without_first

_NO_ROOM = -1e30  # log-capacity of an expert with no residual room: finite, so no inf - inf


def sinkhorn_potentials(
    logits_TE: torch.Tensor, row_mass: float | torch.Tensor, col_mass_E: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn for rows of mass ``row_mass`` and columns of mass at most ``col_mass_E``.

    The column step is the KL projection onto ``column <= capacity``: a column is scaled down
    only where it overflows, so with unbounded capacity the plan keeps each row's order.
    Leading batch dimensions are allowed (``logits [..., T, E]``, ``col_mass [..., E]``,
    ``row_mass`` a number or [..., T], 0 for a row that takes no mass); no host sync.
    Returns (column potentials g [..., E] <= 0, largest column overflow relative to the
    largest capacity, a tensor [...]).
    """
    log_col_E = torch.log(col_mass_E).clamp(min=_NO_ROOM)
    log_row_T = torch.log(torch.as_tensor(row_mass, dtype=logits_TE.dtype, device=logits_TE.device))
    g_E = torch.zeros_like(col_mass_E)
    for _ in range(iterations):
        f_T = log_row_T - torch.logsumexp(logits_TE + g_E[..., None, :], dim=-1)
        g_E = (log_col_E - torch.logsumexp(logits_TE + f_T[..., None], dim=-2)).clamp(max=0)
    f_T = log_row_T - torch.logsumexp(logits_TE + g_E[..., None, :], dim=-1)
    plan_col_E = torch.exp(torch.logsumexp(logits_TE + f_T[..., None], dim=-2) + g_E)
    overflow = (plan_col_E - col_mass_E).clamp(min=0).amax(-1)
    return g_E, overflow / col_mass_E.amax(-1).clamp(min=1.0)


def solve_sinkhorn(
    problem: Problem, *, iterations: int = 30, temperature: float = 0.05, tolerance: float = 0.02
) -> Assignment:
    """Top-1 under capacity, Sinkhorn for the other k-1 units, rounding repaired to feasibility.

    Args:
        iterations: Sinkhorn iterations (>= 1).
        temperature: entropic regularization relative to the range of the finite scores.
        tolerance: largest column overflow of the plan, relative to the largest residual
            capacity, below which ``converged`` is True.
    """
    check_int("iterations", iterations)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    first_T, loads_E = first_stage(problem)
    if problem.k == 1 or problem.num_valid == 0:  # stage 1 already routed everything
        experts_TK = np.full((problem.num_tokens, problem.k), -1, dtype=np.int64)
        experts_TK[:, 0] = first_T
        return to_assignment(problem, experts_TK, "sinkhorn", loads_E=loads_E)
    rows_T = torch.from_numpy(first_T >= 0).nonzero().flatten()
    residual_TE = without_first(problem, first_T)
    finite = residual_TE[rows_T][torch.isfinite(residual_TE[rows_T])]
    low = float(finite.min())
    scale = temperature * (float(finite.max()) - low or 1.0)
    logits_TE = (residual_TE[rows_T].double() - low) / scale
    residual_capacity_E = problem.capacity - loads_E
    g_E, error = sinkhorn_potentials(
        logits_TE, float(problem.k - 1), torch.from_numpy(residual_capacity_E).double(), iterations
    )
    rest = run_core(
        problem,
        k=problem.k - 1,
        scores_TE=residual_TE,
        capacity_E=residual_capacity_E,
        prices_E=(-scale * g_E).clamp(max=1e6).numpy(),
    )
    experts_TK = np.concatenate([first_T[:, None], rest.experts_TK], axis=1)
    return to_assignment(
        problem, experts_TK, "sinkhorn", loads_E=loads_E + rest.loads_E, converged=float(error) <= tolerance
    )
