"""Quantile balancing: the bias update against the formula written out with loops, dropless and
capacity modes, evaluation, and the saved state."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore import MoEConfig
from maxscore.routers import QuantileRouterConfig, make_router
from maxscore.routers.quantile import QuantileRouter

E, K, D = 6, 2, 8


def direct_quantiles(logits, bias, k, valid):
    """q_e = the (C+1)-th largest of logits[t, e] - a_t over valid tokens, a_t = the (k+1)-th
    largest of logits[t] - bias, C = ceil(k N / E): plain Python."""
    rows = [row for row, keep in zip(logits.tolist(), valid.tolist(), strict=True) if keep]
    num_experts = len(bias)
    capacity = math.ceil(k * len(rows) / num_experts)
    thresholds = [sorted((v - b for v, b in zip(row, bias, strict=True)), reverse=True)[k] for row in rows]
    quantiles = []
    for e in range(num_experts):
        margins = sorted((row[e] - a for row, a in zip(rows, thresholds, strict=True)), reverse=True)
        quantiles.append(margins[min(capacity, len(margins) - 1)])
    return quantiles


def router(**options) -> QuantileRouter:
    torch.manual_seed(0)
    return make_router("quantile", D, E, K, **options)


def test_bias_update_is_the_formula():
    r = router(ema=0.25)
    r.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4, 0.2]))
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(24, D, generator=generator) * 2 for _ in range(2)]
    valids = [torch.rand(24, generator=generator) > 0.25 for _ in range(2)]
    expected_q = [0.0] * E
    for x, valid in zip(batches, valids, strict=True):
        logits = r.logits(x)
        # the router works on log-softmax: the same routing values up to a per-token shift
        values = torch.log_softmax(logits, dim=1)
        q = direct_quantiles(values, r.bias.tolist(), K, valid)
        expected_q = [s + v / 2 for s, v in zip(expected_q, q, strict=True)]
        r(x, valid, sequence_length=8)
    old = r.bias.tolist()
    r.after_optimizer_step()
    updated = [0.25 * b + 0.75 * q for b, q in zip(old, expected_q, strict=True)]
    mean = sum(updated) / E
    assert r.bias.tolist() == pytest.approx([u - mean for u in updated], abs=1e-5)
    assert abs(float(r.bias.mean())) < 1e-6


@pytest.mark.parametrize("num_tokens", [24, 3])  # C < N, and C >= N (the smallest margin)
def test_the_quantiles_without_padding_are_the_formula(num_tokens):
    from maxscore.routers.quantile import bias_quantiles

    generator = torch.Generator().manual_seed(num_tokens)
    values = torch.randn(num_tokens, E, generator=generator)
    bias = torch.randn(E, generator=generator) * 0.3
    expected = direct_quantiles(values, bias.tolist(), K, torch.ones(num_tokens, dtype=torch.bool))
    assert bias_quantiles(values, bias, K).tolist() == pytest.approx(expected, abs=1e-6)
    assert bias_quantiles(
        values, bias, K, torch.ones(num_tokens, dtype=torch.bool)
    ).tolist() == pytest.approx(expected, abs=1e-6)


def test_the_update_balances_a_skewed_gate():
    r = router()
    with torch.no_grad():
        r.gate.weight[0, 0] = 2.0  # with x[:, 0] ~ 1, expert 0 attracts most tokens
    x = torch.randn(480, D, generator=torch.Generator().manual_seed(0))
    x[:, 0] += 1
    first = torch.bincount(r(x).experts.flatten(), minlength=E)
    for _ in range(20):
        r(x)
        r.after_optimizer_step()
    last = torch.bincount(r(x).experts.flatten(), minlength=E)
    capacity = K * 480 // E
    assert first.max() > 1.5 * capacity
    assert last.max() <= 1.1 * capacity and last.min() >= 0.9 * capacity


def test_dropless_routes_every_valid_token_to_k_distinct_experts():
    r = router()
    x = torch.randn(64, D) * 3
    valid = torch.rand(64) > 0.3
    out = r(x, valid, sequence_length=16)
    assert out.capacity is None
    chosen = out.experts[valid]
    assert (chosen >= 0).all() and (chosen[:, 0] != chosen[:, 1]).all()
    assert (out.experts[~valid] == -1).all()
    assert torch.allclose(out.weights[valid].sum(1), torch.ones(int(valid.sum())))


def test_training_evaluation_and_causal_routings_agree():
    r = router()
    r.bias.copy_(torch.linspace(-1, 1, E))
    x = torch.randn(64, D) * 3
    trained = r(x, sequence_length=16).experts
    r.eval()
    assert torch.equal(r(x, sequence_length=16).experts, trained)
    assert torch.equal(r(x, sequence_length=16, causal=True).experts, trained)


def test_capacity_mode_drops_the_lowest_probabilities():
    r = router(drop=True)
    r.bias.copy_(torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 2.0]))  # expert 0 overloaded
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 3
    valid = torch.ones(64, dtype=torch.bool)
    valid[5] = False
    out = r(x, valid, sequence_length=16)
    dropless = router()
    dropless.bias.copy_(r.bias)
    wanted = dropless(x, valid, sequence_length=16).experts
    scores = torch.softmax(r.logits(x), dim=1)
    capacity = out.capacity // 4
    assert out.stats.dropped_fraction > 0
    for g in range(4):
        rows = slice(16 * g, 16 * (g + 1))
        cap = math.ceil(K * int(valid[rows].sum()) / E)
        assert cap <= capacity
        for e in range(E):
            kept = (out.experts[rows] == e).any(1)
            asked = (wanted[rows] == e).any(1)
            assert int(kept.sum()) == min(cap, int(asked.sum()))
            dropped = asked & ~kept
            if dropped.any() and kept.any():
                assert scores[rows][kept, e].min() >= scores[rows][dropped, e].max()
    # a kept slot stays where the dropless routing put it
    same = (out.experts == wanted) | (out.experts == -1)
    assert same.all()


def test_evaluation_leaves_the_bias_unchanged():
    r = router()
    r.bias.copy_(torch.linspace(-0.5, 0.5, E))
    before = r.bias.clone()
    r.eval()
    r(torch.randn(32, D))
    r.after_optimizer_step()
    assert torch.equal(r.bias, before)
    r.train()
    r.after_optimizer_step()  # no training forward since the last step: nothing to average
    assert torch.equal(r.bias, before)


def test_state_round_trips():
    r = router()
    x = torch.randn(48, D) * 2
    for _ in range(3):
        r(x)
        r.after_optimizer_step()
    state = r.state_dict()
    assert set(state) == {"gate.weight", "bias"}
    restored = QuantileRouter(D, MoEConfig(num_experts=E, k=K, router="quantile"))
    restored.load_state_dict(state)
    assert torch.equal(restored.bias, r.bias)
    r.eval(), restored.eval()
    assert torch.equal(restored(x).experts, r(x).experts)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"ema": 1.0}, "ema"), ({"ema": -0.1}, "ema"), ({"drop": "yes"}, "drop")],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        QuantileRouterConfig(**options)


@pytest.mark.parametrize("name", ["gshard", "quantile", "quantile:drop", "maxscore", "dropless"])
def test_optimality_figures_against_the_lp_reference(name):
    """The gap to the optimum at capacity factor 1, the largest load over the mean and the
    share of slots over capacity, recomputed from the routing with the LP reference."""
    from maxscore.routers.stats import optimality
    from maxscore.solvers import solve

    router_name, _, drop = name.partition(":")
    torch.manual_seed(1)
    r = make_router(router_name, D, E, K, **({"drop": True} if drop else {}))
    x = torch.randn(48, D) * 3
    valid = torch.rand(48) > 0.2
    out = r(x, valid, sequence_length=16)
    figures = optimality(out.stats)
    scores = torch.softmax(r.logits(x), dim=1).detach().double()
    best, score, over = 0.0, 0.0, 0
    loads = torch.zeros(E)
    for g in range(3):
        rows = slice(16 * g, 16 * (g + 1))
        keep = valid[rows]
        best += solve(scores[rows][keep], K, capacity_factor=1.0, method="reference").score
        capacity = math.ceil(K * int(keep.sum()) / E)
        for e in range(E):
            holders = [t for t in range(16) if keep[t] and e in out.experts[rows][t].tolist()]
            score += sum(float(scores[rows][t, e]) for t in holders)
            over += max(0, len(holders) - capacity)
            loads[e] += len(holders)
    assert figures["opt_gap"] == pytest.approx((best - score) / abs(best), abs=1e-9)
    assert figures["over_capacity"] == pytest.approx(over / (K * int(valid.sum())))
    assert figures["load_max_over_mean"] == pytest.approx(float(loads.max() / loads.mean()))
    if name in ("maxscore", "gshard", "quantile:drop"):  # within capacity 1: never above the optimum
        assert figures["opt_gap"] >= -1e-12 and figures["over_capacity"] == 0
    if name == "maxscore":
        assert figures["opt_gap"] == pytest.approx(0, abs=1e-9)
