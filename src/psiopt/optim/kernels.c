/* psiopt's fused per-row CPU kernels (built and called by kernels.py).
 *
 * A rule is two passes over a row: `pre` takes every per-row sum the step needs (updating a
 * buffer on the way where the rule does), `coef` turns the sums and the row's state into the
 * update's coefficients (scalars needed after the step are derived from sums taken before it:
 * ||a w + b g||^2 = a^2 <w,w> + 2ab <w,g> + b^2 <g,g>), `post` applies the update.  A row that
 * fits in cache is read once from memory; the rows of all tensors are split among the threads
 * by their number of entries, and a row too large for the cache is split among all threads.
 * Each rule's `pre`, `coef` and `post` are generated in C from its one definition (rowrules.py,
 * by c_rows.py) and compiled after this file.  The whole is compiled twice into one library, with REAL = float (names ending _f32) and
 * REAL = double (_f64).  Sums are taken in REAL over chunks of a row and the chunks added in
 * double; coefficients are in double; updates are computed in REAL, as torch's are.  A row is
 * `cols[t]` contiguous entries of tensor t; per-row state (s1, s2) holds one scalar per row.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP: one thread */
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

#ifndef REAL
#define REAL double
#define NAME(x) x##_f64
#define TINY DBL_MIN
#endif

/* Per-call arguments: per-tensor pointer arrays (NULL when the rule takes no such tensor). */
typedef struct {
  REAL **w, **g, **b;     /* weights, gradients, a full-size buffer (momentum, exp_avg) */
  REAL **s1, **s2;        /* one state scalar per row (r0, live, v, r4) */
  const double *k;        /* per-tensor scalars, `kstride` per tensor */
  const int64_t *rows, *cols;
  int64_t kstride;
  double h[6];            /* hyperparameters */
} Args;

enum { GRAIN = 32768,       /* fewer entries than this: one thread (torch's grain size) */
       BIG = 65536,         /* rows of more entries than this are split among the threads */
       CHUNK = 256,         /* entries summed in REAL before the sum is added in double */
       NSUM = 6, NCOEF = 8,
       MAXT = 256 };        /* threads at most */

typedef struct {
  /* sums over entries [lo, hi) of row r of tensor t added to s[0..NSUM) (buffer updates done
   * here) */
  void (*pre)(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s);
  /* coefficients c[0..NCOEF) from the row's sums; writes the row's state: once per row */
  void (*coef)(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c);
  /* the update of entries [lo, hi) */
  void (*post)(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c);
  int pipelined; /* the next row's sums taken with this row's update (see row_range) */
} Rule;

static inline double safe_inv(double x) { return x > 0 ? 1.0 / fmax(x, TINY) : 0.0; }

/* First row of n rows of d entries that starts at or after entry x of the tensor. */
static inline int64_t first_row(int64_t x, int64_t d, int64_t n) {
  if (x <= 0) return 0;
  int64_t r = (x + d - 1) / d;
  return r < n ? r : n;
}

/* The sums of entries [lo, hi) of row r into s: each CHUNK entries summed in REAL (the
 * tensor's precision, as torch's sums; float sums run at twice double's vector width: SGD-MRT
 * on vgg16-bn's weights 7.0 ms -> 6.0) and the chunks' sums added in double. */
static void sums(const Rule *rule, const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  double local[NSUM] = {0};  /* not s: the threads' partial sums of a big row share a cache line */
  for (; lo < hi; lo += CHUNK) rule->pre(a, t, r, lo, lo + CHUNK < hi ? lo + CHUNK : hi, local);
  for (int j = 0; j < NSUM; j++) s[j] = local[j];
}

/* Rows [r0, r1) of tensor t: each row's sums, coefficients and update.  A rule whose sums
 * read w alone (PSI) takes the next row's sums chunk by chunk between the chunks of this row's
 * update, so that their reads overlap (vgg16-bn's weights, PSI-SGDM: 6.7 ms -> 6.2); rules
 * whose sums read two or three tensors were slower so (two rows in flight do not fit in L1)
 * and take them after the update.  Either way a row's sums are added chunk by chunk, in the
 * same order whatever the number of threads. */
static void row_range(const Rule *rule, const Args *a, int t, int64_t r0, int64_t r1, int64_t d) {
  double s[NSUM], c[NCOEF];
  if (r0 < r1) sums(rule, a, t, r0, 0, d, s);
  for (int64_t r = r0; r < r1; r++) {
    double next[NSUM] = {0};
    rule->coef(a, t, r, d, s, c);
    for (int64_t lo = 0; rule->pipelined && lo < d; lo += CHUNK) {
      int64_t hi = lo + CHUNK < d ? lo + CHUNK : d;
      rule->post(a, t, r, lo, hi, c);
      if (r + 1 < r1) rule->pre(a, t, r + 1, lo, hi, next);
    }
    if (!rule->pipelined) {
      rule->post(a, t, r, 0, d, c);
      if (r + 1 < r1) sums(rule, a, t, r + 1, 0, d, next);
    }
    for (int j = 0; j < NSUM; j++) s[j] = next[j];
  }
}

static void for_rows(int nt, const Args *a, int threads, const Rule *rule) {
  int64_t small = 0, big = 0;
  for (int t = 0; t < nt; t++) {
    int64_t n = a->rows[t] * a->cols[t];
    if (a->cols[t] > BIG) big += n; else small += n;
  }
  if (small + big < GRAIN) threads = 1;
  double c[NCOEF], partial[MAXT][NSUM]; /* per-thread sums of a big row, added in thread order */
  if (threads > MAXT) threads = MAXT;
#pragma omp parallel num_threads(threads)
  {
    int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t lo = small * tid / nth, hi = small * (tid + 1) / nth, base = 0;
    for (int t = 0; t < nt; t++) { /* small rows: each thread a share of the entries */
      int64_t d = a->cols[t], n = a->rows[t];
      if (d > BIG) continue;
      row_range(rule, a, t, first_row(lo - base, d, n), first_row(hi - base, d, n), d);
      base += n * d;
    }
    for (int t = 0; t < nt && big; t++) { /* big rows: each thread a share of every row */
      int64_t d = a->cols[t];
      if (d <= BIG) continue;
      int64_t from = d * tid / nth, to = d * (tid + 1) / nth;
      for (int64_t r = 0; r < a->rows[t]; r++) {
        sums(rule, a, t, r, from, to, partial[tid]);
#pragma omp barrier
#pragma omp single
        {
          double s[NSUM] = {0};
          for (int64_t k = 0; k < nth; k++)
            for (int j = 0; j < NSUM; j++) s[j] += partial[k][j];
          rule->coef(a, t, r, d, s, c);
        }
        rule->post(a, t, r, from, to, c);
#pragma omp barrier
      }
    }
  }
}

/* the entries of row r of tensor t of a row-pointer array (a->w, a->g, a->b) */
#define SPAN(p) ((p)[t] + r * a->cols[t])

/* The rules (each one's `pre`, `coef` and `post`, and its entry point `<rule>_f32`/`_f64`) are
 * generated from their definitions in rowrules.py by c_rows.py and compiled after this text. */
