"""Moving tokens to experts and back: a static capacity path and a grouped (dropless) path.

Capacity path: each assigned (token, choice) gets a slot in its expert's buffer, in token
order; the buffer [E, C, D] has a static shape, dropped choices point at a spare row that is
discarded, so there is no host sync.  Grouped path: the (token, choice) pairs sorted by expert
and split by the per-expert counts (one host sync for the counts).
"""

from __future__ import annotations

import torch


def capacity_slots(experts_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """int64 [T, K]: row ``e * capacity + position`` of each assigned choice, ``E * capacity`` if none.

    Positions count an expert's assigned choices in token order; the router guarantees fewer
    than ``capacity`` per expert.
    """
    assigned_TK = experts_TK >= 0
    mask_TE = torch.zeros(experts_TK.shape[0], num_experts + 1, dtype=torch.int64, device=experts_TK.device)
    mask_TE.scatter_(
        1, torch.where(assigned_TK, experts_TK, num_experts), 1
    )  # a token's experts are distinct
    position_TE = torch.cumsum(mask_TE[:, :num_experts], dim=0) - 1
    position_TK = position_TE.gather(1, experts_TK.clamp(min=0))
    return torch.where(assigned_TK, experts_TK * capacity + position_TK, num_experts * capacity)


def dispatch(x_TD: torch.Tensor, slots_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[T, D] -> [E, C, D] buffer (zeros in unused slots)."""
    k = slots_TK.shape[1]
    buffer = x_TD.new_zeros(num_experts * capacity + 1, x_TD.shape[1])
    buffer = buffer.index_copy(0, slots_TK.flatten(), x_TD.repeat_interleave(k, dim=0))
    return buffer[:-1].view(num_experts, capacity, -1)


def combine(y_ECD: torch.Tensor, slots_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: [E, C, D] -> [T, D] (empty slots give 0)."""
    y_flat = torch.cat([y_ECD.flatten(0, 1), y_ECD.new_zeros(1, y_ECD.shape[2])])
    return torch.einsum("tkd,tk->td", y_flat[slots_TK], weights_TK.to(y_ECD.dtype))


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
