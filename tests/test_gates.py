"""SoftTopk and its temperature schedule."""

from __future__ import annotations

import pytest
import torch

import maxscore
from maxscore.gates import TemperatureSchedule, TemperatureScheduleConfig, router_scores, soft_topk


def test_soft_topk_hand_example():
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    experts = torch.tensor([[2, 1], [1, -1]])  # best-scoring assigned expert is not in slot 0
    weights = soft_topk(scores, experts, 4.0)
    torch.testing.assert_close(weights, torch.tensor([[4 * 0.3, 0.6], [0.2, 0.0]]))
    normalized = soft_topk(scores, experts, 4.0, normalize=True)
    torch.testing.assert_close(normalized, torch.tensor([[1.2 / 1.8, 0.6 / 1.8], [1.0, 0.0]]))
    torch.testing.assert_close(soft_topk(scores, experts, 1.0), torch.tensor([[0.3, 0.6], [0.2, 0.0]]))


def test_soft_topk_ties_keep_lower_slot():
    scores = torch.tensor([[0.4, 0.4, 0.2]])
    weights = soft_topk(scores, torch.tensor([[1, 0]]), 2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.8]]))


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_soft_topk_gradcheck(temperature, normalize, score_function):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    experts = torch.topk(logits.detach(), 3, dim=1).indices.flip(1)  # worst first: the best is found
    experts[0, 2] = -1

    def weights(logits_TE):
        scores = torch.softmax(logits_TE, -1) if score_function == "softmax" else torch.sigmoid(logits_TE)
        return soft_topk(scores, experts, temperature, normalize=normalize)

    assert torch.autograd.gradcheck(weights, (logits,))


def test_router_scores_float32_and_bad_name():
    logits = torch.randn(3, 4, dtype=torch.bfloat16)
    assert router_scores(logits).dtype == torch.float32
    torch.testing.assert_close(router_scores(logits, "sigmoid"), torch.sigmoid(logits.float()))
    with pytest.raises(ValueError, match="score_function must be one of"):
        router_scores(logits, "relu")


def test_schedule_boundaries():
    schedule = TemperatureSchedule(TemperatureScheduleConfig(start=4.0, end=1.0, steps=30000))
    expected = {0: 4.0, 1: 4.0 - 3 / 30000, 15000: 2.5, 29999: 1.0 + 3 / 30000, 30000: 1.0, 40000: 1.0}
    for step, value in expected.items():
        schedule.num_steps = step
        assert schedule.temperature() == pytest.approx(value, abs=1e-12), step
    schedule.num_steps = 0
    schedule.step()
    assert schedule.num_steps == 1


def test_schedule_kinds():
    cosine = TemperatureSchedule(TemperatureScheduleConfig(steps=100, kind="cosine"))
    cosine.num_steps = 50
    assert cosine.temperature() == pytest.approx(2.5)
    cosine.num_steps = 25
    assert cosine.temperature() > 2.5  # cosine decays slowly at first
    constant = TemperatureSchedule(TemperatureScheduleConfig(start=2.0, kind="constant"))
    constant.num_steps = 10**6
    assert constant.temperature() == 2.0
    zero = TemperatureSchedule(TemperatureScheduleConfig(steps=0))
    assert zero.temperature() == 1.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kind": "exp"}, "kind must be"),
        ({"start": -1.0}, "start must be a finite number"),
        ({"end": float("nan")}, "end must be a finite number"),
        ({"steps": -5}, "steps must be an int"),
        ({"steps": 1.5}, "steps must be an int"),
    ],
)
def test_schedule_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScheduleConfig(**options)


def test_schedule_moves_on_optimizer_steps_only():
    layer = maxscore.MoELayer(
        8, 16, 4, 2, router="maxscore_paper", schedule=TemperatureScheduleConfig(steps=10)
    )
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    maxscore.install_step_hook(optimizer, layer)
    x = torch.randn(2, 8, 8)
    for _ in range(3):  # gradient accumulation: three forwards and backwards, one step
        out = layer(x)
        (out.output.square().mean() + out.aux_loss).backward()
    assert layer.router.schedule.num_steps == 0
    optimizer.step()
    assert layer.router.schedule.num_steps == 1
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer(x, causal=True)
    assert layer.router.schedule.num_steps == 1
    assert layer.router.temperature() == pytest.approx(4.0 - 3 / 10)


def test_schedule_saved_in_state_dict(tmp_path):
    layer = maxscore.MoELayer(8, 16, 4, 2, router="softtopk_only")
    for _ in range(7):
        maxscore.step_routers(layer)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    restored = maxscore.MoELayer(8, 16, 4, 2, router="softtopk_only")
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.router.schedule.num_steps == 7
    assert restored.router.temperature() == layer.router.temperature() < 4.0
