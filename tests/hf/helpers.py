"""Tiny HF models and plain-transformers measurements shared by the HF, export and training tests."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def dense_model(family: str):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**SMALL)).eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, eos_token_id=1, pad_token_id=0)),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            moe_intermediate_size=32,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
}


def moe_model(name: str):
    config_name, model_name, extra = MODELS[name]
    settings = {**SMALL, **extra, "num_experts_per_tok": 2, "output_router_logits": True}
    config = getattr(transformers, config_name)(**settings)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config)


def hf_loss(directory, text_file, seq_len: int, trust_remote_code: bool = False) -> float:
    """Mean next-token loss with plain transformers code: windows of seq_len + 1 at stride seq_len."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids)
    count = (len(ids) - 1) // seq_len
    windows = ids[torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)[None]]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(4):
            logits = model(chunk[:, :-1]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"
                )
            )
            tokens += chunk[:, 1:].numel()
    return total / tokens
