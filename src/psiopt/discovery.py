"""Exact, structural discovery of scale-invariant parameters (SPEC §1) and its numerical check.

:func:`find_scale_invariant` runs one forward pass in train mode with forward hooks on the weight
layers (Linear, Conv, ConvTranspose) and the normalisation layers (BatchNorm, InstanceNorm,
GroupNorm, LayerNorm, RMSNorm), and reads the autograd graph of that pass.  A weight is invariant
when, at every one of its uses, the layer's output goes straight into a normalisation layer and
nowhere else, and a bias (if any) is cancelled by that normalisation.  Nothing is guessed from
gradients, Python control flow in ``forward`` is fine (the real pass is recorded), and the model's
buffers, train/eval flags and random state are left as they were.  Weights of other layer types,
or used functionally outside their module, are reported as not invariant (the safe answer);
declare them by hand with ``overrides`` and confirm with :func:`check_invariance`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves

from .geometry import norm, normalize_, parse_grouping, rows

_LAYERS = (nn.Linear, _ConvNd)
_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _outputs(out) -> list[Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def _pristine(model: nn.Module, seed: int = 0):
    """Train mode and a fixed seed inside; modes, buffers and RNG state restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _graph(roots: list[Tensor]) -> tuple[Counter, dict[int, object]]:
    """Consumer count of every autograd node, and the AccumulateGrad node of every leaf."""
    counts: Counter = Counter(t.grad_fn for t in roots if t.grad_fn is not None)
    leaves, seen = {}, set()
    stack = list(counts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves[id(node.variable)] = node
        for child, _ in node.next_functions:
            if child is not None:
                counts[child] += 1
                stack.append(child)
    return counts, leaves


def _reduced_dims(norm_layer: nn.Module, ndim: int) -> set[int] | None:
    """The dimensions of its input over which a normalisation computes one statistic."""
    if isinstance(norm_layer, _BatchNorm):
        return set(range(ndim)) - {1}
    if isinstance(norm_layer, _InstanceNorm):
        return set(range(ndim - norm_layer._get_no_batch_dim() + 1, ndim))
    if isinstance(norm_layer, (nn.LayerNorm, nn.RMSNorm)):
        return set(range(ndim - len(norm_layer.normalized_shape), ndim))
    return None


def _use_grouping(layer: nn.Module, y: Tensor, norm_layer: nn.Module) -> str | None:
    """Grouping of ``layer.weight`` for one use whose output ``y`` feeds ``norm_layer`` only."""
    c = y.dim() - 1 if isinstance(layer, nn.Linear) else y.dim() - len(layer.kernel_size) - 1
    transposed = isinstance(layer, _ConvTransposeNd)
    if c < 0 or (transposed and layer.groups != 1):
        return None
    suffix = "@1" if transposed else ""
    if isinstance(norm_layer, nn.GroupNorm):
        if c != 1:
            return None
        per_channel = norm_layer.num_groups == y.shape[1]
        kind = "channel" if per_channel else f"groups:{norm_layer.num_groups}"
        cancels_bias = per_channel
    else:
        if c in _reduced_dims(norm_layer, y.dim()):
            kind, cancels_bias = "tensor", False
        else:
            kind, cancels_bias = "channel", not isinstance(norm_layer, nn.RMSNorm)
    if layer.bias is not None and not cancels_bias:
        return None  # the bias survives: only weight and bias together are invariant
    return kind if kind == "tensor" else kind + suffix


def find_scale_invariant(model: nn.Module, example_inputs) -> dict[str, str]:
    """Map the name of every scale-invariant parameter to its grouping.

    ``example_inputs`` is what ``model`` is called with: a tensor, a tuple of positional
    arguments, or a dict of keyword arguments.  Values are ``"channel"``, ``"groups:G"`` or
    ``"tensor"`` (see :mod:`psiopt.geometry`; ``"@1"`` marks ConvTranspose weights).  Parameters
    absent from the result are not scale-invariant.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layer_calls, norm_inputs = [], {}

    def on_layer(module, args, kwargs, out):
        layer_calls.append((module, out))

    def on_norm(module, args, kwargs, out):
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            norm_inputs.setdefault(id(x), (module, x))

    handles = [m.register_forward_hook(on_layer if isinstance(m, _LAYERS) else on_norm,
                                       with_kwargs=True)
               for m in model.modules() if isinstance(m, _LAYERS + _NORMS)]
    try:
        with _pristine(model), torch.enable_grad():
            out = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    counts, leaves = _graph(_outputs(out))

    uses: dict[int, list] = {}
    for layer, y in layer_calls:
        weight = layer.weight
        if not isinstance(weight, nn.Parameter):
            continue
        grouping = None
        if isinstance(y, Tensor) and y.grad_fn is not None and counts[y.grad_fn] == 1:
            norm_layer, x = norm_inputs.get(id(y), (None, None))
            if x is y:
                grouping = _use_grouping(layer, y, norm_layer)
        uses.setdefault(id(weight), []).append(grouping)

    found = {}
    for name, p in model.named_parameters():
        groupings = uses.get(id(p), [None])
        node = leaves.get(id(p))
        if None in groupings or len(set(groupings)) != 1 or node is None:
            continue
        if counts[node] == len(groupings):  # no use outside the recorded layer calls
            found[name] = groupings[0]
    return found


def _mapping(model: nn.Module, groups_or_mapping) -> dict[str, str]:
    if isinstance(groups_or_mapping, dict):
        return dict(groups_or_mapping)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in groups_or_mapping:
        if group.get("grouping"):
            for p in group["params"]:
                out[names[id(p)]] = group["grouping"]
    return out


def _check_mapping(model: nn.Module, mapping: dict) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = sorted(set(mapping) - set(params))
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; the model has {sorted(params)}")
    for name, grouping in mapping.items():
        if grouping is not None:
            parse_grouping(grouping)
            rows(params[name], grouping)
    return params


def param_groups(model: nn.Module, example_inputs=None, *, mapping: dict | None = None,
                 overrides: dict | None = None, lr: float | None = None,
                 weight_decay: float | None = None, invariant_lr: float | None = None,
                 invariant_weight_decay: float = 0.0) -> list[dict]:
    """torch-style parameter groups: one per grouping of invariant parameters, then the rest.

    ``mapping`` replaces discovery (then ``example_inputs`` is not needed); ``overrides`` maps
    parameter names to a grouping (declare a parameter invariant) or ``None`` (declare it not
    invariant).  ``lr``/``weight_decay`` go to the non-invariant group, ``invariant_lr`` and
    ``invariant_weight_decay`` (default 0: no L2 on invariant weights) to the invariant groups;
    anything left unset takes the optimizer's defaults.  Every group carries ``param_names``.
    """
    if mapping is None:
        if example_inputs is None:
            raise ValueError("param_groups needs example_inputs (or an explicit mapping)")
        mapping = find_scale_invariant(model, example_inputs)
    mapping = {**mapping, **(overrides or {})}
    _check_mapping(model, mapping)
    buckets: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            bucket = buckets.setdefault(mapping.get(name), {"params": [], "param_names": []})
            bucket["params"].append(p)
            bucket["param_names"].append(name)
    groups = []
    for grouping, bucket in sorted(buckets.items(), key=lambda kv: kv[0] is None):
        group = {**bucket, "grouping": grouping}
        chosen = (invariant_lr, invariant_weight_decay) if grouping else (lr, weight_decay)
        for key, value in zip(("lr", "weight_decay"), chosen):
            if value is not None:
                group[key] = value
        groups.append(group)
    return groups


@torch.no_grad()
def unit_normalize_(groups: list[dict]) -> None:
    """Scale every invariant group (rows of groups with a ``grouping``) to unit norm, in place."""
    for group in groups:
        if group.get("grouping"):
            for p in group["params"]:
                normalize_(rows(p, group["grouping"]))


@dataclass
class GroupCheck:
    """Numerical evidence for one declared parameter (worst over its groups)."""

    name: str
    grouping: str
    loss_change: float  # max relative change of the output when groups are rescaled
    cosine: float  # max over groups of |<∇, w>| / (‖∇‖ ‖w‖)
    worst_group: int  # index of the group with the largest cosine


@dataclass
class InvarianceReport:
    """Result of :func:`check_invariance`: ``ok`` is False when a declared group is not invariant."""

    checks: list[GroupCheck]
    tol: float
    failures: list[GroupCheck] = field(init=False)

    def __post_init__(self):
        self.checks.sort(key=lambda c: -max(c.loss_change, c.cosine))
        self.failures = [c for c in self.checks if max(c.loss_change, c.cosine) > self.tol]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{'parameter':40s} {'grouping':10s} {'Δloss':>10s} {'cos(∇,w)':>10s}"]
        for c in self.checks:
            flag = "  NOT INVARIANT" if c in self.failures else ""
            lines.append(f"{c.name:40s} {c.grouping:10s} {c.loss_change:10.2e} "
                         f"{c.cosine:10.2e}{flag}")
        return "\n".join(lines)


def check_invariance(model: nn.Module, example_inputs, groups_or_mapping, *,
                     scales=(0.5, 2.0, 10.0), tol: float = 1e-3, loss_fn=None) -> InvarianceReport:
    """Check declared scale-invariant groups numerically, in train mode.

    For every declared parameter and every ``c`` in ``scales``, the even-indexed groups and then
    the odd-indexed groups are multiplied by ``c`` (so a wrong ``"channel"`` declaration on a
    weight that is only invariant as a whole is caught), and the relative change of the loss is
    recorded; the gradient's radial part ``|<∇, w>|/(‖∇‖‖w‖)`` is measured per group.  The loss
    is ``loss_fn(output)`` or, by default, a fixed random projection of the outputs.  Groups above
    ``tol`` are failures.  The model's parameters, buffers and modes are restored.
    """
    mapping = {k: v for k, v in _mapping(model, groups_or_mapping).items() if v}
    params = _check_mapping(model, mapping)

    def loss_of(out) -> Tensor:
        if loss_fn is not None:
            return loss_fn(out)
        flat = torch.cat([t.reshape(-1) for t in _outputs(out)])
        gen = torch.Generator(device="cpu").manual_seed(1234)
        return flat @ torch.randn(flat.numel(), generator=gen, dtype=flat.dtype).to(flat.device)

    def loss_at() -> Tensor:
        with _pristine(model), torch.no_grad():
            return loss_of(_call(model, example_inputs)).double()

    with _pristine(model), torch.enable_grad():
        base_loss = loss_of(_call(model, example_inputs))
        grads = torch.autograd.grad(base_loss, [params[n] for n in mapping], allow_unused=True)
    base = base_loss.detach().double()
    checks = []
    for (name, grouping), grad in zip(mapping.items(), grads):
        p = params[name]
        view = rows(p.data, grouping)
        saved = p.detach().clone()
        change = 0.0
        for c in scales:
            for parity in (0, 1)[: min(2, view.shape[0])]:
                factors = torch.ones(view.shape[0], dtype=p.dtype, device=p.device)
                factors[parity::2] = c
                view.mul_(factors.view(-1, *[1] * (view.dim() - 1)))
                change = max(change, float((loss_at() - base).abs() / base.abs().clamp_min(1e-12)))
                p.data.copy_(saved)
        g = rows(grad if grad is not None else torch.zeros_like(p), grouping)
        w = view.double()
        cos = (w * g.double()).flatten(1).sum(1).abs() / (norm(w) * norm(g.double())).flatten()
        cos = torch.nan_to_num(cos, nan=0.0)
        checks.append(GroupCheck(name, grouping, change, float(cos.max()), int(cos.argmax())))
    return InvarianceReport(checks, tol)


__all__ = ["find_scale_invariant", "param_groups", "check_invariance", "unit_normalize_",
           "InvarianceReport", "GroupCheck"]
