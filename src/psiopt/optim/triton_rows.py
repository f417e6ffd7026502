"""The fused step with Triton: one kernel launch per rule, parameter group and step, four where
the group has rows longer than :data:`MAX_BLOCK`, whatever the number of tensors (SGDG/AdamG with
Cho & Lee's penalty: as many more per penalised tensor, whose penalty torch computes).

Built from each rule's single definition in :mod:`psiopt.optim.rowrules` (its ``pre``, ``coef``
and ``post``): those plain Python functions are compiled by Triton with their helpers
(``sqrt``, ``safe_inv``…) rebound to Triton functions, and inlined into the kernel templates
(:func:`_row_kernel`, :func:`_partials_kernel`, :func:`_reduce_kernel`,
:func:`_update_kernel`).  Nothing here restates a rule.

The launch takes a table, as torch's multi-tensor apply does: per tensor the addresses of its
weights, gradients, buffer and per-row state and its row length; per row its tensor and index
(per chunk of a long row: its tensor, its row's index and its place in the row).

* Rows of at most :data:`MAX_BLOCK` entries, one launch (:func:`_row_kernel`), one program per
  row: it loads the row (``BLOCK`` entries, the smallest power of two that holds the longest of
  these rows), takes its sums, its coefficients and its update with the row in registers, and
  writes once what the step changes (:func:`psiopt.optim.rowrules.stores`: the row, the
  buffer, the row's state), 16 bytes at a time where the row lies on 16-byte boundaries
  (:func:`_aligned`).
* Longer rows (LayerNorm "tensor" groups: a whole weight is one row), split into chunks of
  ``MAX_BLOCK`` entries, three launches: the first (:func:`_partials_kernel`), one program per
  chunk, writes the chunk's sums (float64; ``pre``'s buffer update is taken, not written) and
  its row's state before the step to a scratch tensor (``NSUM + 2`` values a chunk); the second
  (:func:`_reduce_kernel`), one program per row, adds the row's chunk sums, :data:`MAX_PARTS` at
  a time and always in the same order, over its first chunk's slot (each row's slots read once,
  not once per chunk); the third (:func:`_update_kernel`), one program per chunk, reads its row's
  sums and state copy, takes the coefficients, runs ``pre`` again on the chunk (the buffer's
  update, as the one-program form: a definition whose ``pre`` changes the buffer only for some
  hyperparameters, or makes one where there is none, needs no special case) and the update, and,
  in the program of the row's first chunk, writes the row's state (no program of the last
  launch reads the state tensors it writes).

Per-entry arithmetic and sums within a row (or a chunk) are in float32 for 16- and 32-bit
parameters (float64 for float64), the chunks' sums added and the coefficients taken in float64.

The tables are made on the host and copied to the device without synchronisation
(``non_blocking``), and kept while the tensors' shapes (row and chunk map) and addresses are the
same, as the hyperparameters' Python numbers are while they are the same
(:func:`psiopt.optim.rowrules.on_device`): a step whose buffers were allocated before and whose
numbers did not change copies nothing from the host, and can be captured in a CUDA graph after
a warm-up.  The scratch tensor is allocated on the device at each step (from the graph's pool
when captured).
Triton is imported on first use: CPU-only users never need it.

CUDA tensors take this path (when triton is importable); the tests run it on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``) with ``PSIOPT_TRITON_CPU=1`` (or
``psiopt.optim.kernels.TRITON_ON_CPU = True``).  While ``torch.compile`` traces a step, it is
one call of the op ``psiopt::triton_rows``, its launches inside (opaque to inductor: the
addresses in the table are read from the real tensors).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import rowrules

#: the longest row held in registers (one program per row); longer rows are split into chunks of
#: this many entries, one program per chunk (and one per row to add their sums)
MAX_BLOCK = 4096
#: the most chunks' partial sums a row's program adds at once (a power of two)
MAX_PARTS = 256
#: the dtypes the kernels take
TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: names the functions below compile with (bound in their Triton scope by :func:`_kernel`)
tl = PRE = COEF = POST = TINY = None


_IMPORTABLE: list[bool] = []  # the answer, once known


def importable() -> bool:
    """Whether triton can be imported (tried once, on the first step of a tensor of the Triton
    backend: never on the CPU).  The answer is kept in a module list, not a ``functools`` cache:
    a compiled step reads it as a constant (``ScaleInvariantOptimizer._init_group``, which
    dynamo runs eagerly, asks first), where dynamo traces through a cache wrapper and warns."""
    if not _IMPORTABLE:
        try:
            import triton  # noqa: F401
            _IMPORTABLE.append(True)
        except ImportError:
            _IMPORTABLE.append(False)
    return _IMPORTABLE[0]


# -- the kernel template (compiled by Triton; PRE, COEF, POST and the helpers bound per rule) -----
def _cast_all(c, T):
    out = ()
    for j in tl.static_range(len(c)):
        out = out + (tl.cast(c[j], T),)
    return out


def _add(a, b):
    return a + b


def _sum_all(terms):
    out = ()
    for j in tl.static_range(len(terms)):  # (tl.reduce, not tl.sum: see _build)
        out = out + (tl.reduce(terms[j], 0, _add).to(tl.float64),)
    return out


def _load_row(w_ptr, g_ptr, b_ptr, start, o, d, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """The row's entries ``start + o`` (those below ``d``) of the weight, gradient and buffer
    (the weight where there is none), in ``ACC``; and their mask."""
    mask = start + o < d
    w = tl.load(w_ptr + start + o, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + start + o, mask=mask, other=0.0).to(ACC)
    b = w
    if HAS_B:
        b = tl.load(b_ptr + start + o, mask=mask, other=0.0).to(ACC)
    return w, g, b, mask


def _add_all(a, b):
    out = ()
    for j in tl.static_range(len(a)):
        out = out + (a[j] + b[j],)
    return out


def _row_at(PTR, ROW_T, ROW_I, COLS, r, NT, HAS_B: tl.constexpr, T: tl.constexpr,
            VEC: tl.constexpr):
    """Entry ``r`` of a table (a row, or a chunk of one): its tensor, its row's index and length,
    and the addresses of the row's weights, gradients and buffer (the weights' where none).
    ``VEC`` > 1: the program found the tensors' addresses multiples of 16 bytes and the row
    length a multiple of ``VEC`` entries (:func:`_aligned`), which the compiler is told, so that
    it loads and stores 16 bytes at a time."""
    t = tl.load(ROW_T + r)
    i = tl.load(ROW_I + r)
    d = tl.load(COLS + t)
    w_ptr = tl.load(PTR + t).to(tl.pointer_type(T))
    g_ptr = tl.load(PTR + NT + t).to(tl.pointer_type(T))
    b_ptr = w_ptr
    if HAS_B:
        b_ptr = tl.load(PTR + 2 * NT + t).to(tl.pointer_type(T))
    if VEC > 1:  # (told of the pointers, not of the integers they are made from: not passed on)
        d = tl.multiple_of(d, VEC)
        w_ptr, g_ptr = tl.multiple_of(w_ptr, 16), tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    return t, i, d, w_ptr + i * d, g_ptr + i * d, b_ptr + i * d


def _hyper(K, H, t, ACC: tl.constexpr):
    """The hyperparameters and tensor ``t``'s scalars, in float64 and in ``ACC``."""
    h = (tl.load(H), tl.load(H + 1), tl.load(H + 2), tl.load(H + 3), tl.load(H + 4), tl.load(H + 5))
    k = (tl.load(K + 2 * t), tl.load(K + 2 * t + 1))
    return h, _cast_all(h, ACC), k, _cast_all(k, ACC)


def _state_at(PTR, t, i, NT, S1T: tl.constexpr, S2T: tl.constexpr):
    """The addresses of row ``i``'s per-row state in tensor ``t``."""
    s1_ptr = tl.load(PTR + 3 * NT + t).to(tl.pointer_type(S1T)) + i
    s2_ptr = tl.load(PTR + 4 * NT + t).to(tl.pointer_type(S2T)) + i
    return s1_ptr, s2_ptr


def _load_state(s1_ptr, s2_ptr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr):
    st1 = tl.full((), 0.0, tl.float64)
    st2 = tl.full((), 0.0, tl.float64)
    if HAS_S1:
        st1 = tl.load(s1_ptr).to(tl.float64)
    if HAS_S2:
        st2 = tl.load(s2_ptr).to(tl.float64)
    return st1, st2


def _rows(PTR, ROW_T, ROW_I, COLS, K, H, BLOCK: tl.constexpr,
          HAS_B: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
          WRITES_W: tl.constexpr, WRITES_B: tl.constexpr, WRITES_S1: tl.constexpr,
          WRITES_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
          S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """:func:`_row_kernel`'s program, its row's entries loaded ``VEC`` at a time."""
    t, i, d, w_ptr, g_ptr, b_ptr = _row_at(PTR, ROW_T, ROW_I, COLS, tl.program_id(0), NT, HAS_B, T, VEC)
    h, hc, k, kc = _hyper(K, H, t, ACC)
    s1_ptr, s2_ptr = _state_at(PTR, t, i, NT, S1T, S2T)
    st1, st2 = _load_state(s1_ptr, s2_ptr, HAS_S1, HAS_S2)
    o = tl.arange(0, BLOCK)
    w, g, b, mask = _load_row(w_ptr, g_ptr, b_ptr, 0, o, d, HAS_B, ACC)
    b, terms = PRE(w, g, b, hc, kc, HAS_B, OPT)
    c, n1, n2 = COEF(_sum_all(terms), st1, st2, k, h, d, HAS_S1, HAS_S2, OPT)
    w, b = POST(w, g, b, _cast_all(c, ACC), hc, HAS_B, OPT)
    if WRITES_W:
        tl.store(w_ptr + o, w.to(T), mask=mask)
    if WRITES_B:
        tl.store(b_ptr + o, b.to(T), mask=mask)
    if WRITES_S1:
        tl.store(s1_ptr, n1.to(S1T))
    if WRITES_S2:
        tl.store(s2_ptr, n2.to(S2T))


def _partials(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK: tl.constexpr,
              NSUM: tl.constexpr, HAS_B: tl.constexpr, HAS_S1: tl.constexpr,
              HAS_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
              S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """:func:`_partials_kernel`'s program, its chunk's entries loaded ``VEC`` at a time."""
    p = tl.program_id(0)
    t, i, d, w_ptr, g_ptr, b_ptr = _row_at(PTR, CH_T, CH_I, COLS, p, NT, HAS_B, T, VEC)
    h, hc, k, kc = _hyper(K, H, t, ACC)
    s1_ptr, s2_ptr = _state_at(PTR, t, i, NT, S1T, S2T)
    st1, st2 = _load_state(s1_ptr, s2_ptr, HAS_S1, HAS_S2)
    start = tl.load(CH_J + p) * BLOCK
    o = tl.arange(0, BLOCK)
    w, g, b, mask = _load_row(w_ptr, g_ptr, b_ptr, start, o, d, HAS_B, ACC)
    b, terms = PRE(w, g, b, hc, kc, HAS_B, OPT)
    tl.static_assert(len(terms) == NSUM)
    s = _sum_all(terms)
    slot = SCR + p * (NSUM + 2)
    for j in tl.static_range(NSUM):
        tl.store(slot + j, s[j])
    tl.store(slot + NSUM, st1)
    tl.store(slot + NSUM + 1, st2)


def _row_sums(P, n, NSUM: tl.constexpr, PARTS: tl.constexpr):
    """The sums of a row's ``n`` chunks from their slots at ``P`` (``NSUM + 2`` values apart),
    ``PARTS`` chunks at a time, always in the same order: the same in every program of the row."""
    q = tl.arange(0, PARTS)
    s = ()
    for _j in tl.static_range(NSUM):
        s = s + (tl.full((), 0.0, tl.float64),)
    for first in range(0, n, PARTS):
        m = first + q < n
        part = ()
        for j in tl.static_range(NSUM):
            x = tl.load(P + (first + q) * (NSUM + 2) + j, mask=m, other=0.0)
            part = part + (tl.reduce(x, 0, _add),)
        s = _add_all(s, part)
    return s


def _reduce_kernel(SCR, FIRST, COUNT, NSUM: tl.constexpr, PARTS: tl.constexpr):
    """A long row's second launch, one program per row: the row's sums from its chunks' slots
    (in a fixed order), written over its first chunk's slot (each program reads and writes its
    own row's slots only)."""
    r = tl.program_id(0)
    slot = SCR + tl.load(FIRST + r) * (NSUM + 2)
    s = _row_sums(slot, tl.load(COUNT + r), NSUM, PARTS)
    for j in tl.static_range(NSUM):
        tl.store(slot + j, s[j])


def _update(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK: tl.constexpr,
            NSUM: tl.constexpr, HAS_B: tl.constexpr,
            HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, WRITES_W: tl.constexpr,
            WRITES_B: tl.constexpr, WRITES_S1: tl.constexpr,
            WRITES_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
            S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """:func:`_update_kernel`'s program, its chunk's entries loaded ``VEC`` at a time."""
    p = tl.program_id(0)
    t, i, d, w_ptr, g_ptr, b_ptr = _row_at(PTR, CH_T, CH_I, COLS, p, NT, HAS_B, T, VEC)
    h, hc, k, kc = _hyper(K, H, t, ACC)
    s1_ptr, s2_ptr = _state_at(PTR, t, i, NT, S1T, S2T)
    j = tl.load(CH_J + p)
    slot = SCR + (p - j) * (NSUM + 2)  # the row's first chunk's: the row's sums
    s = ()
    for q in tl.static_range(NSUM):
        s = s + (tl.load(slot + q),)
    st1 = tl.load(slot + NSUM)  # (the state before the step: the first launch's copy)
    st2 = tl.load(slot + NSUM + 1)
    c, n1, n2 = COEF(s, st1, st2, k, h, d, HAS_S1, HAS_S2, OPT)
    start = j * BLOCK
    o = tl.arange(0, BLOCK)
    w, g, b, mask = _load_row(w_ptr, g_ptr, b_ptr, start, o, d, HAS_B, ACC)
    b, terms = PRE(w, g, b, hc, kc, HAS_B, OPT)
    w, b = POST(w, g, b, _cast_all(c, ACC), hc, HAS_B, OPT)
    if WRITES_W:
        tl.store(w_ptr + start + o, w.to(T), mask=mask)
    if WRITES_B:
        tl.store(b_ptr + start + o, b.to(T), mask=mask)
    if j == 0:
        if WRITES_S1:
            tl.store(s1_ptr, n1.to(S1T))
        if WRITES_S2:
            tl.store(s2_ptr, n2.to(S2T))


def _aligned(PTR, TAB_T, COLS, r, NT, HAS_B: tl.constexpr, VEC: tl.constexpr):
    """Whether entry ``r`` of a table (a row, or a chunk of one) lies on 16-byte boundaries in
    the weights, gradients and buffer: their tensors' addresses multiples of 16 bytes and the
    row length a multiple of ``VEC`` entries (16 bytes), decided on the device by each program,
    as torch's multi-tensor apply does; a program then loads and stores 16 bytes at a time (the
    compiler cannot know it of addresses read from a table)."""
    t = tl.load(TAB_T + r)
    at = tl.load(PTR + t) | tl.load(PTR + NT + t)
    if HAS_B:
        at = at | tl.load(PTR + 2 * NT + t)
    return (at % 16 == 0) & (tl.load(COLS + t) % VEC == 0)


def _row_kernel(PTR, ROW_T, ROW_I, COLS, K, H, BLOCK: tl.constexpr,
                HAS_B: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
                WRITES_W: tl.constexpr, WRITES_B: tl.constexpr, WRITES_S1: tl.constexpr,
                WRITES_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
                S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """One program per row of at most ``BLOCK`` entries, held in registers: one read, one write
    (``VEC`` entries, 16 bytes, at a time where the row is so aligned: :func:`_aligned`)."""
    if _aligned(PTR, ROW_T, COLS, tl.program_id(0), NT, HAS_B, VEC):
        _rows(PTR, ROW_T, ROW_I, COLS, K, H, BLOCK, HAS_B, HAS_S1, HAS_S2, WRITES_W, WRITES_B,
              WRITES_S1, WRITES_S2, OPT, NT, T, S1T, S2T, ACC, VEC)
    else:
        _rows(PTR, ROW_T, ROW_I, COLS, K, H, BLOCK, HAS_B, HAS_S1, HAS_S2, WRITES_W, WRITES_B,
              WRITES_S1, WRITES_S2, OPT, NT, T, S1T, S2T, ACC, 1)


def _partials_kernel(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK: tl.constexpr,
                     NSUM: tl.constexpr, HAS_B: tl.constexpr, HAS_S1: tl.constexpr,
                     HAS_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
                     S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """A long row's first launch, one program per chunk (``BLOCK`` entries, chunk ``CH_J`` of its
    row): the chunk's sums (float64; ``PRE``'s buffer update is not written: the last launch
    takes it again) and its row's state before the step into its slot of ``SCR`` (``NSUM + 2``
    values); 16 bytes at a time where aligned (:func:`_aligned`)."""
    if _aligned(PTR, CH_T, COLS, tl.program_id(0), NT, HAS_B, VEC):
        _partials(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK, NSUM, HAS_B, HAS_S1, HAS_S2,
                  OPT, NT, T, S1T, S2T, ACC, VEC)
    else:
        _partials(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK, NSUM, HAS_B, HAS_S1, HAS_S2,
                  OPT, NT, T, S1T, S2T, ACC, 1)


def _update_kernel(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK: tl.constexpr,
                   NSUM: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, WRITES_W: tl.constexpr,
                   WRITES_B: tl.constexpr, WRITES_S1: tl.constexpr,
                   WRITES_S2: tl.constexpr, OPT: tl.constexpr, NT, T: tl.constexpr,
                   S1T: tl.constexpr, S2T: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr):
    """A long row's last launch, one program per chunk: the row's sums and its state before the
    step from its first chunk's slot, its coefficients, and the chunk's buffer update (``PRE``
    again, on the buffer as it was) and update, as the one-program form; the program of the
    row's first chunk writes the row's state; 16 bytes at a time where aligned
    (:func:`_aligned`)."""
    if _aligned(PTR, CH_T, COLS, tl.program_id(0), NT, HAS_B, VEC):
        _update(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK, NSUM, HAS_B, HAS_S1, HAS_S2,
                WRITES_W, WRITES_B, WRITES_S1, WRITES_S2, OPT, NT, T, S1T, S2T, ACC, VEC)
    else:
        _update(PTR, CH_T, CH_I, CH_J, COLS, K, H, SCR, BLOCK, NSUM, HAS_B, HAS_S1, HAS_S2,
                WRITES_W, WRITES_B, WRITES_S1, WRITES_S2, OPT, NT, T, S1T, S2T, ACC, 1)


# Triton math helpers of the rule definitions (rowrules' names, rebound)
def _sqrt(x):
    return tl.sqrt(x)  # (the coefficients are float64: correctly rounded)


def _cos(x):
    return tl.cos(x)


def _sin(x):
    return tl.sin(x)


def _where(cond, a, b):
    return tl.where(cond, a, b)


def _fabs(x):
    return tl.abs(x)


def _wide(x):
    return x.to(tl.float64)


def _safe_inv(x):
    return tl.where(x > 0, 1.0 / tl.maximum(x, TINY), 0.0)


_TRITON_HELPERS = {"sqrt": _sqrt, "cos": _cos, "sin": _sin, "where": _where, "fabs": _fabs,
                   "wide": _wide, "safe_inv": _safe_inv}


def _jit(fn, scope: dict, **options):
    """``fn``'s code compiled by Triton with the globals ``scope`` (the same source: Triton reads
    it from the function's file)."""
    import triton

    return triton.jit(rowrules.rebind(fn, scope), **options)


def _kernel(name: str, dtype: torch.dtype, form: str = "rows"):
    """Rule ``name``'s kernel for ``dtype`` parameters (its helpers' ``TINY``: see ``_build``),
    compiled, or interpreted under ``TRITON_INTERPRET=1``: ``form`` "rows" (:func:`_row_kernel`),
    "partials" (:func:`_partials_kernel`) or "update" (:func:`_update_kernel`).  The kernels call
    Triton's builtins only, none of ``triton.language``'s own jit functions (``tl.sum``,
    ``tl.zeros``, ``tl.cdiv``), which are interpreted only if ``TRITON_INTERPRET=1`` was set before
    triton was first imported: so the tests can interpret them in a process that imported triton
    before (torch does)."""
    return _build(name, dtype, os.environ.get("TRITON_INTERPRET") == "1")[form]


@functools.cache
def _build(name: str, dtype: torch.dtype, interpret: bool) -> dict:
    import triton
    import triton.language as tl

    # safe_inv's floor is that of the dtype the reference path inverts in: the per-row state's
    # and sums' (float32 for 16-bit parameters, whose float16 floor, 6e-5, cut AdamG*'s 1/√r4)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    scope = {"__name__": __name__, "tl": tl, "triton": triton,
             "TINY": tl.constexpr(torch.finfo(wide).tiny)}
    for key, fn in _TRITON_HELPERS.items():
        scope[key] = _jit(fn, scope)
    scope["sqnorm_of_sum"] = _jit(rowrules.sqnorm_of_sum, scope)
    for fn in (_add, _cast_all, _sum_all, _add_all, _load_row, _row_at, _hyper, _state_at,
               _load_state, _row_sums, _aligned):
        scope[fn.__name__] = _jit(fn, scope)
    rule = rowrules.RULES[name]
    kernel_scope = dict(scope, PRE=_jit(rule.pre, scope), COEF=_jit(rule.coef, scope),
                        POST=_jit(rule.post, scope))
    for fn in (_rows, _partials, _update):  # (a program's body: with the rule's functions)
        kernel_scope[fn.__name__] = _jit(fn, kernel_scope)
    return {form: _jit(fn, kernel_scope, do_not_specialize=["NT"]) for form, fn in
            (("rows", _row_kernel), ("partials", _partials_kernel), ("update", _update_kernel))} \
        | {"reduce": _jit(_reduce_kernel, scope)}


@functools.cache
def _nsum(name: str, has_b: bool, opt: bool) -> int:
    """How many sums rule ``name``'s ``pre`` gives: its definition run once with torch."""
    w, g, b = (torch.zeros(1, dtype=torch.float64) for _ in range(3))
    return len(rowrules.RULES[name].pre(w, g, b, [0.0] * 6, [0.0, 0.0], has_b, opt)[1])


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def state_fits(ws, b=None, s1=None, s2=None) -> bool:
    """Whether the state tensors are contiguous, on the views' device, of the sizes the kernel
    reads and writes, the buffers of the views' dtype and the per-row state of a dtype it takes."""
    dtype, device = ws[0].dtype, ws[0].device

    def ok(ts, size, dtypes):  # (one dtype per list: the kernel reads all as the first's)
        return ts is None or len({t.dtype for t in ts}) <= 1 and all(
            t.dtype in dtypes and t.is_contiguous() and t.device == device and t.numel() == size(w)
            for t, w in zip(ts, ws))

    rows = lambda w: w.shape[0]  # noqa: E731
    return ok(b, torch.numel, (dtype,)) and ok(s1, rows, TYPES) and ok(s2, rows, TYPES)


def run(kernel: str, ws, gs, *, b=None, s1=None, s2=None, k=None, h=()) -> bool:
    """Rule ``kernel`` (:data:`psiopt.optim.rowrules.RULES`) on the views ``ws``, arguments as
    :func:`psiopt.optim.kernels.run`: one launch (four with rows longer than
    :data:`MAX_BLOCK`).  ``False``, changing nothing, when a state tensor does not fit
    (:func:`state_fits`)."""
    if not state_fits(ws, b, s1, s2):
        return False
    from .kernels import scalars

    b, s1, s2 = b or [], s1 or [], s2 or []
    device = ws[0].device  # h and k made there without a host synchronisation
    opt, h, k = rowrules.option(kernel, h), rowrules.hyper_tensor(h, device), scalars(k, device)
    if torch.compiler.is_compiling():
        triton_rows(kernel, ws, gs, b, s1, s2, k, h, opt)
    else:
        _launch(kernel, ws, gs, b, s1, s2, k, h, opt)
        torch.autograd.graph.increment_version([*ws, *b, *s1, *s2])
    return True


def _launch(kernel, ws, gs, b, s1, s2, k, h, opt) -> None:
    """The step: at most four launches whatever the number of tensors (rows of at most
    :data:`MAX_BLOCK` entries: one; longer rows: three, of one program per chunk, per row, per
    chunk); ``h`` (float64,
    six entries) and ``k`` on the parameters' device, loaded by the kernels (nothing read on the
    host), ``opt`` the rule's static option."""
    rule = rowrules.RULES[kernel]
    device, dtype, n = ws[0].device, ws[0].dtype, len(ws)
    rows = [w.shape[0] for w in ws]
    cols = [w.numel() // w.shape[0] for w in ws]
    chunk = MAX_BLOCK
    short = [d for d in cols if d <= chunk]
    nshort = sum(r for r, d in zip(rows, cols) if d <= chunk)
    parts = [-(-d // chunk) for d in cols if d > chunk]  # chunks per long row
    nchunks = sum(r * -(-d // chunk) for r, d in zip(rows, cols) if d > chunk)
    nlong = sum(r for r, d in zip(rows, cols) if d > chunk)
    table = rowrules.on_device(("rows", tuple(rows), tuple(cols), chunk),
                               lambda: _row_map(rows, cols, chunk), device)
    addresses = [t.data_ptr() for t in ws] + [t.data_ptr() for t in gs] + \
        [t.data_ptr() for t in b or ws] + [t.data_ptr() for t in s1 or ws] + \
        [t.data_ptr() for t in s2 or ws]
    ptr = rowrules.on_device(("ptr", tuple(addresses)),
                             lambda: torch.tensor(addresses, dtype=torch.int64), device)
    hs = h.to(device, torch.float64, non_blocking=True).contiguous()
    ks = _per_tensor(k, n, device)
    flags = dict(HAS_B=bool(b), HAS_S1=bool(s1), HAS_S2=bool(s2), OPT=bool(opt), NT=n,
                 T=_triton_dtype(dtype), S1T=_triton_dtype(s1[0].dtype if s1 else dtype),
                 S2T=_triton_dtype(s2[0].dtype if s2 else dtype),
                 ACC=_triton_dtype(torch.float64 if dtype == torch.float64 else torch.float32),
                 VEC=16 // ws[0].element_size())
    writes_w, writes_b = rowrules.stores(kernel, bool(b), bool(opt))
    writes = dict(WRITES_W=writes_w, WRITES_B=writes_b, WRITES_S1=bool(s1) and rule.writes_s1,
                  WRITES_S2=bool(s2) and rule.writes_s2)
    # (on the parameters' GPU: Triton launches on the current device's current stream)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if nshort:  # one program per row, the row in registers
            block = max(16, 1 << max(0, (max(short) - 1).bit_length()))
            _kernel(kernel, dtype, "rows")[(nshort,)](
                ptr, table[0], table[1], table[3], ks, hs, BLOCK=block, **writes, **flags,
                **launch_options(block))
        if nchunks:  # per chunk: sums; per row: their sum; per chunk: coefficients and update
            nsum = _nsum(kernel, bool(b), bool(opt))
            scratch = torch.empty(nchunks * (nsum + 2), dtype=torch.float64, device=device)
            chunks = (table[0, nshort:], table[1, nshort:], table[2, nshort:], table[3])
            _kernel(kernel, dtype, "partials")[(nchunks,)](
                ptr, *chunks, ks, hs, scratch, BLOCK=chunk, NSUM=nsum, **flags,
                **launch_options(chunk))
            together = min(MAX_PARTS, 1 << (max(parts) - 1).bit_length())  # chunks' sums at once
            _kernel(kernel, dtype, "reduce")[(nlong,)](
                scratch, table[4], table[5], NSUM=nsum, PARTS=together, **launch_options(together))
            _kernel(kernel, dtype, "update")[(nchunks,)](
                ptr, *chunks, ks, hs, scratch, BLOCK=chunk, NSUM=nsum, **writes, **flags,
                **launch_options(chunk))


def launch_options(block: int) -> dict:
    """Triton's compile options for a kernel of ``block`` entries per program:

    * ``num_warps``: ``block // 256``, 1 to 16 (eight entries per thread from 256 entries on,
      fewer below).  With Triton's default four warps a block of 4096 entries took ptxas's 255
      registers and spilled (sm_90, triton 3.9: 48 bytes of stack for PSI-SGD's float32 kernel,
      352 for float64); so, every rule's one-program kernel takes 37 to 150 registers at blocks
      of 16 to 4096 entries (float32, bfloat16, float64), without a spill but two of
      SGDG/AdamG's kernels at 4096 entries, where sixteen warps leave a thread 128 registers
      (float64 rows: 96 bytes of stack, 56 with the one body of a kernel before 16-byte rows
      had their own; the bfloat16 chunks' update: 80, 40 of them libdevice's sin/cos;
      ``tests/test_triton.py::test_every_kernel_compiles_for_a_gpu`` checks the stacks).
      Chosen from ptxas's counts, not timed: only a GPU can tell the fastest;
    * ``enable_fp_fusion=False``: no fused multiply-add contracted from a product and a sum, so
      that the compiled kernel rounds each operation of the rule's definition as Triton's
      interpreter (the CPU tests) and the reference path's torch operations do (and Triton
      warns when the choice is left to its default, which changes in Triton 3.10).

    Taken at launch by the compiled kernels; the interpreter ignores them."""
    return {"num_warps": min(16, max(1, block // 256)), "enable_fp_fusion": False}


def _per_tensor(k, n: int, device) -> torch.Tensor:
    """The per-tensor scalars as the kernels read them, ``(n, 2)`` float64 rows on ``device``:
    ``k`` as :func:`psiopt.optim.kernels.scalars` made it (a kept tensor for numbers: no
    launch), or zeros where there is none (kept too)."""
    if k is None:
        return rowrules.on_device(("zeros", n), lambda: torch.zeros(n, 2, dtype=torch.float64), device)
    if tuple(k.shape) != (n, 2):
        raise ValueError(f"per-tensor scalars of shape {tuple(k.shape)}, not ({n}, 2)")
    return k.to(device, torch.float64, non_blocking=True).contiguous()


def _row_map(rows, cols, chunk) -> torch.Tensor:
    """``(6, L)`` int64: the rows of at most ``chunk`` entries (each one's tensor and index in
    it), then the chunks of the longer rows (each one's tensor, row index and number in its row,
    a row's chunks in order); row 3, first ``n`` entries: each tensor's row length; rows 4 and
    5: each longer row's first chunk (among the chunks) and number of chunks."""
    n = len(rows)
    short = [i for i in range(n) if cols[i] <= chunk]
    long = [i for i in range(n) if cols[i] > chunk]
    t, i, j = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)], []
    for x in short:
        t.append(torch.full((rows[x],), x, dtype=torch.int64))
        i.append(torch.arange(rows[x]))
    j.append(torch.zeros(sum(rows[x] for x in short), dtype=torch.int64))
    for x in long:
        m = -(-cols[x] // chunk)
        t.append(torch.full((rows[x] * m,), x, dtype=torch.int64))
        i.append(torch.arange(rows[x]).repeat_interleave(m))
        j.append(torch.arange(m).repeat(rows[x]))
    t, i, j = torch.cat(t), torch.cat(i), torch.cat(j)
    counts = torch.tensor([-(-cols[x] // chunk) for x in long for _ in range(rows[x])],
                          dtype=torch.int64)
    out = torch.zeros(6, max(len(t), n), dtype=torch.int64)
    out[0, : len(t)], out[1, : len(t)], out[2, : len(t)] = t, i, j
    out[3, :n] = torch.tensor(cols)
    out[4, : len(counts)] = torch.cumsum(counts, 0) - counts  # each long row's first chunk
    out[5, : len(counts)] = counts  # and its number of chunks
    return out


# the op ``torch.compile`` traces (CPU: Triton's interpreter, in the tests)
rowrules.declare_op("triton_rows", lambda *args: _launch(*args), ("CUDA", "CPU"))
triton_rows = torch.ops.psiopt.triton_rows.default
