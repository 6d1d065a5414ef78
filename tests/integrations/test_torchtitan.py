"""torchtitan's own MoE layer with MaxScoreRouter, swapped in by use_maxscore, on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("torchtitan.models.common.moe")
warnings.filterwarnings("ignore", message=".*CPU Autocast.*")

from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

from maxscore import solve  # noqa: E402
from maxscore.integrations.torchtitan import MaxScoreRouter, use_maxscore  # noqa: E402
from tests.integrations.helpers import regression_losses  # noqa: E402

D, E, K, F, B, L = 32, 4, 2, 16, 3, 16


def moe_config(**router) -> MoE.Config:
    gate = Linear.Config(in_features=D, out_features=E)
    return MoE.Config(
        num_experts=E,
        router=TokenChoiceTopKRouter.Config(
            num_experts=E, gate=gate, top_k=K, score_func="softmax", **router
        ),
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
    )


def built(seed: int = 0, **settings) -> MoE:
    torch.manual_seed(seed)
    layer = use_maxscore(moe_config(route_norm=True), **settings).build()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return layer


def test_use_maxscore_swaps_the_router_and_turns_the_bias_off():
    config = use_maxscore(moe_config(route_norm=True, route_scale=2.0), capacity_factor=1.25, normalize=False)
    assert isinstance(config.router, MaxScoreRouter.Config) and config.load_balance_coeff is None
    assert config.router.route_scale == 2.0 and config.router.capacity_factor == 1.25
    layer = config.build()
    assert isinstance(layer.router, MaxScoreRouter) and layer.expert_bias_E is None
    assert layer.router.moe.router_config.normalize is False  # options over the config's own
    with pytest.raises(ValueError, match="holds no TokenChoiceTopKRouter.Config"):
        use_maxscore(config.routed_experts)


def test_the_routing_is_maxscore_solve_per_sequence_and_fills_every_expert():
    layer = built()
    x = torch.randn(B, L, D)
    weights, experts, scores = layer.router(x)
    logits = x @ layer.router.gate.weight.detach().T
    torch.testing.assert_close(scores, torch.softmax(logits, dim=-1))
    expected = solve(scores.double().detach(), K)
    chosen = torch.zeros(B, L, E, dtype=torch.bool).scatter_(-1, experts, True)
    assert torch.equal(chosen, expected.mask())
    assert (chosen.sum(1) == K * L // E).all()  # every expert exactly full in every sequence
    picked = scores.gather(-1, experts)
    torch.testing.assert_close(weights, (picked / picked.sum(-1, keepdim=True)).detach())


def test_the_layer_trains_and_saves_its_prices():
    layer = built(seed=1)
    losses = regression_losses(layer.parameters(), layer, (B, L, D))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.9, losses
    assert layer.router.gate.weight.grad.abs().sum() > 0
    state = layer.state_dict()
    assert "router.maxscore.prices" in state and int(state["router.maxscore.price_updates"]) == 20
    restored = built(seed=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.router.maxscore.prices, layer.router.maxscore.prices)


@pytest.mark.parametrize(
    ("router", "settings", "match"),
    [
        ({"num_expert_groups": 2, "num_limited_groups": 1}, {}, "group-limited routing"),
        ({}, {"router": "gshard"}, "router='gshard'"),
        ({}, {"capacity_factor": 0.9}, "capacity_factor=0.9 is under 1"),
    ],
)
def test_settings_it_cannot_serve_are_named(router, settings, match):
    with pytest.raises(ValueError, match=match):
        use_maxscore(moe_config(**router), **settings)


def test_an_expert_bias_at_run_time_is_refused():
    layer = built()
    with pytest.raises(ValueError, match="load_balance_coeff=None"):
        layer.router(torch.randn(B, L, D), torch.zeros(E))


def test_a_whole_model_config_is_swapped_and_routes():
    """torchtitan's Qwen3 MoE debug model: every router swapped, every expert exactly full."""
    from torchtitan.models.qwen3 import qwen3_configs

    config = use_maxscore(qwen3_configs["debugmodel_moe"](attn_backend="flex"))
    assert not [
        c
        for _, c, _, _ in config.traverse(TokenChoiceTopKRouter.Config)
        if type(c) is not MaxScoreRouter.Config
    ]
    torch.manual_seed(0)
    model = config.build()
    positions = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():  # flex attention has no backward on the CPU
        model(
            torch.randint(0, 100, (2, 32)),
            positions=positions,
            attention_masks=model.get_attention_masks(positions),
        )
    routers = [module for module in model.modules() if isinstance(module, MaxScoreRouter)]
    assert routers and all((r.last_stats.load_ratio() == 1).all() for r in routers)


def test_the_layer_compiles_in_one_graph_and_equals_eager():
    """torchtitan compiles each block with fullgraph=True: the swapped layer traces with no
    graph break, and the compiled layer gives the eager outputs and gradients."""
    import torch._dynamo as dynamo

    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2))
    dynamo.reset()
    assert dynamo.explain(built())(x).graph_break_count == 0
    eager, compiled_layer = built(), built()
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    expected, got = eager(x), compiled(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    for a, b in zip(compiled_layer.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    dynamo.reset()
