"""Bounds on the exact core's work (moves and augmentations it reports, no timing) on shapes
from the slow buckets of ``benchmarks/bench_sweep.py``: expert counts that do not divide
N x k (48, 96, 160, 384: the capacity has slack), a router that favours some experts, cold
and warm starts; and the optimum on such shapes against the LP reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maxscore import solve
from maxscore.solvers import make_problem, make_problems
from maxscore.solvers.exact._native import run_core, run_core_batch
from tests.solvers.helpers import check_feasible

pytest.importorskip("scipy")

SLACK_SHAPES = [(4096, 96, 8), (4096, 160, 8), (2048, 48, 4), (2048, 384, 8), (1024, 160, 8)]


def biased_scores(num_tokens: int, num_experts: int, seed: int, bias: float = 1.0) -> torch.Tensor:
    """Softmax of unit Gaussian logits plus a per-expert offset (std ``bias``) shared by every
    seed: another ``seed`` is the next batch of the same router."""
    offsets = torch.randn(num_experts, generator=torch.Generator().manual_seed(99)) * bias
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return (logits + offsets).softmax(-1)


def tied_tokens(scores: torch.Tensor, k: int, prices) -> int:
    """Tokens whose k-th and (k+1)-th values of ``scores - prices`` are equal."""
    values = torch.topk(scores.double() - torch.as_tensor(prices), k + 1, dim=1).values
    return int((values[:, k - 1] == values[:, k]).sum())


@pytest.mark.parametrize("num_tokens, num_experts, k", SLACK_SHAPES)
def test_work_is_bounded_where_the_capacity_has_slack(num_tokens, num_experts, k):
    assert (num_tokens * k) % num_experts, "the shapes are meant to leave slack"
    units = num_tokens * k
    problem = make_problem(biased_scores(num_tokens, num_experts, 0), k, None, 1.0, None)
    cold = run_core(problem)
    # a cold start moves fewer units than it routes, counting an augmentation (a shortest path
    # over the E experts, O(E^2)) as E moves (O(E) each): the quantile start may leave a few
    # free slots at priced experts, a path each, where they cost less than a pass or so
    assert cold.moves + num_experts * cold.augmentations <= 1.5 * units, cold
    assert cold.augmentations <= units / num_experts, cold.augmentations
    # a warm start at the optimum has almost nothing to do: ties only.  Optimal prices sit at
    # thresholds (each priced expert has a token exactly at its leaving or entering price),
    # and the tie rule may seat such a token on the other side, whose move may unseat one more
    at_optimum = run_core(problem, prices_E=cold.prices_E)
    assert at_optimum.moves <= 2 * tied_tokens(problem.scores_TE, k, cold.prices_E), at_optimum.moves
    assert at_optimum.augmentations <= num_experts / 8, at_optimum.augmentations
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


SIGMOID_SHAPES = [(3613, 16, 7), (2048, 96, 4), (2048, 96, 8), (2048, 160, 8), (4096, 384, 8)]


def sigmoid_scores(num_tokens: int, num_experts: int, seed: int, bias: float = 1.2) -> torch.Tensor:
    """Sigmoid of unit Gaussian logits plus a per-expert offset (std ``bias``): the popular
    experts score near 1 for almost every token, so they compete for the same tokens."""
    offsets = torch.randn(num_experts, generator=torch.Generator().manual_seed(99)) * bias
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    return (logits + offsets).sigmoid()


@pytest.mark.parametrize("num_tokens, num_experts, k", SIGMOID_SHAPES)
def test_cold_work_is_bounded_where_experts_compete(num_tokens, num_experts, k):
    """From prices 0 the auction raised each popular expert's price one leaving price at a
    time, and the evicted tokens went to the next popular expert: a price war of many moves
    per unit.  From the quantile start (every expert's price at its cap-th score less a
    common threshold) few units move and few free slots are left to the repair."""
    units = num_tokens * k
    cold = run_core(make_problem(sigmoid_scores(num_tokens, num_experts, 0), k, None, 1.0, None))
    assert cold.moves + num_experts * cold.augmentations <= units / 2, cold
    assert abs(cold.gap) <= 1e-9 * abs(cold.score)


@pytest.mark.parametrize("num_tokens, num_experts, k", [(120, 24, 3), (100, 45, 1), (90, 16, 5)])
def test_optimum_of_competing_experts_equals_the_lp(num_tokens, num_experts, k):
    scores = sigmoid_scores(num_tokens, num_experts, 0, bias=2.0)
    exact = solve(scores, k)
    reference = solve(scores, k, method="reference")
    check_feasible(exact, scores, k, None, exact.capacity, drops=False)
    assert math.isclose(exact.score, reference.score, rel_tol=1e-9)
    assert (exact.prices >= 0).all()
    assert (exact.prices[exact.loads < exact.capacity] == 0).all()


def drifted_scores(groups: int, num_tokens: int, num_experts: int, seed: int, drift: float) -> torch.Tensor:
    """[G, N, E] scores of a router early in training: low-rank logits (tokens of a small model
    share their preferences, so the problems are nearly degenerate), whose expert weights moved
    by ``drift`` (relative) since the batch the warm start came from."""
    weights = torch.randn(num_experts, 4, generator=torch.Generator().manual_seed(99))
    weights = weights + drift * torch.randn(num_experts, 4, generator=torch.Generator().manual_seed(98))
    hidden = torch.randn(groups, num_tokens, 4, generator=torch.Generator().manual_seed(seed)) / 2
    return (hidden @ weights.T).softmax(-1)


def batch_work(result, groups=slice(None)) -> int:
    """Moves plus augmentations (a shortest path over the E experts, counted as E moves)."""
    stats = result.stats_GS[groups]
    return int(stats[:, 4].sum() + result.prices_GE.shape[1] * stats[:, 3].sum())


def test_a_stale_shared_start_gives_way_to_the_leading_groups_prices():
    """A router warm-starts every group from the last batch's mean prices; early in training
    they are stale.  The core solves the first two groups from them, and starts the others
    from those two's mean optimal prices, which fit this batch better: the others' starting
    misfit (units over capacity plus free slots at priced experts) falls well under the
    leads'.  The routing is the optimum (against the LP) and does not depend on the threads."""
    groups, num_tokens, num_experts, k = 8, 128, 96, 8
    previous = make_problems(drifted_scores(groups, num_tokens, num_experts, 1, 0.0), k, None, 1.0, None)
    stale = run_core_batch(previous).prices_GE.mean(0)
    problems = make_problems(drifted_scores(groups, num_tokens, num_experts, 0, 0.5), k, None, 1.0, None)
    result = run_core_batch(problems, prices_GE=stale[None], threads=1)
    assert result.lead_start
    misfit = result.stats_GS[:, 10]
    assert misfit[2:].mean() < 0.7 * misfit[:2].mean(), misfit
    assert (abs(result.gap_G) <= 1e-9 * abs(result.score_G)).all()
    two_threads = run_core_batch(problems, prices_GE=stale[None], threads=2)
    assert np.array_equal(result.experts_GNK, two_threads.experts_GNK)
    for g in (0, 5):
        reference = solve(problems.scores_GNE[g], k, method="reference")
        assert math.isclose(result.score_G[g], reference.score, rel_tol=1e-9)


def test_a_fresh_shared_start_is_kept():
    """Warm from the mean prices of a previous batch of the same router, every group keeps that
    start: each group's routing and work are those of solving it alone from it."""
    groups, num_tokens, num_experts, k = 6, 256, 48, 4
    previous = make_problems(
        biased_scores(groups * num_tokens, num_experts, 1).view(groups, num_tokens, -1), k, None, 1.0, None
    )
    prices = run_core_batch(previous).prices_GE.mean(0)
    scores = biased_scores(groups * num_tokens, num_experts, 0).view(groups, num_tokens, -1)
    result = run_core_batch(make_problems(scores, k, None, 1.0, None), prices_GE=prices[None])
    assert not result.lead_start
    for g in range(groups):
        alone = run_core_batch(make_problems(scores[g : g + 1], k, None, 1.0, None), prices_GE=prices[None])
        assert np.array_equal(result.experts_GNK[g], alone.experts_GNK[0])
        assert batch_work(result, slice(g, g + 1)) == batch_work(alone)


def test_a_cold_batch_starts_its_later_groups_from_the_leads_prices():
    """Without a warm start each group used to start from its own quantile prices; the groups
    after the first two now start from those two's optimal prices and do less than half the
    work they do alone."""
    groups, num_tokens, num_experts, k = 8, 256, 96, 8
    scores = biased_scores(groups * num_tokens, num_experts, 0).view(groups, num_tokens, -1)
    result = run_core_batch(make_problems(scores, k, None, 1.0, None))
    assert result.lead_start
    alone = sum(
        batch_work(run_core_batch(make_problems(scores[g : g + 1], k, None, 1.0, None)))
        for g in range(2, groups)
    )
    assert batch_work(result, slice(2, None)) < 0.5 * alone, (batch_work(result, slice(2, None)), alone)
    assert (abs(result.gap_G) <= 1e-9 * abs(result.score_G)).all()
