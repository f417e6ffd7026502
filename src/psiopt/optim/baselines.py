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

from .base import GroupHandling
from .diagnostics import group_of
from .discovery import unit_normalize_
from .geometry import CANCELLED, norm, rows, sqnorm


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


def _check_torch_settings(group: dict) -> None:
    """``ValueError`` for what torch.optim's constructors refuse: a negative (or NaN) ``lr``,
    ``weight_decay``, ``eps`` or ``momentum``, ``betas`` outside ``[0, 1)``."""
    for key in ("lr", "weight_decay", "eps", "momentum"):
        value = group.get(key)
        if isinstance(value, numbers.Real) and not value >= 0.0:
            raise ValueError(f"invalid {key}: {value!r} (must be >= 0; written after the group "
                             "was added, e.g. by a learning-rate scheduler)")
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and any(
            isinstance(b, numbers.Real) and not 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas!r} (each must lie in [0, 1); written after the "
                         "group was added, e.g. by OneCycleLR's max_momentum)")


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

    The rows of every invariant group are unit-normalised when the group is added (at
    construction, once every group is valid), with the running statistics listed in its
    ``norm_stats``; after that the update is plain SGD.
    """

    uses_row_norms = True

    def _prepare(self, group):
        unit_normalize_([group])


class Adam(_Baseline, torch.optim.Adam):
    """torch.optim.Adam (coupled L2)."""

    def scheduling_beta(self, p, view, before):
        """``β = d^{-1/2}‖b‖`` per group with ``b = √(v/(1−β2^t)) + ε``."""
        group, state = group_of(self, p), self.state[p]
        b = (state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))).sqrt() + group["eps"]
        b = rows(b, group["grouping"])
        return norm(b) / math.sqrt(b[0].numel())


class AdamW(_Baseline, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay: not of the form ``x − η a ⊘ b``)."""

    def scheduling_beta(self, p, view, before):
        return None


__all__ = ["SGD", "BSGD", "Adam", "AdamW"]

for _cls in (SGD, BSGD, Adam, AdamW):  # the mixins pass arguments through: show torch's signature
    _cls.__signature__ = inspect.signature(next(c for c in _cls.__mro__ if c.__module__.startswith("torch.")))
