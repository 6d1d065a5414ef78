"""Moving tokens to experts and back: a static capacity path and a grouped (dropless) path.

Capacity path: each assigned (token, choice) gets a slot in its expert's buffer, in token
order; the slot table (token and weight of every slot) drives a gather into the static
[E, C, D] buffer and an ``index_add`` back, so the cost is O(E C D) whatever K, and empty or
dropped slots point at a spare row that is discarded: no host sync.  Grouped path: the
(token, choice) pairs sorted by expert and split by the per-expert counts (one host sync for
the counts).
"""

from __future__ import annotations

import torch

from maxscore.moe.experts import SwiGLUExperts
from maxscore.routers import RouterOutput


def capacity_slots(experts_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """int64 [T, K]: row ``e * capacity + position`` of each assigned choice, ``E * capacity`` if none.

    Positions count an expert's assigned choices in token order; the router guarantees at most
    ``capacity`` per expert, except in a group whose bad input it records for its check point
    (``maxscore.routers.checks``): choices past the capacity are dropped (no out-of-range slot).
    """
    assigned_TK = experts_TK >= 0
    mask_TE = torch.zeros(experts_TK.shape[0], num_experts + 1, dtype=torch.int64, device=experts_TK.device)
    mask_TE.scatter_(
        1, torch.where(assigned_TK, experts_TK, num_experts), 1
    )  # a token's experts are distinct
    position_TE = torch.cumsum(mask_TE[:, :num_experts], dim=0) - 1
    position_TK = position_TE.gather(1, experts_TK.clamp(min=0))
    kept_TK = assigned_TK & (position_TK < capacity)
    return torch.where(kept_TK, experts_TK * capacity + position_TK, num_experts * capacity)


def slot_table(
    slots_TK: torch.Tensor, weights_TK: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverts ``capacity_slots``: the token (T for an empty slot) and weight of every slot.

    Returns (token [S] int64, weight [S] differentiable), S = ``num_slots`` = E x C.
    """
    num_tokens, k = slots_TK.shape
    tokens_P = torch.arange(num_tokens, device=slots_TK.device).repeat_interleave(k)
    token_S = torch.full((num_slots + 1,), num_tokens, dtype=torch.int64, device=slots_TK.device)
    token_S = token_S.scatter(0, slots_TK.flatten(), tokens_P)
    weight_S = weights_TK.new_zeros(num_slots + 1).scatter(0, slots_TK.flatten(), weights_TK.flatten())
    return token_S[:num_slots], weight_S[:num_slots]  # the spare slot (dropped choices) goes


def dispatch(x_TD: torch.Tensor, token_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, D] -> [E, C, D] buffer (zeros in empty slots); O(E C D), whatever K."""
    x_padded = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    return x_padded[token_S].view(num_experts, -1, x_TD.shape[1])


def combine(
    y_ECD: torch.Tensor, token_S: torch.Tensor, weight_S: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: [E, C, D] -> [T, D] (empty slots give 0)."""
    y_SD = y_ECD.flatten(0, 1) * weight_S.to(y_ECD.dtype)[:, None]
    out = y_SD.new_zeros(num_tokens + 1, y_SD.shape[1]).index_add(0, token_S, y_SD)
    return out[:num_tokens]


def sort_by_expert(
    experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The assigned (token, choice) pairs grouped by expert.

    Returns (flat pair index ``t * K + k`` [P] sorted by expert, token index [P], counts per expert).
    Host-side: the counts are read to split the rows.
    """
    flat_P = experts_TK.flatten()
    pairs_P = (flat_P >= 0).nonzero().flatten()
    order = torch.argsort(flat_P[pairs_P], stable=True)
    pairs_P = pairs_P[order]
    counts = torch.bincount(flat_P[pairs_P], minlength=num_experts).tolist()
    return pairs_P, pairs_P // experts_TK.shape[1], counts


def pair_weights(routing: RouterOutput, pairs_P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float [P, 1]: the combine weight of each (token, choice) pair."""
    return routing.weights.flatten()[pairs_P].to(dtype)[:, None]


class LocalDispatcher:
    """Runs the routed tokens through experts held in this process (every expert)."""

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> torch.Tensor:
        """[T, D] -> [T, D]: capacity path when ``routing.capacity`` is set, else grouped."""
        num_experts = experts.num_experts
        if routing.capacity is not None:
            slots_TK = capacity_slots(routing.experts, num_experts, routing.capacity)
            token_S, weight_S = slot_table(slots_TK, routing.weights, num_experts * routing.capacity)
            y_ECD = experts(dispatch(x_TD, token_S, num_experts))
            return combine(y_ECD, token_S, weight_S, x_TD.shape[0])
        pairs_P, tokens_P, counts = sort_by_expert(routing.experts, num_experts)
        y_PD = experts.forward_grouped(x_TD[tokens_P], counts)
        weighted_PD = y_PD * pair_weights(routing, pairs_P, y_PD.dtype)
        return x_TD.new_zeros(x_TD.shape).index_add(0, tokens_P, weighted_PD.to(x_TD.dtype))
