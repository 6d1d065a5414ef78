"""Calls the compiled core (``_core.c``) and turns its status codes into clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maxscore.solvers._validate import Problem, Problems, name_tokens
from maxscore.solvers.exact import _core
from maxscore.solvers.exact.prices import DAMPING, HOST_PRICE_ITERATIONS

_OK, _TOO_FEW_ALLOWED, _INFEASIBLE = 0, 1, 2
_MAX_REPORTED = 64
EXACT, REPAIR = 0, 1
STATS = 11  # columns of the core's statistics per group (STATS in _core.c)
MOVES_PER_UNIT = 32  # auction cap: token moves per unit (token x k); it stops sooner when slow


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
    repriced: bool  # the auction proved slow and handed back to the price steps once


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
    price_iterations: int = HOST_PRICE_ITERATIONS,
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
    status, num_bad, score, gap, raises, augs, moves, repriced, phase_ms = _core.solve(
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
    _raise_status(status, num_bad, bad, k, capacity_E, None)
    assert status == _OK, status
    return CoreResult(
        experts,
        loads,
        prices,
        score,
        None if gap != gap else gap,
        raises,
        augs,
        moves,
        phase_ms,
        bool(repriced),
    )


def _raise_status(
    status: int, num_bad: int, bad: np.ndarray, k: int, capacity_E: np.ndarray, group: int | None
) -> None:
    """Turns the core's status into a clear error (``bad``: token rows, then the stuck experts)."""
    rows = torch.from_numpy(bad[: min(num_bad, _MAX_REPORTED)])
    where = "" if group is None else f" of group {group}"
    if status == _TOO_FEW_ALLOWED:
        raise ValueError(
            f"scores: tokens {name_tokens(rows, None)}{where} have fewer than k={k} allowed experts "
            "(entries > -inf); allow more experts or mark them invalid with `valid`"
        )
    if status == _INFEASIBLE:
        experts_set = np.flatnonzero(bad[_MAX_REPORTED:]).tolist()
        raise ValueError(
            f"scores: the forbidden pairs (-inf) make the problem{where} infeasible: experts {experts_set} "
            f"(capacity {capacity_E[experts_set].tolist()}) cannot hold the tokens whose allowed experts "
            f"all lie among them ({num_bad} tokens hold these experts, e.g. {name_tokens(rows, None)}); "
            "allow these tokens more experts or raise the capacity"
        )


@dataclass(frozen=True, slots=True)
class BatchResult:
    experts_GNK: np.ndarray  # int64 [G, N, K]
    loads_GE: np.ndarray  # int64 [G, E]
    prices_GE: np.ndarray  # float64 [G, E]
    status_G: np.ndarray  # int32 [G]: 0 solved, else the core's status (with raise_errors=False)
    stats_GS: (
        np.ndarray
    )  # float64 [G, STATS]: score, gap, raises, augmentations, moves, phase ms x 4, repriced, start misfit
    lead_start: bool = False  # groups after the first two started from those two's prices (_core.c)

    @property
    def score_G(self) -> np.ndarray:
        return self.stats_GS[:, 0]

    @property
    def gap_G(self) -> np.ndarray:
        return self.stats_GS[:, 1]


def run_core_batch(
    problems: Problems,
    *,
    scores_GNE: torch.Tensor | None = None,
    valid_GN: torch.Tensor | None = None,
    capacity_GE: np.ndarray | None = None,
    prices_GE: np.ndarray | None = None,
    max_moves: int | None = None,
    price_iterations: int = HOST_PRICE_ITERATIONS,
    threads: int | None = None,
    raise_errors: bool = True,
    group_ids: list[int] | None = None,
) -> BatchResult:
    """Solves every group of ``problems`` exactly in one call of the core, the groups spread over
    ``threads`` (default ``torch.get_num_threads()``) with the GIL released.

    ``scores_GNE``/``valid_GN``/``capacity_GE`` replace the problems' own (a sub-problem of the
    same k); ``prices_GE`` warm-starts every group.  With ``raise_errors=False`` a group the
    core cannot solve is reported in ``status_G`` instead of raising; ``group_ids`` names the
    groups in error messages (default 0..G-1).
    """
    scores = problems.scores_GNE if scores_GNE is None else scores_GNE
    valid = problems.valid_GN if scores_GNE is None else valid_GN
    num_groups, num_tokens, num_experts = scores.shape
    k = problems.k
    if capacity_GE is None:
        capacity_GE = np.repeat(problems.capacity_G.numpy()[:, None], num_experts, axis=1)
    capacity_GE = np.ascontiguousarray(capacity_GE, dtype=np.int64)
    prices = (
        np.zeros((num_groups, num_experts))
        if prices_GE is None
        else np.array(np.broadcast_to(prices_GE, (num_groups, num_experts)), dtype=np.float64, order="C")
    )
    experts = np.empty((num_groups, num_tokens, k), dtype=np.int64)
    loads = np.zeros((num_groups, num_experts), dtype=np.int64)
    bad = np.zeros((num_groups, _MAX_REPORTED + num_experts), dtype=np.int64)
    status = np.zeros(num_groups, dtype=np.int32)
    num_bad = np.zeros(num_groups, dtype=np.int64)
    stats = np.zeros((num_groups, STATS))
    lead_start = _core.solve_batch(
        scores.numpy(),
        scores.dtype == torch.float64,
        num_groups,
        num_tokens,
        num_experts,
        k,
        None if valid is None else valid.numpy().view(np.uint8),
        capacity_GE,
        prices,
        experts,
        loads,
        bad,
        status,
        num_bad,
        stats,
        EXACT,
        MOVES_PER_UNIT * num_tokens * k if max_moves is None else max_moves,
        price_iterations,
        DAMPING,
        torch.get_num_threads() if threads is None else threads,
    )
    if raise_errors:
        for g in np.flatnonzero(status):
            name = int(g) if group_ids is None else group_ids[g]
            _raise_status(int(status[g]), int(num_bad[g]), bad[g], k, capacity_GE[g], name)
    return BatchResult(experts, loads, prices, status, stats, lead_start)


def core_price_step(problem: Problem, prices_E: np.ndarray) -> np.ndarray:
    """One price step of the core over every token (``prices.price_step``'s definition): the new
    prices [E].  For tests of the core's step against the reference."""
    prices = np.array(prices_E, dtype=np.float64)
    capacity_E = np.full(problem.num_experts, problem.capacity, dtype=np.int64)
    valid = None if problem.valid_T is None else problem.valid_T.numpy().view(np.uint8)
    scores = problem.scores_TE
    status = _core.price_step(
        scores.numpy(),
        scores.dtype == torch.float64,
        problem.num_tokens,
        problem.num_experts,
        problem.k,
        valid,
        capacity_E,
        prices,
        DAMPING,
    )
    assert status == _OK, status
    return prices


def core_causal_targets(
    values_TE: torch.Tensor, offset_E: torch.Tensor, k: int, valid_T: torch.Tensor | None
) -> torch.Tensor | None:
    """``maxscore.routers.maxscore.causal_targets`` in the core (CPU float32 tensors, 0 < k < E):
    the same values in one pass over the rows; None where the torch code must decide (a value
    that is not finite, no valid token)."""
    values = values_TE.detach().contiguous()
    offset = offset_E.detach().contiguous()
    valid = None if valid_T is None else valid_T.contiguous().numpy().view(np.uint8)
    out = torch.empty(values.shape[1], dtype=torch.float32)
    num_tokens, num_experts = values.shape
    done = _core.causal_targets(
        values.numpy(), offset.numpy(), num_tokens, num_experts, k, valid, True, out.numpy()
    )
    return out if done else None
