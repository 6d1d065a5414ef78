"""Routing groups: their shape, what a router selected for them, and one batched solve of all
the groups of a layer (on the scores' device)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from maxscore.solvers import Assignment, solve_finite


@dataclass(frozen=True, slots=True)
class Groups:
    """Routing groups: ``count`` groups of ``size`` consecutive tokens; ``slots``: the capacity
    of a group with no padding, the per-group size of the static dispatch buffer (computed once
    per call)."""

    count: int
    size: int
    slots: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Selection:
    """What a router's ``select`` decided: experts [T, K] and whether capacity was enforced
    (``rank_loads``: see ``RouterOutput``)."""

    experts_TK: torch.Tensor
    dropless: bool = False
    solver_gap: float | torch.Tensor | None = None
    solver_ms: float | None = None
    solver_fallbacks: int | torch.Tensor | None = None
    rank_loads: torch.Tensor | None = None

    @classmethod
    def of(cls, solved: Solved) -> Selection:
        """The selection of one batched solve: its experts, summed gap, time and fallbacks."""
        a = solved.assignment
        return cls(
            experts_TK=solved.experts_TK,
            solver_gap=None if a.gap is None else a.gap.sum(),
            solver_ms=solved.ms,
            solver_fallbacks=a.fallback.sum() if a.method == "exact" else None,
        )


@dataclass(frozen=True, slots=True)
class Solved:
    """One batched solve of a layer's routing groups."""

    experts_TK: torch.Tensor
    assignment: Assignment
    ms: float


def solve_groups(
    scores_TE: torch.Tensor,
    valid_T: torch.Tensor | None,
    groups: Groups,
    k: int,
    capacity_G: torch.Tensor,
    method: str,
    **options,
) -> Solved:
    """Solves every routing group of a layer in one batched ``solve`` call, on the scores' device.

    Returns the experts [T, K] on the scores' device, the batched ``Assignment`` and the time
    of the call in milliseconds (for CUDA scores, the time until the device engine's one host
    round trip, not the device work queued after it).
    """
    begin = time.perf_counter()
    shape = (groups.count, groups.size)
    valid_GN = None if valid_T is None else valid_T.view(shape)
    # the scores come from logits checked finite: solve need not scan them again
    assignment = solve_finite(scores_TE.detach().view(*shape, -1), k, capacity_G, method, valid_GN, **options)
    experts_TK = assignment.experts.reshape(-1, k)
    return Solved(experts_TK, assignment, (time.perf_counter() - begin) * 1e3)
