"""torchtitan: MaxScore routing as a ``TokenChoiceTopKRouter`` subclass with its own ``Config``.

Tested with torchtitan 0.3.0 (``pip install 'maxscore[torchtitan]'``; its router contract changed
several times in 2026, so the extra pins it).  One call swaps every router of a model config::

    from maxscore.integrations.torchtitan import use_maxscore
    model_config = use_maxscore(model_config)             # before model_config.build()

``use_maxscore`` replaces every ``TokenChoiceTopKRouter.Config`` in the config tree by a
``MaxScoreRouter.Config`` with the same gate, experts, k and score function, and turns off the
MoE layers' expert bias (``load_balance_coeff=None``: the prices replace it).  torchtitan builds
the router from its config as any other module.

- **Routing.** Each sequence of the [B, L] batch is a routing group: every token gets k distinct
  experts, no expert more than ``ceil(capacity_factor * k * L / E)`` tokens, total score
  maximal (``maxscore.solve`` through the router of a ``MoEConfig``; default ``maxscore``).
  torchtitan's dispatch assumes T * K routed slots and has no capacity: the exact routing at a
  capacity factor >= 1 fills them all, and at factor 1 every expert is exactly full.
- **Weights.** The chosen experts' scores, renormalized when the config's ``route_norm`` is set
  (torchtitan's option), times ``route_scale``.  The returned scores [B, L, E] are the full
  router scores, as torchtitan's own router returns them.
- **Prices.** The running-average prices are buffers of the submodule ``maxscore`` (saved in
  torchtitan's checkpoints) and are averaged over the ranks of the default process group after
  every training forward (a device all-reduce, no host sync).
- **Not served** (a clear ``ValueError``): group-limited routing (``num_expert_groups``), an
  expert bias passed at run time, a router other than the MaxScore family, a capacity factor
  under 1, tensor-parallel (DTensor) router inputs.  The router adds no auxiliary loss
  (torchtitan's router contract has none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from maxscore.gates import router_scores
from maxscore.routers import ROUTERS, MoEConfig

try:
    from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter
except ImportError as error:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        "maxscore.integrations.torchtitan needs torchtitan: pip install 'maxscore[torchtitan]'"
    ) from error

TESTED_VERSIONS = ("0.3.0",)
SERVED_ROUTERS = ("maxscore", "maxscore_paper", "flow_only")  # never drop at capacity factor >= 1


class MaxScoreRouter(TokenChoiceTopKRouter):
    """MaxScore routing for torchtitan's ``MoE`` (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        """``TokenChoiceTopKRouter.Config``'s fields, and

        Attributes:
            capacity_factor: capacity per sequence, ``ceil(capacity_factor * k * L / E)``, >= 1.
            router: ``maxscore`` (default), ``maxscore_paper`` or ``flow_only``.
            router_options: the router's options by name (``maxscore.routers.router_options``),
                over the ones taken from this config (score function, ``route_norm``).
        """

        capacity_factor: float = 1.0
        router: str = "maxscore"
        router_options: dict | None = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.moe = torchtitan_moe_config(config)
        router = ROUTERS[self.moe.router](config.gate.in_features, self.moe)
        del router.gate  # torchtitan's ``gate`` is the gate; the submodule keeps the prices
        self.maxscore = router
        self.last_stats = None

    def forward(
        self, x_BLD: torch.Tensor, expert_bias_E: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights [B, L, K], experts [B, L, K], scores [B, L, E])`` of [B, L, D] inputs."""
        if expert_bias_E is not None:
            raise ValueError(
                "MaxScoreRouter takes no expert bias: set the MoE config's load_balance_coeff=None "
                "(use_maxscore does), the prices replace it"
            )
        if isinstance(x_BLD, DTensor):
            raise ValueError("MaxScoreRouter: tensor-parallel (DTensor) router inputs are not supported")
        batch, length, _ = x_BLD.shape
        bias = None if self.gate.bias is None else self.gate.bias.float()
        with torch.autocast(device_type=x_BLD.device.type, enabled=False):
            logits_TE = F.linear(x_BLD.reshape(batch * length, -1).float(), self.gate.weight.float(), bias)
        out = self.maxscore.route(logits_TE, sequence_length=length)
        self.last_stats = out.stats
        if self.training:
            self.maxscore.average_state_over_ranks()
        shape = (batch, length, -1)
        scores_BLE = router_scores(logits_TE, self.moe.router_config.score_function).view(shape)
        weights_BLK = (out.weights * self.route_scale).view(shape)
        return weights_BLK, out.experts.view(shape), scores_BLE


def torchtitan_moe_config(config: MaxScoreRouter.Config) -> MoEConfig:
    """The ``MoEConfig`` of a ``MaxScoreRouter.Config`` (checked: what the router cannot serve)."""
    if config.num_expert_groups is not None:
        raise ValueError("MaxScoreRouter: group-limited routing (num_expert_groups) is not supported")
    if config.router not in SERVED_ROUTERS:
        raise ValueError(
            f"MaxScoreRouter: router={config.router!r}; torchtitan's dispatch needs every token's k "
            f"experts, which {list(SERVED_ROUTERS)} give"
        )
    if config.capacity_factor < 1:
        raise ValueError(
            f"MaxScoreRouter: capacity_factor={config.capacity_factor} is under 1, so some tokens could "
            "not get k experts; use a factor >= 1"
        )
    options = {"score_function": config.score_func, "normalize": config.route_norm, "balance_coef": 0.0}
    return MoEConfig(
        num_experts=config.num_experts,
        k=config.top_k,
        capacity_factor=config.capacity_factor,
        router=config.router,
        router_config={**options, **(config.router_options or {})},
    )


def use_maxscore(config, *, capacity_factor: float = 1.0, router: str = "maxscore", **router_options):
    """Swaps every ``TokenChoiceTopKRouter.Config`` of a torchtitan model config (or of one MoE
    config) for a ``MaxScoreRouter.Config`` with the same fields, and sets every MoE layer's
    ``load_balance_coeff`` to None.  Modifies ``config`` in place and returns it.

    Args:
        config: a torchtitan config holding MoE layers (before ``build()``).
        capacity_factor, router, router_options: see ``MaxScoreRouter.Config``.

    Raises:
        ValueError: ``config`` holds no torchtitan router.
    """
    found = [
        (parent, attr, old)
        for _, old, parent, attr in config.traverse(TokenChoiceTopKRouter.Config)
        if not isinstance(old, MaxScoreRouter.Config)
    ]
    if not found:
        raise ValueError(f"use_maxscore: {type(config).__name__} holds no TokenChoiceTopKRouter.Config")
    for parent, attr, old in found:
        values = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
        new = MaxScoreRouter.Config(
            **values, capacity_factor=capacity_factor, router=router, router_options=dict(router_options)
        )
        torchtitan_moe_config(new)  # every setting checked before anything is built
        if parent is None:
            return new
        _set(parent, attr, new)
    for _, moe, _, _ in config.traverse(MoE.Config, recurse=True):
        moe.load_balance_coeff = None
    return config


def _set(parent, attr, value) -> None:
    if isinstance(attr, int):
        parent[attr] = value
    else:
        setattr(parent, attr, value)
