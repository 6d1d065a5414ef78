"""Megatron-Core's own MoE layer with MaxScoreRouter, on the CPU (one gloo process)."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, get_capacity  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from maxscore import MoEConfig, solve  # noqa: E402
from maxscore.integrations.megatron import MaxScoreRouter, moe_layer_spec  # noqa: E402
from tests.integrations.helpers import regression_losses  # noqa: E402

E, K, H, S, B = 4, 2, 32, 16, 3


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    """One process of a gloo group with Megatron's parallel state; torn down after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def config(**overrides) -> TransformerConfig:
    values = dict(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
        moe_aux_loss_coeff=0.0,
        gradient_accumulation_fusion=False,
    )
    return TransformerConfig(**{**values, **overrides})


def layer(seed: int = 0, moe: MoEConfig | None = None, **overrides):
    torch.manual_seed(seed)
    built = build_module(moe_layer_spec(E, moe=moe), config=config(**overrides))
    built.set_layer_number(1)
    return built


def padding() -> torch.Tensor:
    mask_BS = torch.zeros(B, S, dtype=torch.bool)
    mask_BS[1, 11:] = True  # Megatron's mask: True at padding
    return mask_BS


def test_the_layer_runs_forward_and_backward_with_the_router():
    moe = layer()
    assert isinstance(moe.router, MaxScoreRouter)
    x = torch.randn(S, B, H, requires_grad=True)
    out, _ = moe(x, padding_mask=padding())
    out.square().mean().backward()
    assert out.shape == (S, B, H) and torch.isfinite(out).all()
    assert moe.router.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_the_routing_is_maxscore_solve_per_sequence_and_fills_every_expert():
    moe = layer()
    x = torch.randn(S, B, H)
    mask_BS = padding()
    probs, routing_map = moe.router(x, padding_mask=mask_BS.T)
    scores_BSE = torch.softmax(x.transpose(0, 1) @ moe.router.weight.detach().T, dim=-1)
    expected = solve(scores_BSE.double(), K, valid=~mask_BS)
    map_BSE = routing_map.view(S, B, E).transpose(0, 1)
    assert torch.equal(map_BSE & ~mask_BS[..., None], expected.mask())
    assert (routing_map.sum(1) == K).all()  # every token, padding too, fills k slots
    valid_loads = (map_BSE & ~mask_BS[..., None]).sum(1)
    assert (valid_loads[[0, 2]] == K * S // E).all()  # whole sequences: every expert exactly full
    probs_BSE = probs.view(S, B, E).transpose(0, 1)
    assert (probs_BSE[mask_BS] == 0).all() and (probs_BSE[~map_BSE] == 0).all()
    picked = scores_BSE * map_BSE
    renormalized = picked / picked.sum(-1, keepdim=True)
    torch.testing.assert_close(probs_BSE[~mask_BS], renormalized[~mask_BS].detach())


def test_padding_does_not_change_the_other_tokens():
    moe = layer().eval()
    x = torch.randn(S, B, H)
    other = x.clone()
    other[11:, 1] = torch.randn(S - 11, H) * 5
    with torch.no_grad():
        first, _ = moe(x, padding_mask=padding())
        second, _ = moe(other, padding_mask=padding())
    keep = ~padding().T
    torch.testing.assert_close(second[keep], first[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("group", ["sequence", "batch"])
def test_with_a_capacity_factor_the_capacity_is_megatrons(group):
    factor = 1.25
    moe = layer(
        moe=MoEConfig(
            num_experts=E, k=K, capacity_factor=factor, router="maxscore", router_config={"group": group}
        ),
        moe_expert_capacity_factor=factor,
    )
    tokens = S if group == "sequence" else S * B
    assert moe.router._capacity(S, B) == get_capacity(tokens * K, E, factor)
    x = torch.randn(S, B, H) + torch.linspace(0, 3, H)  # a skewed input: capacity binds
    probs, routing_map = moe.router(x)
    loads = routing_map.view(S, B, E).sum(0 if group == "sequence" else (0, 1))
    assert (loads <= get_capacity(tokens * K, E, factor)).all()
    # Megatron's own dropping at the same factor keeps every slot
    _, kept = apply_router_token_dropping(probs, routing_map, router_topk=K, capacity_factor=factor)
    assert torch.equal(kept, routing_map)


def test_twenty_steps_lower_the_loss_and_prices_are_saved():
    moe = layer(seed=1)
    losses = regression_losses(moe.parameters(), lambda x: moe(x)[0], (S, B, H))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.9, losses
    state = moe.router.state_dict()
    assert "maxscore.prices" in state and state["maxscore.price_updates"] == 20
    restored = layer(seed=2)
    restored.load_state_dict(moe.state_dict())
    assert torch.equal(restored.router.maxscore.prices, moe.router.maxscore.prices)


@pytest.mark.parametrize(
    ("overrides", "moe", "match"),
    [
        ({"moe_expert_capacity_factor": 0.8}, None, "moe_expert_capacity_factor=0.8 is under 1"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, None, "group-limited routing"),
        ({}, MoEConfig(num_experts=8, k=K), "num_moe_experts=4 differs"),
        ({}, MoEConfig(num_experts=E, k=K, router_config={"group": "global"}), "group='global'"),
    ],
)
def test_settings_it_cannot_serve_are_named(overrides, moe, match):
    with pytest.raises(ValueError, match=match):
        MaxScoreRouter(config(**overrides), parallel_state_collection(), moe=moe)


def parallel_state_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_router_replays_from_a_cuda_graph_equal_to_eager():
    """Megatron can CUDA-graph the router scope (``cuda_graph_scope`` with ``moe_router``), which
    refuses host round trips: the router's forward captured in a graph replays equal to eager."""
    router = layer().router.cuda().eval()
    static_x = torch.randn(S, B, H, device="cuda")
    mask = padding().T.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up: allocations, Triton compilation
            router(static_x, padding_mask=mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        probs, routing_map = router(static_x, padding_mask=mask)
    fresh = torch.randn(S, B, H, device="cuda")
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        eager_probs, eager_map = router(fresh, padding_mask=mask)
    assert torch.equal(routing_map, eager_map)
    torch.testing.assert_close(probs, eager_probs)
