"""Routers: MaxScore and every baseline the paper compares against, one registry.

==================  ==========================================================  ===========
name                routing                                                     capacity
==================  ==========================================================  ===========
``maxscore``        exact flow routing per group, renormalized weights          no drops
``maxscore_paper``  the same, with the paper's weights (raw SoftTopk, 4 -> 1)   no drops
``flow_only``       the same flow routing, plain softmax weights (ablation)     no drops
``softtopk_only``   GShard greedy routing + SoftTopk weights (ablation)         drops
``gshard``          top-k greedy, first choices first, renormalized weights     drops
``switch``          top-1 greedy                                                drops
``iterative``       Switch-style rerouting until placed                         no drops
``dropless``        plain top-k                                                 none
``expert_choice``   each expert takes its top-C tokens                          exact loads
``base``            balanced assignment of the gate logits (BASE)               no drops
``sbase``           Sinkhorn-balanced top-k (S-BASE)                            drops
``deepseek_v3``     sigmoid + auxiliary-loss-free bias                          none
``quantile``        top-k of logits - bias, bias set from quantiles (Megatron)  none/drops
==================  ==========================================================  ===========
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from maxscore.routers.balanced import (
    BaseLayersRouter,
    BaseLayersRouterConfig,
    BaseRouter,
    BaseRouterConfig,
    SBaseRouter,
    SBaseRouterConfig,
)
from maxscore.routers.base import GatedRouter, GatedRouterConfig, Router, RouterOutput
from maxscore.routers.checks import check_routing
from maxscore.routers.config import (
    ROUTERS,
    SAVED_DEFAULTS,
    MoEConfig,
    legacy_moe_config,
    registered_router,
    router_config,
    router_name,
    router_options,
)
from maxscore.routers.deepseek import DeepSeekV3Router, DeepSeekV3RouterConfig
from maxscore.routers.expert_choice import ExpertChoiceRouter, ExpertChoiceRouterConfig
from maxscore.routers.maxscore import (
    FlowOnlyRouter,
    FlowOnlyRouterConfig,
    MaxScoreRouter,
    MaxScoreRouterConfig,
    PaperMaxScoreRouter,
    PaperMaxScoreRouterConfig,
)
from maxscore.routers.quantile import QuantileRouter, QuantileRouterConfig
from maxscore.routers.stats import RoutingStats
from maxscore.routers.topk import (
    DroplessRouter,
    GShardRouter,
    GShardRouterConfig,
    IterativeRouter,
    SoftTopkOnlyRouter,
    SoftTopkOnlyRouterConfig,
    SwitchRouter,
)

ROUTERS.update(
    {
        "maxscore": MaxScoreRouter,
        "maxscore_paper": PaperMaxScoreRouter,
        "flow_only": FlowOnlyRouter,
        "softtopk_only": SoftTopkOnlyRouter,
        "gshard": GShardRouter,
        "switch": SwitchRouter,
        "iterative": IterativeRouter,
        "dropless": DroplessRouter,
        "expert_choice": ExpertChoiceRouter,
        "base": BaseLayersRouter,
        "sbase": SBaseRouter,
        "deepseek_v3": DeepSeekV3Router,
        "quantile": QuantileRouter,
    }
)


def make_router(
    name: str,
    dim: int,
    num_experts: int,
    k: int,
    capacity_factor: float = 1.0,
    *,
    config: GatedRouterConfig | Mapping | None = None,
    **options,
) -> GatedRouter:
    """Builds router ``name`` (see ``ROUTERS``) with ``config`` and ``options`` (see
    ``router_config``); unknown names and options are ValueErrors."""
    moe = legacy_moe_config(name, num_experts, k, capacity_factor, config=config, options=options)
    return registered_router(name)(dim, moe)


def step_routers(model: nn.Module) -> None:
    """Advances every router in ``model`` by one optimizer step (schedules, bias updates), after
    raising any bad input a router recorded on the device since the last step (``check_routing``)."""
    check_routing(model)
    for module in model.modules():
        if isinstance(module, Router) and isinstance(module, nn.Module):
            module.after_optimizer_step()


def install_step_hook(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Calls ``step_routers(model)`` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: step_routers(model))


__all__ = [
    "check_routing",
    "ROUTERS",
    "SAVED_DEFAULTS",
    "BaseLayersRouter",
    "BaseLayersRouterConfig",
    "BaseRouter",
    "BaseRouterConfig",
    "DeepSeekV3RouterConfig",
    "ExpertChoiceRouterConfig",
    "FlowOnlyRouterConfig",
    "GShardRouterConfig",
    "GatedRouter",
    "GatedRouterConfig",
    "MoEConfig",
    "MaxScoreRouterConfig",
    "PaperMaxScoreRouterConfig",
    "QuantileRouterConfig",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SBaseRouterConfig",
    "SoftTopkOnlyRouterConfig",
    "install_step_hook",
    "make_router",
    "router_name",
    "router_config",
    "router_options",
    "step_routers",
]
