/* psiopt's fused per-row CPU kernels (built and called by kernels.py).
 *
 * A rule is two passes over a row: `pre` takes every per-row sum the step needs (updating a
 * buffer on the way where the rule does), `coef` turns the sums and the row's state into the
 * update's coefficients (scalars needed after the step are derived from sums taken before it:
 * ||a w + b g||^2 = a^2 <w,w> + 2ab <w,g> + b^2 <g,g>), `post` applies the update.  A row that
 * fits in cache is read once from memory; the rows of all tensors are split among the threads
 * by their number of entries, and a row too large for the cache is split among all threads.
 * The file is compiled twice into one library, with REAL = float (names ending _f32) and
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

#ifdef __GNUC__
#define INLINE inline __attribute__((always_inline))
#else
#define INLINE inline
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

/* ||a x + b y||^2 from ||x||^2, <x,y>, ||y||^2, clamped at 0 against rounding */
static inline double sqnorm_of_sum(double a, double b, double xx, double xy, double yy) {
  double v = a * a * xx + 2.0 * a * b * xy + b * b * yy;
  return v < 0 ? 0.0 : v;  /* NaN stays NaN, as torch's clamp_min */
}

/* g + wd w, or g itself when wd is 0 (as the reference paths: 0 * inf would be NaN) */
static inline REAL decayed(REAL g, REAL w, REAL wd) { return wd != 0 ? g + wd * w : g; }

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

#define ROW(p) ((p)[t] + r * d)
#define SPAN(p) ((p)[t] + r * a->cols[t])
#define SIMD _Pragma("omp simd")

/* PSI-SGD(M), Yi eqs. 10-11: s = r0/||w|| (s1 = r0) or 1 (s1 NULL); g' = g + wd s^2 w;
 * u <- rho s u - lr s ||w||^2 g' (b = u, or no velocity);  w <- s w + u.  h = (lr, rho, wd). */
static void psi_pre(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  const REAL *w = SPAN(a->w);
  REAL ww = 0;
#pragma omp simd reduction(+ : ww)
  for (int64_t i = lo; i < hi; i++) ww += w[i] * w[i];
  s[0] += ww;
}
static void psi_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double f = a->s1 ? a->s1[t][r] * safe_inv(sqrt(s[0])) : 1.0;
  c[0] = f;                          /* rescaling */
  c[1] = -a->h[0] * s[0] * f;        /* step on g' */
  c[2] = a->h[2] * f * f;            /* L2 at f w */
  c[3] = a->h[1] * f;                /* velocity decay */
}
static void psi_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  REAL *w = SPAN(a->w);
  const REAL *g = SPAN(a->g);
  const REAL S = (REAL)c[0], C = (REAL)c[1], L2 = (REAL)c[2], A = (REAL)c[3];
  if (a->b) {
    REAL *u = SPAN(a->b);
    SIMD for (int64_t i = lo; i < hi; i++) {
      REAL v = A * u[i] + C * decayed(g[i], w[i], L2);
      u[i] = v;
      w[i] = S * w[i] + v;
    }
  } else {
    SIMD for (int64_t i = lo; i < hi; i++) w[i] = S * w[i] + C * decayed(g[i], w[i], L2);
  }
}

/* Sums <w,w>, <w,x>, <x,x> of a row and a second tensor x. */
static void sums3(const REAL *w, const REAL *x, int64_t lo, int64_t hi, double *s) {
  REAL ww = 0, wx = 0, xx = 0;
#pragma omp simd reduction(+ : ww, wx, xx)
  for (int64_t i = lo; i < hi; i++) {
    ww += w[i] * w[i];
    wx += w[i] * x[i];
    xx += x[i] * x[i];
  }
  s[0] += ww, s[1] += wx, s[2] += xx;
}

/* m <- mu m + g (+ wd w when `decay`: a constant where it is inlined, so that each form is a
 * loop of its own, vectorized), and the sums <w,w>, <w,m>, <m,m> of the new m, in one pass */
static INLINE void momentum_sums_(const REAL *w, const REAL *g, REAL *m, double mu, double wd,
                                  int64_t lo, int64_t hi, double *s, const int decay) {
  const REAL M = (REAL)mu, L2 = (REAL)wd;
  REAL ww = 0, wm = 0, mm = 0;
#pragma omp simd reduction(+ : ww, wm, mm)
  for (int64_t i = lo; i < hi; i++) {
    REAL v = M * m[i] + g[i];
    if (decay) v += L2 * w[i];  /* (mu m + g) + wd w, in the reference's order */
    m[i] = v;
    ww += w[i] * w[i];
    wm += w[i] * v;
    mm += v * v;
  }
  s[0] += ww, s[1] += wm, s[2] += mm;
}
static void momentum_sums(const REAL *w, const REAL *g, REAL *m, double mu, double wd, int64_t lo,
                          int64_t hi, double *s) {
  if (wd != 0)
    momentum_sums_(w, g, m, mu, wd, lo, hi, s, 1);
  else  /* no 0 * w: a non-finite w would make it NaN, where the reference adds nothing */
    momentum_sums_(w, g, m, mu, wd, lo, hi, s, 0);
}

/* w <- A w + B x */
static void combine(REAL *w, const REAL *x, double a, double b, int64_t lo, int64_t hi) {
  const REAL A = (REAL)a, B = (REAL)b;
  SIMD for (int64_t i = lo; i < hi; i++) w[i] = A * w[i] + B * x[i];
}

/* PSGD (Arora App. D): torch's SGD step on the buffer d (b: buf <- mu buf + g with mu = k[t];
 * else d = g), then the row back to its norm: w <- f (w - lr d), f = ||w||/||w - lr d||.
 * h = (lr). */
static void psgd_pre(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  if (a->b)
    momentum_sums(SPAN(a->w), SPAN(a->g), SPAN(a->b), a->k[t], 0.0, lo, hi, s);
  else
    sums3(SPAN(a->w), SPAN(a->g), lo, hi, s);
}
static void psgd_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double lr = a->h[0], f = sqrt(s[0]) * safe_inv(sqrt(sqnorm_of_sum(1.0, -lr, s[0], s[1], s[2])));
  c[0] = f, c[1] = -lr * f;
}
static void psgd_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  combine(SPAN(a->w), a->b ? SPAN(a->b) : SPAN(a->g), c[0], c[1], lo, hi);
}

/* UN-SGD (Badrinarayanan eq. 2): w <- (w - lr live (g - <w,g> w)) / ||...||.  s1 = live,
 * h = (lr). */
static void grad_sums(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  sums3(SPAN(a->w), SPAN(a->g), lo, hi, s);
}
static void unit_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double lr = a->h[0], p = 1.0 + lr * s[1], q = -lr * a->s1[t][r];
  double inv = safe_inv(sqrt(sqnorm_of_sum(p, q, s[0], s[1], s[2])));
  c[0] = p * inv, c[1] = q * inv;
}
static void grad_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  combine(SPAN(a->w), SPAN(a->g), c[0], c[1], lo, hi);
}

/* AdamG* (Roburin Theorem 4): w <- normalize(w + step live g/sqrt(r4));
 * r4 <- keep r4 + add ||g||^2.  s1 = r4, s2 = live, h = (step, keep, add). */
static void adamg_star_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double r4 = a->s1[t][r], q = a->h[0] * a->s2[t][r] * safe_inv(sqrt(r4));
  double inv = safe_inv(sqrt(sqnorm_of_sum(1.0, q, s[0], s[1], s[2])));
  c[0] = inv, c[1] = q * inv;
  a->s1[t][r] = (REAL)(a->h[1] * r4 + a->h[2] * s[2]);
}

/* SGD-MRT (Roburin App. E.2): b <- mu b + g + wd w;  w <- w - lr b;  b <- b - <w,b>/||w||^2 w.
 * h = (lr, mu, wd). */
static void sgdmrt_pre(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  momentum_sums(SPAN(a->w), SPAN(a->g), SPAN(a->b), a->h[1], a->h[2], lo, hi, s);
}
static void sgdmrt_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double lr = a->h[0], after = sqnorm_of_sum(1.0, -lr, s[0], s[1], s[2]);
  c[0] = -lr, c[1] = -(s[1] - lr * s[2]) * safe_inv(after);  /* -<w_new, b>/||w_new||^2 */
}
static void sgdmrt_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  REAL *w = SPAN(a->w), *m = SPAN(a->b);
  const REAL L = (REAL)c[0], K = (REAL)c[1];
  SIMD for (int64_t i = lo; i < hi; i++) {
    REAL x = w[i] + L * m[i];
    w[i] = x;
    m[i] += K * x;
  }
}

/* Adam-S / Adam-SRT (Roburin eqs. 15, 19-21): g' = g + wd w;  m <- lerp(m, g', 1 - beta1);
 * v <- beta2 v + (1 - beta2) ||g'||^2/d;  w <- w - lh m/(sqrt(v) vh + eps);  with transport
 * (h[4] != 0): m <- m - <w,m>/||w||^2 w and v <- v ||w_old||^2/||w||^2.  b = m, s1 = v,
 * k[t] = (lh, vh), h = (beta1, beta2, wd, eps, transport). */
static INLINE void adams_pre_(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s,
                              const int decay, const int low) {
  const REAL *w = SPAN(a->w), *g = SPAN(a->g);
  REAL *m = SPAN(a->b);
  const REAL L2 = (REAL)a->h[2], W1 = (REAL)(1.0 - a->h[0]), W0 = (REAL)a->h[0];
  REAL gg = 0, ww = 0, wm = 0, mm = 0;
#pragma omp simd reduction(+ : gg, ww, wm, mm)
  for (int64_t i = lo; i < hi; i++) {
    REAL gi = decay ? g[i] + L2 * w[i] : g[i];
    REAL v = low ? m[i] + W1 * (gi - m[i]) : gi - (gi - m[i]) * W0;
    m[i] = v;
    gg += gi * gi;
    ww += w[i] * w[i];
    wm += w[i] * v;
    mm += v * v;
  }
  s[0] += ww, s[1] += wm, s[2] += mm, s[3] += gg;
}
static void adams_pre(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  /* torch's lerp: start + weight (end - start) for a weight below 0.5, else from the end */
  const int decay = a->h[2] != 0, low = (REAL)(1.0 - a->h[0]) < 0.5;
  if (decay && low) adams_pre_(a, t, r, lo, hi, s, 1, 1);
  else if (decay) adams_pre_(a, t, r, lo, hi, s, 1, 0);
  else if (low) adams_pre_(a, t, r, lo, hi, s, 0, 1);
  else adams_pre_(a, t, r, lo, hi, s, 0, 0);
}
static void adams_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  const double *k = a->k + t * a->kstride, beta2 = a->h[1];
  double v = beta2 * a->s1[t][r] + (1.0 - beta2) / (double)d * s[3];
  double q = -k[0] / (sqrt(v) * k[1] + a->h[3]);
  c[0] = q, c[1] = 0.0;
  if (a->h[4] != 0.0) {
    double after = sqnorm_of_sum(1.0, q, s[0], s[1], s[2]), inv = safe_inv(after);
    c[1] = -(s[1] + q * s[2]) * inv;  /* -<w_new, m>/||w_new||^2 */
    v *= s[0] * inv;
  }
  a->s1[t][r] = (REAL)v;
}
static void adams_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  REAL *w = SPAN(a->w), *m = SPAN(a->b);
  const REAL Q = (REAL)c[0], K = (REAL)c[1];
  if (a->h[4] == 0.0) {
    SIMD for (int64_t i = lo; i < hi; i++) w[i] += Q * m[i];
    return;
  }
  SIMD for (int64_t i = lo; i < hi; i++) {
    REAL x = w[i] + Q * m[i];
    w[i] = x;
    m[i] += K * x;
  }
}

/* SGDG / AdamG (Cho & Lee 2017): h = f (g - <y,g> y), f = min(1, clip/||g - <y,g> y||) live;
 * m' = a m + b h;  AdamG (s2 = v): v <- beta2 v + (1 - beta2) ||h||^2, k = k[t]/sqrt(v + eps);
 * SGDG: k = 1;  then (y, m) <- (exp(y, k m'), pt(y, k m')/k), the rotation
 * (y, m) <- (cos y + sigma m, tau y + cos m) taken as three shears (geometry.geodesic_step_).
 * b = m, s1 = live, h = (a, b, clip, beta2, eps); g is the penalised gradient. */
static void sphere_pre(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, double *s) {
  const REAL *y = SPAN(a->w), *g = SPAN(a->g), *m = SPAN(a->b);
  double yy = 0, yg = 0, gg = 0;  /* in double: ||h||^2 = gg + yg^2 (yy - 2) cancels (see coef) */
  REAL ym = 0, mg = 0, mm = 0;
#pragma omp simd reduction(+ : yy, yg, gg, ym, mg, mm)
  for (int64_t i = lo; i < hi; i++) {
    yy += (double)y[i] * y[i];
    yg += (double)y[i] * g[i];
    gg += (double)g[i] * g[i];
    ym += y[i] * m[i];
    mg += m[i] * g[i];
    mm += m[i] * m[i];
  }
  s[0] += yy, s[1] += yg, s[2] += gg, s[3] += ym, s[4] += mg, s[5] += mm;
}
static void sphere_coef(const Args *a, int t, int64_t r, int64_t d, const double *s, double *c) {
  double yy = s[0], yg = s[1], ym = s[3], ca = a->h[0], cb = a->h[1];
  /* ||g - <y,g> y||^2: relative error (eps of the sums) (<y,g>/||h||)^2, large where g is
   * nearly radial (Cho & Lee's penalty on a weight of more rows than columns) */
  double hh = s[2] + yg * yg * (yy - 2.0), f;
  hh = hh < 0 ? 0.0 : hh;  /* NaN stays NaN */
  f = a->h[2] / sqrt(hh);
  f = (f > 1.0 ? 1.0 : f) * a->s1[t][r];  /* NaN stays NaN, as torch's clamp */
  hh *= f * f;
  double ym2 = ca * ym + cb * f * yg * (1.0 - yy);                      /* <y, m'> */
  double mm2 = sqnorm_of_sum(ca, cb, s[5], f * (s[4] - yg * ym), hh);  /* ||m'||^2 */
  double k = 1.0;
  if (a->s2) {
    double v = a->h[3] * a->s2[t][r] + (1.0 - a->h[3]) * hh;
    a->s2[t][r] = (REAL)v;
    k = a->k[t * a->kstride] / sqrt(v + a->h[4]);
  }
  double n = sqrt(mm2) * fabs(k), cs = cos(n), sinc = n > 0 ? sin(n) / n : 1.0;
  double sign = cs < 0 ? -1.0 : 1.0, sigma = k * sinc;
  c[0] = ca, c[1] = cb * f, c[2] = -cb * f * yg;       /* m' = a m + b f g - b f <y,g> y */
  c[3] = sign * sigma / (1.0 + fabs(cs));              /* shears */
  c[4] = -sign * k * mm2 * sinc;
  c[5] = sign;
  c[6] = sign * safe_inv(sqrt(sqnorm_of_sum(cs, sigma, yy, ym2, mm2)));
}
static void sphere_post(const Args *a, int t, int64_t r, int64_t lo, int64_t hi, const double *c) {
  REAL *y = SPAN(a->w), *m = SPAN(a->b);
  const REAL *g = SPAN(a->g);
  const REAL M = (REAL)c[0], G = (REAL)c[1], Y = (REAL)c[2], A = (REAL)c[3], B = (REAL)c[4];
  const REAL S = (REAL)c[5], I = (REAL)c[6];
  SIMD for (int64_t i = lo; i < hi; i++) {
    REAL mi = M * m[i] + G * g[i] + Y * y[i];
    REAL yi = y[i] + A * mi;
    mi += B * yi;
    yi += A * mi;
    m[i] = S * mi;
    y[i] = I * yi;
  }
}

#define KERNEL(name, pre, coef, post, pipelined)                          \
  void NAME(name)(int nt, const Args *a, int threads) {                   \
    static const Rule rule = {pre, coef, post, pipelined};                \
    for_rows(nt, a, threads, &rule);                                      \
  }

KERNEL(psi, psi_pre, psi_coef, psi_post, 1)
KERNEL(psgd, psgd_pre, psgd_coef, psgd_post, 0)
KERNEL(unit, grad_sums, unit_coef, grad_post, 0)
KERNEL(adamg_star, grad_sums, adamg_star_coef, grad_post, 0)
KERNEL(sgdmrt, sgdmrt_pre, sgdmrt_coef, sgdmrt_post, 0)
KERNEL(adams, adams_pre, adams_coef, adams_post, 0)
KERNEL(sphere, sphere_pre, sphere_coef, sphere_post, 0)
