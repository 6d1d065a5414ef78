"""An upcycled HF model behind the training harness's model interface (``maxscore train --hf-model``).

``hf_model`` names a local directory holding a dense Llama / Qwen2 / Mistral model
(``config.json`` with ``model.safetensors``: its weights are upcycled; ``config.json`` alone: a
fresh model) or a JSON file with such a config.  The run's model settings give the MoE part
(``num_experts``, ``k``, ``router``, ``capacity_factor``, ``router_options``) and the window
length ``seq_len``; the rest of the architecture comes from the HF config.  Tokens: the
directory's ``tokenizer.json`` if it has one (a pretrained model keeps its vocabulary), else the
harness's BPE trained with the HF config's ``vocab_size``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from maxscore.hf.upcycle import MaxScoreMLP, upcycle
from maxscore.model import ModelConfig, ModelOutput
from maxscore.moe.experts import count_parameters


class HFDecoder(nn.Module):
    """``forward(tokens, valid, causal) -> ModelOutput`` around an upcycled HF model (``self.hf``)."""

    def __init__(self, hf_model: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.hf, self.config = hf_model, config
        if config.seq_len > hf_model.config.max_position_embeddings:
            raise ValueError(
                f"seq_len={config.seq_len} exceeds the HF model's max_position_embeddings="
                f"{hf_model.config.max_position_embeddings}; lower seq_len"
            )

    def _mlps(self) -> list[MaxScoreMLP]:
        return [layer.mlp for layer in self.hf.model.layers]

    def forward(self, tokens_BL: torch.Tensor, valid_BL: torch.Tensor | None = None, causal: bool = False):
        mlps = self._mlps()
        saved = [m.causal_routing for m in mlps]
        for m in mlps:
            m.causal_routing = m.causal_routing or causal
        try:
            out = self.hf(input_ids=tokens_BL, attention_mask=valid_BL, use_cache=False)
        finally:
            for m, value in zip(mlps, saved, strict=True):
                m.causal_routing = value
        aux_loss = sum(m.last_aux_loss for m in mlps)
        return ModelOutput(logits=out.logits, aux_loss=aux_loss, stats=[m.last_stats for m in mlps])

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (k of E experts); sharded experts count in full."""
        cfg = self.hf.config
        return count_parameters(self, cfg.num_experts, cfg.num_experts_per_tok, active)

    def hf_config_json(self) -> str:
        return self.hf.config.to_json_string()


def build_hf_decoder(config: ModelConfig, hf_model: str, hf_config_json: str | None = None) -> HFDecoder:
    """The run's model: from a checkpoint's saved HF config, or upcycled from ``hf_model``."""
    if hf_config_json is not None:
        values = json.loads(hf_config_json)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**values))
        return HFDecoder(hf, config)
    source = Path(hf_model)
    if source.is_dir() and any(source.glob("*.safetensors")):
        dense = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, dtype=torch.float32)
    elif source.is_dir() or source.suffix == ".json":
        path = source / "config.json" if source.is_dir() else source
        if not path.is_file():
            raise ValueError(
                f"hf_model={hf_model!r}: no config.json there; pass a model directory or a config file"
            )
        values = json.loads(path.read_text())
        dense = AutoConfig.for_model(**values)
    else:
        raise ValueError(f"hf_model={hf_model!r} is neither a model directory nor a JSON config file")
    if config.moe is None:
        raise ValueError(
            f"hf_model={hf_model!r} is upcycled to an MoE model: the model config needs moe settings"
        )
    hf = upcycle(dense, moe=config.moe, noise=0.01)
    return HFDecoder(hf.float(), config)


def hf_tokenizer(hf_model: str) -> Tokenizer | None:
    """``tokenizer.json`` of the model directory, or None (the harness then trains its BPE)."""
    path = Path(hf_model) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def hf_vocab_size(hf_model: str) -> int:
    source = Path(hf_model)
    path = source / "config.json" if source.is_dir() else source
    return int(json.loads(path.read_text())["vocab_size"])
