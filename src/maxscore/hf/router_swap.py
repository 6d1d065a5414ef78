"""MaxScore routing inside existing HF MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3).

These models' sparse blocks call a top-k router module (``gate``: ``weight`` [E, D]; returns
router logits, top-k weights and top-k indices) and then their experts.  ``swap_router``
turns each such gate into a MaxScore gate in place: the same class (a subclass, so the
model's router-logit recording still finds it), the same ``weight`` (checkpoint keys are
unchanged), but the indices come from MaxScore's capacity-constrained optimal routing (every
expert at most its capacity, no token dropped) and the weights from the selected experts'
probabilities (SoftTopk with its temperature schedule when ``soft_topk=True``), renormalized
when the model renormalizes.  The experts, ``aux_loss`` and ``router_logits`` keep their
formats.  Single-token steps in eval (generation with a KV cache) route causally from the
averaged dual prices.  The dual prices and the schedule live in ``gate.router`` (buffers,
saved with the model's state dict); the settings are recorded in ``config.maxscore_routing``
and ``load_swapped`` restores a saved swapped model.  DeepSeek-V3: sigmoid scores and its
``routed_scaling_factor`` are kept; its group-limited selection and its bias-based balancing
are replaced (MaxScore balances by capacity and chooses among all experts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from maxscore.routers.maxscore import FlowOnlyRouter, MaxScoreRouter

SUPPORTED = {  # model_type -> the router module's class name
    "mixtral": "MixtralTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
}
_SWAPPED: dict[type, type] = {}


def _gate_forward(self, hidden_states: torch.Tensor):
    x_TD = hidden_states.reshape(-1, self.hidden_dim)
    causal = self.causal_routing or (not self.training and self.sequence_length == 1)
    routing = self.router(x_TD, causal=causal)
    router_logits = F.linear(x_TD.to(self.weight.dtype), self.weight)
    weights_TK = routing.weights * getattr(self, "routed_scaling_factor", 1.0)
    return router_logits, weights_TK.to(router_logits.dtype), routing.experts


def _swapped_class(cls: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"MaxScore{cls.__name__}", (cls,), {"forward": _gate_forward})
    return _SWAPPED[cls]


def _record_length(gate: nn.Module):
    def hook(block: nn.Module, args: tuple) -> None:
        gate.sequence_length = args[0].shape[1] if args and args[0].dim() == 3 else None

    return hook


def swap_router(
    model: nn.Module,
    *,
    capacity_factor: float = 1.0,
    method: str = "exact",
    soft_topk: bool = False,
    schedule: dict | None = None,
    causal_routing: bool = False,
) -> nn.Module:
    """Replaces the top-k routing of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 model.

    Args:
        model: the HF model (``*ForCausalLM`` or its base model), modified in place.
        capacity_factor: capacity per forward batch = ``ceil(capacity_factor * k * tokens / E)``.
        method: the MaxScore solver, ``exact`` (default), ``two_stage`` or ``sinkhorn``.
        soft_topk: SoftTopk weights with the temperature ``schedule`` (default 4 -> 1 over
            30000 optimizer steps); False keeps the plain probabilities.
        causal_routing: route every forward causally (price-based), e.g. for generation that
            must not depend on later tokens.

    Returns:
        ``model``.

    Raises:
        ValueError: an unsupported architecture (names the supported ones) or a model already swapped.
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED:
        raise ValueError(
            f"swap_router supports {sorted(SUPPORTED)} models, got model_type={family!r}; dense Llama, "
            "Qwen2 and Mistral models can be upcycled with maxscore.hf.upcycle"
        )
    if getattr(config, "maxscore_routing", None):
        raise ValueError("swap_router: this model's routers are already MaxScore routers")
    settings = dict(
        capacity_factor=capacity_factor,
        method=method,
        soft_topk=soft_topk,
        schedule=schedule,
        causal_routing=causal_routing,
    )
    gates = [
        (block, block.gate)
        for block in model.modules()
        if type(getattr(block, "gate", None)).__name__ == SUPPORTED[family]
    ]
    for block, gate in gates:
        _swap(block, gate, settings)
    config.maxscore_routing = settings
    return model


def _swap(block: nn.Module, gate: nn.Module, settings: dict) -> None:
    num_experts, hidden = gate.weight.shape
    normalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral always renormalizes
    router_class = MaxScoreRouter if settings["soft_topk"] else FlowOnlyRouter
    options = {"schedule": settings["schedule"]} if settings["schedule"] else {}
    router = router_class(
        hidden,
        num_experts,
        gate.top_k,
        settings["capacity_factor"],
        method=settings["method"],
        group="batch",
        balance_coef=0.0,
        normalize=normalize,
        score_function="sigmoid" if hasattr(gate, "e_score_correction_bias") else "softmax",
        **options,
    ).to(gate.weight.device)
    del router.gate  # the router reads the model's own gate weight: one parameter, original key
    object.__setattr__(router, "gate", gate)  # a plain reference, not a submodule (no cycle)
    gate.__class__ = _swapped_class(type(gate))
    gate.router = router
    gate.causal_routing = settings["causal_routing"]
    gate.sequence_length = None
    block.register_forward_pre_hook(_record_length(gate))


def load_swapped(path: str | Path, **from_pretrained_options) -> nn.Module:
    """A model saved after ``swap_router``: the HF model, swapped again, with its router buffers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_options)
    settings = getattr(model.config, "maxscore_routing", None)
    if not settings:
        raise ValueError(
            f"{path} was not saved from a model with swapped routers (no config.maxscore_routing)"
        )
    model.config.maxscore_routing = None
    swap_router(model, **settings)
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update({k: v for k, v in load_file(str(file)).items() if ".gate.router." in k})
    missing = [name for name, _ in model.named_buffers() if ".gate.router." in name and name not in state]
    if missing:
        raise ValueError(f"{path} lacks the router buffers {missing[:3]}...; was it saved after swap_router?")
    model.load_state_dict(state, strict=False)
    return model
