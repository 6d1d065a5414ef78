"""Models that use the MoE layer."""

from maxscore.model.llama import Decoder, ModelConfig, ModelOutput, moe_from_flat

__all__ = ["Decoder", "ModelConfig", "ModelOutput", "moe_from_flat"]
