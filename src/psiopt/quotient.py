"""SGD on the positively-scale-invariant (PSI) quotient manifold (Yi et al.)."""

from __future__ import annotations

import torch

from .base import ScaleInvariantOptimizer
from .geometry import norm


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
    State: ``velocity`` (one buffer per invariant parameter, in the grouped view's shape; only
    while ``momentum > 0``).
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 max_norm: float = 1e4, *, grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      max_norm=max_norm, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach))

    def _init_state(self, group, w, state):
        pass  # the velocity is created at the first step with momentum

    @staticmethod
    def _guard(n, max_norm):
        """Per-group factor ``s``: ``1/‖w‖`` above ``max_norm``, else 1."""
        return torch.where(n > max_norm, n.reciprocal(), torch.ones_like(n))

    def _update_one(self, group, w, g, state):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        n = norm(w)
        if wd:
            g = g.add(w, alpha=wd)
        s = self._guard(n, group["max_norm"])
        step = g * (-lr * n * n)
        if rho:
            u = state["velocity"] if "velocity" in state else state.setdefault(
                "velocity", torch.zeros_like(w))
            step = u.mul_(rho).add_(step)
        w.add_(step).mul_(s)
        if rho:
            u.mul_(s)

    def _update_many(self, group, ws, gs, states, rb):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        n = rb.norms(ws, "norm")
        if wd:
            gs = torch._foreach_add(gs, ws, alpha=wd)
        s = self._guard(n, group["max_norm"])
        s_parts = rb.put("guard", s)
        coef = rb.put("coef", n.square_().mul_(s).mul_(-lr))
        if not rho:  # w ← s·w − η s ‖w‖² g
            torch._foreach_mul_(ws, s_parts)
            torch._foreach_addcmul_(ws, gs, coef)
            return
        us = [st["velocity"] if "velocity" in st else st.setdefault("velocity", torch.zeros_like(w))
              for st, w in zip(states, ws)]
        torch._foreach_mul_(us, rb.put("rho_guard", s.mul_(rho)))
        torch._foreach_addcmul_(us, gs, coef)  # u ← s (ρu − η‖w‖²g)
        for w, u, f in zip(ws, us, s_parts):
            torch.addcmul(u, w, f, out=w)  # w ← s·w + u, one pass
