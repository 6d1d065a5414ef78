"""The model a run trains: the built-in decoder, or an upcycled HF model (``hf_model``)."""

from __future__ import annotations

from torch import nn

from maxscore.model import Decoder
from maxscore.train.config import TrainConfig


def make_model(config: TrainConfig, hf_config_json: str | None = None) -> nn.Module:
    """``Decoder(config.model)``, or the HF model of ``config.hf_model`` (from its saved config
    ``hf_config_json`` when a checkpoint is being restored)."""
    if config.hf_model is None:
        return Decoder(config.model)
    from maxscore.hf.training import build_hf_decoder  # transformers is an optional dependency

    return build_hf_decoder(config.model, config.hf_model, hf_config_json)


def hf_config_json(model: nn.Module) -> str | None:
    """The HF config to save with a checkpoint (None for the built-in decoder)."""
    return model.hf_config_json() if hasattr(model, "hf_config_json") else None
