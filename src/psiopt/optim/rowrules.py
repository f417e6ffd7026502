"""Each fused rule's per-row form, defined once: its sums, its coefficients, its affine update.

Every rule with a fused kernel is, for one row ``w`` (gradient ``g``, optional full-size buffer
``b``, optional per-row state ``s1``/``s2``, optional per-tensor scalars ``k``, hyperparameters
``h``), three steps:

* ``pre(w, g, b, h, k, HAS_B, OPT) -> (b', terms)``: entry-wise, the buffer's update (momentum,
  ``exp_avg``) and the terms whose row sums the step needs (``w*w``, ``w*b'``...);
* ``coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT) -> (c, s1', s2')``: per row, from the sums
  ``s`` (float64), the update's coefficients and the row's new state (norms after the step are
  derived from sums before it: ``‖a x + b y‖² = a²<x,x> + 2ab<x,y> + b²<y,y>``);
* ``post(w, g, b', c, h, HAS_B, OPT) -> (w', b'')``: entry-wise, the affine update.

``HAS_B``/``HAS_S1``/``HAS_S2`` say which optional tensors the call has, ``OPT`` is a rule's
static option (:attr:`RowRule.option`: Adam-SRT's transport).  The functions are plain Python
written with arithmetic operators and the helpers below (``sqrt``, ``safe_inv``, ``where``,
``cos``, ``sin``, ``fabs``, ``wide``, ``sqnorm_of_sum``) and nothing else, so that one source runs on
several backends:

* :mod:`psiopt.optim.triton_rows` compiles them with Triton (the helpers rebound to Triton
  functions): one kernel launch per group and step on CUDA tensors, four where rows longer than
  ``triton_rows.MAX_BLOCK`` are split across programs (and on CPU tensors under Triton's
  interpreter, in the tests);
* :mod:`psiopt.optim.c_rows` writes them in C (run on symbolic values that record each
  operation): the rules of the fused CPU kernels, compiled after ``kernels.c``'s row loop;
* :func:`evaluate` runs them with torch on every row at once (the helpers as torch functions,
  per-row scalars as ``(R, 1)`` tensors): the form from which the vectorized path can derive
  (``tests/test_triton.py`` checks it against the reference path too).

The reference paths (``_update_one`` of each rule) stay the readable statement of each paper's
equation; the tests hold every backend to them.  A rule added to :data:`RULES` gets its C and
Triton kernels from its three functions.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass

import torch

# -- the helpers, as torch functions (rebound to Triton functions by triton_rows) ----------------


def sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def cos(x):
    return torch.cos(x)


def sin(x):
    return torch.sin(x)


def where(cond, a, b):
    if isinstance(cond, bool):  # a condition on hyperparameters (Python numbers)
        return a if cond else b
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):  # (float64, as coef)
        a = torch.tensor(a, dtype=torch.float64)
    return torch.where(cond, a, b)


def fabs(x):
    return abs(x)


def wide(x):
    """``x`` in float64 (sums that must not be taken in float32)."""
    return x.double()


def safe_inv(x):
    """``1/x`` where ``x > 0``, else 0 (a zero row never gives NaN)."""
    if not isinstance(x, torch.Tensor):
        return 1.0 / max(x, TINY) if x > 0 else 0.0
    return torch.where(x > 0, 1.0 / x.clamp_min(TINY), torch.zeros_like(x))


def sqnorm_of_sum(a, b, xx, xy, yy):
    """``‖a x + b y‖²`` from ``‖x‖², <x,y>, ‖y‖²``, clamped at 0 against rounding (NaN stays)."""
    v = a * a * xx + 2.0 * a * b * xy + b * b * yy
    return where(v < 0, 0.0, v)


def rebind(fn, scope: dict):
    """``fn``'s code with the globals ``scope``: how a backend runs a rule's functions with the
    helpers above rebound to its own (Triton's, or C code generation's).  The function is ``fn``
    in all else: defaults, closure, names and annotations (Triton's JIT reads its ``tl.constexpr``
    parameters from them; without them a launch on a GPU could not bind its dtypes)."""
    out = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__, out.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    out.__annotations__, out.__module__ = dict(fn.__annotations__), fn.__module__
    return out


#: the smallest positive value :func:`safe_inv` inverts (here, for :func:`evaluate`: float64's;
#: the Triton kernels take float32's for 16/32-bit parameters, as the reference path's state)
TINY = torch.finfo(torch.float64).tiny


# -- the rules ------------------------------------------------------------------------------------
# PSI-SGD(M), Yi eqs. 10-11: s = r0/||w|| (s1 = r0) or 1 (no s1);  g' = g + wd s^2 w;
# u <- rho s u - lr s ||w||^2 g' (b = u, or no velocity);  w <- s w + u.  h = (lr, rho, wd).
def psi_pre(w, g, b, h, k, HAS_B, OPT):
    return b, (w * w,)


def psi_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    f = 1.0
    if HAS_S1:
        f = s1 * safe_inv(sqrt(s[0]))
    return (f, -h[0] * s[0] * f, h[2] * f * f, h[1] * f), s1, s2


def psi_post(w, g, b, c, h, HAS_B, OPT):
    gd = where(c[2] != 0, g + c[2] * w, g)  # not g + 0 w: NaN at a non-finite w (reference: g)
    if HAS_B:
        v = c[3] * b + c[1] * gd
        return c[0] * w + v, v
    return c[0] * w + c[1] * gd, b


# PSGD (Arora App. D): torch's SGD step on d (b: buf <- mu buf + g, mu = k[0]; else d = g), then
# the row back to its norm: w <- f (w - lr d), f = ||w||/||w - lr d||.  h = (lr,).
def psgd_pre(w, g, b, h, k, HAS_B, OPT):
    if HAS_B:
        b = k[0] * b + g
        return b, (w * w, w * b, b * b)
    return b, (w * w, w * g, g * g)


def psgd_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    lr = h[0]
    f = sqrt(s[0]) * safe_inv(sqrt(sqnorm_of_sum(1.0, -lr, s[0], s[1], s[2])))
    return (f, -lr * f), s1, s2


def psgd_post(w, g, b, c, h, HAS_B, OPT):
    if HAS_B:
        return c[0] * w + c[1] * b, b
    return c[0] * w + c[1] * g, b


# Sums <w,w>, <w,g>, <g,g> (UN-SGD, AdamG*), and the update w <- c0 w + c1 g.
def grad_pre(w, g, b, h, k, HAS_B, OPT):
    return b, (w * w, w * g, g * g)


def grad_post(w, g, b, c, h, HAS_B, OPT):
    return c[0] * w + c[1] * g, b


# UN-SGD (Badrinarayanan eq. 2): w <- (w - lr live (g - <w,g> w)) / ||...||.  s1 = live, h = (lr,).
def unit_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    lr = h[0]
    p = 1.0 + lr * s[1]
    q = -lr * s1
    inv = safe_inv(sqrt(sqnorm_of_sum(p, q, s[0], s[1], s[2])))
    return (p * inv, q * inv), s1, s2


# AdamG* (Roburin Theorem 4): w <- normalize(w + step live g/sqrt(r4));  r4 <- keep r4 + add ||g||^2.
# s1 = r4, s2 = live, h = (step, keep, add).
def adamg_star_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    q = h[0] * s2 * safe_inv(sqrt(s1))
    inv = safe_inv(sqrt(sqnorm_of_sum(1.0, q, s[0], s[1], s[2])))
    return (inv, q * inv), h[1] * s1 + h[2] * s[2], s2


# SGD-MRT (Roburin App. E.2): b <- mu b + g + wd w;  w <- w - lr b;  b <- b - <w,b>/||w||^2 w.
# h = (lr, mu, wd).
def sgdmrt_pre(w, g, b, h, k, HAS_B, OPT):
    v = h[1] * b + g
    v = where(h[2] != 0, v + h[2] * w, v)  # (mu b + g) + wd w, in the reference's order
    return v, (w * w, w * v, v * v)


def sgdmrt_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    lr = h[0]
    after = sqnorm_of_sum(1.0, -lr, s[0], s[1], s[2])
    return (-lr, -(s[1] - lr * s[2]) * safe_inv(after)), s1, s2  # -<w_new, b>/||w_new||^2


def sgdmrt_post(w, g, b, c, h, HAS_B, OPT):
    x = w + c[0] * b
    return x, b + c[1] * x


# Adam-S / Adam-SRT (Roburin eqs. 15, 19-21): g' = g + wd w;  m <- lerp(m, g', 1 - beta1);
# v <- beta2 v + (1 - beta2) ||g'||^2/d;  w <- w - lh m/(sqrt(v) vh + eps);  with transport
# (OPT): m <- m - <w,m>/||w||^2 w and v <- v ||w_old||^2/||w||^2.  b = m, s1 = v, k = (lh, vh),
# h = (beta1, beta2, wd, eps).
def adams_pre(w, g, b, h, k, HAS_B, OPT):
    gi = where(h[2] != 0, g + h[2] * w, g)
    low = 1.0 - h[0]  # torch's lerp: start + weight (end - start) below 0.5, else from the end
    v = where(low < 0.5, b + low * (gi - b), gi - (gi - b) * h[0])
    return v, (w * w, w * v, v * v, gi * gi)


def adams_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    beta2 = h[1]
    v = beta2 * s1 + (1.0 - beta2) / d * s[3]
    q = -k[0] / (sqrt(v) * k[1] + h[3])
    c1 = 0.0
    if OPT:
        inv = safe_inv(sqnorm_of_sum(1.0, q, s[0], s[1], s[2]))
        c1 = -(s[1] + q * s[2]) * inv  # -<w_new, m>/||w_new||^2
        v = v * (s[0] * inv)
    return (q, c1), v, s2


def adams_post(w, g, b, c, h, HAS_B, OPT):
    x = w + c[0] * b
    if OPT:
        return x, b + c[1] * x
    return x, b


# SGDG / AdamG (Cho & Lee 2017): h = f (g - <y,g> y), f = min(1, clip/||g - <y,g> y||) live;
# m' = a m + b h;  AdamG (s2 = v): v <- beta2 v + (1 - beta2) ||h||^2, k = k[0]/sqrt(v + eps);
# SGDG: k = 1;  then (y, m) <- (exp(y, k m'), pt(y, k m')/k), the rotation
# (y, m) <- (cos y + sigma m, tau y + cos m) taken as three shears (geometry.geodesic_step_).
# b = m, s1 = live, h = (a, b, clip, beta2, eps); g is the penalised gradient.
def sphere_pre(w, g, b, h, k, HAS_B, OPT):
    y, m = w, b  # ||y||^2, <y,g>, ||g||^2 in float64: ||h||^2 = gg + yg^2 (yy - 2) cancels
    return b, (wide(y) * wide(y), wide(y) * wide(g), wide(g) * wide(g), y * m, m * g, m * m)


def sphere_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    yy, yg, ym, ca, cb = s[0], s[1], s[3], h[0], h[1]
    hh = s[2] + yg * yg * (yy - 2.0)  # ||g - <y,g> y||^2
    hh = where(hh < 0, 0.0, hh)  # NaN stays NaN
    f = h[2] / sqrt(hh)
    f = where(f > 1.0, 1.0, f) * s1  # NaN stays NaN, as torch's clamp
    hh = hh * (f * f)
    ym2 = ca * ym + cb * f * yg * (1.0 - yy)  # <y, m'>
    mm2 = sqnorm_of_sum(ca, cb, s[5], f * (s[4] - yg * ym), hh)  # ||m'||^2
    kk = 1.0
    if HAS_S2:
        s2 = h[3] * s2 + (1.0 - h[3]) * hh
        kk = k[0] / sqrt(s2 + h[4])
    n = sqrt(mm2) * fabs(kk)
    cs = cos(n)
    sinc = where(n > 0, sin(n) / where(n > 0, n, 1.0), 1.0)
    sign = where(cs < 0, -1.0, 1.0)
    sigma = kk * sinc
    return (ca, cb * f, -cb * f * yg,  # m' = a m + b f g - b f <y,g> y
            sign * sigma / (1.0 + fabs(cs)),  # the shears
            -sign * kk * mm2 * sinc, sign,
            sign * safe_inv(sqrt(sqnorm_of_sum(cs, sigma, yy, ym2, mm2)))), s1, s2


def sphere_post(w, g, b, c, h, HAS_B, OPT):
    m = c[0] * b + c[1] * g + c[2] * w
    y = w + c[3] * m
    m = m + c[4] * y
    y = y + c[3] * m
    return c[6] * y, c[5] * m


# The norm policies around any optimizer (policies.py, NormPolicy), per group of rows:
# the tangent gradient (project=True): b <- f (g - <w,g>/||w||^2 w), f = 0 for a zero group, 1
# else (b: the gradient the inner step reads); s1 <- ||w||^2 where given.
def project_pre(w, g, b, h, k, HAS_B, OPT):
    return b, (w * w, w * g)


def project_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    f = where(s[0] > 0, 1.0, 0.0)
    return (f, -s[1] * safe_inv(s[0]) * f), s[0], s2


def project_post(w, g, b, c, h, HAS_B, OPT):
    return w, c[0] * g + c[1] * w


# "fixed" and "unit": w <- n/||w|| w, n = s1 (the norm before the step) or 1 (no s1).
def retract_pre(w, g, b, h, k, HAS_B, OPT):
    return b, (w * w,)


def retract_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    n = 1.0
    if HAS_S1:
        n = s1
    return (n * safe_inv(sqrt(s[0])),), s1, s2


def retract_post(w, g, b, c, h, HAS_B, OPT):
    return c[0] * w, b


# "equilibrium": w <- ||o|| (cos u + sin t/||t||), u = o/||o||, t = w - <w,u> u (b = o, the group
# before the inner step; k = (cos, sin) of the tensor's angle).  Sums of the step x = w - o, in
# float64: t = x - <x,o>/||o||^2 o, and ||t||^2 = ||x||^2 - <x,o>^2/||o||^2 cancels only where the
# step is nearly radial.  Where ||t||^2 <= 1e-12 ||x||^2 (the step radial to rounding: the
# direction of t is noise; policies.RADIAL) the group goes back to o.


def rotate_pre(w, g, b, h, k, HAS_B, OPT):
    x = wide(w) - wide(b)
    return b, (wide(b) * wide(b), x * wide(b), x * x)


def rotate_coef(s, s1, s2, k, h, d, HAS_S1, HAS_S2, OPT):
    a = s[1] * safe_inv(s[0])  # t = x - a o
    tt = s[2] - a * s[1]
    turns = where(tt > 1e-12 * s[2], 1.0, 0.0)  # (a literal: the backends see no globals)
    cx = sqrt(s[0]) * k[1] * safe_inv(sqrt(tt)) * turns
    return ((1.0 + (k[0] - 1.0) * turns) - cx * a, cx), s1, s2


def rotate_post(w, g, b, c, h, HAS_B, OPT):
    return c[0] * b + c[1] * (w - b), b


@dataclass(frozen=True)
class RowRule:
    """A rule's three functions, the per-row state its ``coef`` writes, and ``option``: the index
    of ``h`` whose truth is the rule's static option ``OPT`` (``None``: none)."""

    pre: object
    coef: object
    post: object
    writes_s1: bool = False
    writes_s2: bool = False
    option: int | None = None


#: the rules, by the names the optimizers pass to ``kernels.run``
RULES = {
    "psi": RowRule(psi_pre, psi_coef, psi_post),
    "psgd": RowRule(psgd_pre, psgd_coef, psgd_post),
    "unit": RowRule(grad_pre, unit_coef, grad_post),
    "adamg_star": RowRule(grad_pre, adamg_star_coef, grad_post, writes_s1=True),
    "sgdmrt": RowRule(sgdmrt_pre, sgdmrt_coef, sgdmrt_post),
    "adams": RowRule(adams_pre, adams_coef, adams_post, writes_s1=True, option=4),
    "sphere": RowRule(sphere_pre, sphere_coef, sphere_post, writes_s2=True),
    "project": RowRule(project_pre, project_coef, project_post, writes_s1=True),
    "retract": RowRule(retract_pre, retract_coef, retract_post),
    "rotate": RowRule(rotate_pre, rotate_coef, rotate_post),
}


@functools.cache
def stores(kernel: str, has_b: bool, opt: bool) -> tuple[bool, bool]:
    """Whether rule ``kernel``'s step changes the row ``w`` and the buffer ``b`` (given: ``has_b``),
    so that a kernel writes only what changes (a store fewer per entry): "project" writes ``b``,
    the tangent gradient, and not ``w``; "rotate" and "retract" leave the buffer they read.  Its
    functions run once with torch, a tensor they hand back as they got it being one the step
    leaves alone; a choice by hyperparameters (``where`` on a Python condition) counts as a
    change unless both of its values are the tensor itself, so the answer holds for any
    hyperparameters."""
    rule = RULES[kernel]

    def either(cond, a, b):
        if isinstance(cond, bool):
            return a if a is b else torch.zeros(1, dtype=torch.float64)  # (a new tensor)
        return where(cond, a, b)

    scope = dict(globals(), where=either)
    pre, post = rebind(rule.pre, scope), rebind(rule.post, scope)
    w, g, b = (torch.zeros(1, dtype=torch.float64) for _ in range(3))
    h, k = [0.0] * 6, [0.0] * 2
    nb, _ = pre(w, g, b, h, k, has_b, opt)
    nw, nb2 = post(w, g, nb, [0.0] * 8, h, has_b, opt)
    return nw is not w, has_b and not (nb is b and nb2 is b)


def evaluate(kernel: str, ws, gs, *, b=None, s1=None, s2=None, k=None, h=()) -> None:
    """Run rule ``kernel`` on the views ``ws`` with torch, every row of a tensor at once (the
    arguments of :func:`psiopt.optim.kernels.run`; contiguous rows).  Per-entry arithmetic in
    the tensor's dtype, sums and coefficients in float64."""
    rule = RULES[kernel]
    h = [float(x) for x in h] + [0.0] * (6 - len(h))
    opt = bool(h[rule.option]) if rule.option is not None else False
    for i, (w, g) in enumerate(zip(ws, gs)):
        rows, d = w.shape[0], w.numel() // w.shape[0]
        w2, g2 = w.view(rows, d), g.view(rows, d)
        b2 = b[i].view(rows, d) if b else w2
        kt = [float(x) for x in k[i]] if k else [0.0, 0.0]
        st1 = s1[i].reshape(rows, 1).double() if s1 else 0.0
        st2 = s2[i].reshape(rows, 1).double() if s2 else 0.0
        nb, terms = rule.pre(w2, g2, b2, h, kt, bool(b), opt)
        sums = [t.sum(1, keepdim=True, dtype=torch.float64) for t in terms]
        c, n1, n2 = rule.coef(sums, st1, st2, kt, h, d, bool(s1), bool(s2), opt)
        c = [x.to(w.dtype) if isinstance(x, torch.Tensor) else x for x in c]
        nw, nb = rule.post(w2, g2, nb, c, h, bool(b), opt)
        w2.copy_(nw)
        if b:
            b2.copy_(nb)
        if s1 and rule.writes_s1:
            s1[i].copy_(n1.view_as(s1[i]))
        if s2 and rule.writes_s2:
            s2[i].copy_(n2.view_as(s2[i]))


# -- the op both row backends are called through -----------------------------------------------

#: the signature of the row kernels' ops (``psiopt::fused_rows``, ``psiopt::triton_rows``): the
#: rule's name, the rows (written), gradients, buffers, per-row states (written), per-tensor
#: scalars, hyperparameters and the rule's static option.  ``h`` is a tensor (float64, 1-D, six
#: entries; :func:`hyper_tensor`): a learning rate given as a tensor stays one in a compiled
#: step, which a scheduler's change then does not recompile (a ``float[]`` was specialised);
#: the C op reads it on the CPU, the Triton op loads it on the parameters' device.  ``opt`` is
#: :attr:`RowRule.option`'s truth, a Python number's (compiled into the Triton kernel; the C
#: kernel reads ``h`` at that index).
OP_SIGNATURE = ("(str kernel, Tensor(a!)[] ws, Tensor[] gs, Tensor(b!)[] b, Tensor(c!)[] s1, "
                "Tensor(d!)[] s2, Tensor? k, Tensor h, bool opt) -> ()")
_LIBS: list = []  # (a Library unregisters its ops when collected)


class _Kept:
    """A tensor :func:`on_device` keeps: the stream that made it and an event recorded after its
    copy (CUDA), so that another stream waits for the copy before it reads the tensor."""

    __slots__ = ("tensor", "stream", "event")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.stream, self.event = tensor, None, None
        if tensor.is_cuda:
            self.stream = torch.cuda.current_stream(tensor.device)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)


_KEPT: dict = {}  # on_device's tensors, by key (thinned when it grows past _KEEP: _forget)
_CAPTURED: dict = {}  # those a CUDA graph read: never freed (a graph reads their memory)
_KEEP = 1024


def on_device(key, make, device) -> torch.Tensor:
    """``make()`` (a small CPU tensor: hyperparameters, a row table) on ``device``, not to be
    written.  On the CPU, made at each call.  On another device, in an eager step, copied from
    the host once (``non_blocking``) and kept by ``key``: a step whose numbers and tables did not
    change copies nothing from the host, as a CUDA graph's capture needs (a captured copy from
    host memory would read that memory at each replay).  So that capture is safe:

    * a key not kept when a graph is being captured is refused (``RuntimeError``): the steps
      before the capture (its warm-up) make what the captured one reads;
    * what a captured step read is kept for good (a graph holds addresses, not tensors);
    * read on another stream than the one that copied it, the stream first waits for the copy
      (an event, no host synchronisation) and the tensor is marked as used there.

    While ``torch.compile`` traces, a new tensor (the graph holds it as a constant)."""
    device = torch.device(device)
    if device.type == "cpu":
        return make()
    if torch.compiler.is_compiling():
        return make().to(device, non_blocking=True)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device, key)
    kept = _CAPTURED.get(key) or _KEPT.get(key)
    if kept is None:
        if capturing:
            raise RuntimeError(
                "psiopt: a CUDA graph is capturing a step whose hyperparameters or row tables "
                "were not copied to the device before the capture: warm up with the same "
                "tensors and hyperparameters (torch.cuda.graphs's docs: a few steps on a side "
                "stream) before capturing.  A step whose kernels read tensors it allocates "
                "itself (SGDG/AdamG with Cho & Lee's penalty on; the norm policies' project, "
                "equilibrium and \"fixed\" retraction) has new addresses in the capture's pool "
                "and cannot be captured with the kernels: pass fused=False")
        if len(_KEPT) >= _KEEP:
            _forget()
        kept = _KEPT[key] = _Kept(make().to(device, non_blocking=True))
    elif capturing:
        _CAPTURED[key] = _KEPT.pop(key, kept)
    elif kept.stream is not None:
        stream = torch.cuda.current_stream(device)
        if stream != kept.stream:
            stream.wait_event(kept.event)
            kept.tensor.record_stream(stream)
    return kept.tensor


def _forget() -> None:
    """Make room in ``_KEPT``: the numbers first (a float lr's Adam bias corrections are new at
    every step), the tables too only where numbers were not the most of it (dropped, a table is
    copied again at its next step)."""
    numbers = [k for k in _KEPT if isinstance(k[1], tuple) and k[1][:1] == ("numbers",)]
    for k in numbers if len(numbers) >= _KEEP // 2 else list(_KEPT):
        del _KEPT[k]


def numbers_on(values, device) -> torch.Tensor:
    """The Python numbers ``values`` (a list, or a list of equal lists) as a float64 tensor on
    ``device`` (:func:`on_device`, kept by their values), not to be written."""
    def make():
        return torch.tensor(values, dtype=torch.float64)

    if torch.device(device).type == "cpu":  # made at each call there: no key to build
        return make()
    nested = bool(values) and isinstance(values[0], (list, tuple))
    rows = values if nested else [values]
    key = ("numbers", nested, len(values), tuple(float(x).hex() for row in rows for x in row))
    return on_device(key, make, device)  # (-0.0: not 0.0)


def hyper_tensor(h, device) -> torch.Tensor:
    """The hyperparameters ``h`` (Python numbers and 0-d tensors, at most six) as the ops' ``h``:
    a float64 tensor of six entries on ``device``, made without a host synchronisation (the
    numbers by :func:`numbers_on`, tensors converted on the device)."""
    values = list(h) + [0.0] * (6 - len(h))
    numbers = numbers_on([0.0 if isinstance(x, torch.Tensor) else float(x) for x in values], device)
    if not any(isinstance(x, torch.Tensor) for x in values):
        return numbers
    return torch.stack([x.to(device=numbers.device, dtype=torch.float64, non_blocking=True)
                        if isinstance(x, torch.Tensor) else numbers[i] for i, x in enumerate(values)])


def option(kernel: str, h) -> bool:
    """Rule ``kernel``'s static option (:attr:`RowRule.option`) from ``h`` (a Python number
    there)."""
    index = RULES[kernel].option
    return index is not None and index < len(h) and bool(h[index])


def declare_op(name: str, launch, keys: tuple[str, ...]) -> None:
    """Declare ``psiopt::<name>`` (what ``torch.compile`` traces a fused step as) once a process,
    for dispatch ``keys``: it calls ``launch(kernel, ws, gs, b, s1, s2, k, h, opt)``, bumps the
    versions of what it writes, as in-place ops do, and, having no derivative, refuses tensors
    that require one.  A module imported again (``importlib.reload``) finds it declared."""
    if hasattr(torch.ops.psiopt, name):
        return

    def impl(kernel, ws, gs, b, s1, s2, k, h, opt) -> None:
        written = [*ws, *b, *s1, *s2]
        if torch.is_grad_enabled() and any(t.requires_grad for t in written):
            raise RuntimeError(f"psiopt::{name} writes tensors that require grad: call it under "
                               "torch.no_grad()")
        launch(kernel, ws, gs, b, s1, s2, k, h, opt)
        torch.autograd.graph.increment_version(written)

    lib = torch.library.Library("psiopt", "FRAGMENT")
    lib.define(name + OP_SIGNATURE)
    for key in keys:
        lib.impl(name, impl, key)
    torch.library.register_fake(f"psiopt::{name}", lambda *args: None, lib=lib)
    _LIBS.append(lib)
