"""The device kernel's repair (Triton): successive shortest paths over one group's experts.

Problem: a routing where every valid token holds a top-k of ``s - p`` (so every move of a token
from an expert it holds to one it does not has a reduced cost ``v[t, x] - v[t, y] >= 0``, with
``v = s - p``), some experts over capacity.  ``augment`` moves one unit: a shortest path
(Dijkstra, lengths the reduced costs) from the overloaded experts to the nearest expert below
capacity, then every settled expert's price rises by ``D - d[x]`` (``D`` the path's length, so
every token still holds a top-k at the new prices: reduced-cost optimality is kept), and each
token on the path moves one expert along it.  Slack capacity (``C E > k x valid tokens``) is
the compiled core's slack node Z: units of score 0 that may sit only at the experts of the
least price, so every expert left below capacity ends at that price, 0 after the shift.
Each augmentation lowers the excess (Z's unplaced units included) by one; the routing is optimal
when none is left
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
    s_ptr, valid_ptr, experts_ptr, edges_ptr, edge_tokens_ptr, g, p, pz, loads, dummy, unplaced, stale, C,
    N, E, K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr
):
# fmt: on
    """One unit from the sources (overloaded experts, and the slack node Z while it has
    ``unplaced`` units) to the nearest expert below capacity (see the module docstring):
    (p, pz, loads, dummy, unplaced, stale, 1) with the routing in ``experts_ptr`` updated, or
    the same with 0 when no expert below capacity is reachable (the group is infeasible).

    Z (the compiled core's slack node) holds the free slots of slack capacity as units of score
    0: ``dummy`` [E] of them placed at each expert, ``pz`` its price.  An arc Z -> y places a unit
    at y (reduced length ``p[y] - pz``), an arc x -> Z takes one back from an expert holding
    some (``pz - p[x]``).  The edges out of each expert (``edge_row``) are kept in
    ``edges_ptr``/``edge_tokens_ptr`` ([G, E, E] scratch) and recomputed only for the ``stale``
    experts: those a moved token held before or after its move."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    held = loads + dummy
    d = tl.where(col_ok & (held > C), 0.0, float("inf")).to(tl.float64)
    settled = cols < 0
    pred_x = tl.full([BLOCK_E], -1, tl.int32)  # E: reached from Z
    pred_t = tl.full([BLOCK_E], -1, tl.int32)
    target = tl.min(pred_x, axis=0)  # -1: none yet
    dz = tl.where(unplaced > 0, 0.0, float("inf")).to(tl.float64)
    z_settled = (unplaced < 0).to(tl.int32)
    z_pred = target  # the expert Z was reached from, -1: Z is the source
    searching = 1
    while searching != 0:
        waiting = tl.where(settled | ~col_ok, float("inf"), d)
        dx = tl.min(waiting, axis=0)
        x = tl.min(tl.where(waiting == dx, cols, BLOCK_E), axis=0)
        room = tl.sum(tl.where(cols == x, C - held, 0), axis=0) > 0
        if (z_settled == 0) & (dz < float("inf")) & (dz <= dx):  # Z next: it can place a unit anywhere
            z_settled = z_settled * 0 + 1
            way = dz + tl.maximum(p - pz, 0.0)
            better = (way < d) & ~settled & col_ok
            d = tl.where(better, way, d)
            pred_x = tl.where(better, E, pred_x)
        elif dx == float("inf"):
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
            to_z = dx + tl.maximum(pz - px, 0.0)
            if (z_settled == 0) & (tl.sum(tl.where(cols == x, dummy, 0), axis=0) > 0) & (to_z < dz):
                dz = to_z
                z_pred = x
    found = (target >= 0).to(tl.int32)
    if target >= 0:
        length = tl.sum(tl.where(cols == target, d, 0.0), axis=0)
        p = tl.where(settled, p + (length - d), p)
        if z_settled != 0:
            pz = pz + (length - dz)
        y = target
        x = tl.sum(tl.where(cols == y, pred_x, 0), axis=0)
        while x >= 0:  # back along the path: the token (or Z's unit) that reached y moves from x
            if x == E:  # Z placed a unit at y; Z took it from z_pred, or it was one of Z's own
                dummy = dummy + (cols == y).to(dummy.dtype)
                if z_pred < 0:
                    unplaced = unplaced - 1
                else:
                    dummy = dummy - (cols == z_pred).to(dummy.dtype)
                y = z_pred
            else:
                t = tl.sum(tl.where(cols == y, pred_t, 0), axis=0)
                stale = stale | (cols == y)
                for j in tl.static_range(K):
                    slot = experts_ptr + (g * N + t) * K + j
                    e = tl.load(slot)
                    stale = stale | (cols == e)
                    tl.store(slot, tl.where(e == x, y.to(tl.int64), e))
                loads = loads + (cols == y).to(loads.dtype) - (cols == x).to(loads.dtype)
                y = x
            x = tl.where(y >= 0, tl.sum(tl.where(cols == y, pred_x, 0), axis=0), -1)
    tl.debug_barrier()  # the moves and edges just stored are read by every thread from now on
    return p, pz, loads, dummy, unplaced, stale, found
