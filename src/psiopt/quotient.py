"""SGD on the positively-scale-invariant (PSI) quotient manifold (Yi et al.)."""

from __future__ import annotations

import torch

from .base import ScaleInvariantOptimizer
from .geometry import sqnorm


class PSISGD(ScaleInvariantOptimizer):
    r"""PSI-GD / PSI-SGD / PSI-SGDM (Yi, eqs. 9–11 and Algorithm 1).

    For every scale-invariant group ``w`` with gradient ``g``::

        u ← ρ·u − η·‖w‖²·(g + λ·w)        (Riemannian gradient ‖w‖² g of the quotient metric)
        w ← w + u                          (retraction R_W(Ξ) = W + Ξ)

    ``momentum=0`` gives PSI-SGD (PSI-GD with full batches).  The iterates are equivariant under
    per-group rescaling (Yi Theorem 1).  ``weight_decay`` on an invariant group is Yi's coupled L2
    (Table 2) and breaks that invariance; the default is none.  Overflow guard (Yi §6.2): a group
    whose norm exceeds ``max_norm`` at the start of a step is divided, with its velocity, by its
    norm (the direction, and so the network, is unchanged).  A zero group stays zero.

    Non-invariant groups follow SGD with their own ``lr``, ``momentum`` and ``weight_decay``.
    State: ``velocity`` (one buffer per invariant parameter, in the grouped view's shape).
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 max_norm: float = 1e4, *, grouping=None, check_finite: bool = True, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      max_norm=max_norm, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach))

    def _init_state(self, group, w, state):
        state["velocity"] = torch.zeros_like(w)

    @staticmethod
    def _guard(n2, max_norm):
        return torch.where(n2 > max_norm**2, n2.rsqrt(), torch.ones_like(n2))

    def _update_one(self, group, w, g, state):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        n2 = sqnorm(w)
        if wd:
            g = g.add(w, alpha=wd)
        s = self._guard(n2, group["max_norm"])
        u = state["velocity"]
        u.mul_(rho).add_(g * (-lr * n2))
        w.add_(u).mul_(s)
        u.mul_(s)

    def _update_many(self, group, ws, gs, states):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        n2 = [sqnorm(w) for w in ws]
        if wd:
            gs = torch._foreach_add(gs, ws, alpha=wd)
        s = [self._guard(n, group["max_norm"]) for n in n2]
        us = [st["velocity"] for st in states]
        coef = torch._foreach_mul(n2, s)
        torch._foreach_mul_(coef, -lr)
        torch._foreach_mul_(us, torch._foreach_mul(s, rho))
        torch._foreach_addcmul_(us, gs, coef)
        torch._foreach_mul_(ws, s)
        torch._foreach_add_(ws, us)
