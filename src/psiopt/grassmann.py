"""Riemannian SGD and Adam on the sphere/Grassmann manifold: SGDG and AdamG (Cho & Lee, 2017)."""

from __future__ import annotations

import torch

from .base import step_count
from .geometry import clip, geodesic_step_, normalize_, sphere_exp, sqnorm, tangent, transport, transport_self
from .sphere import _SphereOptimizer


def _penalised(group, w, g):
    """``g + 2ω ∂/∂Y ½‖YYᵀ − I‖²_F = g + 4ω (YYᵀ − I) Y`` for the rows ``Y`` of one tensor."""
    omega = group["ortho"]
    if not omega or w.shape[0] == 1:
        return g
    y = w.flatten(1)
    penalty = torch.addmm(y, y @ y.T, y, beta=-1.0)  # (YYᵀ − I) Y
    return g.add(penalty.view_as(w), alpha=4.0 * omega)


def _direction(group, w, g):
    """``h = clip(proj(y, g + 2ω ∂/∂Y ½‖YYᵀ − I‖²_F), ν)`` for the rows ``y`` of one tensor."""
    return clip(tangent(w, _penalised(group, w, g)), group["clip"])


def _directions(group, ws, gs, rb):
    """Vectorized :func:`_direction`; also returns the flat norms of the clipped directions."""
    gs = [_penalised(group, w, g) for w, g in zip(ws, gs)]
    hs = torch._foreach_addcmul(gs, ws, rb.put("radial", -rb.dots(ws, gs, "dot")))
    n = rb.norms(hs, "h_norm")
    factor = (group["clip"] / n).clamp_max_(1.0)
    torch._foreach_mul_(hs, rb.put("clip", factor))
    return hs, n.mul_(factor)


class SGDG(_SphereOptimizer):
    r"""SGD with momentum on the sphere, "SGDG" (Cho & Lee 2017; baseline in Yi).

    Rows ``y`` are unit-normalised at their first step, then::

        h  = clip(proj(y, g + 2ω ∂/∂Y ½‖YYᵀ−I‖²_F), ν)
        m' = β m − η h;   y ← exp(y, m');   m ← pt(y, m')

    ``ortho`` = ω is the orthogonality penalty among the rows of one tensor (not weight decay),
    ``clip`` = ν the gradient clipping.  Non-invariant groups follow SGD with ``momentum``.
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.9, clip: float = 0.1,
                 ortho: float = 0.1, weight_decay: float = 0.0, *, grouping=None,
                 check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, clip=clip, ortho=ortho,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach))

    def _init_state(self, group, w, state):
        normalize_(w)
        state["momentum_buffer"] = torch.zeros_like(w)

    def _update_one(self, group, w, g, state):
        m = state["momentum_buffer"]
        m.mul_(group["momentum"]).add_(_direction(group, w, g), alpha=-group["lr"])
        new = sphere_exp(w, m)
        m.copy_(transport_self(w, m))
        w.copy_(new)

    def _update_many(self, group, ws, gs, states, rb):
        ms = [st["momentum_buffer"] for st in states]
        hs, _ = _directions(group, ws, gs, rb)
        torch._foreach_mul_(ms, group["momentum"])
        torch._foreach_add_(ms, hs, alpha=-group["lr"])
        geodesic_step_(ws, ms, rb.get("one")[0].fill_(1.0), rb)


class AdamG(_SphereOptimizer):
    r"""Adam on the sphere, "AdamG" (Cho & Lee 2017; baseline in Yi and Roburin).

    With ``h`` as in :class:`SGDG` and one scalar second moment per row::

        m' = β1 m + (1−β1) h;   v' = β2 v + (1−β2)‖h‖²
        Δ  = −η √(1−β2^t)/(1−β1^t) · m'/√(v'+ε)
        y ← exp(y, Δ);   m ← pt2(y, m', Δ);   v ← v'

    Non-invariant groups follow Adam with their own ``lr``, ``betas``, ``eps``, ``weight_decay``.
    """

    counterpart = "adam"

    def __init__(self, params, lr: float = 0.05, betas=(0.9, 0.99), eps: float = 1e-8,
                 clip: float = 0.1, ortho: float = 0.1, weight_decay: float = 0.0, *,
                 grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, ortho=ortho,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach))

    def _init_state(self, group, w, state):
        normalize_(w)
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(w)
        state["exp_avg_sq"] = torch.zeros_like(sqnorm(w))

    @staticmethod
    def _scale(group, step) -> float:
        beta1, beta2 = group["betas"]
        t = float(step)  # a CPU scalar, as in torch.optim.Adam: no device synchronisation
        return -group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)

    def _update_one(self, group, w, g, state):
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        h = _direction(group, w, g)
        m.lerp_(h, 1 - beta1)
        v.mul_(beta2).add_(sqnorm(h), alpha=1 - beta2)
        delta = m * (self._scale(group, state["step"]) * (v + group["eps"]).rsqrt())
        new = sphere_exp(w, delta)
        m.copy_(transport(w, m, delta))
        w.copy_(new)

    def _update_many(self, group, ws, gs, states, rb):
        beta1, beta2 = group["betas"]
        steps = step_count(states)
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        hs, h_norm = _directions(group, ws, gs, rb)
        torch._foreach_lerp_(ms, hs, 1 - beta1)
        v = rb.gather(vs).mul_(beta2).add_(h_norm.square_(), alpha=1 - beta2)
        torch._foreach_copy_(vs, rb.put("v", v))
        scale = rb.per_tensor("scale", [self._scale(group, s) for s in steps])
        geodesic_step_(ws, ms, scale * (v + group["eps"]).rsqrt(), rb)  # Δ = k m', k < 0


