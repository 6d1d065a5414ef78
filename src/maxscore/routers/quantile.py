"""Quantile balancing: top-k of ``logits - beta`` with a per-expert bias set from quantiles.

The balancing of Megatron-Core (``moe_router_load_balancing_type="quantile_balancing"``, 0.17
and later; torchtitan and TransformerEngine implement the same update).  Each token takes the
top-k of its gate logits minus a per-expert bias beta, with no capacity (dropless); the combine
weights are the score function's probabilities of the chosen experts, renormalized.

The update is one step of dual coordinate descent on the balanced-assignment LP that MaxScore
solves exactly; beta plays the role of MaxScore's prices.  In training every forward (a
micro-batch) computes, over its valid tokens,

- ``a_t``: token t's (k+1)-th largest value of ``logits - beta``;
- ``q_e``: the (C+1)-th largest of ``logits[t, e] - a_t``, with ``C = ceil(k * N / E)``
  (``expert_capacity(N, E, k, 1.0)``; N valid tokens): the bias under which expert e would
  take C of these tokens if no other bias moved.

After each optimizer step, with ``q_mean`` the mean of q over the step's micro-batches (and over
the ranks of the default process group when one is initialized, as data-parallel replicas):
``beta <- ema * beta + (1 - ema) * q_mean``, then beta is re-centred to mean 0.  Beta is a
buffer (saved with the model) and is used unchanged in evaluation and generation.

The routing depends on the logits only through per-token shifts (top-k and ``a_t`` are
invariant to adding a constant to a token's logits), so the router works on the log of its
scores: ``log softmax`` for softmax scores, the logits themselves for sigmoid scores.  Training,
evaluation and causal mode (each token alone) then route identically.

With ``drop=True`` the router keeps static shapes: per routing group, an expert's slots beyond
the capacity (``capacity_factor`` as every router) are dropped, lowest probability first (ties:
later slot first).

References: Megatron-Core MoE documentation, "Quantile balancing"; NVIDIA Megatron-LM 0.17
release notes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from maxscore._distributed import initialized, world_size
from maxscore.routers.base import GatedRouter, GatedRouterConfig
from maxscore.routers.causal import CausalRule, log_scores
from maxscore.routers.groups import Groups, Selection


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantileRouterConfig(GatedRouterConfig):
    """Options of ``quantile``: ``GatedRouterConfig``'s (renormalized weights, no balance loss by
    default: the bias replaces it), and

    Attributes:
        ema: weight of the old bias in the update, in [0, 1) (Megatron-Core: 0).
        drop: enforce the capacity per routing group, dropping the lowest-probability slots
            (static shapes); False: dropless.
    """

    balance_coef: float = 0.0
    normalize: bool = True
    ema: float = 0.0
    drop: bool = False

    def __post_init__(self) -> None:
        GatedRouterConfig.__post_init__(self)
        ema = self.ema
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
            raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
        if not isinstance(self.drop, bool):
            raise ValueError(f"drop must be true or false, got {self.drop!r}")

    def label(self, router: str) -> str:
        return f"{router}:drop=true" if self.drop else router


def bias_quantiles(values_TE: torch.Tensor, bias_E: torch.Tensor, k: int, valid_T=None) -> torch.Tensor:
    """The quantile q [E] of one micro-batch (module docstring), on the device with no host sync.

    Args:
        values_TE: float [T, E] routing values (logits, or their log-softmax).
        bias_E: float [E] the current bias beta.
        k: experts per token.
        valid_T: bool [T] or None; padding takes no part.
    """
    num_experts = values_TE.shape[1]
    values_TE = values_TE.detach().float()
    if k >= num_experts:  # every token takes every expert: nothing to balance
        return torch.zeros_like(bias_E)
    threshold_T = torch.topk(values_TE - bias_E, k + 1, dim=1).values[:, k]
    return expert_quantiles(values_TE - threshold_T[:, None], k, valid_T)


def expert_quantiles(
    margins_TE: torch.Tensor, k: int, valid_T=None, *, midpoint: bool = False
) -> torch.Tensor:
    """Per expert, the (C+1)-th largest of its tokens' margins, ``C = ceil(k * N / E)`` over the N
    valid tokens: a bias above it leaves the expert at most C tokens that prefer it by more.

    Args:
        margins_TE: float [T, E]; padding rows are ignored (``valid_T`` False).
        k: experts per token.
        valid_T: bool [T] or None.
        midpoint: the midpoint of the C-th and (C+1)-th largest instead, a bias at which
            exactly C tokens prefer the expert by more, whatever the rounding (the (C+1)-th token
            sits at the bias itself).

    On the device with no host sync: a selection when the count is known on the host, else the
    largest ``ceil(k * T / E) + 1`` (C at most that, T counting padding) and an index: 4-6x
    less than a sort of the column at the training shapes (T 2048-8192, E 16-128).
    """
    num_tokens, num_experts = margins_TE.shape
    most = -(-num_tokens * k // num_experts)  # = expert_capacity(T, E, k, 1.0): C at most this
    if valid_T is None:
        # the (C+1)-th largest is the (N - C)-th smallest (the smallest when C >= N), C = most
        below = torch.kthvalue(margins_TE, max(1, num_tokens - most), dim=0).values
        if not midpoint:
            return below
        return (below + torch.kthvalue(margins_TE, min(num_tokens, num_tokens - most + 1), dim=0).values) / 2
    margins_TE = margins_TE.masked_fill(~valid_T[:, None], -torch.inf)
    count = valid_T.sum()
    capacity = (count * k + num_experts - 1) // num_experts
    index = torch.minimum(capacity, (count - 1).clamp(min=0))
    largest = min(most + 1, num_tokens)
    ordered_TE = torch.topk(margins_TE, largest, dim=0).values
    below = ordered_TE.index_select(0, index.view(1))[0]
    if not midpoint:
        return below
    return (below + ordered_TE.index_select(0, (index - 1).clamp(min=0).view(1))[0]) / 2


def drop_lowest(experts_TK: torch.Tensor, probs_TK: torch.Tensor, groups: Groups, capacity_G, num_experts):
    """Each group's slots beyond an expert's capacity set to -1, lowest probability first.

    Args:
        experts_TK: int64 [T, K] chosen experts, -1 for none.
        probs_TK: float [T, K] the slots' probabilities.
        capacity_G: int64 [G] slots per expert in each group.
    """
    count, size, k = groups.count, groups.size, experts_TK.shape[1]
    experts_GS = experts_TK.reshape(count, size * k)
    expert_GS = experts_GS.masked_fill(experts_GS < 0, num_experts)  # none: a sentinel expert
    # order by probability (descending), then stably by expert: each expert's slots best first
    by_prob_GS = torch.sort(probs_TK.reshape(count, -1), dim=1, descending=True, stable=True).indices
    by_expert_GS = torch.sort(expert_GS.gather(1, by_prob_GS), dim=1, stable=True).indices
    order_GS = by_prob_GS.gather(1, by_expert_GS)
    sorted_GS = expert_GS.gather(1, order_GS)
    counts_GE = torch.zeros(count, num_experts + 1, dtype=torch.int64, device=experts_TK.device)
    counts_GE.scatter_add_(1, expert_GS, torch.ones_like(expert_GS))
    starts_GE = torch.cumsum(counts_GE, dim=1) - counts_GE
    position_GS = torch.arange(size * k, device=experts_TK.device) - starts_GE.gather(1, sorted_GS)
    keep_sorted_GS = (position_GS < capacity_G[:, None]) & (sorted_GS < num_experts)
    keep_GS = torch.zeros_like(keep_sorted_GS).scatter_(1, order_GS, keep_sorted_GS)
    return experts_GS.masked_fill(~keep_GS, -1).view(-1, k)


class QuantileRouter(GatedRouter):
    """Quantile balancing (options: ``QuantileRouterConfig``; see the module docstring)."""

    config_class = QuantileRouterConfig

    def setup(self) -> None:
        self.register_buffer("bias", torch.zeros(self.num_experts))
        self.register_buffer("pending_quantiles", torch.zeros(self.num_experts), persistent=False)
        self.register_buffer("pending_batches", torch.zeros(()), persistent=False)

    def causal_rule(self) -> CausalRule:
        """Each token alone: the top-k of ``log scores - bias`` (module docstring), no capacity."""
        return dataclasses.replace(GatedRouter.causal_rule(self), values="log_scores", bias_E=-self.bias)

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        values_TE = log_scores(scores_TE, self.score_function)
        experts_TK = torch.topk(values_TE + (-self.bias), self.k, dim=1).indices
        if self.training:
            quantiles_E = bias_quantiles(values_TE, self.bias, self.k, valid_T)
            if valid_T is None:
                self.pending_batches += 1
            else:  # a micro-batch of padding only has no quantiles (-inf): it counts nowhere
                any_valid = valid_T.any()
                quantiles_E = torch.where(any_valid, quantiles_E, 0.0)
                self.pending_batches += any_valid.to(self.pending_batches.dtype)
            self.pending_quantiles += quantiles_E
        if not self.config.drop:
            return Selection(experts_TK=experts_TK, dropless=True)
        if valid_T is not None:
            experts_TK = experts_TK.masked_fill(~valid_T[:, None], -1)
        probs_TK = scores_TE.detach().gather(1, experts_TK.clamp(min=0))
        return Selection(experts_TK=drop_lowest(experts_TK, probs_TK, groups, capacity_G, self.num_experts))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """``beta <- ema * beta + (1 - ema) * mean q``, re-centred to mean 0 (no forward: unchanged)."""
        pending = torch.cat([self.pending_quantiles, self.pending_batches.view(1)])
        if initialized() and world_size() > 1:
            torch.distributed.all_reduce(pending)
        batches = pending[-1]
        mean_E = pending[:-1] / batches.clamp(min=1)
        ema = self.config.ema
        updated_E = ema * self.bias + (1 - ema) * mean_E
        updated_E = updated_E - updated_E.mean()
        self.bias.copy_(torch.where(batches > 0, updated_E, self.bias))
        self.pending_quantiles.zero_()
        self.pending_batches.zero_()
