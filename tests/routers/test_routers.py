"""Router behaviour: hand-made examples, capacity, padding, causality, bias updates, errors."""

from __future__ import annotations

import pytest
import torch

import maxscore
from maxscore.routers import ROUTERS, make_router, router_config, router_options
from maxscore.routers.groups import routing_groups
from maxscore.routers.maxscore import causal_targets, torch_causal_targets
from maxscore.solvers import group_capacity, solve
from maxscore.solvers.exact._native import core_causal_targets
from tests.conftest import assert_top_k

CAPACITY_ROUTERS = (
    "maxscore",
    "flow_only",
    "softtopk_only",
    "gshard",
    "switch",
    "iterative",
    "sbase",
    "base",
)


def identity_router(name: str, num_experts: int, k: int, capacity_factor: float = 1.0, **options):
    """A router whose gate logits equal its input (dim = E), so tests choose the logits."""
    router = make_router(name, num_experts, num_experts, k, capacity_factor, **options)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def k_for(name: str) -> int:
    return 1 if name == "switch" else 2


def biased_logits(batch: int, length: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bias = torch.linspace(2.0, -2.0, num_experts)  # expert 0 popular, the last one unpopular
    return torch.randn(batch * length, num_experts, generator=generator) * 2 + bias


def test_gshard_hand_example():
    # E=3, k=2, 6 tokens: capacity ceil(2*6/3) = 4. First choices: t0..t4 -> e0, t5 -> e1;
    # second choices: t0,t1,t2,t4 -> e1, t3,t5 -> e2.  Rank 1: e0 takes t0..t3, t4 dropped.
    # Rank 2 (e1 holds t5): t0,t1,t2 fill e1, t3 -> e2, t4 finds e1 full (dropped), t5 -> e2.
    logits = torch.tensor([[3.0, 2, 0], [3, 2, 0], [3, 2, 0], [3, 0, 2], [3, 2, 0], [0, 3, 2]])
    router = identity_router("gshard", 3, 2)
    out = router(logits, sequence_length=6)
    expected = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2], [-1, -1], [1, 2]])
    assert torch.equal(out.experts, expected)
    assert out.stats.loads.tolist() == [4, 4, 2]
    assert out.stats.capacity == 4
    torch.testing.assert_close(out.stats.dropped_by_rank, torch.tensor([1 / 6, 1 / 6]))
    assert out.stats.dropped_fraction == pytest.approx(1 / 6)
    probs = logits.softmax(-1)
    torch.testing.assert_close(out.weights[0], probs[0, :2] / probs[0, :2].sum())  # renormalized top-2
    assert (out.weights[4] == 0).all()


def test_switch_top1_drops_in_token_order():
    logits = torch.tensor([[2.0, 0], [3, 0], [1, 0], [0, 1]])  # capacity ceil(4/2) = 2
    out = identity_router("switch", 2, 1)(logits, sequence_length=4)
    assert out.experts.flatten().tolist() == [0, 0, -1, 1]
    torch.testing.assert_close(
        out.weights[:, 0],
        torch.tensor([logits[0].softmax(0)[0], logits[1].softmax(0)[0], 0, logits[3].softmax(0)[1]]),
    )


def test_maxscore_paper_routes_as_maxscore_with_raw_softtopk_weights():
    logits = biased_logits(2, 16, 4)
    paper = identity_router("maxscore_paper", 4, 2)
    out = paper(logits, sequence_length=16)
    flow = identity_router("flow_only", 4, 2)(logits, sequence_length=16)
    assert torch.equal(out.experts, flow.experts)
    assert paper.temperature() == 4.0  # step 0 of the 4 -> 1 schedule
    picked = logits.softmax(-1).gather(1, out.experts)
    best = picked.argmax(1, keepdim=True)
    expected = torch.where(torch.arange(2) == best, picked, 4.0 * picked)  # raw: no renormalization
    torch.testing.assert_close(out.weights, expected)


@pytest.mark.parametrize("method", ["exact", "two_stage", "sinkhorn"])
@pytest.mark.parametrize(("num_experts", "k", "length"), [(4, 2, 32), (8, 3, 64), (16, 2, 64)])
def test_maxscore_fills_every_expert_exactly(method, num_experts, k, length):
    router = identity_router("maxscore", num_experts, k, method=method)
    out = router(biased_logits(3, length, num_experts), sequence_length=length)
    capacity = k * length // num_experts
    assert out.stats.dropped_fraction == 0.0
    assert (out.experts >= 0).all()
    per_group = torch.stack(
        [torch.bincount(g.flatten(), minlength=num_experts) for g in out.experts.view(3, length, k)]
    )
    assert (per_group == capacity).all()
    assert (out.experts.sort(1).values.diff(dim=1) != 0).all()  # distinct experts per token
    assert out.stats.load_ratio().tolist() == [1.0] * num_experts


def test_maxscore_routing_is_the_optimum_per_sequence():
    logits = biased_logits(2, 32, 8)
    router = identity_router("maxscore", 8, 2)
    out = router(logits, sequence_length=32)
    scores = logits.softmax(-1)
    for g in range(2):
        rows = slice(32 * g, 32 * (g + 1))
        optimum = solve(scores[rows], 2, method="reference").score  # the LP (scipy HiGHS)
        routed = float(scores[rows].double().gather(1, out.experts[rows]).sum())
        assert routed == pytest.approx(optimum, abs=1e-6)
    assert out.stats.solver_gap == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", [*CAPACITY_ROUTERS, "dropless", "deepseek_v3"])
def test_unbounded_capacity_is_plain_topk(name):
    num_experts, k = 8, k_for(name)
    router = identity_router(name, num_experts, k, capacity_factor=num_experts / k)
    logits = biased_logits(2, 16, num_experts)
    out = router(logits, sequence_length=16)
    assert_top_k(logits, out.experts)
    assert out.stats.dropped_fraction == 0.0


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_gradients_reach_the_gate(name):
    k = k_for(name)
    layer = maxscore.MoELayer(12, 24, 4, k, router=name)
    out = layer(torch.randn(2, 16, 12))
    out.output.square().sum().backward()
    grad = layer.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", [*CAPACITY_ROUTERS, "expert_choice"])
def test_padding_uses_no_capacity(name):
    """Valid tokens route as if the padding were absent; padding gets no expert."""
    num_experts, k, length, keep = 8, k_for(name), 32, 20
    logits = biased_logits(1, length, num_experts, seed=3)
    valid = torch.arange(length) < keep
    padded = identity_router(name, num_experts, k)(logits, valid, sequence_length=length)
    alone = identity_router(name, num_experts, k)(logits[:keep], sequence_length=keep)
    assert (padded.experts[keep:] == -1).all()
    assert torch.equal(padded.experts[:keep], alone.experts)
    assert torch.equal(padded.stats.loads, alone.stats.loads)
    assert padded.stats.capacity == alone.stats.capacity


def test_expert_choice_respects_capacity():
    num_experts, k, length = 8, 2, 40
    logits = biased_logits(3, length, num_experts)
    valid = torch.ones(3 * length, dtype=torch.bool)
    valid[length + 30 : 2 * length] = False  # the second sequence has 30 valid tokens
    out = identity_router("expert_choice", num_experts, k)(logits, valid, sequence_length=length)
    per_group = torch.stack(
        [torch.bincount(g[g >= 0], minlength=num_experts) for g in out.experts.view(3, -1)]
    )
    capacity = [k * length // num_experts, -(-k * 30 // num_experts), k * length // num_experts]
    assert per_group.tolist() == [[c] * num_experts for c in capacity]
    assert out.stats.capacity == sum(capacity)
    scores = logits.softmax(-1)
    for e in range(num_experts):  # expert e holds its top-C valid tokens of the first sequence
        chosen = (out.experts[:length] == e).any(1).nonzero().flatten()
        assert set(chosen.tolist()) == set(torch.topk(scores[:length, e], capacity[0]).indices.tolist())


def test_deepseek_bias_moves_load_to_underloaded_expert():
    num_experts = 4
    router = identity_router("deepseek_v3", num_experts, 1, bias_rate=0.02)
    logits = torch.randn(256, num_experts) + torch.tensor([1.5, 0.0, 0.0, -1.5])
    first = router(logits).stats.loads.clone()
    router.after_optimizer_step()
    assert router.bias[0] < 0 < router.bias[3]  # overloaded down, underloaded up
    for _ in range(60):
        router(logits)
        router.after_optimizer_step()
    last = router(logits).stats.loads
    assert last[0] < first[0] and last[3] > first[3]
    assert (last.max() - last.min()) < (first.max() - first.min()) / 2
    pending = router.pending_loads.clone()
    router.eval()
    router(logits)  # evaluation forwards do not count toward the next update
    assert torch.equal(router.pending_loads, pending)


def test_causal_mode_ignores_later_tokens():
    num_experts, k, length = 8, 2, 32
    router = identity_router("maxscore", num_experts, k)
    for seed in range(5):  # training forwards build the averaged prices
        router(biased_logits(4, length, num_experts, seed=seed), sequence_length=length)
    assert router.prices.abs().sum() > 0
    router.eval()
    logits = biased_logits(1, length, num_experts, seed=9)
    changed = logits.clone()
    changed[20:] = biased_logits(1, length - 20, num_experts, seed=10)
    causal = router(logits, sequence_length=length, causal=True).experts
    assert torch.equal(causal[:20], router(changed, sequence_length=length, causal=True).experts[:20])
    assert_top_k(logits.softmax(-1) - router.prices - router.causal_offset, causal)
    batch = router(logits, sequence_length=length).experts  # batch routing does see later tokens
    assert not torch.equal(
        batch[:20].sort(1).values, router(changed, sequence_length=length).experts[:20].sort(1).values
    )


@pytest.mark.parametrize("method", ["two_stage", "sinkhorn"])
def test_approximate_methods_learn_causal_prices_from_occasional_exact_solves(method):
    num_experts, k, length = 8, 2, 32
    router = identity_router("maxscore", num_experts, k, method=method)
    for seed in range(12):
        router(biased_logits(4, length, num_experts, seed=seed), sequence_length=length)
    assert int(router.training_forwards) == 12 and int(router.price_updates) == 2  # forwards 0 and 10
    logits = biased_logits(4, length, num_experts, seed=99)
    causal = router(logits, sequence_length=length, causal=True).stats.loads.float()
    plain = torch.bincount(torch.topk(logits, k, dim=1).indices.flatten(), minlength=num_experts).float()
    assert causal.std() < plain.std() / 2


def test_causal_prices_balance_the_load():
    """Top-k of score - averaged prices is much closer to balanced than plain top-k."""
    num_experts, k, length = 8, 2, 64
    router = identity_router("maxscore", num_experts, k)
    for seed in range(20):
        router(biased_logits(4, length, num_experts, seed=seed), sequence_length=length)
    router.eval()
    logits = biased_logits(4, length, num_experts, seed=99)
    causal = router(logits, sequence_length=length, causal=True).stats.loads.float()
    plain = torch.bincount(torch.topk(logits, k, dim=1).indices.flatten(), minlength=num_experts).float()
    assert causal.std() < plain.std() / 3


def test_causal_offset_moves_toward_balance_in_training_only():
    num_experts, k, length = 8, 2, 64
    router = identity_router("maxscore", num_experts, k, causal_update="sign")
    logits = biased_logits(4, length, num_experts)
    router(logits, sequence_length=length)
    # one step of the sign rule: the prices' causal routing, corrected by causal_rate per expert
    router.eval()
    before = router.causal_offset.clone()
    loads = torch.bincount(
        torch.topk(logits.softmax(-1) - router.prices, k, dim=1).indices.flatten(), minlength=num_experts
    ).float()
    expected = router.config.causal_rate * torch.sign(loads - loads.mean())
    assert torch.allclose(before, expected - expected.mean())
    router(logits, sequence_length=length)
    router(logits, sequence_length=length, causal=True)
    assert torch.equal(router.causal_offset, before)  # evaluation never moves it
    for update in ("sign", "quantile"):
        off = identity_router("maxscore", num_experts, k, causal_update=update, causal_rate=0.0)
        off(logits, sequence_length=length)
        assert not off.causal_offset.any()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(("num_experts", "k"), [(8, 2), (15, 4), (6, 1)])
def test_causal_targets_give_each_expert_alone_its_mean_load(num_experts, k, padded):
    """Brute force: set one expert's offset to its target, the others unchanged; the causal
    routing (top-k of values - offsets) then gives it exactly C = ceil(k N / E) tokens."""
    generator = torch.Generator().manual_seed(num_experts)
    tokens = 300
    values = torch.randn(tokens, num_experts, generator=generator) + torch.linspace(1, -1, num_experts)
    offsets = 0.3 * torch.randn(num_experts, generator=generator)
    valid = torch.rand(tokens, generator=generator) > 0.3 if padded else torch.ones(tokens, dtype=torch.bool)
    targets = causal_targets(values, offsets, k, valid if padded else None)
    count = int(valid.sum())
    capacity = -(-count * k // num_experts)
    for expert in range(num_experts):
        moved = offsets.clone()
        moved[expert] = targets[expert]
        chosen = torch.topk(values - moved, k, dim=1).indices[valid]
        assert int((chosen == expert).sum()) == capacity, expert


@pytest.mark.parametrize(
    ("tokens", "num_experts", "k"),
    [(2048, 96, 8), (1000, 160, 6), (512, 16, 2), (300, 9, 8), (64, 384, 10), (1, 5, 1)],
)
@pytest.mark.parametrize("kind", ["softmax", "ties", "padded"])
def test_causal_targets_of_the_core_equal_the_torch_code(tokens, num_experts, k, kind):
    """On the CPU the compiled core computes the targets; they equal the torch code's bit for
    bit (the same float32 operations), with bfloat16 ties and with padding; a NaN goes to the
    torch code."""
    generator = torch.Generator().manual_seed(tokens + num_experts)
    values = (
        torch.randn(tokens, num_experts, generator=generator) + torch.linspace(1, -1, num_experts)
    ).softmax(-1)
    offsets = 0.01 * torch.randn(num_experts, generator=generator)
    if kind == "ties":
        values, offsets = values.bfloat16().float(), offsets.bfloat16().float()
    valid = torch.rand(tokens, generator=generator) > 0.3 if kind == "padded" else None
    if valid is not None:
        valid[0] = True
    assert torch.equal(
        causal_targets(values, offsets, k, valid), torch_causal_targets(values, offsets, k, valid)
    )
    values[0, 0] = float("nan")
    assert core_causal_targets(values, offsets, k, valid) is None
    torch.testing.assert_close(
        causal_targets(values, offsets, k, valid),
        torch_causal_targets(values, offsets, k, valid),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


@pytest.mark.parametrize("name", ["maxscore", "maxscore_paper", "flow_only", "quantile", "deepseek_v3"])
def test_a_batch_of_padding_only_leaves_the_learned_state_as_it_was(name):
    """A training forward whose tokens are all padding has no loads or quantiles to learn from:
    the causal offsets and biases stay as they were (they turned NaN or -inf: 0 x -inf)."""
    torch.manual_seed(0)
    router = make_router(name, 16, 8, 2)
    router(torch.randn(64, 16), sequence_length=32)  # one real batch first: nonzero state
    router.after_optimizer_step()
    before = {n: b.clone() for n, b in router.named_buffers() if b.is_floating_point()}
    router(torch.randn(64, 16), torch.zeros(64, dtype=torch.bool), sequence_length=32)
    router.after_optimizer_step()
    for n, b in router.named_buffers():
        if n in before and n not in ("warm_prices", "prices"):
            assert torch.isfinite(b).all() and torch.equal(b, before[n]), n


def test_quantile_causal_rule_balances_a_batch_within_tens_of_forwards():
    """Trained on one batch, the causal routing of that batch: the quantile rule (default rate
    0.3) is within 2% of balance after 20 forwards; the sign rule and the prices alone are not."""
    num_experts, k, length = 8, 2, 64
    logits = biased_logits(8, length, num_experts, seed=3)
    spread = {}
    for update, rate in (("quantile", None), ("sign", None), ("quantile", 0.0)):
        router = identity_router("maxscore", num_experts, k, causal_update=update, causal_rate=rate)
        for _ in range(20):
            router(logits, sequence_length=length)
        router.eval()
        loads = torch.bincount(
            router(logits, sequence_length=length, causal=True).experts.flatten(), minlength=num_experts
        )
        spread[update, rate] = float(loads.max() / loads.float().mean())
    assert spread["quantile", None] <= 1.02 < spread["sign", None] < spread["quantile", 0.0], spread


def test_causal_offset_balances_the_causal_routing_better_than_the_prices_alone():
    """Averaged dual prices balance each batch's optimal routing, not the average causal load;
    the correction removes what they leave (held-out batches, the same training inputs)."""
    num_experts, k, length = 8, 2, 64
    spread = {}
    for rate in (0.0, 0.3):
        router = identity_router("maxscore", num_experts, k, causal_rate=rate)
        for seed in range(60):
            router(biased_logits(4, length, num_experts, seed=seed), sequence_length=length)
        router.eval()
        loads = sum(
            torch.bincount(
                router(
                    biased_logits(4, length, num_experts, seed=100 + s), sequence_length=length, causal=True
                ).experts.flatten(),
                minlength=num_experts,
            ).float()
            for s in range(20)
        )
        spread[rate] = float(loads.max() / loads.mean())
    assert spread[0.3] < 1 + 0.75 * (spread[0.0] - 1), spread


def test_the_solver_starts_from_the_last_batch_mean_prices(monkeypatch):
    """The warm start is the last batch's prices (centered per group, averaged over groups), not
    the running average; checkpoints saved before the buffer existed start from the average."""
    import maxscore.routers.maxscore as module

    num_experts, k, length = 8, 2, 64
    router = identity_router("maxscore", num_experts, k)
    starts, solved, solve_groups = [], [], module.solve_groups

    def recorded(*args, **options):
        starts.append(options["prices"].clone())
        result = solve_groups(*args, **options)
        solved.append(result.assignment.prices.float())
        return result

    monkeypatch.setattr(module, "solve_groups", recorded)
    for seed in range(3):
        router(biased_logits(4, length, num_experts, seed=seed), sequence_length=length)
    assert not starts[0].any()  # the first batch starts cold
    for before, start in zip(solved[:-1], starts[1:], strict=True):
        assert torch.allclose(start, (before - before.mean(1, keepdim=True)).mean(0))
    assert not torch.allclose(router.warm_prices, router.prices)  # the average lags behind
    state = router.state_dict()
    del state["warm_prices"]
    fresh = identity_router("maxscore", num_experts, k)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.warm_prices, router.prices)


def test_causal_offset_state_and_old_checkpoints():
    router = identity_router("maxscore", 8, 2)
    router(biased_logits(4, 64, 8), sequence_length=64)
    state = router.state_dict()
    fresh = identity_router("maxscore", 8, 2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.causal_offset, router.causal_offset) and fresh.causal_offset.any()
    del state["causal_offset"]  # saved before the correction existed: the prices alone, as trained
    fresh.load_state_dict(state)
    assert not fresh.causal_offset.any() and torch.equal(fresh.prices, router.prices)
    with pytest.raises(
        ValueError, match=r"causal_rate must be a number in \[0, 1\] with causal_update='quantile'"
    ):
        identity_router("maxscore", 8, 2, causal_rate=1.5)
    with pytest.raises(
        ValueError, match=r"causal_rate must be a number in \[0, inf\] with causal_update='sign'"
    ):
        identity_router("maxscore", 8, 2, causal_update="sign", causal_rate=-1.0)
    with pytest.raises(ValueError, match="causal_update must be one of"):
        identity_router("maxscore", 8, 2, causal_update="newton")
    # a config saved before the quantile rule existed keeps the sign rule it trained with
    saved = router_config("maxscore", {"causal_rate": 1e-4}, saved=True)
    assert (saved.causal_update, saved.causal_rate) == ("sign", 1e-4)


def test_group_capacity_matches_expert_capacity():
    counts = torch.arange(0, 300)
    for num_experts, k, factor in [(16, 2, 1.0), (7, 3, 1.1), (64, 8, 1.25), (10, 10, 0.5), (3, 1, 2.0)]:
        expected = [maxscore.expert_capacity(int(n), num_experts, k, factor) for n in counts]
        assert group_capacity(counts, num_experts, k, factor).tolist() == expected


def test_batch_group_routes_the_whole_batch_at_once():
    logits = biased_logits(4, 16, 8)
    router = identity_router("maxscore", 8, 2, group="batch")
    out = router(logits, sequence_length=16)
    assert out.stats.capacity == 2 * 64 // 8
    assert out.capacity == 2 * 64 // 8


def test_global_group_on_one_process_routes_as_the_batch_with_static_capacity():
    logits = biased_logits(4, 16, 8)
    batch = identity_router("maxscore", 8, 2, group="batch")(logits, sequence_length=16)
    alone = identity_router("maxscore", 8, 2, group="global")(logits, sequence_length=16)
    assert torch.equal(alone.experts, batch.experts)
    assert alone.capacity == batch.capacity == 2 * 64 // 8  # the layer's static path, no host sync


def test_router_math_is_float32_under_autocast():
    router = identity_router("maxscore", 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(torch.randn(8, 4).bfloat16(), sequence_length=8)
    assert out.weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32


def test_router_state_round_trips(tmp_path):
    router = identity_router("maxscore", 4, 2)
    router(biased_logits(2, 8, 4), sequence_length=8)
    ds = identity_router("deepseek_v3", 4, 2)
    ds(biased_logits(2, 8, 4))
    ds.after_optimizer_step()
    for module, name in ((router, "prices"), (ds, "bias")):
        path = tmp_path / f"{name}.pt"
        torch.save(module.state_dict(), path)
        fresh = type(module)(4, module.moe)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert (
            torch.equal(getattr(fresh, name), getattr(module, name)) and getattr(fresh, name).abs().sum() > 0
        )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_router("topk", 8, 4, 2), "router must be one of"),
        (lambda: make_router("gshard", 8, 4, 2, temperature=2.0), r"unknown option\(s\) \['temperature'\]"),
        (lambda: make_router("switch", 8, 4, 2), "routes each token to 1 expert"),
        (lambda: make_router("maxscore", 8, 4, 5), "k must satisfy"),
        (lambda: make_router("maxscore", 8, 4, 2, 0.0), "capacity_factor must be"),
        (lambda: make_router("maxscore", 8, 4, 2, method="greedy"), "method must be one of"),
        (lambda: make_router("maxscore", 8, 4, 2, group="token"), "group must be one of"),
        (lambda: make_router("gshard", 8, 4, 2, balance_coef=-1.0), "balance_coef must be"),
        (lambda: make_router("maxscore", 8, 4, 2, price_momentum=1.0), "price_momentum must be"),
        (lambda: make_router("deepseek_v3", 8, 6, 2, num_groups=4), "num_groups=4 must divide"),
        (lambda: make_router("sbase", 8, 4, 2, iterations=0), "iterations must be"),
        (lambda: make_router("gshard", 0, 4, 2), "dim must be an int >= 1"),
    ],
)
def test_router_construction_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_router_input_errors():
    router = identity_router("maxscore", 4, 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        router(torch.tensor([[float("nan"), 0, 0, 0]] * 2))
    with pytest.raises(ValueError, match="empty batch"):
        router(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        router(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="does not divide"):
        router(torch.zeros(6, 4), sequence_length=4)
    with pytest.raises(ValueError, match="no causal mode"):
        identity_router("expert_choice", 4, 2)(torch.zeros(4, 4), causal=True)


def test_router_options_lists_own_and_shared_options():
    assert {"method", "schedule", "price_momentum", "balance_coef", "group"} <= set(
        router_options("maxscore")
    )
    assert "bias_rate" in router_options("deepseek_v3") and "bias_rate" not in router_options("gshard")


def test_routing_groups_carry_each_groups_capacity_once():
    x = torch.randn(12, 4)
    valid = torch.tensor([True] * 6 + [True, True, False, False, False, False])
    common = dict(per_sequence=True, num_experts=4, k=2, capacity_factor=1.0)
    groups = routing_groups(x, valid, 6, **common)
    assert (groups.count, groups.size, groups.slots) == (2, 6, 3)
    assert groups.capacity_G.tolist() == [3, 1]  # ceil(2 x 6 / 4), ceil(2 x 2 / 4): padding uses none
    assert routing_groups(x, None, 6, **common).capacity_G.tolist() == [3, 3]
    owned = routing_groups(x, valid, None, **common, solver_capacity=True)  # global routing
    assert owned.capacity_G is None and (owned.count, owned.slots) == (1, 6)
    with pytest.raises(ValueError, match="sequence_length=5 does not divide the 12 tokens"):
        routing_groups(x, None, 5, **common)


def test_global_routing_reports_the_solvers_capacity_and_loads():
    router = make_router("maxscore", 8, 4, 2, group="global")
    valid = torch.ones(3 * 16, dtype=torch.bool)
    valid[-4:] = False  # 44 valid tokens: the solver's capacity ceil(2 x 44 / 4) = 22
    out = router(torch.randn(3 * 16, 8), valid, sequence_length=16)
    assert out.stats.capacity_G.tolist() == [22]
    assert out.stats.loads.tolist() == [22, 22, 22, 22]
