"""torch.optim's SGD, Adam and AdamW as the baselines of the registry, and B-SGD.

The update is torch's own (foreach); these subclasses add psiopt's parameter-group handling
(:class:`~psiopt.optim.base.GroupHandling`: registry settings for added groups, placeholder names,
``norm_stats`` kept out of ``state_dict``), leave groups with ``grouping="cancelled"`` unchanged,
and state their effective-learning-rate factor for :mod:`psiopt.optim.diagnostics`.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.optim.sgd import sgd

from .base import GroupHandling, check_hyper, run_closure, warn_unlinked
from .diagnostics import group_of
from .discovery import rescale_rows_
from .geometry import CANCELLED, accumulate_dtype, is_invariant, norm, rows, safe_inv, sqnorm
from .sharded import ShardedRows, grouped_norms, is_sharded


def _freeze_cancelled(optimizer, args, kwargs) -> None:
    """Step pre-hook: a cancelled group takes a zero step whatever a scheduler wrote into it;
    every other group's settings are checked as torch.optim checks them at construction (a
    scheduler may have written them since: ``LambdaLR`` driving ``lr`` below 0), on Python
    numbers, without a host synchronisation (a tensor setting, which torch.optim takes, is left
    alone)."""
    for group in optimizer.param_groups:
        if group.get("grouping") == CANCELLED:
            group["lr"] = 0.0
            group["weight_decay"] = 0.0
        else:
            _check_torch_settings(group)
        if group.get("fused"):
            _check_fused_layout(group)


def _check_fused_layout(group: dict) -> None:
    """``ValueError`` for ``fused=True`` on a parameter or gradient that is not contiguous:
    torch's fused SGD and Adam (torch 2.13, CPU) read the gradient and state with the
    parameter's strides, and stepped such a parameter wrongly, silently (a ``[..., :1]`` slice
    of a larger tensor: 0.79 off torch's own ``fused=False`` step after two steps)."""
    for p in group["params"]:
        if not p.is_contiguous() or (p.grad is not None and not p.grad.is_contiguous()):
            raise ValueError(f"fused=True: a parameter of shape {tuple(p.shape)} (or its gradient) is "
                             "not contiguous, which torch's fused step mishandles; pass fused=None "
                             "(psiopt then takes the foreach step for it) or make it contiguous")


def _check_torch_settings(group: dict) -> None:
    """``ValueError`` for what torch.optim's constructors refuse: a negative (or NaN) ``lr``,
    ``weight_decay``, ``eps`` or ``momentum``, ``betas`` outside ``[0, 1)``; and, as psiopt's own
    rules, a tensor ``lr`` of the wrong form or, read on the CPU, out of ``[0, inf)``."""
    if isinstance(group.get("lr"), torch.Tensor):  # its form, and its value where it is read
        check_hyper("lr", group["lr"], read=False)  # without a host synchronisation (on the CPU)
    for key in ("lr", "weight_decay", "eps", "momentum"):
        value = group.get(key)
        if isinstance(value, numbers.Real) and not value >= 0.0:
            raise ValueError(f"invalid {key}: {value!r} (must be >= 0; written after the group "
                             "was added, e.g. by a learning-rate scheduler)")
    tensors = _tensor_adam_settings(group)
    if tensors and group.get("foreach") and not group.get("capturable") and not group.get("fused"):
        raise ValueError(f"{' and '.join(tensors)} as a tensor with foreach=True: torch.optim.Adam/"
                         "AdamW refuse it (but with capturable=True); pass foreach=None or numbers")
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and any(
            isinstance(b, numbers.Real) and not 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas!r} (each must lie in [0, 1); written after the "
                         "group was added, e.g. by OneCycleLR's max_momentum)")


def _tensor_adam_settings(group: dict) -> list[str]:
    """The settings of an Adam/AdamW group given as tensors (``lr``, ``beta1``, ``beta2``), which
    torch's foreach Adam refuses (but capturable)."""
    if "betas" not in group:
        return []
    names = ["lr"] if isinstance(group.get("lr"), torch.Tensor) else []
    return names + [f"beta{i}" for i, b in enumerate(group["betas"] or (), 1) if isinstance(b, torch.Tensor)]


class _Baseline(GroupHandling):
    """torch.optim's update on every group; groups of cancelled biases get ``lr = 0`` and no
    weight decay before every step (a zero step: their gradient is rounding noise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hook()

    def __setstate__(self, state: dict) -> None:  # unpickling (hooks are not pickled), and
        super().__setstate__(state)                # torch's load_state_dict
        self._hook()

    def _hook(self) -> None:
        if _freeze_cancelled not in self._optimizer_step_pre_hooks.values():
            self.register_step_pre_hook(_freeze_cancelled)


class SGD(_Baseline, torch.optim.SGD):
    """torch.optim.SGD (momentum and coupled L2 included)."""

    def scheduling_beta(self, p, view, before):
        """SGD and SGD-M are ``x − η a`` (Roburin Theorem 2 with ``b = 1``)."""
        return torch.ones_like(sqnorm(view))


class BSGD(SGD):
    """B-SGD (Badrinarayanan et al.'s baseline): torch's SGD from unit-normalised rows.

    Building it does not touch the model.  The rows of every invariant parameter are prepared
    once, at its first step (or when :meth:`prepare` is called): unit-normalised, with the
    running statistics in the group's ``norm_stats`` following, so the eval-mode network is
    unchanged by it.  That first step is SGD's step from the unit rows: it uses the gradient at
    them (``∇L(w/‖w‖) = ‖w‖ ∇L(w)`` by scale invariance, a temporary for that step; ``p.grad`` is
    left alone).  The preparation is recorded in the parameter's state (``prepared``; every
    stepped parameter also keeps a ``step`` count, so that a distributed checkpoint, which
    refuses partial state, takes it), which travels in ``state_dict``: a resumed optimizer
    never prepares again (and fine-tuning, ``create_optimizer`` then ``model.load_state_dict``,
    prepares the loaded rows).  After that
    the update is torch's SGD.
    """

    uses_row_norms = True

    def _rescales_rows(self, group: dict) -> bool:
        return is_invariant(group.get("grouping"))  # (the unit-normalisation)

    @torch.no_grad()
    def prepare(self) -> None:
        """Prepare now, rather than at their first step, the rows of every invariant parameter
        not yet prepared (no state): unit-normalise them, the running statistics in the group's
        ``norm_stats`` following, and record it in the state.  Needs no gradient; a parameter
        with state (stepped, or loaded from a state dict) is left alone, so calling it again,
        or after ``load_state_dict``, changes nothing."""
        for group in self.param_groups:
            if is_invariant(group.get("grouping")):
                self._prepare_rows(group, [p for p in group["params"] if not self.state.get(p)],
                                   stacklevel=5)

    def _prepare_rows(self, group: dict, params: list, grads: list | None = None,
                      stacklevel: int = 6) -> list | None:
        """Unit-normalise the rows of ``params`` (of ``group``; running statistics following)
        and record it in their state; with ``grads`` (theirs, taken at the raw rows), return the
        gradients at the unit rows (``stacklevel``: the user's frame, for the warning)."""
        if not params:
            return [] if grads is not None else None
        if "norm_stats" not in group and not torch.compiler.is_compiling():  # (a graph break)
            warn_unlinked(self, stacklevel)
        stats = group.get("norm_stats") or [()] * len(group["params"])
        links = {id(p): st for p, st in zip(group["params"], stats)}
        out = []
        for i, p in enumerate(params):
            view, n = _rows_and_norms(p, group["grouping"])
            rescale_rows_(view, safe_inv(n), links[id(p)])
            self.state[p]["prepared"] = True
            if grads is not None:  # ∇L(w/‖w‖) = ‖w‖ ∇L(w); a zero row is its own unit row
                g = grads[i].clone()
                _local_rows(p, g, group["grouping"]).mul_(
                    torch.where(n > 0, n, torch.ones_like(n)).to(g.dtype))
                out.append(g)
        return out if grads is not None else None

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """torch.optim.SGD's step; the parameters of invariant groups not yet prepared (no
        state) are prepared first, and this step uses the gradient at their unit rows."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, momentum_buffer_list = [], [], []
            has_sparse_grad = self._init_group(group, params, grads, momentum_buffer_list)
            if is_invariant(group.get("grouping")):
                fresh = [i for i, p in enumerate(params) if not self.state.get(p)]
                if fresh:
                    scaled = self._prepare_rows(group, [params[i] for i in fresh],
                                                [grads[i] for i in fresh])
                    for i, g in zip(fresh, scaled):
                        grads[i] = g
            sgd(params, grads, momentum_buffer_list, weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"],
                has_sparse_grad=has_sparse_grad, foreach=group["foreach"], fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None))
            if group["momentum"] != 0:
                for p, momentum_buffer in zip(params, momentum_buffer_list):
                    self.state[p]["momentum_buffer"] = momentum_buffer
            for p in params:  # every stepped parameter has state (a step count, as psiopt's
                state = self.state[p]  # rules keep): distributed checkpoints refuse partial state
                if "step" in state:
                    state["step"].add_(1)
                else:
                    state["step"] = torch.tensor(1.0)
        return loss


def _rows_and_norms(p, grouping: str):
    """``(view, norms)``: the grouped view of ``p`` (of its local shard for a DTensor) and the
    per-group norms (keepdim; float32 for float16/bfloat16 rows), complete across ranks."""
    if is_sharded(p):
        return grouped_norms(p, grouping)
    view = rows(p, grouping)
    return view, norm(view, accumulate_dtype(view.dtype))


def _local_rows(p, t, grouping: str):
    """The grouped view of ``t`` (``p``'s gradient, or a copy of it) that matches
    :func:`_rows_and_norms`'s view of ``p``."""
    if is_sharded(p):
        return ShardedRows(p, grouping).view(t.to_local())
    return rows(t, grouping)


class _AdamGroups:
    """Added groups of the Adam baselines."""

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim's; a group with a tensor ``lr`` or beta that does not set ``foreach``
        leaves the choice to torch (``None``) where the defaults say ``foreach=True``, which
        torch's Adam refuses with a tensor setting (``create_optimizer`` does the same for the
        groups it builds; one that sets ``foreach=True`` itself is refused at the step, before
        any group is stepped)."""
        if isinstance(param_group, dict) and "foreach" not in param_group and \
                self.defaults.get("foreach") and not self.defaults.get("capturable") and \
                _tensor_adam_settings({"betas": self.defaults.get("betas"), **param_group}):
            param_group = {**param_group, "foreach": None}
        super().add_param_group(param_group)


class Adam(_AdamGroups, _Baseline, torch.optim.Adam):
    """torch.optim.Adam (coupled L2)."""

    def scheduling_beta(self, p, view, before):
        """``β = d^{-1/2}‖b‖`` per group with ``b = √(v/(1−β2^t)) + ε``."""
        group, state = group_of(self, p), self.state[p]
        b = (state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))).sqrt() + group["eps"]
        b = rows(b, group["grouping"])
        return norm(b) / math.sqrt(b[0].numel())


class AdamW(_AdamGroups, _Baseline, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay: not of the form ``x − η a ⊘ b``)."""

    def scheduling_beta(self, p, view, before):
        return None


__all__ = ["SGD", "BSGD", "Adam", "AdamW"]

for _cls in (SGD, BSGD, Adam, AdamW):  # the mixins pass arguments through: show torch's signature
    _cls.__signature__ = inspect.signature(next(c for c in _cls.__mro__ if c.__module__.startswith("torch.")))
