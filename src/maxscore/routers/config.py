"""One MoE layer's settings in one typed config: experts, k, capacity factor, expert width,
the router and its typed options.  Routers and layers are built from it."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from maxscore._checks import check_int
from maxscore.solvers import expert_capacity

if TYPE_CHECKING:
    from maxscore.routers.base import GatedRouterConfig


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
        from maxscore.routers import router_config  # the registry imports every router module

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
    from maxscore.routers import router_config  # the registry imports every router module

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
    from maxscore.routers import router_name  # the registry imports every router module

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
