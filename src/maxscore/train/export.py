"""``maxscore export``: a trained run as an HF model directory (config, safetensors, tokenizer).

- A built-in MoE decoder becomes a ``MaxScoreLlamaForCausalLM`` (registered with
  ``AutoModelForCausalLM`` by ``import maxscore.hf``): the same weights in the Llama layout, the
  MoE layers (experts, router, dual prices, SoftTopk step count) as they are, and the router
  settings the run resolved (``router_options``) in its config.
- A dense run (``moe=None``) becomes a plain ``LlamaForCausalLM``.
- An ``--hf-model`` run already is an HF model and is written as one.
- A multi-process run exports its consolidated ``checkpoint.pt``.

Layout changes (exact, tested): the fused ``qkv`` projection is split into ``q_proj``,
``k_proj`` and ``v_proj``; the rows of ``q`` and ``k`` are permuted within each head from the
decoder's interleaved rotary pairs ``(2i, 2i + 1)`` to Llama's halves ``(i, i + d / 2)``, which
leaves every attention score unchanged; the output projection is tied to the embeddings.  The
directory is written next to ``out`` and renamed into place, so a crash leaves no half-written
model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from maxscore.model import Decoder
from maxscore.train.checkpoint import load_model
from maxscore.train.tokenizer import END_OF_TEXT


def export_run(checkpoint: str | Path, out: str | Path) -> Path:
    """Writes the run (a run folder or a checkpoint file) as an HF model directory ``out``."""
    from transformers import PreTrainedTokenizerFast  # optional dependency: pip install 'maxscore[hf]'

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    model, saved = load_model(checkpoint, "cpu")
    hf_model = model.hf if saved.config.hf_model is not None else _as_llama(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        end = END_OF_TEXT if saved.tokenizer.token_to_id(END_OF_TEXT) is not None else None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=saved.tokenizer, eos_token=end, pad_token=end)
        tokenizer.model_max_length = saved.config.model.seq_len
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _as_llama(model: Decoder):
    """The built-in decoder as an HF Llama model (``MaxScoreLlamaForCausalLM`` for MoE runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from maxscore.hf.upcycle import MaxScoreLlamaConfig, MaxScoreLlamaForCausalLM

    config = model.config
    dense = config.moe is None
    shape = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.dense_hidden if dense else config.moe.expert_hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len,
        rms_norm_eps=model.norm.eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    if dense:
        hf = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        moe = dict(
            num_experts=config.moe.num_experts,
            num_experts_per_tok=config.moe.k,
            capacity_factor=config.moe.capacity_factor,
            router=config.moe.router,
            router_options=config.moe.router_config.to_dict(),
            causal_routing=False,
        )
        hf = MaxScoreLlamaForCausalLM(MaxScoreLlamaConfig(**shape, **moe))
    missing, unexpected = hf.load_state_dict(_llama_state(model), strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:
        raise RuntimeError(f"export: unmapped weights (missing {missing}, unexpected {unexpected})")
    hf.tie_weights()
    return hf.eval()


def _llama_state(model: Decoder) -> dict[str, torch.Tensor]:
    config = model.config
    head_dim = config.dim // config.heads
    # per head: interleaved rotary pairs (2i, 2i + 1) -> halves (i, i + d / 2)
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
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
        else:
            for name, value in block.mlp.state_dict().items():
                state[prefix + "mlp.moe." + name] = value
    return {name: value.detach().clone() for name, value in state.items()}
