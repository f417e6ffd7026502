"""Fused per-row CPU kernels (``fused=True``, and the default on CPU where they apply).

An eager ``torch._foreach_*`` step reads a tensor once per operation, and a per-group reduction
has no foreach form (one kernel per tensor); a rule such as UN-SGD (an inner product, an update, a
norm, a rescale) then moves several times the memory of torch's SGD-momentum.  The kernels in
``kernels.c`` take each row of each tensor in turn, reduce it and update it while it sits in
cache: one read of ``w``, ``g`` and the buffer, one write of ``w`` and the buffer, and one call
for a whole group (the rows of all its tensors split among torch's threads by size).

Each rule is two passes over a row: its sums, then its update from coefficients derived from
them (``kernels.c`` says how); rows larger than the cache are split among the threads.
``kernels.c`` holds the loop over rows that every rule shares; each rule's ``pre``, ``coef``
and ``post`` are generated in C from its one definition (:mod:`psiopt.optim.rowrules`, by
:mod:`psiopt.optim.c_rows`) and compiled after it (:func:`source`).

The C source is compiled on first use with the system's C compiler (``$CC``, else ``cc``; about a
second) into ``$PSIOPT_CACHE_DIR`` (default ``~/.cache/psiopt``), keyed by the source, the
compiler, torch's version (the library links the OpenMP runtime torch loaded) and the CPU, and
loaded with :mod:`ctypes`.  Without a compiler, psiopt warns once and
the default steps take the foreach path; ``fused=True`` then raises.  The kernels take
float32/float64 CPU tensors whose groups are contiguous rows; other tensors of a group take the
foreach path.  Eager steps call them directly; ``torch.compile`` traces the op
``psiopt::fused_rows``, an opaque call in the graph that runs the same kernel.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import operator
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import c_rows, rowrules, triton_rows

_SOURCE = Path(__file__).with_name("kernels.c")
_TYPES = {torch.float32: ("float", "_f32", "FLT_MIN"), torch.float64: ("double", "_f64", "DBL_MIN")}
#: the dtypes the C kernels take
TYPES = frozenset(_TYPES)
_state: dict = {}  # "lib" once built, or "error"
_POINTER = next(c for c in "QLI" if array.array(c).itemsize == ctypes.sizeof(ctypes.c_void_p))


class _Args(ctypes.Structure):
    """``Args`` of ``kernels.c``."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "g", "b", "s1", "s2", "k", "rows", "cols")] + \
        [("kstride", ctypes.c_int64), ("h", ctypes.c_double * 6)]


def _cache_dir() -> Path:
    if os.environ.get("PSIOPT_CACHE_DIR"):
        return Path(os.environ["PSIOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "psiopt"


def _cpu() -> str:
    """The CPU's feature flags (the library is built with ``-march=native``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()


def source() -> str:
    """The kernels' C text: ``kernels.c`` and the rules generated from their definitions
    (:func:`psiopt.optim.c_rows.source`)."""
    return _SOURCE.read_text() + "\n" + c_rows.source()


def _compile(cc: list[str], flags: list[str], out: Path, tmp: Path) -> None:
    objects, text = [], tmp / "kernels.c"
    text.write_text(source())
    for real, suffix, tiny in _TYPES.values():
        obj = tmp / f"kernels{suffix}.o"
        _run([*cc, *flags, "-c", f"-DREAL={real}", f"-DNAME(x)=x##{suffix}", f"-DTINY={tiny}",
              str(text), "-o", str(obj)])
        objects.append(str(obj))
    _run([*cc, *flags, "-shared", *objects, "-o", str(out), "-lm"])


def _run(command: list[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=300).stdout


#: compiler flags, tried in order.  The sums are compute-bound on rows in cache: AVX-512
#: machines take them 512 bits wide, and reassociating them lets GCC keep several partial sums
#: (a single one waits on each addition: 1.5x slower on 512 rows of 4608 entries); NaN and inf
#: propagate as before (no -ffinite-math-only).  Compilers without OpenMP build one thread.
_FLAGS = [["-O3", "-march=native", "-mprefer-vector-width=512", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math", "-funroll-loops",
           "-fvariable-expansion-in-unroller", "-fopenmp"],
          ["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"]]


def _build() -> ctypes.CDLL:
    cc = shlex.split(os.environ.get("CC") or "cc")  # e.g. CC="ccache gcc"
    version = _run([*cc, "--version"])
    key = hashlib.sha256("\0".join([source(), Path(__file__).read_text(), *cc, version,
                                    torch.__version__, _cpu()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels-{key}.so"
    if path.exists():
        try:
            return ctypes.CDLL(str(path))
        except OSError:  # e.g. a cache on a noexec mount, a broken file: built again below
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out, errors = Path(tmp) / path.name, []
        for flags in _FLAGS:
            try:
                _compile(cc, [*flags, "-fPIC", "-std=c11"], out, Path(tmp))
                break
            except subprocess.CalledProcessError as e:
                errors.append(f"{' '.join(flags)}: {e.stderr.strip()[-600:]}")
        else:
            raise OSError("every set of compiler flags failed:\n" + "\n".join(errors))
        os.replace(out, path)  # atomic: concurrent processes each build, one file wins
    return ctypes.CDLL(str(path))


def load() -> ctypes.CDLL:
    """The kernels' library, built on first use; ``RuntimeError`` saying why if it cannot be."""
    if "lib" not in _state and "error" not in _state:
        try:
            _state["lib"] = _build()
        except (OSError, ValueError, subprocess.SubprocessError) as e:  # ValueError: a bad $CC
            detail = getattr(e, "stderr", None) or str(e)
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
            _state["error"] = f"psiopt could not build its fused CPU kernels: {detail.strip()[-2000:]}"
    if "error" in _state:
        raise RuntimeError(_state["error"])
    return _state["lib"]


def available() -> bool:
    """Whether the kernels are built (or can be); warns once, with the reason, if not."""
    if "lib" in _state:
        return True
    try:
        load()
        return True
    except RuntimeError as e:
        if not _state.get("warned"):
            _state["warned"] = True
            warnings.warn(f"{e}; steps take the foreach path (pass fused=False to silence this)",
                          RuntimeWarning, stacklevel=3)
        return False


#: step CPU tensors with the Triton kernels (:mod:`psiopt.optim.triton_rows`) rather than the C
#: ones: for tests, under Triton's interpreter (``TRITON_INTERPRET=1``); ``PSIOPT_TRITON_CPU=1``
#: sets it at import
TRITON_ON_CPU = os.environ.get("PSIOPT_TRITON_CPU") == "1"


def backend(t: torch.Tensor) -> str | None:
    """Which fused kernels step tensors like ``t``: ``"c"`` (``kernels.c``: float32/float64 CPU
    tensors), ``"triton"`` (:mod:`psiopt.optim.triton_rows`: float16/bfloat16/float32/float64
    CUDA tensors, when triton is importable; CPU tensors too with :data:`TRITON_ON_CPU`), or
    ``None``."""
    if t.is_cpu and not TRITON_ON_CPU:
        return "c" if t.dtype in _TYPES else None
    if t.is_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("PSIOPT_TRITON_CPU (kernels.TRITON_ON_CPU) runs the Triton kernels on CPU "
                           "tensors through Triton's interpreter: set TRITON_INTERPRET=1 too")
    if (t.is_cuda or t.is_cpu) and t.dtype in triton_rows.TYPES and triton_rows.importable():
        return "triton"
    return None


def fits(w: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a grouped view ``w`` (with gradient ``g``) is contiguous rows the kernels take."""
    return w.numel() > 0 and w.is_contiguous() and g.is_contiguous() and g.dtype == w.dtype


def state_fits(ws, b=None, s1=None, s2=None) -> bool:
    """Whether the state tensors (see :func:`run`) are contiguous CPU tensors of the views' dtype
    and of the sizes the kernels read and write (for the Triton kernels:
    :func:`triton_rows.state_fits`)."""
    if backend(ws[0]) == "triton":
        return triton_rows.state_fits(ws, b, s1, s2)
    dtype, rows = ws[0].dtype, [w.shape[0] for w in ws] if s1 or s2 else []

    def fit(ts, sizes) -> bool:  # (a comparison per tensor, no call: host time)
        return ts is None or all(t.dtype == dtype and t.is_contiguous() and t.is_cpu
                                 and t.numel() == n for t, n in zip(ts, sizes))

    return fit(b, [w.numel() for w in ws] if b else []) and fit(s1, rows) and fit(s2, rows)


def run(kernel: str, ws, gs, *, b=None, s1=None, s2=None, k=None, h=()) -> bool:
    """Run ``kernel`` of ``kernels.c`` on the views ``ws`` (gradients ``gs``): ``b`` full-size
    buffers, ``s1``/``s2`` per-row state (keepdim), ``k`` per-tensor scalars (a list of tuples of
    numbers, or of 0-d tensors: step counters while ``torch.compile`` traces the step or on a
    device), ``h`` hyperparameters (Python numbers, or 0-d tensors: a tensor ``lr``, see
    :func:`rowrules.hyper_tensor`).
    Returns ``False``, changing nothing, when a state tensor is not of the views' dtype or not
    contiguous (e.g. loaded from a checkpoint with other strides).  Traced by ``torch.compile``,
    it is one call of the op ``psiopt::fused_rows``, which runs the same kernel.  Tensors of the
    Triton backend (:func:`backend`) take :func:`triton_rows.run`."""
    if backend(ws[0]) == "triton":
        return triton_rows.run(kernel, ws, gs, b=b, s1=s1, s2=s2, k=k, h=h)
    if not state_fits(ws, b, s1, s2):
        return False  # e.g. state loaded from another model: the other paths say what is wrong
    b, s1, s2 = b or [], s1 or [], s2 or []
    opt, h = rowrules.option(kernel, h), rowrules.hyper_tensor(h, "cpu")
    if torch.compiler.is_compiling():  # the op declares what it mutates
        fused_rows(kernel, ws, gs, b, s1, s2, scalars(k), h, opt)
    else:  # no dispatch; the writes bump the tensors' versions, as in-place ops do
        _call(kernel, ws, gs, b, s1, s2, scalars(k), h, opt)
        torch.autograd.graph.increment_version([*ws, *b, *s1, *s2])
    return True


# ``torch.compile`` calls the kernel as the op ``psiopt::fused_rows``, declared with
# ``torch.library.Library`` (``torch.library.custom_op``'s Python wrappers cost 60-120 us a
# call, this about 6 us over the ctypes call)
rowrules.declare_op("fused_rows", lambda *args: _call(*args), ("CPU",))
fused_rows = torch.ops.psiopt.fused_rows.default


def scalars(k, device="cpu") -> torch.Tensor | None:
    """The per-tensor scalars ``k`` of :func:`run` (tuples of at most two numbers or 0-d
    tensors) as one float64 tensor ``(tensors, 2)`` on ``device`` (for the C kernels, the CPU),
    zeros after a tensor's own; or ``None``."""
    if not k:
        return None
    if max(map(len, k)) > 2:
        raise ValueError("the fused kernels take at most two scalars per tensor")
    types = {type(x) for row in k for x in row}  # (not an isinstance per number: host time)
    if not any(issubclass(t, torch.Tensor) for t in types):
        return rowrules.numbers_on([[float(x) for x in row] + [0.0] * (2 - len(row)) for row in k],
                                   device)
    return torch.stack([rowrules.hyper_tensor(row, device)[:2] for row in k])


def _call(kernel, ws, gs, b, s1, s2, k, h, opt=None) -> None:
    """Call ``kernel`` (an empty list for a tensor list the rule does not take); ``h`` the float64
    CPU tensor of :func:`rowrules.hyper_tensor`, read here (``opt``: the C kernel reads ``h``).
    The C arrays are :mod:`array` buffers, kept alive here for the call (filled from a list
    about twice as fast as ctypes arrays)."""
    n = len(ws)
    if k is None:  # zeros, as rowrules.evaluate takes (never a NULL the rule would read)
        k = torch.zeros(n, 2, dtype=torch.float64)
    arrays = [array.array(_POINTER, [t.data_ptr() for t in ts]) if ts else None
              for ts in (ws, gs, b, s1, s2)]
    rows = array.array("q", [w.shape[0] for w in ws])
    cols = array.array("q", map(operator.floordiv, map(Tensor.numel, ws), rows))
    args = _Args(*[None if a is None else a.buffer_info()[0] for a in arrays],
                 k.data_ptr(), rows.buffer_info()[0], cols.buffer_info()[0], k.shape[1],
                 (ctypes.c_double * 6)(*h.tolist()))
    fn = getattr(load(), kernel + _TYPES[ws[0].dtype][1])
    fn(ctypes.c_int(n), ctypes.byref(args), ctypes.c_int(torch.get_num_threads()))
