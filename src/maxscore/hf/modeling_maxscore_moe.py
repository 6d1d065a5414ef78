"""A MaxScore-trained MoE decoder for transformers, without the maxscore package.

``maxscore export --format maxscore`` copies this file into the exported folder and names it in
the config's ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads the model where only torch and transformers are installed (and
vLLM's transformers backend can run it).  It imports nothing from maxscore.

The model is a Llama decoder whose MLPs are MoE layers routed causally, token by token, by the
rule the trained router states (``maxscore.routers.causal.CausalRule``):

- scores: softmax or sigmoid of the float32 gate logits;
- values: the scores, or their logarithm (``select_on="log_scores"``);
- experts: the top-k of ``values + route_bias`` (within the ``topk_group`` best of ``n_group``
  expert groups when ``n_group > 1``);
- weights: the chosen experts' scores, the best one's as is and the others' times
  ``soft_topk_temperature``, renormalized when ``norm_topk_prob``, times
  ``routed_scaling_factor``;
- experts: SwiGLU, ``down(silu(x gate) * (x up))``.

The per-expert bias is named ``route_bias`` (serving engines replace routers whose bias is
named ``e_score_correction_bias`` by their own).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class MaxScoreMoeConfig(LlamaConfig):
    model_type = "maxscore_moe"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 512
    score_function: str = "softmax"
    select_on: str = "scores"
    soft_topk_temperature: float = 1.0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1


class MaxScoreMoeGate(nn.Module):
    """``forward(x [T, D]) -> (logits [T, E], weights [T, K], experts [T, K])``, in float32."""

    def __init__(self, config: MaxScoreMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.register_buffer("route_bias", torch.zeros(config.num_experts))

    def forward(self, x_TD: torch.Tensor):
        config = self.config
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = nn.functional.linear(x_TD.float(), self.weight.float())
        if config.score_function == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)
        values_TE = scores_TE
        if config.select_on == "log_scores":
            tiny = torch.finfo(torch.float32).tiny
            if config.score_function == "sigmoid":
                values_TE = torch.logit(scores_TE.double().clamp(tiny, 1 - 2**-53)).float()
            else:
                values_TE = torch.log(scores_TE.clamp(min=tiny))
        biased_TE = values_TE + self.route_bias.float()
        if config.n_group > 1:
            grouped_TGE = biased_TE.view(biased_TE.shape[0], config.n_group, -1)
            group_score_TG = grouped_TGE.topk(min(2, grouped_TGE.shape[2]), dim=2).values.sum(2)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(config.topk_group, dim=1).indices, True)
            biased_TE = grouped_TGE.masked_fill(~keep_TG[..., None], -torch.inf).view_as(biased_TE)
        experts_TK = torch.topk(biased_TE, config.num_experts_per_tok, dim=1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if config.soft_topk_temperature != 1.0:
            best_TK = nn.functional.one_hot(weights_TK.argmax(1), experts_TK.shape[1]).bool()
            weights_TK = torch.where(best_TK, weights_TK, config.soft_topk_temperature * weights_TK)
        if config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(1, keepdim=True).clamp(
                min=torch.finfo(torch.float32).tiny
            )
        return logits_TE, weights_TK * config.routed_scaling_factor, experts_TK


class MaxScoreMoeExperts(nn.Module):
    """E SwiGLU experts: ``w_gate``, ``w_up`` [E, D, F], ``w_down`` [E, F, D]."""

    def __init__(self, config: MaxScoreMoeConfig) -> None:
        super().__init__()
        shape = (config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.w_gate = nn.Parameter(torch.zeros(shape))
        self.w_up = nn.Parameter(torch.zeros(shape))
        self.w_down = nn.Parameter(torch.zeros(shape[0], shape[2], shape[1]))

    def forward(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
        for expert in experts_TK.unique().tolist():
            token_P, slot_P = torch.nonzero(experts_TK == expert, as_tuple=True)
            rows_PD = x_TD[token_P]
            hidden_PF = nn.functional.silu(rows_PD @ self.w_gate[expert]) * (rows_PD @ self.w_up[expert])
            rows_PD = (hidden_PF @ self.w_down[expert]).float() * weights_TK[token_P, slot_P, None]
            out_TD.index_add_(0, token_P, rows_PD)
        return out_TD.to(x_TD.dtype)


class MaxScoreMoeBlock(nn.Module):
    """The MLP slot of a decoder layer: gate, then the chosen experts, weighted."""

    def __init__(self, config: MaxScoreMoeConfig) -> None:
        super().__init__()
        self.gate = MaxScoreMoeGate(config)
        self.experts = MaxScoreMoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights_TK, experts_TK = self.gate(x_TD)
        return self.experts(x_TD, experts_TK, weights_TK).view_as(hidden_states)


class MaxScoreMoeForCausalLM(LlamaForCausalLM):
    config_class = MaxScoreMoeConfig
    _keep_in_fp32_modules_strict = ["gate.weight", "gate.route_bias"]  # routing in float32

    def __init__(self, config: MaxScoreMoeConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = MaxScoreMoeBlock(config)
        self.post_init()
