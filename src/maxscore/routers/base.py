"""The router interface (a Protocol), its output, and the spine every built-in router shares.

A router maps hidden states [T, D] to an assignment (experts [T, K], combine weights [T, K]),
its auxiliary losses and its statistics, all returned; it never dispatches tokens.  The
built-in routers derive from ``GatedRouter``: a linear gate in float32 (whatever the
autocast), scores (softmax or sigmoid), a router-specific ``select``, combine weights (SoftTopk
family), the Switch balance loss and the router z-loss.

Causal mode (``causal=True``): every token is routed from its own scores and the router's
learned state only, with no capacity (dropless), so its experts cannot depend on other tokens;
the base rule is plain top-k, MaxScore its averaged dual prices plus a causal correction.

Routing groups: capacity applies per group, ``group="sequence"`` (one group per sequence, the
paper's setting), ``group="batch"`` (the whole local batch) or, for MaxScore,
``group="global"`` (the tokens of every rank of a process group, see ``maxscore.parallel``).
A group's capacity counts its valid tokens only, ``ceil(capacity_factor * k * valid / E)``, so
padding uses no capacity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from maxscore._checks import check_int
from maxscore.gates import TemperatureSchedule, router_scores, soft_topk
from maxscore.routers.causal import CausalRule
from maxscore.routers.checks import logits_message, new_record, record_logits, record_solver
from maxscore.routers.config import GROUPS, GatedRouterConfig, MoEConfig, legacy_router_moe
from maxscore.routers.groups import Groups, Selection, check_tokens, routing_groups, stats_capacity
from maxscore.routers.losses import load_balancing_loss, router_z_loss
from maxscore.routers.stats import RoutingStats, routing_stats


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterOutput:
    """One routing of T tokens.

    Attributes:
        experts: int64 [T, K] each token's experts in preference order, ``-1`` for none
            (a dropped choice, a padding token, or, for Expert Choice, no further expert).
        weights: float32 [T, K] combine weights, 0 where ``experts`` is -1.
        capacity: slots per expert of the static dispatch buffer (all groups), or ``None`` for
            a dropless routing (the layer then uses its grouped path).
        aux_loss: float32 scalar, the weighted sum of ``losses``.
        losses: the unweighted auxiliary losses by name.
        stats: routing statistics.
        rank_loads: int64 [R, E] on the host, or ``None``: how many (token, expert) pairs of each
            rank of the router's process group every expert takes, when the router knows the
            whole group's routing (global routing that gathered the scores); an expert-parallel
            exchange over the same group then skips its count exchange.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    capacity: int | None
    aux_loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    rank_loads: torch.Tensor | None = None


@runtime_checkable
class Router(Protocol):
    """What ``MoELayer`` needs of a router (built-in or your own ``nn.Module``).

    Capabilities are declared, never probed:
        has_causal_mode: the router can route every token alone (``causal=True``; the layer
            uses it for single-token steps in eval).
        fills_capacity: every routing group fills every expert exactly to its capacity, so an
            expert-parallel exchange has static sizes.
        has_schedule: the combine weights follow a SoftTopk temperature schedule stepped by
            ``after_optimizer_step`` (the harness sets it to the run's length).
        process_group: the group a router that routes across ranks uses (``None``: the world or
            a single process); others ignore it.
    """

    num_experts: int
    k: int
    has_causal_mode: bool
    fills_capacity: bool
    has_schedule: bool
    process_group: object | None

    def __call__(
        self,
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
        causal: bool = False,
    ) -> RouterOutput: ...

    def after_optimizer_step(self) -> None:
        """Advances step-based state (temperature schedules, bias updates)."""


class GatedRouter(nn.Module):
    """Linear gate -> scores -> ``select`` -> SoftTopk-family weights -> losses and stats.

    Subclasses implement ``select``, may add state in ``setup`` and may override
    ``temperature``, ``auxiliary_losses`` and ``after_optimizer_step``; each declares its
    ``config_class``.  One constructor for all of them.

    Args:
        dim: model dimension D.
        moe: the layer's ``MoEConfig`` (experts, k, capacity factor, this router's typed options
            in ``moe.router_config``).  The older form ``(dim, num_experts, k,
            capacity_factor=1.0, *, config=None, **options)`` still works and warns.
    """

    config_class: ClassVar[type[GatedRouterConfig]] = GatedRouterConfig
    has_causal_mode = True
    fills_capacity = False
    process_group = None
    supported_groups = GROUPS

    def __init__(self, dim: int, moe: MoEConfig | int | None = None, *args, **kwargs) -> None:
        super().__init__()
        if not isinstance(moe, MoEConfig):
            moe = legacy_router_moe(type(self), moe, args, kwargs)
        elif args or kwargs:
            raise ValueError(
                f"{type(self).__name__}(dim, moe) takes no other arguments, got {args or ''} {kwargs or ''}; "
                "set the router's options in moe.router_config"
            )
        check_int("dim", dim)
        self.config = self.make_config(moe.router_config)
        if self.config.group not in self.supported_groups:
            raise ValueError(
                f"group must be one of {self.supported_groups} for {type(self).__name__}, "
                f"got {self.config.group!r}"
            )
        self.moe = moe
        self.num_experts, self.k, self.capacity_factor = moe.num_experts, moe.k, moe.capacity_factor
        self.group, self.score_function = self.config.group, self.config.score_function
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        # bad input found on an accelerator, raised at the next check point (``checks.py``)
        self.register_buffer("routing_issue", new_record(), persistent=False)
        nn.init.normal_(self.gate.weight, std=dim**-0.5)
        if self.has_schedule:
            self.schedule = TemperatureSchedule(self.config.schedule)
        self.setup()

    def setup(self) -> None:
        """A subclass's own state and checks, after the common parts (buffers, derived settings)."""

    @property
    def has_schedule(self) -> bool:
        """The combine weights follow a SoftTopk schedule (declared by the config: ``scheduled``)."""
        return self.config.scheduled

    @classmethod
    def make_config(cls, config: GatedRouterConfig | Mapping | None = None, **options) -> GatedRouterConfig:
        """This router's config: ``config`` (or the defaults) with ``options`` set over it."""
        if isinstance(config, GatedRouterConfig):
            if type(config) is not cls.config_class:
                raise ValueError(
                    f"config must be a {cls.config_class.__name__} for {cls.__name__}, "
                    f"got {type(config).__name__}"
                )
            if not options:
                return config
            config = {f.name: getattr(config, f.name) for f in fields(config)}
        elif config is not None and not isinstance(config, Mapping):
            raise ValueError(
                f"config must be a {cls.config_class.__name__} or a dict of its options, got {config!r}"
            )
        return cls.config_class.from_options({**(config or {}), **options})

    # ---- the spine -------------------------------------------------------------------------
    def forward(
        self,
        x_TD: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
        causal: bool = False,
    ) -> RouterOutput:
        """Routes T tokens.

        Args:
            x_TD: float [T, D] hidden states (any float dtype; the gate runs in float32).
            valid_T: bool [T], False for padding (no expert, no capacity, no loss).
            sequence_length: tokens per sequence; with ``group="sequence"`` each sequence is a
                routing group, without it the whole input is one group.
            causal: route every token alone (dropless); see the module docstring.
        """
        return self.route(self.logits(x_TD), valid_T, sequence_length=sequence_length, causal=causal)

    def route(
        self,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
        causal: bool = False,
        capacity: int | None = None,
    ) -> RouterOutput:
        """Routes T tokens from their gate logits: ``forward`` after the gate, for a framework
        that owns the gate weight (``maxscore.integrations``).

        Args:
            logits_TE: float32 [T, E] gate logits (checked finite).
            valid_T, sequence_length, causal: as in ``forward``.
            capacity: slots per expert in every routing group, replacing the capacity computed
                from ``capacity_factor`` (a framework's own capacity rule); None: computed.
        """
        groups = self._groups(logits_TE, valid_T, sequence_length, capacity)
        self._check_finite(logits_TE, groups.size)
        scores_TE = router_scores(logits_TE, self.score_function)
        if causal:
            selection = Selection(experts_TK=self.route_causal(scores_TE.detach()), dropless=True)
        else:
            selection = self.select(scores_TE, logits_TE, valid_T, groups, groups.capacity_G)
            if selection.issues is not None and groups.capacity_G is not None:
                record_solver(self.routing_issue, selection.issues, groups.capacity_G, valid_T, groups.size)
        experts_TK = selection.experts_TK
        if valid_T is not None:
            experts_TK = experts_TK.masked_fill(~valid_T[:, None], -1)
        weights_TK = self.combine_weights(scores_TE, experts_TK)
        losses = self.auxiliary_losses(logits_TE, scores_TE, experts_TK, valid_T, groups)
        aux_loss = sum(
            (coef * losses[name] for name, coef in self.loss_weights().items()), logits_TE.new_zeros(())
        )
        stats = routing_stats(
            logits_TE=logits_TE,
            scores_TE=scores_TE,
            experts_TK=experts_TK,
            valid_T=valid_T,
            capacity_G=stats_capacity(groups, selection, logits_TE.device),
            loads_E=selection.loads_E,
            k=self.k,
            solver_gap=selection.solver_gap,
            solver_ms=selection.solver_ms,
            solver_fallbacks=selection.solver_fallbacks,
            group_size=groups.size,
        )
        capacity = None if selection.dropless else groups.count * groups.slots
        return RouterOutput(
            experts=experts_TK,
            weights=weights_TK,
            capacity=capacity,
            aux_loss=aux_loss,
            losses=losses,
            stats=stats,
            rank_loads=selection.rank_loads,
        )

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """float32 [T, E] gate logits, computed in float32 even under autocast."""
        check_tokens(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return nn.functional.linear(x_TD.float(), self.gate.weight.float())

    def select(
        self,
        scores_TE: torch.Tensor,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None,
        groups: Groups,
        capacity_G: torch.Tensor,
    ) -> Selection:
        """The routing of one batch, capacity applied per group (router-specific)."""
        raise NotImplementedError

    def route_causal(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Causal mode: each token routed alone by ``causal_rule`` (dropless)."""
        return self.causal_rule().experts(scores_TE)

    def causal_rule(self) -> CausalRule:
        """The router's causal routing (``maxscore.routers.causal``): here the top-k scores, the
        combine weights as in batch routing."""
        return CausalRule(
            k=self.k,
            score_function=self.score_function,
            bias_E=torch.zeros(self.num_experts, device=self.gate.weight.device),
            temperature=self.temperature(),
            normalize=self.config.normalize,
        )

    def temperature(self) -> float:
        """SoftTopk temperature of the combine weights: the schedule's (``has_schedule``), else 1
        (plain scores)."""
        return self.schedule.temperature() if self.has_schedule else 1.0

    def combine_weights(self, scores_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return soft_topk(scores_TE, experts_TK, self.temperature(), normalize=self.config.normalize)

    def loss_weights(self) -> dict[str, float]:
        return {"balance": self.config.balance_coef, "z": self.config.z_coef}

    def auxiliary_losses(
        self,
        logits_TE: torch.Tensor,
        scores_TE: torch.Tensor,
        experts_TK: torch.Tensor,
        valid_T: torch.Tensor | None,
        groups: Groups,
    ) -> dict[str, torch.Tensor]:
        """Switch balance loss over the batch (f from each token's top-1 score) and the z-loss."""
        first_T1 = scores_TE.argmax(1, keepdim=True)
        valid_1T = None if valid_T is None else valid_T[None]
        balance = load_balancing_loss(scores_TE[None], first_T1[None], valid_1T)
        return {"balance": balance, "z": router_z_loss(logits_TE, valid_T)}

    def after_optimizer_step(self) -> None:
        """Called once after every optimizer step: advances the SoftTopk schedule, if any."""
        if self.has_schedule:
            self.schedule.step()

    # ---- helpers ---------------------------------------------------------------------------
    def defers_checks(self, device: torch.device) -> bool:
        """True when bad input on ``device`` is recorded for the next check point instead of
        raised at the call (``validate="deferred"`` on an accelerator)."""
        return self.config.validate == "deferred" and device.type != "cpu"

    def solver_validate(self, device: torch.device) -> str:
        """The exact solver's ``validate`` option for scores on ``device``."""
        return "deferred" if self.defers_checks(device) else "eager"

    def _check_finite(self, logits_TE: torch.Tensor, group_size: int) -> None:
        if self.defers_checks(logits_TE.device):
            record_logits(self.routing_issue, logits_TE, group_size)
            return
        finite = torch.isfinite(logits_TE).all()
        if not torch.compiler.is_compiling():
            if not finite:  # on an accelerator, a host round trip (validate="eager")
                raise ValueError(logits_message())
        else:  # no branch on values in a compiled graph: an assert op
            torch._assert_async(finite, logits_message())

    def _groups(
        self,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None,
        sequence_length: int | None,
        capacity: int | None = None,
    ) -> Groups:
        return routing_groups(
            logits_TE,
            valid_T,
            sequence_length,
            per_sequence=self.group == "sequence",
            num_experts=self.num_experts,
            k=self.k,
            capacity_factor=self.capacity_factor,
            solver_capacity=self.group == "global",
            capacity=capacity,
        )
