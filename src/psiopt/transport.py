"""Euclidean methods made consistent with the sphere (Roburin et al.): Adam-S, Adam-SRT, SGD-MRT.

RT (rescale + transport, Roburin eq. 18) maps a buffer ``a`` from ``x_old`` to ``x_new``.  When the
step itself is ``x_new = x_old − c·a`` for a per-row scalar ``c`` (true for Adam-S and SGD-M), RT
reduces to the tangent projection ``a − <x_new, a>/‖x_new‖² · x_new``, which the vectorized paths
use (no copy of the weights); the reference paths apply eq. 18 literally.
"""

from __future__ import annotations

import torch

from .base import ScaleInvariantOptimizer, step_count
from .geometry import group_size, rescale_transport, safe_inv, sqnorm


def _project_many_(bufs, xs, x_sqnorm, rb):
    """``a ← a − <x, a>/‖x‖² · x`` per row, vectorized (the fast form of RT, see above)."""
    coef = -rb.dots(xs, bufs, "radial") * safe_inv(x_sqnorm)
    torch._foreach_addcmul_(bufs, xs, rb.put("project", coef))


class AdamS(ScaleInvariantOptimizer):
    r"""Adam-S (Roburin §4.1, eq. 15): Adam with one scalar second moment per invariant group.

    With ``ĝ = g + λx`` (coupled L2, as in the paper) and ``d`` the group size::

        m ← β1 m + (1−β1) ĝ;   v ← β2 v + (1−β2) ‖ĝ‖²/d
        x ← x − η (m/(1−β1^t)) / (√(v/(1−β2^t)) + ε)

    Non-invariant groups follow Adam.  State: ``exp_avg`` (one buffer per parameter) and
    ``exp_avg_sq`` (one scalar per group).
    """

    counterpart = "adam"
    _transport = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grouping=None, check_finite: bool = False,
                 foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    def _init_state(self, group, w, state):
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(w)
        state["exp_avg_sq"] = torch.zeros_like(sqnorm(w))

    @staticmethod
    def _hyper(group, step):
        beta1, beta2 = group["betas"]
        t = float(step)  # a CPU scalar, as in torch.optim.Adam: no device synchronisation
        return group["lr"] / (1 - beta1**t), (1 - beta2**t) ** -0.5

    def _update_one(self, group, w, g, state):
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            g = g.add(w, alpha=group["weight_decay"])
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).add_(sqnorm(g), alpha=(1 - beta2) / group_size(w))
        lr_hat, v_hat = self._hyper(group, state["step"])
        coef = -lr_hat / (v.sqrt() * v_hat + group["eps"])
        old = w.clone() if self._transport else None
        w.addcmul_(m, coef)
        if self._transport:
            m.copy_(rescale_transport(m, old, w))
            v.mul_(sqnorm(old) * safe_inv(sqnorm(w)))

    def _update_many(self, group, ws, gs, states, rb):
        beta1, beta2 = group["betas"]
        steps = step_count(states)
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        if group["weight_decay"]:
            gs = torch._foreach_add(gs, ws, alpha=group["weight_decay"])
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        inv_d = rb.per_tensor("inv_d", [1.0 / group_size(w) for w in ws])
        v = rb.gather(vs).mul_(beta2).add_(rb.norms(gs, "g_norm").square_().mul_(inv_d),
                                           alpha=1 - beta2)
        hyper = [self._hyper(group, s) for s in steps]
        lr_hat = rb.per_tensor("lr_hat", [lh for lh, _ in hyper])
        v_hat = rb.per_tensor("v_hat", [vh for _, vh in hyper])
        coef = rb.put("coef", -lr_hat / (v.sqrt() * v_hat + group["eps"]))
        if self._transport:
            before = rb.norms(ws, "before").square()
        torch._foreach_addcmul_(ws, ms, coef)
        if self._transport:
            after = rb.norms(ws, "after").square_()
            _project_many_(ms, ws, after, rb)
            v.mul_(before * safe_inv(after))
        torch._foreach_copy_(vs, rb.put("v", v))

class AdamSRT(AdamS):
    r"""Adam-SRT (Roburin §4.2, eqs. 19–21, Algorithm 1): Adam-S, then after each step::

        m ← RT(m);   v ← v · ‖x_old‖²/‖x_new‖²

    so that the momentum is transported to the new point and the effective direction does not
    depend on the radius history.
    """

    _transport = True


class SGDMRT(ScaleInvariantOptimizer):
    r"""SGD-MRT (Roburin Appendix E.2): SGD with momentum and ``buf ← RT(buf)`` after each step::

        buf ← μ buf + g + λx;   x ← x − η buf;   buf ← RT(buf)

    Non-invariant groups follow SGD with momentum.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    def _init_state(self, group, w, state):
        state["momentum_buffer"] = torch.zeros_like(w)

    def _update_one(self, group, w, g, state):
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        if group["weight_decay"]:
            buf.add_(w, alpha=group["weight_decay"])
        old = w.clone()
        w.add_(buf, alpha=-group["lr"])
        buf.copy_(rescale_transport(buf, old, w))

    def _update_many(self, group, ws, gs, states, rb):
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, gs)
        if group["weight_decay"]:
            torch._foreach_add_(bufs, ws, alpha=group["weight_decay"])
        torch._foreach_add_(ws, bufs, alpha=-group["lr"])
        _project_many_(bufs, ws, rb.norms(ws, "norm").square_(), rb)
