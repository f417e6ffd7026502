"""Base class shared by every psiopt optimizer.

Parameter groups that carry a ``grouping`` (see :mod:`psiopt.geometry`) are scale-invariant and
follow the subclass's rule; every other group follows the ordinary counterpart (SGD with momentum
or Adam, through torch.optim's own functional code) with its own ``lr`` and ``weight_decay``.

Each subclass writes its invariant rule twice: ``_update_one`` is the plain per-tensor reference
path (``foreach=False``), ``_update_many`` the vectorized path over lists with ``torch._foreach_*``
(the default).  Tests check that the two agree in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

from .geometry import RowBuffers, parse_grouping, rows

#: hyperparameter -> (low, high, low inclusive, high inclusive)
_RANGES = {
    "lr": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "momentum": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, True, False),
    "max_norm": (0.0, math.inf, False, True),
    "clip": (0.0, math.inf, False, True),
    "ortho": (0.0, math.inf, True, False),
}


def _check_range(name: str, value) -> None:
    low, high, low_in, high_in = _RANGES[name]
    v = float(value)
    ok = (v > low or (low_in and v == low)) and (v < high or (high_in and v == high))
    if not ok or math.isnan(v):
        lo, hi = "[" if low_in else "(", "]" if high_in else ")"
        raise ValueError(f"invalid {name}: {value!r} (must lie in {lo}{low}, {high}{hi})")


class ScaleInvariantOptimizer(Optimizer):
    """Common machinery: validation, lazy state, closure, gradient checks, counterpart updates.

    Options common to every subclass:

    * ``check_finite`` (default ``False``): as in torch.optim, non-finite gradients propagate.
      With ``True``, one fused check over all gradients runs before updating; a NaN/inf gradient
      raises :class:`FloatingPointError` naming the parameters and nothing is updated.  The check
      costs one host synchronisation and one read of the gradients per step.
    * ``foreach`` (default ``None`` = vectorized): ``False`` selects the per-tensor reference path.
      Groups whose tensors differ in dtype or device also take the reference path.
    """

    counterpart = "sgd"  # or "adam"

    def __init__(self, params, defaults: dict):
        defaults = {"grouping": None, "check_finite": False, "foreach": None, **defaults}
        for key, value in defaults.items():
            self._check_hyper(key, value)
        super().__init__(params, defaults)
        if not any(g["grouping"] for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no parameter group declares a 'grouping', so every "
                "parameter is updated by the ordinary counterpart; build the groups with "
                "psiopt.param_groups(model, example_inputs)",
                stacklevel=2,
            )

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def _check_hyper(key: str, value) -> None:
        if key in _RANGES:
            _check_range(key, value)
        elif key == "betas":
            if len(value) != 2:
                raise ValueError(f"invalid betas: {value!r} (need two values)")
            for b in value:
                if not 0.0 <= float(b) < 1.0:
                    raise ValueError(f"invalid betas: {value!r} (each must lie in [0, 1))")
        elif key == "grouping" and value is not None:
            parse_grouping(value)

    def add_param_group(self, param_group: dict) -> None:
        for key, value in param_group.items():
            if key != "params":
                self._check_hyper(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["grouping"] is not None:
            for p in group["params"]:
                rows(p, group["grouping"])  # raises ValueError if the shape does not fit

    # -- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                work.append((group, params, [self._grad(p) for p in params]))
        if any(group["check_finite"] for group, _, _ in work):
            self._check_finite([t for g, ps, gs in work if g["check_finite"] for t in zip(ps, gs)])
        for group, params, grads in work:
            if group["grouping"] is None:
                self._counterpart(group, params, grads)
            else:
                self._invariant(group, params, grads)
        return loss

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("psiopt optimizers do not support sparse gradients")
        if g.dtype.is_complex or p.dtype.is_complex:
            raise RuntimeError("psiopt optimizers do not support complex parameters or gradients")
        return g

    def _check_finite(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        grads = [g for _, g in pairs]
        peaks = torch._foreach_norm(grads)  # inf/NaN (or a norm overflowing the dtype)
        if bool(torch.isfinite(torch.stack(peaks)).all()):
            return
        bad = [self._name(p) for (p, _), m in zip(pairs, peaks) if not torch.isfinite(m)]
        raise FloatingPointError(
            f"non-finite gradient in {', '.join(bad)}; nothing was updated "
            "(check the loss, lower the learning rate, or pass check_finite=False)"
        )

    def _name(self, p: Tensor) -> str:
        for i, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return names[j] if names else f"param_groups[{i}]['params'][{j}]"
        return "a parameter"

    @staticmethod
    def _foreach(group: dict) -> bool:
        return group["foreach"] is not False

    # -- invariant groups -------------------------------------------------------------------------
    def _invariant(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        grouping = group["grouping"]
        ws = [rows(p, grouping) for p in params]
        gs = [rows(g, grouping) for g in grads]
        states = [self.state[p] for p in params]
        for w, state in zip(ws, states):
            if not state:
                self._init_state(group, w, state)
        if self._foreach(group) and len({(w.dtype, w.device) for w in ws}) == 1:
            self._update_many(group, ws, gs, states, self._buffers(group, ws))
        else:
            for w, g, state in zip(ws, gs, states):
                self._update_one(group, w, g, state)

    def _buffers(self, group: dict, ws: list[Tensor]) -> RowBuffers:
        """The group's :class:`RowBuffers`, rebuilt when its tensors change (not saved)."""
        key = [w.data_ptr() for w in ws]
        cache = self.__dict__.setdefault("_row_buffers", {})
        cached = cache.get(id(group))
        if cached is None or cached[0] != key:
            cached = (key, RowBuffers(ws))
            cache[id(group)] = cached
        return cached[1]

    def _init_state(self, group: dict, w: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update_one(self, group: dict, w: Tensor, g: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _update_many(self, group, ws: list[Tensor], gs: list[Tensor], states: list[dict],
                     rb: RowBuffers) -> None:
        raise NotImplementedError

    # -- non-invariant groups: torch.optim's own SGD / Adam ---------------------------------------
    def _counterpart(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        if self.counterpart == "sgd":
            bufs = [s.get("momentum_buffer") for s in states]
            _sgd(params, grads, bufs, foreach=self._foreach(group), weight_decay=group["weight_decay"],
                 momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=False,
                 maximize=False)
            if group["momentum"]:
                for s, b in zip(states, bufs):
                    s["momentum_buffer"] = b
            return
        for p, s in zip(params, states):
            if not s:
                s["step"] = torch.tensor(0.0)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        _adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=self._foreach(group), amsgrad=False, beta1=beta1,
              beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)


def step_count(states: Iterable[dict]) -> list[Tensor]:
    """Advance and return the per-parameter step counters (CPU tensors, as in torch.optim)."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1.0)
    return steps
