"""One optimal routing over the tokens of every rank, without gathering the scores.

Problem: the exact problem of ``maxscore.solvers.exact`` over the concatenation of every rank's
valid tokens, with one global capacity ``C`` per expert.  Each rank keeps its own [N, E]
scores; the ranks exchange only [E]- and [E, E]-sized summaries with ``all_reduce``:

1. **Prices** (at most ``price_iterations`` steps of one or two [E] all-reduces; they stop
   once the total overload is at most E units; a step that raises it is undone and the step
   size halved): every rank routes its tokens to their
   top-k of ``scores - prices``; the global loads are summed; each rank computes, per expert,
   the price at which it would shed (or take) its token share of the expert's global excess
   (a local best response); the token-weighted mean of the local responses, damped, is the
   next global price vector.  On one process this is the exact best response.
2. **Slack** (at most E + 1 all-reduces of E loads): an expert below capacity must have price 0
   for optimality, so such prices are set to 0 and the tokens re-routed.  Now every token
   holds its top-k of ``scores - prices``: the routing is optimal for its own loads.
3. **Repair** (one all-gather of [E, E] costs per unit moved): successive shortest paths on
   the expert graph.  Edge ``e -> f`` costs the cheapest move of one token from e to f,
   ``min_t scores[t, e] - scores[t, f]`` over tokens holding e and not f, on any rank (every
   rank's [E, E] minima are gathered; the lowest rank holding the minimum owns the edge).  Every rank
   runs the same Bellman-Ford from the overloaded experts to the nearest expert with spare
   capacity; the owner of each edge on the path moves its token.  A shortest augmenting path
   keeps the routing optimal for its loads, and each one removes one unit of overload, so
   the final routing is optimal (Ahuja, Magnanti & Orlin, *Network Flows*, ch. 9).
4. **Certificate** (one more [E, E] all-reduce and one of 2 values): prices from shortest
   distances to the experts with spare capacity, and the duality gap
   ``sum_t topk_k(scores[t] - p) + C * sum_e p_e - score`` over all ranks (0 up to rounding).

The counters of ``GlobalAssignment`` say how many collectives (all-reduces and all-gathers)
ran and how many bytes this rank contributed to them.  Every rank ends with its own tokens'
experts; loads, score, prices and gap are global and
identical on every rank.  Ties: lower expert index first in the top-k; among equal moves,
the lowest token index on the lowest rank.  All arithmetic is float64 on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maxscore.solvers._validate import expert_capacity, make_problem
from maxscore.solvers.assignment import Assignment

PRICE_ITERATIONS = 30
DAMPING = 0.8
MIN_STEP = 0.05  # price steps stop when halving after overshoots has made them this small


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (default: the world); 1 without an initialized process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True, kw_only=True, slots=True)
class GlobalAssignment:
    """``assignment``: this rank's experts [N, K]; its loads, score, capacity, prices and gap
    are global.  The counters say what crossed the process group."""

    assignment: Assignment
    collectives: int
    bytes_sent: int
    augmentations: int


class _Reducer:
    """All-reduces on the host over ``group``, counted; a no-op on a single process."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.distributed = world_size(group) > 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        # NCCL reduces device tensors only: the summaries make a round trip to the GPU
        self.device = "cuda" if self.distributed and dist.get_backend(group) == "nccl" else "cpu"
        self.calls = self.bytes = 0

    def __call__(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if not self.distributed:
            return tensor
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.cpu()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[W, *shape]: every rank's ``tensor`` (just ``tensor[None]`` on a single process)."""
        if not self.distributed:
            return tensor[None]
        world = dist.get_world_size(self.group)
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        moved = tensor.to(self.device).contiguous()
        out = moved.new_empty((world * moved.shape[0],) + tuple(moved.shape[1:]))
        dist.all_gather_into_tensor(out, moved, group=self.group)
        return out.cpu().view((world,) + tuple(tensor.shape))


def solve_global(
    scores: torch.Tensor,
    k: int,
    *,
    capacity: int | None = None,
    capacity_factor: float = 1.0,
    valid: torch.Tensor | None = None,
    prices: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    price_iterations: int = PRICE_ITERATIONS,
) -> GlobalAssignment:
    """The optimal routing of all ranks' tokens together (collective: call it on every rank).

    Args:
        scores: finite float [N, E] scores of this rank's tokens (N may differ between ranks).
        k: experts per token (the same on every rank).
        capacity: global tokens per expert; default ``expert_capacity(all valid tokens, E, k,
            capacity_factor)``.
        capacity_factor: used when ``capacity`` is None.
        valid: bool [N]; invalid tokens get no expert and use no capacity.
        prices: float [E] warm-start prices (e.g. a router's averaged prices); averaged over ranks.
        group: the process group (default: the world; a single process works without one).
        price_iterations: cap on the price steps (0 skips them).

    Raises:
        ValueError: bad input on this rank, non-finite scores, E or k differing between ranks, or
            a capacity too small for all ranks' tokens.
    """
    problem = make_problem(scores, k, 0, capacity_factor, valid, require_feasible=False)
    reduce = _Reducer(group)
    num_tokens, num_experts = problem.num_tokens, problem.num_experts
    scores_NE = problem.scores_TE.double()
    if problem.valid_T is not None:
        scores_NE = scores_NE[problem.valid_T]
    if not torch.isfinite(scores_NE).all():
        raise ValueError("scores must be finite for the global solver (no -inf); mask tokens with `valid`")
    shape = reduce(torch.tensor([num_experts, k, -num_experts, -k, len(scores_NE)], dtype=torch.float64))
    if reduce.distributed:
        check = reduce(
            torch.tensor([num_experts, k, -num_experts, -k], dtype=torch.float64), dist.ReduceOp.MAX
        )
        if not (check[:2] == -check[2:]).all():
            raise ValueError(
                f"E and k must be equal on every rank; this rank has E={num_experts}, k={k}, "
                f"others reach E={int(check[0])}, k={int(check[1])}"
            )
    total = int(shape[4])
    if capacity is None:
        capacity = expert_capacity(total, num_experts, k, capacity_factor)
    if capacity * num_experts < k * total:
        raise ValueError(
            f"capacity={capacity} is infeasible for all ranks' {total} valid tokens: {num_experts} experts "
            f"x {capacity} < k x tokens = {k * total}; use capacity >= {-(-k * total // num_experts)}"
        )
    prices_E = _initial_prices(prices, num_experts, reduce)
    prices_E = _price_steps(scores_NE, k, capacity, total, prices_E, price_iterations, reduce)
    prices_E = prices_E - prices_E.min()  # a common shift changes no token's top-k
    held_NE, loads_E = _route(scores_NE, k, prices_E, reduce)
    augmentations = _repair(scores_NE, held_NE, loads_E, prices_E, capacity, k * total, reduce)
    prices_E = _certificate_prices(scores_NE, held_NE, loads_E, capacity, reduce)
    experts_NK = _ranked(scores_NE, held_NE, k)
    picked = scores_NE.gather(1, experts_NK).sum()
    dual = torch.topk(scores_NE - prices_E, k, dim=1).values.sum()
    totals = reduce(torch.stack([picked, dual]))
    score, gap = float(totals[0]), float(totals[1] + capacity * prices_E.sum() - totals[0])
    experts_TK = torch.full((num_tokens, k), -1, dtype=torch.int64)
    if problem.valid_T is None:
        experts_TK = experts_NK
    else:
        experts_TK[problem.valid_T] = experts_NK
    device = problem.device
    assignment = Assignment(
        experts=experts_TK.to(device),
        loads=loads_E.to(device),
        score=score,
        capacity=capacity,
        method="global_exact",
        valid=None if problem.valid_T is None else problem.valid_T.to(device),
        prices=prices_E.to(device),
        gap=gap,
    )
    return GlobalAssignment(
        assignment=assignment,
        collectives=reduce.calls,
        bytes_sent=reduce.bytes,
        augmentations=augmentations,
    )


def _initial_prices(prices: torch.Tensor | None, num_experts: int, reduce: _Reducer) -> torch.Tensor:
    if prices is None:
        return torch.zeros(num_experts, dtype=torch.float64)
    if not isinstance(prices, torch.Tensor) or prices.shape != (num_experts,):
        raise ValueError(f"prices must be a float tensor of shape [E] = [{num_experts}], got {prices!r}")
    prices_E = prices.detach().to("cpu", torch.float64).clone()
    if not torch.isfinite(prices_E).all():
        raise ValueError("prices must be finite; pass None to start from 0")
    if reduce.distributed:
        prices_E = reduce(prices_E) / dist.get_world_size(reduce.group)
    return (prices_E - prices_E.min()).clamp(min=0)


def _top_k_mask(adjusted_NE: torch.Tensor, k: int) -> torch.Tensor:
    """bool [N, E]: each token's top-k (ties to the lower expert index: topk on a stable order)."""
    held_NE = torch.zeros(adjusted_NE.shape, dtype=torch.bool)
    order = torch.sort(adjusted_NE, dim=1, descending=True, stable=True).indices[:, :k]
    return held_NE.scatter_(1, order, True)


def _price_steps(
    scores_NE: torch.Tensor,
    k: int,
    capacity: int,
    total: int,
    prices_E: torch.Tensor,
    iterations: int,
    reduce: _Reducer,
) -> torch.Tensor:
    num_tokens, num_experts = scores_NE.shape
    if k == num_experts or total == 0:
        return prices_E
    best_prices, best_response, best_overload, step = prices_E, prices_E, math.inf, DAMPING
    # prices are >= 0 (the dual of "load <= capacity"); with no slack at all (every expert must be
    # exactly full) only price differences matter, and letting unwanted experts go below the
    # others' prices is what brings tokens to them
    floor = -math.inf if capacity * num_experts == k * total else 0.0
    for _ in range(iterations):
        adjusted_NE = scores_NE - prices_E
        held_NE = _top_k_mask(adjusted_NE, k)
        local_E = held_NE.sum(0).double()
        loads_E = reduce(local_E.clone())
        overload = float((loads_E - capacity).clamp(min=0).sum())
        if overload >= best_overload:  # overshot (the prices interact): smaller step from the best
            step /= 2
            if step < MIN_STEP:
                break
            prices_E = best_prices + step * (best_response - best_prices)
            continue
        best_prices, best_overload = prices_E, overload
        if overload <= num_experts:  # a few units are cheaper to repair than more rounds
            break
        response_E = torch.zeros(num_experts, dtype=torch.float64)
        if num_tokens:
            # the price at which token t stops wanting e (holders) or starts wanting it (others)
            top_NK = torch.topk(adjusted_NE, k + 1, dim=1).values
            threshold_NE = scores_NE - torch.where(held_NE, top_NK[:, k : k + 1], top_NK[:, k - 1 : k])
            ranked_NE = torch.sort(threshold_NE, dim=0, descending=True).values
            # this rank's best response: shed (or take) its share of each expert's global excess
            position_E = (local_E - (loads_E - capacity) * num_tokens / total).round()
            position_E = position_E.clamp(0, num_tokens - 1).long()
            response_E = ranked_NE.gather(0, position_E[None])[0].clamp(min=floor) * num_tokens
        best_response = reduce(response_E) / total  # the token-weighted mean over the ranks
        prices_E = prices_E + step * (best_response - prices_E)
    return best_prices


def _route(scores_NE: torch.Tensor, k: int, prices_E: torch.Tensor, reduce: _Reducer):
    """Every token on its top-k of ``scores - prices``: (held [N, E], global loads [E])."""
    held_NE = _top_k_mask(scores_NE - prices_E, k)
    return held_NE, reduce(held_NE.sum(0).double()).long()


def _move_costs(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, reduce: _Reducer, owners: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Global [E, E] cheapest move costs; with ``owners``, the lowest owning rank and this rank's
    token for every edge."""
    num_tokens, num_experts = scores_NE.shape
    inf = math.inf
    local_EE = torch.full((num_experts * num_experts,), inf, dtype=torch.float64)
    token_EE = torch.zeros(num_experts * num_experts, dtype=torch.int64)
    if num_tokens:
        # cost[t, e, f] = s[t, e] - s[t, f] for e held, f not held; scanned per held expert
        k = int(held_NE[0].sum())
        experts_NK = torch.sort(held_NE.byte(), dim=1, descending=True, stable=True).indices[:, :k]
        held_scores_NK = scores_NE.gather(1, experts_NK)
        cost_NKE = held_scores_NK[:, :, None] - scores_NE[:, None, :]
        cost_NKE = cost_NKE.masked_fill(held_NE[:, None, :], inf)
        edge_NKE = experts_NK[:, :, None] * num_experts + torch.arange(num_experts)
        local_EE.scatter_reduce_(0, edge_NKE.flatten(), cost_NKE.flatten(), "amin")
        if owners:
            is_min = cost_NKE.flatten() == local_EE[edge_NKE.flatten()]
            tokens = torch.arange(num_tokens).repeat_interleave(k * num_experts)
            candidate = torch.where(is_min, tokens, num_tokens)
            token_EE.fill_(num_tokens).scatter_reduce_(0, edge_NKE.flatten(), candidate, "amin")
    shape = (num_experts, num_experts)
    if not owners:
        return reduce(local_EE.clone(), dist.ReduceOp.MIN).view(shape), None, None
    # one all-gather of every rank's [E, E] costs: the minimum and the lowest rank that owns it
    every_WX = reduce.gather(local_EE)
    global_EE = every_WX.min(0).values
    ranks_W = torch.arange(every_WX.shape[0])[:, None]
    owner_EE = torch.where(every_WX == global_EE, ranks_W, every_WX.shape[0]).min(0).values
    return global_EE.view(shape), owner_EE.view(shape), token_EE.view(shape)


def _shortest_paths(cost_EE: torch.Tensor, sources_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bellman-Ford from a set of experts: (distance [E], predecessor [E], -1 at sources)."""
    num_experts = cost_EE.shape[0]
    dist_E = torch.where(sources_E, 0.0, math.inf).double()
    pred_E = torch.full((num_experts,), -1, dtype=torch.int64)
    for _ in range(num_experts):
        via_EE = dist_E[:, None] + cost_EE
        best_E, arg_E = via_EE.min(0)
        better = best_E < dist_E - 1e-12
        if not better.any():
            break
        dist_E = torch.where(better, best_E, dist_E)
        pred_E = torch.where(better, arg_E, pred_E)
    return dist_E, pred_E


def _repair(
    scores_NE: torch.Tensor,
    held_NE: torch.Tensor,
    loads_E: torch.Tensor,
    prices_E: torch.Tensor,
    capacity: int,
    units: int,
    reduce: _Reducer,
) -> int:
    """Successive shortest paths on the experts plus a sink node S (updates held and loads).

    Each expert e sends ``sent[e]`` units to S (at most ``capacity``): ``capacity`` when its
    price is positive (complementary slackness), else ``min(load, capacity)``.  Expert e has
    excess ``load - sent`` (negative: a deficit), S has excess ``sum(sent) - units``.  With
    prices as potentials every residual arc has reduced cost >= 0 (token moves: top-k; f -> S
    only when ``sent < capacity``, i.e. price 0; S -> g costs price >= 0), so shortest paths
    from excess to deficit nodes keep the flow optimal, and the last one leaves
    ``sent == load <= capacity`` everywhere.
    """
    num_experts = len(loads_E)
    sink = num_experts
    sent_E = torch.where(prices_E > 0, capacity, loads_E.clamp(max=capacity))
    augmentations = 0
    while True:
        excess_V = torch.cat([loads_E - sent_E, (sent_E.sum() - units).view(1)])
        if not (excess_V != 0).any():
            return augmentations
        cost_EE, owner_EE, token_EE = _move_costs(scores_NE, held_NE, reduce, owners=True)
        cost_VV = torch.full((num_experts + 1, num_experts + 1), math.inf, dtype=torch.float64)
        cost_VV[:num_experts, :num_experts] = cost_EE
        cost_VV[:num_experts, sink] = torch.where(sent_E < capacity, 0.0, math.inf)
        cost_VV[sink, :num_experts] = torch.where(sent_E > 0, 0.0, math.inf)
        dist_V, pred_V = _shortest_paths(cost_VV, excess_V > 0)
        dist_V = torch.where(excess_V < 0, dist_V, math.inf)
        target = int(dist_V.argmin())
        if not math.isfinite(dist_V[target]):
            raise RuntimeError("global routing: no augmenting path although capacity is feasible")
        node = target
        for _ in range(num_experts + 1):
            if pred_V[node] < 0:
                break
            source = int(pred_V[node])
            if node == sink:
                sent_E[source] += 1
            elif source == sink:
                sent_E[node] -= 1
            else:
                loads_E[source] -= 1
                loads_E[node] += 1
                if int(owner_EE[source, node]) == reduce.rank:
                    token = int(token_EE[source, node])
                    held_NE[token, source], held_NE[token, node] = False, True
            node = source
        augmentations += 1


def _certificate_prices(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, loads_E: torch.Tensor, capacity: int, reduce: _Reducer
) -> torch.Tensor:
    """Dual prices: each expert's shortest move distance to an expert with spare capacity."""
    cost_EE, _, _ = _move_costs(scores_NE, held_NE, reduce, owners=False)
    slack_E = loads_E < capacity
    full = not slack_E.any()  # every expert full: prices are defined up to a common shift
    # distance from e to the sources = distance to e from the sources in the reversed graph
    dist_E, _ = _shortest_paths(cost_EE.T, torch.ones_like(slack_E) if full else slack_E)
    return dist_E - dist_E.min() if full else dist_E.clamp(min=0)


def _ranked(scores_NE: torch.Tensor, held_NE: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [N, K]: each token's held experts, highest score first."""
    masked_NE = scores_NE.masked_fill(~held_NE, -math.inf)
    return torch.sort(masked_NE, dim=1, descending=True, stable=True).indices[:, :k]
