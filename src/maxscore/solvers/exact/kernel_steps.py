"""The device kernel's price steps (Triton): damped best-response steps of one group, in place.

From the prices ``p`` (float, the scores' precision), each step writes the group's thresholds
``theta`` once (a scratch the size of the scores; ``prices.py`` defines them) and finds each
expert's C-th/(C+1)-th largest threshold by bisection over the values (a selection, no sort): a
value with exactly C thresholds above it gives the exact midpoint of the two in one more pass;
at a tie the tied value itself; after ``MAX_BISECT`` halvings, the best estimate (the repair and
the certificate make the routing exact whatever the prices).  Steps run while the group's
excess is above ``stop`` and one of the last two steps lowered it below the lowest so far (the
damped steps can overshoot, and at exact prices ties leave an excess no step removes), at most
``steps``; the prices of the lowest excess are kept.

Complexity per step: one pass over the group's scores for the thresholds and one per halving
over them.  Ties: lower expert index first.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BISECT = 40  # halvings of a quantile's bracket per step (float32 resolution, with margin)


@triton.jit
def row_top(v, cols, K: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_E: tl.constexpr):
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
def excess_of(loads, C):
    """The units over capacity C in all (loads of columns past E are 0)."""
    return tl.sum(tl.maximum(loads - C, 0), axis=0)


@triton.jit
def score_tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID: tl.constexpr, COMPUTE: tl.constexpr):
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
        s, row_ok, rows = score_tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID, COMPUTE)
        held, kth, nxt = row_top(s - p[None, :], cols, K, True, BLOCK_E)
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
    return loads, low, high, above, infinite, excess_of(loads, C)


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
def price_steps(
    s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, steps, damping, stop, slack, K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr, MAX_BISECT: tl.constexpr,
    COMPUTE: tl.constexpr
):
# fmt: on
    """At most ``steps`` damped steps from p while the excess is above ``stop`` and one of the
    last two steps lowered it below the lowest so far (``stop`` < 0: every step); returns the
    prices of the lowest excess, their step (0: the prices as given) and the steps run."""
    col_ok = tl.arange(0, BLOCK_E) < E
    loads, low, high, above, infinite, excess = _thresholds(
        s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, K, BLOCK_N, BLOCK_E, HAS_VALID, COMPUTE
    )
    it = 0
    best, best_p, best_it = excess, p, 0  # the lowest excess so far, its prices and step
    while (it < steps) & (excess > stop) & ((it - best_it < 2) | (stop < 0)):
        target = _best_response(
            theta_ptr, g, p, C, slack, loads, low, high, above, infinite, N, BLOCK_N, BLOCK_E, MAX_BISECT
        )
        # a price whose target is the floor 0 goes there at once (prices.price_step)
        p = tl.where(col_ok & ((slack == 0) | (target > 0)), p + damping * (target - p), 0.0)
        loads, low, high, above, infinite, excess = _thresholds(
            s_ptr, valid_ptr, theta_ptr, g, p, C, N, E, K, BLOCK_N, BLOCK_E, HAS_VALID, COMPUTE
        )
        it += 1
        if (excess < best) | (stop < 0):
            best, best_p, best_it = excess, p, it
    return best_p, best_it, it
