"""The device engine's dense work (steps 1, 3 and 4 of ``device.py``) in its two implementations.

``FusedOps``: the Triton kernels of ``kernels.py``, one program per routing group, three
launches per call (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).  ``TorchOps``: the same
algorithm as plain torch operations in float64 (the reference steps of ``prices.py``; a fixed
number of price steps, so no host synchronization), for machines without Triton.

Both take the problems of ``make_problems(..., on_device=True)`` and return the same things:
``dense`` the prices, every token's top-k and margin, the loads and the input flags; ``pack``
one buffer for the host (layout: ``packed_width``); ``finish`` the candidates' experts from the
host's answer put in place, and the certificate.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch

from maxscore.solvers._validate import Problems
from maxscore.solvers.exact.prices import (
    DAMPING,
    GAP_TOLERANCE,
    Certificate,
    certify,
    expert_loads,
    price_step,
)

TILE = 2048  # scores per tile: with WARPS warps the kernels fit in registers on sm_90 (no spills)
WARPS = 8  # warps per program (tests/solvers/test_kernels_compile.py checks the fit)


@dataclass(frozen=True, slots=True)
class Dense:
    """Step 1's result: prices [G, E], experts [G, N, K] (-1 for padding), margins [G, N]
    (+inf for padding), loads [G, E] and flags int32 [G, 4] (NaN/+inf rows, short rows,
    infeasible capacity, non-finite warm prices)."""

    prices: torch.Tensor
    experts: torch.Tensor
    margin: torch.Tensor
    loads: torch.Tensor
    flags: torch.Tensor


# the host's answer per group (the last column of its row): what ``finish`` does with the group
REPAIRED, FELL_BACK, UNCHANGED = 0, 1, 2  # candidates' experts from the row / in place / in place


def packed_width(num_candidates: int, num_experts: int) -> int:
    """Row layout: candidate scores [M, E], candidate validity [M], capacities left [E], prices [E],
    loads [E], the smallest fixed margin, the capacity, the valid tokens, the 4 flags."""
    return num_candidates * num_experts + num_candidates + 3 * num_experts + 7


@functools.cache
def _kernels():
    try:
        from maxscore.solvers.exact import kernels
    except ImportError:  # Triton is an optional extra
        return None
    return kernels


_FAILED: set[str] = set()  # devices where a kernel failed to compile or launch


class KernelError(RuntimeError):
    """A fused kernel could not be compiled or launched (Triton's error is the cause)."""


def kernels_available(device: torch.device) -> bool:
    """True when the fused kernels run on ``device``: CUDA with Triton installed, or the CPU
    with ``TRITON_INTERPRET=1`` set before the kernels were first used; and no kernel has
    failed there (``disable_kernels``)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return False
    return device.type in ("cuda", "cpu") and str(device) not in _FAILED and _kernels() is not None


def disable_kernels(device: torch.device, error: KernelError) -> None:
    """After a kernel failed on ``device``: warn once; ``engine="auto"`` takes the host core there."""
    if str(device) not in _FAILED:
        warnings.warn(
            f"{error}; exact routing on {device} falls back to the host engine for the rest of this "
            "process (please report this with your GPU, torch and Triton versions)",
            RuntimeWarning,
            stacklevel=3,
        )
    _FAILED.add(str(device))


@contextlib.contextmanager
def _launch(name: str):
    """A kernel launch: a profiler range (``maxscore::<name>``) and its errors as ``KernelError``."""
    with torch.profiler.record_function(f"maxscore::{name}"):
        try:
            yield
        except Exception as error:  # compilation, resources, driver: whatever Triton raises
            raise KernelError(f"the device engine's {name} failed to compile or launch: {error}") from error


class TorchOps:
    """The dense work as plain torch operations, in float64."""

    def dense(self, problems: Problems, warm: torch.Tensor, steps: int, early_stop: bool = True) -> Dense:
        # a fixed number of steps (no early stop: it would wait for the device)
        s, valid, k = problems.scores_GNE.double(), problems.valid_GN, problems.k
        mask = valid_mask(problems)
        flags = torch.stack(
            [
                ((torch.isnan(s) | (s == math.inf)).any(-1) & mask).sum(1),
                (((s > -math.inf).sum(-1) < k) & mask).sum(1),
                (problems.capacity_G * problems.num_experts < k * problems.num_valid_G).long(),
                (~torch.isfinite(warm)).any(1).long(),
            ],
            dim=1,
        ).int()
        s = torch.where(mask[..., None] & ~torch.isnan(s), s, -math.inf)
        p = torch.nan_to_num(warm, nan=0.0, posinf=0.0, neginf=0.0)
        p = p - p.min(1, keepdim=True).values
        for _ in range(steps if k < problems.num_experts else 0):
            p = price_step(s, k, problems.capacity_G, p, valid)
        top = torch.topk(s - p[:, None, :], min(k + 1, problems.num_experts), dim=-1)
        experts = top.indices[..., :k].masked_fill(~mask[..., None], -1)
        nxt = (
            top.values[..., k] if k < problems.num_experts else torch.full_like(top.values[..., 0], -math.inf)
        )
        margin = torch.where(mask, top.values[..., k - 1] - nxt, math.inf)
        loads = expert_loads(experts, problems.num_experts)
        return Dense(p, experts, margin, loads, flags)

    def pack(self, problems: Problems, dense: Dense, smallest, num_candidates: int) -> torch.Tensor:
        num_experts, k = problems.num_experts, problems.k
        candidates = smallest.indices[:, :num_candidates]
        if num_candidates < problems.num_tokens:
            fixed = smallest.values[:, num_candidates]
        else:
            fixed = dense.margin.new_full((problems.num_groups,), math.inf)
        index = candidates[..., None]
        scores = problems.scores_GNE.double().gather(1, index.expand(-1, -1, num_experts))
        valid = valid_mask(problems).gather(1, candidates)
        taken = expert_loads(dense.experts.gather(1, index.expand(-1, -1, k)), num_experts)
        left = problems.capacity_G[:, None] - dense.loads + taken
        parts = [
            scores.flatten(1),
            valid,
            left,
            dense.prices,
            dense.loads,
            fixed[:, None],
            problems.capacity_G[:, None],
            problems.num_valid_G[:, None],
            dense.flags,
        ]
        return torch.cat([part.double() for part in parts], dim=1)

    def finish(
        self, problems: Problems, experts: torch.Tensor, back: torch.Tensor, order, num_candidates: int
    ):
        num_experts, k = problems.num_experts, problems.k
        prices = back[:, :num_experts].contiguous()
        state = back[:, -1]
        sub = back[:, num_experts:-1].long().view(problems.num_groups, num_candidates, k)
        index = order[:, :num_candidates, None].expand(-1, -1, k)
        kept = torch.where((state != REPAIRED)[:, None, None], experts.gather(1, index), sub)
        experts = experts.scatter_(1, index, kept)
        stats = certify(problems.scores_GNE, experts, prices, problems.capacity_G, problems.valid_GN)
        return experts, prices, state == FELL_BACK, stats


class FusedOps:
    """The dense work as the fused Triton kernels of ``kernels.py`` (one program per group)."""

    def dense(self, problems: Problems, warm: torch.Tensor, steps: int, early_stop: bool = True) -> Dense:
        """``early_stop=False`` takes every step, even once the excess is small (tests of one step)."""
        kernels = _kernels()
        scores = problems.scores_GNE.contiguous()
        num_groups, num_tokens, num_experts = scores.shape
        k = problems.k
        block_n, block_e = _blocks(num_tokens, num_experts)
        dtype, compute = (torch.float64, "fp64") if scores.dtype == torch.float64 else (torch.float32, "fp32")
        new = functools.partial(torch.empty, device=scores.device)
        out = Dense(
            prices=new(num_groups, num_experts, dtype=torch.float64),  # a warm start kept exactly
            experts=new(num_groups, num_tokens, k, dtype=torch.int64),
            margin=new(num_groups, num_tokens, dtype=dtype),
            loads=new(num_groups, num_experts, dtype=torch.int64),
            flags=new(num_groups, 4, dtype=torch.int32),
        )
        theta = new(num_groups * num_tokens * block_e if steps else 1, dtype=dtype)  # the steps' scratch
        valid, has_valid = _valid_arg(problems, out.flags)
        with _launch("dense_kernel"):
            kernels.dense_kernel[(num_groups,)](
                scores, valid, problems.capacity_G, problems.num_valid_G, warm, out.prices, out.experts,
                out.margin, out.loads, out.flags, theta,
                num_tokens, num_experts, steps if k < num_experts else 0, DAMPING, int(early_stop),
                K=k, BLOCK_N=block_n, BLOCK_E=block_e, HAS_VALID=has_valid, MAX_BISECT=kernels.MAX_BISECT,
                COMPUTE=kernels.COMPUTE[compute], num_warps=WARPS,
            )  # fmt: skip
        return out

    def pack(self, problems: Problems, dense: Dense, smallest, num_candidates: int) -> torch.Tensor:
        scores = problems.scores_GNE.contiguous()
        num_groups, num_tokens, num_experts = scores.shape
        width = packed_width(num_candidates, num_experts)
        out = torch.empty(num_groups, width, dtype=dense.prices.dtype, device=scores.device)
        valid, has_valid = _valid_arg(problems, dense.flags)
        block_e = _blocks(1, num_experts)[1]
        block_m = max(16, min(_next_power_of_2(num_candidates), TILE // block_e))
        order = smallest.indices
        with _launch("pack_kernel"):
            _kernels().pack_kernel[(num_groups,)](
                scores, valid, order, smallest.values, dense.experts, dense.loads, problems.capacity_G,
                problems.num_valid_G, dense.prices, dense.flags, out,
                num_tokens, num_experts, num_candidates, order.shape[1], width,
                K=problems.k, BLOCK_M=block_m, BLOCK_E=block_e, HAS_VALID=has_valid, num_warps=WARPS,
            )  # fmt: skip
        return out

    def finish(
        self, problems: Problems, experts: torch.Tensor, back: torch.Tensor, order, num_candidates: int
    ):
        scores = problems.scores_GNE.contiguous()
        num_groups, num_tokens, num_experts = scores.shape
        block_n, block_e = _blocks(num_tokens, num_experts)
        new = functools.partial(torch.empty, device=scores.device)
        prices, fallback = (
            new(num_groups, num_experts, dtype=torch.float64),
            new(num_groups, dtype=torch.int8),
        )
        loads, stats = (
            new(num_groups, num_experts, dtype=torch.int64),
            new(num_groups, 3, dtype=torch.float64),
        )
        valid, has_valid = _valid_arg(problems, loads)
        with _launch("certify_kernel"):
            _kernels().certify_kernel[(num_groups,)](
                scores, valid, experts, back, order, prices, fallback, problems.capacity_G, loads, stats,
                num_tokens, num_experts, num_candidates, order.shape[1], GAP_TOLERANCE,
                K=problems.k, BLOCK_N=block_n, BLOCK_E=block_e, HAS_VALID=has_valid, num_warps=WARPS,
            )  # fmt: skip
        certificate = Certificate(loads, stats[:, 0], stats[:, 1], stats[:, 2] > 0)
        return experts, prices, fallback.view(torch.bool), certificate


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _blocks(num_tokens: int, num_experts: int) -> tuple[int, int]:
    """Tile sizes: all experts of a token in one row, about ``TILE`` scores per tile."""
    block_e = _next_power_of_2(max(num_experts, 2))
    return max(16, min(_next_power_of_2(max(num_tokens, 1)), TILE // block_e)), block_e


def _valid_arg(problems: Problems, placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The validity mask as bytes for a kernel, or a placeholder pointer it never reads."""
    valid = problems.valid_GN
    return (placeholder, False) if valid is None else (valid.view(torch.uint8), True)


def valid_mask(problems: Problems) -> torch.Tensor:
    """bool [G, N]: the valid tokens."""
    if problems.valid_GN is not None:
        return problems.valid_GN
    shape = (problems.num_groups, problems.num_tokens)
    return torch.ones(shape, dtype=torch.bool, device=problems.scores_GNE.device)
