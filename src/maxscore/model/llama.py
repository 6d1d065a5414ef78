"""A small LLaMA-style decoder whose MLPs are MoE layers (or dense, FLOP-matched).

RMSNorm, rotary position embeddings, causal attention through ``scaled_dot_product_attention``,
SwiGLU MLPs; pre-norm residual blocks; tied input/output embeddings.  The MoE layers take any
router of ``maxscore.routers``; ``router="dense"`` replaces them by one SwiGLU of hidden size
``k * expert_hidden``, which costs the same FLOPs per token as k experts (the paper's Dense
baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from maxscore._checks import check_int
from maxscore.moe import MoELayer, SwiGLU
from maxscore.moe.experts import count_parameters
from maxscore.routers import ROUTERS, GatedRouterConfig, router_config
from maxscore.routers.stats import RoutingStats

DENSE = "dense"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of the decoder and its MoE layers.

    ``router_options`` is the router's typed config (``maxscore.routers.router_config``); a dict
    of options (from the CLI or JSON) or None is turned into it with the current defaults.  A
    dense model has none.  ``from_saved`` reads a saved config (see ``SAVED_DEFAULTS``).
    """

    vocab_size: int = 8192
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    num_experts: int = 16
    k: int = 2
    expert_hidden: int = 512
    router: str = "maxscore"
    capacity_factor: float = 1.0
    router_options: GatedRouterConfig | Mapping | None = None
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "layers", "heads", "seq_len", "num_experts", "k", "expert_hidden"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} must be a multiple of 2 x heads={self.heads} (even head size)")
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} must be <= num_experts={self.num_experts}")
        if self.router != DENSE and self.router not in ROUTERS:
            raise ValueError(f"router must be 'dense' or one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.router == DENSE:
            if self.router_options:
                raise ValueError("router='dense' takes no router_options")
            object.__setattr__(self, "router_options", None)
        else:
            object.__setattr__(self, "router_options", router_config(self.router, self.router_options))

    @classmethod
    def from_saved(cls, values: Mapping) -> ModelConfig:
        """The config of a saved model (``asdict`` of one, from ``config.json`` or a checkpoint):
        router options it lacks take the defaults they had when it was saved."""
        values = dict(values)
        router, options = values.get("router", "maxscore"), values.get("router_options")
        if router != DENSE and router in ROUTERS and isinstance(options, Mapping):
            values["router_options"] = router_config(router, options, saved=True)
        return cls(**values)


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
        if config.router == DENSE:
            self.mlp = SwiGLU(config.dim, config.k * config.expert_hidden)
        else:
            self.mlp = MoELayer(
                config.dim,
                config.expert_hidden,
                config.num_experts,
                config.k,
                router=config.router,
                capacity_factor=config.capacity_factor,
                router_config=config.router_options,
            )

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
        return count_parameters(self, self.config.num_experts, self.config.k, active)
