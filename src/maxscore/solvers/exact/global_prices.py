"""Steps 1 and 2 of the global solver (``maxscore.solvers.exact.global_routing``): the warm start
from the ranks' local optimal prices, and damped best-response price steps over the ranks.

Every rank routes its own tokens; the ranks exchange only [E] vectors (prices, loads, best
responses).  All arithmetic is float64 on the host.  The step is ``prices.py``'s (its
thresholds, tie rule and ``DAMPING``), with each rank's share of the quantile in place of the
capacity, averaged over the ranks.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from maxscore.solvers._validate import Problem
from maxscore.solvers.collectives import Reducer
from maxscore.solvers.exact.global_candidates import MAX_CANDIDATES_PER_EXPERT, candidate_count
from maxscore.solvers.exact.host import solve_exact
from maxscore.solvers.exact.prices import DAMPING, thresholds, top_k

MIN_STEP = 0.05  # price steps stop when halving after overshoots has made them this small


def local_prices(
    problem: Problem, capacity: int, total: int, prices_E: torch.Tensor | None, reduce: Reducer
) -> torch.Tensor:
    """The token-weighted mean over the ranks of the optimal prices of each rank's own problem
    (its tokens, the capacity scaled to its share of the tokens; one [E] all-reduce)."""
    num_experts, k, valid = problem.num_experts, problem.k, problem.num_valid
    mean_E = torch.zeros(num_experts, dtype=torch.float64)
    if valid:
        share = max(math.ceil(capacity * valid / total), -(-k * valid // num_experts))
        local = solve_exact(dataclasses.replace(problem, capacity=share), prices=prices_E)
        mean_E = local.prices.double()
        if capacity * num_experts == k * total:  # exactly full: prices only matter up to a shift
            mean_E = mean_E - mean_E.mean()
        mean_E = mean_E * valid
    mean_E = reduce(mean_E) / max(total, 1)
    return (mean_E - mean_E.min()).clamp(min=0)


def price_steps(
    scores_NE: torch.Tensor,
    k: int,
    capacity: int,
    total: int,
    prices_E: torch.Tensor,
    iterations: int,
    ranks: int,
    reduce: Reducer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped best-response steps, until the candidate round can take the overload that is
    left; returns the prices of least overload with every token on its top-k there (held
    [N, E]) and the global loads [E] (the last all-reduce's)."""
    num_tokens, num_experts = scores_NE.shape
    if k == num_experts or total == 0 or iterations == 0:
        return (prices_E, *route(scores_NE, k, prices_E, reduce))
    best_prices, best_response, best_overload, step = prices_E, prices_E, math.inf, DAMPING
    best_held, best_loads = None, None
    # prices are >= 0 (the dual of "load <= capacity"); with no slack at all (every expert must be
    # exactly full) only price differences matter, and letting unwanted experts go below the
    # others' prices is what brings tokens to them
    floor = -math.inf if capacity * num_experts == k * total else 0.0
    for _ in range(iterations):
        theta_NE, held_NE = thresholds(scores_NE, prices_E, k)  # k < E here
        local_E = held_NE.sum(0).double()
        loads_E = reduce(local_E.clone())
        overload = total_overload(loads_E, capacity)
        if overload >= best_overload:  # overshot (the prices interact): smaller step from the best
            step /= 2
            if step < MIN_STEP:
                break
            prices_E = best_prices + step * (best_response - best_prices)
            continue
        best_prices, best_overload, best_held, best_loads = prices_E, overload, held_NE, loads_E
        if candidate_count(overload, num_experts, ranks) < MAX_CANDIDATES_PER_EXPERT * num_experts:
            break  # the candidate round's payload is cheaper than more steps
        response_E = torch.zeros(num_experts, dtype=torch.float64)
        if num_tokens:
            ranked_NE = torch.sort(theta_NE, dim=0, descending=True).values
            # this rank's best response: shed (or take) its share of each expert's global excess
            position_E = (local_E - (loads_E - capacity) * num_tokens / total).round()
            position_E = position_E.clamp(0, num_tokens - 1).long()
            lo_E = ranked_NE.gather(0, position_E[None])[0]
            hi_E = ranked_NE.gather(0, (position_E - 1).clamp(min=0)[None])[0]
            # the midpoint of the share's two thresholds, as prices.best_response
            mid_E = torch.where(
                torch.isfinite(lo_E) & torch.isfinite(hi_E) & (position_E > 0), 0.5 * (lo_E + hi_E), lo_E
            )
            # an expert at its capacity keeps its price (prices.best_response)
            response_E = torch.where(loads_E == capacity, prices_E, mid_E.clamp(min=floor)) * num_tokens
        best_response = reduce(response_E) / total  # the token-weighted mean over the ranks
        prices_E = prices_E + step * (best_response - prices_E)
    return best_prices, best_held, best_loads.long()


def total_overload(loads_E: torch.Tensor, capacity: int) -> int:
    """Units over capacity, summed over the experts."""
    return int((loads_E - capacity).clamp(min=0).sum())


def route(scores_NE: torch.Tensor, k: int, prices_E: torch.Tensor, reduce: Reducer):
    """Every token on its top-k of ``scores - prices``: (held [N, E], global loads [E])."""
    held_NE, _ = top_k(scores_NE - prices_E, k)
    return held_NE, reduce(held_NE.sum(0).double()).long()
