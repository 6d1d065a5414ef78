"""The exact method's host engine: the compiled core (``_core.c``), certified.

Problem: maximize ``sum scores[t, e] * x[t, e]`` subject to ``sum_e x[t, e] = k`` for every
valid token, ``sum_t x[t, e] <= capacity`` and ``x in {0, 1}`` (``-inf`` forbids a pair).

Method (compiled core, ``_core.c``): on large, imbalanced problems a few damped best-response
price steps first; every token takes its top-k of ``scores - prices``; an ascending auction
raises the price of each overloaded expert until only ``capacity`` holders still want it
(evicted holders move to their best free choice), under a budget of ``max_moves``, with
eps-scaling after a price war; successive shortest paths on the E-node expert graph (prices as
potentials, slack capacity as one more node) repair what is left.  Every
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

from maxscore._checks import check_int
from maxscore.solvers._validate import PRICES_MESSAGE, Problem, Problems
from maxscore.solvers.assignment import Assignment, to_assignment
from maxscore.solvers.exact._native import run_core, run_core_batch
from maxscore.solvers.exact.prices import HOST_PRICE_ITERATIONS


def solve_exact(
    problem: Problem,
    *,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = HOST_PRICE_ITERATIONS,
    threads: int | None = None,
) -> Assignment:
    """Optimal routing with its dual prices and duality gap (host engine).

    Args:
        problem: the validated problem.
        prices: float [E] warm-start prices (e.g. the previous step's ``Assignment.prices``);
            any values are accepted, they only change the running time.
        max_moves: auction budget in token moves per auction run (default ``32 * k * T``; an
            auction stops sooner when it proves slow); 0 skips the auction.
        price_iterations: cap on best-response price steps (run while the excess is large).
        threads: threads for the row passes (default ``torch.get_num_threads()``).
    """
    prices_E = check_prices(prices, None, problem.num_experts)
    check_counts(max_moves=max_moves, price_iterations=price_iterations, threads=threads)
    result = run_core(
        problem,
        prices_E=None if prices_E is None else prices_E[0],
        max_moves=max_moves,
        price_iterations=price_iterations,
        threads=threads,
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


def solve_exact_groups(
    problems: Problems,
    *,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = HOST_PRICE_ITERATIONS,
    threads: int | None = None,
) -> Assignment:
    """``solve_exact`` of G groups in one call of the compiled core (groups over threads).

    ``prices`` is [E] (every group) or [G, E]; the result is a batched ``Assignment``.
    """
    prices_GE = check_prices(prices, problems.num_groups, problems.num_experts)
    check_counts(max_moves=max_moves, price_iterations=price_iterations, threads=threads)
    result = run_core_batch(
        problems, prices_GE=prices_GE, max_moves=max_moves, price_iterations=price_iterations, threads=threads
    )
    device = problems.device
    return Assignment(
        experts=torch.from_numpy(result.experts_GNK).to(device),
        loads=torch.from_numpy(result.loads_GE).to(device),
        score=torch.from_numpy(result.score_G.copy()).to(device),
        capacity=problems.capacity_G.to(device),
        method="exact",
        valid=None if problems.valid_GN is None else problems.valid_GN.to(device),
        prices=torch.from_numpy(result.prices_GE).to(device),
        gap=torch.from_numpy(result.gap_G.copy()).to(device),
        converged=torch.ones(problems.num_groups, dtype=torch.bool, device=device),
        fallback=torch.zeros(problems.num_groups, dtype=torch.bool, device=device),
    )


def check_price_shape(prices: torch.Tensor, num_groups: int | None, num_experts: int) -> None:
    """Warm-start prices are a tensor of shape [E], or [G, E] for G groups (``num_groups=None``:
    one problem, [E] only)."""
    shapes = [(num_experts,)] + ([] if num_groups is None else [(num_groups, num_experts)])
    if not isinstance(prices, torch.Tensor) or tuple(prices.shape) not in shapes:
        form = "[E]" if num_groups is None else "[E] or [G, E]"
        raise ValueError(f"prices must be a float tensor of shape {form} = {shapes}, got {prices!r}")


def check_prices(prices: torch.Tensor | None, num_groups: int | None, num_experts: int) -> np.ndarray | None:
    """Warm-start prices as float64 [G, E] on the host (G = 1 for one problem, ``num_groups=None``)."""
    if prices is None:
        return None
    check_price_shape(prices, num_groups, num_experts)
    prices_GE = prices.detach().to("cpu", torch.float64).expand(num_groups or 1, num_experts)
    if not torch.isfinite(prices_GE).all():
        raise ValueError(PRICES_MESSAGE)
    return np.ascontiguousarray(prices_GE.numpy())


def check_counts(**counts: int | None) -> None:
    """Each named count is None or an int >= 0."""
    for name, value in counts.items():
        if value is not None:
            check_int(name, value, 0)
