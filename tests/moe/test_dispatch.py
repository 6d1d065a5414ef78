"""Dispatch and combine against a per-token loop over the experts (an independent reference)."""

from __future__ import annotations

import torch
from torch import nn

from maxscore.moe.dispatch import capacity_slots, combine, dispatch, slot_table, sort_by_expert
from maxscore.moe.experts import SwiGLUExperts


def reference(x_TD, experts_TK, weights_TK, module: SwiGLUExperts):
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for slot in range(experts_TK.shape[1]):
            e = int(experts_TK[t, slot])
            if e >= 0:
                h = nn.functional.silu(x_TD[t] @ module.w_gate[e]) * (x_TD[t] @ module.w_up[e])
                out[t] += weights_TK[t, slot] * (h @ module.w_down[e])
    return out


def random_routing(num_tokens, num_experts, k, drop=0.3):
    experts = torch.rand(num_tokens, num_experts).argsort(1)[:, :k]
    experts[torch.rand(num_tokens, k) < drop] = -1
    weights = torch.rand(num_tokens, k) * (experts >= 0)
    return experts, weights


def test_capacity_path_matches_reference():
    num_tokens, num_experts, k = 40, 5, 3
    module = SwiGLUExperts(num_experts, 8, 12)
    x = torch.randn(num_tokens, 8)
    experts, weights = random_routing(num_tokens, num_experts, k)
    capacity = int(torch.bincount(experts[experts >= 0], minlength=num_experts).max()) + 2
    slots = capacity_slots(experts, num_experts, capacity)
    assert slots[experts < 0].eq(num_experts * capacity).all()
    assigned = slots[experts >= 0]
    assert assigned.unique().numel() == assigned.numel()  # one slot per assigned choice
    assert torch.equal(assigned // capacity, experts[experts >= 0])
    token_S, weight_S = slot_table(slots, weights, num_experts * capacity)
    y = combine(module(dispatch(x, token_S, num_experts)), token_S, weight_S, num_tokens)
    torch.testing.assert_close(y, reference(x, experts, weights, module), rtol=1e-5, atol=1e-5)


def test_grouped_path_matches_reference():
    num_tokens, num_experts, k = 40, 6, 2
    module = SwiGLUExperts(num_experts, 8, 12)
    x = torch.randn(num_tokens, 8)
    experts, weights = random_routing(num_tokens, num_experts, k)
    experts[:, :][experts == 5] = -1  # one expert gets nothing
    pairs, tokens, counts = sort_by_expert(experts, num_experts)
    assert counts == torch.bincount(experts[experts >= 0], minlength=num_experts).tolist() and counts[5] == 0
    y_pairs = module.forward_grouped(x[tokens], counts) * weights.flatten()[pairs][:, None]
    y = torch.zeros_like(x).index_add(0, tokens, y_pairs)
    torch.testing.assert_close(y, reference(x, experts, weights, module), rtol=1e-5, atol=1e-5)


def test_dispatch_gradients_match_reference():
    num_tokens, num_experts, k = 12, 3, 2
    module = SwiGLUExperts(num_experts, 4, 6)
    x = torch.randn(num_tokens, 4, requires_grad=True)
    experts, weights = random_routing(num_tokens, num_experts, k)
    weights.requires_grad_()
    slots = capacity_slots(experts, num_experts, num_tokens)
    token_S, weight_S = slot_table(slots, weights, num_experts * num_tokens)
    combine(
        module(dispatch(x, token_S, num_experts)), token_S, weight_S, num_tokens
    ).square().sum().backward()
    grads = x.grad.clone(), weights.grad.clone()
    x.grad = weights.grad = None
    reference(x, experts, weights, module).square().sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], weights.grad, rtol=1e-5, atol=1e-5)
