"""Property tests over many seeded random instances: feasibility, optimality, certificates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import maxscore
from maxscore import expert_capacity
from maxscore.solvers._validate import make_problem
from maxscore.solvers.exact._native import run_core
from tests.conftest import KINDS, assert_top_k, random_instance
from tests.solvers.helpers import check_feasible

# (T, E, k, capacity_factor): small enough for the LP reference, covering k from 1 to E
SHAPES = [
    (1, 1, 1, 1.0),
    (1, 4, 4, 1.0),
    (7, 3, 2, 1.0),
    (16, 4, 1, 1.0),
    (33, 8, 3, 1.3),
    (64, 16, 2, 1.0),
    (100, 10, 10, 1.0),
    (128, 32, 4, 2.0),
    (200, 7, 5, 1.1),
    (256, 16, 2, 1.5),
    (300, 64, 8, 1.0),
    (512, 16, 2, 1.0),
]
NO_DROP_METHODS = ("exact", "two_stage", "sinkhorn", "iterative")


def _solve_both(scores, k, valid, capacity_factor):
    """(exact, reference), or None when the reference LP says the instance is infeasible."""
    try:
        reference = maxscore.solve(
            scores, k, capacity_factor=capacity_factor, valid=valid, method="reference"
        )
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid)
        return None
    return maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid), reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_matches_reference_optimum(shape, kind):
    num_tokens, num_experts, k, capacity_factor = shape
    for seed in range(3):
        scores, valid = random_instance(seed, num_tokens, num_experts, kind, keep=k)
        both = _solve_both(scores, k, valid, capacity_factor)
        if both is None:
            continue
        exact, reference = both
        check_feasible(exact, scores, k, valid, exact.capacity, drops=False)
        check_feasible(reference, scores, k, valid, reference.capacity, drops=False)
        scale = max(1.0, abs(reference.score))
        assert abs(exact.score - reference.score) <= 1e-6 * scale
        assert exact.gap is not None and abs(exact.gap) <= 1e-6 * scale
        assert exact.prices is not None and (exact.prices >= -1e-9).all()


@pytest.mark.parametrize("method", NO_DROP_METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_capacity_methods_are_feasible_without_drops(method, kind):
    for seed, (num_tokens, num_experts, k, capacity_factor) in enumerate(SHAPES):
        scores, valid = random_instance(100 + seed, num_tokens, num_experts, kind, keep=k)
        try:
            optimum = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid)
        except ValueError:  # forbidden pairs made it infeasible: checked in the test above
            continue
        result = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid, method=method)
        check_feasible(result, scores, k, valid, optimum.capacity, drops=False)
        assert result.dropped_fraction == 0.0
        assert result.score <= optimum.score + 1e-6 * max(1.0, abs(optimum.score))


@pytest.mark.parametrize(
    "kind", [kind for kind in KINDS if kind != "forbidden"]
)  # GShard: no forbidden pairs
def test_greedy_respects_capacity_and_drops_only_overflow(kind):
    for seed, (num_tokens, num_experts, k, capacity_factor) in enumerate(SHAPES):
        scores, valid = random_instance(200 + seed, num_tokens, num_experts, kind)
        result = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid, method="greedy")
        check_feasible(result, scores, k, valid, result.capacity, drops=True)
        # a slot is only dropped when its expert is full
        dropped_rows, dropped_slots = (result.experts < 0).nonzero(as_tuple=True)
        if valid is not None:
            keep = valid[dropped_rows]
            dropped_rows, dropped_slots = dropped_rows[keep], dropped_slots[keep]
        wanted = torch.topk(scores, k, dim=1).indices[dropped_rows, dropped_slots]
        assert (result.loads[wanted] == result.capacity).all()


@pytest.mark.parametrize(
    "method", ["exact", "two_stage", "sinkhorn", "iterative", "greedy", "topk", "reference"]
)
def test_unbounded_capacity_equals_plain_topk(method):
    for seed, (num_tokens, num_experts, k) in enumerate([(50, 8, 2), (200, 16, 4), (64, 5, 5), (30, 12, 1)]):
        scores, _ = random_instance(300 + seed, num_tokens, num_experts, "peaked")
        result = maxscore.solve(scores, k, capacity=num_tokens, method=method)
        assert_top_k(scores, result.experts)
        best = float(scores.double().sort(1, descending=True).values[:, :k].sum())
        assert math.isclose(result.score, best, rel_tol=1e-9)


def test_large_instances_exact_against_reference():
    """A few instances at the top of the size range (T up to 2048, E up to 128)."""
    for seed, (num_tokens, num_experts, k, kind) in enumerate(
        [(2048, 16, 2, "peaked"), (1024, 128, 8, "flat"), (2048, 64, 4, "ties"), (1500, 32, 3, "padding")]
    ):
        scores, valid = random_instance(400 + seed, num_tokens, num_experts, kind)
        exact, reference = _solve_both(scores, k, valid, 1.0)
        check_feasible(exact, scores, k, valid, exact.capacity, drops=False)
        assert abs(exact.score - reference.score) <= 1e-6 * abs(reference.score)
        assert abs(exact.gap) <= 1e-6 * abs(reference.score)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_solve_the_widened_problem(dtype):
    scores, _ = random_instance(7, 300, 16, "peaked")
    scores = scores.to(dtype)
    exact = maxscore.solve(scores, 2)
    reference = maxscore.solve(scores, 2, method="reference")
    assert abs(exact.score - reference.score) <= 1e-6 * reference.score
    assert exact.experts.device == scores.device


def test_warm_start_prices_give_the_same_optimum():
    scores, _ = random_instance(11, 1000, 32, "peaked")
    cold = maxscore.solve(scores, 4, capacity_factor=1.25)
    for prices in (cold.prices, cold.prices + 5.0, torch.rand(32) * 10, torch.zeros(32)):
        warm = maxscore.solve(scores, 4, capacity_factor=1.25, prices=prices)
        assert math.isclose(warm.score, cold.score, rel_tol=1e-9)
        assert abs(warm.gap) <= 1e-6 * cold.score
        assert (warm.loads <= warm.capacity).all()


@pytest.mark.parametrize("max_moves", [0, 10])
def test_repair_alone_is_exact(max_moves):
    """With the auction cut short, the shortest-path repair must still reach the optimum."""
    scores, _ = random_instance(13, 400, 16, "peaked")
    reference = maxscore.solve(scores, 3, method="reference")
    result = maxscore.solve(scores, 3, max_moves=max_moves, price_iterations=0)
    assert abs(result.score - reference.score) <= 1e-6 * reference.score


def test_capacity_defaults_to_expert_capacity_of_valid_tokens():
    scores, valid = random_instance(3, 90, 8, "padding")
    result = maxscore.solve(scores, 2, capacity_factor=1.5, valid=valid)
    assert result.capacity == expert_capacity(int(valid.sum()), 8, 2, 1.5)


def test_iterative_round_cap_reports_not_converged_but_stays_feasible():
    scores, _ = random_instance(17, 256, 8, "peaked")
    capped = maxscore.solve(scores, 2, method="iterative", max_rounds=1)
    check_feasible(capped, scores, 2, None, capped.capacity, drops=False)
    assert capped.converged is False
    assert maxscore.solve(scores, 2, method="iterative").converged is True


@pytest.mark.parametrize("kind", ["peaked", "flat", "padding"])
def test_sinkhorn_rounding_reaches_the_stage_two_optimum(kind):
    """Sinkhorn's rounding is completed along shortest paths, so it ends at two_stage's score."""
    for seed, (num_tokens, num_experts, k) in enumerate([(300, 16, 2), (256, 8, 3), (512, 32, 4)]):
        scores, valid = random_instance(500 + seed, num_tokens, num_experts, kind)
        sinkhorn = maxscore.solve(scores, k, valid=valid, method="sinkhorn")
        two_stage = maxscore.solve(scores, k, valid=valid, method="two_stage")
        assert math.isclose(sinkhorn.score, two_stage.score, rel_tol=1e-9)


@pytest.mark.parametrize(("num_tokens", "num_experts", "k"), [(2048, 32, 2), (1024, 64, 8)])
def test_strongly_biased_large_instances_against_reference(num_tokens, num_experts, k):
    """A per-expert logit bias overloads a few experts many times over: the price phase runs,
    first on a sample of the tokens; padding and forbidden pairs sit on sampled and other rows."""
    generator = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits += 2.0 * torch.randn(num_experts, generator=generator)
    scores = logits.softmax(-1)
    scores[1::7, :3] = -math.inf
    scores[4::9, -2:] = -math.inf
    valid = torch.rand(num_tokens, generator=generator) > 0.1
    top_loads = torch.bincount(torch.topk(scores, k, dim=1).indices.flatten(), minlength=num_experts)
    capacity = expert_capacity(int(valid.sum()), num_experts, k)
    assert int((top_loads - capacity).clamp(min=0).sum()) > k * num_tokens // 4  # far from balanced
    exact, reference = _solve_both(scores, k, valid, 1.0)
    check_feasible(exact, scores, k, valid, exact.capacity, drops=False)
    assert abs(exact.score - reference.score) <= 1e-9 * abs(reference.score)
    assert abs(exact.gap) <= 1e-9 * abs(reference.score)


def test_a_token_with_too_few_allowed_experts_in_a_large_biased_problem_is_named():
    generator = torch.Generator().manual_seed(5)
    scores = (
        torch.randn(2048, 32, generator=generator) + 2.0 * torch.randn(32, generator=generator)
    ).softmax(-1)
    scores[1001, 1:] = -math.inf  # one allowed expert, k = 2
    with pytest.raises(ValueError, match=r"tokens \[1001\] have fewer than k=2 allowed experts"):
        maxscore.solve(scores, 2)


@pytest.mark.parametrize(
    ("capacity_factor", "padded", "steps"), [(1.0, False, 1), (1.0, True, 3), (1.25, False, 3)]
)
def test_a_slow_auction_hands_back_to_the_price_steps_and_stays_exact(capacity_factor, padded, steps):
    """Near-uniform scores with a per-expert bias (a router early in training) make the auction
    creep up in small raises: started from equal prices (all 0 once shifted: no quantile
    start, which spares this problem the creep) with much excess left (the price steps capped
    at ``steps``, as when they stall), it hands back to the price steps once (with padding, and
    with slack capacity, where non-full experts must end at price 0), and the optimum is
    unchanged."""
    generator = torch.Generator().manual_seed(1)
    logits = 0.2 * torch.randn(2048, 16, generator=generator) + 0.5 * torch.randn(16, generator=generator)
    scores = logits.softmax(-1)
    valid = (torch.rand(2048, generator=generator) > 0.1) if padded else None
    problem = make_problem(scores, 2, None, capacity_factor, valid)
    core = run_core(problem, threads=1, price_iterations=steps, prices_E=np.ones(16))
    assert core.repriced
    exact, reference = _solve_both(scores, 2, valid, capacity_factor)
    check_feasible(exact, scores, 2, valid, exact.capacity, drops=False)
    assert abs(core.score - reference.score) <= 1e-9 * abs(reference.score)
    assert abs(exact.score - reference.score) <= 1e-9 * abs(reference.score)
    assert abs(core.gap) <= 1e-9 * abs(reference.score)
