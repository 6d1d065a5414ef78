"""Global routing (option B): one optimal routing over all ranks' tokens, on every path."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore import solve
from maxscore.parallel.launch import spawn
from maxscore.solvers import solve_global
from maxscore.solvers.collectives import Reducer
from maxscore.solvers.exact.global_candidates import (
    MAX_CANDIDATES_PER_EXPERT,
    candidate_order,
    solve_candidates,
)
from maxscore.solvers.exact.global_prices import route
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


def _global_rank(rank, world_size, scores, valid, k, capacity_factor, path, out):
    sizes = _split(scores.shape[0], world_size)
    begin = sum(sizes[:rank])
    rows = slice(begin, begin + sizes[rank])
    result = solve_global(
        scores[rows],
        k,
        capacity_factor=capacity_factor,
        valid=None if valid is None else valid[rows],
        **PATHS[path],
    )
    a = result.assignment
    summary = torch.tensor(
        [a.score, a.gap, a.capacity, result.collectives, result.bytes_sent, result.rounds],
        dtype=torch.float64,
    )
    certified = torch.tensor(result.certified_by_candidates)
    gathered = torch.tensor(result.gathered)
    torch.save(
        {
            "experts": a.experts,
            "loads": a.loads,
            "summary": summary,
            "certified": certified,
            "gathered": gathered,
            "rank_loads": torch.zeros(0, dtype=torch.int64)
            if result.rank_loads is None
            else result.rank_loads,
        },
        f"{out}/rank{rank}.pt",
    )


def _run_ranks(world_size, scores, valid, k, path, out):
    out.mkdir(exist_ok=True)
    spawn(_global_rank, world_size, scores, valid, k, 1.0, path, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


PATHS = {
    "gathered": {},  # the default at these sizes: every rank's tokens gathered, solved whole
    "candidates": {"gather_tokens": 0},  # summaries: price steps, then the candidate round
    "rounds": {"gather_tokens": 0, "candidates": 0},  # summaries: repair rounds only
    # candidate rounds of 2 and 8 tokens per rank, too few to be optimal, then the rounds
    "few": {"gather_tokens": 0, "candidates": 2},
}


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["peaked", "padding"])
@pytest.mark.parametrize("path", list(PATHS))
def test_ranks_equal_single_process_exact_on_the_concatenation(world_size, kind, path, tmp_path):
    num_tokens, num_experts, k = 240, 8, 2
    scores, valid = random_instance(5, num_tokens, num_experts, kind)
    parts = _run_ranks(world_size, scores, valid, k, path, tmp_path)
    single = solve(scores, k, valid=valid)  # the compiled exact solver, one process
    experts = torch.cat([p["experts"] for p in parts])
    for p in parts:  # global results are identical on every rank
        assert torch.equal(p["loads"], single.loads)
        score, gap, capacity, calls, sent, rounds = p["summary"].tolist()
        assert math.isclose(score, single.score, rel_tol=1e-9)
        assert abs(gap) < 1e-7 and capacity == single.capacity
        # every collective carries a summary whose size depends on E alone (at most a later
        # candidate round's 4 x MAX_CANDIDATES_PER_EXPERT x E rows of E + 1 numbers, and E
        # loads), never on the [N, E] scores
        rows = 4 * MAX_CANDIDATES_PER_EXPERT * num_experts
        largest = max(2 * num_experts**2, rows * (num_experts + 1) + num_experts)
        assert calls > 0 and sent <= calls * largest * 8
        assert bool(p["gathered"]) == (path == "gathered")
        if path == "gathered":  # the check's all-reduce and the scores' all-gather
            assert calls == 2
            assert torch.equal(p["rank_loads"].sum(0), single.loads)  # every rank's counts, known to all
            for r, q in enumerate(parts):
                assigned = q["experts"][q["experts"] >= 0]
                assert torch.equal(p["rank_loads"][r], torch.bincount(assigned, minlength=num_experts))
        else:
            assert p["rank_loads"].numel() == 0
        if path == "rounds":
            assert not p["certified"] and rounds > 0
    check_feasible_concat = single.__class__(
        experts=experts, loads=single.loads, score=single.score, capacity=single.capacity, method="x"
    )
    check_feasible(check_feasible_concat, scores, k, valid, single.capacity, drops=False)
    assert torch.equal(experts.sort(1).values, single.experts.sort(1).values)  # unique optimum


# bias: the std of a per-expert logit bias; 0.5 is a router early in training, 3 one whose
# tokens mostly want the same few experts (most units overloaded at zero prices)
@pytest.mark.distributed
@pytest.mark.parametrize(("bias", "most"), [(0.5, 7), (3.0, 16)])
def test_candidate_round_certifies_a_typical_routing_in_few_collectives(bias, most, tmp_path):
    """2 ranks x 1024 tokens, E = 16, k = 2: the local solves' mean prices leave little
    overload, the call needs a handful of collectives (with a mild bias the candidate round
    alone is optimal; with a strong one a few repair rounds follow), and the rounds alone
    need more for the same optimum."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2048, 16, generator=generator) + bias * torch.randn(16, generator=generator)
    scores = logits.softmax(-1)
    single = solve(scores, 2)
    zero_price_loads = torch.zeros(16).index_add_(
        0, torch.topk(scores, 2).indices.flatten(), torch.ones(4096)
    )
    overloaded = float((zero_price_loads - single.capacity).clamp(min=0).sum()) / 4096
    assert overloaded > (0.1 if bias < 1 else 0.4)  # what the price steps alone would start from
    fast = _run_ranks(2, scores, None, 2, "candidates", tmp_path / "fast")
    slow = _run_ranks(2, scores, None, 2, "rounds", tmp_path / "slow")
    for p, q in zip(fast, slow, strict=True):
        if bias < 1:
            assert bool(p["certified"]) and p["summary"][5] == 0
        assert math.isclose(float(p["summary"][0]), single.score, rel_tol=1e-9)
        assert math.isclose(float(q["summary"][0]), single.score, rel_tol=1e-9)
        assert abs(float(p["summary"][1])) < 1e-7
        assert p["summary"][3] <= most < q["summary"][3]


def _idle_rank(rank, world_size, path, out):
    scores = torch.rand(64, 4, generator=torch.Generator().manual_seed(rank))
    valid = torch.zeros(64, dtype=torch.bool) if rank == 0 else None  # rank 0: only padding
    result = solve_global(scores, 2, valid=valid, **PATHS[path])
    torch.save(
        {"experts": result.assignment.experts, "score": result.assignment.score}, f"{out}/rank{rank}.pt"
    )


@pytest.mark.distributed
@pytest.mark.parametrize("path", ["gathered", "candidates"])
def test_a_rank_with_only_padding_routes_nothing_and_the_other_rank_alone(path, tmp_path):
    spawn(_idle_rank, 2, path, str(tmp_path))
    idle, busy = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    alone = solve(torch.rand(64, 4, generator=torch.Generator().manual_seed(1)), 2)
    assert (idle["experts"] == -1).all()
    assert math.isclose(busy["score"], alone.score, rel_tol=1e-9) and busy["score"] == idle["score"]
    assert torch.equal(busy["experts"].sort(1).values, alone.experts.sort(1).values)


def test_bad_input_is_named():
    scores = torch.rand(10, 4)
    with pytest.raises(ValueError, match="finite"):
        solve_global(scores.masked_fill(scores > 0.9, -math.inf), 1)
    with pytest.raises(ValueError, match="capacity=1 is infeasible"):
        solve_global(scores, 2, capacity=1)
    with pytest.raises(ValueError, match="prices must be"):
        solve_global(scores, 2, prices=torch.zeros(3))


def _mismatched_rank(rank, world_size, setting):
    if setting == "E":
        solve_global(torch.rand(8, 4 + rank), 1)
    else:  # the ranks would take different paths and wait for each other forever
        solve_global(torch.rand(8, 4), 1, gather_tokens=100 * rank)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("setting", "message"),
    [("E", "E: 4 to 5 across the ranks"), ("gather_tokens", "gather_tokens: 0 to 100")],
)
def test_settings_differing_across_ranks_raise_instead_of_hanging(setting, message):
    with pytest.raises(Exception, match=f"settings must be equal on every rank: {message}"):
        spawn(_mismatched_rank, 2, setting)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
def test_candidate_round_is_feasible_and_optimal_with_every_token_a_candidate(kind):
    """One process (no collectives): the candidate sub-problem's routing is always feasible
    (k distinct experts per token, loads <= C, loads counted right), and with every token a
    candidate it is the optimum with a zero duality gap at its prices."""
    scores, _ = random_instance(11, 300, 8, kind)
    scores_NE, k = scores.double(), 2
    capacity = 300 * k // 8
    reduce = Reducer(None)
    prices_E = torch.zeros(8, dtype=torch.float64)
    held_NE, _ = route(scores_NE, k, prices_E, reduce)
    optimum = solve(scores, k, capacity=capacity).score
    order_N = candidate_order(scores_NE - prices_E, held_NE, k, capacity)
    for count in (20, 300):
        repaired = solve_candidates(scores_NE, held_NE, prices_E, order_N, capacity, k, count, reduce)
        if repaired is None:  # the fixed tokens alone overload an expert: allowed for few candidates
            assert count < 300
            continue
        assert (repaired.held_NE.sum(1) == k).all()
        assert torch.equal(repaired.loads_E, repaired.held_NE.sum(0))
        assert (repaired.loads_E <= capacity).all()
        score = float((scores_NE * repaired.held_NE).sum())
        assert score <= optimum + 1e-9
        if count == 300:
            dual = torch.topk(scores_NE - repaired.prices_E, k, dim=1).values.sum()
            gap = float(dual + capacity * repaired.prices_E.sum()) - score
            assert math.isclose(score, optimum, rel_tol=1e-12) and abs(gap) < 1e-9
