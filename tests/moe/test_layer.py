"""The MoE layer end to end: dense equivalence, drops, padding, causal steps, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maxscore
from maxscore import MoELayer
from tests.conftest import assert_top_k

ONE_EXPERT_ROUTERS = (
    "maxscore",
    "flow_only",
    "softtopk_only",
    "gshard",
    "switch",
    "iterative",
    "dropless",
    "expert_choice",
    "deepseek_v3",
)


def dense_swiglu(x, layer: MoELayer, e: int = 0):
    w = layer.experts
    return (nn.functional.silu(x @ w.w_gate[e]) * (x @ w.w_up[e])) @ w.w_down[e]


@pytest.mark.parametrize("name", ONE_EXPERT_ROUTERS)
def test_one_expert_is_a_dense_swiglu(name):
    layer = MoELayer(16, 32, 1, 1, router=name, capacity_factor=1.0)
    x = torch.randn(3, 10, 16)
    out = layer(x)
    torch.testing.assert_close(out.output, dense_swiglu(x, layer), rtol=1e-5, atol=1e-5)
    assert out.stats.dropped_fraction == 0.0 and out.stats.loads.tolist() == [30]


@pytest.mark.parametrize("name", ["base", "sbase"])
def test_balanced_routers_one_expert_is_a_sigmoid_gated_dense_swiglu(name):
    layer = MoELayer(16, 32, 1, 1, router=name)
    x = torch.randn(2, 8, 16)
    gate = torch.sigmoid(x @ layer.router.gate.weight.T)
    torch.testing.assert_close(layer(x).output, gate * dense_swiglu(x, layer), rtol=1e-5, atol=1e-5)


def test_dropped_choices_contribute_nothing():
    layer = MoELayer(3, 8, 3, 2, router="gshard")
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[[3.0, 2, 0], [3, 2, 0], [3, 2, 0], [3, 0, 2], [3, 2, 0], [0, 3, 2]]])
    out = layer(x)
    assert out.routing.experts[4].tolist() == [-1, -1]
    assert (out.output[0, 4] == 0).all()  # fully dropped: the residual connection carries it
    w = out.routing.weights[3]
    expected = w[0] * dense_swiglu(x[0, 3], layer, 0) + w[1] * dense_swiglu(x[0, 3], layer, 2)
    torch.testing.assert_close(out.output[0, 3], expected)


@pytest.mark.parametrize("name", ["maxscore", "gshard", "dropless", "expert_choice"])
def test_padding_outputs_zero_and_changes_nothing_else(name):
    layer = MoELayer(8, 16, 4, 2, router=name)
    x = torch.randn(1, 24, 8)
    valid = torch.arange(24)[None] < 15
    padded = layer(x, valid)
    alone = layer(x[:, :15])
    assert (padded.output[0, 15:] == 0).all()
    torch.testing.assert_close(padded.output[:, :15], alone.output)
    assert torch.equal(padded.stats.loads, alone.stats.loads)


def test_shared_expert_adds_a_dense_mlp():
    layer = MoELayer(8, 16, 4, 2, router="gshard", shared_hidden=12)
    x = torch.randn(2, 6, 8)
    routed = MoELayer(8, 16, 4, 2, router="gshard")
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    torch.testing.assert_close(layer(x).output, routed(x).output + layer.shared(x))


def trained_maxscore_layer() -> MoELayer:
    """A MaxScore layer in eval mode whose averaged prices come from three training forwards."""
    layer = MoELayer(8, 16, 4, 2, router="maxscore")
    for _ in range(3):
        layer(torch.randn(4, 16, 8))
    assert layer.router.price_updates == 3
    return layer.eval()


def test_single_token_steps_route_causally_in_eval():
    layer = trained_maxscore_layer()
    x = torch.randn(5, 1, 8)
    out = layer(x)
    assert out.routing.capacity is None  # dropless: each token alone
    scores = torch.softmax(x.reshape(5, 8) @ layer.router.gate.weight.T, -1)
    assert_top_k(scores - layer.router.prices, out.routing.experts)
    layer.train()
    assert layer(x).routing.capacity is not None


def test_causal_layer_output_ignores_later_tokens():
    layer = trained_maxscore_layer()
    x = torch.randn(1, 16, 8)
    changed = x.clone()
    changed[:, 10:] = torch.randn(1, 6, 8)
    torch.testing.assert_close(
        layer(x, causal=True).output[:, :10], layer(changed, causal=True).output[:, :10]
    )


def test_bfloat16_autocast_keeps_router_float32():
    layer = MoELayer(8, 16, 4, 2, router="maxscore")
    x = torch.randn(2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.routing.weights.dtype == torch.float32
    assert out.stats.dropped_fraction == 0.0
    torch.testing.assert_close(out.output.float(), layer(x).output, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("router", "options", "causal"),
    [
        ("dropless", {}, False),
        ("deepseek_v3", {}, False),
        ("maxscore", {}, True),
    ],
)
def test_bfloat16_autocast_on_the_grouped_path(router, options, causal):
    layer = MoELayer(8, 16, 4, 2, router=router, **options)
    x = torch.randn(2, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, causal=causal)
    assert out.routing.capacity is None  # the grouped (dropless) path
    out.output.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.output.float(), layer(x, causal=causal).output, rtol=0.05, atol=0.05)


def test_layer_stats_and_aux_loss():
    layer = MoELayer(8, 16, 4, 2, router="maxscore", balance_coef=0.01, z_coef=0.001)
    out = layer(torch.randn(2, 16, 8))
    assert out.stats.capacity == 2 * 8 and out.stats.loads.tolist() == [16] * 4
    expected = 0.01 * out.routing.losses["balance"] + 0.001 * out.routing.losses["z"]
    torch.testing.assert_close(out.aux_loss, expected)
    logged = out.stats.as_dict()
    assert logged["dropped_first"] == 0.0 and logged["load_ratio_min"] == 1.0
    assert logged["affinity_by_rank"][0] >= logged["affinity_by_rank"][1]
    assert logged["solver_gap"] == pytest.approx(0.0, abs=1e-6) and logged["solver_ms"] > 0


def test_custom_router_module():
    router = maxscore.make_router("gshard", 8, 4, 2)
    layer = MoELayer(8, 16, 4, 2, router=router)
    assert layer.router is router
    with pytest.raises(ValueError, match="without router_options"):
        MoELayer(8, 16, 4, 2, router=router, balance_coef=0.0)


@pytest.mark.parametrize(
    ("x", "valid", "match"),
    [
        (torch.randn(2, 8), None, r"shape \[B, L, D=8\]"),
        (torch.randn(2, 3, 7), None, r"shape \[B, L, D=8\]"),
        (torch.randint(0, 3, (2, 3, 8)), None, "float tensor"),
        (torch.randn(0, 3, 8), None, "empty batch"),
        (torch.randn(2, 3, 8), torch.ones(2, 3), "valid must be a bool tensor"),
        (torch.randn(2, 3, 8), torch.ones(3, 2, dtype=torch.bool), "valid must be a bool tensor"),
        (torch.full((2, 3, 8), float("nan")), None, "NaN or inf"),
    ],
)
def test_layer_input_errors(x, valid, match):
    layer = MoELayer(8, 16, 4, 2)
    with pytest.raises(ValueError, match=match):
        layer(x, valid)


def test_layer_construction_errors():
    with pytest.raises(ValueError, match="hidden must be an int >= 1"):
        MoELayer(8, 0, 4, 2)
    with pytest.raises(ValueError, match="shared_hidden must be an int >= 0"):
        MoELayer(8, 16, 4, 2, shared_hidden=-1)
    with pytest.raises(ValueError, match="router must be one of"):
        MoELayer(8, 16, 4, 2, router="top2")


def test_a_layer_built_from_its_moe_config_equals_the_named_form():
    moe = maxscore.MoEConfig(num_experts=4, k=2, capacity_factor=1.25, expert_hidden=12, router="gshard")
    torch.manual_seed(0)
    from_config = maxscore.MoELayer.from_config(8, moe)
    torch.manual_seed(0)
    named = maxscore.MoELayer(8, 12, 4, 2, "gshard", 1.25)
    assert from_config.router.config == named.router.config
    x = torch.randn(2, 6, 8)
    assert torch.equal(from_config(x).output, named(x).output)
    with pytest.raises(ValueError, match="moe must be a maxscore.MoEConfig"):
        maxscore.MoELayer.from_config(8, {"num_experts": 4})
