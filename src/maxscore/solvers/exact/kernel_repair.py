"""The device kernel's repair (Triton): successive shortest paths over one group's experts.

Problem: a routing where every valid token holds a top-k of ``s - p`` (so every move of a token
from an expert it holds to one it does not has a reduced cost ``v[t, x] - v[t, y] >= 0``, with
``v = s - p``), some experts over capacity.  ``augment`` moves one unit: a shortest path
(Dijkstra, lengths the reduced costs) from the overloaded experts to the nearest expert below
capacity, then every settled expert's price rises by ``D - d[x]`` (``D`` the path's length, so
every token still holds a top-k at the new prices: reduced-cost optimality is kept), and each
token on the path moves one expert along it.  Experts below capacity are never settled, so
their prices stay (at 0 when the capacity has slack: complementary slackness holds at the end).
Each augmentation lowers the excess by one; the routing is optimal when none is left
(Ahuja, Magnanti & Orlin, *Network Flows* (1993), ch. 9).

This is the compiled core's repair (``_core.c``: ``augment``) on a dense graph: the core
expands a settled expert's holders lazily from heaps; here the edges out of an expert (the
least score difference over its holders, to each other expert: independent of the prices) are
kept per expert and recomputed, in one pass over the group's tokens, only for the experts a
moved token held before or after its move.

Complexity: per augmentation one pass over the group's [N, E] scores per settled expert whose
edges changed (at most E; at first every expert's), O(E) per settled expert otherwise; an
[E, E] scratch per group.  Ties: the lowest expert index first, then the lowest token.  Reduced
costs below 0 (rounding) count as 0, as in the core.
"""

from __future__ import annotations

import triton
import triton.language as tl

from maxscore.solvers.exact.kernel_steps import score_tile


@triton.jit
def held_tile(experts_ptr, g, rows, N, cols, K: tl.constexpr):
    """The experts each token of ``rows`` holds (its K slots, -1 for none): bool [rows, BLOCK_E],
    and int32 [rows] the slots that hold one."""
    held = cols[None, :] < 0
    slots = tl.zeros(rows.shape, tl.int32)
    for j in tl.static_range(K):
        e = tl.load(experts_ptr + (g * N + rows) * K + j, mask=rows < N, other=-1)
        held = held | (e[:, None] == cols[None, :])
        slots += (e >= 0).to(tl.int32)
    return held, slots


# fmt: off
@triton.jit
def edge_row(
    s_ptr, valid_ptr, experts_ptr, g, x, N, E, K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr
):
# fmt: on
    """The edges out of expert x: per expert y, the least ``s[t, x] - s[t, y]`` over the tokens t
    that hold x and not y (y allowed), and that token; (inf, -1) where there is none.  The
    reduced length of the edge at prices p is this plus ``p[y] - p[x]``."""
    cols = tl.arange(0, BLOCK_E)
    rows0 = tl.arange(0, BLOCK_H)
    best = tl.full([BLOCK_E], float("inf"), tl.float64)
    arg = tl.full([BLOCK_E], -1, tl.int32)
    for start in range(0, N, BLOCK_H):
        s, row_ok, rows = score_tile(s_ptr, valid_ptr, g, start, N, E, rows0, cols, HAS_VALID, tl.float64)
        held, _ = held_tile(experts_ptr, g, rows, N, cols, K)
        holds_x = (tl.sum((held & (cols == x)[None, :]).to(tl.int32), axis=1) > 0) & row_ok
        sx = tl.sum(tl.where(cols[None, :] == x, s, 0.0), axis=1)
        ok = holds_x[:, None] & ~held & (s > -float("inf"))
        way = tl.where(ok, tl.where(holds_x, sx, 0.0)[:, None] - s, float("inf"))
        tile_best = tl.min(way, axis=0)
        tile_arg = tl.min(tl.where(way == tile_best[None, :], rows[:, None], 2147483647), axis=0)
        better = tile_best < best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    return best, arg


# fmt: off
@triton.jit
def augment(
    s_ptr, valid_ptr, experts_ptr, edges_ptr, edge_tokens_ptr, g, p, loads, stale, C, N, E,
    K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr
):
# fmt: on
    """One unit from the overloaded experts to the nearest one below capacity (see the module
    docstring): (prices, loads, stale, 1) with the routing in ``experts_ptr`` updated, or
    (p, loads, stale, 0) when no expert below capacity is reachable (the group is infeasible).

    The edges out of each expert (``edge_row``) are kept in ``edges_ptr``/``edge_tokens_ptr``
    ([G, E, E] scratch) and recomputed only for the ``stale`` experts: those a moved token held
    before or after its move."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    d = tl.where(col_ok & (loads > C), 0.0, float("inf")).to(tl.float64)
    settled = cols < 0
    pred_x = tl.full([BLOCK_E], -1, tl.int32)
    pred_t = tl.full([BLOCK_E], -1, tl.int32)
    target = tl.min(pred_x, axis=0)  # -1: none yet
    searching = 1
    while searching != 0:
        waiting = tl.where(settled | ~col_ok, float("inf"), d)
        dx = tl.min(waiting, axis=0)
        x = tl.min(tl.where(waiting == dx, cols, BLOCK_E), axis=0)
        room = tl.sum(tl.where(cols == x, C - loads, 0), axis=0) > 0
        if dx == float("inf"):
            searching = 0
        elif room:
            target = x
            searching = 0
        else:
            settled = settled | (cols == x)
            row = edges_ptr + (g * E + x) * E + cols
            token_row = edge_tokens_ptr + (g * E + x) * E + cols
            if tl.sum((stale & (cols == x)).to(tl.int32), axis=0) > 0:
                w, t = edge_row(s_ptr, valid_ptr, experts_ptr, g, x, N, E, K, BLOCK_H, BLOCK_E, HAS_VALID)
                tl.store(row, w, mask=col_ok)
                tl.store(token_row, t, mask=col_ok)
                stale = stale & (cols != x)
            else:
                w = tl.load(row, mask=col_ok, other=float("inf"))
                t = tl.load(token_row, mask=col_ok, other=-1)
            px = tl.sum(tl.where(cols == x, p, 0.0), axis=0)
            way = dx + tl.maximum(w - px + p, 0.0)
            better = (way < d) & ~settled & col_ok & (t >= 0)
            d = tl.where(better, way, d)
            pred_x = tl.where(better, x, pred_x)
            pred_t = tl.where(better, t, pred_t)
    found = (target >= 0).to(tl.int32)
    if target >= 0:
        length = tl.sum(tl.where(cols == target, d, 0.0), axis=0)
        p = tl.where(settled, p + (length - d), p)
        y = target
        x = tl.sum(tl.where(cols == y, pred_x, 0), axis=0)
        while x >= 0:  # back along the path: the token that reached y moves from x to y
            t = tl.sum(tl.where(cols == y, pred_t, 0), axis=0)
            stale = stale | (cols == y)
            for j in tl.static_range(K):
                slot = experts_ptr + (g * N + t) * K + j
                e = tl.load(slot)
                stale = stale | (cols == e)
                tl.store(slot, tl.where(e == x, y.to(tl.int64), e))
            loads = loads + (cols == y).to(loads.dtype) - (cols == x).to(loads.dtype)
            y = x
            x = tl.sum(tl.where(cols == y, pred_x, 0), axis=0)
    tl.debug_barrier()  # the moves and edges just stored are read by every thread from now on
    return p, loads, stale, found
