"""The one result type of every solver method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maxscore.solvers._validate import Problem


@dataclass(frozen=True, kw_only=True, slots=True)
class Assignment:
    """A routing of tokens to experts: one problem ([N, E] scores) or G groups ([G, N, E]).

    Attributes (a batched assignment has a leading G on every tensor, all on the scores' device):
        experts: int64 [N, K] or [G, N, K]; row t holds token t's distinct experts, best first
            where the method ranks them; ``-1`` marks a slot left unassigned (a dropped slot, or
            every slot of an invalid token).
        loads: int64 [E] or [G, E]; tokens assigned to each expert.
        score: total affinity of the assigned pairs (sum of ``scores[t, e]``): a float, or a
            float64 [G] tensor.
        capacity: tokens per expert the method was asked to respect: an int, or int64 [G].
        method: the registered name of the method that produced it.
        valid: bool [N] / [G, N] or ``None`` (all tokens valid).
        prices: float64 [E] / [G, E] dual prices (``exact`` and methods built on it), else ``None``.
        gap: duality gap ``D(prices) - score`` certifying optimality (``exact``), a float or a
            float64 [G] tensor, else ``None``.
        converged: ``False`` when an iterative method stopped at its iteration cap (or, for the
            device engine, when a group could not be certified): a bool, or bool [G].
        fallback: groups the device engine handed to the host solver: ``False``, or bool [G];
            with checks deferred (``validate="deferred"``), the groups it left uncertified.
        issues: with checks deferred, the bad input the device engine found, int32 [G, 4] on the
            device: the first token with NaN/+inf scores + 1, the first with fewer than k allowed
            experts + 1 (0: none), an infeasible capacity, non-finite warm prices; else ``None``
            (bad input raised).

    With G groups, ``mask()`` is bool [G, N, E], ``load_ratio()`` is float [G, E] (each group
    against its own capacity), and ``num_valid``, ``dropped_fraction`` and
    ``dropped_fraction_by_rank()`` count the valid tokens of all groups together.
    """

    experts: torch.Tensor
    loads: torch.Tensor
    score: float | torch.Tensor
    capacity: int | torch.Tensor
    method: str
    valid: torch.Tensor | None = None
    prices: torch.Tensor | None = None
    gap: float | torch.Tensor | None = None
    converged: bool | torch.Tensor = True
    fallback: bool | torch.Tensor = False
    issues: torch.Tensor | None = None

    @property
    def batched(self) -> bool:
        """True for G routing groups ([G, N, K] experts)."""
        return self.experts.dim() == 3

    @property
    def num_groups(self) -> int:
        """G (1 for a single problem)."""
        return self.experts.shape[0] if self.batched else 1

    @property
    def num_tokens(self) -> int:
        """N, the tokens of one group."""
        return self.experts.shape[-2]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[-1]

    @property
    def k(self) -> int:
        return self.experts.shape[-1]

    @property
    def num_valid(self) -> int:
        """Number of valid (non-padding) tokens, over all groups. Host-side."""
        return self.experts[..., 0].numel() if self.valid is None else int(self.valid.sum())

    @property
    def dropped_fraction(self) -> float:
        """Fraction of the valid tokens' K slots left unassigned (all groups). Host-side."""
        return self.dropped_fraction_by_rank().mean().item() if self.num_valid else 0.0

    def dropped_fraction_by_rank(self) -> torch.Tensor:
        """float [K]: fraction of valid tokens (all groups) whose i-th slot is unassigned."""
        dropped_TK = (self.experts < 0).reshape(-1, self.k)
        if self.valid is not None:
            dropped_TK = dropped_TK[self.valid.reshape(-1)]
        if dropped_TK.shape[0] == 0:
            return torch.zeros(self.k, device=self.experts.device)
        return dropped_TK.float().mean(0)

    def mask(self) -> torch.Tensor:
        """bool [N, E] (or [G, N, E]): ``True`` where token t is assigned to expert e."""
        num_experts = self.num_experts
        mask = torch.zeros(
            *self.experts.shape[:-1], num_experts + 1, dtype=torch.bool, device=self.experts.device
        )
        mask.scatter_(-1, self.experts % (num_experts + 1), True)  # -1 lands in the extra column
        return mask[..., :num_experts]

    def load_ratio(self) -> torch.Tensor:
        """float [E] (or [G, E]): load / capacity of each expert (0 where capacity and load are 0)."""
        loads = self.loads.float()
        capacity = torch.as_tensor(self.capacity, device=loads.device).float()
        if capacity.dim():
            capacity = capacity[:, None]
        ratio = loads / capacity.clamp(min=1)
        return torch.where(capacity > 0, ratio, torch.where(loads > 0, float("inf"), 0.0))


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


def stack_assignments(assignments: list[Assignment], capacity_G: torch.Tensor) -> Assignment:
    """G single-group assignments as one batched ``Assignment`` (methods solved group by group)."""
    first = assignments[0]
    device = first.experts.device

    def stacked(name: str) -> torch.Tensor | None:
        values = [getattr(a, name) for a in assignments]
        return None if values[0] is None else torch.stack(values)

    def floats(name: str) -> torch.Tensor | None:
        values = [getattr(a, name) for a in assignments]
        if any(v is None for v in values):
            return None
        return torch.tensor(values, dtype=torch.float64, device=device)

    return Assignment(
        experts=stacked("experts"),
        loads=stacked("loads"),
        score=floats("score"),
        capacity=capacity_G.to(device),
        method=first.method,
        valid=stacked("valid"),
        prices=stacked("prices"),
        gap=floats("gap"),
        converged=torch.tensor([a.converged for a in assignments], device=device),
        fallback=torch.zeros(len(assignments), dtype=torch.bool, device=device),
    )


def single_assignment(a: Assignment) -> Assignment:
    """A one-group batched assignment as the result of [N, E] scores (Python numbers). Host-side."""
    return Assignment(
        experts=a.experts[0],
        loads=a.loads[0],
        score=float(a.score[0]),
        capacity=int(a.capacity[0]),
        method=a.method,
        valid=None if a.valid is None else a.valid[0],
        prices=None if a.prices is None else a.prices[0],
        gap=None if a.gap is None else float(a.gap[0]),
        converged=bool(a.converged[0]),
        fallback=bool(a.fallback[0]),
        issues=a.issues,
    )
