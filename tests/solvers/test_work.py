"""Bounds on the exact core's work (moves and augmentations it reports, no timing) on shapes
from the slow buckets of ``benchmarks/bench_sweep.py``: expert counts that do not divide
N x k (48, 96, 160, 384: the capacity has slack), a router that favours some experts, cold
and warm starts; and the optimum on such shapes against the LP reference."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore import solve
from maxscore.solvers import make_problem
from maxscore.solvers.exact._native import run_core
from tests.solvers.helpers import check_feasible

pytest.importorskip("scipy")

SLACK_SHAPES = [(4096, 96, 8), (4096, 160, 8), (2048, 48, 4), (2048, 384, 8), (1024, 160, 8)]


def biased_scores(num_tokens: int, num_experts: int, seed: int, bias: float = 1.0) -> torch.Tensor:
    """Softmax of unit Gaussian logits plus a per-expert offset (std ``bias``) shared by every
    seed: another ``seed`` is the next batch of the same router."""
    offsets = torch.randn(num_experts, generator=torch.Generator().manual_seed(99)) * bias
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return (logits + offsets).softmax(-1)


@pytest.mark.parametrize("num_tokens, num_experts, k", SLACK_SHAPES)
def test_work_is_bounded_where_the_capacity_has_slack(num_tokens, num_experts, k):
    assert (num_tokens * k) % num_experts, "the shapes are meant to leave slack"
    units = num_tokens * k
    problem = make_problem(biased_scores(num_tokens, num_experts, 0), k, None, 1.0, None)
    cold = run_core(problem)
    # a cold start moves fewer units than it routes, and leaves few augmentations
    assert cold.moves <= 1.5 * units, cold.moves
    assert cold.augmentations <= num_experts / 8, cold.augmentations
    # a warm start at the optimum has almost nothing to do: ties only.  Optimal prices sit at
    # thresholds (each priced expert has a token exactly at its leaving or entering price),
    # and the tie rule may seat that token on the other side: about a unit per expert at most
    at_optimum = run_core(problem, prices_E=cold.prices_E)
    assert at_optimum.moves + at_optimum.augmentations <= num_experts
    # a warm start from the next batch's optimum: a small share of the units move
    other = make_problem(biased_scores(num_tokens, num_experts, 1), k, None, 1.0, None)
    next_batch = run_core(problem, prices_E=run_core(other).prices_E)
    assert next_batch.moves + next_batch.augmentations <= units / 10
    for result in (cold, at_optimum, next_batch):
        assert math.isclose(result.score, cold.score, rel_tol=1e-12)
        assert abs(result.gap) <= 1e-9 * abs(result.score)


@pytest.mark.parametrize(
    "num_tokens, num_experts, k, capacity_factor", [(100, 24, 4, 1.0), (100, 45, 6, 1.0), (90, 16, 3, 1.3)]
)
@pytest.mark.parametrize("warm", ["cold", "next_batch"])
def test_optimum_with_slack_capacity_equals_the_lp(num_tokens, num_experts, k, capacity_factor, warm):
    scores = biased_scores(num_tokens, num_experts, 0, bias=2.0)
    prices = None
    if warm == "next_batch":
        prices = solve(
            biased_scores(num_tokens, num_experts, 1, bias=2.0), k, capacity_factor=capacity_factor
        ).prices
    exact = solve(scores, k, capacity_factor=capacity_factor, prices=prices)
    reference = solve(scores, k, capacity_factor=capacity_factor, method="reference")
    check_feasible(exact, scores, k, None, exact.capacity, drops=False)
    assert math.isclose(exact.score, reference.score, rel_tol=1e-9)
    # complementary slackness: prices >= 0, and 0 at every expert below capacity
    assert (exact.prices >= 0).all()
    assert (exact.prices[exact.loads < exact.capacity] == 0).all()
