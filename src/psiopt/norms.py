"""Normalisation layers that are exactly scale-invariant, and how far a model's inputs sit from eps.

A normalisation divides by ``√(σ² + eps)``.  When its input is ``z = W x`` with a scale-invariant
``W``, the constant ``eps`` breaks the invariance of the rows whose variance is not far above it:
a row that starts or becomes tiny shrinks the layer's output with it (Arora, Li & Lyu 2019,
eq. (7)), and psiopt's quotient methods, which keep each row's norm, keep it there.  Their eq. (8)
replaces ``eps`` by ``eps·‖w‖²`` (``‖w‖``: the norm of the group of rows that feeds the channel),

    (z − μ) / √(σ² + eps·‖w‖²),

which is exactly invariant.  The layers here compute it as torch's own normalisation of
``z / ‖w‖``::

    (z/‖w‖ − μ/‖w‖) / √(σ²/‖w‖² + eps) = (z − μ) / √(σ² + eps·‖w‖²)

so they keep torch's implementation, parameters, buffers and ``state_dict`` (the running
statistics of a BatchNorm are those of ``z/‖w‖``).  :func:`exact_norms_` converts a model's layers
in place after finding, numerically, which invariant weight group scales each layer's input;
:func:`eps_ratios` and :class:`EpsMonitor` say how far each layer's input variance sits above its
eps.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .optim.discovery import _call, _pristine, find_scale_invariant
from .optim.geometry import CANCELLED, is_invariant, norm, rows
from .optim.sharded import is_sharded

__all__ = ["ExactBatchNorm1d", "ExactBatchNorm2d", "ExactBatchNorm3d", "ExactGroupNorm",
           "ExactLayerNorm", "ExactRMSNorm", "exact_norms_", "eps_ratios", "EpsMonitor"]


class _Exact:
    """Normalise ``(x − b) / ‖w_g‖``: ``feeder`` lists ``(module, attribute)`` of the weight
    ``w`` whose groups (``grouping``) scale the input, and of the bias ``b`` added after it (or
    nothing), shaped as ``bias_shape`` (read from their module at every call, so that a
    parameter replaced since, ``load_state_dict(assign=True)``, is the one used; a plain list,
    so that they are not registered as this layer's submodules);
    ``group_index`` (a non-persistent buffer broadcastable to the input) gives the group of each
    entry.  Removing ``b`` changes nothing in train mode (the normalisation removes a constant
    per channel) and makes the running statistics those of ``W x / ‖w‖``, which no rescaling
    of ``w`` moves."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_scaled_input(self, x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps·‖w‖² (Arora eq. 8), grouping={self.grouping!r}"


class ExactBatchNorm1d(_Exact, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


class ExactBatchNorm2d(_Exact, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


class ExactBatchNorm3d(_Exact, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


class ExactGroupNorm(_Exact, nn.GroupNorm):
    """``nn.GroupNorm`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


class ExactLayerNorm(_Exact, nn.LayerNorm):
    """``nn.LayerNorm`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


class ExactRMSNorm(_Exact, nn.RMSNorm):
    """``nn.RMSNorm`` with ``eps·‖w‖²`` in the denominator (see the module docstring)."""


def _feeder(m: _Exact) -> list[Tensor]:
    """The weight (and bias) that feed ``m``, as their modules hold them now."""
    out = [getattr(module, attr) for module, attr in m.feeder]
    if any(is_sharded(t) for t in out):
        raise RuntimeError(f"{type(m).__name__}: its weight is sharded (FSDP2); exact "
                           "normalisation layers need the whole weight's row norms and do not "
                           "support FSDP2 (use them without sharding, or DDP)")
    return out


def _group_norms(m: _Exact, w: Tensor, dtype=None) -> Tensor:
    """‖w_g‖ of the group of each entry of ``m``'s input (shaped as ``group_index``)."""
    return norm(rows(w, m.grouping), dtype).reshape(-1)[m.group_index]


def _scaled_input(m: _Exact, x: Tensor) -> Tensor:
    w, *bias = _feeder(m)
    if bias:
        x = x - bias[0].reshape(m.bias_shape)
    return x / _group_norms(m, w).to(x.dtype)


#: torch's layer (exact type; subclasses may change ``forward``) -> its exact version
EXACT = {nn.BatchNorm1d: ExactBatchNorm1d, nn.BatchNorm2d: ExactBatchNorm2d,
         nn.BatchNorm3d: ExactBatchNorm3d, nn.GroupNorm: ExactGroupNorm,
         nn.LayerNorm: ExactLayerNorm, nn.RMSNorm: ExactRMSNorm}

#: relative tolerance of "the input entry was scaled by this group's factor" (float64)
_TOL = 1e-10


def _normalised_dims(m: nn.Module, ndim: int) -> list[int]:
    """The dimensions of the input that one normalisation statistic covers (channels of a
    GroupNorm: checked separately)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return [0, *range(2, ndim)]
    if isinstance(m, nn.GroupNorm):
        return list(range(2, ndim))
    return list(range(ndim - len(m.normalized_shape), ndim))


def _inputs(model: nn.Module, layers: dict[str, nn.Module], example_inputs) -> dict[str, Tensor]:
    """The input of every layer in one train-mode pass (seeded); a layer called more or less
    than once is left out."""
    seen: dict[str, list] = {name: [] for name in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
             for name, m in layers.items()]
    try:
        with torch.no_grad(), _pristine(model, training=True):
            _call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: xs[0] for name, xs in seen.items() if len(xs) == 1}


def _index(ratio: Tensor, factors: Tensor) -> Tensor | None:
    """The group of each entry of ``ratio`` (new input / old input, compacted), or ``None`` when
    an entry is not scaled by exactly one group's factor, or depends on the sample."""
    ratio = _compacted(ratio)
    if ratio.dim() == 0 or ratio.shape[0] != 1 or not torch.isfinite(ratio).all():
        return None
    close = (ratio.unsqueeze(-1) - factors).abs() <= _TOL * factors
    if not bool(close.any(-1).all()):
        return None
    return close.double().argmax(-1)


def _fits(m: nn.Module, index: Tensor, bias_shape: tuple | None) -> bool:
    """Is the scale constant along what each statistic of ``m`` covers (and a removed bias one
    value per channel of a BatchNorm)?"""
    if any(index.shape[d] > 1 for d in _normalised_dims(m, index.dim())):
        return False
    if bias_shape is not None and isinstance(m, nn.modules.batchnorm._BatchNorm) and bias_shape[1] != -1:
        return False
    if isinstance(m, nn.GroupNorm) and index.dim() > 1 and index.shape[1] > 1:
        blocks = index.reshape(index.shape[0], m.num_groups, -1, *index.shape[2:])
        return bool((blocks == blocks.narrow(2, 0, 1)).all())
    return True


def _compacted(t: Tensor, atol: float = 0.0) -> Tensor:
    for d in range(t.dim()):
        if t.shape[d] > 1 and torch.allclose(t, t.narrow(d, 0, 1), rtol=_TOL, atol=atol):
            t = t.narrow(d, 0, 1)
    return t


def _bias_shape(change: Tensor, delta: Tensor, scale: float) -> tuple | None:
    """How a bias shifted by ``delta`` reaches a layer's input (``change``, computed beside
    values as large as ``scale``): the shape that broadcasts it there, or ``None`` if it is not
    added as it is along one dimension."""
    atol = _TOL * scale
    change = _compacted(change, atol)
    wide = [d for d in range(change.dim()) if change.shape[d] > 1]
    if len(wide) != 1 or change.shape[wide[0]] != delta.numel():
        return None
    if not torch.allclose(change.reshape(-1), delta, rtol=_TOL, atol=atol):
        return None
    return tuple(-1 if d == wide[0] else 1 for d in range(change.dim()))


def _feeders(model: nn.Module, example_inputs, mapping: dict[str, str], layers: list[str]) -> dict:
    """``{layer name: (weight name, group index, bias name or None, bias shape)}`` for every
    layer whose input one invariant weight's groups scale exactly, around the bias added after
    it if that bias is cancelled.  On a float64 copy, for each weight in turn: its cancelled bias
    (if any) set to zero, then shifted (how it reaches each layer), then the weight's groups
    scaled by random factors (which layers' inputs follow them exactly)."""
    m64 = copy.deepcopy(model).double()
    many = isinstance(example_inputs, (tuple, list))
    x64 = [t.double() if isinstance(t, Tensor) and t.is_floating_point() else t
           for t in (example_inputs if many else [example_inputs])]
    x64 = x64 if many else x64[0]
    modules = dict(m64.named_modules())
    layers64 = {name: modules[name] for name in layers}
    params = dict(m64.named_parameters())
    gen = torch.Generator().manual_seed(0)
    found: dict[str, list] = {name: [] for name in layers}
    clean = None  # the inputs with every parameter as it is (the same for every weight)

    def inputs(p: Tensor | None = None, new: Tensor | None = None) -> dict[str, Tensor]:
        if p is None:
            return _inputs(m64, layers64, x64)
        saved = p.detach().clone()
        p.data.copy_(new)
        try:
            return _inputs(m64, layers64, x64)
        finally:
            p.data.copy_(saved)

    for pname, grouping in mapping.items():
        if not is_invariant(grouping):
            continue
        p = params[pname]
        bname = pname.rpartition(".")[0] + (".bias" if "." in pname else "bias")
        bias = params[bname] if mapping.get(bname) == CANCELLED and pname.endswith("weight") else None
        saved = None if bias is None else bias.detach().clone()
        shapes, reached = {}, set()
        try:
            if bias is not None:  # z = W x exactly: its ratios are exact
                bias.data.zero_()
                delta = torch.randn(bias.shape, generator=gen, dtype=torch.float64)
                base, shifted = inputs(), inputs(bias, delta)
                for name, x in base.items():
                    change, scale = shifted.get(name, x) - x, float(x.abs().max()) + float(delta.abs().max())
                    if bool((change.abs() > _TOL * scale).any()):
                        reached.add(name)  # how: a per-channel shift, or nothing is claimed
                        shape = _bias_shape(change, delta.reshape(-1), scale)
                        if shape is not None:
                            shapes[name] = shape
            else:
                clean = inputs() if clean is None else clean
                base = clean
            new = p.detach().clone()
            view = rows(new, grouping)  # (of a part: the other rows kept)
            factors = torch.exp(2 * torch.rand(view.shape[0], generator=gen, dtype=torch.float64) - 1)
            view.mul_(factors.view(-1, *[1] * (view.dim() - 1)).to(view.dtype))
            scaled = inputs(p, new)
        finally:
            if bias is not None:
                bias.data.copy_(saved)
        for name, x in base.items():
            if name in scaled and bool((x != 0).all()) and (name in shapes or name not in reached):
                index = _index(scaled[name] / x, factors)
                if index is not None:
                    found[name].append((pname, index, bname if name in shapes else None, shapes.get(name)))
    return {name: hits[0] for name, hits in found.items()
            if len(hits) == 1 and _fits(layers64[name], hits[0][1], hits[0][3])}


@torch.no_grad()
def exact_norms_(model: nn.Module, example_inputs) -> dict[str, str]:
    """Make every normalisation layer whose input one invariant weight scales exactly invariant
    in it (Arora et al. eq. (8), see the module docstring), in place; return ``{layer: weight}``.

    The layers keep their parameters, buffers and ``state_dict`` keys; the running statistics
    of a BatchNorm are divided by the groups' norms (its eval-mode outputs change only by the
    new eps term).  Only torch's own layer types are converted (a subclass may have its own
    ``forward``), each fed by one weight seen in one call; a layer psiopt cannot tie to one
    weight is left as it is.  Run it before wrapping the model in DDP and before building the
    optimizer, so that discovery sees the converted layers; FSDP2 is not supported (the layers
    need each whole row's norm).  The running statistics of a converted BatchNorm are those of
    ``(z − b)/‖w‖``: load a checkpoint of the unconverted model before converting, and one of
    a converted model into a converted model.
    """
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError("exact_norms_: FSDP2-sharded models are not supported (the layers need "
                         "each whole row's norm)")
    mapping = find_scale_invariant(model, example_inputs)
    layers = [name for name, m in model.named_modules() if type(m) in EXACT]
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = {}
    for name, (pname, index, bname, shape) in _feeders(model, example_inputs, mapping, layers).items():
        m, w = modules[name], params[pname]
        m.feeder = [_owner(modules, pname)] + ([_owner(modules, bname)] if bname else [])
        m.grouping, m.bias_shape = mapping[pname], shape
        m.register_buffer("group_index", index.to(w.device), persistent=False)
        if getattr(m, "running_mean", None) is not None:
            _follow(m, w, params[bname] if bname else None)
        m.__class__ = EXACT[type(m)]
        out[name] = pname
    return out


def _owner(modules: dict, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return modules[path], attr


def _follow(m: nn.Module, w: Tensor, bias: Tensor | None) -> None:
    """Running statistics of ``z`` made those of ``(z − b) / r`` (one value per channel)."""
    r = _group_norms(m, w.detach(), torch.float64).reshape(-1).expand(m.running_mean.numel())
    b = 0.0 if bias is None else bias.detach().double().reshape(-1)
    m.running_mean.copy_((m.running_mean.double() - b) / r)
    m.running_var.copy_(m.running_var.double() / r.square())


def _variances(m: nn.Module, x: Tensor) -> Tensor:
    """The variance each statistic of ``m`` sees (its mean square for RMSNorm), averaged over
    the samples: one value per BatchNorm channel, GroupNorm group, or one for the layer."""
    x = x.detach()
    if isinstance(m, _Exact):
        x = _scaled_input(m, x)
    x = x.float()
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return x.transpose(0, 1).flatten(1).var(1, unbiased=False)
    if isinstance(m, nn.GroupNorm):
        return x.reshape(x.shape[0], m.num_groups, -1).var(2, unbiased=False).mean(0)
    dims = _normalised_dims(m, x.dim())
    if isinstance(m, nn.RMSNorm):
        return x.square().mean(dims).mean().reshape(1)
    return x.var(dims, unbiased=False).mean().reshape(1)


def _eps(m: nn.Module, x: Tensor) -> float:
    eps = m.eps
    return torch.finfo(x.dtype).eps if eps is None else float(eps)  # RMSNorm's default


def _norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


@torch.no_grad()
def eps_ratios(model: nn.Module, example_inputs) -> dict[str, Tensor]:
    """Per normalisation layer, the variance of its input over its eps (one value per BatchNorm
    channel or GroupNorm group, one for a LayerNorm or RMSNorm), from one train-mode pass that
    leaves the model as it was.  Below 1, eps dominates: the rows feeding it are not
    scale-invariant (they shrink the output with them) and a method that keeps their norm keeps
    them there.  For an exact layer the variance is that of ``z/‖w‖``."""
    layers = _norm_layers(model)
    inputs = _inputs(model, layers, example_inputs)
    return {name: _variances(layers[name], x) / _eps(layers[name], x) for name, x in inputs.items()}


class EpsMonitor:
    """Forward hooks that record, in train-mode passes while :attr:`active`, each normalisation
    layer's input variance over its eps (as :func:`eps_ratios`), with no host synchronisation:
    call :meth:`below` (e.g. once an epoch) to count the groups under ``threshold`` in the last
    pass recorded.  Use as a context manager or call :meth:`remove`."""

    def __init__(self, model: nn.Module, active: bool = True):
        self.last: dict[str, Tensor] = {}
        self.active = active
        layers = _norm_layers(model).items()
        self._hooks = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers]

    def _hook(self, name: str):
        def hook(m, args):
            if self.active and m.training and isinstance(args[0], Tensor):
                with torch.no_grad():
                    self.last[name] = _variances(m, args[0]) / _eps(m, args[0])
        return hook

    def below(self, threshold: float = 1.0) -> tuple[int, int]:
        """``(groups whose ratio is under threshold, groups)`` in the last train-mode pass."""
        ratios = list(self.last.values())
        if not ratios:
            return 0, 0
        flat = torch.cat([r.reshape(-1) for r in ratios])
        return int((flat < threshold).sum()), flat.numel()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> EpsMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
