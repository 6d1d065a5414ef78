"""Routing groups: their shape, what a router selected for them, and one batched solve of all
the groups of a layer (on the scores' device)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from maxscore._checks import check_int
from maxscore.solvers import Assignment, expert_capacity, group_capacity, solve_finite
from maxscore.solvers.ops import solve_exact_op, solve_op


@dataclass(frozen=True, slots=True)
class Groups:
    """Routing groups: ``count`` groups of ``size`` consecutive tokens; ``slots``: the capacity
    of a group with no padding, the per-group size of the static dispatch buffer;
    ``capacity_G``: int64 [count], each group's capacity (its valid tokens only), or None where
    the solver owns the capacity (global routing).  Computed once per routing call
    (``routing_groups``)."""

    count: int
    size: int
    slots: int
    capacity_G: torch.Tensor | None = None


def check_tokens(x_TD: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``x_TD`` is a float [T, *] tensor of tokens (2-D)."""
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or not x_TD.is_floating_point():
        got = tuple(x_TD.shape) if isinstance(x_TD, torch.Tensor) else type(x_TD).__name__
        raise ValueError(f"x must be a float tensor of shape [T, D], got {got}")


def routing_groups(
    x_TD: torch.Tensor,
    valid_T: torch.Tensor | None,
    sequence_length: int | None,
    *,
    per_sequence: bool,
    num_experts: int,
    k: int,
    capacity_factor: float,
    solver_capacity: bool = False,
    capacity: int | None = None,
) -> Groups:
    """The routing groups of one call and their capacities: the one place a router computes them.

    Args:
        x_TD: float [T, *]: the tokens (hidden states, or gate logits), checked here.
        valid_T: bool [T] or None.
        sequence_length: tokens per sequence; with ``per_sequence`` each sequence is a group,
            else (or without it) the whole input is one group.
        solver_capacity: the solver computes the capacity itself (global routing over ranks):
            ``capacity_G`` is None.
        capacity: slots per expert of every group, given by the caller (a framework's own
            capacity rule) instead of computed from ``capacity_factor``.
    """
    check_tokens(x_TD)
    if capacity is not None:
        check_int("capacity", capacity)
        if solver_capacity:
            raise ValueError("capacity cannot be given with group='global': the global solver owns it")
    num_tokens = x_TD.shape[0]
    if num_tokens == 0:
        raise ValueError("x is an empty batch (0 tokens); route at least one token")
    if valid_T is not None and (valid_T.dtype != torch.bool or valid_T.shape != (num_tokens,)):
        raise ValueError(
            f"valid must be a bool tensor of shape [T] = [{num_tokens}], got {valid_T.dtype} "
            f"{tuple(valid_T.shape)}; use valid.bool()"
        )
    if not per_sequence or sequence_length is None:
        count, size = 1, num_tokens
    elif sequence_length < 1 or num_tokens % sequence_length:
        raise ValueError(f"sequence_length={sequence_length} does not divide the {num_tokens} tokens")
    else:
        count, size = num_tokens // sequence_length, sequence_length
    slots = expert_capacity(size, num_experts, k, capacity_factor) if capacity is None else capacity
    if solver_capacity:
        return Groups(count, size, slots)
    if valid_T is None or capacity is not None:
        capacity_G = torch.full((count,), slots, dtype=torch.int64, device=x_TD.device)
    else:
        capacity_G = group_capacity(valid_T.view(count, size).sum(1), num_experts, k, capacity_factor)
    return Groups(count, size, slots, capacity_G)


@dataclass(frozen=True, kw_only=True, slots=True)
class Selection:
    """What a router's ``select`` decided: experts [T, K] and whether capacity was enforced
    (``rank_loads``: see ``RouterOutput``); a solver that owned the capacity (global routing)
    reports it with the loads it certified, over all ranks (``capacity_G``, ``loads_E``)."""

    experts_TK: torch.Tensor
    dropless: bool = False
    capacity_G: torch.Tensor | None = None
    loads_E: torch.Tensor | None = None
    solver_gap: float | torch.Tensor | None = None
    solver_ms: float | None = None
    solver_fallbacks: int | torch.Tensor | None = None
    rank_loads: torch.Tensor | None = None
    issues: torch.Tensor | None = None

    @classmethod
    def of(cls, solved: Solved) -> Selection:
        """The selection of one batched solve: its experts, summed gap, time, fallbacks and the
        bad input it found with checks deferred (``Assignment.issues``)."""
        a = solved.assignment
        return cls(
            experts_TK=solved.experts_TK,
            solver_gap=None if a.gap is None else a.gap.sum(),
            solver_ms=solved.ms,
            solver_fallbacks=a.fallback.sum() if a.method == "exact" else None,
            issues=a.issues,
        )


def stats_capacity(groups: Groups, selection: Selection, device: torch.device) -> torch.Tensor:
    """The capacity the statistics compare loads with: the groups', or the solver's where it owned
    it (global routing), or (causal routing of a global router) the nominal slots."""
    if selection.capacity_G is not None:
        return selection.capacity_G
    if groups.capacity_G is not None:
        return groups.capacity_G
    return torch.full((groups.count,), groups.slots, dtype=torch.int64, device=device)


@dataclass(frozen=True, slots=True)
class Solved:
    """One batched solve of a layer's routing groups."""

    experts_TK: torch.Tensor
    assignment: Assignment
    ms: float | None


def solve_groups(
    scores_TE: torch.Tensor,
    valid_T: torch.Tensor | None,
    groups: Groups,
    k: int,
    capacity_G: torch.Tensor,
    method: str,
    **options,
) -> Solved:
    """Solves every routing group of a layer in one batched ``solve`` call, on the scores' device
    (inside a compiled graph through its operators, ``maxscore.solvers.ops``).

    Returns the experts [T, K] on the scores' device, the batched ``Assignment`` and the time
    of the call in milliseconds (for CUDA scores, the time until the device engine's one host
    round trip, not the device work queued after it; None inside a compiled graph).
    """
    compiling = torch.compiler.is_compiling()
    begin = 0.0 if compiling else time.perf_counter()
    shape = (groups.count, groups.size)
    valid_GN = None if valid_T is None else valid_T.view(shape)
    # the scores come from logits checked finite: solve need not scan them again
    scores_GNE = scores_TE.detach().view(*shape, -1)
    if method == "exact" and compiling:  # the operators run the same solve; eager skips their wrapper
        assignment = solve_exact_op(scores_GNE, k, capacity_G, valid_GN, **options)
    elif compiling and not options:
        assignment = solve_op(scores_GNE, k, capacity_G, valid_GN, method)
    else:
        assignment = solve_finite(scores_GNE, k, capacity_G, method, valid_GN, **options)
    experts_TK = assignment.experts.reshape(-1, k)
    return Solved(experts_TK, assignment, None if compiling else (time.perf_counter() - begin) * 1e3)
