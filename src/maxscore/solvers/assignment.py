"""The one result type of every solver method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maxscore.solvers._validate import Problem


@dataclass(frozen=True, kw_only=True, slots=True)
class Assignment:
    """A routing of tokens to experts.

    Attributes:
        experts: int64 [T, K]; row t holds token t's distinct experts, best first where the
            method ranks them; ``-1`` marks a slot left unassigned (a dropped slot, or every
            slot of an invalid token).
        loads: int64 [E]; tokens assigned to each expert.
        score: total affinity of the assigned pairs (sum of ``scores[t, e]``), in float64.
        capacity: tokens per expert the method was asked to respect.
        method: the registered name of the method that produced it.
        valid: bool [T] or ``None`` (all tokens valid).
        prices: float64 [E] dual prices (``exact`` and methods built on it), else ``None``.
        gap: duality gap ``D(prices) - score`` certifying optimality (``exact``), else ``None``.
        converged: ``False`` when an iterative method stopped at its iteration cap.
    """

    experts: torch.Tensor
    loads: torch.Tensor
    score: float
    capacity: int
    method: str
    valid: torch.Tensor | None = None
    prices: torch.Tensor | None = None
    gap: float | None = None
    converged: bool = True

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[0]

    @property
    def k(self) -> int:
        return self.experts.shape[1]

    @property
    def num_valid(self) -> int:
        """Number of valid (non-padding) tokens. Host-side."""
        return self.num_tokens if self.valid is None else int(self.valid.sum())

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the valid tokens' K slots left unassigned. Host-side."""
        return self.dropped_fraction_by_rank().mean().item() if self.num_valid else 0.0

    def dropped_fraction_by_rank(self) -> torch.Tensor:
        """float [K]: fraction of valid tokens whose i-th slot is unassigned."""
        dropped_TK = self.experts < 0
        if self.valid is not None:
            dropped_TK = dropped_TK[self.valid]
        if dropped_TK.shape[0] == 0:
            return torch.zeros(self.k, device=self.experts.device)
        return dropped_TK.float().mean(0)

    def mask(self) -> torch.Tensor:
        """bool [T, E]: ``True`` where token t is assigned to expert e."""
        mask_TE = torch.zeros(
            self.num_tokens, self.num_experts + 1, dtype=torch.bool, device=self.experts.device
        )
        mask_TE.scatter_(1, self.experts % (self.num_experts + 1), True)  # -1 lands in the extra column
        return mask_TE[:, : self.num_experts]

    def load_ratio(self) -> torch.Tensor:
        """float [E]: load / capacity of each expert (0 where capacity is 0 and load is 0)."""
        loads_E = self.loads.float()
        if self.capacity == 0:
            return torch.where(loads_E > 0, float("inf"), 0.0)
        return loads_E / self.capacity


def to_assignment(
    problem: Problem,
    experts_TK: np.ndarray | torch.Tensor,
    method: str,
    *,
    loads_E: np.ndarray | torch.Tensor | None = None,
    score: float | None = None,
    prices_E: np.ndarray | None = None,
    gap: float | None = None,
    converged: bool = True,
) -> Assignment:
    """Wraps a host-side routing as an ``Assignment`` on the caller's device."""
    experts = torch.as_tensor(experts_TK, dtype=torch.int64)
    if loads_E is None:
        assigned = experts[experts >= 0]
        loads_E = torch.bincount(assigned, minlength=problem.num_experts)
    if score is None:
        picked_TK = problem.scores_TE.gather(1, experts.clamp(min=0)).double()
        score = float(picked_TK[experts >= 0].sum())
    device = problem.device
    valid = problem.valid_T
    return Assignment(
        experts=experts.to(device),
        loads=torch.as_tensor(loads_E, dtype=torch.int64).to(device),
        score=score,
        capacity=problem.capacity,
        method=method,
        valid=None if valid is None else valid.to(device),
        prices=None if prices_E is None else torch.from_numpy(prices_E).to(device),
        gap=gap,
        converged=converged,
    )
