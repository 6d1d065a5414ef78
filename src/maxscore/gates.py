"""Router scores and combine weights: the score functions, SoftTopk and its temperature schedule.

SoftTopk (PAPER.md §2): among the experts a token was assigned, the one with the highest
affinity keeps its weight ``p``; every other assigned expert gets ``t * p``; no
renormalization (as in the authors' code).  ``t`` decays from 4 to 1 during training so that
the lower-ranked experts of a token get gradient early on.  With ``t = 1`` the weights are the
plain router probabilities of the assigned experts; with ``normalize=True`` they sum to 1 per
token (GShard, Mixtral, DeepSeek-V3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def router_scores(logits_TE: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """Affinities in float32: ``softmax`` over the experts, or an independent ``sigmoid`` each."""
    logits_TE = logits_TE.float()
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def soft_topk(
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    temperature: float = 1.0,
    *,
    normalize: bool = False,
) -> torch.Tensor:
    """SoftTopk combine weights of the assigned experts.

    Args:
        scores_TE: float [T, E] router affinities (differentiable).
        experts_TK: int64 [T, K] assigned experts, ``-1`` for an empty slot (weight 0).
        temperature: factor ``t >= 0`` for every assigned expert but the best-scoring one.
        normalize: divide each token's weights by their sum (tokens with no expert stay 0).

    Returns:
        float [T, K]; ``w = p`` for the token's highest-affinity assigned expert, ``t * p`` for
        the others (ties: the lower slot index keeps ``p``), 0 in empty slots.
    """
    assigned_TK = experts_TK >= 0
    picked_TK = scores_TE.gather(1, experts_TK.clamp(min=0)) * assigned_TK
    if temperature != 1.0:
        ranking_TK = picked_TK.detach().masked_fill(~assigned_TK, -torch.inf)
        best_TK = nn.functional.one_hot(ranking_TK.argmax(1), experts_TK.shape[1]).bool()
        picked_TK = torch.where(best_TK, picked_TK, temperature * picked_TK)
    if normalize:
        picked_TK = picked_TK / picked_TK.sum(1, keepdim=True).clamp(min=torch.finfo(picked_TK.dtype).tiny)
    return picked_TK


@dataclass(frozen=True, kw_only=True, slots=True)
class TemperatureScheduleConfig:
    """SoftTopk temperature ``t(step)``: ``start`` at step 0, ``end`` from step ``steps`` on.

    ``kind`` is ``"linear"`` (the paper: ``max(4 - 3 * step / 30000, 1)``), ``"cosine"``, or
    ``"constant"`` (``t = start`` always).  ``steps=None``: the length of the training run where
    the harness trains (``maxscore train`` / ``compare`` set it), else ``DEFAULT_STEPS`` (the
    paper's 30000; ``MoELayer``, ``upcycle`` and ``swap_router`` know no run length).
    """

    DEFAULT_STEPS: ClassVar[int] = 30000

    start: float = 4.0
    end: float = 1.0
    steps: int | None = None
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine", "constant"):
            raise ValueError(f"kind must be 'linear', 'cosine' or 'constant', got {self.kind!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        steps = self.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an int >= 0 or None (the run's length), got {steps!r}")

    @property
    def num_steps(self) -> int:
        """``steps``, with ``None`` read as ``DEFAULT_STEPS``."""
        return self.DEFAULT_STEPS if self.steps is None else self.steps


def schedule_config(value: TemperatureScheduleConfig | Mapping | None) -> TemperatureScheduleConfig:
    """A schedule config from a config, its fields as a dict (e.g. from JSON), or None (defaults)."""
    if value is None:
        return TemperatureScheduleConfig()
    if isinstance(value, Mapping):
        names = [f.name for f in fields(TemperatureScheduleConfig)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown schedule field(s) {unknown}; a schedule has {names}")
        return TemperatureScheduleConfig(**value)
    if not isinstance(value, TemperatureScheduleConfig):
        raise ValueError(
            f"schedule must be a TemperatureScheduleConfig or a dict of its fields, got {value!r}"
        )
    return value


class TemperatureSchedule(nn.Module):
    """The SoftTopk temperature, advanced once per optimizer step.

    The step count is module state: the buffer ``step_count`` (saved in ``state_dict`` and by
    ``save_pretrained``) mirrored by a host int that ``temperature()`` reads, so routing needs
    no device sync; loading a state dict re-reads the buffer.  Forward passes never move it,
    so evaluation and gradient accumulation leave the schedule where it is.  Call ``step()``
    after each optimizer step (``maxscore.moe.install_step_hook`` does it).
    """

    def __init__(self, config: TemperatureScheduleConfig | Mapping | None = None) -> None:
        super().__init__()
        self.config = schedule_config(config)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64))
        self._num_steps = 0
        self.register_load_state_dict_post_hook(lambda module, _: module.sync())

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps = int(value)
        self.step_count.fill_(self._num_steps)

    def sync(self) -> None:
        """Re-reads the step count from the buffer (host-side: after loading weights)."""
        self._num_steps = int(self.step_count)

    def temperature(self) -> float:
        """The current temperature (host float; no device sync)."""
        cfg = self.config
        if cfg.kind == "constant":
            return float(cfg.start)
        if self.num_steps >= cfg.num_steps:
            return float(cfg.end)
        progress = self.num_steps / cfg.num_steps
        if cfg.kind == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return float(cfg.start + (cfg.end - cfg.start) * progress)

    def step(self) -> None:
        self._num_steps += 1
        self.step_count.add_(1)  # no host sync on accelerators

    def extra_repr(self) -> str:
        cfg = self.config
        return f"{cfg.kind} {cfg.start} -> {cfg.end} over {cfg.num_steps} steps, at step {self.num_steps}"
