"""Top-k routers of the GShard family: greedy with capacity, rerouting, and dropless.

All run on the device with no host sync except ``iterative`` (its rerouting runs on the host).

- ``gshard`` (Lepikhin et al., 2021): top-k, first choices fill the experts before second
  choices, token order within a rank, overflow dropped; weights renormalized over the k.
- ``switch`` (Fedus et al., 2022): top-1 with capacity, overflow dropped; weight = probability.
- ``softtopk_only`` (ablation): GShard's greedy routing with SoftTopk weights.
- ``iterative``: Switch-style rerouting, overflowing choices retry their next-best experts
  until placed (never drops when feasible); weights renormalized.
- ``dropless`` (MegaBlocks, Gale et al., 2023): plain top-k, no capacity; weights renormalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maxscore.gates import TemperatureScheduleConfig, schedule_config
from maxscore.routers.base import GatedRouter, GatedRouterConfig
from maxscore.routers.groups import Groups, Selection, solve_groups
from maxscore.solvers.greedy import drop_overflow


def greedy_select(
    scores_TE: torch.Tensor, valid_T: torch.Tensor | None, groups: Groups, k: int, capacity_G: torch.Tensor
) -> torch.Tensor:
    """Top-k choices with overflow dropped, group by group (GShard's dispatch), on the device."""
    choices_TK = torch.topk(scores_TE.detach(), k, dim=1).indices
    if valid_T is not None:
        choices_TK = choices_TK.masked_fill(~valid_T[:, None], -1)
    choices_GNK = choices_TK.view(groups.count, groups.size, k)
    return drop_overflow(choices_GNK, scores_TE.shape[1], capacity_G).view(-1, k)


@dataclass(frozen=True, kw_only=True, slots=True)
class GShardRouterConfig(GatedRouterConfig):
    """Options of ``gshard``, ``iterative`` and ``dropless``: ``GatedRouterConfig``'s, with the
    combine weights renormalized over the k by default."""

    normalize: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class SoftTopkOnlyRouterConfig(GatedRouterConfig):
    """Options of ``softtopk_only``: ``GatedRouterConfig``'s and ``schedule``, the SoftTopk
    temperature schedule (a config or its fields as a dict; default linear 4 -> 1 over the run)."""

    schedule: TemperatureScheduleConfig = TemperatureScheduleConfig()

    @property
    def scheduled(self) -> bool:
        return True

    def __post_init__(self) -> None:
        GatedRouterConfig.__post_init__(self)
        object.__setattr__(self, "schedule", schedule_config(self.schedule))


class GShardRouter(GatedRouter):
    """GShard: top-k greedy with capacity, overflow dropped, weights renormalized over the k."""

    config_class = GShardRouterConfig

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        return Selection(experts_TK=greedy_select(scores_TE, valid_T, groups, self.k, capacity_G))


class SwitchRouter(GShardRouter):
    """Switch Transformer: top-1 with capacity, overflow dropped, weight = router probability."""

    config_class = GatedRouterConfig

    def setup(self) -> None:
        if self.k != 1:
            raise ValueError(
                f"router='switch' routes each token to 1 expert, got k={self.k}; use k=1 or router='gshard'"
            )


class SoftTopkOnlyRouter(GShardRouter):
    """Ablation "SoftTopk only": GShard's greedy routing with SoftTopk weights (no renormalization;
    options: ``SoftTopkOnlyRouterConfig``)."""

    config_class = SoftTopkOnlyRouterConfig


class IterativeRouter(GatedRouter):
    """Switch-style iterative rerouting (``solve(method="iterative")`` per group), no drops."""

    config_class = GShardRouterConfig

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        return Selection.of(solve_groups(scores_TE, valid_T, groups, self.k, capacity_G, "iterative"))


class DroplessRouter(GatedRouter):
    """Dropless top-k: no capacity, weights renormalized over the k."""

    config_class = GShardRouterConfig

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        return Selection(experts_TK=torch.topk(scores_TE.detach(), self.k, dim=1).indices, dropless=True)
