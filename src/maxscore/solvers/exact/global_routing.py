"""One optimal routing over the tokens of every rank; large problems never gather the scores.

Problem: the exact problem of ``maxscore.solvers.exact`` over the concatenation of every rank's
valid tokens, with one global capacity ``C`` per expert.  Each rank keeps its own [N, E]
scores; the ranks exchange only summaries whose size depends on E alone, never on N (small
problems gather their scores whole, at most ``gather_tokens`` rows per rank):

0. **Check** (one all-reduce of R + 14 numbers): every rank's count of valid tokens, and that
   E, k and the options that choose the path (capacity, capacity_factor, price_iterations,
   candidates, gather_tokens) agree on every rank.
   **Small problems** (no rank has more valid tokens than ``gather_tokens``, by default the
   first candidate round's largest payload of ``MAX_CANDIDATES_PER_EXPERT * E`` rows): one
   all-gather of every rank's valid scores and given prices, and every rank solves the whole
   problem with the compiled core (one thread, the same input: the same decisions),
   warm-started from the ranks' mean given prices.  Two collectives in all, and the core's own
   certificate.  There the steps below would gather every token anyway, after four more
   collectives and a local solve.
1. **Warm start** (one [E] all-reduce; steps 1 and 2 are ``maxscore.solvers.exact.global_prices``):
   every rank solves its own tokens exactly with the compiled core, at the capacity scaled to
   its share of the tokens (warm-started from the given prices), and the token-weighted mean of
   these local optimal prices is the first global price vector.  Each rank's prices estimate
   the global ones from a sample of the tokens, so the overload left is a sampling error:
   measured on routers early in training (E = 16, 2 ranks), 0.4-19% of the units, where the
   given prices (a router's averaged prices) left 50-70%.
2. **Prices** (at most ``price_iterations`` steps of one or two [E] all-reduces; they stop
   once the candidate round can take the overload left, see ``candidate_count``; a step that
   raises it is undone and the step size halved): every rank routes its tokens to their
   top-k of ``scores - prices``; the global loads are summed; each rank computes, per expert,
   the price at which it would shed (or take) its token share of the expert's global excess
   (a local best response); the token-weighted mean of the local responses, damped, is the
   next global price vector.  On one process this is the exact best response.  Every token
   now holds its top-k of ``scores - prices``.
3. **Candidate round** (one all-gather of O(E^2) numbers and one all-reduce of 2): every rank
   sends ``candidate_count`` tokens (8 E plus 8 per unit of its share of the overload, at
   most 128 E): the holders it must give up for its share of each overloaded expert, then the
   tokens of smallest margin, and the loads of the rest; every rank solves
   the same sub-problem with the compiled core (``maxscore.solvers.exact.global_candidates``); the
   joined routing is kept when its duality gap
   ``sum_t topk_k(scores[t] - p) + C * sum_e p_e - score`` over all ranks is 0 up to
   rounding: the routing is then optimal.  This is the common case; otherwise the round is
   tried again with 4x the candidates, then once more from the last round's prices (which
   are closer to the optimum; one more [E] all-reduce of the loads there).
4. **Repair rounds** otherwise (one all-gather of [2, E, E] per round), from the routing of
   step 2: successive shortest paths on the
   expert graph plus a sink node.  Edge ``e -> f`` costs the cheapest move of one token from
   e to f, ``min_t scores[t, e] - scores[t, f]`` over tokens holding e and not f, on any rank
   (every rank's [E, E] minima and their tokens are gathered; the lowest rank holding the
   minimum owns the edge).  Every rank runs the same Bellman-Ford from the overloaded
   experts, turns the distances into potentials, and augments along every path of reduced
   cost 0 it finds (each gathered token moves at most once per round); the owner of each
   edge on a path moves its token.  Zero-reduced-cost paths are shortest augmenting paths
   and keep the routing optimal for its loads, so the final routing is optimal (Ahuja,
   Magnanti & Orlin, *Network Flows*, ch. 9).  Then the certificate: prices from shortest
   distances to the experts with spare capacity (one [E, E] all-reduce) and the duality gap.

The counters of ``GlobalAssignment`` say how many collectives (all-reduces and all-gathers)
ran and how many bytes this rank contributed to them.  Every rank ends with its own tokens'
experts; loads, score, prices and gap are global and
identical on every rank.  Ties: lower expert index first in the top-k; among equal moves,
the lowest token index on the lowest rank.  All arithmetic is float64 on the host.  On a
single process (no process group, or a group of one) the compiled core solves the problem
directly (``maxscore.solvers.exact``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maxscore.solvers._validate import Problem, expert_capacity, make_problem
from maxscore.solvers.assignment import Assignment
from maxscore.solvers.collectives import Reducer
from maxscore.solvers.exact._native import run_core
from maxscore.solvers.exact.global_candidates import (
    MAX_CANDIDATES_PER_EXPERT,
    candidate_count,
    candidate_order,
    solve_candidates,
)
from maxscore.solvers.exact.global_prices import local_prices, price_steps, route, total_overload
from maxscore.solvers.exact.global_repair import certificate_prices, repair
from maxscore.solvers.exact.host import check_counts, check_prices, solve_exact
from maxscore.solvers.exact.prices import GLOBAL_PRICE_ITERATIONS

GAP_TOLERANCE = 1e-9  # relative: a candidate repair is optimal when its duality gap is 0 up to rounding


@dataclass(frozen=True, kw_only=True, slots=True)
class GlobalAssignment:
    """``assignment``: this rank's experts [N, K]; its loads, score, capacity, prices and gap
    are global.  The counters say what crossed the process group; ``gathered``: the scores
    were gathered whole (small problems, see ``gather_tokens``), and then ``rank_loads``, int64
    [R, E] on the host: how many of each rank's tokens every expert takes (every rank knows
    the whole routing; an expert-parallel exchange over the same group needs no count
    exchange)."""

    assignment: Assignment
    collectives: int
    bytes_sent: int
    augmentations: int
    rounds: int = 0
    certified_by_candidates: bool = False
    gathered: bool = False
    rank_loads: torch.Tensor | None = None


def solve_global(
    scores: torch.Tensor,
    k: int,
    *,
    capacity: int | None = None,
    capacity_factor: float = 1.0,
    valid: torch.Tensor | None = None,
    prices: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    price_iterations: int = GLOBAL_PRICE_ITERATIONS,
    candidates: int | None = None,
    gather_tokens: int | None = None,
) -> GlobalAssignment:
    """The optimal routing of all ranks' tokens together (collective: call it on every rank).

    Args:
        scores: finite float [N, E] scores of this rank's tokens (N may differ between ranks).
        k: experts per token (the same on every rank).
        capacity: global tokens per expert; default ``expert_capacity(all valid tokens, E, k,
            capacity_factor)``.
        capacity_factor: used when ``capacity`` is None.
        valid: bool [N]; invalid tokens get no expert and use no capacity.
        prices: float [E] warm-start prices of this rank's own solve (e.g. a router's averaged
            prices).
        group: the process group (default: the world; a single process works without one).
        price_iterations: cap on the price steps (0 skips them).
        candidates: tokens per rank in the candidate round (default ``candidate_count`` of the
            overload the price steps leave; the same on every rank; 0 always takes the rounds
            of shortest paths).
        gather_tokens: when no rank has more valid tokens than this, their scores are gathered
            and every rank solves the whole problem (default ``MAX_CANDIDATES_PER_EXPERT * E``,
            the first candidate round's largest payload; 0 never: always the summaries).

    Raises:
        ValueError: bad input on this rank, non-finite scores, E, k or an option above differing
            between ranks, or a capacity too small for all ranks' tokens.
    """
    check_counts(price_iterations=price_iterations, candidates=candidates, gather_tokens=gather_tokens)
    problem = make_problem(scores, k, 0, capacity_factor, valid, require_feasible=False)
    reduce = Reducer(group)
    num_experts = problem.num_experts
    scores_NE = problem.scores_TE.double()
    if problem.valid_T is not None:
        scores_NE = scores_NE[problem.valid_T]
    if not torch.isfinite(scores_NE).all():
        raise ValueError("scores must be finite for the global solver (no -inf); mask tokens with `valid`")
    if gather_tokens is None:
        gather_tokens = MAX_CANDIDATES_PER_EXPERT * num_experts
    # one all-reduce (max) of every rank's count of valid tokens (at its own place) and of the
    # settings that send the ranks down the same path: a setting agrees iff its max equals its
    # min over the ranks (a rank on another path would wait forever at another collective)
    settings = {
        "E": num_experts,
        "k": k,
        "capacity": -1 if capacity is None else capacity,
        "capacity_factor": capacity_factor,
        "price_iterations": price_iterations,
        "candidates": -1 if candidates is None else candidates,
        "gather_tokens": gather_tokens,
    }
    mine = torch.tensor(list(settings.values()), dtype=torch.float64)
    counts_R = torch.zeros(reduce.ranks, dtype=torch.float64)
    counts_R[reduce.rank] = len(scores_NE)
    high, negated_low, counts_R = reduce(torch.cat([mine, -mine, counts_R]), op=dist.ReduceOp.MAX).split(
        [len(mine), len(mine), reduce.ranks]
    )
    differ = [
        f"{name}: {-lo:g} to {hi:g} across the ranks, {value:g} on this rank"
        for (name, value), hi, lo in zip(settings.items(), high.tolist(), negated_low.tolist(), strict=True)
        if hi != -lo
    ]
    if differ:
        raise ValueError(f"solve_global's settings must be equal on every rank: {'; '.join(differ)}")
    ranks = reduce.ranks
    total = int(counts_R.sum())
    if capacity is None:
        capacity = expert_capacity(total, num_experts, k, capacity_factor)
    if capacity * num_experts < k * total:
        raise ValueError(
            f"capacity={capacity} is infeasible for all ranks' {total} valid tokens: {num_experts} experts "
            f"x {capacity} < k x tokens = {k * total}; use capacity >= {-(-k * total // num_experts)}"
        )
    given_E = _given_prices(prices, num_experts)
    if not reduce.distributed:  # one process: the compiled core solves the same problem
        alone = solve_exact(dataclasses.replace(problem, capacity=capacity), prices=given_E)
        return GlobalAssignment(
            assignment=dataclasses.replace(alone, method="global_exact"),
            collectives=0,
            bytes_sent=0,
            augmentations=0,
        )
    if int(counts_R.max()) <= gather_tokens:
        return _solve_gathered(problem, scores_NE, counts_R, capacity, given_E, reduce)
    prices_E = local_prices(problem, capacity, total, given_E, reduce)
    steps = price_steps(scores_NE, k, capacity, total, prices_E, price_iterations, ranks, reduce)
    prices_E, held_NE, loads_E = steps
    prices_E = prices_E - prices_E.min()  # a common shift changes no token's top-k
    share = capacity * len(scores_NE) // total if total else 0  # the shares sum to at most C
    repaired, count = None, candidates
    # the candidate round, certified by the duality gap, at most three times before the rounds
    # (which cost a collective each): again with 4x the candidates, then from the last round's
    # prices, which are closer to the optimum (every token re-routed there)
    for attempt in range(3) if candidates != 0 else ():
        if count is None:
            count = candidate_count(total_overload(loads_E, capacity), num_experts, ranks)
        order_N = candidate_order(scores_NE - prices_E, held_NE, k, share)
        tried = solve_candidates(scores_NE, held_NE, prices_E, order_N, capacity, k, count, reduce)
        if tried is not None:
            experts_NK, score, gap = _certificate(
                scores_NE, tried.held_NE, tried.prices_E, capacity, k, reduce
            )
            if gap <= GAP_TOLERANCE * max(1.0, abs(score)):
                repaired = tried
                break
        if attempt == 0:  # (a round that took every rank's every token cannot fail)
            count *= 4
        elif attempt == 1 and tried is not None and candidates is None:
            prices_E = tried.prices_E
            held_NE, loads_E = route(scores_NE, k, prices_E, reduce)
            count = 4 * candidate_count(total_overload(loads_E, capacity), num_experts, ranks)
        else:
            break
    if repaired is not None:
        loads_E, prices_E = repaired.loads_E, repaired.prices_E
        augmentations, rounds = repaired.augmentations, 0
    else:  # rounds of shortest paths from the last routing on a top-k of ``scores - prices``
        augmentations, rounds = repair(scores_NE, held_NE, loads_E, prices_E, capacity, k * total, reduce)
        prices_E = certificate_prices(scores_NE, held_NE, loads_E, capacity, reduce)
        experts_NK, score, gap = _certificate(scores_NE, held_NE, prices_E, capacity, k, reduce)
    return GlobalAssignment(
        assignment=_assignment(problem, experts_NK, loads_E, score, capacity, prices_E, gap),
        collectives=reduce.calls,
        bytes_sent=reduce.bytes,
        augmentations=augmentations,
        rounds=rounds,
        certified_by_candidates=repaired is not None,
    )


def _assignment(
    problem: Problem,
    experts_NK: torch.Tensor,
    loads_E: torch.Tensor,
    score: float,
    capacity: int,
    prices_E: torch.Tensor,
    gap: float,
) -> Assignment:
    """This rank's routing (``experts_NK`` of its valid tokens; -1 for padding) on the scores'
    device, with the global loads, score, prices and gap."""
    experts_TK = experts_NK
    if problem.valid_T is not None:
        experts_TK = torch.full((problem.num_tokens, problem.k), -1, dtype=torch.int64)
        experts_TK[problem.valid_T] = experts_NK
    device = problem.device
    return Assignment(
        experts=experts_TK.to(device),
        loads=loads_E.to(device),
        score=score,
        capacity=capacity,
        method="global_exact",
        valid=None if problem.valid_T is None else problem.valid_T.to(device),
        prices=prices_E.to(device),
        gap=gap,
    )


def _solve_gathered(
    problem: Problem,
    scores_NE: torch.Tensor,
    counts_R: torch.Tensor,
    capacity: int,
    given_E: torch.Tensor | None,
    reduce: Reducer,
) -> GlobalAssignment:
    """Every rank's valid tokens gathered (one all-gather of at most ``gather_tokens`` rows per
    rank) and the whole problem solved by the compiled core on every rank: the same input and
    one thread, so every rank takes the same decisions.  Warm start: the mean of the ranks'
    given prices."""
    num_experts, rows = problem.num_experts, int(counts_R.max())
    payload = torch.zeros(rows * num_experts + num_experts + 1, dtype=torch.float64)
    payload[: scores_NE.numel()] = scores_NE.flatten()
    if given_E is not None:
        payload[rows * num_experts :] = torch.cat([given_E, torch.ones(1, dtype=torch.float64)])
    every_RX = reduce.gather(payload)
    counts = counts_R.long().tolist()
    blocks = every_RX[:, : rows * num_experts].view(reduce.ranks, rows, num_experts)
    all_NE = torch.cat([block[:count] for block, count in zip(blocks, counts, strict=True)])
    given_RE, flags_R = every_RX[:, rows * num_experts : -1], every_RX[:, -1]
    warm_E = None if not flags_R.any() else given_RE[flags_R > 0].mean(0)
    whole = Problem(all_NE, problem.k, capacity, None, len(all_NE), torch.device("cpu"))
    core = run_core(whole, prices_E=None if warm_E is None else warm_E.numpy(), threads=1)
    begin = sum(counts[: reduce.rank])
    all_NK = torch.from_numpy(core.experts_TK)
    experts_NK = all_NK[begin : begin + len(scores_NE)]
    rank_N = torch.repeat_interleave(torch.arange(reduce.ranks), counts_R.long())
    cells_P = (rank_N[:, None] * num_experts + all_NK).flatten()
    rank_loads_RE = torch.bincount(cells_P, minlength=reduce.ranks * num_experts).view(
        reduce.ranks, num_experts
    )
    loads_E, prices_E = torch.from_numpy(core.loads_E), torch.from_numpy(core.prices_E)
    return GlobalAssignment(
        assignment=_assignment(problem, experts_NK, loads_E, core.score, capacity, prices_E, core.gap),
        collectives=reduce.calls,
        bytes_sent=reduce.bytes,
        augmentations=core.augmentations,
        gathered=True,
        rank_loads=rank_loads_RE,
    )


def _certificate(
    scores_NE: torch.Tensor,
    held_NE: torch.Tensor,
    prices_E: torch.Tensor,
    capacity: int,
    k: int,
    reduce: Reducer,
) -> tuple[torch.Tensor, float, float]:
    """This rank's experts [N, K] (best first), and the global score and duality gap
    ``sum_t topk_k(s[t] - p) + C sum_e p_e - score`` (one all-reduce of two numbers)."""
    experts_NK = _ranked(scores_NE, held_NE, k)
    picked = scores_NE.gather(1, experts_NK).sum()
    dual = torch.topk(scores_NE - prices_E, k, dim=1).values.sum()
    totals = reduce(torch.stack([picked, dual]))
    return experts_NK, float(totals[0]), float(totals[1] + capacity * prices_E.sum() - totals[0])


def _given_prices(prices: torch.Tensor | None, num_experts: int) -> torch.Tensor | None:
    given_1E = check_prices(prices, None, num_experts)  # the exact solver's checks: shape, finite
    return None if given_1E is None else torch.from_numpy(given_1E[0].copy())


def _ranked(scores_NE: torch.Tensor, held_NE: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [N, K]: each token's held experts, highest score first."""
    masked_NE = scores_NE.masked_fill(~held_NE, -math.inf)
    return torch.sort(masked_NE, dim=1, descending=True, stable=True).indices[:, :k]
