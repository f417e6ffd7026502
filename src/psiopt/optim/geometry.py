"""Per-group geometry shared by every optimizer.

A *grouping* says how a parameter splits into scale-invariant groups (SPEC §1):

* ``"channel"``  -- each output channel / neuron is one group (BatchNorm, InstanceNorm);
* ``"groups:G"`` -- G contiguous blocks of output channels (GroupNorm with G groups);
* ``"tensor"``   -- the whole tensor is one group (LayerNorm over the features);
* ``"cancelled"`` -- not a grouping: a bias whose effect the normalisation removes (never updated).

A suffix ``"@1"`` (``"channel@1"``, ``"groups:G@1"``) marks weights whose output channels lie on
dimension 1 (``ConvTranspose``).  A suffix ``"[a:b]"`` (``"groups:8[0:256]"``, ``"cancelled[128:256]"``)
applies the grouping to rows ``a`` to ``b − 1`` of dimension 0 only, a *part* of the tensor: the q
and k blocks of a fused qkv projection under per-head QK-norm, the key part of a fused qkv bias
under softmax; the other rows, its *rest* (:func:`rest`), are an ordinary parameter.
:func:`rows` turns a parameter into a *view* whose first dimension
indexes the groups; per-group scalars are kept with ``keepdim`` shape ``(R, 1, ..., 1)`` so they
broadcast against that view.  Nothing here copies a parameter or synchronises with the host.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

#: grouping of a parameter that has no effect on the output (a bias cancelled by the mean of the
#: normalisation that follows): psiopt optimizers never update it.
CANCELLED = "cancelled"


def is_invariant(grouping) -> bool:
    """True for a grouping that declares scale-invariant groups (not ``None``, not cancelled,
    whole or in part)."""
    return grouping is not None and split_part(grouping)[0] != CANCELLED


def split_part(grouping: str) -> tuple[str, tuple[int, int] | None]:
    """``(grouping of the part, (a, b))`` for ``"<grouping>[a:b]"``, else ``(grouping, None)``;
    ``ValueError`` for a malformed range."""
    if not isinstance(grouping, str) or not grouping.endswith("]"):
        return grouping, None
    body, _, span = grouping[:-1].partition("[")
    a, colon, b = span.partition(":")
    if not (body and colon and a.isdigit() and b.isdigit() and int(a) < int(b)) or "@" in body:
        raise ValueError(f"invalid grouping {grouping!r}: a part is written '<grouping>[a:b]' "
                         "with 0 <= a < b, rows a to b-1 of dimension 0 (not with '@1')")
    return body, (int(a), int(b))


def part(t: Tensor, grouping: str) -> Tensor:
    """The rows of ``t`` a grouping covers: ``t[a:b]`` for ``"<grouping>[a:b]"``, else ``t`` (a
    view; ``ValueError`` when ``t`` has fewer rows)."""
    _, span = split_part(grouping)
    if span is None:
        return t
    if t.dim() == 0 or t.shape[0] < span[1]:
        raise ValueError(f"grouping {grouping!r} needs at least {span[1]} rows, "
                         f"got shape {tuple(t.shape)}")
    return t[span[0]:span[1]]


def rest(t: Tensor, grouping: str) -> list[Tensor]:
    """The rows of ``t`` outside a part (``"<grouping>[a:b]"``): ``t[:a]`` and ``t[b:]`` where
    not empty, views; ``[]`` for a grouping of the whole tensor."""
    _, span = split_part(grouping)
    if span is None:
        return []
    return [v for v in (t[:span[0]], t[span[1]:]) if v.shape[0]]


def parse_grouping(grouping: str) -> tuple[str, int, int]:
    """Split a grouping string into ``(kind, blocks, channel_dim)`` (of the part, for a part);
    raise ``ValueError`` if bad."""
    if not isinstance(grouping, str):
        raise ValueError(f"grouping must be a string, got {grouping!r}")
    grouping, _ = split_part(grouping)
    if grouping == CANCELLED:
        return CANCELLED, 0, 0
    body, _, dim = grouping.partition("@")
    if dim not in ("", "1"):
        raise ValueError(f"grouping {grouping!r}: only '@1' may follow the kind")
    kind, _, count = body.partition(":")
    if kind in ("channel", "tensor") and not count:
        return kind, 0, int(dim or 0)
    if kind == "groups" and count.isdigit() and int(count) > 0:
        return kind, int(count), int(dim or 0)
    raise ValueError(
        f"invalid grouping {grouping!r}: expected 'channel', 'groups:G', 'tensor' (optionally '@1' "
        "or '[a:b]'), or 'cancelled[a:b]'"
    )


def rows(t: Tensor, grouping: str) -> Tensor:
    """View of ``t`` (of its part, for ``"<grouping>[a:b]"``) with one group per index of
    dimension 0 (never a copy)."""
    if grouping == "channel" and t.dim() > 1:
        return t  # the common case, no view needed
    kind, blocks, dim = parse_grouping(grouping)
    if kind == CANCELLED:
        raise ValueError(f"grouping {grouping!r} has no scale-invariant groups")
    t = part(t, grouping)
    if kind == "tensor":
        return t.unsqueeze(0)
    if t.dim() <= dim:
        raise ValueError(f"grouping {grouping!r} needs a tensor with more than {dim} dimensions")
    v = t.transpose(0, dim) if dim else t
    if kind == "groups":
        if v.shape[0] % blocks:
            raise ValueError(f"grouping {grouping!r}: {v.shape[0]} channels do not split into {blocks}")
        v = v.unflatten(0, (blocks, -1))
    return v if v.dim() > 1 else v.unsqueeze(1)


def _dims(v: Tensor) -> tuple[int, ...]:
    return tuple(range(1, v.dim()))


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-group inner product ``<a_i, b_i>`` in keepdim shape."""
    return torch.mul(a, b).sum(_dims(a), keepdim=True)


def sqnorm(a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-group squared norm ``‖a_i‖²`` in keepdim shape (in ``dtype`` if given)."""
    return norm(a, dtype).square()


def norm(a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-group norm ``‖a_i‖`` in keepdim shape (in ``dtype`` if given: torch reduces a copy of
    ``a`` in ``dtype``, but from float16/bfloat16 to float32)."""
    return torch.linalg.vector_norm(a, dim=_dims(a), keepdim=True, dtype=dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-group scalars of ``dtype`` tensors are kept in: float32 for float16 and
    bfloat16 (as torch's own reductions accumulate), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def group_size(v: Tensor) -> int:
    """Number of entries ``d`` of one group of the view ``v``."""
    return math.prod(v.shape[1:])


def safe_inv(b: Tensor) -> Tensor:
    """``1 / b`` where ``b > 0`` and 0 where ``b == 0``: zero groups never produce NaN."""
    return torch.where(b > 0, b.clamp_min(torch.finfo(b.dtype).tiny).reciprocal(),
                       torch.zeros_like(b))


def sqnorm_of_sum(a, b, xx: Tensor, xy: Tensor, yy: Tensor) -> Tensor:
    """``‖a x + b y‖²`` per group from ``‖x‖², <x, y>, ‖y‖²`` (``a``, ``b``: numbers or per-group
    tensors), clamped at 0 against rounding: how fused reductions derive a norm after a step."""
    return (xx * (a * a) + xy * (2 * a * b) + yy * (b * b)).clamp_min_(0)


def normalize_(v: Tensor) -> Tensor:
    """Scale every group of the view ``v`` to unit norm in place; zero groups stay zero."""
    return v.mul_(safe_inv(norm(v)))


def tangent(y: Tensor, g: Tensor) -> Tensor:
    """``proj(y, g) = g − <y, g> y`` for unit rows ``y`` (new tensor)."""
    return torch.addcmul(g, y, dot(y, g), value=-1.0)


def sphere_exp(y: Tensor, h: Tensor) -> Tensor:
    """Exponential map ``y cos‖h‖ + h sin‖h‖/‖h‖`` on the unit sphere, renormalised (new tensor).

    The renormalisation is a no-op in exact arithmetic; in floating point the sphere is not a
    stable set of SGDG/AdamG with Cho & Lee's orthogonality penalty (a norm error feeds back
    through the projected penalty into the momentum and grows geometrically: rows of norm 13–50
    after 1000 steps without it, ``tests/test_theory.py``)."""
    n = norm(h)
    out = torch.addcmul(y * torch.cos(n), h, torch.sinc(n / math.pi))
    return normalize_(out)


def transport_self(y: Tensor, h: Tensor) -> Tensor:
    """Parallel transport of ``h`` along the geodesic ``exp(y, t h)`` to ``t = 1``:
    ``(u cos‖h‖ − y sin‖h‖)‖h‖`` with ``u = h/‖h‖`` (new tensor)."""
    n = norm(h)
    return torch.addcmul(h * torch.cos(n), y, -n * torch.sin(n))


def transport(y: Tensor, h1: Tensor, h2: Tensor) -> Tensor:
    """Transport of ``h1`` along ``exp(y, t h2)``:
    ``h1 − <u, h1>(y sin‖h2‖ + u(1 − cos‖h2‖))`` with ``u = h2/‖h2‖`` (new tensor)."""
    n = norm(h2)
    c = dot(h2, h1)
    sinc = torch.sinc(n / math.pi)
    half = 0.5 * torch.sinc(n / (2 * math.pi)) ** 2  # (1 − cos n)/n²
    out = torch.addcmul(h1, y, -c * sinc)
    return out.addcmul_(h2, -c * half)


def clip(h: Tensor, limit: float) -> Tensor:
    """``h · min(1, limit/‖h‖)`` per group (new tensor).  ``‖h‖`` is taken in float64, as the
    fused kernels' sums (a float64 copy of ``h`` for the reduction): a float32 (float16) ``h``
    whose norm leaves its dtype's range is clipped to ``limit``, not stopped (``limit/inf = 0``).
    The factor is applied in float32 for float16/bfloat16 ``h`` (:func:`accumulate_dtype`; a
    float16 factor below 6e-5 lost its bits, and was 0 below 6e-8) and the product rounded."""
    factor = (limit / norm(h, torch.float64)).clamp_max(1.0).to(accumulate_dtype(h.dtype))
    return (h * factor).to(h.dtype)


def orthogonality_residual(y: Tensor) -> Tensor | None:
    """``(YYᵀ − I) Y`` for the rows of the matrix ``y`` (``None`` for a single row)."""
    return None if y.shape[0] == 1 else torch.addmm(y, y @ y.T, y, beta=-1.0)


def add_orthogonality_residual(g: Tensor, y: Tensor, alpha: float) -> Tensor:
    """``g + α (YYᵀ − I) Y`` for the rows of the matrix ``y`` (``g`` for a single row), as one
    matrix product into a copy of ``g``: one full-size temporary, no residual beside it."""
    if y.shape[0] == 1:
        return g
    gram = y @ y.T
    gram.diagonal().sub_(1.0)
    return torch.addmm(g, gram, y, alpha=alpha)


def rescale_transport(a: Tensor, x_old: Tensor, x_new: Tensor) -> Tensor:
    """Roburin eq. (18): ``(<x_new, x_old> a − <x_new, a> x_old) / <x_new, x_new>`` (new tensor;
    the inner products in :func:`accumulate_dtype`: ‖x‖² leaves float16's range past 256)."""
    wide = x_new.to(accumulate_dtype(x_new.dtype))
    out = a * dot(wide, x_old)
    out.addcmul_(x_old, dot(wide, a), value=-1.0)
    return out.mul_(safe_inv(sqnorm(wide)))


class RowLayout:
    """Per-group scalars of a fixed list of grouped views, kept as one flat tensor.

    A flat tensor holds one scalar per group of every view, in order; :meth:`split` gives its
    keepdim views per tensor (no copy), so per-group arithmetic is a few ops on the flat tensor and
    applying it to the tensors is one ``torch._foreach_*`` call.  The layout holds the views'
    shapes, dtype and device only (no tensor): every method returns a new tensor owned by the
    caller, nothing is shared between calls.

    Per-group scalars of float16/bfloat16 views are float32 (:func:`accumulate_dtype`): the
    rules derive some of them by subtraction (``‖w − ηb‖² = ‖w‖² − 2η<w, b> + η²‖b‖²``), which
    cancels to nothing at bfloat16's 8 or float16's 11 bits of mantissa; inner products take
    their products in float32.

    :attr:`fuse_reductions`: whether rules should take every per-group sum of a step at once
    (:meth:`sums`) and derive the later ones, rather than reduce again after the update.
    """

    _fuse = False  # set by ShardedLayout for groups that span ranks

    @property
    def fuse_reductions(self) -> bool:
        """Under FSDP2 fused reductions save collectives, and under ``torch.compile`` the compiler
        fuses them into the update (and inductor's CPU backend fails on some sequential forms:
        "KeyError: 'bufN'" in its outer-loop fusion).  In one eager process they cost more than
        they save (an inner product is a full-size product and a sum, about 4× a norm on CPU)."""
        return self._fuse or torch.compiler.is_compiling()

    def __init__(self, views: list[Tensor]):
        self.sizes = [v.shape[0] for v in views]
        self.shapes = [(v.shape[0],) + (1,) * (v.dim() - 1) for v in views]
        self.dims = [_dims(v) for v in views]
        self.group_sizes = [group_size(v) for v in views]
        self.dtype, self.device = accumulate_dtype(views[0].dtype), views[0].device
        ndims = {len(s) for s in self.shapes}
        self._ones = (1,) * (ndims.pop() - 1) if len(ndims) == 1 else None  # views of one ndim

    def single(self, index: int, view: Tensor) -> RowLayout:
        """The layout of view ``index`` (``view``) alone: its reductions as this layout takes
        them (a :class:`~psiopt.optim.sharded.ShardedLayout`'s across ranks)."""
        return RowLayout([view])

    def split(self, flat: Tensor) -> list[Tensor]:
        """Keepdim per-tensor views of a flat per-group tensor (no copy)."""
        if self._ones is not None:  # one view and one split, not one view per tensor
            return list(flat.view(-1, *self._ones).split(self.sizes))
        return [c.view(s) for c, s in zip(flat.split(self.sizes), self.shapes)]

    def _reduce(self, op, *lists: list[Tensor], out: Tensor | None = None) -> Tensor:
        """Per-group ``op`` of each tensor into one flat tensor.  Compiled, the results are
        returned as they are (no ``out=``): inductor then fuses a tensor's reductions with the
        update that reads them, one loop over the rows (see ``compile_per_tensor``)."""
        if torch.compiler.is_compiling():
            parts = [op(*args, dims).reshape(-1) for args, dims in zip(zip(*lists), self.dims)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        flat = torch.empty(sum(self.sizes), dtype=self.dtype, device=self.device) if out is None else out
        for args, o, dims in zip(zip(*lists), self.split(flat), self.dims):
            op(*args, dims, o)
        return flat

    @staticmethod
    def _blas(out, *xs) -> bool:
        """One contiguous group ("tensor" grouping) of a BLAS dtype, written into a flat tensor:
        BLAS's dot reads it once, without a temporary, about 3× as fast as a norm kernel and 2×
        as fast as a product and a sum (1024×1024, float32, CPU)."""
        return out is not None and len({x.dtype for x in xs}) == 1 and all(
            x.shape[0] == 1 and x.is_contiguous() and x.dtype in (torch.float32, torch.float64)
            for x in xs)

    @classmethod
    def _norm(cls, x, dims, out=None, dtype=None):
        if cls._blas(out, x) and dtype in (None, x.dtype):
            return cls._sqnorm(x, dims, out).sqrt_()
        return torch.linalg.vector_norm(x, dim=dims, keepdim=True,
                                        dtype=dtype or accumulate_dtype(x.dtype), out=out)

    @classmethod
    def _sqnorm(cls, x, dims, out=None, dtype=None):
        if cls._blas(out, x) and dtype in (None, x.dtype):
            return torch.dot(x.view(-1), x.view(-1), out=out.view(()))
        return cls._norm(x, dims, out, dtype).square_()

    @classmethod
    def _dot(cls, x, y, dims, out=None):
        if cls._blas(out, x, y):
            return torch.dot(x.view(-1), y.view(-1), out=out.view(()))
        x = x.to(accumulate_dtype(x.dtype))  # half precision: exact products (a float32 copy)
        return torch.sum(torch.mul(x, y), dim=dims, keepdim=True, out=out)

    def norms(self, xs: list[Tensor]) -> Tensor:
        """Flat per-group norms ``‖x_i‖`` (one reduction per tensor)."""
        return self._reduce(self._norm, xs)

    def dots(self, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        """Flat per-group inner products ``<x_i, y_i>``."""
        return self._reduce(self._dot, xs, ys)

    def sums(self, pairs: list[tuple[list[Tensor], list[Tensor]]], apart: bool = False,
             dtype: torch.dtype | None = None) -> Tensor:
        """Per-group sums ``Σ x_i y_i`` of several pairs of lists at once, as a ``(k, groups)``
        tensor (row ``j`` for pair ``j``; a pair ``(xs, xs)`` gives squared norms).  ``dtype``:
        the sums' dtype where it is not the layout's, for squared norms only (``float64``: a
        float32 norm that would leave float32's range; torch reduces a float64 copy of each
        tensor, one at a time).  With
        :attr:`fuse_reductions` a rule takes every scalar of its step from one call and derives
        the later ones algebraically (e.g. ``‖w − ηb‖² = ‖w‖² − 2η<w, b> + η²‖b‖²``): under
        FSDP2, one collective per step (:class:`~psiopt.optim.sharded.ShardedLayout`).

        Compiled, a list of ``k`` flat tensors (they unpack alike), or with ``apart`` one
        stacked tensor, which keeps inductor from fusing the reductions with the update: rules
        that update a momentum buffer and then the weights from it need that (torch 2.13, CPU:
        "KeyError: 'bufN'" in inductor's outer-loop fusion, a write-after-read dependency its
        local-buffer check does not expect)."""
        if dtype not in (None, self.dtype) and any(xs is not ys for xs, ys in pairs):
            raise ValueError("RowLayout.sums: another dtype is for squared norms only")
        sqnorm = functools.partial(self._sqnorm, dtype=dtype)
        if torch.compiler.is_compiling():  # straight from the reductions (see _reduce)
            flats = [self._reduce(sqnorm, xs) if xs is ys and dtype is not None
                     else self._reduce(self._dot, xs, ys) for xs, ys in pairs]
            return torch.stack(flats) if apart else flats
        flat = torch.empty(len(pairs), sum(self.sizes), dtype=dtype or self.dtype, device=self.device)
        for (xs, ys), out in zip(pairs, flat):
            if xs is ys:
                self._reduce(sqnorm, xs, out=out)
            else:
                self._reduce(self._dot, xs, ys, out=out)
        return flat

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """Concatenate per-tensor keepdim scalars (e.g. state) into one flat tensor (a copy, in
        the layout's dtype)."""
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.dtype)

    def orthogonality_residual(self, index: int, y: Tensor) -> Tensor | None:
        """:func:`orthogonality_residual` of view ``index`` flattened to the matrix ``y``."""
        return orthogonality_residual(y)

    def rows_and_size(self, index: int) -> tuple[int, int]:
        """``(groups, entries per group)`` of the whole tensor of view ``index``."""
        return self.sizes[index], self.group_sizes[index]

    def scale_per_tensor_(self, flat: Tensor, values: list) -> Tensor:
        """Multiply the groups of tensor ``i`` by ``values[i]``, in place: Python numbers, or 0-d
        tensors (step counters while ``torch.compile`` traces a step)."""
        if not any(isinstance(v, Tensor) for v in values):
            torch._foreach_mul_(self.split(flat), values)
            return flat
        factors = torch.stack([torch.as_tensor(v).to(flat, non_blocking=True) for v in values])
        return flat.mul_(torch.cat([f.expand(n) for f, n in zip(factors, self.sizes)]))


def geodesic_step_(ys: list[Tensor], ms: list[Tensor], k: Tensor, layout: RowLayout,
                   sums: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Vectorized ``y ← exp(y, k m)`` and ``m ← pt(y, k m)/k`` for unit rows ``y`` (in place).

    With ``n = |k|‖m‖``, ``c = cos n``, ``σ = k sinc(n)`` and ``τ = −k‖m‖² sinc(n)`` the step is
    the rotation ``(y, m) ← (c y + σ m, τ y + c m)`` (renormalised, see :func:`sphere_exp`):
    :func:`sphere_exp` with :func:`transport_self` (``k = 1``, SGDG) and with :func:`transport`
    for ``h1 = m``, ``h2 = k m`` (AdamG).  ``k`` is a flat per-group tensor.  It is applied as
    three shears, in place and without a temporary::

        y ← y + A m;   m ← m + B y;   y ← y + A m      A = σ/(1 + c),  B = τ

    (``1 + AB = c``, ``A(2 + AB) = σ``); where ``c < 0`` the rotation is minus the one by
    ``n − π``, whose shears are taken and the signs restored, so that ``|A|‖m‖ ≤ 1`` and the
    shears stay well conditioned at every angle.  ``sums``: ``(‖y‖², <y, m>, ‖m‖²)`` taken
    before the step (:attr:`RowLayout.fuse_reductions`), from which the new row's norm is
    derived; without them ``‖m‖`` and the new row's norm are reduced.
    """
    mm = layout.norms(ms).square_() if sums is None else sums[2]
    n = mm.sqrt() * k.abs()
    cos, sinc = torch.cos(n), torch.sinc(n / math.pi)
    sign = torch.where(cos < 0, -1.0, 1.0).to(cos)
    sigma = k * sinc
    a, b = layout.split(sign * sigma / (1.0 + cos.abs())), layout.split(-sign * k * mm * sinc)
    torch._foreach_addcmul_(ys, ms, a)
    torch._foreach_addcmul_(ms, ys, b)
    torch._foreach_addcmul_(ys, ms, a)
    torch._foreach_mul_(ms, layout.split(sign))
    inv = safe_inv(layout.norms(ys) if sums is None else
                   sqnorm_of_sum(cos, sigma, sums[0], sums[1], mm).sqrt_())
    torch._foreach_mul_(ys, layout.split(inv.mul_(sign)))
