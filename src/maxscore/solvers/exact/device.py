"""Exact routing of G groups on the scores' device: the ``engine="device"`` path of ``exact``.

Problem: the exact problem of ``maxscore.solvers.exact`` for each of G routing groups
(scores [G, N, E], capacities [G]), built by ``make_problems(..., on_device=True)``.

1. **Prices** (dense, on the device).  From the warm start (a router's averaged prices) shifted
   to minimum 0, damped best-response steps (``prices.py``) while the group's excess is above
   about 0.2% of its units, at most ``price_iterations``; then every valid token takes its
   top-k of ``s - p`` and its margin ``v_k - v_(k+1)``.
2. **Candidates.**  A shortest repair path can only move tokens whose margin is below the
   price changes it causes, so the ``ceil(N / CANDIDATE_FRACTION)`` tokens of smallest margin
   per group are the candidates; every other token stays fixed.
3. **Repair** (the one host round trip): the candidates' scores, the capacities the fixed
   tokens leave, the prices, the loads, the smallest fixed margin and the input flags go to the
   host in one transfer.  A group the price steps already solved (loads within capacity, and
   price 0 wherever an expert has room: complementary slackness) keeps its routing.  The
   compiled core solves the other groups' candidate sub-problems exactly by successive shortest
   paths from p (no auction: a path raises prices by at most its length), on one thread per
   ``REPAIR_SCORES_PER_THREAD`` candidate scores (a thread's start costs more than a small solve).  A group is
   certified when its sub-problem is solved and the price change spread
   ``max(p' - p) - min(p' - p)`` is 0 or below its smallest fixed margin (computed in float64,
   less its storage rounding): then every fixed token still holds a top-k of ``s - p'``.  Other groups are
   solved by the host core on their full scores (``Assignment.fallback``; a second transfer,
   only then).  The new prices and the candidates' experts come back in one transfer.
4. **Certificate** (``prices.certify``) on the device, with no host synchronization.

Two implementations of steps 1, 3 (packing) and 4 run the same algorithm (``dense.py``):
fused Triton kernels (``kernels.py``: one program per group, three launches) where Triton
runs (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), else plain torch operations (the
reference steps of ``prices.py``, in float64).  Bad input (NaN/+inf, tokens with fewer than k allowed experts,
an infeasible capacity, non-finite warm prices) is flagged on the device and raised at the one
transfer with the host engine's messages.

Complexity: per step O(N E (k + bisection passes)) per group on the device; the host solves G
problems of N / 8 tokens.  Ties: lower expert index first on the device, then as the
compiled core.

References: DESIGN.md, "Exact routing on the device"; Ahuja, Magnanti & Orlin, *Network
Flows* (1993), ch. 9 (reduced costs and successive shortest paths).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from maxscore.solvers._validate import (
    Problems,
    host_scores,
    infeasible_message,
    nonfinite_message,
    short_message,
)
from maxscore.solvers.assignment import Assignment
from maxscore.solvers.exact._native import run_core_batch
from maxscore.solvers.exact.dense import (
    FELL_BACK,
    REPAIRED,
    UNCHANGED,
    FusedOps,
    TorchOps,
    kernels_available,
    valid_mask,
)
from maxscore.solvers.exact.host import check_counts, check_price_shape, solve_exact_groups
from maxscore.solvers.exact.prices import DEVICE_PRICE_STEPS

CANDIDATE_FRACTION = 8
REPAIR_SCORES_PER_THREAD = 1 << 16
# relative rounding of a margin stored in the scores' precision (computed in float64)
MARGIN_ROUNDING = {torch.float32: 2.0**-22, torch.float64: 2.0**-50}


def solve_exact_device(
    problems: Problems,
    *,
    prices: torch.Tensor | None = None,
    max_moves: int | None = None,
    price_iterations: int = DEVICE_PRICE_STEPS,
    threads: int | None = None,
) -> Assignment:
    """Exact routing of the problems (on their device) with the dense work there.

    Arguments as ``maxscore.solve``; ``price_iterations`` caps the device price steps,
    ``max_moves`` and ``threads`` go to the host core (repair and fallback).
    """
    check_counts(max_moves=max_moves, price_iterations=price_iterations, threads=threads)
    warm = _warm_prices(prices, problems)
    if problems.num_tokens == 0:  # nothing to route: the host path handles the empty shapes
        return solve_exact_groups(_on_host(problems), prices=prices, threads=threads)
    ops = FusedOps() if kernels_available(problems.scores_GNE.device) else TorchOps()
    return _DeviceSolve(problems, ops).run(warm, price_iterations, max_moves, threads)


def _warm_prices(prices: torch.Tensor | None, problems: Problems) -> torch.Tensor:
    """Warm-start prices [G, E] on the scores' device (checked for finiteness on the device)."""
    num_groups, num_experts = problems.num_groups, problems.num_experts
    device = problems.scores_GNE.device
    if prices is None:
        return torch.zeros(num_groups, num_experts, dtype=torch.float64, device=device)
    check_price_shape(prices, num_groups, num_experts)
    return prices.detach().to(device, torch.float64).expand(num_groups, num_experts).contiguous()


def _repair_threads(threads: int | None, num_scores: int) -> int:
    """Threads for the repair: about one per ``REPAIR_SCORES_PER_THREAD`` candidate scores (a
    thread's start costs more than a small sub-problem's solve)."""
    limit = torch.get_num_threads() if threads is None else threads
    return max(1, min(limit, num_scores // REPAIR_SCORES_PER_THREAD))


def _on_host(problems: Problems) -> Problems:
    """The same problems with every tensor on the host (the host core's input)."""
    return dataclasses.replace(
        problems,
        scores_GNE=host_scores(problems.scores_GNE),
        capacity_G=problems.capacity_G.cpu(),
        valid_GN=None if problems.valid_GN is None else problems.valid_GN.cpu().contiguous(),
        num_valid_G=problems.num_valid_G.cpu(),
    )


class _DeviceSolve:
    """One call of the device engine: steps 2-4 around the dense step of ``ops``."""

    def __init__(self, problems: Problems, ops: TorchOps | FusedOps) -> None:
        self.problems, self.ops = problems, ops
        self.G, self.N, self.E, self.k = (
            problems.num_groups,
            problems.num_tokens,
            problems.num_experts,
            problems.k,
        )
        self.device = problems.scores_GNE.device

    def run(self, warm: torch.Tensor, steps: int, max_moves: int | None, threads: int | None) -> Assignment:
        dense = self.ops.dense(self.problems, warm, steps)
        num_candidates = min(self.N, max(1, -(-self.N // CANDIDATE_FRACTION)))
        smallest = torch.topk(dense.margin, min(num_candidates + 1, self.N), dim=1, largest=False)
        packed = self.ops.pack(self.problems, dense, smallest, num_candidates).cpu()  # the one transfer
        with torch.profiler.record_function("host::repair"):  # host work: no device launches
            host = self.unpack(packed.numpy(), num_candidates)
            self.raise_bad_input(host)
            prices, sub_experts, state = self.repair(host, threads, dense.margin.dtype)
            fallback = state == FELL_BACK
            if fallback.any():
                groups, full_experts = self.fall_back(fallback, prices, max_moves, threads)
            back = np.concatenate([prices, sub_experts.reshape(self.G, -1), state[:, None]], axis=1)
        experts = dense.experts
        back = torch.from_numpy(back).to(self.device)  # the one transfer back
        if fallback.any():
            experts = experts.index_copy_(0, groups, full_experts)
        experts, p, fallback_G, stats = self.ops.finish(
            self.problems, experts, back, smallest.indices, num_candidates
        )
        return Assignment(
            experts=experts,
            loads=stats.loads,
            score=stats.score,
            capacity=self.problems.capacity_G,
            method="exact",
            valid=self.problems.valid_GN,
            prices=p,
            gap=stats.gap,
            converged=stats.converged,
            fallback=fallback_G,
        )

    def unpack(self, packed: np.ndarray, num_candidates: int) -> dict[str, np.ndarray]:
        """The packed rows (layout: ``kernels.packed_width``) by name, as host arrays."""
        sizes = {
            "scores": num_candidates * self.E,
            "valid": num_candidates,
            "capacity": self.E,
            "prices": self.E,
            "loads": self.E,
            "margin": 1,
            "group_capacity": 1,
            "num_valid": 1,
            "flags": 4,
        }
        out, offset = {}, 0
        for name, size in sizes.items():
            out[name] = packed[:, offset : offset + size]
            offset += size
        out["scores"] = out["scores"].reshape(self.G, num_candidates, self.E)
        return out

    def raise_bad_input(self, host: dict[str, np.ndarray]) -> None:
        flags = host["flags"] > 0
        group_size = self.N if self.G > 1 else None
        if flags[:, 0].any() or flags[:, 1].any():
            s = self.problems.scores_GNE
            mask = valid_mask(self.problems)
            if flags[:, 0].any():
                bad = (torch.isnan(s) | (s == math.inf)).any(-1) & mask
                raise ValueError(nonfinite_message(bad.flatten().nonzero().flatten().cpu(), group_size))
            short = ((s > -math.inf).sum(-1) < self.k) & mask
            raise ValueError(short_message(short.flatten().nonzero().flatten().cpu(), self.k, group_size))
        if flags[:, 2].any():
            g = int(np.flatnonzero(flags[:, 2])[0])
            capacity, num_valid = int(host["group_capacity"][g, 0]), int(host["num_valid"][g, 0])
            raise ValueError(
                infeasible_message(capacity, self.E, self.k, num_valid, g if self.G > 1 else None)
            )
        if flags[:, 3].any():
            raise ValueError("prices must be finite; pass None for a cold start")

    def repair(self, host: dict[str, np.ndarray], threads: int | None, margin_dtype: torch.dtype):
        """Solves the candidate sub-problems of the groups the dense step left unsolved on the host;
        certifies each by its margins (computed in float64, stored as ``margin_dtype``).

        Returns the new prices [G, E] (float64), the candidates' experts [G, M, K] and each
        group's state (float64 [G]: ``REPAIRED``, ``FELL_BACK`` or ``UNCHANGED``).
        """
        prices_GE = host["prices"].astype(np.float64)
        state_G = np.full(self.G, float(UNCHANGED))
        experts = np.full((self.G, host["valid"].shape[1], self.k), -1, dtype=np.int64)
        # optimal already: feasible, and an expert below capacity has price 0 (complementary slackness)
        loads_GE, capacity_G = host["loads"], host["group_capacity"]
        optimal_G = (
            (loads_GE <= capacity_G) & (prices_GE >= 0) & ((prices_GE == 0) | (loads_GE == capacity_G))
        ).all(1)
        todo = np.flatnonzero(~optimal_G)
        if todo.size == 0:
            return prices_GE, experts, state_G
        capacity_GE = host["capacity"][todo].astype(np.int64)
        broken_G = (capacity_GE < 0).any(1)  # the fixed tokens alone overload an expert
        capacity_GE[broken_G] = host["valid"].shape[1] * self.k
        start_GE = prices_GE[todo]
        valid_GM = torch.from_numpy(host["valid"][todo] > 0)
        scores = torch.from_numpy(np.ascontiguousarray(host["scores"][todo]))
        sub = Problems(
            scores, self.k, torch.zeros(todo.size, dtype=torch.int64), valid_GM, valid_GM.sum(1), self.device
        )
        # shortest paths only (no auction, no price steps): they raise each price by no more than
        # its path's length, so the fixed tokens' margins can certify the result
        result = run_core_batch(
            sub,
            capacity_GE=capacity_GE,
            prices_GE=start_GE,
            max_moves=0,
            price_iterations=0,
            threads=_repair_threads(threads, scores.numel()),
            raise_errors=False,
        )
        change_GE = result.prices_GE - start_GE
        spread_G = change_GE.max(1) - change_GE.min(1)
        finite = np.where(np.isfinite(scores.numpy()), np.abs(scores.numpy()), 0.0).max((1, 2), initial=0.0)
        # the margins are float64 values (stored in the scores' precision: a relative rounding)
        margin_G = host["margin"][todo, 0].astype(np.float64)
        relative_G = MARGIN_ROUNDING[margin_dtype] * np.where(np.isfinite(margin_G), margin_G, 0.0)
        allowance_G = relative_G + 1e-12 * (1.0 + finite + np.abs(start_GE).max(1))
        # prices the repair left unchanged (up to a common shift) keep every fixed token's top-k
        holds_G = (spread_G == 0) | (spread_G <= margin_G - allowance_G)
        certified_G = (result.status_G == 0) & ~broken_G & holds_G
        prices_GE[todo] = result.prices_GE
        experts[todo] = np.where(valid_GM.numpy()[..., None], result.experts_GNK, -1)
        state_G[todo] = np.where(certified_G, float(REPAIRED), float(FELL_BACK))
        return prices_GE, experts, state_G

    def fall_back(self, fallback: np.ndarray, prices: np.ndarray, max_moves, threads):
        """Groups the repair could not certify: the host core on their full scores (a second
        transfer).  Writes their prices into ``prices``; returns the groups and their experts."""
        groups = torch.from_numpy(np.flatnonzero(fallback)).to(self.device)
        problems = self.problems
        valid = None if problems.valid_GN is None else problems.valid_GN.index_select(0, groups)
        full = _on_host(
            Problems(
                problems.scores_GNE.index_select(0, groups),
                self.k,
                problems.capacity_G.index_select(0, groups),
                valid,
                problems.num_valid_G.index_select(0, groups),
                self.device,
            )
        )
        result = run_core_batch(full, max_moves=max_moves, threads=threads, group_ids=groups.tolist())
        prices[fallback] = result.prices_GE
        return groups, torch.from_numpy(result.experts_GNK).to(self.device)
