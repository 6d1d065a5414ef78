"""Experts as batched SwiGLU weights: ``w_down(silu(x w_gate) * (x w_up))`` for all E at once."""

from __future__ import annotations

import torch
from torch import nn


class SwiGLUExperts(nn.Module):
    """E SwiGLU MLPs held as [E, D, F] / [E, F, D] weights.

    ``forward`` runs a static [E, C, D] buffer through one bmm per projection;
    ``forward_grouped`` runs tokens sorted by expert, one matmul per non-empty expert.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w_gate = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight, fan_in in ((self.w_gate, self.dim), (self.w_up, self.dim), (self.w_down, self.hidden)):
            nn.init.normal_(weight, std=fan_in**-0.5)

    def forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """[E, C, D] -> [E, C, D]."""
        h_ECF = nn.functional.silu(torch.bmm(x_ECD, self.w_gate)) * torch.bmm(x_ECD, self.w_up)
        return torch.bmm(h_ECF, self.w_down)

    def forward_grouped(self, x_PD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert, ``counts[e]`` rows for expert e: [P, D] -> [P, D]."""
        outputs = []
        # unbind once: indexing a weight per expert would give each its own full-size gradient
        weights = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0), strict=True)
        for rows_PD, (w_gate, w_up, w_down) in zip(torch.split(x_PD, counts), weights, strict=True):
            if rows_PD.shape[0]:
                h_PF = nn.functional.silu(rows_PD @ w_gate) * (rows_PD @ w_up)
                outputs.append(h_PF @ w_down)
        return torch.cat(outputs) if outputs else x_PD.new_zeros(0, self.dim)


class SwiGLU(nn.Module):
    """One dense SwiGLU MLP (the shared expert), [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))


def count_parameters(module: nn.Module, num_experts: int, k: int, active: bool = False) -> int:
    """Parameters of ``module``, every ``SwiGLUExperts`` in it counted with ``num_experts``
    experts (``k`` when ``active``: those one token uses), also when only a shard is local."""
    shards = [m for m in module.modules() if isinstance(m, SwiGLUExperts)]
    local = sum(p.numel() for m in shards for p in m.parameters())
    shared = sum(p.numel() for p in module.parameters()) - local
    per_expert = sum(3 * m.dim * m.hidden for m in shards)
    return shared + per_expert * (k if active else num_experts)
