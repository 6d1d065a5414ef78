"""Auxiliary losses and routing statistics on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore.routers.losses import load_balancing_loss, router_z_loss
from maxscore.routers.stats import routing_stats


def test_balance_loss_hand_values():
    uniform = torch.full((1, 4, 4), 0.25)
    spread = torch.arange(4).view(1, 4, 1)
    assert float(load_balancing_loss(uniform, spread)) == pytest.approx(1.0)
    collapsed = torch.zeros(1, 4, 4)
    collapsed[..., 0] = 1.0
    assert float(load_balancing_loss(collapsed, torch.zeros(1, 4, 1, dtype=torch.long))) == pytest.approx(4.0)
    # two tokens, E = 2: P = (0.7, 0.3), f = (1/2, 1/2) -> 2 * (0.35 + 0.15) = 1.0; f = (1, 0) -> 1.4
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
    assert float(load_balancing_loss(probs, torch.tensor([[[0], [1]]]))) == pytest.approx(1.0)
    assert float(load_balancing_loss(probs, torch.tensor([[[0], [0]]]))) == pytest.approx(1.4)


def test_balance_loss_ignores_padding_and_averages_groups():
    probs = torch.softmax(torch.randn(2, 6, 4), -1)
    experts = torch.randint(0, 4, (2, 6, 2))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    loss = load_balancing_loss(probs, experts, valid)
    tampered_probs, tampered_experts = probs.clone(), experts.clone()
    tampered_probs[1, 4:] = torch.tensor([1.0, 0, 0, 0])
    tampered_experts[1, 4:] = 0
    assert float(load_balancing_loss(tampered_probs, tampered_experts, valid)) == pytest.approx(float(loss))
    each = [
        load_balancing_loss(probs[g : g + 1, : 6 - 2 * g], experts[g : g + 1, : 6 - 2 * g]) for g in range(2)
    ]
    assert float(loss) == pytest.approx(float(sum(each)) / 2)


def test_z_loss_hand_value_and_padding():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)
    assert float(router_z_loss(logits, torch.tensor([True, False]))) == pytest.approx(math.log(2.0) ** 2)


def test_stats_hand_example():
    logits = torch.zeros(3, 4)
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.25, 0.25, 0.25, 0.25]])
    experts = torch.tensor([[1, 0], [2, -1], [3, 0]])
    valid = torch.tensor([True, True, False])
    stats = routing_stats(
        logits_TE=logits,
        scores_TE=scores,
        experts_TK=experts,
        valid_T=valid,
        capacity_G=torch.tensor([2]),
        k=2,
    )
    assert stats.loads.tolist() == [1, 1, 1, 0]  # the padding token's experts do not count
    torch.testing.assert_close(stats.dropped_by_rank, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(stats.affinity_by_rank, torch.tensor([(0.5 + 0.5) / 2, 0.3]))
    assert float(stats.entropy) == pytest.approx(math.log(4))
    assert stats.capacity == 2 and stats.dropped_fraction == pytest.approx(0.25)
    torch.testing.assert_close(stats.load_ratio(), torch.tensor([0.5, 0.5, 0.5, 0.0]))
    logged = stats.as_dict()
    assert logged["dropped_later"] == 0.5 and logged["load_ratio_sorted"] == [0.5, 0.5, 0.5, 0.0]
