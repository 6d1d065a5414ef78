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
3. **Repair** (one all-gather of [2, E, E] per round): successive shortest paths on the
   expert graph plus a sink node.  Edge ``e -> f`` costs the cheapest move of one token from
   e to f, ``min_t scores[t, e] - scores[t, f]`` over tokens holding e and not f, on any rank
   (every rank's [E, E] minima and their tokens are gathered; the lowest rank holding the
   minimum owns the edge).  Every rank runs the same Bellman-Ford from the overloaded
   experts, turns the distances into potentials, and augments along every path of reduced
   cost 0 it finds (each gathered token moves at most once per round); the owner of each
   edge on a path moves its token.  Zero-reduced-cost paths are shortest augmenting paths
   and keep the routing optimal for its loads, so the final routing is optimal (Ahuja,
   Magnanti & Orlin, *Network Flows*, ch. 9); a round replaces what used to be one
   collective per path.
4. **Certificate** (one more [E, E] all-reduce and one of 2 values): prices from shortest
   distances to the experts with spare capacity, and the duality gap
   ``sum_t topk_k(scores[t] - p) + C * sum_e p_e - score`` over all ranks (0 up to rounding).

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

from maxscore.solvers._validate import expert_capacity, make_problem
from maxscore.solvers.assignment import Assignment
from maxscore.solvers.exact import solve_exact

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
    rounds: int = 0


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
    if not reduce.distributed:  # one process: the compiled core solves the same problem
        alone = solve_exact(dataclasses.replace(problem, capacity=capacity), prices=prices_E)
        return GlobalAssignment(
            assignment=dataclasses.replace(alone, method="global_exact"),
            collectives=0,
            bytes_sent=0,
            augmentations=0,
        )
    prices_E = _price_steps(scores_NE, k, capacity, total, prices_E, price_iterations, reduce)
    prices_E = prices_E - prices_E.min()  # a common shift changes no token's top-k
    held_NE, loads_E = _route(scores_NE, k, prices_E, reduce)
    augmentations, rounds = _repair(scores_NE, held_NE, loads_E, prices_E, capacity, k * total, reduce)
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
        rounds=rounds,
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


def _local_moves(scores_NE: torch.Tensor, held_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's cheapest move per edge: (cost [E*E], token [E*E], N where it has none).

    ``cost[e * E + f] = min over tokens t holding e and not f of s[t, e] - s[t, f]``; ties go to
    the lowest token index.
    """
    num_tokens, num_experts = scores_NE.shape
    local_X = torch.full((num_experts * num_experts,), math.inf, dtype=torch.float64)
    token_X = torch.full((num_experts * num_experts,), num_tokens, dtype=torch.int64)
    if num_tokens:
        k = int(held_NE[0].sum())
        experts_NK = torch.sort(held_NE.byte(), dim=1, descending=True, stable=True).indices[:, :k]
        held_scores_NK = scores_NE.gather(1, experts_NK)
        cost_NKE = held_scores_NK[:, :, None] - scores_NE[:, None, :]
        cost_NKE = cost_NKE.masked_fill(held_NE[:, None, :], math.inf)
        edge_NKE = experts_NK[:, :, None] * num_experts + torch.arange(num_experts)
        local_X.scatter_reduce_(0, edge_NKE.flatten(), cost_NKE.flatten(), "amin")
        is_min = cost_NKE.flatten() == local_X[edge_NKE.flatten()]
        tokens = torch.arange(num_tokens).repeat_interleave(k * num_experts)
        candidate = torch.where(is_min & torch.isfinite(cost_NKE.flatten()), tokens, num_tokens)
        token_X.scatter_reduce_(0, edge_NKE.flatten(), candidate, "amin")
    return local_X, token_X


def _move_costs(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, reduce: _Reducer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global [E, E] cheapest move costs, the lowest rank owning each, and that rank's token.

    One all-gather of every rank's costs and tokens ([2, E*E] float64 each: token indices are
    exact in float64).
    """
    num_experts = scores_NE.shape[1]
    local_X, token_X = _local_moves(scores_NE, held_NE)
    every_W2X = reduce.gather(torch.stack([local_X, token_X.double()]))
    costs_WX, tokens_WX = every_W2X[:, 0], every_W2X[:, 1].long()
    global_X = costs_WX.min(0).values
    ranks_W1 = torch.arange(costs_WX.shape[0])[:, None]
    owner_X = torch.where(costs_WX == global_X, ranks_W1, costs_WX.shape[0]).min(0).values
    token_X = tokens_WX.gather(0, owner_X.clamp(max=costs_WX.shape[0] - 1)[None])[0]
    shape = (num_experts, num_experts)
    return global_X.view(shape), owner_X.view(shape), token_X.view(shape)


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
) -> tuple[int, int]:
    """Successive shortest paths on the experts plus a sink node S, many paths per round.

    Each expert e sends ``sent[e]`` units to S (at most ``capacity``): ``capacity`` when its
    price is positive (complementary slackness), else ``min(load, capacity)``.  Expert e has
    excess ``load - sent`` (negative: a deficit), S has excess ``sum(sent) - units``.

    A round gathers the cheapest moves once and computes shortest distances d from the excess
    nodes (Bellman-Ford on E + 1 nodes; costs may be negative, the residual graph has no
    negative cycle).  With d as potentials every arc out of a reached node has reduced cost
    ``c + d(u) - d(v) >= 0``; augmenting along a path of reduced cost 0 adds only reverse arcs
    of reduced cost 0, and a token moved along such an arc stays on a top-k, so its new arcs
    keep reduced cost >= 0: no negative cycle appears and the flow stays optimal for its
    supplies (Ahuja, Magnanti & Orlin, ch. 9).  The shortest-path tree gives at least one such
    path per round; the round takes every one it finds, each gathered move (one token) used at
    most once, then the next round gathers again.  The last round leaves
    ``sent == load <= capacity``.
    Every rank takes the same decisions from the same gathered data.  Returns (augmenting
    paths, rounds).
    """
    num_experts = len(loads_E)
    sink = num_experts
    sent_E = torch.where(prices_E > 0, capacity, loads_E.clamp(max=capacity))
    paths = rounds = 0
    while True:
        excess_V = torch.cat([loads_E - sent_E, (sent_E.sum() - units).view(1)])
        if not (excess_V != 0).any():
            return paths, rounds
        cost_EE, owner_EE, token_EE = _move_costs(scores_NE, held_NE, reduce)
        cost_VV = torch.full((num_experts + 1, num_experts + 1), math.inf, dtype=torch.float64)
        cost_VV[:num_experts, :num_experts] = cost_EE
        cost_VV[:num_experts, sink] = torch.where(sent_E < capacity, 0.0, math.inf)
        cost_VV[sink, :num_experts] = torch.where(sent_E > 0, 0.0, math.inf)
        dist_V, _ = _shortest_paths(cost_VV, excess_V > 0)
        if not torch.isfinite(torch.where(excess_V < 0, dist_V, math.inf)).any():
            raise RuntimeError("global routing: no augmenting path although capacity is feasible")
        finite = cost_EE[torch.isfinite(cost_EE)]
        scale = 1e-10 * max(1.0, float(finite.abs().max()) if finite.numel() else 0.0)
        # shortest distances are potentials: every arc out of a reached node has reduced cost >= 0
        reduced_VV = cost_VV + dist_V[:, None] - dist_V[None, :]
        admissible_VV = torch.isfinite(cost_VV) & torch.isfinite(dist_V)[:, None] & (reduced_VV <= scale)
        found = _augment_round(
            admissible_VV, excess_V, owner_EE, token_EE, loads_E, sent_E, held_NE, capacity, reduce.rank
        )
        if found == 0:
            raise RuntimeError("global routing: a repair round found no admissible path")
        paths += found
        rounds += 1


def _augment_round(
    admissible_VV: torch.Tensor,
    excess_V: torch.Tensor,
    owner_EE: torch.Tensor,
    token_EE: torch.Tensor,
    loads_E: torch.Tensor,
    sent_E: torch.Tensor,
    held_NE: torch.Tensor,
    capacity: int,
    rank: int,
) -> int:
    """Augments along admissible paths (depth-first, lowest node first) until none is left.

    A token arc carries one unit per round (its gathered token moves once); a token that has
    moved makes every arc naming it unusable.  Arcs to S carry ``capacity - sent``, arcs from
    S carry ``sent``.  Updates loads, sent and this rank's held tokens; returns the paths.
    """
    sink = len(loads_E)
    arcs = admissible_VV.clone()
    excess = excess_V.tolist()
    owner, token = owner_EE.tolist(), token_EE.tolist()
    neighbours = [torch.nonzero(row).flatten().tolist() for row in arcs]
    moved: set[tuple[int, int]] = set()
    paths = 0
    for source in range(sink + 1):
        while excess[source] > 0:
            path = _find_path(source, neighbours, excess, owner, token, moved, sent_E, capacity, sink)
            if path is None:
                break
            for u, v in zip(path, path[1:], strict=False):
                if v == sink:
                    sent_E[u] += 1
                elif u == sink:
                    sent_E[v] -= 1
                else:
                    loads_E[u] -= 1
                    loads_E[v] += 1
                    moved.add((owner[u][v], token[u][v]))
                    if owner[u][v] == rank:
                        held_NE[token[u][v], u], held_NE[token[u][v], v] = False, True
                    neighbours[u].remove(v)
            excess[source] -= 1
            excess[path[-1]] += 1
            paths += 1
    return paths


def _token_taken(key, u, parent, owner, token, moved) -> bool:
    """Whether a move's token already moved this round or moves earlier on the path to ``u``."""
    if key in moved:
        return True
    sink = len(owner)
    while parent[u] is not None:
        w = parent[u]
        if w != sink and u != sink and (owner[w][u], token[w][u]) == key:
            return True
        u = w
    return False


def _find_path(source, neighbours, excess, owner, token, moved, sent_E, capacity, sink):
    """An admissible path from ``source`` to a node with a deficit (iterative DFS), or None."""
    stack, parent, seen = [source], {source: None}, {source}
    while stack:
        u = stack.pop()
        if u != source and excess[u] < 0:
            path = [u]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path[::-1]
        for v in reversed(neighbours[u]):
            if v in seen:
                continue
            if v == sink and int(sent_E[u]) >= capacity:
                continue
            if u == sink and int(sent_E[v]) <= 0:
                continue
            key = None if sink in (u, v) else (owner[u][v], token[u][v])
            if key is not None and _token_taken(key, u, parent, owner, token, moved):
                continue
            seen.add(v)
            parent[v] = u
            stack.append(v)
    return None


def _certificate_prices(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, loads_E: torch.Tensor, capacity: int, reduce: _Reducer
) -> torch.Tensor:
    """Dual prices: each expert's shortest move distance to an expert with spare capacity."""
    local_X, _ = _local_moves(scores_NE, held_NE)
    cost_EE = reduce(local_X, dist.ReduceOp.MIN).view(len(loads_E), len(loads_E))
    slack_E = loads_E < capacity
    full = not slack_E.any()  # every expert full: prices are defined up to a common shift
    # distance from e to the sources = distance to e from the sources in the reversed graph
    dist_E, _ = _shortest_paths(cost_EE.T, torch.ones_like(slack_E) if full else slack_E)
    return dist_E - dist_E.min() if full else dist_E.clamp(min=0)


def _ranked(scores_NE: torch.Tensor, held_NE: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [N, K]: each token's held experts, highest score first."""
    masked_NE = scores_NE.masked_fill(~held_NE, -math.inf)
    return torch.sort(masked_NE, dim=1, descending=True, stable=True).indices[:, :k]
