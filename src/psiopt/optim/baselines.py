"""torch.optim's SGD, Adam and AdamW as the baselines of the registry.

The update is torch's own (foreach); these subclasses add psiopt's parameter-group handling
(:class:`~psiopt.optim.base.GroupHandling`: registry settings for added groups, placeholder names,
``norm_stats`` kept out of ``state_dict``) and state their effective-learning-rate factor for
:mod:`psiopt.optim.diagnostics`.
"""

from __future__ import annotations

import math

import torch

from .base import GroupHandling
from .geometry import norm, rows, sqnorm


def _group_of(optimizer, p) -> dict:
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


class SGD(GroupHandling, torch.optim.SGD):
    """torch.optim.SGD (momentum and coupled L2 included)."""

    def scheduling_beta(self, p, view, before):
        """SGD and SGD-M are ``x − η a`` (Roburin Theorem 2 with ``b = 1``)."""
        return torch.ones_like(sqnorm(view))


class Adam(GroupHandling, torch.optim.Adam):
    """torch.optim.Adam (coupled L2)."""

    def scheduling_beta(self, p, view, before):
        """``β = d^{-1/2}‖b‖`` per group with ``b = √(v/(1−β2^t)) + ε``."""
        group, state = _group_of(self, p), self.state[p]
        b = (state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))).sqrt() + group["eps"]
        b = rows(b, group["grouping"])
        return norm(b) / math.sqrt(b[0].numel())


class AdamW(GroupHandling, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay: not of the form ``x − η a ⊘ b``)."""

    def scheduling_beta(self, p, view, before):
        return None


__all__ = ["SGD", "Adam", "AdamW"]
