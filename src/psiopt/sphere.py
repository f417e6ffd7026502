"""Methods that keep each scale-invariant group on a sphere: UN, PSGD and AdamG*."""

from __future__ import annotations

import torch

from .base import ScaleInvariantOptimizer, step_count
from .geometry import dot, norm, normalize_, rows, safe_inv, sqnorm


class _SphereOptimizer(ScaleInvariantOptimizer):
    """Rows live on a sphere: weight decay has no meaning on them."""

    _decay_ok = False

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["grouping"] is not None and group["weight_decay"] and not self._decay_ok:
            raise ValueError(f"invalid weight_decay for an invariant group of {type(self).__name__}:"
                             f" {group['weight_decay']!r} (rows are kept on a sphere; use 0)")


class UnitNormSGD(_SphereOptimizer):
    r"""Unit-norm manifold SGD, "UN" (Badrinarayanan et al., eq. 2).

    Rows are unit-normalised at their first step, then::

        g̃ = g − <w, g> w;      w ← (w − λ g̃) / ‖w − λ g̃‖

    A zero row has no direction and stays zero.  Non-invariant groups follow SGD.
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    def _init_state(self, group, w, state):
        normalize_(w)
        state["step"] = torch.tensor(0.0)

    def _update_one(self, group, w, g, state):
        state["step"] += 1
        w.add_(g - dot(w, g) * w, alpha=-group["lr"])
        normalize_(w)

    def _update_many(self, group, ws, gs, states, rb):
        lr = group["lr"]
        step_count(states)
        # w − λ(g − <w,g>w) = (1 + λ<w,g>) w − λ g, then back to the sphere
        torch._foreach_mul_(ws, rb.put("scale", rb.dots(ws, gs, "dot").mul_(lr).add_(1.0)))
        torch._foreach_add_(ws, gs, alpha=-lr)
        torch._foreach_mul_(ws, rb.put("inv", safe_inv(rb.norms(ws, "norm"))))


class ProjectedSGD(_SphereOptimizer):
    r"""Projected SGD, "PSGD" (Arora et al., Appendix D).

    A plain SGD step (torch.optim's, with ``momentum`` if set), then every invariant group is
    rescaled back to the norm it had before the step.  This removes SGD's auto rate-tuning
    (the growth ``‖w_{t+1}‖² = ‖w_t‖² + η²‖g‖²`` of Arora Lemma 2.4).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    def _invariant(self, group, params, grads):
        ws = [rows(p, group["grouping"]) for p in params]
        if not self._foreach(group):
            before = [norm(w) for w in ws]
            self._counterpart(group, params, grads)
            for w, b in zip(ws, before):
                w.mul_(b * safe_inv(norm(w)))
            return
        rb = self._buffers(group, ws)
        before = rb.norms(ws, "before")
        self._counterpart(group, params, grads)
        torch._foreach_mul_(ws, rb.put("ratio", before * safe_inv(rb.norms(ws, "after"))))


class AdamGStar(_SphereOptimizer):
    r"""AdamG*, the unit-sphere scheme equivalent to SGD with L2 (Roburin Theorem 4).

    Built from the hyperparameters of the SGD it mimics: with SGD learning rate ``lr`` = η and
    L2 ``weight_decay`` = λ, invariant rows follow::

        x̂ = x − η* g/√v;   x ← x̂/‖x̂‖;   v ← β v + ‖g‖²
        β = (1 − ηλ)⁴,  η* = (2β)^(-1/2),  v₀ = r₀⁴ / (2η² β^(1/2))

    where ``r₀`` is each row's norm at its first step (the row is then unit-normalised).  The
    direction sequence matches SGD+L2 to second order in the radius dynamics; the mapping assumes a
    constant ``lr``.  Non-invariant groups follow SGD with the same ``lr`` and ``weight_decay``.
    """

    _decay_ok = True

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach))

    @staticmethod
    def sphere_hyper(lr: float, weight_decay: float) -> tuple[float, float]:
        """``(β, η*)`` of Theorem 4 for SGD learning rate ``lr`` and L2 ``weight_decay``."""
        beta = (1.0 - lr * weight_decay) ** 4
        return beta, (2.0 * beta) ** -0.5

    def _init_state(self, group, w, state):
        beta, _ = self.sphere_hyper(group["lr"], group["weight_decay"])
        state["step"] = torch.tensor(0.0)
        state["v"] = sqnorm(w) ** 2 / (2.0 * group["lr"] ** 2 * beta**0.5)
        normalize_(w)

    def _update_one(self, group, w, g, state):
        beta, eta = self.sphere_hyper(group["lr"], group["weight_decay"])
        state["step"] += 1
        v = state["v"]
        w.add_(g * (-eta * safe_inv(v.sqrt())))
        normalize_(w)
        v.mul_(beta).add_(sqnorm(g))

    def _update_many(self, group, ws, gs, states, rb):
        beta, eta = self.sphere_hyper(group["lr"], group["weight_decay"])
        step_count(states)
        vs = [st["v"] for st in states]
        v = rb.gather(vs)
        torch._foreach_addcmul_(ws, gs, rb.put("coef", safe_inv(v.sqrt()).mul_(-eta)))
        torch._foreach_mul_(ws, rb.put("inv", safe_inv(rb.norms(ws, "norm"))))
        torch._foreach_copy_(vs, rb.put("v", v.mul_(beta).add_(rb.norms(gs, "gnorm").square_())))
