"""Routing inside ``torch.compile(fullgraph=True)``: the routers that route to a capacity trace
in one graph (the solves through their operators, ``maxscore.solvers.ops``) and the compiled
layer equals the eager one, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from maxscore import MoELayer
from maxscore.solvers import solve
from maxscore.solvers.ops import route_exact, route_groups

# every router of ROUTERS that routes to a capacity
COMPILED = [
    "maxscore",
    "flow_only",
    "maxscore_paper",
    "softtopk_only",
    "iterative",
    "base",
    "sbase",
    "gshard",
    "switch",
    "expert_choice",
]


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test compiles from scratch (``test_layers_with_other_capacity_factors_compile`` covers
    recompiles with other values)."""
    dynamo.reset()
    yield
    dynamo.reset()


def _layer(router: str, capacity_factor: float) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(32, 64, 8, 1 if router == "switch" else 2, router=router, capacity_factor=capacity_factor)


def _batch(step: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 16, 32, generator=generator)
    valid = torch.rand(4, 16, generator=generator) > 0.25 if padded else None
    return x, valid


@pytest.mark.parametrize("router", COMPILED)
def test_a_routing_step_has_no_graph_break(router):
    x, valid = _batch(0, padded=True)
    explained = dynamo.explain(_layer(router, 1.0))(x, valid)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.25])
@pytest.mark.parametrize("router", COMPILED)
def test_the_compiled_layer_equals_the_eager_one(router, capacity_factor, padded):
    """Three training steps (the routers' state moves between them): the same experts, outputs
    within 1e-5 and gate gradients within 1e-4, through AOTAutograd (forward and backward)."""
    eager = _layer(router, capacity_factor)
    compiled_layer = _layer(router, capacity_factor)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x, valid = _batch(step, padded)
        expected, got = eager(x, valid), compiled(x, valid)
        assert torch.equal(expected.routing.experts, got.routing.experts)
        torch.testing.assert_close(got.output, expected.output, atol=1e-5, rtol=1e-5)
        for layer, out in ((eager, expected), (compiled_layer, got)):
            layer.zero_grad()
            (out.output.square().mean() + out.aux_loss).backward()
            layer.router.after_optimizer_step()
        torch.testing.assert_close(
            compiled_layer.router.gate.weight.grad, eager.router.gate.weight.grad, atol=1e-4, rtol=1e-4
        )


def test_maxscore_compiles_with_inductor():
    eager, compiled_layer = _layer("maxscore", 1.0), _layer("maxscore", 1.0)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x, valid = _batch(0, padded=True)
    expected, got = eager(x, valid), compiled(x, valid)
    assert torch.equal(expected.routing.experts, got.routing.experts)
    torch.testing.assert_close(got.output, expected.output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["maxscore", "gshard"])
def test_layers_with_other_capacity_factors_compile(router):
    """One model, three layers of capacity factor 1, 1.25 and 1.5, each compiled with
    fullgraph=True: the recompiles trace the factor as a symbolic float, and the capacity is
    computed from it, equal to eager."""
    eager = [_layer(router, factor) for factor in (1.0, 1.25, 1.5)]
    compiled = [_layer(router, factor) for factor in (1.0, 1.25, 1.5)]
    x, valid = _batch(0, padded=True)
    for eager_layer, layer in zip(eager, compiled, strict=True):
        expected = eager_layer(x, valid)
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, valid)
        assert got.routing.capacity == expected.routing.capacity
        assert torch.equal(expected.routing.experts, got.routing.experts)
        torch.testing.assert_close(got.output, expected.output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("warm", [False, True])
def test_the_exact_operator_passes_opcheck_and_equals_solve(padded, warm):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 40, 12, generator=generator).softmax(-1)
    valid = torch.rand(3, 40, generator=generator) > 0.2 if padded else None
    capacity = torch.tensor([7, 8, 9])
    prices = torch.rand(12, generator=generator, dtype=torch.float64) if warm else None
    torch.library.opcheck(torch.ops.maxscore.route_exact.default, (scores, 2, capacity, valid, prices))
    outputs = route_exact(scores, 2, capacity, valid, prices)
    experts, loads, _, score, gap, converged, fallback, issues = outputs
    reference = solve(scores, 2, capacity=capacity, valid=valid, prices=prices)
    assert torch.equal(experts, reference.experts) and torch.equal(loads, reference.loads)
    torch.testing.assert_close(score, reference.score)
    assert (gap.abs() <= 1e-9).all() and converged.all() and not fallback.any()
    assert issues.shape == (3, 4) and not issues.any()


def test_the_exact_operator_raises_solves_messages():
    scores = torch.full((1, 8, 4), -torch.inf)
    scores[0, :, 0] = 1.0  # one allowed expert per token, k = 2
    with pytest.raises(ValueError, match="fewer than k=2 allowed experts"):
        route_exact(scores, 2, torch.tensor([4]), None, None)


@pytest.mark.parametrize("method", ["iterative", "greedy", "two_stage"])
def test_the_method_operator_passes_opcheck_and_equals_solve(method):
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(2, 40, 12, generator=generator).softmax(-1)
    valid = torch.rand(2, 40, generator=generator) > 0.2
    capacity = torch.tensor([7, 8])
    torch.library.opcheck(torch.ops.maxscore.route_groups.default, (scores, 2, capacity, valid, method))
    experts, loads, score = route_groups(scores, 2, capacity, valid, method)
    reference = solve(scores, 2, capacity=capacity, valid=valid, method=method)
    assert torch.equal(experts, reference.experts) and torch.equal(loads, reference.loads)
    torch.testing.assert_close(score, torch.as_tensor(reference.score, dtype=torch.float64))


@pytest.mark.parametrize("method", ["two_stage", "sinkhorn"])
def test_approximate_methods_compile_and_average_the_same_prices(method):
    """``maxscore`` with an approximate method runs the exact solve for its prices every
    PRICE_EVERY-th training forward; compiled, the same prices come out (11 forwards: two
    updates), with no graph break."""
    torch.manual_seed(0)
    eager = MoELayer(32, 64, 8, 2, router="maxscore", method=method)
    compiled_layer = MoELayer(32, 64, 8, 2, router="maxscore", method=method)
    compiled_layer.load_state_dict(eager.state_dict())
    x, valid = _batch(0, padded=True)
    assert dynamo.explain(compiled_layer)(x, valid).graph_break_count == 0
    compiled_layer.load_state_dict(eager.state_dict())  # explain ran a forward
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for step in range(11):
        x, valid = _batch(step, padded=True)
        expected, got = eager(x, valid), compiled(x, valid)
        assert torch.equal(expected.routing.experts, got.routing.experts)
    for name in ("prices", "price_updates", "training_forwards"):
        torch.testing.assert_close(getattr(compiled_layer.router, name), getattr(eager.router, name))
    assert int(eager.router.price_updates) == 2
