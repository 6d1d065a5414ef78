"""The global solver's one-round repair: every rank solves the same candidate sub-problem.

After the price steps every token holds its top-k of ``scores - prices`` and only a few units
of overload are left.  A token's margin ``v_k - v_(k+1)`` (its k-th and (k+1)-th values of
``s - p``) is the smallest price change that could make it switch experts, so the tokens of
smallest margin are the ones an optimal repair moves:

1. Each rank picks its ``candidates`` tokens of smallest margin and fixes the others.
2. One all-gather of [candidates x (E scores + valid), E fixed loads] per rank: O(E^2)
   numbers (``candidate_count``: 8 E to 128 E rows), never the [N, E] scores.
3. Every rank solves the same sub-problem (the gathered candidates, capacities ``C`` minus the
   fixed loads, warm-started from ``p``) with the compiled core, without its price steps (the
   prices are already close), so every rank takes the same decisions.
4. The caller certifies the joined routing with the duality gap at the new prices (one
   all-reduce of two numbers): 0 means optimal; otherwise, e.g. when a fixed token would now
   rather switch, it falls back to the rounds of ``maxscore.solvers.exact.global_repair``.

The number of tokens within reach of the remaining price changes grows with E, not with N
(the price steps leave about E units of overload, and price errors shrink as 1/N), so the
candidate count is a multiple of E.  Ties: candidates by margin, then lower token index; the
sub-problem as the compiled core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maxscore.solvers._validate import Problems
from maxscore.solvers.collectives import Reducer
from maxscore.solvers.exact._native import run_core_batch

CANDIDATES_PER_EXPERT = 8  # candidates per rank: at least this many times E
CANDIDATES_PER_UNIT = 8  # and this many per unit of overload left to each rank
MAX_CANDIDATES_PER_EXPERT = 128  # at most this many times E (the payload stays O(E^2))


def candidate_count(overload: int, num_experts: int, ranks: int) -> int:
    """Candidates per rank for ``overload`` units of global overload: ``CANDIDATES_PER_EXPERT
    * E`` plus ``CANDIDATES_PER_UNIT`` per unit of each rank's share, at most
    ``MAX_CANDIDATES_PER_EXPERT * E``.

    An optimal repair moves at least one token per unit of overload, and the tokens it moves
    are among the smallest margins but not the very smallest: measured on routers early in
    training (E = 16, 2 ranks), 2 candidates per unit often missed the optimum, 8 rarely."""
    wanted = CANDIDATES_PER_EXPERT * num_experts + CANDIDATES_PER_UNIT * -(-overload // ranks)
    return min(wanted, MAX_CANDIDATES_PER_EXPERT * num_experts)


@dataclass(frozen=True, slots=True)
class Repaired:
    """The candidate repair: this rank's held experts, the global loads and prices, and the
    sub-problem's augmenting paths."""

    held_NE: torch.Tensor
    loads_E: torch.Tensor
    prices_E: torch.Tensor
    augmentations: int


def candidate_order(adjusted_NE: torch.Tensor, held_NE: torch.Tensor, k: int, share: int) -> torch.Tensor:
    """int64 [N]: this rank's tokens in the order the candidate round takes them.

    First, for every expert this rank holds more than ``share`` times, the holders of smallest
    margin for that expert (``v_te - v_(k+1)`` of ``s - p``), enough to leave it ``share``
    fixed holders: when every rank's share sums to at most ``C``, the fixed tokens alone
    overload no expert.  Then the other tokens by increasing margin ``v_k - v_(k+1)``.  Ties:
    lower token index first; any order of the others when k = E, where nothing can enter.

    Args:
        adjusted_NE: float64 [N, E] ``scores - prices``.
        held_NE: bool [N, E] each token's top-k of ``adjusted_NE``.
        k: experts per token.
        share: fixed holders per expert this rank may keep.
    """
    num_tokens, num_experts = adjusted_NE.shape
    if k == num_experts:
        return torch.arange(num_tokens)
    top_NK = torch.topk(adjusted_NE, k + 1, dim=1).values
    order_N = torch.sort(top_NK[:, k - 1] - top_NK[:, k], stable=True).indices
    margin_NE = (adjusted_NE - top_NK[:, k : k + 1]).masked_fill(~held_NE, math.inf)
    excess_E = (held_NE.sum(0) - share).clamp(min=0)
    column_NE = margin_NE.argsort(dim=0, stable=True)
    first_NE = torch.arange(num_tokens)[:, None] < excess_E  # position in its column < excess
    forced_N = torch.zeros_like(held_NE).scatter_(0, column_NE, first_NE).any(1)
    return order_N[torch.argsort((~forced_N[order_N]).to(torch.uint8), stable=True)]


def solve_candidates(
    scores_NE: torch.Tensor,
    held_NE: torch.Tensor,
    prices_E: torch.Tensor,
    order_N: torch.Tensor,
    capacity: int,
    k: int,
    candidates: int,
    reduce: Reducer,
) -> Repaired | None:
    """The routing with the candidates re-solved, or None when the sub-problem has no solution
    (the fixed tokens alone overload an expert).  The caller checks its duality gap.

    Args:
        scores_NE: float64 [N, E] this rank's valid tokens.
        held_NE: bool [N, E] each token's top-k of ``scores - prices``.
        prices_E: float64 [E] the prices (identical on every rank).
        order_N: int64 [N] the tokens in the order to take them (``candidate_order``).
        capacity: the global capacity per expert.
        k: experts per token.
        candidates: tokens per rank in the sub-problem (fewer if the rank has fewer).
        reduce: the ranks' collectives (one all-gather here).
    """
    num_tokens, num_experts = scores_NE.shape
    count = min(candidates, num_tokens)
    chosen, fixed = order_N[:count], order_N[count:]
    payload = torch.zeros(candidates, num_experts + 1, dtype=torch.float64)
    payload[:count, :num_experts] = scores_NE[chosen]
    payload[:count, num_experts] = 1.0  # valid
    fixed_loads_E = held_NE[fixed].sum(0).double()
    every_RX = reduce.gather(torch.cat([payload.flatten(), fixed_loads_E]))
    rows_RCX = every_RX[:, : payload.numel()].view(-1, candidates, num_experts + 1)
    sub_capacity_E = capacity - every_RX[:, payload.numel() :].sum(0).long()
    if (sub_capacity_E < 0).any():  # the fixed tokens alone overload an expert
        return None
    scores_ME = rows_RCX[..., :num_experts].reshape(-1, num_experts).contiguous()
    valid_M = rows_RCX[..., num_experts].reshape(-1) > 0
    zero = torch.zeros(1, dtype=torch.int64)  # capacities come per expert below
    sub = Problems(scores_ME[None], k, zero, valid_M[None], valid_M.sum()[None], torch.device("cpu"))
    # no price steps: they would move the prices further from the fixed tokens' top-k.  The
    # core's auction before its shortest paths is kept: measured on the small preset (2 ranks,
    # 66 calls) a candidate round certified every call, with 8.4 collectives per call
    # instead of 9.3 and 13% less time in the core
    result = run_core_batch(
        sub,
        capacity_GE=sub_capacity_E.numpy()[None],
        prices_GE=prices_E.numpy()[None].copy(),
        price_iterations=0,
        threads=1,
        raise_errors=False,
    )
    if result.status_G[0] != 0:
        return None
    new_prices_E = torch.from_numpy(result.prices_GE[0])
    experts_MK = torch.from_numpy(result.experts_GNK[0])
    mine = slice(reduce.rank * candidates, reduce.rank * candidates + count)
    held_NE = held_NE.clone()
    held_NE[chosen] = False
    held_NE[chosen[:, None], experts_MK[mine]] = True
    loads_E = torch.from_numpy(result.loads_GE[0]) + (capacity - sub_capacity_E)
    return Repaired(held_NE, loads_E, new_prices_E, int(result.stats_GS[0, 3]))
