"""The MoE layer (route -> dispatch -> experts -> combine), its experts and dispatchers."""

from maxscore.moe.experts import SwiGLU, SwiGLUExperts
from maxscore.moe.layer import MoELayer, MoEOutput

__all__ = ["MoELayer", "MoEOutput", "SwiGLU", "SwiGLUExperts"]
