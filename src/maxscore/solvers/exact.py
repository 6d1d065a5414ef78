"""Exact capacity-constrained top-k routing (the min-cost max-flow of PAPER.md §2), certified.

Problem: maximize ``sum scores[t, e] * x[t, e]`` subject to ``sum_e x[t, e] = k`` for every
valid token, ``sum_t x[t, e] <= capacity`` and ``x in {0, 1}`` (``-inf`` forbids a pair).

Method (compiled core, ``_core.c``): on large, imbalanced problems a few damped best-response
price steps first; every token takes its top-k of ``scores - prices``; an ascending auction
raises the price of each overloaded expert until only ``capacity`` holders still want it
(evicted holders move to their best free choice), under a budget of ``max_moves``; successive
shortest paths on the E-node expert graph (prices as potentials) repair what is left.  Every
step keeps every token on a top-k of ``scores - prices``, so the result is optimal; the
duality gap
``D(p) - score = sum_t topk_k(scores[t] - p) + capacity * sum_e p_e - score`` is computed from
scratch as the certificate (0 up to rounding).

Complexity: O(T E) per row pass (top-k, price step, certificate), O(E + log T) per auction move,
O(E^2 + work on the contested tokens) per augmentation; memory O(T E) bytes.  No Python loop.
Ties: lower expert index first; among holders an expert evicts, higher token indices leave first.
CUDA scores are solved on a host copy (one device-to-host copy of [T, E] and one
host-to-device copy of [T, K]).

References: Dong et al., *Maximum Score Routing for Mixture-of-Experts*, ACL Findings 2025;
Ahuja, Magnanti & Orlin, *Network Flows* (1993), ch. 9 (successive shortest paths);
Bertsekas, *The auction algorithm* (1988) for the ascending-price idea.
"""

from __future__ import annotations

import numpy as np
import torch

from maxscore.solvers._native import PRICE_ITERATIONS, run_core
from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment


def solve_exact(
    problem: Problem,
    *,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = PRICE_ITERATIONS,
    threads: int | None = None,
) -> Assignment:
    """Optimal routing with its dual prices and duality gap.

    Args:
        problem: the validated problem.
        prices: float [E] warm-start prices (e.g. the previous step's ``Assignment.prices``);
            any values are accepted, they only change the running time.
        max_moves: auction budget in token moves (default ``2 * k * T``); 0 skips the auction.
        price_iterations: cap on best-response price steps (run on large problems only).
        threads: threads for the row passes (default ``torch.get_num_threads()``).
    """
    num_experts = problem.num_experts
    prices_E = None
    if prices is not None:
        if not isinstance(prices, torch.Tensor) or prices.shape != (num_experts,):
            raise ValueError(f"prices must be a float tensor of shape [E] = [{num_experts}], got {prices!r}")
        prices_E = prices.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(prices_E).all():
            raise ValueError("prices must be finite; pass None for a cold start")
    for name, value in (
        ("max_moves", max_moves),
        ("price_iterations", price_iterations),
        ("threads", threads),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    result = run_core(
        problem, prices_E=prices_E, max_moves=max_moves, price_iterations=price_iterations, threads=threads
    )
    return to_assignment(
        problem,
        result.experts_TK,
        "exact",
        loads_E=result.loads_E,
        score=result.score,
        prices_E=result.prices_E,
        gap=result.gap,
    )
