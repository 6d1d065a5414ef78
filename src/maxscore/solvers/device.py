"""Exact routing of G groups on the scores' device: the ``engine="device"`` path of ``exact``.

Problem: the exact problem of ``maxscore.solvers.exact`` for each of G routing groups
(scores [G, N, E], capacities [G]).  The dense work runs as batched tensor ops on the scores'
device (CUDA in training; the same code runs on the CPU, which is how it is tested):

1. **Prices.** From the warm start (a router's averaged prices), ``price_iterations`` damped
   best-response steps: expert e's target price is the midpoint of the C-th and (C+1)-th
   largest thresholds ``s[t, e] - (the k-th or (k+1)-th best of s[t] - p without e)``, i.e.
   the price at which exactly C tokens would want it; prices move ``DAMPING`` of the way.
2. **Assignment.** Every valid token takes its top-k of ``s - p``; its margin is
   ``v_k - v_(k+1)``.  A shortest repair path can only move tokens whose margin is below the
   price changes it causes, so the ``ceil(N / CANDIDATE_FRACTION)`` tokens of smallest margin
   per group are the candidates; every other token stays fixed.
3. **Repair** (the one host round trip per call): the candidates' scores, the capacities the
   fixed tokens leave, the prices and the smallest fixed margin go to the host in one
   transfer; the compiled core solves the G candidate sub-problems exactly in one call by
   successive shortest paths from p (no auction: a path raises prices by at most its
   length).  A group is certified when its sub-problem is solved and the price
   change spread ``max(p' - p) - min(p' - p)`` is at most its smallest fixed margin: then
   every fixed token still holds a top-k of ``s - p'`` and the joined routing meets every
   optimality condition.  Groups that are not certified are solved by the host core on their
   full scores (``Assignment.fallback``; a second transfer, only then).
4. **Certificate** on the device, with no host synchronization: loads <= C, k distinct finite
   experts per valid token and none for padding, prices >= 0, and the duality gap
   ``sum_t topk_k(s[t] - p) + C sum_e p_e - score`` in float64; ``converged`` is False for a
   group whose gap exceeds ``GAP_TOLERANCE`` relative (never seen: it would be a bug).

Input checks (NaN/+inf, tokens with fewer than k allowed experts, infeasible capacity) are
computed on the device and read with the same transfer, so bad input raises the same errors
as on the host.  Complexity: ``price_iterations`` x (one top-(k+1) and one sort over tokens of
[G, N, E]) on the device; the host solves G problems of N / 8 tokens.  Ties: the device top-k
(lower expert index first where ``torch.topk`` is stable), then as the compiled core.

References: DESIGN.md, "Exact routing on the device"; Ahuja, Magnanti & Orlin, *Network
Flows* (1993), ch. 9 (reduced costs and successive shortest paths).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maxscore.solvers._native import run_core_batch
from maxscore.solvers._validate import (
    Problems,
    _check_k,
    capacities,
    check_scores,
    check_valid,
    infeasible_message,
    make_problems,
    nonfinite_message,
    short_message,
)
from maxscore.solvers.assignment import Assignment
from maxscore.solvers.exact import check_counts, solve_exact_groups

DEVICE_PRICE_STEPS = 8
DAMPING = 0.8
CANDIDATE_FRACTION = 8
GAP_TOLERANCE = 1e-6  # relative; the gap is 0 up to float64 rounding when the routing is optimal


def solve_exact_device(
    scores: torch.Tensor,
    k: int,
    *,
    capacity: int | torch.Tensor | None = None,
    capacity_factor: float = 1.0,
    valid: torch.Tensor | None = None,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = DEVICE_PRICE_STEPS,
    threads: int | None = None,
) -> Assignment:
    """Exact routing of [N, E] or [G, N, E] scores with the dense work on their device.

    Arguments as ``maxscore.solve``; ``price_iterations`` is the fixed number of device price
    steps, ``max_moves`` and ``threads`` go to the host core for the repair.
    """
    check_scores(scores)
    single = scores.dim() == 2
    scores_GNE = scores[None] if single else scores
    num_groups, num_tokens, num_experts = scores_GNE.shape
    _check_k(k, num_experts)
    valid_GN = check_valid(valid, tuple(scores_GNE.shape[:2]) if not single else (num_tokens,))
    if valid_GN is not None:
        valid_GN = valid_GN.to(scores.device).reshape(num_groups, num_tokens)
    if single and isinstance(capacity, torch.Tensor):
        raise ValueError("capacity must be an int for [N, E] scores (an int64 [G] tensor is for [G, N, E])")
    check_counts(max_moves=max_moves, price_iterations=price_iterations, threads=threads)
    if num_tokens == 0:  # nothing to route: the host path handles the empty shapes
        problems = make_problems(scores_GNE, k, capacity, capacity_factor, valid_GN)
        result = solve_exact_groups(problems, prices=prices, max_moves=max_moves, threads=threads)
        return _single(result) if single else result
    engine = _DeviceSolve(scores_GNE, k, valid_GN, capacity, capacity_factor)
    result = engine.run(prices, price_iterations, max_moves, threads)
    return _single(result) if single else result


def _single(a: Assignment) -> Assignment:
    """A one-group batched result as today's [N, E] result (Python numbers)."""
    return Assignment(
        experts=a.experts[0],
        loads=a.loads[0],
        score=float(a.score[0]),
        capacity=int(a.capacity[0]),
        method=a.method,
        valid=None if a.valid is None else a.valid[0],
        prices=a.prices[0],
        gap=float(a.gap[0]),
        converged=bool(a.converged[0]),
        fallback=bool(a.fallback[0]),
    )


class _DeviceSolve:
    """One call of the device engine (state shared by its steps)."""

    def __init__(self, scores_GNE, k, valid_GN, capacity, capacity_factor) -> None:
        self.k = k
        self.G, self.N, self.E = scores_GNE.shape
        self.device = scores_GNE.device
        self.original = scores_GNE
        self.valid_GN = valid_GN
        ones = torch.ones(self.G, self.N, dtype=torch.bool, device=self.device)
        self.mask_GN = ones if valid_GN is None else valid_GN
        self.num_valid_G = self.mask_GN.sum(1)
        self.capacity_G = capacities(capacity, capacity_factor, self.num_valid_G, self.E, k)
        s = scores_GNE.detach().double()
        self.bad_GN = (torch.isnan(s) | (s == math.inf)).any(-1) & self.mask_GN
        self.short_GN = ((s > -math.inf).sum(-1) < k) & self.mask_GN
        usable_GN = self.mask_GN & ~self.bad_GN
        self.s = torch.where(usable_GN[..., None], s, -math.inf)
        self.slack_G = self.capacity_G * self.E > k * self.num_valid_G
        self.bad_prices_G = torch.zeros(self.G, dtype=torch.bool, device=self.device)

    # ---- 1. prices --------------------------------------------------------------------------
    def initial_prices(self, prices: torch.Tensor | None) -> torch.Tensor:
        if prices is None:
            return torch.zeros(self.G, self.E, dtype=torch.float64, device=self.device)
        if not isinstance(prices, torch.Tensor) or tuple(prices.shape) not in ((self.E,), (self.G, self.E)):
            raise ValueError(
                f"prices must be a float tensor of shape [E] or [G, E] = [{self.E}] or [{self.G}, {self.E}], "
                f"got {prices!r}"
            )
        p = prices.detach().to(self.device, torch.float64).expand(self.G, self.E).clone()
        self.bad_prices_G = ~torch.isfinite(p).all(1)  # raised at the one transfer, no sync here
        return torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)

    def top(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's top-k of s - p: experts [G, N, K], k-th and (k+1)-th values [G, N]."""
        top = torch.topk(self.s - p[:, None, :], min(self.k + 1, self.E), dim=-1)
        kth = top.values[..., self.k - 1]
        if self.k < self.E:
            next_ = top.values[..., self.k]
        else:
            next_ = torch.full_like(kth, -math.inf)
        return top.indices[..., : self.k], kth, next_

    def held(self, experts_GNK: torch.Tensor) -> torch.Tensor:
        held = torch.zeros(self.G, self.N, self.E, dtype=torch.bool, device=self.device)
        held.scatter_(-1, experts_GNK.clamp(min=0), True)
        return held & self.mask_GN[..., None] & (experts_GNK >= 0).any(-1, keepdim=True)

    def price_step(self, p: torch.Tensor) -> torch.Tensor:
        experts_GNK, kth_GN, next_GN = self.top(p)
        held_GNE = self.held(experts_GNK)
        threshold_GNE = self.s - torch.where(held_GNE, next_GN[..., None], kth_GN[..., None])
        threshold_GNE = threshold_GNE.masked_fill(~self.mask_GN[..., None], -math.inf)
        ranked_GNE = torch.sort(threshold_GNE, dim=1, descending=True).values
        cap_G1E = self.capacity_G.view(-1, 1, 1).expand(-1, 1, self.E)
        hi_GE = ranked_GNE.gather(1, (cap_G1E - 1).clamp(0, self.N - 1)).squeeze(1)
        lo_GE = ranked_GNE.gather(1, cap_G1E.clamp(max=self.N - 1)).squeeze(1)
        lo_GE = torch.where(cap_G1E.squeeze(1) >= self.N, -math.inf, lo_GE)
        target_GE = torch.where(torch.isfinite(hi_GE) & torch.isfinite(lo_GE), 0.5 * (hi_GE + lo_GE), p)
        target_GE = torch.where(self.capacity_G[:, None] > 0, target_GE, p)
        p = p + DAMPING * (target_GE - p)
        return self.normalized(p)

    def normalized(self, p: torch.Tensor) -> torch.Tensor:
        """Prices shifted to minimum 0 (tight groups) or clamped at 0 (groups with slack)."""
        shifted = p - p.min(-1, keepdim=True).values
        return torch.where(self.slack_G[:, None], p.clamp(min=0), shifted)

    # ---- 2.-3. assignment, candidates, repair --------------------------------------------------
    def run(self, prices, steps, max_moves, threads) -> Assignment:
        p = self.normalized(self.initial_prices(prices))
        for _ in range(steps):
            p = self.price_step(p)
        experts_GNK, kth_GN, next_GN = self.top(p)
        experts_GNK = experts_GNK.masked_fill(~self.mask_GN[..., None], -1)
        margin_GN = torch.where(self.mask_GN, kth_GN - next_GN, math.inf)
        num_candidates = min(self.N, max(1, -(-self.N // CANDIDATE_FRACTION)))
        smallest = torch.topk(margin_GN, min(num_candidates + 1, self.N), dim=1, largest=False)
        candidates_GM = smallest.indices[:, :num_candidates]
        if num_candidates < self.N:
            fixed_margin_G = smallest.values[:, num_candidates]
        else:
            fixed_margin_G = torch.full((self.G,), math.inf, dtype=torch.float64, device=self.device)
        loads_GE = self.loads(experts_GNK)
        index_GMK = candidates_GM[..., None].expand(-1, -1, self.k)
        candidate_loads_GE = self.loads(experts_GNK.gather(1, index_GMK))
        sub_capacity_GE = self.capacity_G[:, None] - (loads_GE - candidate_loads_GE)
        candidate_scores_GME = self.s.gather(1, candidates_GM[..., None].expand(-1, -1, self.E))
        candidate_valid_GM = self.mask_GN.gather(1, candidates_GM)
        host = self.to_host(candidate_scores_GME, candidate_valid_GM, sub_capacity_GE, p, fixed_margin_G)
        new_p, sub_experts, fallback = self.repair(host, num_candidates, threads)
        experts_GNK = experts_GNK.scatter(1, index_GMK, sub_experts.to(self.device))
        p = torch.from_numpy(new_p).to(self.device)
        fallback_G = torch.from_numpy(fallback).to(self.device)
        if fallback.any():
            experts_GNK, p = self.fall_back(fallback, experts_GNK, p, max_moves, threads)
        return self.certify(experts_GNK, p, fallback_G)

    def loads(self, experts: torch.Tensor) -> torch.Tensor:
        loads_GE = torch.zeros(self.G, self.E + 1, dtype=torch.int64, device=self.device)
        slots = (experts % (self.E + 1)).flatten(1)  # -1 lands in the extra column
        loads_GE.scatter_add_(1, slots, torch.ones_like(slots))
        return loads_GE[:, : self.E]

    def to_host(self, scores_GME, valid_GM, sub_capacity_GE, p, fixed_margin_G) -> dict[str, np.ndarray]:
        """The one transfer: every piece packed into one float64 buffer."""
        flags_G4 = torch.stack(
            [
                self.bad_GN.any(1),
                self.short_GN.any(1),
                self.capacity_G * self.E < self.k * self.num_valid_G,
                self.bad_prices_G,
            ],
            dim=1,
        )
        parts = {
            "scores": scores_GME,
            "valid": valid_GM,
            "capacity": sub_capacity_GE,
            "prices": p,
            "margin": fixed_margin_G,
            "flags": flags_G4,
            "group_capacity": self.capacity_G,
            "num_valid": self.num_valid_G,
        }
        packed = torch.cat([t.double().flatten() for t in parts.values()]).cpu().numpy()
        out, offset = {}, 0
        for name, t in parts.items():
            out[name] = packed[offset : offset + t.numel()].reshape(tuple(t.shape))
            offset += t.numel()
        self.raise_bad_input(out)
        return out

    def raise_bad_input(self, host: dict[str, np.ndarray]) -> None:
        flags = host["flags"].astype(bool)
        if flags[:, 0].any():
            rows = self.bad_GN.flatten().nonzero().flatten().cpu()
            raise ValueError(nonfinite_message(rows, self.N if self.G > 1 else None))
        if flags[:, 1].any():
            rows = self.short_GN.flatten().nonzero().flatten().cpu()
            raise ValueError(short_message(rows, self.k, self.N if self.G > 1 else None))
        if flags[:, 2].any():
            g = int(np.flatnonzero(flags[:, 2])[0])
            capacity, num_valid = int(host["group_capacity"][g]), int(host["num_valid"][g])
            group = g if self.G > 1 else None
            raise ValueError(infeasible_message(capacity, self.E, self.k, num_valid, group))
        if flags[:, 3].any():
            raise ValueError("prices must be finite; pass None for a cold start")

    def repair(self, host, num_candidates, threads) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Solves the candidate sub-problems on the host; certifies each group by its margins."""
        capacity_GE = host["capacity"].astype(np.int64)
        broken_G = (capacity_GE < 0).any(1)  # the fixed tokens alone overload an expert
        capacity_GE[broken_G] = num_candidates * self.k
        valid_GM = torch.from_numpy(host["valid"].astype(bool))
        sub = Problems(
            torch.from_numpy(host["scores"]),
            self.k,
            torch.zeros(self.G, dtype=torch.int64),
            valid_GM,
            valid_GM.sum(1),
            self.device,
        )
        # shortest paths only (no auction, no price steps): they raise each price by no more than
        # its path's length, so the fixed tokens' margins can certify the result
        result = run_core_batch(
            sub,
            capacity_GE=capacity_GE,
            prices_GE=host["prices"],
            max_moves=0,
            price_iterations=0,
            threads=threads,
            raise_errors=False,
        )
        change_GE = result.prices_GE - host["prices"]
        spread_G = change_GE.max(1) - change_GE.min(1)
        certified_G = (result.status_G == 0) & ~broken_G & (spread_G <= host["margin"])
        experts = torch.from_numpy(result.experts_GNK).masked_fill(~valid_GM[..., None], -1)
        return result.prices_GE, experts, ~certified_G

    def fall_back(self, fallback: np.ndarray, experts_GNK, p, max_moves, threads):
        """Groups the repair could not certify: the host core on their full scores."""
        groups = torch.from_numpy(np.flatnonzero(fallback)).to(self.device)
        scores = self.original.index_select(0, groups).detach()
        scores = scores.to("cpu", scores.dtype if scores.dtype == torch.float64 else torch.float32)
        valid = None if self.valid_GN is None else self.valid_GN.index_select(0, groups).cpu()
        full = Problems(
            scores.contiguous(),
            self.k,
            self.capacity_G.index_select(0, groups).cpu(),
            valid,
            self.num_valid_G.index_select(0, groups).cpu(),
            self.device,
        )
        result = run_core_batch(full, max_moves=max_moves, threads=threads, group_ids=groups.tolist())
        experts_GNK = experts_GNK.index_copy(0, groups, torch.from_numpy(result.experts_GNK).to(self.device))
        p = p.index_copy(0, groups, torch.from_numpy(result.prices_GE).to(self.device))
        return experts_GNK, p

    # ---- 4. certificate ---------------------------------------------------------------------
    def certify(self, experts_GNK: torch.Tensor, p: torch.Tensor, fallback_G: torch.Tensor) -> Assignment:
        valid_slot_GNK = experts_GNK >= 0
        loads_GE = self.loads(experts_GNK)
        picked_GNK = self.s.gather(-1, experts_GNK.clamp(min=0))
        score_G = torch.where(valid_slot_GNK, picked_GNK, 0.0).sum((1, 2))
        best_GN = torch.topk(self.s - p[:, None, :], self.k, dim=-1).values.sum(-1)
        dual_G = torch.where(self.mask_GN, best_GN, 0.0).sum(1) + (self.capacity_G[:, None] * p).sum(1)
        gap_G = dual_G - score_G
        distinct_GN = self.held(experts_GNK).sum(-1) == self.k
        filled_GN = torch.where(self.mask_GN, valid_slot_GNK.all(-1) & distinct_GN, ~valid_slot_GNK.any(-1))
        finite_GN = torch.isfinite(torch.where(valid_slot_GNK, picked_GNK, 0.0)).all(-1)
        feasible_G = (
            (loads_GE <= self.capacity_G[:, None]).all(1)
            & filled_GN.all(1)
            & finite_GN.all(1)
            & (p >= 0).all(1)
        )
        tolerance_G = GAP_TOLERANCE * score_G.abs().clamp(min=1.0)
        converged_G = feasible_G & (gap_G.abs() <= tolerance_G)
        return Assignment(
            experts=experts_GNK,
            loads=loads_GE,
            score=score_G,
            capacity=self.capacity_G,
            method="exact",
            valid=self.valid_GN,
            prices=p,
            gap=gap_G,
            converged=converged_G,
            fallback=fallback_G,
        )
