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
from dataclasses import fields

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
from maxscore.routers.config import MoEConfig, legacy_moe_config
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

ROUTERS: dict[str, type[GatedRouter]] = {
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


# Defaults as they were before any router default changed.  A config read from a file is
# completed from these, so a model saved with a partial dict keeps the behaviour it was
# trained with; configs written now are complete (``router_config(...).to_dict()``).
_PAPER_SCHEDULE = {"start": 4.0, "end": 1.0, "steps": 30000, "kind": "linear"}
SAVED_DEFAULTS: dict[str, dict] = {
    "maxscore": {"normalize": False, "soft_topk": True, "schedule": _PAPER_SCHEDULE},
    "softtopk_only": {"schedule": _PAPER_SCHEDULE},
}


def router_options(name: str) -> tuple[str, ...]:
    """Option names of router ``name``: the fields of its config class."""
    return tuple(f.name for f in fields(_router_class(name).config_class))


def router_config(
    name: str, config: GatedRouterConfig | Mapping | None = None, *, saved: bool = False, **options
) -> GatedRouterConfig:
    """The typed config of router ``name``: ``config`` (a config, a dict of options, or None
    for the defaults) with ``options`` set over it.

    ``saved=True`` marks a dict read from a file (``config.json``, a checkpoint, an HF
    config): options it lacks take ``SAVED_DEFAULTS`` (nested dicts field by field) before the
    current defaults.
    """
    router_class = _router_class(name)
    if saved and isinstance(config, Mapping):
        config = _merged(SAVED_DEFAULTS.get(name, {}), config)
    return router_class.make_config(config, **options)


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
    return _router_class(name)(dim, moe)


def router_name(router_class: type[GatedRouter]) -> str:
    """The registered name of ``router_class`` (or of the registered router with its config class)."""
    for name, registered in ROUTERS.items():
        if registered is router_class:
            return name
    for name, registered in ROUTERS.items():
        if registered.config_class is router_class.config_class:
            return name
    raise ValueError(
        f"{router_class.__name__} is not a registered router; add it to maxscore.routers.ROUTERS or "
        "build it with moe=MoEConfig(router=<a registered name>, ...)"
    )


def _router_class(name: str) -> type[GatedRouter]:
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    return ROUTERS[name]


def _merged(defaults: Mapping, given: Mapping) -> dict:
    merged = dict(defaults)
    for key, value in given.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _merged(merged[key], value) if both else value
    return merged


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
