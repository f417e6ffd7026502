"""SGD on the positively-scale-invariant (PSI) quotient manifold (Yi et al.)."""

from __future__ import annotations

import math

import torch

from .base import ScaleInvariantOptimizer, step_count
from .geometry import norm


class PSISGD(ScaleInvariantOptimizer):
    r"""PSI-GD / PSI-SGD / PSI-SGDM (Yi, eqs. 9–11 and Algorithm 1).

    For every scale-invariant group ``w`` with gradient ``g``::

        u ← ρ·u − η·‖w‖²·(g + λ·w)        (Riemannian gradient ‖w‖² g of the quotient metric)
        w ← w + u                          (retraction R_W(Ξ) = W + Ξ)

    ``momentum=0`` gives PSI-SGD (PSI-GD with full batches).  The iterates are equivariant under
    per-group rescaling (Yi Theorem 1).  ``weight_decay`` on an invariant group is Yi's coupled L2
    (Table 2) and breaks that invariance; the default is none.  A zero group stays zero.

    Overflow guard (Yi §6.2): every ``guard_every`` steps, a group whose norm exceeds
    ``max_norm`` at the start of the step is divided, with its velocity, by its norm (the
    direction, and so the network, is unchanged).  Checking every step costs one more pass over
    the weights; norms grow slowly, so the default checks every 16 steps.

    Non-invariant groups follow SGD with their own ``lr``, ``momentum`` and ``weight_decay``.
    State of an invariant parameter: ``step`` and, with momentum, ``velocity``: the velocity is
    ``u = ρ^(step % k) · velocity`` (``k`` the guard period), so that the vectorized path updates
    it in one pass; the scale is folded back into the buffer on guard steps.
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 max_norm: float = 1e4, guard_every: int = 16, *, grouping=None,
                 check_finite: bool = False, foreach=None):
        if not isinstance(guard_every, int) or guard_every < 1:
            raise ValueError(f"invalid guard_every: {guard_every!r} (must be an integer >= 1)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      max_norm=max_norm, guard_every=guard_every,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    def _init_state(self, group, w, state):
        state["step"] = torch.tensor(0.0)

    @staticmethod
    def _period(group) -> int:
        """Steps between guard checks, short enough that the velocity scale ρ^k stays ≥ 1e-3
        (the buffer then never exceeds the velocity by more than 1e3, even in float16)."""
        every, rho = group["guard_every"], group["momentum"]
        if 0 < rho < 1:
            every = min(every, max(1, int(3 * math.log(10) / -math.log(rho))))
        return every

    @staticmethod
    def _guard(n, max_norm):
        """Per-group factor ``s``: ``1/‖w‖`` above ``max_norm``, else 1."""
        return torch.where(n > max_norm, n.reciprocal(), torch.ones_like(n))

    @staticmethod
    def _velocities(states, ws) -> list:
        try:
            return [st["velocity"] for st in states]
        except KeyError:
            return [st.setdefault("velocity", torch.zeros_like(w)) for st, w in zip(states, ws)]

    def _update_one(self, group, w, g, state):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        period = self._period(group)
        t = int(state["step"])  # a CPU scalar, as in torch.optim: no device synchronisation
        state["step"] += 1
        guard = (t + 1) % period == 0
        n = norm(w)
        if wd:
            g = g.add(w, alpha=wd)
        step = g * (-lr * n * n)
        if rho:
            (v,) = self._velocities([state], [w])
            step = v.mul_(rho ** (t % period + 1)).add_(step)  # ρ·u − η‖w‖²g, u = ρ^(t%k)·v
        w.add_(step)
        if guard:
            s = self._guard(n, group["max_norm"])
            w.mul_(s)
            if rho:
                v.mul_(s)
        elif rho:
            v.div_(rho ** ((t + 1) % period))

    def _update_many(self, group, ws, gs, states, rb):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        period = self._period(group)
        ts = {int(t) for t in torch.stack(step_count(states)).tolist()}
        if len(ts) > 1:  # parameters stepped unevenly (missing gradients): per-tensor path
            for w, g, st in zip(ws, gs, states):
                st["step"] -= 1
                self._update_one(group, w, g, st)
            return
        t = ts.pop() - 1
        guard = (t + 1) % period == 0
        n = rb.norms(ws, "norm")
        if wd:
            gs = torch._foreach_add(gs, ws, alpha=wd)
        coef = n.square().mul_(-lr)
        if not rho:  # w ← w − η ‖w‖² g
            torch._foreach_addcmul_(ws, gs, rb.put("coef", coef))
        else:  # the velocity is u = ρ^(t % k) · v: ρu − η‖w‖²g = ρ^(t%k+1) (v − η‖w‖²/ρ^(t%k+1) g)
            scale = rho ** (t % period + 1)
            vs = self._velocities(states, ws)
            torch._foreach_addcmul_(vs, gs, rb.put("coef", coef.div_(scale)))
            torch._foreach_add_(ws, vs, alpha=scale)
        if guard:  # fold the scale (and the guard) into the buffer
            s = self._guard(n, group["max_norm"])
            torch._foreach_mul_(ws, rb.put("guard", s))
            if rho:
                torch._foreach_mul_(vs, rb.put("fold", s.mul_(scale)))
