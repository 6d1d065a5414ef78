"""HuggingFace transformers integration (``pip install 'maxscore[hf]'``).

- ``upcycle``: a dense Llama / Qwen2 / Mistral model (or config) -> a MaxScore MoE model,
  an ordinary ``PreTrainedModel`` with its own registered ``model_type``.
- ``swap_router``: MaxScore routing inside Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE models;
  ``load_swapped`` reloads one saved after the swap.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as error:  # the integration is optional
    raise ImportError("maxscore.hf needs transformers: pip install 'maxscore[hf]'") from error

from maxscore.hf.router_swap import SUPPORTED, load_swapped, swap_router
from maxscore.hf.upcycle import (
    DENSE_FAMILIES,
    MaxScoreLlamaConfig,
    MaxScoreLlamaForCausalLM,
    MaxScoreMistralConfig,
    MaxScoreMistralForCausalLM,
    MaxScoreQwen2Config,
    MaxScoreQwen2ForCausalLM,
    sync_schedules,
    upcycle,
)

__all__ = [
    "DENSE_FAMILIES",
    "SUPPORTED",
    "MaxScoreLlamaConfig",
    "MaxScoreLlamaForCausalLM",
    "MaxScoreMistralConfig",
    "MaxScoreMistralForCausalLM",
    "MaxScoreQwen2Config",
    "MaxScoreQwen2ForCausalLM",
    "load_swapped",
    "swap_router",
    "sync_schedules",
    "upcycle",
]
