"""One price step: every engine's step against the reference (``prices.price_step``), and the
reference against a step computed here from its definition, token by token."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore.solvers._validate import make_problems
from maxscore.solvers.collectives import Reducer
from maxscore.solvers.exact import prices as price_module
from maxscore.solvers.exact._native import core_price_step
from maxscore.solvers.exact.dense import FusedOps
from maxscore.solvers.exact.global_prices import price_steps
from maxscore.solvers.exact.prices import DAMPING, certify, price_step
from tests.conftest import random_instance
from tests.solvers.helpers import needs_kernels

CASES = [  # (kind, N, E, k, capacity_factor)
    ("peaked", 256, 16, 2, 1.0),
    ("flat", 300, 12, 3, 1.5),
    ("padding", 128, 8, 1, 1.0),
    ("forbidden", 200, 10, 2, 1.0),
    ("ties", 256, 16, 2, 1.0),
    ("peaked", 1000, 5, 2, 1.0),
]


def _problem(kind, num_tokens, num_experts, k, capacity_factor, seed=3):
    scores, valid = random_instance(seed, num_tokens, num_experts, kind, keep=k)
    return make_problems(scores[None], k, None, capacity_factor, None if valid is None else valid[None])


def _warm(num_experts: int, seed: int = 0) -> torch.Tensor:
    prices = (
        torch.rand(num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05
    )
    return prices - prices.min()


def _step_by_definition(scores_NE, valid_N, k, capacity, prices_E):
    """The step written out token by token and expert by expert (sorted lists, no batching)."""
    num_tokens, num_experts = scores_NE.shape
    rows = [t for t in range(num_tokens) if valid_N is None or valid_N[t]]
    slack = capacity * num_experts > k * len(rows)
    theta = {e: [] for e in range(num_experts)}
    loads = [0] * num_experts
    for t in rows:
        values = [(float(scores_NE[t, e] - prices_E[e]), -e) for e in range(num_experts)]
        order = [-e for _, e in sorted(values, reverse=True)]
        kth, nxt = values[order[k - 1]][0], values[order[k]][0]
        for rank, e in enumerate(order):
            if float(scores_NE[t, e]) == -math.inf:
                continue
            held = rank < k
            loads[e] += held
            theta[e].append(float(scores_NE[t, e]) - (nxt if held else kth))
    new = prices_E.clone()
    for e in range(num_experts):
        ranked = sorted(theta[e], reverse=True)
        if loads[e] == capacity or not ranked or capacity == 0:
            continue
        hi = ranked[min(capacity, len(ranked)) - 1]
        lo = ranked[capacity] if capacity < len(ranked) else -math.inf
        target = (
            0.5 * (hi + lo) if math.isfinite(lo) and math.isfinite(hi) else (hi if math.isfinite(hi) else lo)
        )
        if slack and target <= 0:  # the floor: 0 at once, undamped
            new[e] = 0.0
            continue
        new[e] = prices_E[e] + DAMPING * (target - prices_E[e])
    return new


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_step_follows_its_definition(case):
    problems = _problem(*case)
    warm = _warm(problems.num_experts)
    step = price_step(problems.scores_GNE, problems.k, problems.capacity_G, warm[None], problems.valid_GN)[0]
    valid = None if problems.valid_GN is None else problems.valid_GN[0]
    expected = _step_by_definition(
        problems.scores_GNE[0].double(), valid, problems.k, int(problems.capacity_G[0]), warm
    )
    assert torch.allclose(step, expected, rtol=0, atol=1e-12)
    assert not torch.equal(step, warm), "the case moves some price"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_host_core_step_equals_the_reference(case):
    problems = _problem(*case)
    warm = _warm(problems.num_experts)
    step = price_step(problems.scores_GNE, problems.k, problems.capacity_G, warm[None], problems.valid_GN)[0]
    core = torch.from_numpy(core_price_step(problems.group(0), warm.numpy()))
    assert torch.allclose(core, step, rtol=0, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("case", CASES + [("peaked", 2000, 64, 8, 1.0)], ids=lambda c: "-".join(map(str, c)))
def test_kernel_step_equals_the_reference(case):
    problems = _problem(*case)
    warm = _warm(problems.num_experts)
    step = price_step(problems.scores_GNE, problems.k, problems.capacity_G, warm[None], problems.valid_GN)[0]
    prices = FusedOps().steps(problems, warm[None].contiguous(), 1)
    # float32 arithmetic on the device: agreement to its rounding
    assert torch.allclose(prices[0].double(), step, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_collective_step_on_one_rank_equals_the_reference(kind):
    scores, _ = random_instance(5, 512, 16, kind)
    capacity, k = 64, 2
    problems = make_problems(scores[None], k, capacity, 1.0, None)
    warm = _warm(16)
    step = price_step(problems.scores_GNE, k, problems.capacity_G, warm[None], None)[0]
    # two iterations: the first evaluates the warm prices and steps, the second keeps the step
    # when it lowered the overload (a biased cold start: it does)
    moved, _, _ = price_steps(scores.double(), k, capacity, 512, warm, 2, 1, Reducer(None))
    assert torch.allclose(moved, step, rtol=0, atol=1e-12)


def test_certificate_rejects_what_it_must():
    scores = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.2, 0.7]]], dtype=torch.float64)
    capacity = torch.tensor([1])
    optimal = torch.tensor([[[0], [1], [2]]])
    prices = torch.tensor([[0.7, 0.1, 0.0]], dtype=torch.float64)  # token 1 indifferent at 0.1
    good = certify(scores, optimal, prices, capacity, None)
    assert good.converged.all() and abs(float(good.gap[0])) < 1e-12
    overloaded = certify(scores, torch.tensor([[[0], [0], [2]]]), prices, capacity, None)
    assert not overloaded.converged.any()
    suboptimal = certify(scores, torch.tensor([[[1], [0], [2]]]), prices, capacity, None)
    assert not suboptimal.converged.any() and float(suboptimal.gap[0]) > 0.1
    negative = certify(scores, optimal, -prices, capacity, None)
    assert not negative.converged.any()
    valid = torch.tensor([[True, True, False]])
    padding_routed = certify(scores, optimal, prices, capacity, valid)
    assert not padding_routed.converged.any()


def test_constants_are_defined_once():
    """The engines import the step's constants from prices.py rather than defining their own."""
    import maxscore.solvers.exact._native as native
    import maxscore.solvers.exact.dense as dense
    import maxscore.solvers.exact.global_prices as global_prices

    for module in (native, dense, global_prices):
        assert module.DAMPING is price_module.DAMPING
