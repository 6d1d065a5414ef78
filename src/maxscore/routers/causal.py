"""A router's causal rule: how it routes one token alone (causal mode, generation, serving).

Every router with a causal mode states its rule as a ``CausalRule`` (``GatedRouter.causal_rule``)
and routes causally through it, so training-time evaluation, generation and an exported model
(``maxscore export``) compute one rule.  In the terms serving engines use:

- ``values``: the router's scores (``"scores"``), or their logarithm (``"log_scores"``: log of
  the softmax, or the logit of the sigmoid; quantile balancing);
- experts: the top-k of ``values + bias_E`` (a per-expert correction: MaxScore's
  ``-(prices + causal_offset)``, DeepSeek-V3's bias, 0 for the plain routers), among the
  ``top_groups`` of ``num_groups`` expert groups when ``num_groups > 1`` (groups scored by the
  sum of their two best values);
- weights: the chosen experts' scores, SoftTopk at ``temperature`` (1: the scores themselves),
  renormalized when ``normalize``, times ``scaling``.

Ties: as ``torch.topk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class CausalRule:
    """One router's causal routing (module docstring).

    Attributes:
        k: experts per token.
        score_function: ``"softmax"`` or ``"sigmoid"``.
        bias_E: float32 [E] added to the values before the top-k.
        values: ``"scores"`` or ``"log_scores"``.
        temperature: SoftTopk factor of every chosen expert but the best (1: plain scores).
        normalize: renormalize a token's weights to sum 1.
        scaling: factor on the weights.
        num_groups, top_groups: group-limited routing (1, 1: none).
    """

    k: int
    score_function: str
    bias_E: torch.Tensor
    values: str = "scores"
    temperature: float = 1.0
    normalize: bool = False
    scaling: float = 1.0
    num_groups: int = 1
    top_groups: int = 1

    def experts(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """int64 [T, K] each token's experts, best first, from its float32 scores [T, E]."""
        values_TE = scores_TE if self.values == "scores" else log_scores(scores_TE, self.score_function)
        biased_TE = values_TE + self.bias_E.to(values_TE.device)
        if self.num_groups > 1:
            grouped_TGE = biased_TE.view(biased_TE.shape[0], self.num_groups, -1)
            group_score_TG = grouped_TGE.topk(min(2, grouped_TGE.shape[2]), dim=2).values.sum(2)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.top_groups, dim=1).indices, True)
            biased_TE = grouped_TGE.masked_fill(~keep_TG[..., None], -torch.inf).view_as(biased_TE)
        return torch.topk(biased_TE, self.k, dim=1).indices


def log_scores(scores_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """The logits up to a per-token shift, from the scores: ``log softmax`` for softmax scores,
    the logits themselves (``logit`` of the sigmoid) for sigmoid scores; scores that underflowed
    read as float32's smallest normal, so every value is finite."""
    tiny = torch.finfo(torch.float32).tiny
    if score_function == "sigmoid":
        return torch.logit(scores_TE.detach().double().clamp(tiny, 1 - 2**-53)).float()
    return torch.log(scores_TE.detach().float().clamp(min=tiny))
