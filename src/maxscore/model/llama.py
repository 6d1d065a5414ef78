"""A small LLaMA-style decoder whose MLPs are MoE layers (or dense, FLOP-matched).

RMSNorm, rotary position embeddings, causal attention through ``scaled_dot_product_attention``,
SwiGLU MLPs; pre-norm residual blocks; tied input/output embeddings.  The MoE layers take any
router of ``maxscore.routers``, built from the config's ``MoEConfig``; a dense model
(``moe=None``) has one SwiGLU of hidden size ``dense_hidden`` instead, by default ``k *
expert_hidden``, which costs the same FLOPs per token as k experts (the paper's Dense baseline).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import InitVar, dataclass

import torch
from torch import nn

from maxscore._checks import check_int
from maxscore.moe import MoELayer, SwiGLU
from maxscore.moe.experts import count_parameters
from maxscore.routers import ROUTERS, GatedRouterConfig, MoEConfig, router_config
from maxscore.routers.config import legacy_moe_config
from maxscore.routers.stats import RoutingStats

MOE_SETTINGS = ("num_experts", "k", "capacity_factor", "expert_hidden", "router", "router_options")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the decoder and its MLPs.

    Attributes:
        moe: the MoE layers' settings (experts, k, capacity factor, expert width, router and its
            typed options), or None for a dense model.
        dense_hidden: the width of a dense model's SwiGLU MLP (``moe=None`` only); default
            ``k * expert_hidden`` of the default ``MoEConfig``: the FLOPs per token of k experts.

    The older flat form, ``ModelConfig(num_experts=..., k=..., capacity_factor=...,
    expert_hidden=..., router=..., router_options=...)``, still works and warns (converted by
    ``moe_from_flat``, which also reads its word for a dense model).  ``from_saved`` reads a saved config of
    either form (see ``SAVED_DEFAULTS``).
    """

    vocab_size: int = 8192
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    moe: MoEConfig | None = MoEConfig()
    dense_hidden: int | None = None
    rope_base: float = 10000.0
    num_experts: InitVar[int | None] = None
    k: InitVar[int | None] = None
    capacity_factor: InitVar[float | None] = None
    expert_hidden: InitVar[int | None] = None
    router: InitVar[str | None] = None
    router_options: InitVar[GatedRouterConfig | Mapping | None] = None

    def __post_init__(self, *flat) -> None:
        given = {name: value for name, value in zip(MOE_SETTINGS, flat, strict=True) if value is not None}
        if given:
            moe, dense_hidden = moe_from_flat(given, self, where="ModelConfig(...)")
            object.__setattr__(self, "moe", moe)
            object.__setattr__(self, "dense_hidden", dense_hidden)
        for name in ("vocab_size", "dim", "layers", "heads", "seq_len"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} must be a multiple of 2 x heads={self.heads} (even head size)")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a maxscore.MoEConfig or None (dense), got {self.moe!r}")
        if self.moe is not None and self.dense_hidden is not None:
            raise ValueError(
                "dense_hidden is the MLP width of a dense model (moe=None); leave it unset with moe"
            )
        if self.moe is None:
            default = MoEConfig()
            width = default.k * default.expert_hidden if self.dense_hidden is None else self.dense_hidden
            check_int("dense_hidden", width)
            object.__setattr__(self, "dense_hidden", width)

    @property
    def dense(self) -> bool:
        """A dense model: one SwiGLU MLP per block, no MoE layer."""
        return self.moe is None

    @classmethod
    def from_saved(cls, values: Mapping) -> ModelConfig:
        """The config of a saved model (``config.json``, a checkpoint), nested (``moe``) or flat
        (older runs): router options it lacks take the defaults they had when it was saved."""
        values = dict(values)
        flat = {name: values.pop(name) for name in MOE_SETTINGS if name in values}
        if flat:  # an older, flat config: converted without a warning (the user wrote no code)
            moe, dense_hidden = moe_from_flat(flat, saved=True)
            return cls(**values, moe=moe, dense_hidden=dense_hidden)
        moe = values.pop("moe", None)
        if isinstance(moe, Mapping):
            moe = dict(moe)
            name = moe.get("router", "maxscore")
            moe["router_config"] = router_config(name, moe.get("router_config") or {}, saved=True)
            moe = MoEConfig(**moe)
        return cls(**values, moe=moe)


def moe_from_flat(
    flat: Mapping, base: ModelConfig | None = None, *, where: str | None = None, saved: bool = False
) -> tuple[MoEConfig | None, int | None]:
    """The one conversion of the flat MoE settings (``num_experts``, ``k``, ``capacity_factor``,
    ``expert_hidden``, ``router``, ``router_options``; ``router="dense"`` for no MoE) into
    ``(moe, dense_hidden)``: the flat fields of ``ModelConfig(...)`` (``where`` names that form: it
    warns), ``--set k=...`` and ``--set router=dense``, the variants' ``:capacity_factor=`` and the
    configs saved by older versions (``saved``: router options they lack take ``SAVED_DEFAULTS``).

    Settings not in ``flat`` keep ``base``'s (a dense base: the ``MoEConfig`` defaults); another
    router's options do not carry over.
    """
    unknown = sorted(set(flat) - set(MOE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown MoE setting(s) {unknown}; the settings are {list(MOE_SETTINGS)}")
    old = base.moe if base is not None and base.moe is not None else MoEConfig()
    values = {
        "num_experts": old.num_experts,
        "k": old.k,
        "capacity_factor": old.capacity_factor,
        "expert_hidden": old.expert_hidden,
        "router": "dense" if base is not None and base.moe is None else old.router,
    }
    values.update(flat)
    router = values["router"]
    if router != "dense" and router not in ROUTERS:
        raise ValueError(f"router must be 'dense' or one of {sorted(ROUTERS)}, got {router!r}")
    options = flat.get("router_options")
    if "router_options" not in flat and router == old.router:
        options = old.router_config
    if router == "dense":  # the flat form's word for a dense model
        if options:
            raise ValueError("router='dense' takes no router_options")
        for name in ("k", "expert_hidden"):
            check_int(name, values[name])
        if where is not None:
            _warn_flat(where, "moe=None (a dense model), dense_hidden=...")
        return None, values["k"] * values["expert_hidden"]
    if saved and isinstance(options, Mapping):
        options = router_config(router, options, saved=True)
    moe = legacy_moe_config(
        router,
        values["num_experts"],
        values["k"],
        values["capacity_factor"],
        expert_hidden=values["expert_hidden"],
        config=options,
    )
    if where is not None:
        _warn_flat(where, "moe=maxscore.MoEConfig(num_experts=..., k=..., router=..., ...)")
    return moe, None


def _warn_flat(where: str, instead: str) -> None:
    warnings.warn(
        f"{where} with the flat MoE settings (num_experts, k, capacity_factor, expert_hidden, router, "
        f"router_options) is deprecated; pass {instead} instead",
        DeprecationWarning,
        stacklevel=5,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim / 2] of the rotary embedding."""
    inverse = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inverse)
    return angles.cos().float(), angles.sin().float()


def rotate(x_BHLd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    even, odd = x_BHLd[..., 0::2], x_BHLd[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x_BHLd)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = RMSNorm(config.dim), RMSNorm(config.dim)
        self.attention = Attention(config)
        if config.moe is None:
            self.mlp = SwiGLU(config.dim, config.dense_hidden)
        else:
            self.mlp = MoELayer.from_config(config.dim, config.moe)

    def forward(self, x, cos, sin, valid, causal):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoELayer):
            out = self.mlp(h, valid, causal=causal)
            return x + out.output, out.aux_loss, out.stats
        return x + self.mlp(h), h.new_zeros((), dtype=torch.float32), None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelOutput:
    """``logits`` [B, L, V]; ``aux_loss`` summed over layers; ``stats`` per MoE layer."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: list[RoutingStats]


class Decoder(nn.Module):
    """The decoder: embeddings -> blocks -> RMSNorm -> tied output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim)
        cos, sin = rotary_tables(config.seq_len, config.dim // config.heads, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        depth_scale = 1 / math.sqrt(2 * self.config.layers)
        for block in self.blocks:
            nn.init.normal_(block.attention.qkv.weight, std=0.02)
            nn.init.normal_(block.attention.out.weight, std=0.02 * depth_scale)
            if isinstance(block.mlp, MoELayer):
                experts = block.mlp.experts
                for weight in (experts.w_gate, experts.w_up):
                    nn.init.normal_(weight, std=0.02)
                nn.init.normal_(experts.w_down, std=0.02 * depth_scale)
            else:
                for linear in (block.mlp.w_gate, block.mlp.w_up):
                    nn.init.normal_(linear.weight, std=0.02)
                nn.init.normal_(block.mlp.w_down.weight, std=0.02 * depth_scale)

    def forward(self, tokens_BL: torch.Tensor, valid_BL: torch.Tensor | None = None, causal: bool = False):
        length = tokens_BL.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len={self.config.seq_len}")
        x = self.embed(tokens_BL)
        cos, sin = self.cos[:length], self.sin[:length]
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats = []
        for block in self.blocks:
            x, block_aux, block_stats = block(x, cos, sin, valid_BL, causal)
            aux_loss = aux_loss + block_aux
            if block_stats is not None:
                stats.append(block_stats)
        logits = nn.functional.linear(self.norm(x), self.embed.weight)
        return ModelOutput(logits=logits, aux_loss=aux_loss, stats=stats)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (k of E experts); experts sharded over ranks
        count in full."""
        moe = self.config.moe
        if moe is None:
            return count_parameters(self, 1, 1, active)
        return count_parameters(self, moe.num_experts, moe.k, active)
