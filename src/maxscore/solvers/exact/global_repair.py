"""The exact repair of the global solver (``maxscore.solvers.exact.global_routing``), by rounds of
successive shortest paths on the expert graph plus a sink node, and its certificate prices.

Every rank runs the same computation on the same gathered [E, E] summaries, so every rank takes
the same decisions; the owner of a move (the lowest rank holding the cheapest token) moves its
token.  Ties: among equal moves, the lowest token index on the lowest rank; paths are searched
depth-first, lowest node first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from maxscore.solvers.collectives import Reducer


def local_moves(scores_NE: torch.Tensor, held_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's cheapest move per edge: (cost [E*E], token [E*E], N where it has none).

    ``cost[e * E + f] = min over tokens t holding e and not f of s[t, e] - s[t, f]``; ties go to
    the lowest token index.
    """
    num_tokens, num_experts = scores_NE.shape
    local_Q = torch.full((num_experts * num_experts,), math.inf, dtype=torch.float64)
    token_Q = torch.full((num_experts * num_experts,), num_tokens, dtype=torch.int64)
    if num_tokens:
        k = int(held_NE[0].sum())
        experts_NK = held_NE.nonzero()[:, 1].view(num_tokens, k)  # row-major: ascending experts
        held_scores_NK = scores_NE.gather(1, experts_NK)
        cost_NKE = held_scores_NK[:, :, None] - scores_NE[:, None, :]
        cost_NKE = cost_NKE.masked_fill(held_NE[:, None, :], math.inf)
        edge_NKE = experts_NK[:, :, None] * num_experts + torch.arange(num_experts)
        local_Q.scatter_reduce_(0, edge_NKE.flatten(), cost_NKE.flatten(), "amin")
        is_min = cost_NKE.flatten() == local_Q[edge_NKE.flatten()]
        tokens = torch.arange(num_tokens).repeat_interleave(k * num_experts)
        candidate = torch.where(is_min & torch.isfinite(cost_NKE.flatten()), tokens, num_tokens)
        token_Q.scatter_reduce_(0, edge_NKE.flatten(), candidate, "amin")
    return local_Q, token_Q


def move_costs(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, reduce: Reducer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global [E, E] cheapest move costs, the lowest rank owning each, and that rank's token.

    One all-gather of every rank's costs and tokens ([2, E*E] float64 each: token indices are
    exact in float64).
    """
    num_experts = scores_NE.shape[1]
    local_Q, token_Q = local_moves(scores_NE, held_NE)
    every_R2Q = reduce.gather(torch.stack([local_Q, token_Q.double()]))
    costs_RQ, tokens_RQ = every_R2Q[:, 0], every_R2Q[:, 1].long()
    global_Q = costs_RQ.min(0).values
    ranks_W1 = torch.arange(costs_RQ.shape[0])[:, None]
    owner_Q = torch.where(costs_RQ == global_Q, ranks_W1, costs_RQ.shape[0]).min(0).values
    token_Q = tokens_RQ.gather(0, owner_Q.clamp(max=costs_RQ.shape[0] - 1)[None])[0]
    shape = (num_experts, num_experts)
    return global_Q.view(shape), owner_Q.view(shape), token_Q.view(shape)


def shortest_paths(cost_EE: torch.Tensor, sources_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def repair(
    scores_NE: torch.Tensor,
    held_NE: torch.Tensor,
    loads_E: torch.Tensor,
    prices_E: torch.Tensor,
    capacity: int,
    units: int,
    reduce: Reducer,
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
        cost_EE, owner_EE, token_EE = move_costs(scores_NE, held_NE, reduce)
        cost_VV = torch.full((num_experts + 1, num_experts + 1), math.inf, dtype=torch.float64)
        cost_VV[:num_experts, :num_experts] = cost_EE
        cost_VV[:num_experts, sink] = torch.where(sent_E < capacity, 0.0, math.inf)
        cost_VV[sink, :num_experts] = torch.where(sent_E > 0, 0.0, math.inf)
        dist_V, _ = shortest_paths(cost_VV, excess_V > 0)
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


def certificate_prices(
    scores_NE: torch.Tensor, held_NE: torch.Tensor, loads_E: torch.Tensor, capacity: int, reduce: Reducer
) -> torch.Tensor:
    """Dual prices: each expert's shortest move distance to an expert with spare capacity."""
    local_Q, _ = local_moves(scores_NE, held_NE)
    cost_EE = reduce(local_Q, dist.ReduceOp.MIN).view(len(loads_E), len(loads_E))
    slack_E = loads_E < capacity
    full = not slack_E.any()  # every expert full: prices are defined up to a common shift
    # distance from e to the sources = distance to e from the sources in the reversed graph
    dist_E, _ = shortest_paths(cost_EE.T, torch.ones_like(slack_E) if full else slack_E)
    return dist_E - dist_E.min() if full else dist_E.clamp(min=0)
