"""Global routing (option B): one optimal routing over all ranks' tokens, summaries only."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore import solve
from maxscore.parallel.launch import spawn
from maxscore.solvers import solve_global
from tests.conftest import random_instance
from tests.solvers.helpers import check_feasible


@pytest.mark.parametrize("kind", ["peaked", "flat", "padding", "ties"])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k", "capacity_factor"),
    [(96, 4, 1, 1.0), (200, 8, 2, 1.0), (300, 16, 4, 1.25)],
)
def test_single_process_equals_reference_optimum(kind, num_tokens, num_experts, k, capacity_factor):
    scores, valid = random_instance(3, num_tokens, num_experts, kind)
    result = solve_global(scores, k, capacity_factor=capacity_factor, valid=valid)
    reference = solve(scores, k, capacity_factor=capacity_factor, valid=valid, method="reference")  # HiGHS LP
    assignment = result.assignment
    check_feasible(assignment, scores, k, valid, assignment.capacity, drops=False)
    assert assignment.capacity == reference.capacity
    assert math.isclose(assignment.score, reference.score, rel_tol=1e-9, abs_tol=1e-9)
    assert abs(assignment.gap) < 1e-7
    assert result.collectives == 0  # nothing to exchange on one process


def _split(num_tokens: int, world_size: int) -> list[int]:
    """Uneven shares: rank r gets about (r + 1) parts."""
    parts = [r + 1 for r in range(world_size)]
    sizes = [num_tokens * p // sum(parts) for p in parts]
    sizes[-1] += num_tokens - sum(sizes)
    return sizes


def _global_rank(rank, world_size, scores, valid, k, capacity_factor, out):
    sizes = _split(scores.shape[0], world_size)
    begin = sum(sizes[:rank])
    rows = slice(begin, begin + sizes[rank])
    result = solve_global(
        scores[rows], k, capacity_factor=capacity_factor, valid=None if valid is None else valid[rows]
    )
    a = result.assignment
    summary = torch.tensor(
        [a.score, a.gap, a.capacity, result.collectives, result.bytes_sent], dtype=torch.float64
    )
    torch.save({"experts": a.experts, "loads": a.loads, "summary": summary}, f"{out}/rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["peaked", "padding"])
def test_ranks_equal_single_process_exact_on_the_concatenation(world_size, kind, tmp_path):
    num_tokens, num_experts, k = 240, 8, 2
    scores, valid = random_instance(5, num_tokens, num_experts, kind)
    spawn(_global_rank, world_size, scores, valid, k, 1.0, str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    single = solve(scores, k, valid=valid)  # the compiled exact solver, one process
    experts = torch.cat([p["experts"] for p in parts])
    for p in parts:  # global results are identical on every rank
        assert torch.equal(p["loads"], single.loads)
        score, gap, capacity, calls, sent = p["summary"].tolist()
        assert math.isclose(score, single.score, rel_tol=1e-9)
        assert abs(gap) < 1e-7 and capacity == single.capacity
        # only [E]- or [2, E, E]-sized summaries crossed: never the [N, E] scores
        assert calls > 0 and sent <= calls * 2 * num_experts * num_experts * 8
    check_feasible_concat = single.__class__(
        experts=experts, loads=single.loads, score=single.score, capacity=single.capacity, method="x"
    )
    check_feasible(check_feasible_concat, scores, k, valid, single.capacity, drops=False)
    assert torch.equal(experts.sort(1).values, single.experts.sort(1).values)  # unique optimum


def test_bad_input_is_named():
    scores = torch.rand(10, 4)
    with pytest.raises(ValueError, match="finite"):
        solve_global(scores.masked_fill(scores > 0.9, -math.inf), 1)
    with pytest.raises(ValueError, match="capacity=1 is infeasible"):
        solve_global(scores, 2, capacity=1)
    with pytest.raises(ValueError, match="prices must be"):
        solve_global(scores, 2, prices=torch.zeros(3))


def _mismatched_rank(rank, world_size):
    solve_global(torch.rand(8, 4 + rank), 1)


@pytest.mark.distributed
def test_mismatched_experts_across_ranks_raise():
    with pytest.raises(Exception, match="E and k must be equal on every rank"):
        spawn(_mismatched_rank, 2)
