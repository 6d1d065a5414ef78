"""Expert Choice routing (Zhou et al., 2022): each expert picks its top-C tokens of the group.

Scores are the softmax over experts; every expert takes the C tokens with the highest score
for it (C = the group capacity, valid tokens only), so loads are exactly C and a token gets
anywhere from 0 to E experts.  ``experts`` has E columns: a token's experts best first, then
-1.  The combine weight is the score.  Like MaxScore, a token's experts depend on the other
tokens of its group (not causal).  Ties: as ``torch.topk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maxscore.routers.base import GatedRouter, GatedRouterConfig
from maxscore.routers.groups import Selection


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertChoiceRouterConfig(GatedRouterConfig):
    """Options of ``expert_choice``: ``GatedRouterConfig``'s, with no balance loss by default."""

    balance_coef: float = 0.0


class ExpertChoiceRouter(GatedRouter):
    """Each expert takes its top-C tokens; no token-side constraint; balanced by construction."""

    config_class = ExpertChoiceRouterConfig
    has_causal_mode = False

    def causal_rule(self):
        raise ValueError(
            "router='expert_choice' has no causal mode: an expert's choice of a token depends on the other "
            "tokens of its group; evaluate with causal=False (whole sequences)"
        )

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        num_experts = self.num_experts
        ranking_TE = scores_TE.detach()
        if valid_T is not None:
            ranking_TE = ranking_TE.masked_fill(~valid_T[:, None], -torch.inf)
        ranking_GNE = ranking_TE.view(groups.count, groups.size, num_experts)
        static = min(groups.size, groups.slots)
        picked_GCE = torch.topk(ranking_GNE, static, dim=1).indices
        within_GC = torch.arange(static, device=scores_TE.device)[None, :] < capacity_G[:, None]
        chosen_GNE = torch.zeros_like(ranking_GNE, dtype=torch.bool)
        chosen_GNE.scatter_(1, picked_GCE, within_GC[..., None].expand_as(picked_GCE))
        chosen_TE = chosen_GNE.view(-1, num_experts)
        if valid_T is not None:
            chosen_TE &= valid_T[:, None]
        order_TE = (
            ranking_TE.masked_fill(~chosen_TE, -torch.inf).sort(dim=1, descending=True, stable=True).indices
        )
        experts_TE = torch.where(chosen_TE.gather(1, order_TE), order_TE, -1)
        return Selection(experts_TK=experts_TE)
