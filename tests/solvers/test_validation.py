"""Every bad input gets a ValueError that names the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import maxscore
from maxscore import expert_capacity


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scores=np.ones((4, 2)), k=1), "scores must be a torch.Tensor"),
        (dict(scores=torch.ones(8), k=1), r"scores must have shape \[N, E\]"),
        (dict(scores=torch.ones(2, 2, 2, 2), k=1), r"shape \[N, E\] \(one problem\) or \[G, N, E\]"),
        (
            dict(scores=torch.ones(4, 2, dtype=torch.int64), k=1),
            "scores must be float16/bfloat16/float32/float64",
        ),
        (dict(scores=torch.ones(4, 0), k=1), "at least one expert"),
        (dict(scores=torch.ones(4, 3), k=0), r"k must satisfy 1 <= k <= num_experts=3"),
        (dict(scores=torch.ones(4, 3), k=4), r"k must satisfy 1 <= k <= num_experts=3"),
        (dict(scores=torch.ones(4, 3), k=1.5), "k must be an int"),
        (dict(scores=torch.ones(4, 3), k=1, capacity=1), r"capacity=1 is infeasible.*use capacity >= 2"),
        (dict(scores=torch.ones(4, 3), k=1, capacity=-1), "capacity must be an int >= 0"),
        (
            dict(scores=torch.ones(4, 3), k=1, capacity_factor=0.0),
            "capacity_factor must be a finite number > 0",
        ),
        (
            dict(scores=torch.ones(4, 3), k=1, capacity_factor=math.nan),
            "capacity_factor must be a finite number",
        ),
        (dict(scores=torch.ones(4, 3), k=1, capacity_factor=0.5), "infeasible"),
        (dict(scores=torch.ones(4, 3), k=1, valid=torch.ones(4)), "valid must be a bool tensor"),
        (
            dict(scores=torch.ones(4, 3), k=1, valid=torch.ones(3, dtype=torch.bool)),
            r"valid must have shape \[N\]",
        ),
        (dict(scores=torch.ones(4, 3), k=1, method="hungarian"), "method must be one of"),
        (
            dict(scores=torch.ones(4, 3), k=1, method="exact", tolerance=1),
            r"unknown option\(s\) \['tolerance'\]",
        ),
        (
            dict(scores=torch.ones(4, 3), k=1, method="greedy", prices=None),
            r"unknown option\(s\) \['prices'\]",
        ),
        (
            dict(scores=torch.ones(4, 3), k=1, prices=torch.ones(2)),
            r"prices must be a float tensor of shape \[E\]",
        ),
        (dict(scores=torch.ones(4, 3), k=1, prices=torch.full((3,), math.inf)), "prices must be finite"),
        (dict(scores=torch.ones(4, 3), k=1, max_moves=-1), "max_moves must be an int >= 0"),
        (
            dict(scores=torch.ones(4, 3), k=1, method="sinkhorn", iterations=0),
            "iterations must be an int >= 1",
        ),
        (
            dict(scores=torch.ones(4, 3), k=1, method="sinkhorn", temperature=0),
            "temperature must be a number > 0",
        ),
        (
            dict(scores=torch.ones(4, 3), k=1, method="iterative", max_rounds=0),
            "max_rounds must be an int >= 1",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    scores = kwargs.pop("scores")
    k = kwargs.pop("k")
    with pytest.raises(ValueError, match=match):
        maxscore.solve(scores, k, **kwargs)


@pytest.mark.parametrize("method", sorted(maxscore.METHODS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_positive_inf_scores_name_the_tokens(method, bad):
    scores = torch.rand(6, 3)
    scores[4, 1] = bad
    with pytest.raises(ValueError, match=r"scores contains NaN or \+inf at tokens \[4\]"):
        maxscore.solve(scores, 1, method=method)


def test_nan_in_a_padding_token_is_ignored():
    scores = torch.rand(6, 3)
    scores[4, 1] = math.nan
    valid = torch.ones(6, dtype=torch.bool)
    valid[4] = False
    result = maxscore.solve(scores, 1, valid=valid)
    assert result.experts[4].tolist() == [-1]


@pytest.mark.parametrize("method", sorted(maxscore.METHODS))
def test_tokens_with_too_few_allowed_experts(method):
    scores = torch.rand(5, 4)
    scores[2, 1:] = -math.inf
    with pytest.raises(ValueError, match=r"tokens \[2\] have fewer than k=2 allowed experts"):
        maxscore.solve(scores, 2, method=method)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 4, 1), "num_tokens must be >= 0"),
        ((4, 0, 1), "num_experts must be >= 1"),
        ((4, 4, 5), "k must satisfy"),
        ((4.0, 4, 1), "num_tokens must be an int"),
        ((4, 4, 1, -1.0), "capacity_factor must be a finite number > 0"),
    ],
)
def test_expert_capacity_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        expert_capacity(*args)
