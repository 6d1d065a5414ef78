"""The device engine's fused kernels (Triton): one program per routing group, three launches.

1. ``dense``: from the warm start, damped best-response price steps (``prices.py``) while the
   group's excess is above about 1/4096 of its units (at most ``steps``), then every valid
   token's top-k of ``s - p``, its margin ``v_k - v_(k+1)``, the loads and the input flags
   (NaN/+inf, tokens with fewer than k allowed experts, non-finite warm prices).  Each step
   writes the group's thresholds ``theta`` once (a scratch the size of the scores) and finds
   each expert's C-th/(C+1)-th largest threshold by bisection over the values (a selection,
   no sort): a value with exactly C thresholds above it gives the exact midpoint of the two
   in one more pass; at a tie the tied value itself; after ``MAX_BISECT`` halvings, the best
   estimate (the repair and the certificate make the routing exact whatever the prices).
2. ``pack``: the candidates' scores and validity, the capacities the fixed tokens leave, the
   prices, the smallest fixed margin and the flags, in one row per group: one transfer.
3. ``certify``: loads, score, dual and gap in float64, and the feasibility checks of
   ``prices.certify``.

Arithmetic in the scores' precision (float32 for 16-bit scores) in the price steps; float64 in
the final routing of ``dense`` (its margins: ``s - p`` is exact for float32 values, so a margin
is certified down to its own rounding, not the scores') and in the certificate.  A warm start
that takes no step keeps its float64 prices exactly.
Ties: lower expert index first.  Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors (how they are tested without a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BISECT = 40  # halvings of a quantile's bracket per step (float32 resolution, with margin)
COMPUTE = {"fp32": tl.float32, "fp64": tl.float64}  # the arithmetic's precision, by the scores


@triton.jit
def _row_top(v, cols, K: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each row's top-K of v (ties to the lower column): held mask, K-th and (K+1)-th values."""
    held = cols[None, :] < 0
    kth = tl.max(v, axis=1)
    for _ in tl.static_range(K):
        kth = tl.max(v, axis=1)
        first = tl.min(tl.where(v == kth[:, None], cols[None, :], BLOCK_E), axis=1)
        pick = cols[None, :] == first[:, None]
        held = held | pick
        v = tl.where(pick, -float("inf"), v)
    if HAS_NEXT:
        nxt = tl.max(v, axis=1)
    else:
        nxt = tl.full(kth.shape, -float("inf"), kth.dtype)
    return held, kth, nxt


@triton.jit
def _tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr):
    """A tile of a group's scores (-inf outside the group, padding rows included) and its rows' validity."""
    rows = start + rows0
    inside = (rows < N)[:, None] & (cols < E)[None, :]
    s = tl.load(s_ptr + (g * N + rows)[:, None] * E + cols[None, :], mask=inside, other=-float("inf"))
    s = s.to(COMPUTE)
    row_ok = rows < N
    if HAS_VALID:
        row_ok = row_ok & (tl.load(valid_ptr + g * N + rows, mask=rows < N, other=0) != 0)
    return tl.where(row_ok[:, None], s, -float("inf")), row_ok, rows


# fmt: off
@triton.jit
def _thresholds(
    s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr
):
# fmt: on
    """Writes theta of every token at prices p; returns loads, the finite range and counts."""
    cols = tl.arange(0, BLOCK_E)
    rows0 = tl.arange(0, BLOCK_N)
    loads = tl.zeros([BLOCK_E], tl.int32)
    low = tl.full([BLOCK_E], float("inf"), COMPUTE)
    high = tl.full([BLOCK_E], -float("inf"), COMPUTE)
    above = tl.zeros([BLOCK_E], tl.int32)  # thresholds > -inf
    infinite = tl.zeros([BLOCK_E], tl.int32)  # thresholds = +inf (holders with no alternative)
    for start in range(0, N, BLOCK_N):
        s, row_ok, rows = _tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID, COMPUTE)
        held, kth, nxt = _row_top(s - p[None, :], cols, K, True, BLOCK_E)
        held = held & row_ok[:, None] & (cols < E)[None, :]
        theta = s - tl.where(held, nxt[:, None], kth[:, None])
        theta = tl.where(row_ok[:, None] & (cols < E)[None, :], theta, -float("inf"))
        tl.store(
            theta_ptr + (g * N + rows)[:, None] * BLOCK_E + cols[None, :], theta, mask=(rows < N)[:, None]
        )
        loads += tl.sum(held.to(tl.int32), axis=0)
        finite = (theta > -float("inf")) & (theta < float("inf"))
        low = tl.minimum(low, tl.min(tl.where(finite, theta, float("inf")), axis=0))
        high = tl.maximum(high, tl.max(tl.where(finite, theta, -float("inf")), axis=0))
        above += tl.sum((theta > -float("inf")).to(tl.int32), axis=0)
        infinite += tl.sum((theta == float("inf")).to(tl.int32), axis=0)
    tl.debug_barrier()
    excess = tl.sum(tl.maximum(loads - C, 0), axis=0)
    return loads, low, high, above, infinite, excess


@triton.jit
def _theta_tile(theta_ptr, g, start, N, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """A tile of the thresholds ``_thresholds`` wrote (-inf past the group's tokens)."""
    rows = start + tl.arange(0, BLOCK_N)
    offsets = (g * N + rows)[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    return tl.load(theta_ptr + offsets, mask=(rows < N)[:, None], other=-float("inf"))


@triton.jit
def _count_above(theta_ptr, g, x, N, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    count = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, N, BLOCK_N):
        theta = _theta_tile(theta_ptr, g, start, N, BLOCK_N, BLOCK_E)
        count += tl.sum((theta > x[None, :]).to(tl.int32), axis=0)
    return count


@triton.jit
def _bracket(theta_ptr, g, x, N, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per expert: the largest threshold <= x and the smallest > x."""
    below = tl.full([BLOCK_E], -float("inf"), x.dtype)
    over = tl.full([BLOCK_E], float("inf"), x.dtype)
    for start in range(0, N, BLOCK_N):
        theta = _theta_tile(theta_ptr, g, start, N, BLOCK_N, BLOCK_E)
        below = tl.maximum(below, tl.max(tl.where(theta <= x[None, :], theta, -float("inf")), axis=0))
        over = tl.minimum(over, tl.min(tl.where(theta > x[None, :], theta, float("inf")), axis=0))
    return below, over


# fmt: off
@triton.jit
def _best_response(
    theta_ptr, g, p, C, slack, loads, low, high, above, infinite, N, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, MAX_BISECT: tl.constexpr
):
# fmt: on
    """Each expert's target price from the thresholds (prices.best_response, by bisection)."""
    few = C >= above  # fewer than C + 1 thresholds: the smallest finite one
    active = (loads != C) & (C > 0) & (above > 0) & ~few & (infinite <= C)
    a = low - 1.0  # more than C thresholds above a
    b = high  # at most C above b (the +inf ones)
    x = b
    found = active & (active == 0)
    it = 0
    while (it < MAX_BISECT) & (tl.sum((active & ~found).to(tl.int32), axis=0) > 0):
        m = 0.5 * (a + b)
        count = _count_above(theta_ptr, g, m, N, BLOCK_N, BLOCK_E)
        hit = active & ~found & (count == C)
        x = tl.where(hit, m, x)
        found = found | hit
        a = tl.where(count > C, m, a)
        b = tl.where(count < C, m, b)
        it += 1
    x = tl.where(found, x, b)
    lo, hi = _bracket(theta_ptr, g, x, N, BLOCK_N, BLOCK_E)
    hi = tl.where(found, hi, lo)  # no value with exactly C above: a tie, both at the tied value
    lo = tl.where(few, -float("inf"), lo)
    hi = tl.where(few, low, hi)
    lo_finite = (lo > -float("inf")) & (lo < float("inf"))
    hi_finite = (hi > -float("inf")) & (hi < float("inf"))
    target = tl.where(lo_finite & hi_finite, 0.5 * (lo + hi), tl.where(hi_finite, hi, lo))
    target = tl.where(slack, tl.maximum(target, 0.0), target)
    usable = (active | (few & (loads != C) & (C > 0) & (above > 0))) & (target > -float("inf"))
    usable = usable & (target < float("inf"))
    return tl.where(usable, target, p)


# fmt: off
@triton.jit
def dense_kernel(
    s_ptr, valid_ptr, cap_ptr, num_valid_ptr, p_in_ptr, p_out_ptr, experts_ptr, margin_ptr, loads_ptr,
    flags_ptr, theta_ptr, N, E, steps, damping, early_stop, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr, MAX_BISECT: tl.constexpr, COMPUTE: tl.constexpr
):
# fmt: on
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    C = tl.load(cap_ptr + g).to(tl.int32)
    num_valid = tl.load(num_valid_ptr + g).to(tl.int32)
    slack = C * E > K * num_valid
    # the warm start as given (float64): kept exactly when no step moves it
    p64 = tl.load(p_in_ptr + g * E + cols, mask=col_ok, other=0.0).to(tl.float64)
    bad_prices = tl.sum(((p64 != p64) | (p64 == float("inf")) | (p64 == -float("inf"))).to(tl.int32), axis=0)
    p64 = tl.where((p64 == p64) & (p64 < float("inf")) & (p64 > -float("inf")), p64, 0.0)
    p64 = tl.where(col_ok, p64 - tl.min(tl.where(col_ok, p64, float("inf")), axis=0), 0.0)
    p = p64.to(COMPUTE)
    stop = tl.where(early_stop != 0, (K * num_valid) // 4096 + 1, -1)  # the repair takes this excess
    if steps > 0:
        loads, low, high, above, infinite, excess = _thresholds(
            s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, K, BLOCK_N, BLOCK_E, HAS_VALID, COMPUTE
        )
        it = 0
        while (it < steps) & (excess > stop):
            target = _best_response(
                theta_ptr, g, p, C, slack, loads, low, high, above, infinite, N, BLOCK_N, BLOCK_E, MAX_BISECT
            )
            p = tl.where(col_ok, p + damping * (target - p), 0.0)
            loads, low, high, above, infinite, excess = _thresholds(
                s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, K, BLOCK_N, BLOCK_E, HAS_VALID, COMPUTE
            )
            it += 1
        if it > 0:
            p64 = p.to(tl.float64)
    tl.store(p_out_ptr + g * E + cols, p64, mask=col_ok)
    # the routing at p: experts, margins, loads, input flags, in float64 (the certificate's
    # margins: s - p is exact for float32 s and p, so a tie is a tie and a margin is its value),
    # on half tiles (float64 takes twice the registers)
    half = tl.arange(0, BLOCK_N // 2)
    loads = tl.zeros([BLOCK_E], tl.int32)
    bad = tl.zeros([BLOCK_N // 2], tl.int32)
    short = tl.zeros([BLOCK_N // 2], tl.int32)
    for start in range(0, N, BLOCK_N // 2):
        s, row_ok, rows = _tile(s_ptr, valid_ptr, g, start, N, E, half, cols, HAS_VALID, tl.float64)
        real = row_ok[:, None] & col_ok[None, :]
        nonfinite = tl.sum((((s != s) | (s == float("inf"))) & real).to(tl.int32), axis=1)
        bad += (nonfinite > 0).to(tl.int32)
        allowed = tl.sum(((s > -float("inf")) & real).to(tl.int32), axis=1)
        short += (row_ok & (allowed < K)).to(tl.int32)
        # the top-k of s - p, best first (ties to the lower index), -1 for padding
        v = s - p64[None, :]
        kth = tl.max(v, axis=1)
        for j in tl.static_range(K):
            kth = tl.max(v, axis=1)
            first = tl.min(tl.where(v == kth[:, None], cols[None, :], BLOCK_E), axis=1)
            pick = cols[None, :] == first[:, None]
            loads += tl.sum((pick & real).to(tl.int32), axis=0)
            v = tl.where(pick, -float("inf"), v)
            tl.store(
                experts_ptr + (g * N + rows) * K + j, tl.where(row_ok, first, -1).to(tl.int64), mask=rows < N
            )
        if K < BLOCK_E:
            nxt = tl.max(v, axis=1)
        else:
            nxt = tl.full(kth.shape, -float("inf"), kth.dtype)
        margin = tl.where(row_ok, kth - nxt, float("inf")).to(margin_ptr.dtype.element_ty)
        tl.store(margin_ptr + g * N + rows, margin, mask=rows < N)
    tl.store(loads_ptr + g * E + cols, loads.to(tl.int64), mask=col_ok)
    tl.store(flags_ptr + g * 4 + 0, tl.sum(bad, axis=0))
    tl.store(flags_ptr + g * 4 + 1, tl.sum(short, axis=0))
    tl.store(flags_ptr + g * 4 + 2, (C * E < K * num_valid).to(tl.int32))
    tl.store(flags_ptr + g * 4 + 3, bad_prices)


# fmt: off
@triton.jit
def pack_kernel(
    s_ptr, valid_ptr, order_ptr, smallest_ptr, experts_ptr, loads_ptr, cap_ptr, num_valid_ptr, p_ptr,
    flags_ptr, out_ptr, N, E, M, M1, W, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_VALID: tl.constexpr
):
# fmt: on
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    out = out_ptr + g * W
    taken = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, M, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        m_ok = m < M
        t = tl.load(order_ptr + g * M1 + m, mask=m_ok, other=0)
        box = m_ok[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + (g * N + t)[:, None] * E + cols[None, :], mask=box, other=0.0)
        tl.store(out + m[:, None] * E + cols[None, :], s.to(out_ptr.dtype.element_ty), mask=box)
        ok = m_ok
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + g * N + t, mask=m_ok, other=0) != 0)
            tl.store(out + M * E + m, ok.to(out_ptr.dtype.element_ty), mask=m_ok)
        else:
            tl.store(out + M * E + m, tl.full([BLOCK_M], 1.0, out_ptr.dtype.element_ty), mask=m_ok)
        for j in tl.static_range(K):
            e = tl.load(experts_ptr + (g * N + t) * K + j, mask=m_ok, other=-1)
            taken += tl.sum(((e[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32), axis=0)
    base = M * E + M
    C = tl.load(cap_ptr + g)
    loads = tl.load(loads_ptr + g * E + cols, mask=col_ok, other=0)
    tl.store(out + base + cols, (C - loads + taken).to(out_ptr.dtype.element_ty), mask=col_ok)
    p = tl.load(p_ptr + g * E + cols, mask=col_ok, other=0.0)
    tl.store(out + base + E + cols, p.to(out_ptr.dtype.element_ty), mask=col_ok)
    tl.store(out + base + 2 * E + cols, loads.to(out_ptr.dtype.element_ty), mask=col_ok)
    base += 3 * E
    # the smallest margin of the fixed tokens: the (M+1)-th smallest (none when all are candidates)
    fixed = tl.load(smallest_ptr + g * M1 + M, mask=M1 > M, other=float("inf"))
    tl.store(out + base, fixed.to(out_ptr.dtype.element_ty))
    tl.store(out + base + 1, C.to(out_ptr.dtype.element_ty))
    tl.store(out + base + 2, tl.load(num_valid_ptr + g).to(out_ptr.dtype.element_ty))
    four = tl.arange(0, 4)
    flags = tl.load(flags_ptr + g * 4 + four)
    tl.store(out + base + 3 + four, flags.to(out_ptr.dtype.element_ty))


# fmt: off
@triton.jit
def certify_kernel(
    s_ptr, valid_ptr, experts_ptr, back_ptr, order_ptr, p_ptr, fallback_ptr, cap_ptr, loads_ptr,
    stats_ptr, N, E, M, M1, tolerance, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_VALID: tl.constexpr
):
# fmt: on
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    rows0 = tl.arange(0, BLOCK_N)
    col_ok = cols < E
    C = tl.load(cap_ptr + g)
    # the host's answer (a row of [prices E, candidates' experts M x K, state]): prices out, and
    # the candidates' experts into place when the group was repaired (state 0); a group that fell
    # back (1) or needed no repair (2) has its experts in place already
    back = back_ptr + g * (E + M * K + 1)
    p = tl.load(back + cols, mask=col_ok, other=0.0).to(tl.float64)
    tl.store(p_ptr + g * E + cols, p, mask=col_ok)
    state = tl.load(back + E + M * K)
    tl.store(fallback_ptr + g, (state == 1).to(tl.int8))
    if state == 0:
        for start in range(0, M, BLOCK_N):
            m = start + rows0
            t = tl.load(order_ptr + g * M1 + m, mask=m < M, other=0)
            for j in tl.static_range(K):
                e = tl.load(back + E + m * K + j, mask=m < M, other=-1.0).to(tl.int64)
                tl.store(experts_ptr + (g * N + t) * K + j, e, mask=m < M)
    tl.debug_barrier()  # the experts just written are read below by other threads
    loads = tl.zeros([BLOCK_E], tl.int32)
    score = tl.zeros([BLOCK_N], tl.float64)
    dual = tl.zeros([BLOCK_N], tl.float64)
    wrong = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, N, BLOCK_N):
        s, row_ok, rows = _tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID, tl.float64)
        held = cols[None, :] < 0
        slots = tl.zeros([BLOCK_N], tl.int32)
        for j in tl.static_range(K):
            e = tl.load(experts_ptr + (g * N + rows) * K + j, mask=rows < N, other=-1)
            held = held | ((e[:, None] == cols[None, :]) & col_ok[None, :])
            slots += (e >= 0).to(tl.int32)
        count = tl.sum(held.to(tl.int32), axis=1)
        finite = tl.sum((held & (s == -float("inf"))).to(tl.int32), axis=1) == 0
        ok = tl.where(row_ok, (slots == K) & (count == K) & finite, slots == 0)
        wrong += (~ok & (rows < N)).to(tl.int32)
        score += tl.sum(tl.where(held & row_ok[:, None], s, 0.0), axis=1)
        loads += tl.sum((held & row_ok[:, None]).to(tl.int32), axis=0)
        v = s - p[None, :]
        best, _, _ = _row_top(v, cols, K, False, BLOCK_E)
        dual += tl.where(row_ok, tl.sum(tl.where(best, v, 0.0), axis=1), 0.0)
    total = tl.sum(score, axis=0)
    gap = tl.sum(dual, axis=0) + tl.sum(tl.where(col_ok, C.to(tl.float64) * p, 0.0), axis=0) - total
    feasible = (tl.sum(wrong, axis=0) == 0) & (tl.sum(((loads > C) | (p < 0)).to(tl.int32), axis=0) == 0)
    bound = tolerance * tl.maximum(tl.abs(total), 1.0)
    converged = feasible & (tl.abs(gap) <= bound)
    tl.store(loads_ptr + g * E + cols, loads.to(tl.int64), mask=col_ok)
    tl.store(stats_ptr + g * 3 + 0, total)
    tl.store(stats_ptr + g * 3 + 1, gap)
    tl.store(stats_ptr + g * 3 + 2, converged.to(tl.float64))
