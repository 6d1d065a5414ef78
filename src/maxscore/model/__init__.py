"""Models that use the MoE layer."""

from maxscore.model.llama import DENSE, Decoder, ModelConfig, ModelOutput

__all__ = ["DENSE", "Decoder", "ModelConfig", "ModelOutput"]
