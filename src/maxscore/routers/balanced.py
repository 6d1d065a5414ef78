"""Balanced-assignment routers: BASE and S-BASE.

- ``base`` (Lewis et al., 2021, BASE layers): in training, the balanced linear assignment of
  tokens to experts maximizing the sum of gate logits (BASE: k = 1 by an auction; here any k,
  solved exactly by ``solve(method="exact")`` on the logits per group); at evaluation, greedy
  top-k with no capacity, as in the paper.  Weight: ``sigmoid(logit)`` of the assigned expert.
- ``sbase`` (Clark et al., 2022, S-BASE): in training, Sinkhorn on the gate logits (entropic
  OT with token mass k and expert mass at most the capacity) approximates the balanced
  assignment; each token takes its top-k of the Sinkhorn-normalized logits, and what still
  overflows the capacity is dropped (GShard order).  At evaluation, greedy top-k with no
  capacity.  Weight: the router probability (sigmoid for k = 1, softmax otherwise), as in
  Megatron-Core's Sinkhorn router.  Neither uses a balance loss by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from maxscore._checks import check_int
from maxscore.gates import SCORE_FUNCTIONS
from maxscore.routers.base import GatedRouter, GatedRouterConfig
from maxscore.routers.groups import Groups, Selection, solve_groups
from maxscore.solvers.greedy import drop_overflow
from maxscore.solvers.sinkhorn import sinkhorn_potentials


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseLayersRouterConfig(GatedRouterConfig):
    """Options of ``base``: ``GatedRouterConfig``'s, with sigmoid scores and no balance loss by default."""

    balance_coef: float = 0.0
    score_function: str = "sigmoid"


@dataclass(frozen=True, kw_only=True, slots=True)
class SBaseRouterConfig(GatedRouterConfig):
    """Options of ``sbase``: ``GatedRouterConfig``'s, no balance loss by default, and

    Attributes:
        score_function: also ``"auto"`` (default): sigmoid for k = 1 (as BASE), else softmax.
        iterations: Sinkhorn iterations per forward (>= 1).
    """

    score_functions: ClassVar[tuple[str, ...]] = SCORE_FUNCTIONS + ("auto",)

    balance_coef: float = 0.0
    score_function: str = "auto"
    iterations: int = 10

    def __post_init__(self) -> None:
        GatedRouterConfig.__post_init__(self)
        iterations = self.iterations
        check_int("iterations", iterations)


class BaseLayersRouter(GatedRouter):
    """BASE layers: balanced assignment of the gate logits in training, greedy top-k at eval."""

    config_class = BaseLayersRouterConfig

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        if not self.training:
            return Selection(experts_TK=torch.topk(logits_TE.detach(), self.k, dim=1).indices, dropless=True)
        validate = self.solver_validate(logits_TE.device)
        solved = solve_groups(logits_TE, valid_T, groups, self.k, capacity_G, "exact", validate=validate)
        return Selection.of(solved)


class SBaseRouter(GatedRouter):
    """S-BASE: Sinkhorn-balanced top-k of the gate logits in training, greedy top-k at eval
    (options: ``SBaseRouterConfig``)."""

    config_class = SBaseRouterConfig

    def setup(self) -> None:
        if self.score_function == "auto":
            self.score_function = "sigmoid" if self.k == 1 else "softmax"

    def select(
        self,
        scores_TE: torch.Tensor,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None,
        groups: Groups,
        capacity_G: torch.Tensor,
    ) -> Selection:
        logits_TE = logits_TE.detach()
        if not self.training:
            return Selection(experts_TK=torch.topk(logits_TE, self.k, dim=1).indices, dropless=True)
        shape = (groups.count, groups.size)
        mass_GN = torch.full(shape, float(self.k), device=logits_TE.device)
        if valid_T is not None:
            mass_GN = mass_GN * valid_T.view(shape)
        logits_GNE = logits_TE.view(*shape, self.num_experts)
        col_mass_GE = capacity_G.float()[:, None].expand(-1, self.num_experts)
        g_GE, _ = sinkhorn_potentials(logits_GNE, mass_GN, col_mass_GE, self.config.iterations)
        choices_GNK = torch.topk(logits_GNE + g_GE[:, None, :], self.k, dim=2).indices
        if valid_T is not None:
            choices_GNK = choices_GNK.masked_fill(~valid_T.view(*shape, 1), -1)
        experts_GNK = drop_overflow(choices_GNK, self.num_experts, capacity_G)
        return Selection(experts_TK=experts_GNK.view(-1, self.k))


# the names before the rename: "BaseRouter" read as the base class of all routers
BaseRouter = BaseLayersRouter
BaseRouterConfig = BaseLayersRouterConfig
