"""What the framework adapters' tests share."""

from __future__ import annotations

from collections.abc import Callable

import torch


def regression_losses(
    parameters, forward: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], steps: int = 20
) -> list[float]:
    """Trains ``forward`` (inputs of ``shape``, last axis the model dimension) to fit
    ``tanh(x @ W)`` for a fixed random W with Adam; the loss of each step."""
    dim = shape[-1]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(dim, dim, generator=generator) / dim**0.5
    losses = []
    for _ in range(steps):
        x = torch.randn(*shape, generator=generator)
        loss = (forward(x) - torch.tanh(x @ target)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
