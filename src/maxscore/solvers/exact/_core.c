/*
 * Compiled core of the capacity-constrained top-k assignment solvers.
 *
 * Problem (PAPER.md §2): maximize sum s[t,e] x[t,e] subject to sum_e x[t,e] = k for every
 * valid token t, sum_t x[t,e] <= cap[e], x in {0,1}; s = -inf forbids a pair.
 * Its LP dual has one price p[e] >= 0 per expert; at optimal prices every token holds a
 * top-k of s[t,:] - p and only full experts have a positive price.
 *
 * mode 0 (exact), four phases:
 *   1. prices: warm-start prices shifted to minimum 0, or without a warm start the quantile
 *      start (quantile_start: each expert's cap-th score less a common threshold; back to
 *      prices 0 where that would leave the repair many free slots at priced experts); while
 *      the excess is large (above 1/64 of the units; 1/4 on small problems started from
 *      prices 0), a few damped best-response
 *      (Jacobi) steps move every price toward the value that would give its expert exactly
 *      cap[e] tokens; then every valid token takes its top-k of s - p.  On large problems the
 *      first steps see only every 4th token (assigned alone, loads scaled) while the
 *      estimated excess is far above the sample's own noise; the other tokens are assigned
 *      once, before the first step over all tokens or at the end.
 *      With slack capacity they also run while many free slots sit at experts priced above
 *      0 (each left costs the repair a shortest path); a price whose target is the floor 0
 *      goes there at once (damped, it would only near 0 and leave its slots to the repair).
 *      The steps stop once one saves the auction and the repair less work than it costs;
 *   2. an ascending auction: an overloaded expert raises its price to the lowest leaving
 *      price (s[t,e] - best alternative of t) among the cap[e] holders it keeps and evicts
 *      the others to their best expert not held.  Every step keeps every token on a top-k
 *      of s - p, so the auction is exact when it ends; it runs under a budget of moves and
 *      stops when a round raises no price (only tied tokens left to shuffle).  On problems of
 *      at least 2^15 scores an auction that proves slow early (see run_auction) hands back
 *      once to the price steps of phase 1, from its own prices, down to 1/64 of the units, and
 *      then goes on.  A price war (the excess falling by less than a unit per WAR_MOVES moves,
 *      or too slowly for what is left) switches to eps-scaling (scaled_auction) unless few
 *      units are left (those go to the repair): auctions that raise prices eps past the kept
 *      holders' least, every token back on its exact top-k, then the exact auction again,
 *      which hands what is left to the repair if it wars again;
 *   3. successive shortest paths on the E-node expert graph (arc a->b: move one token that
 *      holds a and not b; reduced cost (s[t,a]-p[a]) - (s[t,b]-p[b]) >= 0), Dijkstra from
 *      all overloaded experts to the nearest non-full one, prices as potentials.  Holders
 *      live in per-expert lazy heaps keyed by leaving price (lower bounds that only grow),
 *      so a search expands only tokens whose slack could still beat the best path.  Slack
 *      capacity (sum cap > k x valid tokens) is a node Z with that many units of score 0
 *      (an uncapacitated dummy token): its units sit only at experts of its own price, the
 *      least, so every expert left below capacity ends at the least price, and prices
 *      relative to Z's are the optimal duals (p >= 0, p = 0 where not full).  Z's units start
 *      at the experts below capacity at the least price; the rest are routed like excess,
 *      a path of Z's arcs alone (no token moves) carrying as many units as its ends allow.
 *      (Before Z, non-full experts were lowered to price 0 and every token re-assigned, up
 *      to E rounds: at counts E that do not divide N k, such as 48, 96, 160 and 384, that
 *      undid the price steps and warm starts and left thousands of units to this phase);
 *   4. the certificate gap = D(p) - score, D computed from scratch.
 * Batches (solve_batch) with one warm start shared by every group: the first LEAD_GROUPS
 *   groups are solved first, and the others start from their mean optimal prices when those
 *   fit the leads better than the shared start (lead_start).
 * mode 1 (feasible repair): the given assignment (slots may be -1) is made feasible by
 *   shortest paths on the clamped score losses, prices fixed at 0; no optimality claim.
 *
 * Tie-breaking: among equal values of s - p the lower expert index wins; among evictions
 * with equal leaving prices the higher token index leaves first.
 * Complexity: phases 1 and 4 O(N E) per pass (row passes split over threads), each auction
 * move O(E + log L), each augmentation O(E^2 + expanded tokens x E).
 * Built as a plain CPython extension over the buffer protocol: no numpy or torch headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifndef _WIN32
#include <pthread.h>
#define HAVE_THREADS 1
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

#define ST_OK 0
#define ST_TOO_FEW_ALLOWED 1
#define ST_INFEASIBLE 2
#define ST_NO_MEMORY 3

typedef struct {
    double key; /* the price of the expert at which the token would leave it: s[t,x] - best[t] */
    int32_t tok;
    int32_t slot;
    int32_t ver; /* the slot's move count when pushed; older entries are dead */
} Entry;

typedef struct {
    Entry *a;
    int64_t n, cap;
} Heap;

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
    double *best;     /* [N]: best value of s - p over allowed experts the token does not hold */
    int32_t *barg;    /* [N]: its expert, -1 if none */
    int32_t *ver;     /* [N,k]: move count of each slot */
    double *kth;      /* [N]: k-th best value of s - p (price phase only), or NULL */
    Heap *heaps;      /* [E]: holders of each expert by leaving price, lazily updated */
    int oom;
    int repair_mode;  /* moves may raise a token's best alternative: refresh all its entries */
    int threads;      /* for the row passes */
    int64_t moves;
    int64_t scale;    /* price phase: loads count every scale-th token only (a sample), 1 = all */
    /* the slack node Z (repair, exact mode): sum cap - k x valid tokens dummy units of score 0
     * that fill the capacity no token takes; a unit may sit only at an expert of the least
     * price, so at the end every expert below capacity has that price (complementary slackness) */
    int64_t *dummy;   /* [E]: Z's units placed at each expert */
    int64_t unplaced; /* Z's units not placed yet (Z's excess) */
    double pz;        /* Z's price: at most every expert's, equal to those holding its units */
    double eps;       /* auction: raise prices this much past the kept holders' least (0: exact) */
    int start_only;       /* phase 1 stops at the starting assignment (see solve_batch's leads) */
    int64_t start_misfit; /* the starting assignment's units over capacity plus its free slots at
                           * experts priced above 0 (what the auction and repair must fix; the
                           * excess estimated on a sample, the slots then not counted) */
} Ctx;

/* an expert's load with Z's units */
static inline int64_t held_units(const Ctx *c, int64_t e) { return c->loads[e] + (c->dummy ? c->dummy[e] : 0); }

static inline double S(const Ctx *c, int64_t t, int64_t e) {
    return c->s32 ? (double)c->s32[t * c->E + e] : c->s64[t * c->E + e];
}

static inline int is_valid(const Ctx *c, int64_t t) { return c->valid == NULL || c->valid[t]; }

/* heap order: lower leaving price first; on ties the higher token index leaves first */
static inline int entry_less(const Entry *x, const Entry *y) {
    if (x->key != y->key) return x->key < y->key;
    return x->tok > y->tok;
}

static void sift_down(Heap *h, int64_t i) {
    Entry v = h->a[i];
    for (;;) {
        int64_t l = 2 * i + 1, m;
        if (l >= h->n) break;
        m = (l + 1 < h->n && entry_less(&h->a[l + 1], &h->a[l])) ? l + 1 : l;
        if (!entry_less(&h->a[m], &v)) break;
        h->a[i] = h->a[m];
        i = m;
    }
    h->a[i] = v;
}

/* makes room for `need` entries (growing to need + need/4 + 16); 0 and c->oom set on failure */
static int heap_reserve(Ctx *c, Heap *h, int64_t need) {
    if (h->cap >= need) return 1;
    int64_t nc = need + need / 4 + 16;
    Entry *na = realloc(h->a, sizeof(Entry) * (size_t)nc);
    if (!na) return c->oom = 1, 0;
    h->a = na;
    h->cap = nc;
    return 1;
}

static void heap_push(Ctx *c, Heap *h, Entry v) {
    if (!heap_reserve(c, h, h->n + 1)) return;
    int64_t i = h->n++;
    while (i > 0) {
        int64_t up = (i - 1) / 2;
        if (!entry_less(&v, &h->a[up])) break;
        h->a[i] = h->a[up];
        i = up;
    }
    h->a[i] = v;
}

static void heap_pop(Heap *h) {
    h->a[0] = h->a[--h->n];
    if (h->n > 0) sift_down(h, 0);
}

/*
 * Row kernels, one per score dtype (the dtype test stays out of the inner loops).
 * row_topk: top-k of row - p sorted by value (lower index first on ties), plus the best
 * expert left out: writes up to kk = k+1 candidates, returns how many allowed ones it found.
 * Only values > thr are considered: thr = -inf, or just below a proven lower bound on the
 * row's kk-th value; without one, the least maximum of kk disjoint blocks is such a bound.
 * Each tile of the row is first filtered branch-free, so only the few values above the bound
 * pay for a sorted insertion; -inf entries never enter.
 * row_best: the best allowed expert not held.
 */
#define ROW_TILE 64

/* inserts (e, v) into the sorted top list idx/val of *m <= kk entries; *thr: its least once full */
static void row_insert(int64_t e, double v, int64_t kk, int64_t *m, double *thr, int64_t *idx, double *val) {
    int64_t i = (*m < kk) ? (*m)++ : *m - 1;
    while (i > 0 && v > val[i - 1]) {
        val[i] = val[i - 1];
        idx[i] = idx[i - 1];
        i--;
    }
    val[i] = v;
    idx[i] = e;
    if (*m == kk) *thr = val[kk - 1];
}

#define ROW_KERNELS(T)                                                                               \
    static int64_t row_topk_##T(const T *row, const double *p, int64_t E, int64_t kk, double thr,     \
                                int64_t *idx, double *val) {                                         \
        int64_t m = 0;                                                                               \
        if (thr == -INFINITY && E >= 4 * kk) { /* kk disjoint blocks: the least block maximum */     \
            double low = INFINITY;                                                                   \
            for (int64_t b = 0; b < kk; b++) {                                                       \
                double mx = -INFINITY;                                                               \
                for (int64_t e = E * b / kk; e < E * (b + 1) / kk; e++) {                            \
                    double v = (double)row[e] - p[e];                                                \
                    mx = v > mx ? v : mx;                                                            \
                }                                                                                    \
                low = mx < low ? mx : low;                                                           \
            }                                                                                        \
            if (low != -INFINITY) thr = nextafter(low, -INFINITY); /* kk values are >= low */        \
        }                                                                                            \
        int32_t ce[ROW_TILE];                                                                        \
        double cv[ROW_TILE];                                                                         \
        for (int64_t e0 = 0; e0 < E; e0 += ROW_TILE) { /* branch-free filter, then insert */         \
            int64_t e1 = e0 + ROW_TILE < E ? e0 + ROW_TILE : E, n = 0;                               \
            for (int64_t e = e0; e < e1; e++) {                                                      \
                double v = (double)row[e] - p[e];                                                    \
                ce[n] = (int32_t)e;                                                                  \
                cv[n] = v;                                                                           \
                n += v > thr;                                                                        \
            }                                                                                        \
            for (int64_t i = 0; i < n; i++)                                                          \
                if (cv[i] > thr) row_insert(ce[i], cv[i], kk, &m, &thr, idx, val);                  \
        }                                                                                            \
        return m;                                                                                    \
    }                                                                                                \
    static int32_t row_best_##T(const T *row, const double *p, const uint8_t *held, int64_t E,        \
                                double *best) {                                                      \
        double bv = -INFINITY;                                                                       \
        int32_t ba = -1;                                                                             \
        for (int64_t e = 0; e < E; e++) {                                                            \
            double v = held[e] ? -INFINITY : (double)row[e] - p[e];                                  \
            if (v > bv) {                                                                            \
                bv = v;                                                                              \
                ba = (int32_t)e;                                                                     \
            }                                                                                        \
        }                                                                                            \
        *best = bv;                                                                                  \
        return ba;                                                                                   \
    }

ROW_KERNELS(float)
ROW_KERNELS(double)

/* the largest s - p over the allowed experts a token does not hold (-inf if none): a branch-free
 * reduction the compiler vectorizes, for the certificate */
#define ROW_OTHER_MAX(T)                                                                             \
    static double row_other_max_##T(const T *row, const double *p, const uint8_t *held, int64_t E) {  \
        double m = -INFINITY;                                                                        \
        for (int64_t e = 0; e < E; e++) {                                                            \
            double v = held[e] ? -INFINITY : (double)row[e] - p[e];                                  \
            m = v > m ? v : m;                                                                       \
        }                                                                                            \
        return m;                                                                                    \
    }
ROW_OTHER_MAX(float)
ROW_OTHER_MAX(double)

/* lower_bound: a value known to be <= the row's (k+1)-th value (-inf if unknown) */
static int64_t row_topk(const Ctx *c, int64_t t, double lower_bound, int64_t *idx, double *val) {
    const int64_t kk = c->k + 1;
    double thr = lower_bound == -INFINITY ? -INFINITY : nextafter(lower_bound, -INFINITY);
    int64_t m = c->s32 ? row_topk_float(c->s32 + t * c->E, c->p, c->E, kk, thr, idx, val)
                       : row_topk_double(c->s64 + t * c->E, c->p, c->E, kk, thr, idx, val);
    if (m < kk && thr != -INFINITY) /* fewer than kk allowed experts: the bound was not attained */
        m = c->s32 ? row_topk_float(c->s32 + t * c->E, c->p, c->E, kk, -INFINITY, idx, val)
                   : row_topk_double(c->s64 + t * c->E, c->p, c->E, kk, -INFINITY, idx, val);
    return m;
}

/* best allowed expert not held by t, by value s - p (lower index on ties) */
static void refresh_best(Ctx *c, int64_t t) {
    const uint8_t *h = c->held + t * c->E;
    c->barg[t] = c->s32 ? row_best_float(c->s32 + t * c->E, c->p, h, c->E, &c->best[t])
                        : row_best_double(c->s64 + t * c->E, c->p, h, c->E, &c->best[t]);
}

/* prices only rise after phase 1, so a cached best stays right while its expert's price does */
static inline void ensure_best(Ctx *c, int64_t t) {
    int32_t a = c->barg[t];
    if (a >= 0 && c->best[t] != S(c, t, a) - c->p[a]) refresh_best(c, t);
}

static inline double leave_key(Ctx *c, int64_t t, int64_t x) { return S(c, t, x) - c->best[t]; }

/* the holder of x with the lowest leaving price (dead and stale entries fixed on the way) */
static Entry *heap_top(Ctx *c, int64_t x) {
    Heap *h = &c->heaps[x];
    while (h->n > 0) {
        Entry *e = &h->a[0];
        if (e->ver != c->ver[(int64_t)e->tok * c->k + e->slot]) {
            heap_pop(h);
            continue;
        }
        ensure_best(c, e->tok);
        double key = leave_key(c, e->tok, x);
        if (key != e->key) { /* keys only grow: re-sort the entry */
            e->key = key;
            sift_down(h, 0);
            continue;
        }
        return e;
    }
    return NULL;
}

static void push_slot(Ctx *c, int64_t t, int64_t j) {
    int64_t x = c->experts[t * c->k + j];
    Entry v = {leave_key(c, t, x), (int32_t)t, (int32_t)j, c->ver[t * c->k + j]};
    heap_push(c, &c->heaps[x], v);
}

/*
 * Moves token t from expert a to expert b (t holds a, not b).  In exact mode every move
 * (an eviction at a leaving price <= p[a], or a zero-reduced-cost arc of a shortest path)
 * leaves the token's best alternative no higher, so the entries of its other slots stay
 * lower bounds and only the moved slot needs a new entry.
 */
static void move_token(Ctx *c, int64_t t, int64_t a, int64_t b) {
    int64_t j = 0;
    while (c->experts[t * c->k + j] != a) j++;
    c->experts[t * c->k + j] = b;
    c->held[t * c->E + a] = 0;
    c->held[t * c->E + b] = 1;
    c->loads[a]--;
    c->loads[b]++;
    c->moves++;
    refresh_best(c, t);
    for (int64_t i = 0; i < c->k; i++) {
        if (i != j && !c->repair_mode) continue;
        c->ver[t * c->k + i]++;
        push_slot(c, t, i);
    }
}

/* builds the holder heaps from scratch (O(N k) with heapify) */
static void build_heaps(Ctx *c) {
    for (int64_t x = 0; x < c->E; x++) {
        c->heaps[x].n = 0;
        if (!heap_reserve(c, &c->heaps[x], c->loads[x])) return;
    }
    for (int64_t t = 0; t < c->N; t++)
        for (int64_t j = 0; j < c->k; j++) {
            int64_t x = c->experts[t * c->k + j];
            if (x < 0) continue;
            Heap *h = &c->heaps[x];
            Entry v = {leave_key(c, t, x), (int32_t)t, (int32_t)j, c->ver[t * c->k + j]};
            h->a[h->n++] = v;
        }
    for (int64_t x = 0; x < c->E; x++)
        for (int64_t i = c->heaps[x].n / 2 - 1; i >= 0; i--) sift_down(&c->heaps[x], i);
}

static void note_bad(int64_t t, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    if (*nbad < nbad_max) bad[*nbad] = t;
    (*nbad)++;
}

typedef char double_is_int64_sized[sizeof(double) == sizeof(int64_t) ? 1 : -1]; /* chunk scratch */

typedef struct {
    Ctx *c;
    int64_t t0, t1;
    int fresh;       /* assign pass: see assign_topk */
    int64_t sample;  /* assign pass: 0 all tokens, S > 0 every S-th, -S the others */
    int64_t *loads;  /* assign pass: this chunk's loads */
    int64_t nbad;    /* assign pass: tokens with fewer than k allowed experts */
    double total;    /* dual pass: this chunk's sum */
    int64_t *idx;    /* scratch for row_topk: k+1 entries */
    double *val;
    int64_t id;      /* gather pass: this chunk's number, every stride-th token, */
    int64_t stride;  /* where the thresholds go (want[e] = size of an entering-price heap), */
    double *buf;
    const int64_t *off, *want;
    int64_t *cnt;         /* [E]: this chunk's own threshold counts and */
    double *gate;         /* [E]: gates (see gather_rows) */
    const uint8_t *owner; /* [E]: the chunk gathering an overloaded expert's holders, else 255 */
    const int32_t *under; /* this chunk's underloaded experts (nu of them) */
    int64_t nu;
} Chunk;

static void assign_rows(Chunk *ch) {
    Ctx *c = ch->c;
    int64_t *idx = ch->idx;
    double *val = ch->val;
    const int64_t sample = ch->sample;
    for (int64_t t = ch->t0; t < ch->t1; t++) {
        if (sample > 0 ? t % sample != 0 : (sample < 0 && t % -sample == 0)) continue;
        int64_t *row = c->experts + t * c->k;
        uint8_t *h = c->held + t * c->E;
        /* the k held experts and the best other one are k+1 distinct allowed experts: the least
         * of their new values bounds the new (k+1)-th value from below */
        double bound = (!ch->fresh && c->barg[t] >= 0) ? S(c, t, c->barg[t]) - c->p[c->barg[t]] : -INFINITY;
        for (int64_t j = 0; j < c->k; j++) {
            if (row[j] >= 0) {
                h[row[j]] = 0;
                bound = fmin(bound, S(c, t, row[j]) - c->p[row[j]]);
            } else {
                bound = -INFINITY;
            }
            row[j] = -1;
        }
        c->best[t] = -INFINITY;
        c->barg[t] = -1;
        if (!is_valid(c, t)) continue;
        int64_t m = row_topk(c, t, bound, idx, val);
        if (m < c->k) {
            ch->nbad++;
            continue;
        }
        for (int64_t j = 0; j < c->k; j++) {
            row[j] = idx[j];
            h[idx[j]] = 1;
            ch->loads[idx[j]]++;
        }
        if (c->kth) c->kth[t] = val[c->k - 1];
        if (m > c->k) {
            c->best[t] = val[c->k];
            c->barg[t] = (int32_t)idx[c->k];
        }
    }
}

/* the token part of the dual, from scratch: a token's top-k sum of s - p is the sum over the
 * experts it holds when no other expert beats the lowest of them (one max over its row), else
 * a top-k of the row */
static void dual_rows(Chunk *ch) {
    Ctx *c = ch->c;
    int64_t *idx = ch->idx;
    double *val = ch->val;
    for (int64_t t = ch->t0; t < ch->t1; t++) {
        if (!is_valid(c, t)) continue;
        double sum = 0.0, low = INFINITY, other;
        for (int64_t j = 0; j < c->k; j++) {
            int64_t e = c->experts[t * c->k + j];
            double v = e >= 0 ? S(c, t, e) - c->p[e] : -INFINITY;
            sum += v;
            low = fmin(low, v);
        }
        const uint8_t *h = c->held + t * c->E;
        other = c->s32 ? row_other_max_float(c->s32 + t * c->E, c->p, h, c->E)
                       : row_other_max_double(c->s64 + t * c->E, c->p, h, c->E);
        if (other <= low && low > -INFINITY) {
            ch->total += sum;
            continue;
        }
        row_topk(c, t, -INFINITY, idx, val);
        for (int64_t j = 0; j < c->k; j++) ch->total += val[j];
    }
}

#define MAX_THREADS 64

static void *assign_thread(void *arg) {
    assign_rows(arg);
    return NULL;
}
static void *dual_thread(void *arg) {
    dual_rows(arg);
    return NULL;
}

/* threads for a pass over all N x E scores: 1 when thread start-up would cost more than it saves */
static int64_t pass_threads(const Ctx *c) {
    int64_t n = c->threads < 1 ? 1 : (c->threads > MAX_THREADS ? MAX_THREADS : c->threads);
    return c->N * c->E < (int64_t)1 << 17 ? 1 : n;
}

/* 8-byte entries per chunk for a chunk's own n entries: whole cache lines plus one line of
 * gap, so that no two threads write to the same line (the row kernels write their top list
 * once per value they insert) */
static inline int64_t chunk_stride(int64_t n) { return (n + 7) / 8 * 8 + 8; }

/* splits the tokens into chunks, one per thread when the pass is big enough; 0 = no memory */
static int64_t split_rows(Ctx *c, Chunk *ch, int fresh, int64_t **scratch) {
    int64_t n = pass_threads(c);
    if (n > c->N) n = c->N < 1 ? 1 : c->N;
    const int64_t per = chunk_stride(2 * (c->k + 1));
    *scratch = malloc(sizeof(int64_t) * (size_t)(n * per));
    if (!*scratch) return c->oom = 1, 0;
    for (int64_t i = 0; i < n; i++) {
        ch[i].c = c;
        ch[i].t0 = c->N * i / n;
        ch[i].t1 = c->N * (i + 1) / n;
        ch[i].fresh = fresh;
        ch[i].nbad = 0;
        ch[i].total = 0;
        ch[i].idx = *scratch + i * per;
        ch[i].val = (double *)(ch[i].idx + c->k + 1); /* int64 and double have the same size */
    }
    return n;
}

static void run_chunks(Chunk *ch, int64_t n, void (*fn)(Chunk *), void *(*thread_fn)(void *)) {
#ifdef HAVE_THREADS
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < n; i++) started[i] = pthread_create(&tid[i], NULL, thread_fn, &ch[i]) == 0;
    fn(&ch[0]);
    for (int64_t i = 1; i < n; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            fn(&ch[i]);
    }
#else
    (void)thread_fn;
    for (int64_t i = 0; i < n; i++) fn(&ch[i]);
#endif
}

/* no token holds an expert: every slot empty, no best other expert */
static void clear_assignment(Ctx *c) {
    for (int64_t i = 0; i < c->N * c->k; i++) c->experts[i] = -1;
    memset(c->held, 0, (size_t)(c->N * c->E));
    for (int64_t t = 0; t < c->N; t++) c->barg[t] = -1;
}

/*
 * Phase 1: every valid token takes its top-k of s - p; returns 0 if some token has < k allowed
 * (listing them in bad).  fresh = 0: the assignment in place is a top-k at other prices, and a
 * token's k experts and its best other one bound its new (k+1)-th value from below (few
 * insertions); fresh = 1: start from scratch (the experts buffer is then first cleared).
 * sample = 0: every token; S > 0: every S-th token only (the loads count that sample: scale S);
 * -S: the tokens that sample left out, their loads added to its loads (scale 1 again).
 */
static int assign_topk(Ctx *c, int fresh, int64_t sample, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    Chunk ch[MAX_THREADS];
    if (fresh) clear_assignment(c);
    int64_t *scratch, n = split_rows(c, ch, fresh, &scratch);
    int64_t *loads = calloc((size_t)(n * chunk_stride(c->E)) + 1, sizeof(int64_t));
    if (!n || !loads) {
        free(scratch);
        free(loads);
        return c->oom = 1, 1;
    }
    for (int64_t i = 0; i < n; i++) {
        ch[i].loads = loads + i * chunk_stride(c->E);
        ch[i].sample = sample;
    }
    run_chunks(ch, n, assign_rows, assign_thread);
    free(scratch);
    *nbad = 0;
    if (sample >= 0) /* a completing pass (sample < 0) adds the other tokens to the sample's loads */
        memset(c->loads, 0, sizeof(int64_t) * (size_t)c->E);
    c->scale = sample > 0 ? sample : 1;
    for (int64_t i = 0; i < n; i++) {
        *nbad += ch[i].nbad;
        for (int64_t e = 0; e < c->E; e++) c->loads[e] += ch[i].loads[e];
    }
    free(loads);
    if (*nbad == 0) return 1;
    int64_t nb = 0; /* rare: list the tokens with too few allowed experts */
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(c->k + 1));
    double *val = malloc(sizeof(double) * (size_t)(c->k + 1));
    for (int64_t t = 0; idx && val && t < c->N; t++)
        if (is_valid(c, t) && row_topk(c, t, -INFINITY, idx, val) < c->k) note_bad(t, bad, nbad_max, &nb);
    free(idx);
    free(val);
    return 0;
}

/* r-th largest (0-based) of a[0..n-1], partially reordering a; a[r+1..] end up <= it */
static double select_desc(double *a, int64_t n, int64_t r) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                double tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                i++;
                j--;
            }
        }
        if (r <= j)
            hi = j;
        else if (r >= i)
            lo = i;
        else
            break;
    }
    return a[r];
}

/* r-th largest (0-based) of a[0..n-1] as select_desc, and in *before the (r-1)-th: the least
 * of the r larger ones (the r-th itself when r = 0) */
static double select_desc_pair(double *a, int64_t n, int64_t r, double *before) {
    double at = select_desc(a, n, r), b = at;
    for (int64_t i = 0; i < r; i++) b = (i == 0 || a[i] < b) ? a[i] : b;
    *before = b;
    return at;
}

/* bounded min-heap of doubles: keeps the n largest values pushed */
static void dheap_offer(double *h, int64_t *cnt, int64_t n, double v) {
    int64_t i;
    if (*cnt < n) { /* sift up */
        i = (*cnt)++;
        while (i > 0 && v < h[(i - 1) / 2]) {
            h[i] = h[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        h[i] = v;
        return;
    }
    if (!(v > h[0])) return;
    i = 0; /* replace the root, sift down */
    for (;;) {
        int64_t l = 2 * i + 1, m;
        if (l >= n) break;
        m = (l + 1 < n && h[l + 1] < h[l]) ? l + 1 : l;
        if (!(h[m] < v)) break;
        h[i] = h[m];
        i = m;
    }
    h[i] = v;
}

/* price-step thresholds of this chunk's experts over every stride-th token (see price_step):
 * an overloaded expert's holders come from the tokens' expert lists; an underloaded one's
 * entering prices pass a filter, gate[e] (the heap's root once it is full, -inf before),
 * before they reach its heap.  Only the chunk's underloaded experts are scanned, branch-free
 * first, so a step costs O(N x underloaded) rather than O(N E). */
static void gather_rows(Chunk *ch) {
    const Ctx *c = ch->c;
    const int64_t N = c->N, E = c->E, k = c->k, nu = ch->nu;
    const int32_t *under = ch->under;
    const float *s32 = c->s32;
    const double *s64 = c->s64;
    double *restrict gate = ch->gate, *restrict buf = ch->buf;
    const int64_t *off = ch->off, *want = ch->want;
    const uint8_t *owner = ch->owner;
    const uint8_t me = (uint8_t)ch->id;
    int64_t *restrict cnt = ch->cnt; /* this chunk's own counts and gates: no false sharing */
    int32_t ce[ROW_TILE];
    double cv[ROW_TILE];
    for (int64_t t = 0; t < N; t += ch->stride) {
        if (!is_valid(c, t)) continue;
        const uint8_t *h = c->held + t * E;
        const int64_t *row = c->experts + t * k;
        double bt = c->best[t], kt = c->kth[t];
        for (int64_t j = 0; j < k; j++) {
            int64_t e = row[j];
            if (e >= 0 && owner[e] == me) buf[off[e] + cnt[e]++] = S(c, t, e) - bt;
        }
        for (int64_t u0 = 0; u0 < nu; u0 += ROW_TILE) {
            int64_t u1 = u0 + ROW_TILE < nu ? u0 + ROW_TILE : nu, m = 0;
            for (int64_t u = u0; u < u1; u++) {
                int32_t e = under[u];
                double v = (s32 ? (double)s32[t * E + e] : s64[t * E + e]) - kt;
                ce[m] = e;
                cv[m] = v;
                m += (v > gate[e]) & !h[e];
            }
            for (int64_t i = 0; i < m; i++) {
                int32_t e = ce[i];
                double v = cv[i]; /* each expert appears once per tile: its gate is unchanged */
                double *heap = buf + off[e];
                dheap_offer(heap, &cnt[e], want[e], v);
                if (cnt[e] == want[e]) gate[e] = heap[0];
            }
        }
    }
}

static void *gather_thread(void *arg) {
    gather_rows(arg);
    return NULL;
}

/*
 * One damped best-response (Jacobi) price step for all experts at once.  Expert e's demand
 * at price q counts the tokens whose threshold exceeds q: a holder's threshold is its
 * leaving price s - best, another token's is its entering price s - (its k-th value).  The
 * target price puts exactly cap[e] thresholds above it (midpoint of the cap-th and
 * cap+1-th); prices move a fraction alpha of the way (alpha_up where the target is above
 * the price; with floor_zero a target at or below 0 sets the price to 0, as prices.py
 * defines the step).  An overloaded expert selects among
 * its holders; an underloaded one keeps only its C - L + 1 best entering prices in a
 * bounded heap.  With stride > 1 the same quantiles are estimated on every stride-th token
 * (cheap early steps while the excess is large; exactness comes from the later phases).
 * O(N E / stride) plus the selections.  Returns 0 when no price moved.
 */
static int price_step(Ctx *c, double alpha, double alpha_up, int floor_zero, int64_t stride, double *buf,
                      int64_t *off, int64_t *want, int64_t *cnt) {
    const int64_t E = c->E;
    int64_t total = 0;
    Chunk ch[MAX_THREADS]; /* threads split the experts: each owns its experts' buffers */
    int64_t n = pass_threads(c) < E ? pass_threads(c) : E;
    /* per chunk: gates and counts [E] each (a cache line apart), then the shared lists */
    const int64_t stripe = E + 8;
    double *gate = malloc(sizeof(double) * (size_t)(2 * n * stripe) + sizeof(int32_t) * (size_t)E + 2 * (size_t)E);
    if (!gate) return c->oom = 1, 0;
    int64_t *ccnt = (int64_t *)(gate + n * stripe);
    int32_t *under = (int32_t *)(ccnt + n * stripe); /* underloaded experts, grouped by owning chunk */
    uint8_t *home = (uint8_t *)(under + E); /* the chunk gathering an expert's thresholds */
    uint8_t *owner = home + E;               /* the same for overloaded experts, 255 for others */
    int64_t nover = 0, nunder = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t L = c->loads[e] * c->scale, C = c->cap[e]; /* scale is 1 or stride */
        off[e] = total;
        want[e] = L < C ? (C - L + stride - 1) / stride + 1 : 0;
        total += (L > C ? c->loads[e] : want[e]) + 8; /* at most loads[e] holders are gathered; a
                                                         * line of gap: experts of other threads */
        home[e] = (uint8_t)(L > C ? nover++ % n : (L < C ? nunder++ % n : UINT8_MAX)); /* balanced */
        owner[e] = L > C ? home[e] : UINT8_MAX;
    }
    for (int64_t i = 0; i < n * stripe; i++) {
        gate[i] = -INFINITY;
        ccnt[i] = 0;
    }
    for (int64_t i = 0, u = 0; i < n; i++) { /* chunk i scans the i-th share of the underloaded */
        ch[i].c = c;
        ch[i].id = i;
        ch[i].under = under + u;
        ch[i].nu = 0;
        for (int64_t e = 0; e < E; e++)
            if (home[e] == i && owner[e] == UINT8_MAX) under[u + ch[i].nu++] = (int32_t)e;
        u += ch[i].nu;
        ch[i].stride = stride;
        ch[i].buf = buf;
        ch[i].off = off;
        ch[i].want = want;
        ch[i].cnt = ccnt + i * stripe;
        ch[i].gate = gate + i * stripe;
        ch[i].owner = owner;
    }
    run_chunks(ch, n, gather_rows, gather_thread);
    for (int64_t e = 0; e < E; e++) cnt[e] = home[e] == UINT8_MAX ? 0 : ccnt[home[e] * stripe + e];
    free(gate);
    int moved = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t L = c->loads[e] * c->scale, C = c->cap[e], n = cnt[e];
        if (L == C || n == 0) continue;
        double *a = buf + off[e], hi, lo;
        if (L > C) { /* keep C holders: between the (C+1)-th and the C-th leaving price */
            int64_t r = C * n / L; /* C itself when every holder was gathered */
            lo = select_desc_pair(a, n, r, &hi);
        } else if (n < want[e]) { /* too few other tokens can take e: admit them all */
            hi = a[0];
            lo = -INFINITY;
        } else { /* heap of the want best entering prices: root = want-th, then the (want-1)-th */
            lo = a[0];
            hi = n > 2 ? fmin(a[1], a[2]) : a[1];
        }
        double target = isfinite(lo) && isfinite(hi) ? 0.5 * (hi + lo) : (isfinite(hi) ? hi : lo);
        if (!isfinite(target)) continue;
        /* at the floor the best response is 0 itself: damped, such prices would only near it */
        double step = target > c->p[e] ? alpha_up : alpha;
        double np = floor_zero && target <= 0 ? 0 : c->p[e] + step * (target - c->p[e]);
        if (np != c->p[e]) moved = 1;
        c->p[e] = np;
    }
    return moved;
}

/* sum over valid tokens of the top-k of s - p: the token part of the dual objective */
static double dual_token_part(Ctx *c) {
    Chunk ch[MAX_THREADS];
    int64_t *scratch, n = split_rows(c, ch, 0, &scratch);
    run_chunks(ch, n, dual_rows, dual_thread);
    free(scratch);
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) total += ch[i].total;
    return total;
}

/*
 * Phase 2 step: overloaded expert x evicts its loads[x] - cap[x] holders with the lowest
 * leaving price and raises its price to the lowest leaving price among those it keeps (any
 * price between the two keeps every token on a top-k; the higher one deflects later inflow),
 * plus c->eps: with eps > 0 the kept holders are only within eps of a top-k (see
 * scaled_auction).
 * Returns the number of evictions (0 if the cheapest holders cannot go anywhere else).
 */
static int64_t raise_price(Ctx *c, int64_t x, int32_t *out) {
    int64_t need = c->loads[x] - c->cap[x], m = 0;
    double last = -INFINITY;
    while (m < need) {
        Entry *e = heap_top(c, x);
        if (!e || e->key == INFINITY) break;
        last = e->key;
        out[m++] = e->tok;
        heap_pop(&c->heaps[x]);
    }
    if (m == 0) return 0;
    Entry *keep = heap_top(c, x);
    double q = (keep && keep->key != INFINITY && m == need) ? keep->key + c->eps : last;
    if (q > c->p[x]) c->p[x] = q;
    for (int64_t i = 0; i < m; i++) move_token(c, out[i], x, c->barg[out[i]]);
    return m;
}

#define COARSE 4 /* the sample's stride while the excess is large */
#define STEP_PAYBACK 8 /* auction moves a unit of excess costs, over the passes a price step makes */
#define WAR_WINDOW 1024 /* the auction checks its rate every so many moves */
#define WAR_MOVES 128   /* a price war: more moves than this per unit of excess removed */
#define WAR_LEFT 4      /* ... with more units than this left */
#define WAR_BUDGET 2    /* ... or more moves left, at the window's rate, than this many per unit */
/* a war with at most WAR_REPAIR N / E units left goes to the repair (paths of O(E^2) each)
 * rather than to eps-scaling, whose rounds put every token back on its exact top-k: at
 * (5321, 384, 7) with 9 units left that made an excess of 21,596 and 580k moves */
#define WAR_REPAIR 2

/* the total overload (estimated from the sample while loads count one) */
static int64_t total_excess(const Ctx *c) {
    int64_t x = 0;
    for (int64_t e = 0; e < c->E; e++)
        if (c->loads[e] * c->scale > c->cap[e]) x += c->loads[e] * c->scale - c->cap[e];
    return x;
}

/* with slack capacity: the free slots of experts priced above 0 (once loads count every
 * token).  At optimal prices there are none; those the auction leaves cost the repair a
 * shortest path each from the slack node, O(E^2) and more, so the price steps also run while
 * there are more than DEFICIT_PAYBACK N / E of them (a step costs O(N E); without this rule
 * cold starts at E = 384 left hundreds of paths), as long as each step fills enough of them:
 * a slot filled counts as SLOT_PAYBACK E / STEP_PAYBACK units of excess removed.  (Going on
 * while many were left, whatever a step filled, cost warm starts from another batch's prices
 * 20 steps that filled a slot or two each: 20-27x topk at E = 384-472, k = 1) */
#define DEFICIT_PAYBACK 1
#define SLOT_PAYBACK 2
/* while a step removes less than half the excess, the next raises prices up to RAISE_MAX of
 * the way to their targets, RAISE_GROWTH times more each step (back to the damping when the
 * excess grows): Jacobi steps are slow where experts compete for the same tokens, since each
 * target assumes the others' prices stay (at (6325, 448, 9) about 20% of the excess per step).
 * Lowerings keep the damping: overshot, they leave free slots at positive prices, one
 * shortest path each (1.6 did, for both) */
#define RAISE_MAX 1.2
#define RAISE_GROWTH 1.25
static int64_t priced_deficit(const Ctx *c) {
    int64_t x = 0;
    for (int64_t e = 0; e < c->E; e++)
        if (c->p[e] > 0 && c->loads[e] < c->cap[e]) x += c->cap[e] - c->loads[e];
    return c->scale > 1 ? 0 : x;
}

/* with slack capacity, more free slots at a positive price than the repair should take */
static int many_priced_slots(const Ctx *c, int slack) {
    return slack && priced_deficit(c) * c->E > DEFICIT_PAYBACK * c->N;
}

/* the price steps still pay: much excess, or many free slots at a positive price */
static int far_off(const Ctx *c, int64_t enough, int slack) {
    return total_excess(c) > enough || many_priced_slots(c, slack);
}

/* the excess below which coarse price steps (a sample of every COARSE-th token, or a stride
 * in the thresholds) stop helping: `fraction` of the units, or twice the excess the sample's
 * noise alone makes, about E sqrt(C COARSE) / 2 (seen: the steps stall there when experts
 * hold few tokens) */
static int64_t coarse_until(const Ctx *c, int64_t units, int64_t fraction) {
    double cap = 0;
    for (int64_t e = 0; e < c->E; e++) cap += (double)c->cap[e];
    int64_t noise = (int64_t)((double)c->E * sqrt(cap / (double)c->E * COARSE));
    return units / fraction > noise ? units / fraction : noise;
}

/* valid units (k per valid token) and the total capacity */
static void totals(const Ctx *c, int64_t *units, int64_t *capacity) {
    *units = *capacity = 0;
    for (int64_t t = 0; t < c->N; t++) *units += is_valid(c, t) ? c->k : 0;
    for (int64_t e = 0; e < c->E; e++) *capacity += c->cap[e];
}

/* an auction move in units of one score of a price step: about 0.3 us against 8 ns on E = 16,
 * times 5 for the auction's slowing down as its excess shrinks (on router scores the last
 * units cost 4-16 moves each, against 1-4 at the start) */
#define MOVE_COST 200

/*
 * Phase 2: raise overloaded experts' prices in rounds until none is over or the budget ends.
 * With `slow` set, the auction measures itself once it has made twice the excess it started
 * from in moves: when more than 1/16 of the units are still over and the excess left, at the
 * rate it fell, would cost more in moves than the price steps down to 1/64 of the units
 * (each about halves it) cost in scores, it stops and sets *slow.  Near-uniform scores with a
 * strong per-expert bias (a router early in training) make such auctions: prices creep up
 * in small raises while tokens shuttle between experts, and the move budget ends them.
 */
static int64_t run_auction(Ctx *c, int64_t max_moves, int *slow, int *war, int64_t war_moves, int64_t war_budget) {
    int64_t raises = 0, units = 0, capacity = 0, start = c->moves, excess0 = total_excess(c);
    if (slow || war_budget > 0) totals(c, &units, &capacity);
    int32_t *out = malloc(sizeof(int32_t) * (size_t)(c->N + 1));
    /* rounds that raise no price only shuffle tied tokens (they could cycle): stop after a few */
    int idle = 0, overloaded = 1, probe = slow != NULL;
    /* with `war`: the auction's rate, window by window.  It stops and sets *war once the excess
     * falls by less than one unit per `war_moves` moves: a price war among near-equal experts,
     * where each raise is one leaving price past the last and the evicted tokens shuttle back
     * (seen with sigmoid scores, whose popular experts score near 1 for every token; a sound
     * auction moves a unit 1-16 times).  WAR_MOVES before eps-scaling (32 caught wars sooner
     * but also sent sound auctions to it, whose free slots then cost the repair one path each);
     * E before the repair, whose augmentations cost O(E^2) and more.  Not with WAR_LEFT units
     * or fewer left: an auction's last units always take more moves each, and cost little (at
     * (16384, 128, 8) the tail alone passed for a war).  Warm starts from prices averaged over
     * other groups make such wars too: prices too high for some experts, which the others'
     * prices must climb to, one leaving price at a time.  With `war_budget` > 0 also once the
     * units left, at the window's rate, would cost more than war_budget moves per unit of the
     * problem (eps-scaling costs about that): sigmoid scores with a strong bias made auctions
     * of 60-100 moves per unit over thousands of units, under the WAR_MOVES rate (at
     * (3937, 488, 7) 380k moves before the rule, where eps-scaling finished in 52k) */
    int64_t window_moves = c->moves, window_excess = excess0;
    while (overloaded && idle < 3 && c->moves < max_moves && !c->oom) {
        int progress = 0;
        overloaded = 0;
        for (int64_t x = 0; x < c->E && c->moves < max_moves; x++) {
            if (c->loads[x] <= c->cap[x]) continue;
            overloaded = 1;
            double before = c->p[x];
            if (raise_price(c, x, out) > 0) raises++;
            progress |= c->p[x] > before;
        }
        idle = progress ? 0 : idle + 1;
        if (war && c->moves - window_moves >= WAR_WINDOW) {
            int64_t left = total_excess(c);
            int64_t fell = window_excess - left, spent = c->moves - window_moves;
            int over_budget = war_budget > 0 && (double)left * spent > (double)war_budget * units * fell;
            if (left > WAR_LEFT && (fell * war_moves < spent || over_budget)) {
                *war = 1;
                break;
            }
            window_moves = c->moves;
            window_excess = left;
        }
        if (probe && c->moves - start >= 2 * excess0) {
            probe = 0;
            int64_t left = total_excess(c), target = units / 64 > 0 ? units / 64 : 1;
            double fell = (double)(excess0 - left) / (double)(c->moves - start); /* units per move */
            double steps = ceil(log2((double)left / (double)target)) + 1;
            if (left > units / 16 && (fell <= 0 || left / fell * MOVE_COST > steps * (double)(c->N * c->E))) {
                *slow = 1;
                break;
            }
        }
    }
    free(out);
    return raises;
}

/* the spread of the scores: the standard deviation of the finite scores of up to 256 valid
 * rows spread over the tokens (the scale of the eps-auction's price steps) */
static double score_spread(const Ctx *c) {
    double sum = 0, sq = 0, n = 0;
    int64_t step = c->N > 256 ? c->N / 256 : 1;
    for (int64_t t = 0; t < c->N; t += step) {
        if (!is_valid(c, t)) continue;
        for (int64_t e = 0; e < c->E; e++) {
            double v = S(c, t, e);
            if (v == -INFINITY) continue;
            sum += v;
            sq += v * v;
            n += 1;
        }
    }
    double var = n > 1 ? (sq - sum * sum / n) / (n - 1) : 0;
    return var > 0 ? sqrt(var) : 0;
}

#define EPS_SPREAD 0.1 /* the first eps-auction's eps, in score spreads; then EPS_SHRINK times less */
#define EPS_SHRINK 10
#define EPS_ROUNDS 3

/*
 * After a price war (run_auction's *war): eps-scaling (Bertsekas & Castanon, 1991).  An
 * auction that raises every price eps past its kept holders' least leaving price cannot creep:
 * each raise is at least eps, so a war of near-equal experts ends after (price range / eps)
 * raises.  It leaves every token within eps of a top-k of s - p; every token then takes its
 * exact top-k at those prices (near-optimal: few units over capacity) and the exact auction
 * and the repair finish from there.  EPS_ROUNDS rounds, from eps = EPS_SPREAD score spreads,
 * each EPS_SHRINK times less.  Started only once the exact auction has shown a war: from the
 * start it cost more than it saved on softmax scores over many experts (more units left to
 * the repair).  Returns the raises.
 */
static int64_t scaled_auction(Ctx *c, int64_t max_moves, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int64_t raises = 0;
    double eps = EPS_SPREAD * score_spread(c);
    for (int round = 0; round < EPS_ROUNDS && eps > 0 && !c->oom; round++, eps /= EPS_SHRINK) {
        c->eps = eps;
        raises += run_auction(c, c->moves + max_moves, NULL, NULL, 0, 0);
        c->eps = 0;
        assign_topk(c, 0, 0, bad, nbad_max, nbad); /* every token on its exact top-k again */
        build_heaps(c);
    }
    return raises;
}

typedef struct {
    double *d, *ev;
    int32_t *predx, *predt, *order;
    uint8_t *settled;
    Entry *popped;
    int32_t *popped_from;
    int64_t npopped, popcap;
} Dijk;

/* next expansion event of settled expert x: d[x] + slack of its cheapest unexpanded holder */
static void next_event(Ctx *c, Dijk *w, int64_t x, int use_prices) {
    Entry *e = heap_top(c, x);
    if (!e || c->barg[e->tok] < 0) {
        w->ev[x] = INFINITY;
        return;
    }
    double slack = e->key - (use_prices ? c->p[x] : 0.0);
    w->ev[x] = w->d[x] + (slack > 0 ? slack : 0);
}

/* expands the cheapest unexpanded holder t of settled expert x: relax x -> y for all y */
static void expand(Ctx *c, Dijk *w, int64_t x, double *U) {
    Entry e = c->heaps[x].a[0];
    heap_pop(&c->heaps[x]);
    if (w->npopped == w->popcap) {
        int64_t nc = w->popcap * 2 + 64;
        Entry *na = realloc(w->popped, sizeof(Entry) * (size_t)nc);
        int32_t *nf = realloc(w->popped_from, sizeof(int32_t) * (size_t)nc);
        if (na) w->popped = na;
        if (nf) w->popped_from = nf;
        if (!na || !nf) {
            c->oom = 1;
            return;
        }
        w->popcap = nc;
    }
    w->popped[w->npopped] = e;
    w->popped_from[w->npopped++] = (int32_t)x;
    int64_t t = e.tok;
    double dx = w->d[x], vx = S(c, t, x) - c->p[x];
    const uint8_t *h = c->held + t * c->E;
    for (int64_t y = 0; y < c->E; y++) {
        if (h[y] || w->settled[y]) continue;
        double sy = S(c, t, y);
        if (sy == -INFINITY) continue;
        double rc = vx - (sy - c->p[y]);
        double cand = dx + (rc > 0 ? rc : 0);
        if (cand < w->d[y]) {
            w->d[y] = cand;
            w->predx[y] = (int32_t)x;
            w->predt[y] = (int32_t)t;
            if (held_units(c, y) < c->cap[y] && cand < *U) *U = cand;
        }
    }
}

/*
 * One augmentation: shortest path from the sources (overloaded experts, and the slack node Z
 * while it has unplaced units) to the nearest expert below capacity.  Node E is Z: an arc
 * Z -> y places one of Z's units at y (reduced cost p[y] - pz), an arc x -> Z takes one back
 * from an expert that holds some (pz - p[x], 0 at optimal prices).  Holders of a settled
 * expert are expanded lazily, cheapest first, and only while their expansion could still
 * beat the best path found.  Returns 1 on success, 0 if no expert below capacity is reachable
 * (infeasible).  use_prices = 0: prices stay fixed (repair mode) and negative reduced costs
 * are clamped at 0.
 */
static int augment(Ctx *c, Dijk *w, int use_prices, int64_t *nsettled) {
    const int64_t E = c->E, Z = E;
    double U = INFINITY;
    int64_t target = -1, ns = 0;
    w->npopped = 0;
    for (int64_t e = 0; e < E; e++) {
        w->d[e] = held_units(c, e) > c->cap[e] ? 0.0 : INFINITY;
        w->ev[e] = INFINITY;
        w->predx[e] = -1;
        w->settled[e] = 0;
    }
    w->d[Z] = c->unplaced > 0 ? 0.0 : INFINITY;
    w->predx[Z] = -1;
    w->settled[Z] = 0;
    while (!c->oom) {
        int64_t x = -1, ex = -1;
        double dx = INFINITY, dev = INFINITY;
        for (int64_t e = 0; e <= E; e++) {
            if (!w->settled[e]) {
                if (w->d[e] < dx) {
                    dx = w->d[e];
                    x = e;
                }
            } else if (e < E && w->ev[e] < dev) {
                dev = w->ev[e];
                ex = e;
            }
        }
        if (ex >= 0 && dev < dx) { /* an expansion comes before the next expert */
            expand(c, w, ex, &U);
            next_event(c, w, ex, use_prices);
            continue;
        }
        if (x < 0) break;
        if (x < E && held_units(c, x) < c->cap[x]) {
            target = x;
            break;
        }
        w->settled[x] = 1;
        w->order[ns++] = (int32_t)x;
        if (x == Z) { /* Z can place a unit at any expert */
            for (int64_t y = 0; y < E; y++) {
                double rc = c->p[y] - c->pz, cand = dx + (rc > 0 ? rc : 0);
                if (!w->settled[y] && cand < w->d[y]) {
                    w->d[y] = cand;
                    w->predx[y] = (int32_t)Z;
                }
            }
            continue;
        }
        next_event(c, w, x, use_prices);
        if (c->dummy && c->dummy[x] > 0 && !w->settled[Z]) {
            double rc = c->pz - c->p[x], cand = dx + (rc > 0 ? rc : 0);
            if (cand < w->d[Z]) {
                w->d[Z] = cand;
                w->predx[Z] = (int32_t)x;
            }
        }
    }
    *nsettled = ns;
    if (target >= 0) {
        double Dstar = w->d[target];
        if (use_prices)
            for (int64_t i = 0; i < ns; i++) {
                int32_t x = w->order[i];
                *(x == Z ? &c->pz : &c->p[x]) += Dstar - w->d[x];
            }
        /* units along the path: one if it moves a token (each token arc is one token); a path
         * of Z's arcs alone carries as many units as its ends and x -> Z arcs allow: at the new
         * prices its arcs cost 0, so it stays a shortest path for each of them */
        int64_t units = held_units(c, target) < c->cap[target] ? c->cap[target] - held_units(c, target) : 0, y;
        for (y = target; w->predx[y] >= 0; y = w->predx[y]) {
            int64_t x = w->predx[y];
            if (x != Z && y != Z) units = 1;
            else if (y == Z && c->dummy[x] < units) units = c->dummy[x];
        }
        int64_t over = y == Z ? c->unplaced : held_units(c, y) - c->cap[y];
        units = over < units ? over : units;
        for (y = target; w->predx[y] >= 0; y = w->predx[y]) {
            int64_t x = w->predx[y];
            if (x == Z)
                c->dummy[y] += units;
            else if (y == Z)
                c->dummy[x] -= units;
            else
                move_token(c, w->predt[y], x, y);
        }
        if (y == Z) c->unplaced -= units;
    }
    for (int64_t i = 0; i < w->npopped; i++) /* expanded holders that did not move stay holders */
        if (w->popped[i].ver == c->ver[(int64_t)w->popped[i].tok * c->k + w->popped[i].slot])
            heap_push(c, &c->heaps[w->popped_from[i]], w->popped[i]);
    return target >= 0;
}

/*
 * Z's units before the repair (exact mode, slack capacity): pz is the least price, and the
 * units go at no cost to the experts below capacity at that price; the rest stay at Z.
 */
static int place_slack(Ctx *c) {
    int64_t units, capacity;
    totals(c, &units, &capacity);
    c->unplaced = capacity - units;
    if (c->unplaced <= 0) return 1;
    c->dummy = calloc((size_t)c->E, sizeof(int64_t));
    if (!c->dummy) return c->oom = 1, 0;
    c->pz = INFINITY;
    for (int64_t e = 0; e < c->E; e++) c->pz = fmin(c->pz, c->p[e]);
    for (int64_t e = 0; e < c->E && c->unplaced > 0; e++)
        if (c->p[e] == c->pz && c->loads[e] < c->cap[e]) {
            int64_t n = c->cap[e] - c->loads[e] < c->unplaced ? c->cap[e] - c->loads[e] : c->unplaced;
            c->dummy[e] = n;
            c->unplaced -= n;
        }
    return 1;
}

/*
 * Price steps from a top-k assignment (with every token's k-th value in c->kth): at most
 * price_iters damped best-response steps while the excess is above `enough` (coarse, sampled
 * steps while it is far above; a sampled assignment is completed before the first step over
 * all tokens, or at the end), stopping early when a step no longer pays (see the loop) and
 * going on, with slack capacity, while many free slots sit at experts priced above 0.  Free
 * slots left are the repair's (the slack node Z).  Returns 0 if some token has fewer than k
 * allowed experts.
 */
static int price_phase(Ctx *c, int64_t price_iters, double alpha, int64_t enough, int64_t units, int64_t capacity,
                       int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int slack = capacity > units, complete = 1; /* every token with k allowed experts, as far as assigned */
    if (price_iters > 0 && far_off(c, enough, slack)) {
        double *buf = malloc(sizeof(double) * (size_t)(capacity + units + 9 * c->E + 1));
        int64_t *off = malloc(sizeof(int64_t) * (size_t)(3 * c->E)), *want = off + c->E, *cnt = off + 2 * c->E;
        if (!buf || !off) c->oom = 1;
        double a = alpha; /* the raises' step (see RAISE_MAX) */
        for (int64_t it = 0; !c->oom && it < price_iters; it++) {
            if (c->scale > 1 && total_excess(c) <= coarse_until(c, units, 12)) { /* every token from now on */
                complete = assign_topk(c, 0, -COARSE, bad, nbad_max, nbad);
                if (!complete) break;
            }
            if (!far_off(c, enough, slack)) break;
            /* coarse steps while far off; a sample overstates the excess (noise only adds to it) */
            int64_t stride = total_excess(c) > coarse_until(c, units, c->scale > 1 ? 12 : 16) ? COARSE : 1;
            int64_t before = total_excess(c), slots = priced_deficit(c);
            if (!price_step(c, alpha, a, slack, stride, buf, off, want, cnt)) break;
            assign_topk(c, 0, c->scale > 1 ? COARSE : 0, bad, nbad_max, nbad);
            /* a step costs about two passes over the scores it reads; the auction removes a unit
             * of excess in about 16 moves of O(E) each (seen on router scores), the repair a
             * priced free slot in a path of O(E^2): stop once a step saves less than it costs */
            int64_t fell = before - total_excess(c), filled = slack ? slots - priced_deficit(c) : 0;
            if ((fell * STEP_PAYBACK + (filled > 0 ? filled : 0) * c->E * SLOT_PAYBACK) * stride < c->N) break;
            if (fell < 0)
                a = alpha;
            else if (2 * fell < before)
                a = fmin(a * RAISE_GROWTH, RAISE_MAX);
        }
        free(buf);
        free(off);
    }
    if (c->scale > 1) complete = assign_topk(c, 0, -COARSE, bad, nbad_max, nbad);
    if (!complete) return 0;
    return 1;
}

/*
 * Cold start: every expert's price puts cap[e] of its scores above it, as if every token's
 * threshold (its k-th value of s - p) were the same: one price step (alpha 1) from the empty
 * assignment, every token's threshold 0, over every stride-th token (sample, or 1).  With
 * slack capacity the prices then fall by the common threshold theta under which the experts
 * left below it (at price 0) take fewer tokens than their capacity by the free slots in all:
 * the optimum has its free slots at price 0.  Then every token (of the sample) takes its top-k.
 *
 * Why: from prices 0 the price steps and the auction raise each expert's price one best
 * response at a time, each assuming the others' stay.  Where experts compete for the same
 * tokens (sigmoid scores with a per-expert bias: the popular experts score near 1 for every
 * token) that is a war: at (3937, 488, 7) the auction made 167k moves for 23k units that had
 * to move, 52x topk; from these prices 0.7k moves, 11x.  On the sweep's shapes the start's
 * dual gap is 100-1000 times less than at prices 0.
 *
 * The common threshold is a model, though: where tokens' thresholds differ much (softmax
 * scores, k = 1) the experts under theta come out full and the free slots sit at priced
 * experts, where the price steps cannot move them (a common shift of the prices changes no
 * routing) and the repair pays a path for each (at (4096, 96, 8), softmax: 63 paths for 64
 * free slots).  Such paths cost about E token rows each (O(E^2)), so when the free slots this
 * assignment leaves at priced experts would cost the repair more than FALLBACK_PASSES passes
 * over the scores, the start goes back to prices 0, where the experts no token outbids stay
 * at 0 with their free slots.  (The core alone on the sweep's 80 single shapes, one thread,
 * median / p90 / max x topk: from prices 0 5.8 / 19.4 / 52; this start without the way back
 * 4.1 / 17.8 / 27; with it 4.3 / 14.2 / 22.)
 * Returns 0 if some token has fewer than k allowed experts (listed in bad).
 */
#define FALLBACK_PASSES 4
static int quantile_start(Ctx *c, int64_t sample, int64_t units, int64_t capacity, int64_t *bad, int64_t nbad_max,
                          int64_t *nbad) {
    const int64_t stride = sample ? sample : 1, free_slots = capacity - units;
    double *buf = malloc(sizeof(double) * (size_t)(capacity + 10 * c->E + 16));
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(3 * c->E)), *cnt = off + 2 * c->E;
    if (!buf || !off) {
        free(buf);
        free(off);
        c->oom = 1;
        return 1;
    }
    clear_assignment(c);
    memset(c->loads, 0, sizeof(int64_t) * (size_t)c->E);
    for (int64_t t = 0; t < c->N; t++) c->kth[t] = 0.0;
    c->scale = 1;
    /* an expert's heap (buf + off[e], cnt[e] entries) keeps its best scores, the cap[e]-th among them */
    price_step(c, 1.0, 1.0, 0, stride, buf, off, off + c->E, cnt);
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t e = 0; e < c->E; e++) {
        lo = fmin(lo, c->p[e]);
        hi = fmax(hi, c->p[e]);
    }
    /* theta by bisection: the experts priced under it take the scores above it, fewer than
     * their capacity by the free slots */
    for (int it = 0; free_slots > 0 && it < 40 && lo < hi; it++) {
        double mid = 0.5 * (lo + hi);
        int64_t short_by = 0;
        for (int64_t e = 0; e < c->E && short_by <= free_slots; e++) {
            if (!(c->p[e] < mid)) continue;
            int64_t n = 0;
            for (int64_t i = 0; i < cnt[e]; i++) n += buf[off[e] + i] > mid;
            short_by += n * stride < c->cap[e] ? c->cap[e] - n * stride : 0;
        }
        if (short_by > free_slots)
            hi = mid;
        else
            lo = mid;
    }
    for (int64_t e = 0; e < c->E; e++) c->p[e] = c->p[e] > lo ? c->p[e] - lo : 0.0;
    free(buf);
    free(off);
    if (!assign_topk(c, 1, sample, bad, nbad_max, nbad)) return 0;
    int64_t at_zero = 0; /* the free slots the assignment leaves at price 0 */
    for (int64_t e = 0; e < c->E; e++)
        if (c->p[e] == 0 && c->loads[e] * c->scale < c->cap[e]) at_zero += c->cap[e] - c->loads[e] * c->scale;
    int64_t misplaced = free_slots - at_zero;
    if (misplaced * c->E > FALLBACK_PASSES * c->N) {
        memset(c->p, 0, sizeof(double) * (size_t)c->E);
        return assign_topk(c, 1, sample, bad, nbad_max, nbad);
    }
    return 1;
}

/*
 * Where the tokens' k-th scores sit in the range of the scores, 0 (the least) to 1 (the
 * largest): the mean over the valid tokens (every stride-th) of their k-th value at prices 0
 * (c->kth), relative to the least and largest finite score.  The quantile start models every
 * token's threshold as one value; that holds where the k-th scores sit near the top: saturating
 * gates (sigmoid with a per-expert bias), whose popular experts score near 1 for every token
 * and make price wars from prices 0.  Elsewhere the quantile start cost more than it saved:
 * the benchmark's hand-picked softmax rows took 1.2-6.6x longer from it (at (16384, 128, 8)
 * with logit std 3 and a bias, 225 against 44 ms: a war of 178k auction moves from its
 * prices), and the sweep's other single shapes 0.46-2.4x (median about 1.05).  On the
 * sweep's 80 single shapes every sigmoid one (16) has a saturation of 0.6-1.0 and took
 * 0.11-0.63x the time from the quantile start (one 1.26x); every other one, and every
 * hand-picked row, 0.31 or less.
 */
#define SATURATED 0.5
static double saturation(const Ctx *c, int64_t stride) {
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < c->N; t += stride) {
        if (!is_valid(c, t)) continue;
        sum += c->kth[t];
        n++;
        for (int64_t e = 0; e < c->E; e++) {
            double v = S(c, t, e);
            if (v == -INFINITY) continue;
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    }
    return n > 0 && hi > lo ? (sum / (double)n - lo) / (hi - lo) : 0.0;
}

/*
 * Phase 1: prices (warm start shifted to min 0, then the price steps while the excess is
 * large) and the top-k assignment at those prices.  Large problems start on a sample, every
 * COARSE-th token: while the estimated excess is large the steps need only the sample.
 */
static int prepare(Ctx *c, int64_t price_iters, double alpha, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int64_t units, capacity;
    totals(c, &units, &capacity);
    c->kth = malloc(sizeof(double) * (size_t)(c->N + 1));
    if (!c->kth) return c->oom = 1, 1;
    /* large problems start on a sample, every COARSE-th token (see price_phase) */
    int64_t big = c->N * c->E >= ((int64_t)1 << 16);
    int64_t sample = (price_iters > 0 && big && c->N >= 1024) ? COARSE : 0;
    int cold = 1, ok = 1, assigned = 0;
    for (int64_t e = 0; e < c->E; e++) cold &= c->p[e] == 0;
    if (cold && price_iters > 0) {
        /* the top-k at prices 0 first (of the sample); the quantile start only where its model
         * holds, scores saturated (see saturation), and on small problems only where prices 0
         * leave the price steps work (more excess than they stop at): its selections over every
         * score cost more than a whole solve from prices 0 near balance */
        ok = assign_topk(c, 1, sample, bad, nbad_max, nbad);
        int quantile = ok && saturation(c, sample ? sample : 1) >= SATURATED;
        if (quantile && !big) quantile = total_excess(c) > units / 4;
        if (quantile) ok = quantile_start(c, sample, units, capacity, bad, nbad_max, nbad);
        assigned = 1;
    }
    if (!ok || c->oom) goto out;
    /* warm prices less their m-th least, floored at 0, m = ceil(free slots / largest capacity)
     * (1 without slack: shifted to minimum 0): at least m experts are below capacity at the
     * optimum, all at price 0, so at least m start there.  Prices averaged over other groups
     * (a router's) put almost every expert above 0, and the slack node would otherwise raise
     * the others past them one path at a time */
    int64_t cap_max = 1, m = 1;
    for (int64_t e = 0; e < c->E; e++) cap_max = c->cap[e] > cap_max ? c->cap[e] : cap_max;
    if (capacity > units) m = (capacity - units + cap_max - 1) / cap_max;
    double *sorted = malloc(sizeof(double) * (size_t)c->E);
    if (!sorted) {
        c->oom = 1;
        goto out;
    }
    memcpy(sorted, c->p, sizeof(double) * (size_t)c->E);
    double floor_price = select_desc(sorted, c->E, c->E - (m < c->E ? m : c->E));
    free(sorted);
    if (floor_price > 0 || !assigned) { /* the quantile start leaves its least price at 0, assigned */
        for (int64_t e = 0; e < c->E; e++) c->p[e] = c->p[e] > floor_price ? c->p[e] - floor_price : 0.0;
        /* the sample is completed once its excess nears its own noise (coarse_until) */
        ok = assign_topk(c, 1, sample, bad, nbad_max, nbad);
    }
    c->start_misfit = total_excess(c) + priced_deficit(c);
    if (!ok || c->start_only) goto out;
    /* the steps run while the excess is above 1/64 of the units, and stop sooner once one
     * no longer pays (price_phase); small problems (under 2^16 scores) that start at prices 0
     * (the quantile start went back to them) stop at 1/4, where the auction is cheaper: from
     * prices 0 it only raises prices below the optimum.  Other starts may hold prices above
     * it, which the auction cannot lower: the others' must climb to them, one leaving price
     * at a time (groups of 256 tokens started from other groups' mean prices took 100k moves
     * per batch of 32 with the steps stopped at 1/4, 6k-44k with them going on to 1/64; a
     * cold (512, 16, 2) took 2x longer so) */
    int warm = 0;
    for (int64_t e = 0; e < c->E; e++) warm |= c->p[e] > 0;
    int64_t enough = big || warm ? units / 64 : units / 4;
    if (ok) ok = price_phase(c, price_iters, alpha, enough > 1 ? enough : 1, units, capacity, bad, nbad_max, nbad);
out:
    free(c->kth);
    c->kth = NULL;
    return ok;
}

/*
 * After an auction that proved slow: price steps from its prices (every token re-takes its
 * top-k of s - p first) down to the big problems' excess, then the holder heaps again.
 */
static int reprice(Ctx *c, int64_t price_iters, double alpha, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    int64_t units, capacity;
    totals(c, &units, &capacity);
    c->kth = malloc(sizeof(double) * (size_t)(c->N + 1));
    if (!c->kth) return c->oom = 1, 1;
    int ok = assign_topk(c, 0, 0, bad, nbad_max, nbad);
    if (ok) ok = price_phase(c, price_iters, alpha, units / 64, units, capacity, bad, nbad_max, nbad);
    free(c->kth);
    c->kth = NULL;
    if (ok) build_heaps(c);
    return ok;
}

/* valid tokens holding an expert of the closed set the failed search settled */
static int64_t report_stuck(const Ctx *c, const Dijk *w, int64_t *bad, int64_t nbad_max) {
    int64_t nb = 0;
    for (int64_t t = 0; t < c->N; t++)
        for (int64_t j = 0; j < c->k; j++) {
            int64_t e = c->experts[t * c->k + j];
            if (e >= 0 && w->settled[e]) {
                note_bad(t, bad, nbad_max, &nb);
                break;
            }
        }
    return nb;
}

/* repair mode: load a given assignment; empty slots take the token's best allowed expert */
static int load_assignment(Ctx *c, int64_t *bad, int64_t nbad_max, int64_t *nbad) {
    *nbad = 0;
    memset(c->loads, 0, sizeof(int64_t) * (size_t)c->E);
    memset(c->held, 0, (size_t)(c->N * c->E));
    for (int64_t t = 0; t < c->N; t++) {
        int64_t *row = c->experts + t * c->k;
        c->best[t] = -INFINITY;
        c->barg[t] = -1;
        if (!is_valid(c, t)) {
            for (int64_t j = 0; j < c->k; j++) row[j] = -1;
            continue;
        }
        for (int64_t j = 0; j < c->k; j++)
            if (row[j] >= 0) {
                c->held[t * c->E + row[j]] = 1;
                c->loads[row[j]]++;
            }
        for (int64_t j = 0; j < c->k; j++) {
            if (row[j] >= 0) continue;
            refresh_best(c, t);
            if (c->barg[t] < 0) {
                note_bad(t, bad, nbad_max, nbad);
                break;
            }
            row[j] = c->barg[t];
            c->held[t * c->E + row[j]] = 1;
            c->loads[row[j]]++;
        }
        refresh_best(c, t);
    }
    return *nbad == 0;
}

/* the solver's statistics: score, gap, raises, augmentations, moves, ms of the four phases,
 * whether the auction handed back to the price steps, and the starting assignment's misfit */
#define STATS 11

static int solve(Ctx *c, int mode, int64_t max_moves, int64_t price_iters, double alpha, int threads, int64_t *bad, int64_t nbad_max, int64_t *nbad,
                 double *stats) {
    const int64_t N = c->N, E = c->E, k = c->k;
    int status = ST_OK;
    int64_t raises = 0, augs = 0, ns = 0;
    int repriced = 0;
    Dijk w;
    memset(&w, 0, sizeof w);
    c->held = calloc((size_t)(N * E) + 1, 1);
    c->best = malloc(sizeof(double) * (size_t)(N + 1));
    c->barg = malloc(sizeof(int32_t) * (size_t)(N + 1));
    c->ver = calloc((size_t)(N * k + 1), sizeof(int32_t));
    c->repair_mode = mode == 1;
    c->threads = threads;
    c->scale = 1;
    c->heaps = calloc((size_t)E, sizeof(Heap));
    w.d = malloc(sizeof(double) * (size_t)(E + 1)); /* node E: the slack node */
    w.ev = malloc(sizeof(double) * (size_t)E);
    w.predx = malloc(sizeof(int32_t) * (size_t)(E + 1));
    w.predt = malloc(sizeof(int32_t) * (size_t)E);
    w.order = malloc(sizeof(int32_t) * (size_t)(E + 1));
    w.settled = malloc((size_t)(E + 1));
    if (!c->held || !c->best || !c->barg || !c->ver || !c->heaps || !w.d || !w.ev || !w.predx || !w.predt ||
        !w.order || !w.settled) {
        status = ST_NO_MEMORY;
        goto done;
    }
    double t0 = now_ms();
    int ok = (mode == 0) ? prepare(c, price_iters, alpha, bad, nbad_max, nbad) : load_assignment(c, bad, nbad_max, nbad);
    if (!ok) {
        status = ST_TOO_FEW_ALLOWED;
        goto done;
    }
    if (c->start_only) {
        status = c->oom ? ST_NO_MEMORY : ST_OK;
        goto done;
    }
    build_heaps(c);
    double t1 = now_ms();
    if (mode == 0) {
        /* the hand-back pays where an auction's moves cost milliseconds; small problems (whose
         * routings stay as they were) finish their auction in microseconds either way */
        int may_reprice = price_iters > 0 && N * E >= ((int64_t)1 << 15);
        int war = 0;
        raises = run_auction(c, max_moves, may_reprice ? &repriced : NULL, &war, WAR_MOVES, WAR_BUDGET);
        if (repriced) { /* back to the price steps, then the auction again */
            if (!reprice(c, price_iters, alpha, bad, nbad_max, nbad)) {
                status = ST_TOO_FEW_ALLOWED;
                goto done;
            }
            raises += run_auction(c, max_moves, NULL, &war, WAR_MOVES, WAR_BUDGET);
        }
        /* a price war: eps-scaling from here, then the exact auction once more; a war over a
         * few units is the repair's (see WAR_REPAIR) */
        if (war && total_excess(c) * c->E > WAR_REPAIR * c->N) {
            raises += scaled_auction(c, max_moves, bad, nbad_max, nbad);
            int again = 0; /* a war left: the repair's */
            raises += run_auction(c, c->moves + max_moves, NULL, &again, c->E, 0);
        }
    }
    double t2 = now_ms();
    if (mode == 0 && !place_slack(c)) {
        status = ST_NO_MEMORY;
        goto done;
    }
    for (;;) {
        int over = c->unplaced > 0;
        for (int64_t e = 0; e < E; e++) over |= held_units(c, e) > c->cap[e];
        if (!over || c->oom) break;
        if (!augment(c, &w, mode == 0, &ns)) {
            if (c->oom) break;
            *nbad = report_stuck(c, &w, bad, nbad_max);
            for (int64_t e = 0; e < E; e++) bad[nbad_max + e] = w.settled[e];
            status = ST_INFEASIBLE;
            goto done;
        }
        augs++;
    }
    if (c->oom) {
        status = ST_NO_MEMORY;
        goto done;
    }
    double t3 = now_ms();
    stats[5] = t1 - t0;
    stats[6] = t2 - t1;
    stats[7] = t3 - t2;
    double score = 0.0;
    for (int64_t t = 0; t < N; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t e = c->experts[t * k + j];
            if (e >= 0) score += S(c, t, e);
        }
    stats[0] = score;
    stats[1] = NAN;
    if (mode == 0) {
        /* prices relative to Z's (slack capacity), where every expert below capacity holds Z's
         * units; else to the least (every expert full: a common shift changes nothing) */
        double base = INFINITY;
        for (int64_t e = 0; e < E; e++) base = fmin(base, c->p[e]);
        if (c->dummy) base = c->pz;
        for (int64_t e = 0; e < E; e++)
            c->p[e] = (c->dummy && c->dummy[e] > 0) || c->p[e] < base ? 0.0 : c->p[e] - base;
        double dual = dual_token_part(c);
        for (int64_t e = 0; e < E; e++) dual += (double)c->cap[e] * c->p[e];
        stats[1] = dual - score;
    }
    stats[8] = now_ms() - t3;
done:
    stats[2] = (double)raises;
    stats[3] = (double)augs;
    stats[4] = (double)c->moves;
    stats[9] = (double)repriced;
    stats[10] = (double)c->start_misfit;
    if (c->heaps)
        for (int64_t e = 0; e < E; e++) free(c->heaps[e].a);
    free(c->heaps);
    free(c->dummy);
    free(c->held);
    free(c->best);
    free(c->barg);
    free(c->ver);
    free(w.d);
    free(w.ev);
    free(w.predx);
    free(w.predt);
    free(w.order);
    free(w.settled);
    free(w.popped);
    free(w.popped_from);
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
 * solve(scores, is_double, N, E, k, valid|None, cap, prices, experts, loads, bad, mode, max_moves,
 *       price_iters, alpha, threads)
 *   -> (status, nbad, score, gap, raises, augmentations, moves,
 *       (ms prepare, ms auction, ms repair, ms certificate))
 * bad: int64 buffer of length >= nbad_max + E; nbad_max = len(bad) - E.
 */
static PyObject *py_solve(PyObject *self, PyObject *args) {
    PyObject *o_s, *o_valid, *o_cap, *o_p, *o_x, *o_l, *o_bad;
    int is_double, mode;
    long long N, E, k, max_moves, price_iters;
    double alpha;
    int threads;
    if (!PyArg_ParseTuple(args, "OpLLLOOOOOOiLLdi", &o_s, &is_double, &N, &E, &k, &o_valid, &o_cap, &o_p, &o_x, &o_l,
                          &o_bad, &mode, &max_moves, &price_iters, &alpha, &threads))
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
    double stats[STATS] = {0};
    int status;
    Py_BEGIN_ALLOW_THREADS status = solve(&c, mode, max_moves, price_iters, alpha, threads, bb.buf, nbad_max, &nbad, stats);
    Py_END_ALLOW_THREADS PyBuffer_Release(&bb);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bp);
    PyBuffer_Release(&bc);
    if (have_valid) PyBuffer_Release(&bv);
    PyBuffer_Release(&bs);
    if (status == ST_NO_MEMORY) return PyErr_NoMemory();
    return Py_BuildValue("iLddLLLi(dddd)", status, (long long)nbad, stats[0], stats[1], (long long)stats[2],
                         (long long)stats[3], (long long)stats[4], (int)stats[9], stats[5], stats[6], stats[7],
                         stats[8]);
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

/* G independent groups of one shape: each solved single-threaded, groups spread over threads */
typedef struct {
    const char *scores;
    int is_double;
    int64_t G, N, E, k, nbad_max, max_moves, price_iters;
    int64_t *next, end; /* the next unclaimed group, shared by the threads, and the wave's end */
    const uint8_t *valid;
    const int64_t *cap;
    double *p, alpha, *stats;
    int64_t *experts, *loads, *bad, *nbad;
    int32_t *status;
    int mode;
} Batch;

/* the next group to solve: threads claim groups one at a time, so uneven groups balance */
static int64_t claim_group(Batch *b) {
#ifdef HAVE_THREADS
    return __atomic_fetch_add(b->next, 1, __ATOMIC_RELAXED);
#else
    return (*b->next)++;
#endif
}

/* group g's problem, writing into its own prices, routing and loads */
static void group_ctx(const Batch *b, int64_t g, Ctx *c) {
    const size_t item = b->is_double ? sizeof(double) : sizeof(float);
    memset(c, 0, sizeof *c);
    c->N = b->N;
    c->E = b->E;
    c->k = b->k;
    const void *s = b->scores + (size_t)(g * b->N * b->E) * item;
    if (b->is_double)
        c->s64 = s;
    else
        c->s32 = s;
    c->valid = b->valid ? b->valid + g * b->N : NULL;
    c->cap = b->cap + g * b->E;
    c->p = b->p + g * b->E;
    c->experts = b->experts + g * b->N * b->k;
    c->loads = b->loads + g * b->E;
}

static void solve_batch_range(Batch *b) {
    for (int64_t g = claim_group(b); g < b->end; g = claim_group(b)) {
        Ctx c;
        group_ctx(b, g, &c);
        b->nbad[g] = 0;
        b->status[g] = solve(&c, b->mode, b->max_moves, b->price_iters, b->alpha, 1,
                             b->bad + g * (b->nbad_max + b->E), b->nbad_max, &b->nbad[g], b->stats + STATS * g);
    }
}

static void *solve_batch_thread(void *arg) {
    solve_batch_range(arg);
    return NULL;
}

/* solves groups first..last-1 on up to `threads` threads */
static void run_wave(Batch *b, int64_t first, int64_t last, int64_t threads) {
    int64_t next = first, n = threads < last - first ? threads : last - first;
    b->next = &next;
    b->end = last;
#ifdef HAVE_THREADS
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < n; i++) started[i] = pthread_create(&tid[i], NULL, solve_batch_thread, b) == 0;
    solve_batch_range(b); /* claims whatever a thread that failed to start leaves */
    for (int64_t i = 1; i < n; i++)
        if (started[i]) pthread_join(tid[i], NULL);
#else
    (void)n;
    solve_batch_range(b);
#endif
}

/*
 * Lead groups.  A router warm-starts every group of a batch from one price vector, the last
 * batch's mean optimal prices.  Early in training the router moves faster than that follows:
 * captured at E = 96, k = 8, groups of 128 (steps 10-30 of the tiny preset), those prices
 * left each group an excess of 400-590 units of 1024, where this batch's own mean optimal
 * prices left 140-215 and halved the solve.  So with one shared start the first LEAD_GROUPS
 * groups are solved from it, and the others start from the mean of the leads' optimal prices
 * when that start fits the leads better: the leads' starting excess at the other leads' mean
 * prices (one pass each), summed, against their excess at the shared start.  Later in
 * training, and with prices averaged over a whole previous batch of the same distribution,
 * the shared start wins (one lead's prices carry its own sampling noise) and nothing changes.
 * Cold batches (no start) compare against each lead's quantile start.  The leads are fixed
 * groups, so the routing does not depend on the threads.  Returns whether the start changed.
 */
#define LEAD_GROUPS 2

/* the misfit of group g's starting assignment from prices q (a start-only solve into scratch),
 * -1 if it fails */
static int64_t excess_from(const Batch *b, int64_t g, const double *q, double *p, int64_t *experts, int64_t *loads,
                           int64_t *bad) {
    Ctx c;
    group_ctx(b, g, &c);
    memcpy(p, q, sizeof(double) * (size_t)b->E);
    c.p = p;
    c.experts = experts;
    c.loads = loads;
    c.start_only = 1;
    double stats[STATS] = {0};
    int64_t nbad = 0;
    int status = solve(&c, b->mode, b->max_moves, b->price_iters, b->alpha, 1, bad, b->nbad_max, &nbad, stats);
    return status == ST_OK ? c.start_misfit : -1;
}

static int lead_start(Batch *b) {
    const int64_t L = LEAD_GROUPS, E = b->E;
    for (int64_t g = 0; g < L; g++)
        if (b->status[g] != ST_OK) return 0;
    double *q = malloc(sizeof(double) * (size_t)(2 * E + 1));
    int64_t *scratch = malloc(sizeof(int64_t) * (size_t)(b->N * b->k + E + b->nbad_max + E + 1));
    int64_t own = 0, cross = 0, better = q && scratch;
    for (int64_t g = 0; g < L && better; g++) {
        own += (int64_t)b->stats[STATS * g + 10];
        for (int64_t e = 0; e < E; e++) {
            double sum = 0;
            for (int64_t h = 0; h < L; h++) sum += h == g ? 0 : b->p[h * E + e];
            q[e] = sum / (double)(L - 1);
        }
        int64_t x = excess_from(b, g, q, q + E, scratch, scratch + b->N * b->k, scratch + b->N * b->k + E);
        if (x < 0) better = 0;
        cross += x;
    }
    better = better && cross < own;
    if (better) {
        for (int64_t e = 0; e < E; e++) {
            double sum = 0;
            for (int64_t h = 0; h < L; h++) sum += b->p[h * E + e];
            q[e] = sum / (double)L;
        }
        for (int64_t g = L; g < b->G; g++) memcpy(b->p + g * E, q, sizeof(double) * (size_t)E);
    }
    free(q);
    free(scratch);
    return (int)better;
}

/*
 * solve_batch(scores, is_double, G, N, E, k, valid|None, cap, prices, experts, loads, bad, status,
 *             nbad, stats, mode, max_moves, price_iters, alpha, threads) -> bool
 * Per group g: scores [G,N,E], valid [G,N] (uint8), cap/prices/loads [G,E], experts [G,N,k],
 * bad [G, nbad_max + E] (as in solve), status int32 [G], nbad int64 [G], stats float64 [G, STATS]
 * (score, gap, raises, augmentations, moves, ms prepare, auction, repair, certificate, repriced,
 * start misfit).  The groups are spread over `threads` threads with the GIL released.
 * Returns whether the groups after the leads started from the leads' prices (lead_start).
 */
static PyObject *py_solve_batch(PyObject *self, PyObject *args) {
    PyObject *o[10];
    int is_double, mode, threads;
    long long G, N, E, k, max_moves, price_iters;
    double alpha;
    if (!PyArg_ParseTuple(args, "OpLLLLOOOOOOOOOiLLdi", &o[0], &is_double, &G, &N, &E, &k, &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &o[7], &o[8], &o[9], &mode, &max_moves, &price_iters, &alpha,
                          &threads))
        return NULL;
    if (G < 1 || N < 0 || E < 1 || k < 1 || k > E) {
        PyErr_SetString(PyExc_ValueError, "_core: bad sizes");
        return NULL;
    }
    const Py_ssize_t need[10] = {(Py_ssize_t)(G * N * E * (is_double ? 8 : 4)), (Py_ssize_t)(G * N),
                                 (Py_ssize_t)(G * E * 8), (Py_ssize_t)(G * E * 8), (Py_ssize_t)(G * N * k * 8),
                                 (Py_ssize_t)(G * E * 8), (Py_ssize_t)(G * (E + 1) * 8), (Py_ssize_t)(G * 4),
                                 (Py_ssize_t)(G * 8), (Py_ssize_t)(G * STATS * 8)};
    const int writable[10] = {0, 0, 0, 1, 1, 1, 1, 1, 1, 1};
    const char *names[10] = {"scores", "valid", "cap", "prices", "experts", "loads", "bad", "status", "nbad", "stats"};
    Py_buffer b[10];
    int got = 0, oom = 0, led = 0;
    for (; got < 10; got++) {
        if (got == 1 && o[1] == Py_None) continue;
        if (get_buf(o[got], &b[got], writable[got], need[got], names[got]) < 0) break;
    }
    if (got == 10) {
        Batch batch = {
            .scores = b[0].buf, .is_double = is_double, .G = G, .N = N, .E = E, .k = k,
            .nbad_max = (int64_t)(b[6].len / 8 / G) - E, .max_moves = max_moves, .price_iters = price_iters,
            .valid = o[1] == Py_None ? NULL : b[1].buf, .cap = b[2].buf, .p = b[3].buf, .alpha = alpha,
            .stats = b[9].buf, .experts = b[4].buf, .loads = b[5].buf, .bad = b[6].buf, .nbad = b[8].buf,
            .status = b[7].buf, .mode = mode,
        };
        int64_t n = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
        /* one start shared by every group (see lead_start) */
        int shared = mode == 0 && G > LEAD_GROUPS;
        const double *p = b[3].buf;
        for (int64_t g = 1; g < G && shared; g++) shared = memcmp(p, p + g * E, sizeof(double) * (size_t)E) == 0;
        Py_BEGIN_ALLOW_THREADS
        if (shared) {
            run_wave(&batch, 0, LEAD_GROUPS, n);
            led = lead_start(&batch);
            run_wave(&batch, LEAD_GROUPS, G, n);
        } else
            run_wave(&batch, 0, G, n);
        Py_END_ALLOW_THREADS
        for (int64_t g = 0; g < G; g++) oom |= ((int32_t *)b[7].buf)[g] == ST_NO_MEMORY;
    }
    for (int i = 0; i < got; i++)
        if (!(i == 1 && o[1] == Py_None)) PyBuffer_Release(&b[i]);
    if (got < 10) return NULL;
    if (oom) return PyErr_NoMemory();
    return PyBool_FromLong(led);
}

/*
 * price_step(scores, is_double, N, E, k, valid|None, cap, prices, alpha) -> status
 * One damped best-response step over every token (no sample), prices updated in place: every
 * valid token takes its top-k of s - p, then price_step as in phase 1 (floored at 0 with slack
 * capacity).  For testing the step against the reference definition (prices.py).
 */
static PyObject *py_price_step(PyObject *self, PyObject *args) {
    PyObject *o_s, *o_valid, *o_cap, *o_p;
    int is_double;
    long long N, E, k;
    double alpha;
    if (!PyArg_ParseTuple(args, "OpLLLOOOd", &o_s, &is_double, &N, &E, &k, &o_valid, &o_cap, &o_p, &alpha))
        return NULL;
    if (N < 0 || E < 1 || k < 1 || k > E) {
        PyErr_SetString(PyExc_ValueError, "_core: bad sizes");
        return NULL;
    }
    Py_buffer bs, bv, bc, bp;
    int have_valid = o_valid != Py_None;
    if (get_buf(o_s, &bs, 0, (Py_ssize_t)(N * E * (is_double ? 8 : 4)), "scores") < 0) return NULL;
    if (have_valid && get_buf(o_valid, &bv, 0, (Py_ssize_t)N, "valid") < 0) goto fail_s;
    if (get_buf(o_cap, &bc, 0, (Py_ssize_t)(E * 8), "cap") < 0) goto fail_v;
    if (get_buf(o_p, &bp, 1, (Py_ssize_t)(E * 8), "prices") < 0) goto fail_c;
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
    c.threads = 1;
    c.scale = 1;
    int64_t units, capacity, nbad = 0, bad[1];
    totals(&c, &units, &capacity);
    c.experts = malloc(sizeof(int64_t) * (size_t)(N * k + 1));
    c.loads = calloc((size_t)E, sizeof(int64_t));
    c.held = calloc((size_t)(N * E) + 1, 1);
    c.best = malloc(sizeof(double) * (size_t)(N + 1));
    c.barg = malloc(sizeof(int32_t) * (size_t)(N + 1));
    c.kth = malloc(sizeof(double) * (size_t)(N + 1));
    double *buf = malloc(sizeof(double) * (size_t)(capacity + units + 9 * E + 1));
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(3 * E));
    int status = ST_NO_MEMORY;
    if (c.experts && c.loads && c.held && c.best && c.barg && c.kth && buf && off) {
        status = assign_topk(&c, 1, 0, bad, 0, &nbad) ? ST_OK : ST_TOO_FEW_ALLOWED;
        if (status == ST_OK) price_step(&c, alpha, alpha, capacity > units, 1, buf, off, off + E, off + 2 * E);
        if (c.oom) status = ST_NO_MEMORY;
    }
    free(c.experts);
    free(c.loads);
    free(c.held);
    free(c.best);
    free(c.barg);
    free(c.kth);
    free(buf);
    free(off);
    PyBuffer_Release(&bp);
    PyBuffer_Release(&bc);
    if (have_valid) PyBuffer_Release(&bv);
    PyBuffer_Release(&bs);
    if (status == ST_NO_MEMORY) return PyErr_NoMemory();
    return Py_BuildValue("i", status);
fail_c:
    PyBuffer_Release(&bc);
fail_v:
    if (have_valid) PyBuffer_Release(&bv);
fail_s:
    PyBuffer_Release(&bs);
    return NULL;
}

/*
 * scan(scores, is_double, N, E, k, valid|None) -> (n_bad, first_bad, n_short, first_short, n_forbidden)
 * One pass over the valid rows: NaN/+inf entries (bad), rows with fewer than k entries > -inf
 * (short), and the number of -inf entries.
 */
static PyObject *py_scan(PyObject *self, PyObject *args) {
    PyObject *o_s, *o_valid;
    int is_double;
    long long N, E, k;
    if (!PyArg_ParseTuple(args, "OpLLLO", &o_s, &is_double, &N, &E, &k, &o_valid)) return NULL;
    Py_buffer bs, bv;
    int have_valid = o_valid != Py_None;
    if (get_buf(o_s, &bs, 0, (Py_ssize_t)(N * E * (is_double ? 8 : 4)), "scores") < 0) return NULL;
    if (have_valid && get_buf(o_valid, &bv, 0, (Py_ssize_t)N, "valid") < 0) {
        PyBuffer_Release(&bs);
        return NULL;
    }
    const uint8_t *valid = have_valid ? bv.buf : NULL;
    long long nbad = 0, first_bad = -1, nshort = 0, first_short = -1, nforbid = 0;
    Py_BEGIN_ALLOW_THREADS for (int64_t t = 0; t < N; t++) {
        if (valid && !valid[t]) continue;
        int64_t bad = 0, forbid = 0;
        if (is_double) {
            const double *r = (const double *)bs.buf + t * E;
            for (int64_t e = 0; e < E; e++) {
                bad += (r[e] != r[e]) | (r[e] == INFINITY);
                forbid += r[e] == -INFINITY;
            }
        } else {
            const float *r = (const float *)bs.buf + t * E;
            for (int64_t e = 0; e < E; e++) {
                bad += (r[e] != r[e]) | (r[e] == INFINITY);
                forbid += r[e] == -INFINITY;
            }
        }
        if (bad && nbad++ == 0) first_bad = t;
        if (E - forbid - bad < k && nshort++ == 0) first_short = t;
        nforbid += forbid;
    }
    Py_END_ALLOW_THREADS if (have_valid) PyBuffer_Release(&bv);
    PyBuffer_Release(&bs);
    return Py_BuildValue("LLLLL", nbad, first_bad, nshort, first_short, nforbid);
}

/*
 * r-th and (r-1)-th largest (0-based; the same when r = 0) of c[0..n-1], n > r, as doubles,
 * using tmp (n doubles).  Floyd-Rivest: the ranks around r in an evenly spaced sample of
 * SAMPLE values bracket it; one branch-free pass counts the values above the bracket and
 * gathers those inside, and a selection among those finishes (the whole column when the
 * bracket misses).  Quickselect and heaps over the column cost more in mispredicted branches
 * than in comparisons (4 ms where this takes 0.5 at 2048 x 96).
 */
#define SAMPLE 64
static void column_ranks(const float *c, int64_t n, int64_t r, double *tmp, double *at, double *before) {
    if (n > 4 * SAMPLE && r > 0) {
        double sample[SAMPLE];
        for (int64_t j = 0; j < SAMPLE; j++) sample[j] = (double)c[j * n / SAMPLE];
        int64_t rs = r * SAMPLE / n;
        double hi = select_desc(sample, SAMPLE, rs > 6 ? rs - 6 : 0);
        double lo = select_desc(sample, SAMPLE, rs + 6 < SAMPLE - 1 ? rs + 6 : SAMPLE - 1);
        int64_t above = 0, m = 0;
        for (int64_t i = 0; i < n; i++) {
            double x = (double)c[i];
            tmp[m] = x;
            m += (x >= lo) & (x <= hi);
            above += x > hi;
        }
        if (above <= r - 1 && above + m > r) { /* both ranks inside the bracket */
            *at = select_desc_pair(tmp, m, r - above, before);
            return;
        }
    }
    for (int64_t i = 0; i < n; i++) tmp[i] = (double)c[i];
    *at = select_desc_pair(tmp, n, r, before);
}

/*
 * causal_targets(values, offset, T, E, k, valid|None, midpoint, out) -> bool
 * maxscore.routers.maxscore.causal_targets on the host: values float32 [T,E], offset and out
 * float32 [E], valid uint8 [T], 0 < k < E.  Per valid token, its k-th and (k+1)-th largest
 * adjusted values (values - offset); its margin for expert e is values - (the (k+1)-th where
 * the adjusted value is at least the k-th, else the k-th); per expert, the C-th largest margin
 * (0-based, C = ceil(count k / E), at most count - 1), or with `midpoint` the mean of it and
 * the one before.  The same float32 operations as the torch code, so the same values: one pass
 * over the rows (margins stored expert-major, ROW_BLOCK rows at a time) and column_ranks per
 * expert, instead of a top-k over each column (3-4 ms of 2 cores per router call at 2048 x 96,
 * k = 8).  Returns False, out untouched, when a value or offset is not finite or no token is
 * valid: the caller takes the torch path.
 */
#define ROW_BLOCK 16
static PyObject *py_causal_targets(PyObject *self, PyObject *args) {
    PyObject *o_v, *o_off, *o_valid, *o_out;
    long long T, E, k;
    int midpoint;
    if (!PyArg_ParseTuple(args, "OOLLLOpO", &o_v, &o_off, &T, &E, &k, &o_valid, &midpoint, &o_out)) return NULL;
    if (T < 1 || E < 2 || k < 1 || k >= E) {
        PyErr_SetString(PyExc_ValueError, "_core: bad sizes");
        return NULL;
    }
    Py_buffer bv, bo, bvalid, bout;
    int have_valid = o_valid != Py_None, ok = 0;
    if (get_buf(o_v, &bv, 0, (Py_ssize_t)(T * E * 4), "values") < 0) return NULL;
    if (get_buf(o_off, &bo, 0, (Py_ssize_t)(E * 4), "offset") < 0) goto fail_v;
    if (have_valid && get_buf(o_valid, &bvalid, 0, (Py_ssize_t)T, "valid") < 0) goto fail_o;
    if (get_buf(o_out, &bout, 1, (Py_ssize_t)(E * 4), "out") < 0) goto fail_valid;
    const float *v = bv.buf, *off = bo.buf;
    const uint8_t *valid = have_valid ? bvalid.buf : NULL;
    float *out = bout.buf;
    float *col = malloc(sizeof(float) * (size_t)(T * E + ROW_BLOCK * E + 2 * E + k + 1)); /* expert-major */
    double *tmp = malloc(sizeof(double) * (size_t)(T + 1));
    if (!col || !tmp) {
        free(col);
        free(tmp);
        PyBuffer_Release(&bout);
        if (have_valid) PyBuffer_Release(&bvalid);
        PyBuffer_Release(&bo);
        PyBuffer_Release(&bv);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    float *block = col + T * E, *cand = block + ROW_BLOCK * E, *top = cand + 2 * E; /* block: margins of up to ROW_BLOCK rows */
    int64_t count = 0, filled = 0;
    int finite = 1;
    for (int64_t e = 0; e < E; e++) finite &= isfinite(off[e]) != 0;
    for (int64_t t = 0; t <= T && finite; t++) {
        if (filled == ROW_BLOCK || (t == T && filled > 0)) { /* rows count - filled .. count - 1 */
            for (int64_t e = 0; e < E; e++)
                for (int64_t i = 0; i < filled; i++) col[e * T + count - filled + i] = block[i * E + e];
            filled = 0;
        }
        if (t == T) break;
        if (valid && !valid[t]) continue;
        const float *row = v + t * E;
        /* the adjusted row in cand[0..E-1]; with E >= 4 (k + 1), only the values at least the
         * least maximum of k + 1 disjoint blocks (a bound on the (k+1)-th) are then inserted
         * into top[0..m-1] (the largest, descending, with repeats), gathered branch-free */
        const int64_t kk = k + 1;
        float low = -INFINITY;
        for (int64_t e = 0; e < E; e++) {
            cand[e] = row[e] - off[e];
            finite &= isfinite(row[e]) != 0;
        }
        if (E >= 4 * kk) {
            low = INFINITY;
            for (int64_t j = 0; j < kk; j++) {
                float mx = -INFINITY;
                for (int64_t e = E * j / kk; e < E * (j + 1) / kk; e++) mx = cand[e] > mx ? cand[e] : mx;
                low = mx < low ? mx : low;
            }
        }
        int64_t n = 0, m = 0;
        for (int64_t e = 0; e < E; e++) {
            cand[E + n] = cand[e];
            n += cand[e] >= low;
        }
        for (int64_t j = 0; j < n; j++) {
            float a = cand[E + j];
            if (m == kk && !(a > top[k])) continue;
            int64_t i = m < kk ? m++ : k;
            while (i > 0 && a > top[i - 1]) {
                top[i] = top[i - 1];
                i--;
            }
            top[i] = a;
        }
        const float kth = top[k - 1], next = top[k];
        float *b = block + filled * E;
        for (int64_t e = 0; e < E; e++) b[e] = row[e] - (cand[e] >= kth ? next : kth);
        filled++;
        count++;
    }
    if (finite && count > 0) {
        int64_t capacity = (count * k + E - 1) / E, index = capacity < count - 1 ? capacity : count - 1;
        for (int64_t e = 0; e < E; e++) {
            double at, before;
            column_ranks(col + e * T, count, index, tmp, &at, &before);
            float below = (float)at, above = (float)before;
            out[e] = midpoint ? (below + above) / 2.0f : below;
        }
        ok = 1;
    }
    Py_END_ALLOW_THREADS
    free(col);
    free(tmp);
    PyBuffer_Release(&bout);
fail_valid:
    if (have_valid) PyBuffer_Release(&bvalid);
fail_o:
    PyBuffer_Release(&bo);
fail_v:
    PyBuffer_Release(&bv);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"solve", py_solve, METH_VARARGS, "Capacity-constrained top-k assignment (see the module source)."},
    {"solve_batch", py_solve_batch, METH_VARARGS, "G independent problems of one shape, over threads."},
    {"scan", py_scan, METH_VARARGS, "Counts NaN/+inf entries, short rows and forbidden pairs."},
    {"price_step", py_price_step, METH_VARARGS, "One damped best-response price step over every token."},
    {"causal_targets", py_causal_targets, METH_VARARGS, "Per expert, the causal routing's balancing offset."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_core", "Compiled assignment core.", -1, methods};

PyMODINIT_FUNC PyInit__core(void) { return PyModule_Create(&module); }
