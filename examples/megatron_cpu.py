"""A tiny Megatron-Core GPT-MoE trained for a few steps on the CPU with MaxScore routing.

    pip install -e '.[megatron]' && python examples/megatron_cpu.py

Megatron-Core targets CUDA; the shims a CPU run needs (one gloo process group, the scratch-buffer
pool and the RNG tracker on the CPU, an explicit causal mask) live here, not in the adapter.
The model's MoE layers are Megatron's own (allgather dispatcher, local experts); only the router
is MaxScore's.
"""

from __future__ import annotations

import contextlib
import math
import socket
import warnings

import torch

warnings.filterwarnings("ignore", category=UserWarning)  # Megatron's notes on missing CUDA extras
warnings.filterwarnings("ignore", category=DeprecationWarning)

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from maxscore.integrations.megatron import MaxScoreRouter  # noqa: E402

VOCAB, LENGTH, BATCH, EXPERTS, K, STEPS = 256, 65, 8, 8, 2, 30  # 64 input tokens per sequence


def cpu_process_group() -> None:
    """Shim: a one-process gloo group and Megatron's parallel state, on the CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    # Shim: Megatron's scratch-buffer pool allocates on the current CUDA device; here, the CPU
    parallel_state._GLOBAL_MEMORY_BUFFER = CPUMemoryBuffer()
    # Shim: Megatron's RNG tracker forks CUDA generator states around dropout; on the CPU (and
    # with dropout off) the fork is a plain context
    tensor_parallel.random._CUDA_RNG_STATE_TRACKER = CPURNGTracker()
    tensor_parallel.random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class CPURNGTracker:
    """Shim for Megatron's CUDA RNG tracker: forks run under the CPU generator."""

    def fork(self, name: str = "model-parallel-rng"):
        return contextlib.nullcontext()


class CPUMemoryBuffer:
    """Shim for Megatron's ``GlobalMemoryBuffer``: the same named scratch tensors, on the CPU."""

    def __init__(self) -> None:
        self.buffer: dict = {}

    def get_tensor(self, shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
        size = math.prod(shape)
        held = self.buffer.get((name, dtype))
        if held is None or held.numel() < size:
            held = self.buffer[name, dtype] = torch.empty(size, dtype=dtype)
        return held[:size].view(*shape)


def model() -> GPTModel:
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        num_moe_experts=EXPERTS,
        moe_router_topk=K,
        moe_token_dispatcher_type="allgather",
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    spec.submodules.mlp.submodules.router = MaxScoreRouter  # the one line that swaps the router
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=LENGTH)


def batch(generator: torch.Generator) -> torch.Tensor:
    """Sequences with structure to learn: each token is the previous one plus a small step."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    steps = torch.randint(1, 4, (BATCH, LENGTH), generator=generator)
    return (start + steps.cumsum(1)) % VOCAB


def main() -> None:
    cpu_process_group()
    torch.manual_seed(0)
    gpt = model()
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(LENGTH - 1)[None].expand(BATCH, -1)
    # Megatron's mask is True where attention is blocked; given explicitly (its default is built on CUDA)
    causal_mask = torch.ones(LENGTH - 1, LENGTH - 1, dtype=torch.bool).triu(1)[None, None]
    for step in range(1, STEPS + 1):
        tokens = batch(generator)
        losses = gpt(tokens[:, :-1], positions, attention_mask=causal_mask, labels=tokens[:, 1:])
        loss = losses.float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 1:
            print(f"step {step:3d}  loss {float(loss.detach()):.3f}")
    print("expert load / capacity per layer (last batch; 1.000 = exactly full):")
    for number, layer in enumerate(gpt.decoder.layers, 1):
        ratios = layer.mlp.router.last_stats.load_ratio()
        print(f"  layer {number}: " + " ".join(f"{float(r):.3f}" for r in ratios))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
