/*
 * Compiled core of the capacity-constrained top-k assignment solvers.
 *
 * Problem (PAPER.md §2): maximize sum s[t,e] x[t,e] subject to sum_e x[t,e] = k for every
 * valid token t, sum_t x[t,e] <= cap[e], x in {0,1}; s = -inf forbids a pair.
 * Its LP dual has one price p[e] >= 0 per expert; at optimal prices every token holds a
 * top-k of s[t,:] - p and only full experts have a positive price.
 *
 * mode 0 (exact), three phases:
 *   1. every valid token takes its top-k of s - p (p = warm-start prices, clamped so that
 *      non-full experts carry the minimum price);
 *   2. an ascending auction: an overloaded expert raises its price to the smallest value
 *      at which only cap[e] of its holders still want it; the evicted holders move to their
 *      best expert not held.  Every step keeps the top-k conditions, so the auction is exact
 *      when it ends; it runs under a budget of raises;
 *   3. successive shortest paths on the E-node expert graph (arc a->b: move one token that
 *      holds a and not b; reduced cost (s[t,a]-p[a]) - (s[t,b]-p[b]) >= 0), Dijkstra from
 *      all overloaded experts to the nearest non-full one, prices as potentials.
 *   The final prices certify optimality: gap = D(p) - score, computed from scratch.
 * mode 1 (feasible repair): the given assignment (slots may be -1) is made feasible by
 *   shortest paths on the clamped score losses, prices fixed at 0; no optimality claim.
 *
 * Tie-breaking: among equal values of s - p the lower expert index wins; among evictions
 * with equal thresholds the higher token index leaves first.
 * Complexity: phase 1 O(N E) (k small), each auction raise O(L log L + moves * E), each
 * augmentation O(E^2 + holders of the settled experts + expanded tokens * E).
 * Built as a plain CPython extension over the buffer protocol: no numpy or torch headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ST_OK 0
#define ST_TOO_FEW_ALLOWED 1
#define ST_INFEASIBLE 2
#define ST_NO_MEMORY 3

typedef struct {
    int64_t N, E, k;
    const float *s32;
    const double *s64;
    const uint8_t *valid;
    const int64_t *cap;
    double *p;
    int64_t *experts; /* [N,k], -1 = empty slot */
    int64_t *loads;   /* [E] */
    uint8_t *held;    /* [N,E] */
    int32_t *holders; /* [E,N]: tokens holding each expert, first loads[e] entries */
    int32_t *hpos;    /* [N,k]: position of the slot's token in its expert's holder list */
    double *best;     /* [N]: best value of s - p over allowed experts the token does not hold */
    int32_t *barg;    /* [N]: its expert, -1 if none */
} Ctx;

static inline double S(const Ctx *c, int64_t t, int64_t e) {
    return c->s32 ? (double)c->s32[t * c->E + e] : c->s64[t * c->E + e];
}

static inline int is_valid(const Ctx *c, int64_t t) { return c->valid == NULL || c->valid[t]; }

/* best allowed expert not held by t, by value s - p (lower index on ties) */
static void refresh_best(Ctx *c, int64_t t) {
    double bv = -INFINITY;
    int32_t ba = -1;
    const uint8_t *h = c->held + t * c->E;
    for (int64_t e = 0; e < c->E; e++) {
        double v = S(c, t, e);
        if (h[e] || v == -INFINITY) continue;
        v -= c->p[e];
        if (v > bv) {
            bv = v;
            ba = (int32_t)e;
        }
    }
    c->best[t] = bv;
    c->barg[t] = ba;
}

/* prices only rise after phase 1, so a cached best stays right while its expert's price does */
static inline void ensure_best(Ctx *c, int64_t t) {
    int32_t a = c->barg[t];
    if (a >= 0 && c->best[t] != S(c, t, a) - c->p[a]) refresh_best(c, t);
}

static void holder_add(Ctx *c, int64_t t, int64_t j, int64_t e) {
    int64_t L = c->loads[e];
    c->holders[e * c->N + L] = (int32_t)t;
    c->hpos[t * c->k + j] = (int32_t)L;
    c->loads[e] = L + 1;
    c->experts[t * c->k + j] = e;
    c->held[t * c->E + e] = 1;
}

static void holder_remove(Ctx *c, int64_t t, int64_t j) {
    int64_t e = c->experts[t * c->k + j];
    int64_t pos = c->hpos[t * c->k + j], last = c->loads[e] - 1;
    int32_t u = c->holders[e * c->N + last];
    c->holders[e * c->N + pos] = u;
    if (u != t) {
        for (int64_t i = 0; i < c->k; i++)
            if (c->experts[u * c->k + i] == e) {
                c->hpos[u * c->k + i] = (int32_t)pos;
                break;
            }
    }
    c->loads[e] = last;
    c->held[t * c->E + e] = 0;
    c->experts[t * c->k + j] = -1;
}

static int64_t slot_of(const Ctx *c, int64_t t, int64_t e) {
    for (int64_t j = 0; j < c->k; j++)
        if (c->experts[t * c->k + j] == e) return j;
    return -1;
}

static void move_token(Ctx *c, int64_t t, int64_t from, int64_t to) {
    int64_t j = slot_of(c, t, from);
    holder_remove(c, t, j);
    holder_add(c, t, j, to);
}

/*
 * Top-k of s[t,:] - p for one token, sorted by value (lower index first on ties).
 * Writes k+1 candidates (the (k+1)-th is the best expert left out) and returns the number
 * of allowed experts found (capped at k+1).
 */
static int64_t row_topk(const Ctx *c, int64_t t, int64_t *idx, double *val) {
    int64_t m = 0, kk = c->k + 1;
    for (int64_t e = 0; e < c->E; e++) {
        double v = S(c, t, e);
        if (v == -INFINITY) continue;
        v -= c->p[e];
        if (m == kk && !(v > val[m - 1])) continue;
        int64_t i = (m < kk) ? m++ : m - 1;
        while (i > 0 && v > val[i - 1]) {
            val[i] = val[i - 1];
            idx[i] = idx[i - 1];
            i--;
        }
        val[i] = v;
        idx[i] = e;
    }
    return m;
}

/* phase 1: every valid token takes its top-k of s - p; returns the first bad token or -1 */
static int64_t assign_topk(Ctx *c, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int64_t *idx = malloc(sizeof(int64_t) * (c->k + 1));
    double *val = malloc(sizeof(double) * (c->k + 1));
    int64_t first_bad = -1;
    *nbad = 0;
    memset(c->loads, 0, sizeof(int64_t) * c->E);
    memset(c->held, 0, (size_t)(c->N * c->E));
    for (int64_t t = 0; t < c->N; t++) {
        for (int64_t j = 0; j < c->k; j++) c->experts[t * c->k + j] = -1;
        c->best[t] = -INFINITY;
        c->barg[t] = -1;
        if (!is_valid(c, t)) continue;
        int64_t m = row_topk(c, t, idx, val);
        if (m < c->k) {
            if (first_bad < 0) first_bad = t;
            if (*nbad < nbad_max) bad[*nbad] = t;
            (*nbad)++;
            continue;
        }
        for (int64_t j = 0; j < c->k; j++) holder_add(c, t, j, idx[j]);
        if (m > c->k) {
            c->best[t] = val[c->k];
            c->barg[t] = (int32_t)idx[c->k];
        }
    }
    free(idx);
    free(val);
    return first_bad;
}

/* sum over valid tokens of the top-k of s - p: the token part of the dual objective */
static double dual_token_part(const Ctx *c) {
    int64_t *idx = malloc(sizeof(int64_t) * (c->k + 1));
    double *val = malloc(sizeof(double) * (c->k + 1));
    double total = 0.0;
    for (int64_t t = 0; t < c->N; t++) {
        if (!is_valid(c, t)) continue;
        row_topk(c, t, idx, val);
        for (int64_t j = 0; j < c->k; j++) total += val[j];
    }
    free(idx);
    free(val);
    return total;
}

typedef struct {
    double key;
    int32_t tok;
} KeyTok;

/* descending key, then ascending token: a total order, so the result is deterministic */
static int cmp_keytok(const void *a, const void *b) {
    const KeyTok *x = a, *y = b;
    if (x->key > y->key) return -1;
    if (x->key < y->key) return 1;
    return (x->tok > y->tok) - (x->tok < y->tok);
}

/* phase 2 step: raise the price of overloaded expert e until only cap[e] holders want it */
static int raise_price(Ctx *c, int64_t e, KeyTok *buf) {
    int64_t L = c->loads[e], C = c->cap[e];
    for (int64_t i = 0; i < L; i++) {
        int32_t t = c->holders[e * c->N + i];
        ensure_best(c, t);
        buf[i].key = S(c, t, e) - c->best[t]; /* the price at which t would leave e */
        buf[i].tok = t;
    }
    qsort(buf, (size_t)L, sizeof(KeyTok), cmp_keytok);
    double q = buf[C].key;
    if (q == INFINITY) return 0; /* more than cap[e] holders cannot go anywhere else */
    if (q > c->p[e]) c->p[e] = q;
    for (int64_t i = C; i < L; i++) {
        int32_t t = buf[i].tok;
        int64_t to = c->barg[t];
        move_token(c, t, e, to);
        refresh_best(c, t);
    }
    return 1;
}

static int64_t run_auction(Ctx *c, int64_t max_raises) {
    int64_t raises = 0, maxload = 0;
    for (int64_t e = 0; e < c->E; e++)
        if (c->loads[e] > maxload) maxload = c->loads[e];
    KeyTok *buf = malloc(sizeof(KeyTok) * (size_t)(c->N + 1));
    int progress = 1;
    while (progress && raises < max_raises) {
        progress = 0;
        for (int64_t e = 0; e < c->E && raises < max_raises; e++) {
            if (c->loads[e] <= c->cap[e]) continue;
            if (raise_price(c, e, buf)) {
                raises++;
                progress = 1;
            }
        }
    }
    free(buf);
    return raises;
}

typedef struct {
    double *d;
    int32_t *predx, *predt, *order;
    uint8_t *settled;
} Dijk;

/*
 * One augmentation: shortest path from the overloaded experts to the nearest non-full one.
 * Returns 1 on success, 0 if no non-full expert is reachable (infeasible).
 * use_prices = 0: prices stay fixed (feasible-repair mode), reduced costs clamped at 0.
 */
static int augment(Ctx *c, Dijk *w, int use_prices, int64_t *nsettled) {
    const int64_t E = c->E;
    double U = INFINITY;
    int64_t target = -1, ns = 0;
    for (int64_t e = 0; e < E; e++) {
        w->d[e] = (c->loads[e] > c->cap[e]) ? 0.0 : INFINITY;
        w->predx[e] = -1;
        w->settled[e] = 0;
    }
    for (;;) {
        int64_t x = -1;
        double dx = INFINITY;
        for (int64_t e = 0; e < E; e++)
            if (!w->settled[e] && w->d[e] < dx) {
                dx = w->d[e];
                x = e;
            }
        if (x < 0) break;
        if (c->loads[x] < c->cap[x]) {
            target = x;
            break;
        }
        w->settled[x] = 1;
        w->order[ns++] = (int32_t)x;
        const int32_t *hx = c->holders + x * c->N;
        for (int64_t i = 0; i < c->loads[x]; i++) {
            int32_t t = hx[i];
            ensure_best(c, t);
            double vx = S(c, t, x) - c->p[x];
            double slack = vx - c->best[t];
            if (!(slack > 0)) slack = 0;
            if (c->barg[t] < 0 || dx + slack >= U) continue;
            const uint8_t *h = c->held + (int64_t)t * E;
            for (int64_t y = 0; y < E; y++) {
                if (h[y] || w->settled[y]) continue;
                double sy = S(c, t, y);
                if (sy == -INFINITY) continue;
                double rc = vx - (sy - c->p[y]);
                double cand = dx + (rc > 0 ? rc : 0);
                if (cand < w->d[y]) {
                    w->d[y] = cand;
                    w->predx[y] = (int32_t)x;
                    w->predt[y] = t;
                    if (c->loads[y] < c->cap[y] && cand < U) U = cand;
                }
            }
        }
    }
    *nsettled = ns;
    if (target < 0) return 0;
    double Dstar = w->d[target];
    if (use_prices)
        for (int64_t i = 0; i < ns; i++) {
            int32_t x = w->order[i];
            c->p[x] += Dstar - w->d[x];
        }
    for (int64_t y = target; w->predx[y] >= 0;) {
        int64_t x = w->predx[y];
        int32_t t = w->predt[y];
        move_token(c, t, x, y);
        refresh_best(c, t);
        y = x;
    }
    return 1;
}

/* lower the prices of non-full experts to the minimum price, re-assigning until stable */
static int64_t clamp_warm_prices(Ctx *c, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    double pmin = INFINITY;
    for (int64_t e = 0; e < c->E; e++) pmin = fmin(pmin, c->p[e]);
    for (int64_t e = 0; e < c->E; e++) c->p[e] -= pmin;
    for (int64_t round = 0; round <= c->E; round++) {
        int64_t fb = assign_topk(c, bad, nbad_max, nbad);
        if (fb >= 0) return fb;
        int changed = 0;
        for (int64_t e = 0; e < c->E; e++)
            if (c->loads[e] < c->cap[e] && c->p[e] > 0) {
                c->p[e] = 0;
                changed = 1;
            }
        if (!changed) break;
    }
    return -1;
}

/* tokens that hold an expert of the unreachable-closed set found by the last search */
static int64_t report_stuck(const Ctx *c, const Dijk *w, int64_t ns, int64_t *bad, int64_t nbad_max) {
    int64_t nb = 0;
    for (int64_t t = 0; t < c->N; t++) {
        if (!is_valid(c, t)) continue;
        for (int64_t j = 0; j < c->k; j++) {
            int64_t e = c->experts[t * c->k + j];
            if (e >= 0 && w->settled[e]) {
                if (nb < nbad_max) bad[nb] = t;
                nb++;
                break;
            }
        }
    }
    (void)ns;
    return nb;
}

/* place empty slots (-1) of a given assignment on the token's best allowed expert not held */
static int64_t load_assignment(Ctx *c, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int64_t first_bad = -1;
    *nbad = 0;
    memset(c->loads, 0, sizeof(int64_t) * c->E);
    memset(c->held, 0, (size_t)(c->N * c->E));
    for (int64_t t = 0; t < c->N; t++) {
        c->best[t] = -INFINITY;
        c->barg[t] = -1;
        if (!is_valid(c, t)) {
            for (int64_t j = 0; j < c->k; j++) c->experts[t * c->k + j] = -1;
            continue;
        }
        for (int64_t j = 0; j < c->k; j++) {
            int64_t e = c->experts[t * c->k + j];
            if (e >= 0) holder_add(c, t, j, e);
        }
        for (int64_t j = 0; j < c->k; j++) {
            if (c->experts[t * c->k + j] >= 0) continue;
            refresh_best(c, t);
            if (c->barg[t] < 0) {
                if (first_bad < 0) first_bad = t;
                if (*nbad < nbad_max) bad[*nbad] = t;
                (*nbad)++;
                break;
            }
            holder_add(c, t, j, c->barg[t]);
        }
        refresh_best(c, t);
    }
    return first_bad;
}

static int solve(Ctx *c, int mode, int64_t max_raises, int64_t *bad, int64_t nbad_max, int64_t *nbad,
                 double *stats) {
    const int64_t N = c->N, E = c->E, k = c->k;
    int status = ST_OK;
    c->held = calloc((size_t)(N * E) + 1, 1);
    c->holders = malloc(sizeof(int32_t) * (size_t)(N * E + 1));
    c->hpos = malloc(sizeof(int32_t) * (size_t)(N * k + 1));
    c->best = malloc(sizeof(double) * (size_t)(N + 1));
    c->barg = malloc(sizeof(int32_t) * (size_t)(N + 1));
    Dijk w;
    w.d = malloc(sizeof(double) * (size_t)E);
    w.predx = malloc(sizeof(int32_t) * (size_t)E);
    w.predt = malloc(sizeof(int32_t) * (size_t)E);
    w.order = malloc(sizeof(int32_t) * (size_t)E);
    w.settled = malloc((size_t)E);
    int64_t raises = 0, augs = 0, ns = 0;
    if (!c->held || !c->holders || !c->hpos || !c->best || !c->barg || !w.d || !w.predx || !w.predt ||
        !w.order || !w.settled) {
        status = ST_NO_MEMORY;
        goto done;
    }
    int64_t fb = (mode == 0) ? clamp_warm_prices(c, bad, nbad_max, nbad) : load_assignment(c, bad, nbad_max, nbad);
    if (fb >= 0) {
        status = ST_TOO_FEW_ALLOWED;
        goto done;
    }
    if (mode == 0) raises = run_auction(c, max_raises);
    for (;;) {
        int over = 0;
        for (int64_t e = 0; e < E; e++) over |= c->loads[e] > c->cap[e];
        if (!over) break;
        if (!augment(c, &w, mode == 0, &ns)) {
            *nbad = report_stuck(c, &w, ns, bad, nbad_max);
            for (int64_t e = 0; e < E; e++) bad[nbad_max + e] = w.settled[e];
            status = ST_INFEASIBLE;
            goto done;
        }
        augs++;
    }
    double score = 0.0;
    for (int64_t t = 0; t < N; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t e = c->experts[t * k + j];
            if (e >= 0) score += S(c, t, e);
        }
    stats[0] = score;
    stats[1] = NAN;
    if (mode == 0) {
        double pmin = INFINITY;
        for (int64_t e = 0; e < E; e++) pmin = fmin(pmin, c->p[e]);
        int any_free = 0;
        for (int64_t e = 0; e < E; e++) any_free |= c->loads[e] < c->cap[e];
        if (!any_free && pmin > 0)
            for (int64_t e = 0; e < E; e++) c->p[e] -= pmin;
        double dual = dual_token_part(c);
        for (int64_t e = 0; e < E; e++) dual += (double)c->cap[e] * c->p[e];
        stats[1] = dual - score;
    }
done:
    stats[2] = (double)raises;
    stats[3] = (double)augs;
    free(c->held);
    free(c->holders);
    free(c->hpos);
    free(c->best);
    free(c->barg);
    free(w.d);
    free(w.predx);
    free(w.predt);
    free(w.order);
    free(w.settled);
    return status;
}

static int get_buf(PyObject *o, Py_buffer *b, int writable, Py_ssize_t min_bytes, const char *name) {
    if (PyObject_GetBuffer(o, b, writable ? (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (b->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "_core: buffer %s has %zd bytes, needs %zd", name, b->len, min_bytes);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/*
 * solve(scores, is_double, N, E, k, valid|None, cap, prices, experts, loads, bad, mode, max_raises)
 *   -> (status, nbad, score, gap, raises, augmentations)
 * bad: int64 buffer of length >= nbad_max + E; nbad_max = len(bad) - E.
 */
static PyObject *py_solve(PyObject *self, PyObject *args) {
    PyObject *o_s, *o_valid, *o_cap, *o_p, *o_x, *o_l, *o_bad;
    int is_double, mode;
    long long N, E, k, max_raises;
    if (!PyArg_ParseTuple(args, "OpLLLOOOOOOiL", &o_s, &is_double, &N, &E, &k, &o_valid, &o_cap, &o_p, &o_x, &o_l,
                          &o_bad, &mode, &max_raises))
        return NULL;
    if (N < 0 || E < 1 || k < 1 || k > E) {
        PyErr_SetString(PyExc_ValueError, "_core: bad sizes");
        return NULL;
    }
    Py_buffer bs, bv, bc, bp, bx, bl, bb;
    int have_valid = o_valid != Py_None;
    if (get_buf(o_s, &bs, 0, (Py_ssize_t)(N * E * (is_double ? 8 : 4)), "scores") < 0) return NULL;
    if (have_valid && get_buf(o_valid, &bv, 0, (Py_ssize_t)N, "valid") < 0) goto fail_s;
    if (get_buf(o_cap, &bc, 0, (Py_ssize_t)(E * 8), "cap") < 0) goto fail_v;
    if (get_buf(o_p, &bp, 1, (Py_ssize_t)(E * 8), "prices") < 0) goto fail_c;
    if (get_buf(o_x, &bx, 1, (Py_ssize_t)(N * k * 8), "experts") < 0) goto fail_p;
    if (get_buf(o_l, &bl, 1, (Py_ssize_t)(E * 8), "loads") < 0) goto fail_x;
    if (get_buf(o_bad, &bb, 1, (Py_ssize_t)((E + 1) * 8), "bad") < 0) goto fail_l;
    Ctx c;
    memset(&c, 0, sizeof c);
    c.N = N;
    c.E = E;
    c.k = k;
    if (is_double)
        c.s64 = bs.buf;
    else
        c.s32 = bs.buf;
    c.valid = have_valid ? bv.buf : NULL;
    c.cap = bc.buf;
    c.p = bp.buf;
    c.experts = bx.buf;
    c.loads = bl.buf;
    int64_t nbad_max = (int64_t)(bb.len / 8) - E, nbad = 0;
    double stats[4] = {0, 0, 0, 0};
    int status;
    Py_BEGIN_ALLOW_THREADS status = solve(&c, mode, max_raises, bb.buf, nbad_max, &nbad, stats);
    Py_END_ALLOW_THREADS PyBuffer_Release(&bb);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bp);
    PyBuffer_Release(&bc);
    if (have_valid) PyBuffer_Release(&bv);
    PyBuffer_Release(&bs);
    if (status == ST_NO_MEMORY) return PyErr_NoMemory();
    return Py_BuildValue("iLddLL", status, (long long)nbad, stats[0], stats[1], (long long)stats[2],
                         (long long)stats[3]);
fail_l:
    PyBuffer_Release(&bl);
fail_x:
    PyBuffer_Release(&bx);
fail_p:
    PyBuffer_Release(&bp);
fail_c:
    PyBuffer_Release(&bc);
fail_v:
    if (have_valid) PyBuffer_Release(&bv);
fail_s:
    PyBuffer_Release(&bs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"solve", py_solve, METH_VARARGS, "Capacity-constrained top-k assignment (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_core", "Compiled assignment core.", -1, methods};

PyMODINIT_FUNC PyInit__core(void) { return PyModule_Create(&module); }
