"""Router auxiliary losses, padding-aware; each returns a scalar float32 tensor."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_GNE: torch.Tensor, experts_GNK: torch.Tensor, valid_GN: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``, averaged over routing groups.

    ``f_e`` is the fraction of the valid tokens' selections (the columns of ``experts_GNK``;
    Switch and the authors' code pass the first choices only, DeepSeek-V3 all k) that go to
    expert e, and ``P_e`` the mean router probability of e over the valid tokens.  Equals 1 for
    a uniform router; padding tokens count in neither.  Gradients flow through ``P`` only.

    Args:
        probs_GNE: float [G, N, E] router probabilities.
        experts_GNK: int64 [G, N, K] selected experts (``-1`` ignored).
        valid_GN: bool [G, N] or None.
    """
    num_experts = probs_GNE.shape[-1]
    valid_GN = (
        torch.ones(probs_GNE.shape[:2], dtype=torch.bool, device=probs_GNE.device)
        if valid_GN is None
        else valid_GN
    )
    weight_GN = valid_GN.float()
    num_valid_G = weight_GN.sum(1).clamp(min=1)
    mean_prob_GE = (probs_GNE * weight_GN[..., None]).sum(1) / num_valid_G[:, None]
    picked_GNK = (experts_GNK >= 0) & valid_GN[..., None]
    counts_GE = torch.zeros_like(mean_prob_GE).scatter_add_(
        1, experts_GNK.clamp(min=0).flatten(1), picked_GNK.flatten(1).float()
    )
    fraction_GE = counts_GE / picked_GNK.flatten(1).sum(1).clamp(min=1)[:, None]
    return num_experts * (fraction_GE * mean_prob_GE).sum(1).mean()


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits)^2`` (Zoph et al., 2022)."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    return (z_T * valid_T).sum() / valid_T.sum().clamp(min=1)


class _AttachedLoss(torch.autograd.Function):
    """Identity on ``output``; the backward pass also sends a gradient of 1 into ``loss``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss)


def attach_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged, with ``loss`` (a scalar) added to whatever loss ``output`` reaches:
    an auxiliary loss for a model whose training loop only sees its outputs (HF models)."""
    return _AttachedLoss.apply(output, loss)
