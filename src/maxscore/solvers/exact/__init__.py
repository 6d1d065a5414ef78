"""The exact method: optimal capacity-constrained top-k routing (the min-cost max-flow of
PAPER.md §2), certified by its dual prices, with three engines.

Problem: maximize ``sum scores[t, e] * x[t, e]`` subject to ``sum_e x[t, e] = k`` for every
valid token, ``sum_t x[t, e] <= capacity`` and ``x in {0, 1}`` (``-inf`` forbids a pair).

=============  ==============================================================================
module         what it holds
=============  ==============================================================================
``prices``     the damped best-response price step (constants, a reference in plain torch)
               and the certificate: one definition for every engine
``host``       the host engine: the compiled core (``_core.c`` through ``_native``)
``device``     the device engine: one fused Triton kernel (``kernels``, with
               ``kernel_steps`` and ``kernel_repair``) that solves every group on the device,
               or the same steps in plain torch with the core's repair; one transfer of flags
``global_*``   the collective engine: one routing over the tokens of every rank
=============  ==============================================================================

``solve(..., engine=...)`` picks the engine with ``pick_engine``.
"""

from __future__ import annotations

import torch

from maxscore.solvers.exact.dense import KernelError, disable_kernels, kernels_available
from maxscore.solvers.exact.device import solve_exact_device
from maxscore.solvers.exact.global_routing import GlobalAssignment, solve_global
from maxscore.solvers.exact.host import solve_exact, solve_exact_groups

ENGINES = ("auto", "host", "device")


def pick_engine(engine: str, scores: torch.Tensor) -> str:
    """The engine that runs ``scores``: ``engine`` itself, or for ``"auto"`` the faster one.

    ``auto``: CPU scores take the host core.  CUDA scores take the device engine when its fused
    kernels can run (Triton); without them its plain torch steps cost more than the host core
    with its two transfers (measured on one H200: 12 ms against 2.9 ms at 64 x (512, 16, 2),
    ``benchmarks/results``), so they take the host core.  If a kernel fails to compile or
    launch on a device, ``auto`` warns once and takes the host core there from then on.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    on_cuda = isinstance(scores, torch.Tensor) and scores.device.type == "cuda"
    return "device" if on_cuda and kernels_available(scores.device) else "host"


__all__ = [
    "ENGINES",
    "GlobalAssignment",
    "KernelError",
    "disable_kernels",
    "pick_engine",
    "solve_exact",
    "solve_exact_device",
    "solve_exact_groups",
    "solve_global",
]
