"""Router auxiliary losses, padding-aware; each returns a scalar float32 tensor."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_GSE: torch.Tensor, experts_GSK: torch.Tensor, valid_GS: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``, averaged over routing groups.

    ``f_e`` is the fraction of the valid tokens' selections (the columns of ``experts_GSK``;
    Switch and the authors' code pass the first choices only, DeepSeek-V3 all k) that go to
    expert e, and ``P_e`` the mean router probability of e over the valid tokens.  Equals 1 for
    a uniform router; padding tokens count in neither.  Gradients flow through ``P`` only.

    Args:
        probs_GSE: float [G, S, E] router probabilities.
        experts_GSK: int64 [G, S, K] selected experts (``-1`` ignored).
        valid_GS: bool [G, S] or None.
    """
    num_experts = probs_GSE.shape[-1]
    valid_GS = (
        torch.ones(probs_GSE.shape[:2], dtype=torch.bool, device=probs_GSE.device)
        if valid_GS is None
        else valid_GS
    )
    weight_GS = valid_GS.float()
    num_valid_G = weight_GS.sum(1).clamp(min=1)
    mean_prob_GE = (probs_GSE * weight_GS[..., None]).sum(1) / num_valid_G[:, None]
    picked_GSK = (experts_GSK >= 0) & valid_GS[..., None]
    counts_GE = torch.zeros_like(mean_prob_GE).scatter_add_(
        1, experts_GSK.clamp(min=0).flatten(1), picked_GSK.flatten(1).float()
    )
    fraction_GE = counts_GE / picked_GSK.flatten(1).sum(1).clamp(min=1)[:, None]
    return num_experts * (fraction_GE * mean_prob_GE).sum(1).mean()


def router_z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits)^2`` (Zoph et al., 2022)."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    return (z_T * valid_T).sum() / valid_T.sum().clamp(min=1)
