"""The solves of a layer's routing groups as PyTorch operators: ``maxscore::route_exact`` (the
exact method, with its prices and certificate) and ``maxscore::route_groups`` (any other method
of ``solve``: experts, loads and score).

``torch.compile`` traces through an operator it knows (a fake implementation gives the shapes
and dtypes of its outputs), where it stops at a call into the compiled core or at a check that
branches on tensor values: a router that solves through these operators keeps its routing step
in one graph.  Each runs ``solve`` on scores known finite (the routers' softmax or sigmoid of
logits they checked), every group in one call, on the scores' device (``exact``: the host core
for CPU scores, the device engine for CUDA scores; see ``pick_engine``).  The checks that need
the values (tokens with fewer than k allowed experts, a capacity below ``k x valid / E``) run
inside them and raise ``solve``'s messages.

Registered when ``maxscore.routers`` is imported (the routers are its callers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from maxscore.solvers import Assignment, solve_finite


@torch.library.custom_op("maxscore::route_exact", mutates_args=())
def route_exact(
    scores: torch.Tensor,
    k: int,
    capacity: torch.Tensor,
    valid: torch.Tensor | None,
    prices: torch.Tensor | None,
    validate: str = "eager",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The optimal routing of G groups: scores float [G, N, E] (finite, ``-inf`` forbids a pair),
    capacity int64 [G], valid bool [G, N] or None, warm-start prices [G, E] / [E] or None,
    ``validate`` as in ``solve``.

    Returns experts int64 [G, N, k] (-1 for invalid tokens), loads int64 [G, E], prices
    float64 [G, E], score float64 [G], gap float64 [G] (the certificate), converged bool [G],
    fallback bool [G] and issues int32 [G, 4] (0 where checked eagerly) (``Assignment``'s fields
    of the same names).
    """
    a = solve_finite(scores, k, capacity, "exact", valid, prices=prices, validate=validate)
    issues = a.issues if a.issues is not None else scores.new_zeros((scores.shape[0], 4), dtype=torch.int32)
    return (
        a.experts.to(torch.int64),
        a.loads.to(torch.int64),
        a.prices.to(torch.float64),
        a.score.to(torch.float64).clone(),  # the device engine's score and gap share a tensor
        a.gap.to(torch.float64).clone(),
        _per_group(a.converged, scores),
        _per_group(a.fallback, scores),
        issues.to(torch.int32).clone(),
    )


def _per_group(flag: bool | torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An ``Assignment`` flag as a fresh bool [G] tensor on the scores' device."""
    return torch.as_tensor(flag, dtype=torch.bool, device=scores.device).expand(scores.shape[0]).clone()


@route_exact.register_fake
def _route_exact_fake(scores, k, capacity, valid, prices, validate="eager"):
    num_groups, num_tokens, num_experts = scores.shape
    return (
        scores.new_empty((num_groups, num_tokens, k), dtype=torch.int64),
        scores.new_empty((num_groups, num_experts), dtype=torch.int64),
        scores.new_empty((num_groups, num_experts), dtype=torch.float64),
        scores.new_empty((num_groups,), dtype=torch.float64),
        scores.new_empty((num_groups,), dtype=torch.float64),
        scores.new_empty((num_groups,), dtype=torch.bool),
        scores.new_empty((num_groups,), dtype=torch.bool),
        scores.new_empty((num_groups, 4), dtype=torch.int32),
    )


def solve_exact_op(
    scores_GNE: torch.Tensor,
    k: int,
    capacity_G: torch.Tensor,
    valid_GN: torch.Tensor | None,
    prices: torch.Tensor | None = None,
    validate: str = "eager",
) -> Assignment:
    """``solve_finite(..., "exact", ...)`` through ``maxscore::route_exact``: the same batched
    ``Assignment``, traceable by ``torch.compile``."""
    experts, loads, prices_GE, score, gap, converged, fallback, issues = route_exact(
        scores_GNE.detach(), k, capacity_G, valid_GN, None if prices is None else prices.detach(), validate
    )
    return Assignment(
        experts=experts,
        loads=loads,
        score=score,
        capacity=capacity_G,
        method="exact",
        valid=valid_GN,
        prices=prices_GE,
        gap=gap,
        converged=converged,
        fallback=fallback,
        issues=issues if validate == "deferred" else None,
    )


@torch.library.custom_op("maxscore::route_groups", mutates_args=())
def route_groups(
    scores: torch.Tensor, k: int, capacity: torch.Tensor, valid: torch.Tensor | None, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``solve`` of ``method`` over G groups of finite scores [G, N, E] (as ``route_exact``):
    experts int64 [G, N, k] (-1 for a dropped slot or an invalid token), loads int64 [G, E] and
    score float64 [G]."""
    a = solve_finite(scores, k, capacity, method, valid)
    score = torch.as_tensor(a.score, dtype=torch.float64, device=scores.device)
    return a.experts.to(torch.int64), a.loads.to(torch.int64), score.expand(scores.shape[0]).clone()


@route_groups.register_fake
def _route_groups_fake(scores, k, capacity, valid, method):
    num_groups, num_tokens, num_experts = scores.shape
    return (
        scores.new_empty((num_groups, num_tokens, k), dtype=torch.int64),
        scores.new_empty((num_groups, num_experts), dtype=torch.int64),
        scores.new_empty((num_groups,), dtype=torch.float64),
    )


def solve_op(
    scores_GNE: torch.Tensor, k: int, capacity_G: torch.Tensor, valid_GN: torch.Tensor | None, method: str
) -> Assignment:
    """``solve_finite`` of a method without options through ``maxscore::route_groups``: the
    experts, loads and score of the batched ``Assignment``, traceable by ``torch.compile``."""
    experts, loads, score = route_groups(scores_GNE.detach(), k, capacity_G, valid_GN, method)
    return Assignment(
        experts=experts, loads=loads, score=score, capacity=capacity_G, method=method, valid=valid_GN
    )
