"""The model a run trains, and the decisions that come with it: the built-in decoder, or an
upcycled HF model (``hf_model``) with its config, vocabulary and, if it has one, tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer
from torch import nn

from maxscore.model import Decoder
from maxscore.train.config import TrainConfig


def make_model(config: TrainConfig, hf_config_json: str | None = None) -> nn.Module:
    """``Decoder(config.model)``, or the HF model of ``config.hf_model`` (from its saved config
    ``hf_config_json`` when a checkpoint is being restored)."""
    if config.hf_model is None:
        return Decoder(config.model)
    from maxscore.hf.adapter import build_hf_decoder  # transformers is an optional dependency

    return build_hf_decoder(config.model, config.hf_model, hf_config_json)


def pretrained_tokenizer(config: TrainConfig) -> Tokenizer | None:
    """The tokenizer the model brings: an ``hf_model`` directory's ``tokenizer.json``, else None
    (the harness then trains its BPE)."""
    if config.hf_model is None:
        return None
    from maxscore.hf.adapter import hf_tokenizer

    return hf_tokenizer(config.hf_model)


def tokenizer_vocab_size(config: TrainConfig) -> int:
    """The vocabulary the harness's BPE must have: the HF config's for an ``hf_model`` run."""
    if config.hf_model is None:
        return config.model.vocab_size
    from maxscore.hf.adapter import hf_vocab_size

    return hf_vocab_size(config.hf_model)


def hf_config_json(model: nn.Module) -> str | None:
    """The HF config to save with a checkpoint (None for the built-in decoder)."""
    return model.hf_config_json() if hasattr(model, "hf_config_json") else None
