"""A batched solve ([G, N, E] scores) equals G separate solves; its bad input is named per group."""

from __future__ import annotations

import math

import pytest
import torch

import maxscore
from tests.conftest import random_instance
from tests.solvers.helpers import check_feasible

METHODS = ("exact", "two_stage", "sinkhorn", "iterative", "greedy", "topk")


def _groups(kind: str, num_groups: int, num_tokens: int, num_experts: int, k: int = 0):
    pairs = [random_instance(100 + g, num_tokens, num_experts, kind, keep=k) for g in range(num_groups)]
    scores = torch.stack([s for s, _ in pairs])
    valid = None if pairs[0][1] is None else torch.stack([v for _, v in pairs])
    return scores, valid


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["peaked", "flat", "padding", "forbidden"])
def test_batched_equals_separate(method, kind):
    k, capacity_factor = 2, 1.25 if method in ("greedy", "topk") else 1.0
    scores, valid = _groups(kind, 5, 96, 8, k=k)
    batched = maxscore.solve(scores, k, capacity_factor=capacity_factor, method=method, valid=valid)
    assert batched.batched and batched.experts.shape == (5, 96, k) and batched.loads.shape == (5, 8)
    assert batched.score.dtype == torch.float64 and batched.capacity.dtype == torch.int64
    for g in range(5):
        valid_g = None if valid is None else valid[g]
        alone = maxscore.solve(scores[g], k, capacity_factor=capacity_factor, method=method, valid=valid_g)
        assert torch.equal(batched.experts[g], alone.experts), f"group {g}"
        assert torch.equal(batched.loads[g], alone.loads)
        assert int(batched.capacity[g]) == alone.capacity
        assert math.isclose(float(batched.score[g]), alone.score, rel_tol=1e-12, abs_tol=1e-12)
        if alone.prices is not None:
            assert torch.allclose(batched.prices[g], alone.prices, rtol=0, atol=1e-12)
        if method == "exact":
            assert float(batched.gap[g]) <= 1e-9 * max(1.0, alone.score)


def test_batched_exact_matches_reference_and_threads_agree():
    scores, valid = _groups("padding", 4, 64, 16)
    capacity = torch.tensor([8, 9, 12, 20])
    one = maxscore.solve(scores, 2, valid=valid, capacity=capacity, threads=1)
    two = maxscore.solve(scores, 2, valid=valid, capacity=capacity, threads=2)
    assert torch.equal(one.experts, two.experts)
    for g in range(4):
        cap = int(capacity[g])
        reference = maxscore.solve(scores[g], 2, valid=valid[g], capacity=cap, method="reference")
        assert math.isclose(float(one.score[g]), reference.score, rel_tol=1e-9)
        single = maxscore.Assignment(
            experts=one.experts[g],
            loads=one.loads[g],
            score=float(one.score[g]),
            capacity=int(capacity[g]),
            method="exact",
        )
        check_feasible(single, scores[g], 2, valid[g], int(capacity[g]), drops=False)


def test_warm_start_prices_per_group_and_shared():
    scores, _ = _groups("peaked", 3, 128, 16)
    cold = maxscore.solve(scores, 2)
    shared = maxscore.solve(scores, 2, prices=cold.prices.mean(0))
    per_group = maxscore.solve(scores, 2, prices=cold.prices)
    for warm in (shared, per_group):
        assert torch.allclose(warm.score, cold.score, rtol=1e-12)
        assert (warm.gap <= 1e-9).all()


def test_assignment_helpers_with_groups():
    scores, valid = _groups("padding", 3, 40, 6)
    batched = maxscore.solve(scores, 2, valid=valid, method="greedy", capacity=torch.tensor([5, 9, 20]))
    separate = [
        maxscore.solve(scores[g], 2, valid=valid[g], method="greedy", capacity=c)
        for g, c in enumerate([5, 9, 20])
    ]
    assert torch.equal(batched.mask(), torch.stack([a.mask() for a in separate]))
    assert torch.allclose(batched.load_ratio(), torch.stack([a.load_ratio() for a in separate]))
    dropped = sum(a.dropped_fraction * a.num_valid for a in separate) / sum(a.num_valid for a in separate)
    assert batched.num_valid == sum(a.num_valid for a in separate)
    assert math.isclose(batched.dropped_fraction, dropped, rel_tol=1e-6)
    assert batched.dropped_fraction > 0  # group 0's capacity forces drops: the check can fail


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(capacity=torch.tensor([4, 4])), r"an int or an int64 tensor of shape \[G\] = \[3\]"),
        (dict(capacity=torch.tensor([4.0, 4.0, 4.0])), r"int64 tensor of shape \[G\]"),
        (dict(capacity=torch.tensor([8, 1, 8])), r"capacity=1 is infeasible in group 1"),
        (dict(valid=torch.ones(3, 7, dtype=torch.bool)), r"valid must have shape \[G, N\] = \[3, 8\]"),
        (dict(valid=torch.ones(8, dtype=torch.bool)), r"valid must have shape \[G, N\]"),
        (dict(prices=torch.zeros(2, 4)), r"prices must be a float tensor of shape \[E\] or \[G, E\]"),
    ],
)
def test_bad_batched_arguments(kwargs, match):
    scores = torch.rand(3, 8, 4)
    with pytest.raises(ValueError, match=match):
        maxscore.solve(scores, 2, **kwargs)


def test_bad_batched_values_name_group_and_token():
    scores = torch.rand(3, 8, 4)
    scores[2, 5, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN or \+inf at tokens \(group, token\) \[\(2, 5\)\]"):
        maxscore.solve(scores, 2)
    scores = torch.rand(3, 8, 4)
    scores[1, 3, :3] = -math.inf
    with pytest.raises(ValueError, match=r"tokens \(group, token\) \[\(1, 3\)\] have fewer than k=2"):
        maxscore.solve(scores, 2)
    with pytest.raises(ValueError, match="0 routing groups"):
        maxscore.solve(torch.rand(0, 8, 4), 2)
    scores = torch.rand(2, 4, 3)
    scores[1, :, 2] = -math.inf  # group 1: 4 tokens x 2 units on 2 experts of capacity 3
    with pytest.raises(ValueError, match=r"forbidden pairs \(-inf\) make the problem of group 1 infeasible"):
        maxscore.solve(scores, 2, capacity=3)
