"""The exact method's dual side, defined once for every engine: the damped best-response price
step (its constants and a reference in plain torch) and the optimality certificate.

Problem: the exact problem of ``maxscore.solvers.exact`` for G groups ([G, N, E] scores,
capacities [G]); its LP dual has one price ``p[e] >= 0`` per expert.

**Price step.**  With ``v = s - p``, token t's threshold for expert e is the price of e at
which t would stop (a holder) or start (another token) wanting it:
``theta[t, e] = s[t, e] - v_(k+1)[t]`` if t holds e in its top-k of ``v``, else
``s[t, e] - v_k[t]``.  Expert e's best response is a price with exactly ``C`` thresholds above
it: the midpoint of the C-th and (C+1)-th largest thresholds (the smallest finite one when
fewer than C + 1 are finite); an expert already at its capacity keeps its price; with slack
capacity (``C E > k x valid tokens``) targets are floored at 0.  Prices then move ``DAMPING``
of the way to the target (Jacobi: all experts at once), except a price whose target is that
floor: it goes to 0 at once (damped, it would only near 0, and every expert left below
capacity at a positive price costs the exact repair a shortest path).  Engines:

- the host core (``_core.c``) runs this step threaded, on a sample of every 4th token while
  the excess is large (``_core.price_step`` runs it once on every token, for tests);
- the device kernel (``kernel_steps.py``) locates each quantile by bisection over the values, with
  the exact midpoint once a value with exactly C thresholds above it is found;
- the collective engine (``global_prices.py``) takes each rank's share of the quantile and
  averages over ranks.

Every engine's step is tested against ``price_step`` here.  Complexity: one top-(k+1) and one
sort over the tokens of [G, N, E] per step.  Ties: lower expert index first in the top-k.

**Certificate** (``certify``): loads <= C; k distinct finite experts per valid token and none
for padding; prices >= 0; and the duality gap ``sum_t topk_k(s[t] - p) + C sum_e p_e - score``
in float64, at most ``GAP_TOLERANCE`` relative.  Fixed shapes and no host synchronization.

References: DESIGN.md, "The exact solver" and "Exact routing on the device"; Bertsekas,
*Network Optimization* (1998), ch. 7 (dual coordinate ascent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DAMPING = 0.8  # fraction of the way to the best response a price moves per step
HOST_PRICE_ITERATIONS = 20  # cap of the host core's steps (they stop once they no longer pay)
DEVICE_PRICE_STEPS = 8  # cap of the device kernel's steps (they stop once the excess is small)
GLOBAL_PRICE_ITERATIONS = 30  # cap of the collective engine's steps
GAP_TOLERANCE = 1e-6  # relative; the gap is 0 up to float64 rounding when the routing is optimal


def top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-k over the last dimension, ties to the lower index.

    Returns (held bool, the same shape; the k + 1 largest values [..., min(k + 1, E)]).  ``topk``
    decides every row whose k-th and (k+1)-th values differ (its set is then unique); the rows
    with a tie at the boundary take a stable sort's order.
    """
    num = values.shape[-1]
    held = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    top = torch.topk(values, min(k + 1, num), dim=-1)
    held.scatter_(-1, top.indices[..., :k], True)
    if k < num:
        tied = top.values[..., k - 1] == top.values[..., k]
        if tied.any():
            rows = values[tied]
            order = torch.sort(rows, dim=-1, descending=True, stable=True).indices[..., :k]
            held[tied] = torch.zeros(rows.shape, dtype=torch.bool, device=values.device).scatter_(
                -1, order, True
            )
    return held, top.values


def thresholds(scores: torch.Tensor, prices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, held) of every token and expert at ``prices``: see the module docstring.

    Args:
        scores: float64 [..., N, E] (``-inf`` for forbidden pairs and for padding rows).
        prices: float64 [..., E].
        k: experts per token, k < E.
    """
    held, top = top_k(scores - prices[..., None, :], k)
    theta = scores - torch.where(held, top[..., k : k + 1], top[..., k - 1 : k])
    return theta.masked_fill(theta.isnan(), -math.inf), held  # rows of -inf: padding


def best_response(
    theta: torch.Tensor,
    loads: torch.Tensor,
    capacity: torch.Tensor,
    prices: torch.Tensor,
    slack: torch.Tensor,
) -> torch.Tensor:
    """Each expert's target price: ``theta`` [G, N, E] float64, loads [G, E], capacity [G],
    prices [G, E], slack bool [G]."""
    num_tokens = theta.shape[1]
    ranked = torch.sort(theta, dim=1, descending=True).values
    finite = (ranked > -math.inf).sum(1)  # [G, E]
    cap = capacity[:, None].expand_as(finite)
    last = (finite - 1).clamp(min=0)
    hi = ranked.gather(1, torch.minimum(cap - 1, last).clamp(0, num_tokens - 1)[:, None]).squeeze(1)
    lo = ranked.gather(1, cap.clamp(max=num_tokens - 1)[:, None]).squeeze(1)
    lo = torch.where(cap < finite, lo, -math.inf)
    both = torch.isfinite(lo) & torch.isfinite(hi)
    target = torch.where(both, 0.5 * (hi + lo), torch.where(torch.isfinite(hi), hi, lo))
    target = torch.where(slack[:, None], target.clamp(min=0), target)
    keep = (loads == cap) | (finite == 0) | (cap == 0) | ~torch.isfinite(target)
    return torch.where(keep, prices, target)


def price_step(
    scores: torch.Tensor, k: int, capacity: torch.Tensor, prices: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """One damped best-response step of every group (the reference of every engine's step).

    Args:
        scores: float [G, N, E]; ``-inf`` forbids a pair.
        k: experts per token.
        capacity: int64 [G].
        prices: float [G, E].
        valid: bool [G, N] or None.

    Returns:
        float64 [G, E] prices after the step.
    """
    s = scores.double()
    p = prices.double()
    if k >= s.shape[-1]:
        return p
    if valid is not None:
        s = s.masked_fill(~valid[..., None], -math.inf)
    theta, held = thresholds(s, p, k)
    if valid is not None:
        held = held & valid[..., None]
    loads = held.sum(1)
    num_valid = s.shape[1] if valid is None else valid.sum(1)
    slack = capacity * s.shape[-1] > k * num_valid
    target = best_response(theta, loads, capacity, p, slack)
    return torch.where(slack[:, None] & (target <= 0), 0.0, p + DAMPING * (target - p))


def expert_loads(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [G, E]: the slots each expert holds in experts [G, N, K] (-1 slots ignored)."""
    loads = torch.zeros(experts.shape[0], num_experts + 1, dtype=torch.int64, device=experts.device)
    slots = (experts % (num_experts + 1)).flatten(1)  # -1 lands in the extra column
    return loads.scatter_add_(1, slots, torch.ones_like(slots))[:, :num_experts]


@dataclass(frozen=True, slots=True)
class Certificate:
    """What ``certify`` found of G groups (all on the scores' device)."""

    loads: torch.Tensor  # int64 [G, E]
    score: torch.Tensor  # float64 [G]
    gap: torch.Tensor  # float64 [G]
    converged: torch.Tensor  # bool [G]: feasible and gap within GAP_TOLERANCE


def certify(
    scores: torch.Tensor,
    experts: torch.Tensor,
    prices: torch.Tensor,
    capacity: torch.Tensor,
    valid: torch.Tensor | None,
) -> Certificate:
    """Checks a routing of G groups against its prices (see the module docstring).

    Args:
        scores: float [G, N, E] (any float dtype; summed in float64).
        experts: int64 [G, N, K], -1 for no expert.
        prices: float [G, E].
        capacity: int64 [G].
        valid: bool [G, N] or None.
    """
    num_groups, num_tokens, num_experts = scores.shape
    k = experts.shape[-1]
    s = scores.double()
    p = prices.double()
    mask = torch.ones(num_groups, num_tokens, dtype=torch.bool, device=s.device) if valid is None else valid
    slot = experts >= 0
    index = experts.clamp(min=0)
    loads = expert_loads(experts, num_experts)
    picked = torch.where(slot, s.gather(-1, index), 0.0)
    score = picked.sum((1, 2))
    best = torch.topk(s - p[:, None, :], k, dim=-1).values.sum(-1)
    dual = torch.where(mask, best, 0.0).sum(1) + (capacity[:, None] * p).sum(1)
    gap = dual - score
    held = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, index, slot)
    filled = torch.where(mask, slot.all(-1) & (held.sum(-1) == k), ~slot.any(-1))
    feasible = (
        (loads <= capacity[:, None]).all(1)
        & filled.all(1)
        & torch.isfinite(picked).all((1, 2))
        & (p >= 0).all(1)
    )
    converged = feasible & (gap.abs() <= GAP_TOLERANCE * score.abs().clamp(min=1.0))
    return Certificate(loads, score, gap, converged)
