"""DeepSeek-V3 routing (DeepSeek-AI, 2024, §2.1.2): sigmoid scores, auxiliary-loss-free bias.

Each token takes the top-k of ``sigmoid(logits) + bias`` (optionally within its best
``top_groups`` of ``num_groups`` expert groups, group score = sum of its two best biased
scores); the combine weights are the unbiased sigmoid scores of the chosen experts,
renormalized and multiplied by ``scaling``.  No capacity: dropless.  After every optimizer
step each expert's bias moves by ``bias_rate`` toward balance: down for an expert whose load
since the last step is above the mean, up for one below it (the released MaxScore code has
this sign reversed; PAPER.md §3).  A small sequence-wise balance loss (``balance_coef``,
default 1e-4) complements it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from maxscore._checks import check_int
from maxscore.routers.base import GatedRouter, GatedRouterConfig
from maxscore.routers.causal import CausalRule
from maxscore.routers.groups import Groups, Selection
from maxscore.routers.losses import load_balancing_loss, router_z_loss


@dataclass(frozen=True, kw_only=True, slots=True)
class DeepSeekV3RouterConfig(GatedRouterConfig):
    """Options of ``deepseek_v3``: ``GatedRouterConfig``'s (sigmoid scores, renormalized weights and
    a balance loss of 1e-4 by default), and

    Attributes:
        bias_rate: bias update speed u (DeepSeek-V3: 0.001).
        scaling: routed scaling factor of the combine weights.
        num_groups, top_groups: group-limited routing (1, 1: off).
    """

    balance_coef: float = 1e-4
    score_function: str = "sigmoid"
    normalize: bool = True
    bias_rate: float = 1e-3
    scaling: float = 1.0
    num_groups: int = 1
    top_groups: int = 1

    def __post_init__(self) -> None:
        GatedRouterConfig.__post_init__(self)
        for name, low, relation in (("bias_rate", 0.0, ">="), ("scaling", 0.0, ">")):
            value = getattr(self, name)
            valid = not isinstance(value, bool) and isinstance(value, (int, float))
            if not valid or not (value >= low if relation == ">=" else value > low):
                raise ValueError(f"{name} must be a number {relation} {low:g}, got {value!r}")
        for name in ("num_groups", "top_groups"):
            check_int(name, getattr(self, name))


class DeepSeekV3Router(GatedRouter):
    """Sigmoid scores + bias-adjusted top-k selection; bias updated after each optimizer step
    (options: ``DeepSeekV3RouterConfig``)."""

    config_class = DeepSeekV3RouterConfig

    def setup(self) -> None:
        num_experts, k = self.num_experts, self.k
        num_groups, top_groups = self.config.num_groups, self.config.top_groups
        if num_experts % num_groups or not 1 <= top_groups <= num_groups:
            raise ValueError(
                f"num_groups={num_groups} must divide num_experts={num_experts}, "
                f"and top_groups={top_groups} must be in [1, num_groups]"
            )
        if top_groups * (num_experts // num_groups) < k:
            raise ValueError(
                f"top_groups={top_groups} groups of {num_experts // num_groups} experts hold fewer than k={k}"
            )
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("pending_loads", torch.zeros(num_experts))

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        experts_TK = self.route_causal(scores_TE.detach())
        if self.training:
            chosen_TK = (
                experts_TK if valid_T is None else experts_TK.masked_fill(~valid_T[:, None], self.num_experts)
            )
            counts = torch.bincount(chosen_TK.flatten(), minlength=self.num_experts + 1)[: self.num_experts]
            self.pending_loads += counts
        return Selection(experts_TK=experts_TK, dropless=True)

    def causal_rule(self) -> CausalRule:
        """Top-k of the biased scores (group-limited): DeepSeek-V3 routes every token alone in
        every mode."""
        return dataclasses.replace(
            GatedRouter.causal_rule(self),
            bias_E=self.bias,
            scaling=self.config.scaling,
            num_groups=self.config.num_groups,
            top_groups=self.config.top_groups,
        )

    def combine_weights(self, scores_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return self.config.scaling * super().combine_weights(scores_TE, experts_TK)

    def auxiliary_losses(
        self, logits_TE, scores_TE, experts_TK, valid_T, groups: Groups
    ) -> dict[str, torch.Tensor]:
        """The complementary sequence-wise balance loss (all k selections, normalized scores)."""
        shape = (groups.count, groups.size)
        normalized_TE = scores_TE / scores_TE.sum(1, keepdim=True)
        balance = load_balancing_loss(
            normalized_TE.view(*shape, -1),
            experts_TK.view(*shape, -1),
            None if valid_T is None else valid_T.view(shape),
        )
        return {"balance": balance, "z": router_z_loss(logits_TE, valid_T)}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """``bias += bias_rate * sign(mean load - load)`` over the loads since the last step."""
        loads_E = self.pending_loads
        self.bias += self.config.bias_rate * torch.sign(loads_E.mean() - loads_E)
        loads_E.zero_()
