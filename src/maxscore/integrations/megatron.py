"""Megatron-Core: MaxScore routing as a router class for ``MoESubmodules.router``.

Tested with Megatron-Core 0.16.1 (``pip install 'maxscore[megatron]'``).  Two lines swap the
router of Megatron's MoE layer::

    from maxscore.integrations.megatron import MaxScoreRouter, moe_layer_spec
    spec = moe_layer_spec(num_experts=8)            # Megatron's own MoE spec, our router
    # or, in a spec you build: MoESubmodules(..., router=MaxScoreRouter)

``MaxScoreRouter`` subclasses Megatron's ``TopKRouter`` (its gate weight, its checkpoints) and
replaces its ``gating`` and ``routing``:

- **Gate.** The logits are ``hidden @ weight.T`` in float32 on any device (router math in
  float32; TopKRouter's own gate moves the weight to CUDA).
- **Routing.** Every valid token gets k distinct experts, no expert more than its capacity, total
  softmax score maximal: ``maxscore.solve`` through the router of a ``MoEConfig``
  (``maxscore`` by default: exact flow routing, the selected scores renormalized as combine
  weights, running-average prices for warm starts).  ``probs`` [T, E] hold the combine weights
  (0 outside the map) and ``routing_map`` [T, E] the chosen pairs.
- **Groups.** Megatron flattens [S, B] tokens sequence-major; the router regroups them by batch
  index, so a routing group is one sequence of this rank (``group="sequence"``, default) or the
  rank's micro-batch (``group="batch"``).  Under sequence or context parallelism a rank holds a
  slice of each sequence: a group is then that slice.
- **Capacity.** Without Megatron's ``moe_expert_capacity_factor`` the capacity is ``MoEConfig``'s
  (factor 1: ``ceil(k * valid tokens / E)`` per group, every expert exactly full).  With it set,
  the capacity of a group is Megatron's own, ``get_capacity(tokens * k, E, factor)`` over the
  group's tokens, and Megatron drops nothing more (the routing already fits).  A factor under 1
  cannot give every token k experts and is refused.
- **Padding.** Megatron's ``padding_mask`` is True at padding: ``valid = ~padding_mask``.  A
  padding token uses no capacity; it still fills its k slots of the map (its top-k experts,
  weight 0), because Megatron's dropless dispatchers assume T * k routed slots.
- **Prices.** The router's running-average prices (buffers of the submodule ``maxscore``, so
  saved in Megatron's checkpoints) are averaged over the ranks of the router's
  tensor/data/context-parallel group after every training forward (a device all-reduce, no host
  sync).
- **Logging.** Each training forward records ``maxscore_load_max`` (largest expert load over
  capacity) and ``maxscore_dropped`` (share of the valid tokens' slots unassigned) in Megatron's
  MoE layer-wise tracker, beside its auxiliary losses.  ``last_stats`` keeps the last
  ``RoutingStats``.
- **Auxiliary loss.** The ``MoEConfig`` router's own losses (by default from Megatron's
  ``moe_aux_loss_coeff`` and ``moe_z_loss_coeff``) are attached to ``probs`` as Megatron does.

Settings it cannot serve raise a ``ValueError`` naming the setting: an expert bias
(``moe_router_enable_expert_bias``: the prices replace it), group-limited routing, a top-k
scaling factor, a capacity factor under 1, global routing groups.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn import functional as F

from maxscore.routers import ROUTERS, MoEConfig

try:
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_capacity,
        save_to_aux_losses_tracker,
    )
    from megatron.core.transformer.moe.router import TopKRouter
except ImportError as error:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        "maxscore.integrations.megatron needs Megatron-Core: pip install 'maxscore[megatron]'"
    ) from error

TESTED_VERSIONS = ("0.16.1",)


def megatron_moe_config(config, moe: MoEConfig | None = None) -> MoEConfig:
    """The ``MoEConfig`` a Megatron ``TransformerConfig`` describes (``moe``: the router and its
    options, checked against Megatron's experts, k and capacity factor)."""
    refused = {
        "moe_router_enable_expert_bias": "MaxScore's prices replace the expert bias; set it False",
        "moe_router_num_groups": "group-limited routing is not supported; leave it None",
        "moe_router_topk_scaling_factor": "combine weights are renormalized; leave it None",
    }
    for name, fix in refused.items():
        if getattr(config, name, None):
            raise ValueError(f"MaxScoreRouter: {name}={getattr(config, name)!r}: {fix}")
    factor = config.moe_expert_capacity_factor
    if factor is not None and factor < 1:
        raise ValueError(
            f"MaxScoreRouter: moe_expert_capacity_factor={factor} is under 1, so some tokens could not "
            "get k experts; use a factor >= 1 (or None: every expert exactly full)"
        )
    if moe is None:
        aux = config.moe_aux_loss_coeff
        if not isinstance(aux, (int, float)):
            raise ValueError(f"MaxScoreRouter: moe_aux_loss_coeff={aux!r}: give one number, or pass moe=")
        options = {
            "balance_coef": float(aux),
            "z_coef": float(config.moe_z_loss_coeff or 0.0),
            "score_function": config.moe_router_score_function,
        }
        moe = MoEConfig(
            num_experts=config.num_moe_experts,
            k=config.moe_router_topk,
            capacity_factor=1.0 if factor is None else float(factor),
            router="maxscore",
            router_config=options,
        )
    settings = (
        ("num_moe_experts", config.num_moe_experts, moe.num_experts),
        ("moe_router_topk", config.moe_router_topk, moe.k),
    )
    for name, theirs, ours in settings:
        if theirs != ours:
            raise ValueError(
                f"MaxScoreRouter: Megatron's {name}={theirs} differs from the MoEConfig's {ours}"
            )
    if moe.router_config.group == "global":
        raise ValueError(
            "MaxScoreRouter: group='global' is not supported in Megatron; use 'sequence' or 'batch'"
        )
    return moe


class MaxScoreRouter(TopKRouter):
    """MaxScore routing for Megatron-Core's ``MoELayer`` (see the module docstring).

    Args:
        config: Megatron's ``TransformerConfig``.
        pg_collection: Megatron's process groups.
        moe: the router and its options as a ``MoEConfig`` (default: ``maxscore`` with the
            experts, k, capacity factor and loss coefficients of ``config``).
        **kwargs: what later Megatron versions pass (``is_mtp_layer=``, ...), forwarded where
            ``TopKRouter`` takes it.
    """

    def __init__(self, config, pg_collection=None, *, moe: MoEConfig | None = None, **kwargs) -> None:
        moe = megatron_moe_config(config, moe)
        accepted = inspect.signature(TopKRouter.__init__).parameters
        super().__init__(
            config=config, pg_collection=pg_collection, **{k: v for k, v in kwargs.items() if k in accepted}
        )
        router = ROUTERS[moe.router](config.hidden_size, moe)
        del router.gate  # Megatron's ``weight`` is the gate; the submodule keeps the prices
        self.maxscore = router
        self.moe = moe
        self.last_stats = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """float32 gate logits on the input's device."""
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=input.device.type, enabled=False):
            return F.linear(input.float(), self.weight.float(), bias)

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """``(probs [T, E], routing_map [T, E])`` of [S, B, H] hidden states."""
        return self.routing(self.gating(input), padding_mask=padding_mask)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """MaxScore routing of [S, B, E] (or [S * B, E] with no batch axis) logits."""
        num_experts, k = self.moe.num_experts, self.moe.k
        logits_SBE = logits.view(logits.shape[0], -1, num_experts)
        length, batch = logits_SBE.shape[:2]
        logits_TE = logits_SBE.transpose(0, 1).reshape(-1, num_experts)  # batch-major: sequences
        valid_T = None
        if padding_mask is not None:
            valid_T = ~padding_mask.reshape(length, batch).transpose(0, 1).reshape(-1).bool()
        out = self.maxscore.route(
            logits_TE, valid_T, sequence_length=length, capacity=self._capacity(length, batch)
        )
        experts_TK, weights_TK = out.experts, out.weights
        if valid_T is not None:  # padding fills its k slots with weight 0 (T * k routed slots)
            fill_TK = torch.topk(logits_TE.detach(), k, dim=1).indices
            experts_TK = torch.where(valid_T[:, None], experts_TK, fill_TK)
        to_sequence_major = lambda t: t.view(batch, length, -1).transpose(0, 1).reshape(-1, t.shape[-1])  # noqa: E731
        experts_TK, weights_TK = to_sequence_major(experts_TK), to_sequence_major(weights_TK)
        assigned_TK = experts_TK >= 0
        index_TK = experts_TK.clamp(min=0)
        probs_TE = torch.zeros(experts_TK.shape[0], num_experts, dtype=weights_TK.dtype, device=logits.device)
        probs_TE = probs_TE.scatter_add(1, index_TK, weights_TK * assigned_TK)
        counts_TE = torch.zeros_like(probs_TE).scatter_add(1, index_TK, assigned_TK.to(probs_TE.dtype))
        if self.training and torch.is_grad_enabled() and out.aux_loss.requires_grad:
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, out.aux_loss)
        self.last_stats = out.stats
        if self.training:
            self._after_training_forward(out.stats)
        return probs_TE, counts_TE > 0

    def _capacity(self, length: int, batch: int) -> int | None:
        """Megatron's capacity of one routing group when it sets a capacity factor, else None."""
        factor = self.config.moe_expert_capacity_factor
        if factor is None:
            return None
        tokens = length if self.moe.router_config.group == "sequence" else length * batch
        return get_capacity(tokens * self.moe.k, self.moe.num_experts, factor)

    @torch.no_grad()
    def _after_training_forward(self, stats) -> None:
        average = getattr(self.maxscore, "average_state_over_ranks", None)  # MaxScore's routers
        if average is not None and self.tp_dp_cp_group is not None:
            average(self.tp_dp_cp_group)
        num_layers = self.config.num_layers
        for name, value in (
            ("maxscore_load_max", stats.load_ratio().max()),
            ("maxscore_dropped", stats.dropped_by_rank.mean()),
        ):
            save_to_aux_losses_tracker(name, value.float(), self.layer_number, num_layers)


def moe_layer_spec(
    num_experts: int, *, moe: MoEConfig | None = None, grouped_gemm: bool = False, use_te: bool = False
):
    """Megatron's own MoE module spec (``get_moe_module_spec``) with ``MaxScoreRouter`` as its
    router (``moe``: the router and its options, else ``maxscore`` from Megatron's config).
    ``use_te`` and ``grouped_gemm`` choose Megatron's expert and linear implementations."""
    spec = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    router = MaxScoreRouter
    if moe is not None:

        def router(config, pg_collection=None, **kwargs):  # noqa: E306
            return MaxScoreRouter(config, pg_collection, moe=moe, **kwargs)

    spec.submodules.router = router
    return spec
