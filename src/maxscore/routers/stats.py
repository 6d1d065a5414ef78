"""Routing statistics, computed on the device in every forward (a few [T, K] ops, no host sync).

Fields are tensors; the properties and ``as_dict`` read them on the host (one sync) for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingStats:
    """What one router call did.

    Attributes:
        loads: int64 [E] tokens routed to each expert.
        capacity_G: int64 [G] tokens per expert in each routing group (the nominal capacity,
            also reported for dropless routers, which do not enforce it).
        dropped_by_rank: float [K] fraction of valid tokens whose i-th choice was dropped.
        affinity_by_rank: float [K] mean router score of each token's i-th best assigned
            expert (NaN where no token has an i-th expert).
        entropy: float [] mean entropy of the router's softmax distribution over valid tokens.
        solver_gap: duality gap of the exact solver summed over groups (a float or a scalar
            tensor on the device), or None.
        solver_ms: host time spent in the solver call, or None.
        solver_fallbacks: groups the device engine handed to the host solver (an int or a
            scalar tensor), or None where no exact solve ran.
        scores_TE, experts_TK, valid_T, group_size: the routing itself (references, no copies),
            kept for ``optimality``; None where not recorded.
    """

    loads: torch.Tensor
    capacity_G: torch.Tensor
    dropped_by_rank: torch.Tensor
    affinity_by_rank: torch.Tensor
    entropy: torch.Tensor
    solver_gap: float | torch.Tensor | None = None
    solver_ms: float | None = None
    solver_fallbacks: int | torch.Tensor | None = None
    scores_TE: torch.Tensor | None = None
    experts_TK: torch.Tensor | None = None
    valid_T: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def capacity(self) -> int:
        """Tokens per expert over the whole batch (sum over routing groups). Host-side."""
        return int(self.capacity_G.sum())

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the valid tokens' k choices that were dropped. Host-side."""
        return float(self.dropped_by_rank.mean())

    def load_ratio(self) -> torch.Tensor:
        """float [E]: load / capacity per expert."""
        return self.loads.float() / self.capacity_G.sum().clamp(min=1)

    def as_dict(self) -> dict[str, float | list[float] | None]:
        """Plain numbers for a logger: drops, load ratios (mean, min, max, sorted), affinities."""
        ratio_E = self.load_ratio()
        dropped_K = self.dropped_by_rank.tolist()
        return {
            "dropped_fraction": sum(dropped_K) / len(dropped_K),
            "dropped_first": dropped_K[0],
            "dropped_later": sum(dropped_K[1:]) / max(1, len(dropped_K) - 1),
            "load_ratio_mean": float(ratio_E.mean()),
            "load_ratio_min": float(ratio_E.min()),
            "load_ratio_max": float(ratio_E.max()),
            "load_ratio_sorted": sorted(ratio_E.tolist(), reverse=True),
            "affinity_by_rank": self.affinity_by_rank.tolist(),
            "entropy": float(self.entropy),
            "solver_gap": None if self.solver_gap is None else float(self.solver_gap),
            "solver_ms": self.solver_ms,
            "solver_fallbacks": None if self.solver_fallbacks is None else int(self.solver_fallbacks),
        }


def routing_stats(
    *,
    logits_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    valid_T: torch.Tensor | None,
    capacity_G: torch.Tensor,
    k: int,
    loads_E: torch.Tensor | None = None,
    solver_gap: float | torch.Tensor | None = None,
    solver_ms: float | None = None,
    solver_fallbacks: int | torch.Tensor | None = None,
    group_size: int | None = None,
) -> RoutingStats:
    """Statistics of one routing; ``experts_TK`` holds each token's choices in preference order.
    ``loads_E`` replaces the loads counted from ``experts_TK`` (global routing: over all ranks);
    ``group_size``: tokens per routing group, recorded with the routing for ``optimality``."""
    with torch.no_grad():
        num_experts = scores_TE.shape[1]
        valid_T = (
            torch.ones(scores_TE.shape[0], dtype=torch.bool, device=scores_TE.device)
            if valid_T is None
            else valid_T
        )
        weight_T = valid_T.float()
        num_valid = weight_T.sum().clamp(min=1)
        assigned_TK = (experts_TK >= 0) & valid_T[:, None]
        if loads_E is None:
            loads_E = torch.zeros(num_experts, dtype=torch.int64, device=scores_TE.device)
            loads_E.scatter_add_(0, experts_TK.clamp(min=0).flatten(), assigned_TK.flatten().long())
        dropped_K = ((~assigned_TK[:, :k]) * weight_T[:, None]).sum(0) / num_valid
        picked_TK = scores_TE.gather(1, experts_TK.clamp(min=0)).masked_fill(~assigned_TK, -torch.inf)
        ranked_TK = picked_TK.sort(1, descending=True).values[:, :k]
        present_TK = torch.isfinite(ranked_TK)
        affinity_K = ranked_TK.where(present_TK, 0.0).sum(0) / present_TK.sum(0)
        log_probs_TE = torch.log_softmax(logits_TE.float(), dim=1)
        entropy_T = -(log_probs_TE.exp() * log_probs_TE).sum(1)
        entropy = (entropy_T * weight_T).sum() / num_valid
    return RoutingStats(
        loads=loads_E,
        capacity_G=capacity_G,
        dropped_by_rank=dropped_K,
        affinity_by_rank=affinity_K,
        entropy=entropy,
        solver_gap=solver_gap,
        solver_ms=solver_ms,
        solver_fallbacks=solver_fallbacks,
        scores_TE=scores_TE.detach(),
        experts_TK=experts_TK,
        valid_T=valid_T,
        group_size=group_size,
    )


def optimality(stats: RoutingStats) -> dict[str, float]:
    """How far a routing is from the exact optimum of the same routing groups at capacity
    factor 1 (host-side: one exact solve, for logging steps only).

    Returns:
        opt_gap: ``(OPT - score) / |OPT|``, score the total router score of the assigned pairs;
            negative when the routing overloads experts (it then beats every routing within
            capacity; read it beside ``over_capacity``).
        load_max_over_mean: the largest expert load over the mean load (batch).
        over_capacity: the share of the valid tokens' k slots above capacity factor 1's capacity
            of their group and expert.
    """
    from maxscore.solvers import group_capacity, solve  # solvers sit below routers

    scores_TE, experts_TK, size = stats.scores_TE, stats.experts_TK, stats.group_size
    if scores_TE is None or experts_TK is None or size is None:
        raise ValueError("these statistics carry no routing (scores, experts, group size) to compare")
    num_tokens, num_experts = scores_TE.shape
    k = experts_TK.shape[1]
    scores_GNE = scores_TE.detach().double().cpu().view(-1, size, num_experts)
    experts_GNK = experts_TK.cpu().view(-1, size, k)
    valid_GN = None if stats.valid_T is None else stats.valid_T.cpu().view(-1, size)
    optimum = solve(scores_GNE, k, capacity_factor=1.0, valid=valid_GN, engine="host")
    assigned_GNK = experts_GNK >= 0
    if valid_GN is not None:
        assigned_GNK &= valid_GN[..., None]
    picked_GNK = scores_GNE.gather(2, experts_GNK.clamp(min=0))
    score = float((picked_GNK * assigned_GNK).sum())
    best = float(optimum.score.sum())
    loads_GE = torch.zeros(scores_GNE.shape[0], num_experts + 1, dtype=torch.int64)
    slots_GS = experts_GNK.masked_fill(~assigned_GNK, num_experts).flatten(1)  # none: a sentinel
    loads_GE.scatter_add_(1, slots_GS, torch.ones_like(slots_GS))
    loads_GE = loads_GE[:, :num_experts]
    counts_G = torch.full((scores_GNE.shape[0],), size) if valid_GN is None else valid_GN.sum(1)
    capacity_G = group_capacity(counts_G, num_experts, k, 1.0)
    over = (loads_GE - capacity_G[:, None]).clamp(min=0).sum()
    loads_E = loads_GE.sum(0).double()
    return {
        "opt_gap": (best - score) / max(abs(best), 1e-30),
        "load_max_over_mean": float(loads_E.max() / loads_E.mean().clamp(min=1e-30)),
        "over_capacity": float(over) / max(1, int(counts_G.sum()) * k),
    }
