"""One MoE layer's settings in one typed config: experts, k, capacity factor, expert width,
the router and its typed options.  Routers and layers are built from it.

Also here: the options every built-in router takes (``GatedRouterConfig``, which each router's
config extends) and the registry of routers by name (``ROUTERS``, filled by ``maxscore.routers``)
with the lookups a config needs: ``router_config``, ``router_name``, ``router_options``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from maxscore._checks import check_int
from maxscore.gates import SCORE_FUNCTIONS
from maxscore.solvers import expert_capacity
from maxscore.solvers.exact.device import VALIDATE

GROUPS = ("sequence", "batch")
ALL_GROUPS = GROUPS + ("global",)


# name -> router class, in listing order: filled by ``maxscore.routers``, which imports every
# router module (a router module imports this one, so this one imports none of them)
ROUTERS: dict[str, type] = {}


def _check_coefficient(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0 (0 disables it), got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class GatedRouterConfig:
    """Options every built-in router takes; each router's config (``<Router>Config``) derives
    from this one with the router's own defaults and options.

    Attributes:
        group: ``"sequence"`` (one routing group per sequence), ``"batch"``, or for MaxScore
            ``"global"`` (see ``maxscore.routers.base``).
        balance_coef: weight of the load-balancing loss (0 disables it).
        z_coef: weight of the router z-loss (0 disables it).
        score_function: ``"softmax"`` or ``"sigmoid"``.
        normalize: renormalize each token's combine weights to sum to 1.
        validate: ``"deferred"``: on an accelerator, bad input (non-finite logits, what the
            exact solver flags) is recorded on the device and raised at the next check point
            (``maxscore.routers.check_routing``, once per optimizer step), so a routing step
            waits for nothing on the host; ``"eager"``: raised at every call (for debugging).
            On the CPU both raise at the call.
    """

    score_functions: ClassVar[tuple[str, ...]] = SCORE_FUNCTIONS

    group: str = "sequence"
    balance_coef: float = 0.01
    z_coef: float = 0.0
    score_function: str = "softmax"
    normalize: bool = False
    validate: str = "deferred"

    def __post_init__(self) -> None:
        if self.group not in ALL_GROUPS:
            raise ValueError(f"group must be one of {ALL_GROUPS}, got {self.group!r}")
        if self.score_function not in self.score_functions:
            raise ValueError(
                f"score_function must be one of {self.score_functions}, got {self.score_function!r}"
            )
        _check_coefficient("balance_coef", self.balance_coef)
        _check_coefficient("z_coef", self.z_coef)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.validate not in VALIDATE:
            raise ValueError(f"validate must be 'deferred' or 'eager', got {self.validate!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> GatedRouterConfig:
        """The config from keyword options (JSON values welcome); unknown names are ValueErrors."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; it accepts {names}")
        return cls(**options)

    def to_dict(self) -> dict:
        """Every option by name, nested configs as dicts (JSON-ready; ``from_options`` reads it)."""
        return asdict(self)

    def label(self, router: str) -> str:
        """How reports name ``router`` run with this config."""
        return router

    @property
    def scheduled(self) -> bool:
        """True when the combine weights follow the config's SoftTopk ``schedule``."""
        return False


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """An MoE layer.

    Attributes:
        num_experts: E.
        k: experts per token, 1 <= k <= E.
        capacity_factor: capacity per routing group is
            ``ceil(capacity_factor * k * valid tokens / E)``.
        expert_hidden: hidden size of each SwiGLU expert.
        router: a name of ``maxscore.routers.ROUTERS``.
        router_config: the router's options: its typed config (``<Router>Config``), a dict of
            them, or None for the defaults; stored typed.
    """

    num_experts: int = 16
    k: int = 2
    capacity_factor: float = 1.0
    expert_hidden: int = 512
    router: str = "maxscore"
    router_config: GatedRouterConfig | Mapping | None = None

    def __post_init__(self) -> None:
        for name in ("num_experts", "expert_hidden"):
            check_int(name, getattr(self, name))
        expert_capacity(0, self.num_experts, self.k, self.capacity_factor)  # checks k, capacity_factor
        object.__setattr__(self, "capacity_factor", float(self.capacity_factor))
        object.__setattr__(self, "router_config", router_config(self.router, self.router_config))

    def to_dict(self) -> dict:
        """Every setting by name, the router's options as a dict (JSON-ready)."""
        values = {
            name: getattr(self, name) for name in ("num_experts", "k", "capacity_factor", "expert_hidden")
        }
        return {**values, "router": self.router, "router_config": asdict(self.router_config)}


def legacy_moe_config(
    router: str,
    num_experts: int,
    k: int,
    capacity_factor: float = 1.0,
    *,
    expert_hidden: int | None = None,
    config: GatedRouterConfig | Mapping | None = None,
    options: Mapping | None = None,
    where: str | None = None,
    stacklevel: int = 3,
) -> MoEConfig:
    """The one conversion of the flat settings of older APIs (``num_experts``, ``k``,
    ``capacity_factor`` beside the router's options) into a ``MoEConfig``.

    ``where`` names the form a user wrote in code: it then warns that the form is deprecated
    (``stacklevel`` pointing at the user's line).
    """
    if where is not None:
        warnings.warn(
            f"{where} with num_experts, k and capacity_factor is deprecated; pass "
            "moe=maxscore.MoEConfig(num_experts=..., k=..., capacity_factor=..., router=..., "
            "router_config=...) instead",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
    typed = router_config(router, config, **dict(options or {}))
    extra = {} if expert_hidden is None else {"expert_hidden": expert_hidden}
    return MoEConfig(
        num_experts=num_experts,
        k=k,
        capacity_factor=capacity_factor,
        router=router,
        router_config=typed,
        **extra,
    )


def legacy_router_moe(router_class: type, num_experts: object, args: tuple, kwargs: dict) -> MoEConfig:
    """A router built the older way, ``Router(dim, num_experts, k, capacity_factor=1.0, *,
    config=None, **options)``: its arguments as a ``MoEConfig`` (``legacy_moe_config``, warns)."""
    if len(args) > 2:
        raise ValueError(f"{router_class.__name__}: too many positional arguments {args}")
    flat = dict(zip(("k", "capacity_factor"), args, strict=False))
    num_experts = kwargs.pop("num_experts", num_experts)
    k = flat.get("k", kwargs.pop("k", None))
    capacity_factor = flat.get("capacity_factor", kwargs.pop("capacity_factor", 1.0))
    for name, value in (("num_experts", num_experts), ("k", k)):
        check_int(name, value)
    config = kwargs.pop("config", None)
    return legacy_moe_config(
        router_name(router_class),
        num_experts,
        k,
        capacity_factor,
        config=router_class.make_config(config, **kwargs),
        where=f"{router_class.__name__}(dim, num_experts, k, ...)",
        stacklevel=4,
    )


# Defaults as they were before any router default changed.  A config read from a file is
# completed from these, so a model saved with a partial dict keeps the behaviour it was
# trained with; configs written now are complete (``router_config(...).to_dict()``).
_PAPER_SCHEDULE = {"start": 4.0, "end": 1.0, "steps": 30000, "kind": "linear"}
_SIGN_CAUSAL = {"causal_update": "sign"}  # the causal correction before its quantile rule
SAVED_DEFAULTS: dict[str, dict] = {
    "maxscore": {"normalize": False, "soft_topk": True, "schedule": _PAPER_SCHEDULE, **_SIGN_CAUSAL},
    "flow_only": _SIGN_CAUSAL,
    "maxscore_paper": _SIGN_CAUSAL,
    "softtopk_only": {"schedule": _PAPER_SCHEDULE},
}


def router_options(name: str) -> tuple[str, ...]:
    """Option names of router ``name``: the fields of its config class."""
    return tuple(f.name for f in fields(registered_router(name).config_class))


def router_config(
    name: str, config: GatedRouterConfig | Mapping | None = None, *, saved: bool = False, **options
) -> GatedRouterConfig:
    """The typed config of router ``name``: ``config`` (a config, a dict of options, or None
    for the defaults) with ``options`` set over it.

    ``saved=True`` marks a dict read from a file (``config.json``, a checkpoint, an HF
    config): options it lacks take ``SAVED_DEFAULTS`` (nested dicts field by field) before the
    current defaults.
    """
    if saved and isinstance(config, Mapping):
        config = _merged(SAVED_DEFAULTS.get(name, {}), config)
    return registered_router(name).make_config(config, **options)


def router_name(router_class: type) -> str:
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


def registered_router(name: str) -> type:
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}")
    return ROUTERS[name]


def _merged(defaults: Mapping, given: Mapping) -> dict:
    merged = dict(defaults)
    for key, value in given.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _merged(merged[key], value) if both else value
    return merged
