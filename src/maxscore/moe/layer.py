"""The MoE layer: route -> dispatch -> experts -> combine.

Capacity routers fill a static [E, C, D] buffer (one bmm per projection, no host sync);
dropless routings (``dropless``, ``deepseek_v3``, any router in causal mode) take the grouped
path.  A dropped choice contributes nothing: the layer's output for that token is the weighted
sum of its other experts (0 if all were dropped), and the model's residual connection carries
the token, as in GShard.  Padding tokens (``valid`` False) get output 0 and use no capacity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from maxscore._checks import check_int
from maxscore.moe.dispatch import LocalDispatcher
from maxscore.moe.experts import SwiGLU, SwiGLUExperts
from maxscore.routers import ROUTERS, GatedRouterConfig, MoEConfig, Router, RouterOutput, make_router
from maxscore.routers.stats import RoutingStats


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEOutput:
    """``output`` [B, L, D]; ``aux_loss`` float32 scalar (add it to the training loss);
    ``stats`` the routing statistics; ``routing`` the router's full output."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats
    routing: RouterOutput


class MoELayer(nn.Module):
    """A Mixture-of-Experts SwiGLU layer with a pluggable router.

    Args:
        dim: model dimension D.
        hidden: hidden size F of each expert.
        num_experts: E.
        k: experts per token.
        router: a name in ``maxscore.routers.ROUTERS`` (default ``"maxscore"``) or a module
            following the ``Router`` protocol.
        capacity_factor: capacity per routing group = ``ceil(capacity_factor * k * tokens / E)``.
        shared_hidden: hidden size of an always-on shared SwiGLU expert (0: none).
        router_config: the named router's config (``maxscore.routers.router_config``), or a
            dict of its options.
        **router_options: options of the named router by name, over ``router_config``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        k: int,
        router: str | nn.Module = "maxscore",
        capacity_factor: float = 1.0,
        *,
        shared_hidden: int = 0,
        router_config: GatedRouterConfig | Mapping | None = None,
        **router_options,
    ) -> None:
        super().__init__()
        for name, value, low in (("hidden", hidden, 1), ("shared_hidden", shared_hidden, 0)):
            check_int(name, value, low)
        if isinstance(router, str):
            router = make_router(
                router, dim, num_experts, k, capacity_factor, config=router_config, **router_options
            )
        elif router_config is not None or router_options or not isinstance(router, Router):
            raise ValueError("router must be a router name, or a Router module given without router_options")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.router = router
        self.experts = SwiGLUExperts(num_experts, dim, hidden)
        self.shared = SwiGLU(dim, shared_hidden) if shared_hidden else None
        # moves tokens to the experts and back; maxscore.parallel swaps in an all-to-all one
        self.dispatcher = LocalDispatcher()

    @classmethod
    def from_config(cls, dim: int, moe: MoEConfig, *, shared_hidden: int = 0) -> MoELayer:
        """The layer ``moe`` describes (its experts, k, capacity factor, router and options)."""
        if not isinstance(moe, MoEConfig):
            raise ValueError(f"moe must be a maxscore.MoEConfig, got {type(moe).__name__}")
        router = ROUTERS[moe.router](dim, moe)
        return cls(dim, moe.expert_hidden, moe.num_experts, moe.k, router, shared_hidden=shared_hidden)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, causal: bool = False) -> MoEOutput:
        """Routes and runs ``x`` [B, L, D].

        Args:
            x: float [B, L, D].
            valid: bool [B, L], False for padding; default all valid.
            causal: route every token independently of the others (see ``Router``);
                switched on automatically for single-token steps in eval mode (generation).
        """
        batch, length = self._check(x, valid)
        x_TD = x.reshape(-1, self.dim)
        valid_T = None if valid is None else valid.reshape(-1)
        causal = causal or (length == 1 and not self.training and self.router.has_causal_mode)
        routing = self.router(x_TD, valid_T, sequence_length=length, causal=causal)
        y_TD = self.dispatcher(x_TD, routing, self.experts)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if valid_T is not None:
            y_TD = y_TD * valid_T[:, None].to(y_TD.dtype)
        return MoEOutput(
            output=y_TD.view(batch, length, self.dim),
            aux_loss=routing.aux_loss,
            stats=routing.stats,
            routing=routing,
        )

    def _check(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[int, int]:
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or x.shape[2] != self.dim
            or not x.is_floating_point()
        ):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor of shape [B, L, D={self.dim}], got {got}")
        if x.shape[0] * x.shape[1] == 0:
            raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); pass at least one token")
        if valid is not None and (
            not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != x.shape[:2]
        ):
            got = (
                f"{valid.dtype} {tuple(valid.shape)}"
                if isinstance(valid, torch.Tensor)
                else type(valid).__name__
            )
            raise ValueError(f"valid must be a bool tensor of shape [B, L] = {list(x.shape[:2])}, got {got}")
        return x.shape[0], x.shape[1]
