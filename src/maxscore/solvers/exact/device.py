"""Exact routing of G groups on the scores' device: the ``engine="device"`` path of ``exact``.

Problem: the exact problem of ``maxscore.solvers.exact`` for each of G routing groups
(scores [G, N, E], capacities [G]), built by ``make_problems(..., on_device=True)``.

1. **On the device** (``dense.py``; one fused kernel per call, ``kernels.py``): from the warm
   start (a router's averaged prices) shifted to minimum 0, damped best-response price steps
   (``prices.py``) while the group's excess is large, at most ``price_iterations``; every token's
   top-k of ``s - p``; experts below capacity lowered to price 0 when the capacity has slack;
   then shortest augmenting paths over the experts, one unit each, until no expert is over
   capacity (at most ``REPAIR_PER_EXPERT`` x E + 16 per group): each raises the settled experts'
   prices by no more than the path's length, so every token keeps a top-k of ``s - p`` and the
   result is optimal; then the certificate (``prices.certify``).
2. **One transfer to the host** (``validate="eager"``, the default): each group's flags.  Bad
   input (NaN/+inf, tokens with fewer than k allowed experts, an infeasible capacity, non-finite
   warm prices) is raised there with the host engine's messages.  A group whose repair found no
   path or ran out of augmentations, or whose certificate failed, is solved by the host core on
   its full scores (``Assignment.fallback``; a second transfer, only then).

   ``validate="deferred"`` (the routers' default on CUDA): no transfer, nothing waits for the
   device, so a CUDA graph can capture the call.  The repair has no budget: each augmentation
   moves one of at most ``k x N + C x E`` units, so every group with a path for each unit (every
   feasible group) ends exact on the device.  The flags come back on the device
   (``Assignment.issues``: the caller raises them at its check point, see
   ``maxscore.routers.check_routing``); a group left unfinished (no path: bad input) or
   uncertified (rounding) keeps the device's routing and is marked in ``Assignment.fallback``.
   Without Triton (``TorchOps``) the repair runs on the host, so its transfer stays.

Where Triton does not run, the same path runs as plain torch steps (float64) and the compiled
core's repair from their prices on the host (``dense.TorchOps``).

``pick_engine`` chooses between this engine and the host core for ``solve(..., engine=...)``.

Complexity: per price step O(N E (k + bisection passes)) per group, per augmentation at most E
passes over the group's scores; one program per group.  Ties: lower expert index first.

References: DESIGN.md, "Exact routing on the device"; Ahuja, Magnanti & Orlin, *Network
Flows* (1993), ch. 9 (reduced costs and successive shortest paths).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maxscore.solvers._validate import (
    PRICES_MESSAGE,
    Problems,
    infeasible_message,
    nonfinite_message,
    short_message,
)
from maxscore.solvers.assignment import Assignment
from maxscore.solvers.exact._native import run_core_batch
from maxscore.solvers.exact.dense import (
    FusedOps,
    Routed,
    TorchOps,
    kernels_available,
    on_host,
    select_groups,
    valid_mask,
)
from maxscore.solvers.exact.host import check_counts, check_price_shape, solve_exact_groups
from maxscore.solvers.exact.prices import DEVICE_PRICE_STEPS, certify

ENGINES = ("auto", "host", "device")
VALIDATE = ("eager", "deferred")  # when the device engine raises bad input: at the call, or later


def pick_engine(engine: str, scores: torch.Tensor) -> str:
    """The engine that runs ``scores``: ``engine`` itself, or for ``"auto"`` the faster one.

    ``auto``: CPU scores take the host core.  CUDA scores take the device engine when its fused
    kernels can run (Triton); without them its plain torch steps cost more than the host core
    with its two transfers (measured on one H200: 12 ms against 2.9 ms at 64 x (512, 16, 2),
    ``benchmarks/results``), so they take the host core.  If a kernel fails to compile or
    launch on a device, ``auto`` warns once and takes the host core there from then on.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    on_cuda = isinstance(scores, torch.Tensor) and scores.device.type == "cuda"
    return "device" if on_cuda and kernels_available(scores.device) else "host"


# the repair's budget: at most REPAIR_PER_EXPERT x E + 16 augmentations per group (each moves
# one unit); a group that needs more is solved by the host core (a round trip that costs about
# as much as a few dozen augmentations of a small group)
REPAIR_PER_EXPERT = 4


def solve_exact_device(
    problems: Problems,
    *,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = DEVICE_PRICE_STEPS,
    threads: int | None = None,
    validate: str = "eager",
) -> Assignment:
    """Exact routing of the problems (on their device) with the work there.

    Arguments as ``maxscore.solve``; ``price_iterations`` caps the device price steps,
    ``max_moves`` and ``threads`` go to the host core (its repair without Triton, fallback);
    ``validate``: ``"eager"`` (bad input raised here, uncertified groups solved on the host) or
    ``"deferred"`` (no host round trip: see the module's step 2).
    """
    check_counts(max_moves=max_moves, price_iterations=price_iterations, threads=threads)
    if problems.num_tokens == 0:  # nothing to route: the host path handles the empty shapes
        return solve_exact_groups(on_host(problems), prices=prices, threads=threads)
    deferred = validate == "deferred"
    routed = route_on_device(problems, prices, price_iterations, threads, deferred=deferred)
    experts, prices_GE, certificate = routed.experts, routed.prices, routed.certificate
    fallback = routed.flags[:, 4] > 0  # deferred: the groups left as the device made them
    if not deferred:
        flags = routed.flags.cpu().numpy()  # the one transfer
        _raise_bad_input(problems, flags)
        if flags[:, 4].any():
            groups = torch.from_numpy(np.flatnonzero(flags[:, 4])).to(experts.device)
            with torch.profiler.record_function("host::fallback"):
                result = run_core_batch(
                    on_host(select_groups(problems, groups)), max_moves=max_moves, threads=threads,
                    group_ids=groups.tolist(),
                )  # fmt: skip
            experts = experts.index_copy(0, groups, torch.from_numpy(result.experts_GNK).to(experts.device))
            prices_GE = prices_GE.index_copy(0, groups, torch.from_numpy(result.prices_GE).to(experts.device))
            capacity_G, valid_GN = problems.capacity_G, problems.valid_GN
            certificate = certify(problems.scores_GNE, experts, prices_GE, capacity_G, valid_GN)
    return Assignment(
        experts=experts,
        loads=certificate.loads,
        score=certificate.score,
        capacity=problems.capacity_G,
        method="exact",
        valid=problems.valid_GN,
        prices=prices_GE,
        gap=certificate.gap,
        converged=certificate.converged,
        fallback=fallback,
        issues=routed.flags[:, :4] if deferred else None,
    )


def route_on_device(
    problems: Problems,
    prices: torch.Tensor | None,
    price_iterations: int,
    threads: int | None,
    deferred: bool = False,
) -> Routed:
    """Step 1 of a call (no transfer, no fallback): the routing, certificate, flags and work of
    the fused kernel where Triton runs, else of the torch steps and the core's repair.  At most
    ``REPAIR_PER_EXPERT`` x E + 16 augmentations per group, or (``deferred``) no limit."""
    warm = _warm_prices(prices, problems)
    ops = FusedOps() if kernels_available(problems.scores_GNE.device) else TorchOps()
    budget = NO_BUDGET if deferred else REPAIR_PER_EXPERT * problems.num_experts + 16
    return ops.solve(problems, warm, price_iterations, budget, threads)


NO_BUDGET = 2**31 - 1  # the kernel's int32 count never reaches it: each augmentation moves a unit


def _warm_prices(prices: torch.Tensor | None, problems: Problems) -> torch.Tensor:
    """Warm-start prices [G, E] on the scores' device (checked for finiteness on the device)."""
    num_groups, num_experts = problems.num_groups, problems.num_experts
    device = problems.scores_GNE.device
    if prices is None:
        return torch.zeros(num_groups, num_experts, dtype=torch.float64, device=device)
    check_price_shape(prices, num_groups, num_experts)
    return prices.detach().to(device, torch.float64).expand(num_groups, num_experts).contiguous()


def _raise_bad_input(problems: Problems, flags: np.ndarray) -> None:
    """The host engine's errors for the input the device flagged ([G, 5]: see ``dense.Routed``)."""
    group_size = problems.num_tokens if problems.num_groups > 1 else None
    s, k = problems.scores_GNE, problems.k
    if flags[:, 0].any():
        bad = (torch.isnan(s) | (s == math.inf)).any(-1) & valid_mask(problems)
        raise ValueError(nonfinite_message(bad.flatten().nonzero().flatten().cpu(), group_size))
    if flags[:, 1].any():
        short = ((s > -math.inf).sum(-1) < k) & valid_mask(problems)
        raise ValueError(short_message(short.flatten().nonzero().flatten().cpu(), k, group_size))
    if flags[:, 2].any():
        g = int(np.flatnonzero(flags[:, 2])[0])
        capacity, num_valid = int(problems.capacity_G[g]), int(problems.num_valid_G[g])
        group = g if problems.num_groups > 1 else None
        raise ValueError(infeasible_message(capacity, problems.num_experts, k, num_valid, group))
    if flags[:, 3].any():
        raise ValueError(PRICES_MESSAGE)
