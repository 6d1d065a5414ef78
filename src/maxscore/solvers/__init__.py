"""Capacity-constrained top-k assignment solvers: one entry point, one result type, a registry.

``solve(scores, k, ...)`` checks its input once, runs the method registered under ``method``
and returns an ``Assignment``.  Methods (one file each):

=============  ================================================================  ==========
method         what it computes                                                  drops
=============  ================================================================  ==========
``exact``      the optimal routing (min-cost max-flow), with prices and gap      never
``two_stage``  the paper's approximation: top-1 under capacity, then the rest    never
``sinkhorn``   top-1, Sinkhorn on the residual, feasible rounding                never
``iterative``  Switch-style rerouting of overflowing tokens                      never
``greedy``     GShard: rank by rank, token order, overflow dropped               yes
``topk``       plain top-k, capacity not enforced (dropless)                     never
``reference``  slow exact LP (scipy HiGHS), for tests and benchmarks             never
=============  ================================================================  ==========
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from maxscore.solvers._validate import (
    Problem,
    Problems,
    check_scores,
    check_valid,
    expert_capacity,
    group_capacity,
    make_problem,
    make_problems,
)
from maxscore.solvers.assignment import Assignment, single_assignment, stack_assignments
from maxscore.solvers.exact.dense import KernelError, disable_kernels
from maxscore.solvers.exact.device import VALIDATE, pick_engine, solve_exact_device
from maxscore.solvers.exact.global_routing import GlobalAssignment, solve_global
from maxscore.solvers.exact.host import solve_exact, solve_exact_groups
from maxscore.solvers.greedy import solve_greedy
from maxscore.solvers.iterative import solve_iterative
from maxscore.solvers.reference import solve_reference
from maxscore.solvers.sinkhorn import solve_sinkhorn
from maxscore.solvers.topk import solve_topk
from maxscore.solvers.two_stage import solve_two_stage

METHODS: dict[str, Callable[..., Assignment]] = {
    "exact": solve_exact,
    "two_stage": solve_two_stage,
    "sinkhorn": solve_sinkhorn,
    "iterative": solve_iterative,
    "greedy": solve_greedy,
    "topk": solve_topk,
    "reference": solve_reference,
}
# methods that may leave slots unassigned or ignore the capacity: any capacity is accepted
CAPACITY_OPTIONAL = frozenset({"greedy", "topk"})
# options the dispatcher itself reads: which engine runs the method
DISPATCH_OPTIONS = {"exact": ("engine", "validate")}


@functools.cache
def method_options(method: str) -> tuple[str, ...]:
    """Names of the keyword options a registered method accepts."""
    parameters = inspect.signature(METHODS[method]).parameters.values()
    names = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return names + DISPATCH_OPTIONS.get(method, ())


def solve(
    scores: torch.Tensor,
    k: int,
    *,
    capacity: int | torch.Tensor | None = None,
    capacity_factor: float = 1.0,
    method: str = "exact",
    valid: torch.Tensor | None = None,
    **options,
) -> Assignment:
    """Routes every valid token to k distinct experts, each expert holding at most ``capacity``.

    Args:
        scores: float [N, E], or [G, N, E] for G independent routing groups
            (float16/bfloat16/float32/float64, CPU or CUDA); higher is better, ``-inf`` forbids
            a token-expert pair.
        k: experts per token, 1 <= k <= E.
        capacity: tokens per expert: an int, or (for [G, N, E]) an int64 [G] tensor; default
            ``expert_capacity(valid tokens, E, k, capacity_factor)`` per group.
        capacity_factor: used when ``capacity`` is None.
        method: one of ``METHODS`` (default ``"exact"``).
        valid: bool [N] (or [G, N]); invalid (padding) tokens get no expert and use no capacity.
        **options: method options, see ``method_options(method)``; for ``exact``: ``prices=``
            (warm start, [E] or [G, E]) and ``engine="auto" | "host" | "device"`` (see
            ``maxscore.solvers.exact.device.pick_engine``: ``auto`` runs CUDA scores on the device
            engine's fused kernels where Triton is installed, everything else on the host core),
            and ``validate="eager" | "deferred"``: ``deferred`` makes the device engine's call
            wait for nothing on the host (bad input comes back in ``Assignment.issues``, see
            ``maxscore.solvers.exact.device``); the host core always raises at the call.

    Returns:
        An ``Assignment`` on the scores' device; ``experts`` is int64 [N, K] (or [G, N, K]) with -1
        for unassigned slots.  G groups are solved in one call (the host core spreads them over
        threads; the other methods loop), and equal G separate solves.

    Raises:
        ValueError: bad shapes or dtypes, NaN/+inf scores, k out of range, infeasible capacity or
            forbidden pairs (``greedy`` and ``topk`` accept any capacity), an unknown method or option.
    """
    return _dispatch(scores, k, capacity, capacity_factor, method, valid, False, options)


def solve_finite(
    scores_GNE: torch.Tensor,
    k: int,
    capacity_G: torch.Tensor,
    method: str,
    valid_GN: torch.Tensor | None,
    **options,
) -> Assignment:
    """``solve`` for callers that already checked their scores are finite (the routers: softmax
    or sigmoid of logits they checked): the same result without scanning the values again."""
    return _dispatch(scores_GNE, k, capacity_G, 1.0, method, valid_GN, True, options)


def _dispatch(scores, k, capacity, capacity_factor, method, valid, finite, options) -> Assignment:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = sorted(set(options) - set(method_options(method)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method={method!r}; it accepts {list(method_options(method))}"
        )
    require_feasible = method not in CAPACITY_OPTIONAL
    engine = options.pop("engine", "auto") if method == "exact" else "host"
    validate = options.pop("validate", "eager")
    if validate not in VALIDATE:
        raise ValueError(f"validate must be one of {VALIDATE}, got {validate!r}")
    if pick_engine(engine, scores) == "device":
        try:
            device_options = {**options, "validate": validate}
            return _solve_on_device(scores, k, capacity, capacity_factor, valid, device_options)
        except KernelError as error:
            if engine != "auto":
                raise
            disable_kernels(scores.device, error)  # warns once; the host engine from now on
    if isinstance(scores, torch.Tensor) and scores.dim() == 3:
        problems = make_problems(
            scores, k, capacity, capacity_factor, valid, require_feasible=require_feasible, finite=finite
        )
        if method == "exact":
            return solve_exact_groups(problems, **options)
        groups = [METHODS[method](problems.group(g), **options) for g in range(problems.num_groups)]
        return stack_assignments(groups, problems.capacity_G)
    if isinstance(capacity, torch.Tensor):
        raise ValueError(_INT_CAPACITY)
    problem = make_problem(scores, k, capacity, capacity_factor, valid, require_feasible=require_feasible)
    return METHODS[method](problem, **options)


_INT_CAPACITY = "capacity must be an int for [N, E] scores (an int64 [G] tensor is for [G, N, E])"


def _solve_on_device(scores, k, capacity, capacity_factor, valid, options) -> Assignment:
    """The device engine through the same problem builder; [N, E] scores as one group."""
    check_scores(scores)
    single = scores.dim() == 2
    if single:
        if isinstance(capacity, torch.Tensor):
            raise ValueError(_INT_CAPACITY)
        check_valid(valid, (scores.shape[0],))
        scores, valid = scores[None], None if valid is None else valid[None]
    problems = make_problems(scores, k, capacity, capacity_factor, valid, on_device=True)
    result = solve_exact_device(problems, **options)
    return single_assignment(result) if single else result


__all__ = [
    "METHODS",
    "Assignment",
    "GlobalAssignment",
    "Problem",
    "Problems",
    "expert_capacity",
    "group_capacity",
    "method_options",
    "solve",
    "solve_global",
]
