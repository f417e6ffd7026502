/* psiopt's fused per-row CPU kernels (built and called by kernels.py).
 *
 * Every rule reads a group's row once from memory: its reductions and its update run on the row
 * while it sits in cache, so a step moves no more memory than torch's SGD-momentum.  The file
 * is compiled twice into one library, with REAL = float (names ending _f32) and REAL = double
 * (_f64).  Reductions accumulate in double; updates are computed in REAL, as torch's are.
 * A row is `cols[t]` contiguous entries of tensor t; per-row state (s1, s2) holds one scalar per
 * row.  The rows of all tensors are split among the threads by their number of entries.
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

typedef void (*RowFn)(const Args *a, int t, int64_t r, int64_t d);

enum { GRAIN = 32768 };   /* fewer entries than this: one thread (torch's grain size) */

static inline double dotp(const REAL *x, const REAL *y, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; i++) s += (double)x[i] * (double)y[i];
  return s;
}

static inline double safe_inv(double x) { return x > 0 ? 1.0 / fmax(x, TINY) : 0.0; }

static inline void scale(REAL *x, double f, int64_t d) {
  const REAL F = (REAL)f;
#pragma omp simd
  for (int64_t i = 0; i < d; i++) x[i] *= F;
}

/* First row of n rows of d entries that starts at or after entry x of the tensor. */
static inline int64_t first_row(int64_t x, int64_t d, int64_t n) {
  if (x <= 0) return 0;
  int64_t r = (x + d - 1) / d;
  return r < n ? r : n;
}

static void for_rows(int nt, const Args *a, int threads, RowFn fn) {
  int64_t total = 0;
  for (int t = 0; t < nt; t++) total += a->rows[t] * a->cols[t];
  if (total < GRAIN) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth, base = 0;
    for (int t = 0; t < nt; t++) {
      int64_t d = a->cols[t], n = a->rows[t];
      int64_t end = first_row(hi - base, d, n);
      for (int64_t r = first_row(lo - base, d, n); r < end; r++) fn(a, t, r, d);
      base += n * d;
    }
  }
}

#define ROW(p) ((p)[t] + r * d)

/* PSI-SGD(M), Yi eqs. 10-11: s = r0/|w| (s1 = r0) or 1 (s1 NULL); g' = g + wd s^2 w;
 * u <- rho s u - lr s |w|^2 g' (b = u, or no velocity);  w <- s w + u.
 * h = (lr, rho, wd). */
static void psi_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g);
  double n2 = dotp(w, w, d), s = a->s1 ? a->s1[t][r] * safe_inv(sqrt(n2)) : 1.0;
  const REAL S = (REAL)s, C = (REAL)(-a->h[0] * n2 * s), L2 = (REAL)(a->h[2] * s * s);
  if (a->b) {
    REAL *u = ROW(a->b);
    const REAL A = (REAL)(a->h[1] * s);
#pragma omp simd
    for (int64_t i = 0; i < d; i++) {
      REAL v = A * u[i] + C * (g[i] + L2 * w[i]);
      u[i] = v;
      w[i] = S * w[i] + v;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; i++) w[i] = S * w[i] + C * (g[i] + L2 * w[i]);
  }
}

/* PSGD (Arora App. D): torch's SGD step (b = buf <- mu buf + g, mu = k[t]), then the row is
 * scaled back to its norm before the step.  h = (lr). */
static void psgd_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g), *step = g;
  if (a->b) {
    REAL *m = ROW(a->b);
    const REAL M = (REAL)a->k[t];
#pragma omp simd
    for (int64_t i = 0; i < d; i++) m[i] = M * m[i] + g[i];
    step = m;
  }
  double before = sqrt(dotp(w, w, d));
  const REAL L = (REAL)(-a->h[0]);
#pragma omp simd
  for (int64_t i = 0; i < d; i++) w[i] += L * step[i];
  scale(w, before * safe_inv(sqrt(dotp(w, w, d))), d);
}

/* UN-SGD (Badrinarayanan eq. 2): w <- (w - lr live (g - <w,g> w)) / |...|.  s1 = live, h = (lr). */
static void unit_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g);
  double lr = a->h[0];
  const REAL A = (REAL)(1.0 + lr * dotp(w, g, d)), B = (REAL)(-lr * a->s1[t][r]);
#pragma omp simd
  for (int64_t i = 0; i < d; i++) w[i] = A * w[i] + B * g[i];
  scale(w, safe_inv(sqrt(dotp(w, w, d))), d);
}

/* AdamG* (Roburin Theorem 4): w <- normalize(w + step live g/sqrt(r4)); r4 <- keep r4 + add |g|^2.
 * s1 = r4, s2 = live, h = (step, keep, add). */
static void adamg_star_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g);
  double r4 = a->s1[t][r], gg = dotp(g, g, d);
  const REAL C = (REAL)(a->h[0] * a->s2[t][r] * safe_inv(sqrt(r4)));
#pragma omp simd
  for (int64_t i = 0; i < d; i++) w[i] += C * g[i];
  scale(w, safe_inv(sqrt(dotp(w, w, d))), d);
  a->s1[t][r] = (REAL)(a->h[1] * r4 + a->h[2] * gg);
}

/* SGD-MRT (Roburin App. E.2): b <- mu b + g + wd w;  w <- w - lr b;  b <- b - <w,b>/|w|^2 w.
 * h = (lr, mu, wd). */
static void sgdmrt_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g), *m = ROW(a->b);
  const REAL L = (REAL)(-a->h[0]), M = (REAL)a->h[1], L2 = (REAL)a->h[2];
  double ww = 0.0, wm = 0.0;
#pragma omp simd reduction(+ : ww, wm)
  for (int64_t i = 0; i < d; i++) {
    REAL v = M * m[i] + g[i] + L2 * w[i], x = w[i] + L * v;
    m[i] = v;
    w[i] = x;
    ww += (double)x * x;
    wm += (double)x * v;
  }
  const REAL K = (REAL)(-wm * safe_inv(ww));
#pragma omp simd
  for (int64_t i = 0; i < d; i++) m[i] += K * w[i];
}

/* Adam-S / Adam-SRT (Roburin eqs. 15, 19-21): g' = g + wd w;  m <- lerp(m, g', 1 - beta1);
 * v <- beta2 v + (1 - beta2)|g'|^2/d;  w <- w - lh m/(sqrt(v) vh + eps);  with transport (h[4]):
 * m <- m - <w,m>/|w|^2 w and v <- v |w_old|^2/|w|^2.  b = m, s1 = v, k[t] = (lh, vh),
 * h = (beta1, beta2, wd, eps, transport). */
static void adams_row(const Args *a, int t, int64_t r, int64_t d) {
  REAL *w = ROW(a->w), *g = ROW(a->g), *m = ROW(a->b);
  const double beta1 = a->h[0], beta2 = a->h[1], *k = a->k + t * a->kstride;
  const REAL L2 = (REAL)a->h[2], W1 = (REAL)(1.0 - beta1);
  double gg = 0.0, xx = 0.0;
  if (W1 < 0.5) { /* torch's lerp: start + weight (end - start) below 0.5, else from the end */
#pragma omp simd reduction(+ : gg, xx)
    for (int64_t i = 0; i < d; i++) {
      REAL x = w[i], gi = g[i] + L2 * x;
      m[i] = m[i] + W1 * (gi - m[i]);
      gg += (double)gi * gi;
      xx += (double)x * x;
    }
  } else {
    const REAL W0 = (REAL)beta1;
#pragma omp simd reduction(+ : gg, xx)
    for (int64_t i = 0; i < d; i++) {
      REAL x = w[i], gi = g[i] + L2 * x;
      m[i] = gi - (gi - m[i]) * W0;
      gg += (double)gi * gi;
      xx += (double)x * x;
    }
  }
  double v = beta2 * a->s1[t][r] + (1.0 - beta2) / (double)d * gg;
  const REAL C = (REAL)(-k[0] / (sqrt(v) * k[1] + a->h[3]));
  if (a->h[4] == 0.0) {
#pragma omp simd
    for (int64_t i = 0; i < d; i++) w[i] += C * m[i];
    a->s1[t][r] = (REAL)v;
    return;
  }
  double after = 0.0, wm = 0.0;
#pragma omp simd reduction(+ : after, wm)
  for (int64_t i = 0; i < d; i++) {
    REAL x = w[i] + C * m[i];
    w[i] = x;
    after += (double)x * x;
    wm += (double)x * m[i];
  }
  double inv = safe_inv(after);
  const REAL K = (REAL)(-wm * inv);
#pragma omp simd
  for (int64_t i = 0; i < d; i++) m[i] += K * w[i];
  a->s1[t][r] = (REAL)(v * (xx * inv));
}

#define KERNEL(name)                                                     \
  void NAME(name)(int nt, const Args *a, int threads) { for_rows(nt, a, threads, name##_row); }

KERNEL(psi)
KERNEL(psgd)
KERNEL(unit)
KERNEL(adamg_star)
KERNEL(sgdmrt)
KERNEL(adams)
