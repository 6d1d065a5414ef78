"""The built-in decoder as a model that transformers and the serving engines run natively.

A served model routes causally: each token alone, by the rule its routers state
(``maxscore.routers.causal.CausalRule``): the top-k of ``values + bias`` per token, weights from
the chosen scores.  Two architectures that transformers, vLLM and SGLang already run compute
that rule when ``bias`` is their per-expert ``e_score_correction_bias``:

- ``ernie4_5_moe`` (``Ernie4_5_MoeForCausalLM``): softmax scores in float32, top-k of
  ``softmax + bias``, the chosen softmax scores renormalized; interleaved rotary pairs (the
  decoder's own layout), tied embeddings, no shared expert;
- ``glm4_moe`` (``Glm4MoeForCausalLM``): sigmoid scores, top-k of ``sigmoid + bias`` (within
  ``topk_group`` of ``n_group`` groups), optionally renormalized, times
  ``routed_scaling_factor``; half-split rotary (the rows of q and k permuted within each head,
  which leaves every attention score unchanged), an explicit ``lm_head`` (vLLM and SGLang never
  tie it) and a shared expert of zero weights (its output is exactly 0);
- ``maxscore``: any causal rule, by the modeling code ``modeling_maxscore_moe.py`` written into
  the folder (``trust_remote_code=True``; no maxscore import).

``serving_problems`` names what keeps a run out of a format; ``auto_format`` picks the first
native one that represents it.  The router weights and biases stay float32.
"""

from __future__ import annotations

import torch
from torch import nn

from maxscore.model import Decoder
from maxscore.routers.causal import CausalRule

FORMATS = ("ernie4_5_moe", "glm4_moe", "maxscore")
REMOTE_CODE = "modeling_maxscore_moe.py"


def causal_rules(model: Decoder) -> list[CausalRule]:
    """Each MoE layer's causal rule, as evaluation uses it (the routers in eval mode)."""
    if model.config.moe is None:
        raise ValueError("a dense run has no MoE layer; it exports as LlamaForCausalLM (--format auto)")
    routers = [block.mlp.router for block in model.blocks]
    if not routers[0].has_causal_mode:
        raise ValueError(
            f"router={model.config.moe.router!r} has no causal mode (an expert's choice of a token depends "
            "on the other tokens), so no format can serve it token by token"
        )
    return [router.causal_rule() for router in routers]


def serving_problems(rule: CausalRule, format: str) -> list[str]:
    """Why ``format`` cannot represent ``rule`` (empty: it can)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {('auto',) + FORMATS}, got {format!r}")
    if format == "maxscore":  # its own modeling code computes every rule
        return []
    problems = []
    if rule.temperature != 1.0:
        problems.append(f"SoftTopk combine weights (temperature {rule.temperature:g}, not the plain scores)")
    if rule.values != "scores":
        problems.append("the router selects on its log-scores with a bias (a bias on the logits)")
    if format == "ernie4_5_moe":
        if rule.score_function != "softmax":
            problems.append(f"{rule.score_function} scores (ernie4_5_moe scores by softmax)")
        if not rule.normalize:
            problems.append("weights not renormalized (ernie4_5_moe always renormalizes)")
        if rule.scaling != 1.0:
            problems.append(f"weights scaled by {rule.scaling:g}")
        if rule.num_groups > 1:
            problems.append("group-limited routing")
    elif rule.score_function != "sigmoid":
        problems.append(f"{rule.score_function} scores (glm4_moe scores by sigmoid)")
    return problems


def auto_format(rule: CausalRule) -> str:
    """``ernie4_5_moe`` for softmax gates with renormalized weights, ``glm4_moe`` for sigmoid
    gates, else ``maxscore``."""
    for format in FORMATS[:-1]:
        if not serving_problems(rule, format):
            return format
    return "maxscore"


def serving_model(model: Decoder, format: str = "auto") -> tuple[nn.Module, str]:
    """The decoder as a transformers model of ``format`` (``auto``: ``auto_format``; checked with
    ``serving_problems``), and the format written."""
    rules = causal_rules(model)
    format = auto_format(rules[0]) if format == "auto" else format
    problems = serving_problems(rules[0], format)
    if problems:
        able = [f for f in FORMATS if not serving_problems(rules[0], f)]
        raise ValueError(
            f"--format {format} cannot represent this run: {'; '.join(problems)}; formats that can: {able}"
        )
    build = {"ernie4_5_moe": _ernie, "glm4_moe": _glm, "maxscore": _remote}[format]
    return _loaded(build(model, rules), _state(model, rules, format)), format


def llama_model(model: Decoder) -> nn.Module:
    """A dense decoder as a plain ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**_shape(model), intermediate_size=model.config.dense_hidden))
    return _loaded(hf, _attention_state(model, half_split=True))


def _loaded(hf: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``hf`` with every weight of ``state`` (all it has but a tied ``lm_head``), in eval mode."""
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
    if unexpected or set(missing) != tied:
        raise RuntimeError(f"export: unmapped weights (missing {missing}, unexpected {unexpected})")
    if tied:
        hf.tie_weights()
    return hf.eval()


def _shape(model: Decoder) -> dict:
    config = model.config
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len,
        rms_norm_eps=model.norm.eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def _ernie(model: Decoder, rules: list[CausalRule]) -> nn.Module:
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    moe = model.config.moe
    config = Ernie4_5_MoeConfig(
        **_shape(model),
        intermediate_size=moe.expert_hidden,
        use_bias=False,
        moe_intermediate_size=moe.expert_hidden,
        moe_k=moe.k,
        moe_num_experts=moe.num_experts,
        moe_num_shared_experts=0,
        moe_layer_start_index=0,
        moe_layer_end_index=model.config.layers - 1,
        moe_layer_interval=1,
        moe_norm_min=torch.finfo(torch.float32).tiny,
    )
    return Ernie4_5_MoeForCausalLM(config)


def _glm(model: Decoder, rules: list[CausalRule]) -> nn.Module:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    moe, rule = model.config.moe, rules[0]
    shape = _shape(model)
    shape["rope_parameters"]["partial_rotary_factor"] = 1.0
    config = Glm4MoeConfig(
        **{**shape, "tie_word_embeddings": False},
        head_dim=model.config.dim // model.config.heads,
        partial_rotary_factor=1.0,
        intermediate_size=moe.expert_hidden,
        moe_intermediate_size=moe.expert_hidden,
        num_experts_per_tok=moe.k,
        n_routed_experts=moe.num_experts,
        n_shared_experts=1,
        routed_scaling_factor=rule.scaling,
        n_group=rule.num_groups,
        topk_group=rule.top_groups,
        first_k_dense_replace=0,
        norm_topk_prob=rule.normalize,
        use_qk_norm=False,
        attention_bias=False,
    )
    return Glm4MoeForCausalLM(config)


def _remote(model: Decoder, rules: list[CausalRule]) -> nn.Module:
    from maxscore.hf.modeling_maxscore_moe import MaxScoreMoeConfig, MaxScoreMoeForCausalLM

    moe, rule = model.config.moe, rules[0]
    config = MaxScoreMoeConfig(
        **_shape(model),
        intermediate_size=moe.expert_hidden,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.k,
        moe_intermediate_size=moe.expert_hidden,
        score_function=rule.score_function,
        select_on=rule.values,
        soft_topk_temperature=rule.temperature,
        norm_topk_prob=rule.normalize,
        routed_scaling_factor=rule.scaling,
        n_group=rule.num_groups,
        topk_group=rule.top_groups,
        auto_map={
            "AutoConfig": "modeling_maxscore_moe.MaxScoreMoeConfig",
            "AutoModelForCausalLM": "modeling_maxscore_moe.MaxScoreMoeForCausalLM",
        },
    )
    return MaxScoreMoeForCausalLM(config)


def _attention_state(model: Decoder, *, half_split: bool) -> dict[str, torch.Tensor]:
    """Embeddings, norms and attention in the Llama names; ``half_split``: q and k rows permuted
    per head from the decoder's interleaved rotary pairs ``(2i, 2i + 1)`` to halves ``(i, i + d / 2)``."""
    config = model.config
    head_dim = config.dim // config.heads
    if half_split:
        order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    else:
        order = torch.arange(head_dim)
    rows = (torch.arange(config.heads)[:, None] * head_dim + order[None]).flatten()
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attention.qkv.weight.chunk(3, dim=0)
        state[prefix + "self_attn.q_proj.weight"] = q[rows]
        state[prefix + "self_attn.k_proj.weight"] = k[rows]
        state[prefix + "self_attn.v_proj.weight"] = v
        state[prefix + "self_attn.o_proj.weight"] = block.attention.out.weight
        state[prefix + "input_layernorm.weight"] = block.attention_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        if config.moe is None:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                state[prefix + f"mlp.{theirs}.weight"] = getattr(block.mlp, ours).weight
    return {name: value.detach().clone() for name, value in state.items()}


def _state(model: Decoder, rules: list[CausalRule], format: str) -> dict[str, torch.Tensor]:
    state = _attention_state(model, half_split=format != "ernie4_5_moe")
    for i, (block, rule) in enumerate(zip(model.blocks, rules, strict=True)):
        prefix = f"model.layers.{i}.mlp."
        experts, gate = block.mlp.experts, block.mlp.router.gate.weight.detach().float()
        bias = rule.bias_E.detach().float().cpu()
        if format == "maxscore":
            state[prefix + "gate.weight"] = gate.clone()
            state[prefix + "gate.route_bias"] = bias.clone()
            for name in ("w_gate", "w_up", "w_down"):
                state[prefix + f"experts.{name}"] = getattr(experts, name).detach().clone()
            continue
        gate_up = torch.cat([experts.w_gate.transpose(1, 2), experts.w_up.transpose(1, 2)], dim=1)
        state[prefix + "experts.gate_up_proj"] = gate_up.detach().clone()
        state[prefix + "experts.down_proj"] = experts.w_down.transpose(1, 2).detach().clone()
        state[prefix + "gate.weight"] = gate.clone()
        if format == "ernie4_5_moe":
            state[prefix + "gate.moe_statics.e_score_correction_bias"] = bias[None].clone()
        else:
            state[prefix + "gate.e_score_correction_bias"] = bias.clone()
            width = model.config.moe.expert_hidden
            for name, shape in (
                ("gate_proj", (width, model.config.dim)),
                ("up_proj", (width, model.config.dim)),
            ):
                state[prefix + f"shared_experts.{name}.weight"] = torch.zeros(shape)
            state[prefix + "shared_experts.down_proj.weight"] = torch.zeros(model.config.dim, width)
    if format == "glm4_moe":
        state["lm_head.weight"] = model.embed.weight.detach().clone()
    return state
