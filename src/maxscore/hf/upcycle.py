"""Dense Llama / Qwen2 / Mistral models upcycled into MaxScore MoE models, as HF classes.

``upcycle(model_or_config, num_experts, k)`` returns a ``MaxScore<Family>ForCausalLM``: the
dense model's attention, norms and embeddings, and in every decoder layer a MaxScore MoE layer
whose E experts start as copies of the dense MLP (plus optional noise) and whose router starts
small (near-uniform scores).  The classes are ordinary ``PreTrainedModel``s with their own
``model_type`` (``maxscore_llama``, ``maxscore_qwen2``, ``maxscore_mistral``) registered with
``AutoConfig`` / ``AutoModelForCausalLM``, so ``save_pretrained`` / ``from_pretrained`` round
trip, including the routers' dual prices and the SoftTopk schedule's step count (buffers).

Routing: full-sequence forwards route each sequence as a batch (capacity per sequence, from
its valid tokens: the ``attention_mask`` reaches the router, so padding uses no capacity and a
sequence's outputs depend neither on its padding nor on its neighbours); single-token steps in
eval (``generate`` with a KV cache) route causally from the averaged dual prices.
``causal_routing=True`` routes every forward causally, so ``generate`` gives the same tokens
with and without the cache.  Forwards return
``MoeCausalLMOutputWithPast`` with ``aux_loss`` (added to ``loss`` when labels are given) and,
with ``output_router_logits=True``, the router logits of every layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from maxscore.gates import TemperatureSchedule
from maxscore.moe.layer import MoELayer
from maxscore.routers import GatedRouterConfig, MoEConfig
from maxscore.routers import router_config as _router_config

DENSE_FAMILIES = {  # dense model_type -> (config class, model class)
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


class MaxScoreMLP(nn.Module):
    """The decoder layer's MLP slot: a ``MoELayer`` that keeps its last aux loss and logits."""

    def __init__(self, config) -> None:
        super().__init__()
        moe = MoEConfig(
            num_experts=config.num_experts,
            k=config.num_experts_per_tok,
            capacity_factor=config.capacity_factor,
            expert_hidden=config.intermediate_size,
            router=config.router,
            router_config=_router_config(config.router, config.router_options or {}, saved=True),
        )
        self.moe = MoELayer.from_config(config.hidden_size, moe)
        self.causal_routing = bool(config.causal_routing)
        self.attention_mask: torch.Tensor | None = None  # [B, past + L], set per forward by the model
        self.last_aux_loss: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.last_stats = None
        self.record_logits = False  # set per forward by the model (output_router_logits)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        valid_BL = current_valid(self.attention_mask, hidden_states)
        out = self.moe(hidden_states, valid=valid_BL, causal=self.causal_routing)
        self.last_aux_loss, self.last_stats = out.aux_loss, out.stats
        if self.record_logits:  # a second [T, E] gate product, only when the caller asks for it
            self.last_logits = self.moe.router.logits(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return out.output.to(hidden_states.dtype)


def current_valid(attention_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """bool [B, L]: the valid tokens of this forward's [B, L, D] states, from a 2-D attention mask
    over past and current tokens (the current ones are its last L columns); None without one."""
    if attention_mask is None or attention_mask.dim() != 2 or hidden_states.dim() != 3:
        return None
    batch, length = hidden_states.shape[:2]
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        return None
    return attention_mask[:, -length:].to(device=hidden_states.device, dtype=torch.bool)


def attention_mask_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``attention_mask`` a HF ``forward(input_ids, attention_mask, ...)`` call received."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, torch.Tensor) else None


def _family(family: str):
    base_config, base_model = DENSE_FAMILIES[family]
    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[family]

    class Config(base_config):
        model_type = f"maxscore_{family}"
        num_experts: int = 8
        num_experts_per_tok: int = 2
        capacity_factor: float = 1.0
        router: str = "maxscore"
        router_options: dict | None = None
        causal_routing: bool = False
        router_aux_loss_coef: float = 1.0

    class Model(base_model):
        config_class = Config

        def __init__(self, config) -> None:
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = MaxScoreMLP(config)

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            model = super().from_pretrained(*args, **kwargs)
            sync_schedules(model)  # the step counts were loaded into buffers
            return model

        def forward(self, *args, labels=None, output_router_logits: bool | None = None, **kwargs):
            mlps = [layer.mlp for layer in self.model.layers]
            mask = attention_mask_of(args, kwargs)
            for m in mlps:
                m.record_logits = bool(output_router_logits)
                m.attention_mask = mask
            out = super().forward(*args, labels=labels, **kwargs)
            aux_loss = sum(m.last_aux_loss for m in mlps) * self.config.router_aux_loss_coef
            loss = None if out.loss is None else out.loss + aux_loss.to(out.loss.dtype)
            logits = tuple(m.last_logits for m in mlps) if output_router_logits else None
            return MoeCausalLMOutputWithPast(
                loss=loss,
                aux_loss=aux_loss,
                logits=out.logits,
                past_key_values=out.past_key_values,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
                router_logits=logits,
            )

    Config.__name__ = Config.__qualname__ = f"MaxScore{name}Config"
    Model.__name__ = Model.__qualname__ = f"MaxScore{name}ForCausalLM"
    Config.__module__ = Model.__module__ = __name__
    AutoConfig.register(Config.model_type, Config, exist_ok=True)
    AutoModelForCausalLM.register(Config, Model, exist_ok=True)
    return Config, Model


MaxScoreLlamaConfig, MaxScoreLlamaForCausalLM = _family("llama")
MaxScoreQwen2Config, MaxScoreQwen2ForCausalLM = _family("qwen2")
MaxScoreMistralConfig, MaxScoreMistralForCausalLM = _family("mistral")
MOE_FAMILIES = {
    "llama": MaxScoreLlamaForCausalLM,
    "qwen2": MaxScoreQwen2ForCausalLM,
    "mistral": MaxScoreMistralForCausalLM,
}


def upcycle(
    model_or_config,
    num_experts: int | None = None,
    k: int = 2,
    *,
    capacity_factor: float = 1.0,
    noise: float = 0.0,
    router: str = "maxscore",
    router_std: float = 1e-3,
    causal_routing: bool = False,
    seed: int = 0,
    router_config: GatedRouterConfig | Mapping | None = None,
    moe: MoEConfig | None = None,
    **router_options,
) -> PreTrainedModel:
    """A MaxScore MoE model from a dense Llama / Qwen2 / Mistral model (or a fresh one from a config).

    Args:
        model_or_config: a dense ``*ForCausalLM`` (its weights are copied) or its config.
        num_experts: E; every expert starts as a copy of the dense MLP.
        k: experts per token.  With E = 1, k = 1 the model computes what the dense one did.
        capacity_factor: of the MaxScore router (capacity per sequence).
        noise: relative std of Gaussian noise added to each expert copy (breaks their symmetry).
        router: a name in ``maxscore.routers.ROUTERS``.
        router_std: std of the router's initial weights (small: near-uniform scores).
        causal_routing: route every forward causally (see the module docstring).
        seed: of the noise and the router initialization.
        router_config: the router's config (``maxscore.routers.router_config``) or a dict of
            its options; the model's config stores it complete (``router_options``).
        moe: the MoE layers as one ``MoEConfig`` (its experts, k, capacity factor, router and
            options), instead of ``num_experts``, ``k``, ``capacity_factor``, ``router``,
            ``router_config`` and ``router_options``; its ``expert_hidden`` is ignored (the
            experts are copies of the dense MLP, of its width).
        **router_options: options of the router by name, over ``router_config``, e.g.
            ``method="two_stage"``, ``schedule={"steps": 1000}``.
    """
    if moe is None:
        if num_experts is None:
            raise ValueError("upcycle needs num_experts (or moe=maxscore.MoEConfig(...))")
        moe = MoEConfig(
            num_experts=num_experts,
            k=k,
            capacity_factor=capacity_factor,
            router=router,
            router_config=_router_config(router, router_config, **router_options),
        )
    elif not isinstance(moe, MoEConfig) or num_experts is not None or router_config or router_options:
        raise ValueError(
            "upcycle takes either moe=maxscore.MoEConfig(...) or num_experts, k, capacity_factor, router "
            "and its options, not both"
        )
    dense = model_or_config if isinstance(model_or_config, PreTrainedModel) else None
    config = dense.config if dense is not None else model_or_config
    family = getattr(config, "model_type", None)
    if family not in DENSE_FAMILIES:
        raise ValueError(
            f"upcycle supports dense {sorted(DENSE_FAMILIES)} models, got model_type={family!r}; "
            "for MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) use maxscore.hf.swap_router"
        )
    moe_class = MOE_FAMILIES[family]
    settings = dict(
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.k,
        capacity_factor=moe.capacity_factor,
        router=moe.router,
        router_options=moe.router_config.to_dict(),
        causal_routing=causal_routing,
    )
    moe_config = moe_class.config_class(
        **{**config.to_dict(), **settings, "model_type": moe_class.config_class.model_type}
    )
    generator = torch.Generator().manual_seed(seed)
    moe = moe_class(moe_config)
    if dense is not None:
        moe.load_state_dict(_without_mlps(dense.state_dict()), strict=False)
        for dense_layer, layer in zip(dense.model.layers, moe.model.layers, strict=True):
            _copy_mlp(dense_layer.mlp, layer.mlp.moe, noise, generator)
    for layer in moe.model.layers:
        gate = layer.mlp.moe.router.gate.weight
        with torch.no_grad():
            gate.copy_(torch.randn(gate.shape, generator=generator) * router_std)
    return moe.to(next(dense.parameters()).dtype) if dense is not None else moe


def _without_mlps(state: dict) -> dict:
    return {name: value for name, value in state.items() if ".mlp." not in name}


@torch.no_grad()
def _copy_mlp(mlp: nn.Module, moe: MoELayer, noise: float, generator: torch.Generator) -> None:
    if getattr(mlp, "gate_proj", None) is None or getattr(mlp.gate_proj, "bias", None) is not None:
        raise ValueError("upcycle needs a bias-free SwiGLU MLP (gate_proj, up_proj, down_proj)")
    pairs = (
        ("w_gate", mlp.gate_proj.weight.T),
        ("w_up", mlp.up_proj.weight.T),
        ("w_down", mlp.down_proj.weight.T),
    )
    for name, weight in pairs:
        target = getattr(moe.experts, name)
        copies = weight.float()[None].expand(target.shape).clone()
        if noise:
            copies += torch.randn(copies.shape, generator=generator) * noise * weight.float().std()
        target.copy_(copies)


def sync_schedules(model: nn.Module) -> None:
    """Re-reads every SoftTopk schedule's step count from its buffer (after loading weights)."""
    for module in model.modules():
        if isinstance(module, TemperatureSchedule):
            module.sync()
