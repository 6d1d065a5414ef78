"""Switch-style iterative rerouting: overflowing tokens retry their next-best expert.

Round 1: every valid token proposes its top-k experts; each expert accepts proposals in order
of decreasing score (token order on ties) up to its capacity and rejects the rest.  Each
following round, every token with rejected units proposes its best experts it has not tried
yet, one per missing unit.  A unit is placed or has tried every expert after at most E rounds.
In tight corner cases (e.g. capacity exactly k x tokens / E) a unit can run out of experts
while others still have room; such units are then placed along cheapest score-loss paths by
the compiled core, so nothing is dropped when the problem is feasible.  ``converged`` is False
when ``max_rounds`` stopped the rerouting before every unit was placed or had tried every
expert.

Complexity O(rounds x T E) tensor ops.  Not optimal.  Ties: as ``torch.topk`` / stable sort.
"""

from __future__ import annotations

import math

import torch

from maxscore._checks import check_int
from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment
from maxscore.solvers.exact._native import REPAIR, run_core


def _accept(
    token_P: torch.Tensor, expert_P: torch.Tensor, score_P: torch.Tensor, room_E: torch.Tensor
) -> torch.Tensor:
    """bool [P]: proposals each expert accepts, best score first, up to its room."""
    by_score = torch.argsort(score_P, descending=True, stable=True)
    by_expert = by_score[torch.argsort(expert_P[by_score], stable=True)]
    experts_sorted = expert_P[by_expert]
    counts_E = torch.bincount(experts_sorted, minlength=room_E.shape[0])
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(by_expert.numel()) - starts_E[experts_sorted]
    accepted = torch.zeros_like(token_P, dtype=torch.bool)
    accepted[by_expert] = rank_sorted < room_E[experts_sorted]
    return accepted


def solve_iterative(problem: Problem, *, max_rounds: int | None = None) -> Assignment:
    """Rerouting rounds (at most ``max_rounds``, default E), then a feasibility repair."""
    num_tokens, num_experts, k = problem.num_tokens, problem.num_experts, problem.k
    if max_rounds is None:
        max_rounds = num_experts
    else:
        check_int("max_rounds", max_rounds)
    scores_TE = problem.scores_TE
    tried_TE = torch.isneginf(scores_TE)
    missing_T = torch.full((num_tokens,), k, dtype=torch.int64)
    if problem.valid_T is not None:
        missing_T[~problem.valid_T] = 0
    experts_TK = torch.full((num_tokens, k), -1, dtype=torch.int64)
    loads_E = torch.zeros(num_experts, dtype=torch.int64)
    rounds = 0
    while rounds < max_rounds:
        width = int(missing_T.max()) if num_tokens else 0
        if width == 0:
            break
        rounds += 1
        rows_U = (missing_T > 0).nonzero().flatten()  # only tokens with units still to place
        top = torch.topk(scores_TE[rows_U].masked_fill(tried_TE[rows_U], -math.inf), width, dim=1)
        wanted_UW = (torch.arange(width) < missing_T[rows_U, None]) & torch.isfinite(top.values)
        row_P, slot_P = wanted_UW.nonzero(as_tuple=True)
        if row_P.numel() == 0:
            break
        token_P, expert_P = rows_U[row_P], top.indices[row_P, slot_P]
        tried_TE[token_P, expert_P] = True
        accepted_P = _accept(token_P, expert_P, top.values[row_P, slot_P], problem.capacity - loads_E)
        token_A, expert_A = token_P[accepted_P], expert_P[accepted_P]
        # proposals are in token order, so the a-th acceptance of a token fills its next free slot
        counts_T = torch.bincount(token_A, minlength=num_tokens)
        first_A = (torch.cumsum(counts_T, 0) - counts_T)[token_A]
        slot_A = (k - missing_T)[token_A] + torch.arange(token_A.numel()) - first_A
        experts_TK[token_A, slot_A] = expert_A
        loads_E += torch.bincount(expert_A, minlength=num_experts)
        missing_T -= counts_T
    exhausted = bool((tried_TE.all(1) | (missing_T == 0)).all())
    if bool((missing_T > 0).any()):
        repaired = run_core(problem, mode=REPAIR, experts_TK=experts_TK.numpy())
        return to_assignment(
            problem,
            repaired.experts_TK,
            "iterative",
            loads_E=repaired.loads_E,
            score=repaired.score,
            converged=exhausted,
        )
    return to_assignment(problem, experts_TK, "iterative", loads_E=loads_E, converged=True)
