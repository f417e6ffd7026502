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
    State of an invariant parameter (with momentum): the velocity ``u = velocity_scale ·
    velocity``, kept as a buffer and one scale per group so that the vectorized path updates it
    in one pass (the scale is folded back into the buffer on guard steps).
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
    def _velocity(state, w):
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(w)
            state["velocity_scale"] = torch.ones_like(norm(w))
        return state["velocity"], state["velocity_scale"]

    @staticmethod
    def _guard_step(group, step) -> bool:
        """Whether this step checks the guard (``step`` is a CPU scalar: no device sync)."""
        every, rho = group["guard_every"], group["momentum"]
        if 0 < rho < 1:  # fold the velocity scale before ρ^k can underflow
            every = min(every, max(1, int(30 * math.log(10) / -math.log(rho))))
        return int(step) % every == 0

    @staticmethod
    def _guard(n, max_norm):
        """Per-group factor ``s``: ``1/‖w‖`` above ``max_norm``, else 1."""
        return torch.where(n > max_norm, n.reciprocal(), torch.ones_like(n))

    def _update_one(self, group, w, g, state):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        state["step"] += 1
        n = norm(w)
        if wd:
            g = g.add(w, alpha=wd)
        step = g * (-lr * n * n)
        if rho:
            v, scale = self._velocity(state, w)
            step = v.mul_(scale * rho).add_(step)  # the velocity, with its scale folded in
            scale.fill_(1.0)
        w.add_(step)
        if self._guard_step(group, state["step"]):
            s = self._guard(n, group["max_norm"])
            w.mul_(s)
            if rho:
                v.mul_(s)

    def _update_many(self, group, ws, gs, states, rb):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        guard = self._guard_step(group, step_count(states)[0])
        n = rb.norms(ws, "norm")
        if wd:
            gs = torch._foreach_add(gs, ws, alpha=wd)
        n2 = n.square()
        if not rho:  # w ← w − η ‖w‖² g, then the guard
            torch._foreach_addcmul_(ws, gs, rb.put("coef", n2.mul_(-lr)))
        else:  # u = σ v:  ρu − η‖w‖²g = σ' (v − η‖w‖²/(ρσ) g),  σ' = ρσ
            vs, scales = zip(*(self._velocity(st, w) for st, w in zip(states, ws)))
            sigma = rb.gather(scales)
            torch._foreach_addcmul_(vs, gs, rb.put("coef", n2.mul_(-lr / rho).div_(sigma)))
            sigma.mul_(rho)
            torch._foreach_addcmul_(ws, vs, rb.put("sigma", sigma))
        if not guard:
            if rho:
                torch._foreach_copy_(scales, rb.get("sigma")[1])
            return
        s = self._guard(n, group["max_norm"])
        torch._foreach_mul_(ws, rb.put("guard", s))
        if rho:  # fold the scale (and the guard) into the buffer
            torch._foreach_mul_(vs, rb.put("sigma", sigma.mul_(s)))
            torch._foreach_mul_(scales, 0.0)
            torch._foreach_add_(scales, 1.0)
