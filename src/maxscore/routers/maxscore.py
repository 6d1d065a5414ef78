"""MaxScore routing (PAPER.md §2): flow routing of the router scores, optional SoftTopk weights.

All routing groups of a layer are solved in one batched call of ``solve(method=exact |
two_stage | sinkhorn)``, on the scores' device (the compiled core on the CPU, the device engine
on CUDA; every token gets k distinct experts, every expert at most its capacity, total score maximal:
no drops, and at capacity_factor 1 every expert exactly full).  Combine weights are the selected
experts' scores, renormalized (the recipe that trained the best models in the library's quality
study, ``benchmarks/results/quality_tiny_cpu-2core_202611``); ``soft_topk=True`` applies the
paper's SoftTopk with its temperature schedule, and ``maxscore_paper`` is the paper's recipe
(raw SoftTopk weights, 4 -> 1 over the run).

Causal mode (PAPER.md §5.4): batch routing lets a token's experts depend on later tokens.  The
exact solver's dual prices are the per-expert offsets under which independent top-k routing is
balanced, so the router keeps their running average (buffer ``prices``, saved with the model)
and, in causal mode, routes each token alone to the top-k of ``score - prices`` (dropless: no
capacity is enforced, loads are balanced only on average).  The averaged prices balance the
batches' routings, not the causal routing's average load (at the optimum the marginal tokens
tie, and top-k breaks every tie the same way), so a correction (buffer ``causal_offset``) is
added.  After each training forward it moves a fraction ``causal_rate`` (default 0.3) of the way
to the offsets under which this batch's causal routing would be balanced: per expert, the
offset at which it alone would take its mean load (``causal_targets``, a quantile of its
tokens' margins).  A batch whose experts take fewer than ``CAUSAL_SAMPLE`` (256) tokens each on
average moves proportionally less, as its quantiles are noisier.  The step is proportional to
the imbalance, so the causal routing is balanced within tens of forwards, and the offset then
averages the batches' targets.  ``causal_update="sign"`` is the earlier rule (DeepSeek-V3's
loss-free update: ``causal_rate``, default 1e-4 score units, up or down by the load's sign),
which configs saved before the choice existed keep.  Either way the batch routing never sees
the offset.  The layer switches to causal mode by itself for single-token steps (generation).
The solver's warm start is the last batch's prices (buffer ``warm_prices``: the mean over its
groups), not the running average: early in training the router moves faster than the average
follows, and small groups' problems are nearly degenerate (at the optimum a token's k-th and
(k+1)-th values of ``s - p`` differ by about 1e-6), so a stale start leaves most units to move
(captured in training at E = 96, k = 8, groups of 128: the average started with more excess than
prices 0, the last batch's mean with a fifth of it).
With ``two_stage`` or ``sinkhorn`` (no joint prices), every ``PRICE_EVERY``-th training
forward also runs the exact solver, for the prices only.

Global routing (``group="global"``, exact only): one optimal routing of the tokens of every
rank of ``process_group`` (default: the world; set by ``maxscore.parallel.parallelize_moe``)
with global capacities, by ``maxscore.solvers.solve_global``; per-rank loads then vary, so
the layer takes its variable-size (grouped) path.  On a single process the global routing is
the batch's, and the layer keeps its static capacity path.  Its prices are global, identical on
every rank.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from maxscore._distributed import average_over_ranks, sum_over_ranks, world_size
from maxscore.gates import TemperatureScheduleConfig, schedule_config
from maxscore.routers.base import GROUPS, GatedRouter, GatedRouterConfig
from maxscore.routers.causal import CausalRule
from maxscore.routers.groups import Groups, Selection, solve_groups
from maxscore.routers.quantile import expert_quantiles
from maxscore.solvers.exact._native import core_causal_targets
from maxscore.solvers.exact.global_routing import solve_global
from maxscore.solvers.exact.prices import expert_loads

FLOW_METHODS = ("exact", "two_stage", "sinkhorn")
CAUSAL_UPDATES = {"quantile": 0.3, "sign": 1e-4}  # the correction's rules and their default rates
CAUSAL_SAMPLE = 256  # tokens per expert from which a batch moves the quantile rule's full rate
PRICE_EVERY = 10  # approximate methods: training forwards between exact solves for the causal prices


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowOnlyRouterConfig(GatedRouterConfig):
    """Options of ``flow_only`` (beyond ``GatedRouterConfig``'s).

    Attributes:
        method: ``"exact"`` (default), ``"two_stage"`` or ``"sinkhorn"``.
        price_momentum: momentum of the prices' running average; the first
            ``1 / (1 - price_momentum)`` updates are averaged plainly.
        causal_update: the causal correction's rule: ``"quantile"`` (default) or ``"sign"``
            (module docstring).
        causal_rate: its step per training forward: with ``"quantile"`` the fraction of the way
            to the batch's balancing offsets (in [0, 1]; default 0.3), with ``"sign"`` the move
            of each expert in score units (default 1e-4); 0 disables the correction.
    """

    method: str = "exact"
    price_momentum: float = 0.99
    causal_update: str = "quantile"
    causal_rate: float | None = None

    def __post_init__(self) -> None:
        GatedRouterConfig.__post_init__(self)
        if self.method not in FLOW_METHODS:
            raise ValueError(f"method must be one of {FLOW_METHODS}, got {self.method!r}")
        if self.group == "global" and self.method != "exact":
            raise ValueError(f"group='global' routes with the exact solver only; got method={self.method!r}")
        momentum = self.price_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"price_momentum must be in [0, 1), got {momentum!r}")
        if self.causal_update not in CAUSAL_UPDATES:
            raise ValueError(
                f"causal_update must be one of {tuple(CAUSAL_UPDATES)}, got {self.causal_update!r}"
            )
        rate = CAUSAL_UPDATES[self.causal_update] if self.causal_rate is None else self.causal_rate
        bound = 1 if self.causal_update == "quantile" else math.inf
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not 0 <= rate <= bound
            or rate == math.inf
        ):
            raise ValueError(
                f"causal_rate must be a number in [0, {bound}] with causal_update={self.causal_update!r} "
                f"(0 disables the correction), got {rate!r}"
            )
        object.__setattr__(self, "causal_rate", float(rate))

    def label(self, router: str) -> str:
        return router if self.method == "exact" else f"{router}@{self.method}"


@dataclass(frozen=True, kw_only=True, slots=True)
class MaxScoreRouterConfig(FlowOnlyRouterConfig):
    """Options of ``maxscore``: ``flow_only``'s, with renormalized weights by default, and
    SoftTopk weights as an option.

    Attributes:
        soft_topk: SoftTopk combine weights (PAPER.md §3) with the temperature ``schedule``;
            default False: the selected scores themselves (temperature 1).
        schedule: the SoftTopk temperature schedule, used when ``soft_topk`` is true (a config
            or its fields as a dict; default linear 4 -> 1 over the run).
    """

    normalize: bool = True
    soft_topk: bool = False
    schedule: TemperatureScheduleConfig = TemperatureScheduleConfig()

    def __post_init__(self) -> None:
        FlowOnlyRouterConfig.__post_init__(self)
        object.__setattr__(self, "schedule", schedule_config(self.schedule))
        if not isinstance(self.soft_topk, bool):
            raise ValueError(f"soft_topk must be true or false, got {self.soft_topk!r}")
        if not self.soft_topk and self.schedule != TemperatureScheduleConfig():
            raise ValueError(
                f"schedule={self.schedule} is set but soft_topk is false, so no schedule applies; "
                "set soft_topk=true to use SoftTopk weights with this schedule"
            )

    @property
    def scheduled(self) -> bool:
        return self.soft_topk


@dataclass(frozen=True, kw_only=True, slots=True)
class PaperMaxScoreRouterConfig(MaxScoreRouterConfig):
    """Options of ``maxscore_paper``, the paper's recipe (PAPER.md §3): ``maxscore``'s, with raw
    SoftTopk combine weights (no renormalization) and the temperature linear 4 -> 1 over the
    run (30000 optimizer steps where there is no run: ``MoELayer``, ``upcycle``)."""

    normalize: bool = False
    soft_topk: bool = True


def causal_targets(values_TE: torch.Tensor, offset_E: torch.Tensor, k: int, valid_T=None) -> torch.Tensor:
    """Per expert, the offset under which it alone would take its mean load in the causal
    routing (top-k of ``values - offset``) of this batch, every other offset unchanged.

    A token keeps an expert it routes to while ``values - offset`` stays above its best expert
    outside the top-k, and takes one it does not route to once that exceeds its k-th, so the
    expert's margins are ``values`` minus the token's (k+1)-th or k-th adjusted value: an offset
    below the margin routes the token to the expert.  The target lies midway between the margins
    of the tokens at and just past the mean load (``expert_quantiles``).  On an accelerator torch operations
    with no host sync; on the CPU the compiled core, with the same values.
    """
    num_experts = values_TE.shape[1]
    if k >= num_experts:  # every token takes every expert: nothing to balance
        return offset_E.clone()
    host = values_TE.device.type == "cpu" and offset_E.device.type == "cpu" and values_TE.numel() > 0
    if host and values_TE.dtype == offset_E.dtype == torch.float32 and not torch.compiler.is_compiling():
        # the same values from the compiled core, in a pass over the rows: 2x less than the torch
        # code's top-k over each column (1.6 against 3.4 ms of 2 cores at 2048 x 96, k = 8)
        targets_E = core_causal_targets(values_TE, offset_E, k, valid_T)
        if targets_E is not None:
            return targets_E
    return torch_causal_targets(values_TE, offset_E, k, valid_T)


def torch_causal_targets(
    values_TE: torch.Tensor, offset_E: torch.Tensor, k: int, valid_T=None
) -> torch.Tensor:
    """``causal_targets`` in torch operations (any device, compiled graphs), 0 < k < E."""
    adjusted_TE = values_TE - offset_E
    top_TK1 = torch.topk(adjusted_TE, k + 1, dim=1).values
    kth_T, next_T = top_TK1[:, k - 1], top_TK1[:, k]
    chosen_TE = adjusted_TE >= kth_T[:, None]
    margins_TE = values_TE - torch.where(chosen_TE, next_T[:, None], kth_T[:, None])
    return expert_quantiles(margins_TE, k, valid_T, midpoint=True)


class MaxScoreRouter(GatedRouter):
    """MaxScore: min-cost max-flow routing (options: ``MaxScoreRouterConfig``)."""

    config_class = MaxScoreRouterConfig
    supported_groups = GROUPS + ("global",)

    def setup(self) -> None:
        self.register_buffer("prices", torch.zeros(self.num_experts))
        self.register_buffer("price_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.int64))
        self.register_buffer("causal_offset", torch.zeros(self.num_experts))
        self.register_buffer("warm_prices", torch.zeros(self.num_experts))
        self.process_group = None  # of group="global"; None: the world (or a single process)
        self.last_global = None  # the last GlobalAssignment (its exchange counters) of group="global"

    @property
    def fills_capacity(self) -> bool:
        """True when every rank's routing fills a static [E, C] buffer (local routing groups)."""
        return self.group != "global"

    def select(
        self,
        scores_TE: torch.Tensor,
        logits_TE: torch.Tensor,
        valid_T: torch.Tensor | None,
        groups: Groups,
        capacity_G: torch.Tensor,
    ) -> Selection:
        if self.group == "global":
            return self._select_global(scores_TE, valid_T)
        exact = {"prices": self.warm_prices, "validate": self.solver_validate(scores_TE.device)}
        options = exact if self.config.method == "exact" else {}
        solved = solve_groups(scores_TE, valid_T, groups, self.k, capacity_G, self.config.method, **options)
        if self.training:
            priced, apply = solved, None
            if self.config.method != "exact":
                due = self.training_forwards % PRICE_EVERY == 0
                # in a compiled graph nothing branches on the counter: the exact solve runs every
                # forward and its prices apply every PRICE_EVERY-th, as in eager mode
                if torch.compiler.is_compiling() or bool(due):
                    priced = solve_groups(scores_TE, valid_T, groups, self.k, capacity_G, "exact", **exact)
                    apply = due
            if priced.assignment.prices is not None:
                self._update_prices(priced.assignment.prices.float(), apply)
            self._update_causal(scores_TE, valid_T)
            self.training_forwards += 1
        return Selection.of(solved)

    def _select_global(self, scores_TE: torch.Tensor, valid_T: torch.Tensor | None) -> Selection:
        begin = time.perf_counter()
        result = solve_global(
            scores_TE.detach(),
            self.k,
            capacity_factor=self.capacity_factor,
            valid=valid_T,
            prices=self.warm_prices,
            group=self.process_group,
        )
        assignment, self.last_global = result.assignment, result
        if self.training:
            self._update_prices(assignment.prices.float()[None])
            self._update_causal(scores_TE, valid_T, self.process_group)
            self.training_forwards += 1
        device = scores_TE.device
        return Selection(
            experts_TK=assignment.experts.to(device),
            # the solver owned the capacity: its global capacity and loads, over all ranks
            capacity_G=torch.tensor([assignment.capacity], dtype=torch.int64, device=device),
            loads_E=assignment.loads.to(device),
            # global capacities: no static per-rank buffer, unless this process is the only rank
            dropless=world_size(self.process_group) > 1,
            solver_gap=assignment.gap,
            solver_ms=(time.perf_counter() - begin) * 1e3,
            rank_loads=result.rank_loads,
        )

    def causal_rule(self) -> CausalRule:
        """Each token alone: the top-k of ``scores - (prices + causal_offset)``, no capacity."""
        return dataclasses.replace(GatedRouter.causal_rule(self), bias_E=-(self.prices + self.causal_offset))

    @torch.no_grad()
    def _update_causal(self, scores_TE: torch.Tensor, valid_T: torch.Tensor | None, ranks=None) -> None:
        """One step of the causal correction from this batch's causal routing (on the device).

        ``ranks``: global routing's process group; the quantile rule's targets are then averaged
        over its ranks (weighted by their tokens), so every rank takes the same step."""
        if self.config.causal_rate == 0:
            return
        offset_E = self.causal_offset.to(scores_TE.device)
        if self.config.causal_update == "quantile":
            values_TE = scores_TE.detach().float() - self.prices.to(scores_TE.device)
            target_E = causal_targets(values_TE, offset_E, self.k, valid_T)
            count = values_TE.shape[0] if valid_T is None else valid_T.sum()
            count = torch.as_tensor(count, dtype=torch.float32, device=target_E.device)
            # a batch of padding only has no targets (the selection's -inf): no step, and no NaN
            # (0 x -inf) in the offsets or in other ranks' sums
            target_E = torch.where(count > 0, target_E, offset_E)
            if world_size(ranks) > 1:  # one step on every rank, from all ranks' tokens
                packed = torch.cat([target_E * count, count.view(1)])
                sum_over_ranks(packed, ranks)
                count = packed[-1]
                target_E = packed[:-1] / count.clamp(min=1)
            # a batch whose experts take fewer than CAUSAL_SAMPLE tokens each moves less: its
            # targets (quantiles of fewer margins) are noisier
            weight = (count * self.k / (self.num_experts * CAUSAL_SAMPLE)).clamp(max=1)
            step_E = self.config.causal_rate * weight.to(offset_E) * (target_E - offset_E)
        else:
            experts_TK = self.route_causal(scores_TE.detach())
            if valid_T is not None:  # padding counts nowhere (a mask, not an index: no host sync)
                experts_TK = experts_TK.masked_fill(~valid_T.to(experts_TK.device)[:, None], -1)
            loads_E = expert_loads(experts_TK[None], self.num_experts)[0].float()
            step_E = self.config.causal_rate * torch.sign(loads_E - loads_E.mean())
        self.causal_offset.add_(step_E.to(self.causal_offset.device))
        self.causal_offset.sub_(self.causal_offset.mean())

    @torch.no_grad()
    def average_state_over_ranks(self, group=None) -> None:
        """Averages the learned routing state (prices, causal correction) over the ranks of
        ``group`` (default: the world), for frameworks whose ranks route different tokens."""
        for buffer in (self.prices, self.causal_offset, self.warm_prices):
            average_over_ranks(buffer, group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if f"{prefix}prices" in state_dict:
            # models saved before the causal correction existed route causally by the prices alone
            state_dict.setdefault(f"{prefix}causal_offset", torch.zeros_like(self.causal_offset))
            # models saved before the warm start had its own buffer warm-started from the average
            state_dict.setdefault(f"{prefix}warm_prices", state_dict[f"{prefix}prices"].clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _update_prices(self, prices_GE: torch.Tensor, apply: torch.Tensor | None = None) -> None:
        """The running average takes ``prices_GE`` (where the bool tensor ``apply`` is true), and
        their mean is the next solve's warm start."""
        # prices are defined up to a common shift (at capacity_factor 1); compare groups at mean 0
        centered_E = (prices_GE - prices_GE.mean(1, keepdim=True)).mean(0).to(self.prices.device)
        # a plain mean over the first updates, then the EMA; on the device (no host sync)
        updates = self.price_updates.to(self.prices.dtype)
        momentum = (updates / (updates + 1)).clamp(max=self.config.price_momentum)
        averaged_E = self.prices * momentum + (1 - momentum) * centered_E
        if apply is None:
            self.prices.copy_(averaged_E)
            self.warm_prices.copy_(centered_E)
            self.price_updates += 1
        else:
            self.prices.copy_(torch.where(apply, averaged_E, self.prices))
            self.warm_prices.copy_(torch.where(apply, centered_E, self.warm_prices))
            self.price_updates += apply.to(self.price_updates.dtype)


class FlowOnlyRouter(MaxScoreRouter):
    """Ablation "flow only": MaxScore's flow routing with plain softmax weights (t = 1 always;
    options: ``FlowOnlyRouterConfig``)."""

    config_class = FlowOnlyRouterConfig

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # models saved before flow_only's options were typed carry an unused schedule counter
        state_dict.pop(f"{prefix}schedule.step_count", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PaperMaxScoreRouter(MaxScoreRouter):
    """MaxScore with the paper's combine weights (options: ``PaperMaxScoreRouterConfig``)."""

    config_class = PaperMaxScoreRouterConfig
