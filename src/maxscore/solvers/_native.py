"""Calls the compiled core (``_core.c``) and turns its status codes into clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maxscore.solvers import _core
from maxscore.solvers._validate import Problem, _first

_OK, _TOO_FEW_ALLOWED, _INFEASIBLE = 0, 1, 2
_MAX_REPORTED = 64
EXACT, REPAIR = 0, 1
PRICE_ITERATIONS = 10  # cap on best-response price steps; they stop early once the excess is small
DAMPING = 0.8
MOVES_PER_UNIT = 2  # auction budget: token moves per unit (token x k) before the repair takes over


@dataclass(frozen=True, slots=True)
class CoreResult:
    experts_TK: np.ndarray  # int64 [T, K]
    loads_E: np.ndarray  # int64 [E]
    prices_E: np.ndarray  # float64 [E]
    score: float
    gap: float | None
    raises: int
    augmentations: int
    moves: int
    phase_ms: tuple[float, float, float, float]  # prepare, auction, repair, certificate


def run_core(
    problem: Problem,
    *,
    k: int | None = None,
    scores_TE: torch.Tensor | None = None,
    capacity_E: np.ndarray | None = None,
    mode: int = EXACT,
    experts_TK: np.ndarray | None = None,
    prices_E: np.ndarray | None = None,
    max_moves: int | None = None,
    price_iterations: int = PRICE_ITERATIONS,
    damping: float = DAMPING,
    threads: int | None = None,
) -> CoreResult:
    """Runs the core on ``problem`` (or on a sub-problem: other k, scores or capacities).

    mode EXACT solves to optimality from ``prices_E`` (warm start, default 0) with at most
    ``price_iterations`` price steps and ``max_moves`` auction moves (default
    ``MOVES_PER_UNIT * T * k``); mode REPAIR makes ``experts_TK`` (slots may be -1) feasible
    along cheapest score-loss paths.
    """
    k = problem.k if k is None else k
    scores = problem.scores_TE if scores_TE is None else scores_TE
    num_tokens, num_experts = scores.shape
    if max_moves is None:
        max_moves = MOVES_PER_UNIT * num_tokens * k
    if capacity_E is None:
        capacity_E = np.full(num_experts, problem.capacity, dtype=np.int64)
    prices = np.zeros(num_experts) if prices_E is None else np.array(prices_E, dtype=np.float64)
    experts = (
        np.empty((num_tokens, k), dtype=np.int64)
        if experts_TK is None
        else np.ascontiguousarray(experts_TK, dtype=np.int64).copy()
    )
    loads = np.zeros(num_experts, dtype=np.int64)
    bad = np.zeros(_MAX_REPORTED + num_experts, dtype=np.int64)
    valid = None if problem.valid_T is None else problem.valid_T.numpy().view(np.uint8)
    status, num_bad, score, gap, raises, augs, moves, phase_ms = _core.solve(
        scores.numpy(),
        scores.dtype == torch.float64,
        num_tokens,
        num_experts,
        k,
        valid,
        capacity_E,
        prices,
        experts,
        loads,
        bad,
        mode,
        max_moves,
        price_iterations,
        damping,
        torch.get_num_threads() if threads is None else threads,
    )
    if status == _TOO_FEW_ALLOWED:
        raise ValueError(
            f"scores: tokens {_first(torch.from_numpy(bad[: min(num_bad, _MAX_REPORTED)]))} have fewer than "
            f"k={k} allowed experts (entries > -inf); allow more experts or mark them invalid with `valid`"
        )
    if status == _INFEASIBLE:
        stuck = torch.from_numpy(bad[: min(num_bad, _MAX_REPORTED)])
        experts_set = np.flatnonzero(bad[_MAX_REPORTED:]).tolist()
        raise ValueError(
            f"scores: the forbidden pairs (-inf) make the problem infeasible: experts {experts_set} "
            f"(capacity {capacity_E[experts_set].tolist()}) cannot hold the tokens whose allowed experts "
            f"all lie among them ({num_bad} tokens hold these experts, e.g. {_first(stuck)}); "
            "allow these tokens more experts or raise the capacity"
        )
    assert status == _OK, status
    return CoreResult(
        experts, loads, prices, score, None if gap != gap else gap, raises, augs, moves, phase_ms
    )
