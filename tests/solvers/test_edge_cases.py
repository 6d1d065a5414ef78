"""Degenerate sizes, exact tie-breaking, hand-computed examples and infeasible forbidden pairs."""

from __future__ import annotations

import math

import pytest
import torch

import maxscore
from maxscore import METHODS, expert_capacity

ALL = sorted(METHODS)


@pytest.mark.parametrize("method", ALL)
def test_empty_batch(method):
    result = maxscore.solve(torch.empty(0, 4), 2, method=method)
    assert result.experts.shape == (0, 2)
    assert result.loads.tolist() == [0, 0, 0, 0]
    assert result.score == 0.0 and result.capacity == 0 and result.dropped_fraction == 0.0


@pytest.mark.parametrize("method", ALL)
def test_all_tokens_padding(method):
    result = maxscore.solve(torch.rand(5, 3), 1, valid=torch.zeros(5, dtype=torch.bool), method=method)
    assert (result.experts == -1).all() and result.capacity == 0 and result.loads.sum() == 0


@pytest.mark.parametrize("method", ALL)
def test_single_expert(method):
    scores = torch.rand(9, 1)
    result = maxscore.solve(scores, 1, method=method)
    assert result.experts.flatten().tolist() == [0] * 9 and result.loads.tolist() == [9]


@pytest.mark.parametrize("method", ALL)
def test_k_equals_num_experts_takes_every_expert(method):
    scores = torch.rand(6, 4)
    result = maxscore.solve(scores, 4, method=method)
    assert (result.experts.sort(1).values == torch.arange(4)).all()
    assert math.isclose(result.score, float(scores.double().sum()), rel_tol=1e-12)


def test_tight_capacity_fills_every_expert_exactly():
    scores = torch.randn(96, 12).softmax(-1)
    result = maxscore.solve(scores, 3)  # 12 x 24 = 3 x 96
    assert result.capacity == 24 and result.loads.tolist() == [24] * 12
    assert result.dropped_fraction == 0.0 and result.load_ratio().tolist() == [1.0] * 12


def test_all_equal_scores_tie_break():
    """Ties go to the lower expert index; an overloaded expert lets the higher token indices go."""
    result = maxscore.solve(torch.ones(4, 2), 1, capacity=2)
    assert result.experts.flatten().tolist() == [0, 0, 1, 1]
    result = maxscore.solve(torch.ones(3, 3), 1, capacity=3)
    assert result.experts.flatten().tolist() == [0, 0, 0]


def test_exact_hand_example_prefers_the_global_optimum():
    # Greedy-by-token would give token 0 expert 0 (0.9) and token 1 expert 1 (0.1): total 1.0.
    # The optimum sends token 0 to expert 1 (0.8) and token 1 to expert 0 (0.85): total 1.65.
    scores = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    result = maxscore.solve(scores, 1, capacity=1)
    assert result.experts.flatten().tolist() == [1, 0]
    assert math.isclose(result.score, 1.65, rel_tol=1e-6)
    assert abs(result.gap) < 1e-9


def test_greedy_matches_hand_computed_gshard_dispatch():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # 1st: e0, 2nd: e1
            [0.8, 0.1, 0.6],  # 1st: e0, 2nd: e2
            [0.7, 0.6, 0.2],  # 1st: e0 (3rd in line: dropped), 2nd: e1 (after t0's: dropped)
            [0.2, 0.9, 0.3],  # 1st: e1, 2nd: e2
        ]
    )
    result = maxscore.solve(scores, 2, capacity=2, method="greedy")  # below k x T / E: GShard drops
    assert result.experts.tolist() == [[0, 1], [0, 2], [-1, -1], [1, 2]]
    assert result.loads.tolist() == [2, 2, 2]
    assert result.dropped_fraction == 0.25
    assert result.dropped_fraction_by_rank().tolist() == [0.25, 0.25]
    assert math.isclose(result.score, 4.0, rel_tol=1e-6)


def test_padding_tokens_use_no_capacity():
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([True, False, True])
    result = maxscore.solve(scores, 1, valid=valid)
    assert result.capacity == 1  # ceil(1 x 2 valid / 2)
    assert result.experts.flatten().tolist() == [0, -1, 1]


def test_forbidden_pairs_that_break_halls_condition_name_the_tokens():
    scores = torch.rand(4, 3)
    scores[:3, 1:] = -math.inf  # tokens 0-2 may only use expert 0, which holds 2
    for method in ("exact", "two_stage", "sinkhorn", "iterative"):
        with pytest.raises(ValueError, match=r"infeasible: experts \[0\].*tokens.*\[0, 1, 2"):
            maxscore.solve(scores, 1, capacity=2, method=method)
    with pytest.raises(ValueError, match="infeasible"):
        maxscore.solve(scores, 1, capacity=2, method="reference")


def test_forbidden_pairs_are_avoided():
    scores = torch.tensor([[5.0, -math.inf, 1.0], [4.0, 3.0, -math.inf], [-math.inf, 2.0, 1.0]])
    result = maxscore.solve(scores, 1, capacity=1)
    assert result.experts.flatten().tolist() == [0, 1, 2]  # 5 + 3 + 1 beats every other matching
    # token 1 may only use expert 0, so token 0 must give it up
    scores = torch.tensor([[5.0, 1.0, -math.inf], [4.0, -math.inf, -math.inf]])
    result = maxscore.solve(scores, 1, capacity=1)
    assert result.experts.flatten().tolist() == [1, 0]


def test_expert_capacity():
    assert expert_capacity(512, 16, 2) == 64
    assert expert_capacity(10, 3, 1) == 4
    assert expert_capacity(100, 10, 1, 1.1) == 11  # not 12: no float round-up
    assert expert_capacity(0, 8, 2, 2.0) == 0
    assert expert_capacity(512, 16, 2, 1.25) == 80


def test_results_live_on_the_input_device_and_helpers_agree():
    scores = torch.randn(40, 5).softmax(-1)
    result = maxscore.solve(scores, 2, capacity_factor=1.5)
    mask = result.mask()
    assert mask.shape == (40, 5) and mask.sum(1).tolist() == [2] * 40
    assert torch.equal(mask.sum(0), result.loads)
    assert torch.allclose(result.load_ratio(), result.loads.float() / result.capacity)
    assert result.num_valid == 40 and result.k == 2 and result.num_experts == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_are_solved_on_their_device_and_match_the_host():
    scores = torch.randn(4096, 64, device="cuda").softmax(-1)
    for engine in ("auto", "host", "device"):
        result = maxscore.solve(scores, 2, engine=engine)
        assert result.experts.device == scores.device and result.loads.device == scores.device
        reference = maxscore.solve(scores.cpu(), 2)
        assert math.isclose(result.score, reference.score, rel_tol=1e-9)
        assert abs(result.gap) <= 1e-9 * reference.score
