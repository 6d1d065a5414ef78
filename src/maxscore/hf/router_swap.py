"""MaxScore routing inside existing HF MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3).

These models' sparse blocks call a top-k router module (``gate``: ``weight`` [E, D]; returns
router logits, top-k weights and top-k indices) and then their experts.  ``swap_router``
turns each such gate into a MaxScore gate in place: the same class (a subclass, so the
model's router-logit recording still finds it), the same ``weight`` (checkpoint keys are
unchanged), but the indices come from MaxScore's capacity-constrained optimal routing (every
expert at most its capacity, no token dropped) and the weights from the selected experts'
probabilities (SoftTopk with its temperature schedule when ``soft_topk=True``), renormalized
when the model renormalizes.  The experts, ``aux_loss`` and ``router_logits`` keep their
formats.  Each sequence is a routing group by default (``group="sequence"``; ``"batch"``
routes the whole forward batch as one group), with its capacity from its valid tokens: the
model's ``attention_mask`` reaches the gates (a forward pre-hook), padding gets no capacity and
zero weights, and a sequence's outputs depend neither on its padding nor on its neighbours.
Single-token steps in eval (generation with a KV cache) route causally from the averaged dual
prices.  The dual prices and the schedule live in ``gate.router`` (buffers,
saved with the model's state dict); the settings are recorded in ``config.maxscore_routing``
and ``load_swapped`` restores a saved swapped model.  DeepSeek-V3: sigmoid scores and its
``routed_scaling_factor`` are kept; its group-limited selection and its bias-based balancing
are replaced (MaxScore balances by capacity and chooses among all experts), and its
``e_score_correction_bias`` becomes the starting prices (``prices = mean(bias) - bias``).
HF's auxiliary loss recomputes a top-k from the logits; ``aux_loss`` chooses the loss of the
swapped routing instead (default), none, or HF's own.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from maxscore.gates import TemperatureScheduleConfig, router_scores, schedule_config
from maxscore.hf.upcycle import attention_mask_of
from maxscore.routers import ROUTERS, MoEConfig
from maxscore.routers.losses import attach_loss, load_balancing_loss

AUX_LOSSES = ("routing", "off", "hf")

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
    length, mask = self.sequence_length, self.attention_mask
    valid_T = None
    if length and mask is not None and mask.dim() == 2 and mask.shape[0] * length == x_TD.shape[0]:
        valid_T = mask[:, -length:].to(device=x_TD.device, dtype=torch.bool).reshape(-1)
    causal = self.causal_routing or (not self.training and length == 1)
    routing = self.router(x_TD, valid_T, sequence_length=length, causal=causal)
    router_logits = F.linear(x_TD.to(self.weight.dtype), self.weight)
    weights_TK = routing.weights * getattr(self, "routed_scaling_factor", 1.0)
    experts_TK = routing.experts
    if self.aux_loss_coef and self.training and torch.is_grad_enabled():  # from this routing
        probs_1TE = router_scores(router_logits.float(), self.router.score_function)[None]
        valid_1T = None if valid_T is None else valid_T[None]
        balance = load_balancing_loss(probs_1TE, experts_TK[None], valid_1T)
        weights_TK = attach_loss(weights_TK, self.aux_loss_coef * balance)
    if valid_T is not None:  # padding: any k distinct experts with weight 0 (the experts index them)
        fill_TK = torch.arange(experts_TK.shape[1], device=experts_TK.device).expand_as(experts_TK)
        experts_TK = torch.where(valid_T[:, None], experts_TK, fill_TK)
    return router_logits, weights_TK.to(router_logits.dtype), experts_TK


def _swapped_class(cls: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"MaxScore{cls.__name__}", (cls,), {"forward": _gate_forward})
    return _SWAPPED[cls]


def _record_length(gate: nn.Module):
    def hook(block: nn.Module, args: tuple) -> None:
        gate.sequence_length = args[0].shape[1] if args and args[0].dim() == 3 else None

    return hook


def _capture_mask(gates: list[nn.Module]):
    def hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = attention_mask_of(args, kwargs)
        for gate in gates:
            gate.attention_mask = mask

    return hook


def swap_router(
    model: nn.Module,
    *,
    capacity_factor: float = 1.0,
    method: str = "exact",
    soft_topk: bool = False,
    schedule: TemperatureScheduleConfig | dict | None = None,
    causal_routing: bool = False,
    group: str = "sequence",
    aux_loss: str = "routing",
) -> nn.Module:
    """Replaces the top-k routing of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3 model.

    Args:
        model: the HF model (``*ForCausalLM`` or its base model), modified in place.
        capacity_factor: capacity per routing group = ``ceil(capacity_factor * k * valid tokens / E)``.
        method: the MaxScore solver, ``exact`` (default), ``two_stage`` or ``sinkhorn``.
        soft_topk: SoftTopk weights with the temperature ``schedule`` (a config or a dict of its
            fields; default 4 -> 1 over 30000 optimizer steps); False keeps the plain
            probabilities.
        causal_routing: route every forward causally (price-based), e.g. for generation that
            must not depend on later tokens.
        group: ``"sequence"`` (default: each sequence is a routing group) or ``"batch"`` (the
            whole forward batch is one group, so sequences share capacity).
        aux_loss: the model's auxiliary balance loss.  HF's own (``output_router_logits``)
            recomputes a top-k from the router logits, so it ignores the swapped routing.
            ``"routing"`` (default): HF's is switched off (the model's ``router_aux_loss_coef``
            set to 0) and the Switch loss of MaxScore's routing, with HF's coefficient, is
            added to the training loss through the combine weights.  ``"off"``: no balance
            loss.  ``"hf"``: HF's own, unchanged (what models swapped before this switch did).
            Pass the ``*ForCausalLM`` model: its coefficient lives there.

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
    if group not in ("sequence", "batch"):
        raise ValueError(f"group must be 'sequence' or 'batch', got {group!r}")
    if aux_loss not in AUX_LOSSES:
        raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {aux_loss!r}")
    coefficient = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if aux_loss != "hf":  # HF's own loss would balance a top-k the model no longer uses
        for module in model.modules():
            if hasattr(module, "router_aux_loss_coef"):
                module.router_aux_loss_coef = 0.0
        if hasattr(config, "router_aux_loss_coef"):
            config.router_aux_loss_coef = 0.0
    settings = dict(
        capacity_factor=capacity_factor,
        method=method,
        soft_topk=soft_topk,
        schedule=asdict(schedule_config(schedule)) if soft_topk else None,  # stored resolved
        causal_routing=causal_routing,
        group=group,
        aux_loss=aux_loss,
        aux_loss_coef=coefficient if aux_loss != "hf" else 0.0,  # HF's coefficient, now ours
    )
    gates = [
        (block, block.gate)
        for block in model.modules()
        if type(getattr(block, "gate", None)).__name__ == SUPPORTED[family]
    ]
    for block, gate in gates:
        _swap(block, gate, settings)
    model.register_forward_pre_hook(_capture_mask([gate for _, gate in gates]), with_kwargs=True)
    config.maxscore_routing = settings
    return model


def _swap(block: nn.Module, gate: nn.Module, settings: dict) -> None:
    num_experts, hidden = gate.weight.shape
    normalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral always renormalizes
    name = "maxscore" if settings["soft_topk"] else "flow_only"
    options = {"soft_topk": True, "schedule": settings["schedule"]} if settings["soft_topk"] else {}
    options.update(
        method=settings["method"],
        group=settings["group"],
        balance_coef=0.0,
        normalize=normalize,
        score_function="sigmoid" if hasattr(gate, "e_score_correction_bias") else "softmax",
    )
    moe = MoEConfig(  # the router only: the model keeps its own experts (expert_hidden unused)
        num_experts=num_experts,
        k=gate.top_k,
        capacity_factor=settings["capacity_factor"],
        router=name,
        router_config=options,
    )
    router = ROUTERS[name](hidden, moe).to(gate.weight.device).train(gate.training)  # the model's mode
    del router.gate  # the router reads the model's own gate weight: one parameter, original key
    object.__setattr__(router, "gate", gate)  # a plain reference, not a submodule (no cycle)
    gate.__class__ = _swapped_class(type(gate))
    gate.router = router
    gate.causal_routing = settings["causal_routing"]
    gate.aux_loss_coef = settings["aux_loss_coef"] if settings["aux_loss"] == "routing" else 0.0
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None:  # DeepSeek-V3: top-k of score + bias is top-k of score - prices
        with torch.no_grad():
            router.prices.copy_(bias.float().mean() - bias.float())
            router.warm_prices.copy_(router.prices)
            # the bias counts as a full average: training moves the prices from it by the EMA
            router.price_updates.fill_(round(1 / (1 - router.config.price_momentum)))
    gate.sequence_length = None
    gate.attention_mask = None
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
    # saved before groups were a setting: batch; before the aux_loss switch: HF's own loss
    settings = {"group": "batch", "aux_loss": "hf", **settings}
    coefficient = settings.pop("aux_loss_coef", 0.0)  # HF's, saved as 0 in the config since
    swap_router(model, **settings)
    model.config.maxscore_routing["aux_loss_coef"] = coefficient
    swapped = tuple(_SWAPPED.values())
    for gate in (m for m in model.modules() if isinstance(m, swapped)):
        gate.aux_loss_coef = coefficient if settings["aux_loss"] == "routing" else 0.0
    saved = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        saved.update({_router_key(k): v for k, v in load_file(str(file)).items() if _router_key(k)})
    persistent = set(model.state_dict())  # the saved buffers (not the routers' check records)
    names = [name for name, _ in model.named_buffers() if _router_key(name) and name in persistent]
    missing = [name for name in names if _router_key(name) not in saved]
    if missing:
        raise ValueError(f"{path} lacks the router buffers {missing[:3]}...; was it saved after swap_router?")
    model.load_state_dict({name: saved[_router_key(name)] for name in names}, strict=False)
    return model


_ROUTER_KEY = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.(?:.+\.)?gate\.router\.(?P<name>.+)$")


def _router_key(name: str) -> tuple[str, str] | None:
    """A router buffer's key as (decoder layer, buffer) whatever the sparse block's module is
    called: transformers saves some families under legacy names (Mixtral's ``mlp`` is written as
    ``block_sparse_moe``), so saved and in-memory names differ between the layer and the gate."""
    match = _ROUTER_KEY.match(name)
    return None if match is None else (match["layer"], match["name"])
