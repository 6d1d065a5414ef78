"""Routers: MaxScore and every baseline the paper compares against, one registry.

==================  ==========================================================  ===========
name                routing                                                     capacity
==================  ==========================================================  ===========
``maxscore``        exact flow routing per group + SoftTopk weights             no drops
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
==================  ==========================================================  ===========
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from maxscore.routers.balanced import BaseRouter, SBaseRouter
from maxscore.routers.base import GatedRouter, Router, RouterOutput
from maxscore.routers.deepseek import DeepSeekV3Router
from maxscore.routers.expert_choice import ExpertChoiceRouter
from maxscore.routers.maxscore import FlowOnlyRouter, MaxScoreRouter
from maxscore.routers.stats import RoutingStats
from maxscore.routers.topk import (
    DroplessRouter,
    GShardRouter,
    IterativeRouter,
    SoftTopkOnlyRouter,
    SwitchRouter,
)

ROUTERS: dict[str, type[GatedRouter]] = {
    "maxscore": MaxScoreRouter,
    "flow_only": FlowOnlyRouter,
    "softtopk_only": SoftTopkOnlyRouter,
    "gshard": GShardRouter,
    "switch": SwitchRouter,
    "iterative": IterativeRouter,
    "dropless": DroplessRouter,
    "expert_choice": ExpertChoiceRouter,
    "base": BaseRouter,
    "sbase": SBaseRouter,
    "deepseek_v3": DeepSeekV3Router,
}


def router_options(name: str) -> tuple[str, ...]:
    """Keyword options accepted by router ``name`` (its own and ``GatedRouter``'s)."""
    names: list[str] = []
    for cls in ROUTERS[name].__mro__:
        if cls in (nn.Module, object) or "__init__" not in vars(cls):
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    return tuple(names)


def make_router(
    name: str, dim: int, num_experts: int, k: int, capacity_factor: float = 1.0, **options
) -> GatedRouter:
    """Builds router ``name`` (see ``ROUTERS``); unknown names and options are ValueErrors."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    unknown = sorted(set(options) - set(router_options(name)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for router={name!r}; it accepts {list(router_options(name))}"
        )
    return ROUTERS[name](dim, num_experts, k, capacity_factor, **options)


def step_routers(model: nn.Module) -> None:
    """Advances every router in ``model`` by one optimizer step (schedules, bias updates)."""
    for module in model.modules():
        if isinstance(module, Router) and isinstance(module, nn.Module):
            module.after_optimizer_step()


def install_step_hook(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Calls ``step_routers(model)`` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: step_routers(model))


__all__ = [
    "ROUTERS",
    "GatedRouter",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "install_step_hook",
    "make_router",
    "router_options",
    "step_routers",
]
