"""The device engine's fused kernel (Triton): one program per routing group, one launch per call.

``route_kernel`` solves a group exactly, on the device:

1. **Price steps** (``kernel_steps.py``): from the warm start shifted to minimum 0, damped
   best-response steps (``prices.py``) while the group's excess is above ``stop`` and falls
   (``stop`` < 0: every step), at most ``steps``; then the prices shifted to minimum 0 again
   (the compiled core's start).
2. **Routing**: every valid token takes its top-k of ``s - p`` (float64, ties to the lower
   index); the input flags (the first row with NaN/+inf and the first with fewer than k allowed
   experts, each + 1 or 0 for none; an infeasible capacity; non-finite warm prices).
3. **Repair** (``kernel_repair.py``): shortest augmenting paths, one unit each, until no expert
   is over capacity, at most ``max_augment`` in all.  Slack capacity (``C E > k x valid
   tokens``) is the compiled core's slack node Z: its units (the free slots) start at the
   experts below capacity at the least price and the rest are routed like excess, so every
   expert left below capacity ends at the least price, 0 after the shift (complementary
   slackness).  Lowering such experts to 0 and routing every token again instead, as before,
   undid the price steps and warm starts where E does not divide N k.
4. **Certificate**: loads, score, dual and gap in float64, and the feasibility checks of
   ``prices.certify``.

A group whose repair found no path or ran out of augmentations, or whose certificate failed,
is marked in its last flag; the engine solves it on the host (``Assignment.fallback``).  Steps 2
to 4 are the compiled core's path from given prices (``price_iterations=0, max_moves=0``), so
the result is the optimum the core finds.

Precision: the price steps in the scores' precision (float32 for 16-bit scores), the routing,
repair and certificate in float64.  ``STEPS_ONLY`` writes the prices after step 1 and stops
(the step's tests against ``prices.price_step``).  Under ``TRITON_INTERPRET=1`` the kernel runs
on CPU tensors (how it is tested without a GPU).

Complexity per group: (halvings + 1) passes over its [N, E] scores per price step, at most E
per augmentation, 2 for the routing and the certificate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from maxscore.solvers.exact.kernel_repair import augment, held_tile
from maxscore.solvers.exact.kernel_steps import MAX_BISECT, excess_of, price_steps, row_top, score_tile

COMPUTE = {"fp32": tl.float32, "fp64": tl.float64}  # the steps' precision, by the scores
__all__ = ["COMPUTE", "MAX_BISECT", "route_kernel"]


# fmt: off
@triton.jit
def _route(
    s_ptr, valid_ptr, experts_ptr, g, p, N, E, K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr
):
# fmt: on
    """Every valid token's top-k of s - p into ``experts_ptr`` (-1 for padding, and for the slots
    a row with NaN cannot order): (loads, the first valid row with NaN/+inf, the first with fewer
    than K allowed experts; N where there is none)."""
    cols = tl.arange(0, BLOCK_E)
    half = tl.arange(0, BLOCK_H)
    loads = tl.zeros([BLOCK_E], tl.int32)
    bad = tl.zeros([BLOCK_H], tl.int32) + N
    short = tl.zeros([BLOCK_H], tl.int32) + N
    for start in range(0, N, BLOCK_H):
        s, row_ok, rows = score_tile(s_ptr, valid_ptr, g, start, N, E, half, cols, HAS_VALID, tl.float64)
        real = row_ok[:, None] & (cols < E)[None, :]
        nonfinite = tl.sum((((s != s) | (s == float("inf"))) & real).to(tl.int32), axis=1)
        bad = tl.minimum(bad, tl.where(nonfinite > 0, rows, N))
        allowed = tl.sum(((s > -float("inf")) & real).to(tl.int32), axis=1)
        short = tl.minimum(short, tl.where(row_ok & (allowed < K), rows, N))
        v = s - p[None, :]
        for j in tl.static_range(K):
            kth = tl.max(v, axis=1)
            first = tl.min(tl.where(v == kth[:, None], cols[None, :], BLOCK_E), axis=1)
            pick = cols[None, :] == first[:, None]
            loads += tl.sum((pick & real).to(tl.int32), axis=0)
            v = tl.where(pick, -float("inf"), v)
            tl.store(
                experts_ptr + (g * N + rows) * K + j, tl.where(row_ok & (first < E), first, -1).to(tl.int64),
                mask=rows < N,
            )
    tl.debug_barrier()  # the routing just stored is read by every thread in the next pass
    return loads, tl.min(bad, axis=0), tl.min(short, axis=0)


# fmt: off
@triton.jit
def _certify(
    s_ptr, valid_ptr, experts_ptr, g, p, C, N, E, tolerance, K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr
):
# fmt: on
    """``prices.certify`` of the group's routing: (loads, score, gap, converged)."""
    cols = tl.arange(0, BLOCK_E)
    rows0 = tl.arange(0, BLOCK_H)
    col_ok = cols < E
    loads = tl.zeros([BLOCK_E], tl.int32)
    score = tl.zeros([BLOCK_H], tl.float64)
    dual = tl.zeros([BLOCK_H], tl.float64)
    wrong = tl.zeros([BLOCK_H], tl.int32)
    for start in range(0, N, BLOCK_H):
        s, row_ok, rows = score_tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID, tl.float64)
        held, slots = held_tile(experts_ptr, g, rows, N, cols, K)
        held = held & col_ok[None, :]
        count = tl.sum(held.to(tl.int32), axis=1)
        finite = tl.sum((held & (s == -float("inf"))).to(tl.int32), axis=1) == 0
        ok = tl.where(row_ok, (slots == K) & (count == K) & finite, slots == 0)
        wrong += (~ok & (rows < N)).to(tl.int32)
        score += tl.sum(tl.where(held & row_ok[:, None], s, 0.0), axis=1)
        loads += tl.sum((held & row_ok[:, None]).to(tl.int32), axis=0)
        v = s - p[None, :]
        best, _, _ = row_top(v, cols, K, False, BLOCK_E)
        dual += tl.where(row_ok, tl.sum(tl.where(best, v, 0.0), axis=1), 0.0)
    total = tl.sum(score, axis=0)
    gap = tl.sum(dual, axis=0) + tl.sum(tl.where(col_ok, C.to(tl.float64) * p, 0.0), axis=0) - total
    feasible = (tl.sum(wrong, axis=0) == 0) & (tl.sum(((loads > C) | (p < 0)).to(tl.int32), axis=0) == 0)
    converged = feasible & (tl.abs(gap) <= tolerance * tl.maximum(tl.abs(total), 1.0))
    return loads, total, gap, converged


@triton.jit
def _shift_to_zero(p, col_ok):
    """Prices less their minimum (a common shift changes no routing)."""
    return tl.where(col_ok, p - tl.min(tl.where(col_ok, p, float("inf")), axis=0), 0.0)


# fmt: off
@triton.jit
def route_kernel(
    s_ptr, valid_ptr, cap_ptr, num_valid_ptr, p_in_ptr, p_out_ptr, experts_ptr, loads_ptr, stats_ptr,
    flags_ptr, theta_ptr, edges_ptr, edge_tokens_ptr, N, E, steps, damping, stop, max_augment, tolerance,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr,
    MAX_BISECT: tl.constexpr, COMPUTE: tl.constexpr, STEPS_ONLY: tl.constexpr
):
# fmt: on
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    C = tl.load(cap_ptr + g).to(tl.int32)
    num_valid = tl.load(num_valid_ptr + g).to(tl.int32)
    units = K * num_valid
    slack = C * E > units
    # 1. price steps from the warm start as given (float64: kept exactly when no step moves it)
    p = tl.load(p_in_ptr + g * E + cols, mask=col_ok, other=0.0).to(tl.float64)
    bad_prices = tl.sum(((p != p) | (p == float("inf")) | (p == -float("inf"))).to(tl.int32), axis=0)
    p = _shift_to_zero(tl.where((p == p) & (p < float("inf")) & (p > -float("inf")), p, 0.0), col_ok)
    kept, taken = steps * 0, steps * 0
    if steps > 0:
        stepped, kept, taken = price_steps(
            s_ptr, valid_ptr, theta_ptr, g, p.to(COMPUTE), C, N, E, steps, damping, stop, slack, K, BLOCK_N,
            BLOCK_E, HAS_VALID, MAX_BISECT, COMPUTE,
        )
        if kept > 0:
            p = stepped.to(tl.float64)
    if STEPS_ONLY:
        tl.store(p_out_ptr + g * E + cols, p, mask=col_ok)
    else:
        # 2. the routing at the prices (shifted to minimum 0), and the input flags
        p = _shift_to_zero(p, col_ok)
        half: tl.constexpr = BLOCK_N // 2  # float64 tiles take twice the registers
        loads, bad, short = _route(s_ptr, valid_ptr, experts_ptr, g, p, N, E, K, half, BLOCK_E, HAS_VALID)
        infeasible = (C * E < units).to(tl.int32)
        solvable = (bad == N) & (short == N) & (infeasible == 0) & (bad_prices == 0)
        # 3. the repair: one unit per shortest path until no expert is over capacity and the
        # slack node Z has placed its units: at first those go to the experts below capacity at
        # the least price, the rest by paths
        pz = tl.min(tl.where(col_ok, p, float("inf")), axis=0)
        free = tl.where(col_ok & (p == pz) & (loads < C), C - loads, 0)
        before = tl.cumsum(free, axis=0) - free  # Z's units go to these experts in index order
        unplaced = tl.where(slack, C * E - units, 0)
        dummy = tl.minimum(free, tl.maximum(unplaced - before, 0))
        unplaced = unplaced - tl.sum(dummy, axis=0)
        excess = excess_of(loads + dummy, C) + unplaced
        found = solvable.to(tl.int32)
        augmentations = 0
        stale = col_ok  # every expert's edges to compute
        while (excess > 0) & (found != 0) & (augmentations < max_augment) & solvable:
            p, pz, loads, dummy, unplaced, stale, found = augment(
                s_ptr, valid_ptr, experts_ptr, edges_ptr, edge_tokens_ptr, g, p, pz, loads, dummy, unplaced,
                stale, C, N, E, K, half, BLOCK_E, HAS_VALID,
            )
            excess = excess_of(loads + dummy, C) + unplaced
            augmentations += 1
        if slack:  # prices relative to Z's: 0 where Z's units sit (every expert below capacity)
            p = tl.where(col_ok & (dummy == 0) & (p > pz), p - pz, 0.0)
        else:
            p = _shift_to_zero(p, col_ok)  # every expert full: the core's normal form
        # 4. the certificate
        loads, total, gap, converged = _certify(
            s_ptr, valid_ptr, experts_ptr, g, p, C, N, E, tolerance, K, half, BLOCK_E, HAS_VALID
        )
        tl.store(p_out_ptr + g * E + cols, p, mask=col_ok)
        tl.store(loads_ptr + g * E + cols, loads.to(tl.int64), mask=col_ok)
        tl.store(stats_ptr + g * 5 + 0, total)
        tl.store(stats_ptr + g * 5 + 1, gap)
        tl.store(stats_ptr + g * 5 + 2, converged.to(tl.float64))
        tl.store(stats_ptr + g * 5 + 3, taken.to(tl.float64))
        tl.store(stats_ptr + g * 5 + 4, augmentations.to(tl.float64))
        tl.store(flags_ptr + g * 5 + 0, tl.where(bad < N, bad + 1, 0))
        tl.store(flags_ptr + g * 5 + 1, tl.where(short < N, short + 1, 0))
        tl.store(flags_ptr + g * 5 + 2, infeasible)
        tl.store(flags_ptr + g * 5 + 3, bad_prices)
        tl.store(flags_ptr + g * 5 + 4, (solvable & ((excess > 0) | ~converged)).to(tl.int32))
