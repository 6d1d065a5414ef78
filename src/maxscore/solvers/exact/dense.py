"""The device engine's work on the scores' device, in its two implementations.

``FusedOps``: the Triton kernel of ``kernels.py``, one program per routing group and one
launch per call: price steps, routing, repair and certificate (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``).  ``TorchOps``: the price steps as plain torch operations in float64 (the
reference step of ``prices.py``; a fixed number of steps, so no host synchronization), then the
compiled core's repair from those prices on the host (routing at the prices, then shortest
augmenting paths, free slots through the core's slack node), for machines without Triton.

Both take the problems of ``make_problems(..., on_device=True)`` and return a ``Routed``: the
routing, its prices and certificate, and the flags the engine reads in its one transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch

from maxscore.solvers._validate import Problems, host_scores
from maxscore.solvers.exact._native import run_core_batch
from maxscore.solvers.exact.prices import (
    DAMPING,
    GAP_TOLERANCE,
    Certificate,
    certify,
    expert_loads,
    price_step,
)

TILE = 2048  # scores per tile: with WARPS warps the kernel fits in registers on sm_90 (no spills)
# scores per tile under Triton's interpreter (CPU tensors): each operation is a numpy call, so
# fewer, larger tiles run the same kernel faster
INTERPRETER_TILE = 1 << 16
WARPS = 8  # warps per program (tests/solvers/test_kernels_compile.py checks the fit)
# the kernel's price steps stop at this excess: a step (about 25 passes over the group's
# scores) costs more than the augmentations it would save below it (a few passes each)
STOP_EXCESS = 8


@dataclass(frozen=True, slots=True)
class Routed:
    """A call's result on the device: experts [G, N, K] (-1 for padding), prices float64 [G, E],
    the certificate, flags int32 [G, 5] (the first valid row with NaN/+inf and the first with
    fewer than k allowed experts, each + 1 and 0 for none; infeasible capacity; non-finite warm
    prices; and "unfinished": the repair found no path or ran out of augmentations, or the
    certificate failed) and the work float64 [G, 2] (price steps taken, augmentations)."""

    experts: torch.Tensor
    prices: torch.Tensor
    certificate: Certificate
    flags: torch.Tensor
    work: torch.Tensor


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
    """Price steps in plain torch (float64); the repair by the compiled core on the host."""

    def steps(self, problems: Problems, warm: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prices after ``steps`` steps from the warm start (shifted to minimum 0; a fixed number
        of steps: an early stop would wait for the device), and the input flags int32 [G, 4]."""
        s, valid, k = problems.scores_GNE.double(), problems.valid_GN, problems.k
        mask = valid_mask(problems)
        flags = torch.stack(
            [
                first_row((torch.isnan(s) | (s == math.inf)).any(-1) & mask),
                first_row(((s > -math.inf).sum(-1) < k) & mask),
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
        return p - p.min(1, keepdim=True).values, flags

    def solve(
        self, problems: Problems, warm: torch.Tensor, steps: int, max_augment: int, threads: int | None
    ) -> Routed:
        k, num_experts = problems.k, problems.num_experts
        p, flags = self.steps(problems, warm, steps)
        padding = ~valid_mask(problems)[..., None]
        s = problems.scores_GNE.double().masked_fill(padding, -math.inf)
        experts = torch.topk(s - p[:, None, :], k, dim=-1).indices.masked_fill(padding, -1)
        excess = (expert_loads(experts, num_experts) - problems.capacity_G[:, None]).clamp(min=0).sum(1)
        host = torch.cat([flags, excess[:, None].int()], dim=1).cpu()  # the one transfer
        flags, excess = host[:, :4], host[:, 4]
        work = torch.zeros(problems.num_groups, 2, dtype=torch.float64)
        work[:, 0] = steps if k < num_experts else 0
        # bad input is raised by the engine from the flags; over the budget: the host core in full
        todo = (excess <= max_augment) & ~flags.any(1)
        failed = ~todo & (excess > 0)
        if todo.any():
            index = todo.nonzero().flatten().to(s.device)
            with torch.profiler.record_function("host::repair"):  # host work: no device launches
                result = run_core_batch(
                    on_host(select_groups(problems, index)),
                    prices_GE=p.index_select(0, index).cpu().numpy(),
                    max_moves=0,
                    price_iterations=0,
                    threads=threads,
                    raise_errors=False,
                )
            experts.index_copy_(0, index, torch.from_numpy(result.experts_GNK).to(s.device))
            p.index_copy_(0, index, torch.from_numpy(result.prices_GE).to(s.device))
            failed[todo] = torch.from_numpy(result.status_G != 0)
            work[todo, 1] = torch.from_numpy(result.stats_GS[:, 3]).double()
        certificate = certify(problems.scores_GNE, experts, p, problems.capacity_G, problems.valid_GN)
        failed |= todo & ~certificate.converged.cpu()
        flags = torch.cat([flags, failed[:, None].int()], dim=1)
        return Routed(experts, p, certificate, flags.to(s.device), work.to(s.device))


class FusedOps:
    """The fused Triton kernel of ``kernels.py`` (one program per group, one launch)."""

    def solve(
        self, problems: Problems, warm: torch.Tensor, steps: int, max_augment: int, threads: int | None
    ) -> Routed:
        return self._launch(problems, warm, steps, STOP_EXCESS, max_augment, steps_only=False)

    def steps(self, problems: Problems, warm: torch.Tensor, steps: int) -> torch.Tensor:
        """Prices float64 [G, E] after exactly ``steps`` price steps (no routing: the step's tests)."""
        return self._launch(problems, warm, steps, -1, 0, steps_only=True).prices

    def _launch(self, problems, warm, steps, stop, max_augment, steps_only) -> Routed:
        kernels = _kernels()
        scores = problems.scores_GNE.contiguous()
        num_groups, num_tokens, num_experts = scores.shape
        k = problems.k
        tile = TILE if scores.device.type == "cuda" else INTERPRETER_TILE
        block_n, block_e = _blocks(num_tokens, num_experts, tile)
        dtype, compute = (torch.float64, "fp64") if scores.dtype == torch.float64 else (torch.float32, "fp32")
        new = functools.partial(torch.empty, device=scores.device)
        prices = new(num_groups, num_experts, dtype=torch.float64)  # a warm start kept exactly
        experts = new(num_groups, num_tokens, k, dtype=torch.int64)
        loads = new(num_groups, num_experts, dtype=torch.int64)
        stats = new(num_groups, 5, dtype=torch.float64)
        flags = new(num_groups, 5, dtype=torch.int32)
        theta = new(num_groups * num_tokens * block_e if steps else 1, dtype=dtype)  # the steps' scratch
        edges = new(num_groups, num_experts, num_experts, dtype=torch.float64)  # the repair's scratch
        edge_tokens = new(num_groups, num_experts, num_experts, dtype=torch.int32)
        valid, has_valid = _valid_arg(problems, flags)
        with _launch("route_kernel"):
            kernels.route_kernel[(num_groups,)](
                scores, valid, problems.capacity_G, problems.num_valid_G, warm, prices, experts, loads, stats,
                flags, theta, edges, edge_tokens, num_tokens, num_experts, steps if k < num_experts else 0,
                DAMPING, stop, max_augment, GAP_TOLERANCE,
                K=k, BLOCK_N=block_n, BLOCK_E=block_e, HAS_VALID=has_valid, MAX_BISECT=kernels.MAX_BISECT,
                COMPUTE=kernels.COMPUTE[compute], STEPS_ONLY=steps_only, num_warps=WARPS,
            )  # fmt: skip
        certificate = Certificate(loads, stats[:, 0], stats[:, 1], stats[:, 2] > 0)
        return Routed(experts, prices, certificate, flags, stats[:, 3:])


def on_host(problems: Problems) -> Problems:
    """The same problems with every tensor on the host (the compiled core's input)."""
    return dataclasses.replace(
        problems,
        scores_GNE=host_scores(problems.scores_GNE),
        capacity_G=problems.capacity_G.cpu(),
        valid_GN=None if problems.valid_GN is None else problems.valid_GN.cpu().contiguous(),
        num_valid_G=problems.num_valid_G.cpu(),
    )


def select_groups(problems: Problems, groups: torch.Tensor) -> Problems:
    """The problems of ``groups`` (an index on the scores' device)."""
    valid = None if problems.valid_GN is None else problems.valid_GN.index_select(0, groups)
    return Problems(
        problems.scores_GNE.index_select(0, groups),
        problems.k,
        problems.capacity_G.index_select(0, groups),
        valid,
        problems.num_valid_G.index_select(0, groups),
        problems.device,
    )


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _blocks(num_tokens: int, num_experts: int, tile: int = TILE) -> tuple[int, int]:
    """Tile sizes: all experts of a token in one row, about ``tile`` scores per tile."""
    block_e = _next_power_of_2(max(num_experts, 2))
    return max(16, min(_next_power_of_2(max(num_tokens, 1)), tile // block_e)), block_e


def _valid_arg(problems: Problems, placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The validity mask as bytes for a kernel, or a placeholder pointer it never reads."""
    valid = problems.valid_GN
    return (placeholder, False) if valid is None else (valid.view(torch.uint8), True)


def first_row(rows_GN: torch.Tensor) -> torch.Tensor:
    """int [G]: 1 + the first row of each group where ``rows_GN`` (bool [G, N]) holds, 0 for none."""
    return torch.where(rows_GN.any(1), rows_GN.int().argmax(1) + 1, 0)


def valid_mask(problems: Problems) -> torch.Tensor:
    """bool [G, N]: the valid tokens."""
    if problems.valid_GN is not None:
        return problems.valid_GN
    shape = (problems.num_groups, problems.num_tokens)
    return torch.ones(shape, dtype=torch.bool, device=problems.scores_GNE.device)
