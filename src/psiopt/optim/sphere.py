"""Methods that keep every scale-invariant row on the unit sphere: UN, SGDG, AdamG and AdamG*.

Rows are unit-normalised when their group is added to the optimizer (at construction), before
any gradient is computed, so the first step already uses the gradient at the unit row; the
running statistics of the normalisation layers they feed follow (see ``norm_stats`` in
:func:`psiopt.param_groups`), so the eval-mode network is unchanged by it.  A zero row has no
direction: it stays zero (state ``live`` is 0 for it, 1 for every other row).
"""

from __future__ import annotations

import functools

import torch

from . import kernels
from .base import ScaleInvariantOptimizer, step_count, step_value
from .geometry import (
    accumulate_dtype,
    add_orthogonality_residual,
    clip,
    geodesic_step_,
    is_invariant,
    normalize_,
    safe_inv,
    sphere_exp,
    sqnorm,
    sqnorm_of_sum,
    tangent,
    transport,
    transport_self,
)


class _SphereOptimizer(ScaleInvariantOptimizer):
    """Rows live on the unit sphere: normalised once every group is valid; weight decay (and,
    where the rule has none, momentum) have no meaning on them."""

    invariant_zero = ("weight_decay",)

    def _prepare(self, group):
        super()._prepare(group)
        if not is_invariant(group["grouping"]):
            return
        with torch.no_grad():
            for i, p in enumerate(group["params"]):
                (view,), layout, shards = self._rows(group["grouping"], [p])
                r0 = layout.norms([view]).view(layout.shapes[0]).to(view.dtype)
                if shards is None:
                    self._prepare_row_state(group, self._initial_state(p), r0)
                else:  # state of a sharded parameter: local tensors, kept as DTensors
                    state = {}
                    self._prepare_row_state(group, state, r0)
                    self._store_states([p], shards, [view], [state], [{}],
                                       into=[self._initial_state(p)])
                self._rescale(group, i, view, safe_inv(r0))

    def _prepare_row_state(self, group, state, r0) -> None:
        """State known before normalising (AdamG* needs ``r₀``)."""

    @staticmethod
    def _live(n) -> torch.Tensor:
        """1 for a row of nonzero norm ``n``, 0 for a zero row (which stays zero)."""
        return (n > 0).to(n.dtype)


class UnitNormSGD(_SphereOptimizer):
    r"""Unit-norm manifold SGD, "UN" (Badrinarayanan et al., eq. 2).

    Rows are unit-normalised at construction, then::

        g̃ = g − <w, g> w;      w ← (w − λ g̃) / ‖w − λ g̃‖

    Non-invariant groups follow SGD with their own ``momentum`` (the rule has none for rows).
    """

    invariant_zero = ("weight_decay", "momentum")

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    def _init_state(self, group, w, state, n):
        state["live"] = self._live(n)

    def _update_one(self, group, w, g, state, stats):
        w.add_(tangent(w, g) * state["live"], alpha=-group["lr"])
        normalize_(w)

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        return kernels.run("unit", ws, gs, s1=[st["live"] for st in states], h=(group["lr"],))

    def _update_many(self, group, ws, gs, states, layout, stats):
        lr = group["lr"]
        live = layout.gather([st["live"] for st in states])
        # w − λ(g − <w,g>w) = a w + b g with a = 1 + λ<w,g>, b = −λ; then divided by its norm
        if not layout.fuse_reductions:
            torch._foreach_mul_(ws, layout.split(layout.dots(ws, gs).mul_(lr).add_(1.0)))
            torch._foreach_addcmul_(ws, gs, layout.split(live.mul_(-lr)))
            torch._foreach_mul_(ws, layout.split(safe_inv(layout.norms(ws))))
            return
        ww, wg, gg = layout.sums([(ws, ws), (ws, gs), (gs, gs)])
        a, b = wg.mul(lr).add_(1.0), live.mul_(-lr)
        inv = safe_inv(sqnorm_of_sum(a, b, ww, wg, gg).sqrt_())
        torch._foreach_mul_(ws, layout.split(a * inv))
        torch._foreach_addcmul_(ws, gs, layout.split(b * inv))


class AdamGStar(_SphereOptimizer):
    r"""AdamG*, the unit-sphere scheme equivalent to SGD with L2 (Roburin Theorem 4).

    Built from the hyperparameters of the SGD it mimics (learning rate ``lr`` = η, L2
    ``weight_decay`` = λ), Roburin's scheme for invariant rows is::

        x̂ = x − η* g/√v;   x ← x̂/‖x̂‖;   v ← β v + ‖g‖²
        β = (1 − ηλ)⁴,  η* = (2β)^(-1/2),  v₀ = r₀⁴ / (2η² β^(1/2))

    with ``r₀`` each row's norm when the optimizer is built.  ``v`` stands for
    ``r⁴/(2η²β^(1/2))``, ``r`` the norm of the SGD iterate the row is the direction of; psiopt
    stores ``r4 = 2η²β^(1/2) v`` instead (state ``r4``), which does not depend on η::

        x̂ = x − η g / ((1 − ηλ) √r4);   x ← x̂/‖x̂‖;   r4 ← (1 − ηλ)⁴ r4 + 2η²(1 − ηλ)² ‖g‖²

    For a constant η this is the scheme above term for term; when η or λ changes (a learning-rate
    scheduler) it keeps following SGD+L2 with that schedule, where a stored ``v`` would be on the
    old η's scale.  ``r4`` is taken from ``r₀`` and the row is then unit-normalised, before any
    gradient is computed, so the direction sequence matches SGD+L2 from the raw rows to second
    order.  Non-invariant groups follow SGD with the same ``lr`` and ``weight_decay`` and no
    momentum (Theorem 4 as written); ``momentum`` applies to them only.
    """

    invariant_zero = ("momentum",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    def _check_rule(self, group):
        super()._check_rule(group)
        if group["lr"] * group["weight_decay"] >= 1.0:
            raise ValueError(f"invalid lr·weight_decay for AdamGStar: {group['lr']}·"
                             f"{group['weight_decay']} (SGD+L2 needs lr·weight_decay < 1)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the state of earlier psiopt versions, which saved Roburin's ``v``:
        ``r4 = 2η²(1 − ηλ)² v``.  ``r4`` of a float16/bfloat16 parameter stays float32 (see
        :meth:`_prepare_row_state`; torch.optim would cast it to the parameter's dtype)."""
        r4s = [state_dict["state"].get(i, {}).get("r4")
               for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        saved = dict(zip((p for g in self.param_groups for p in g["params"]), r4s))
        for group in self.param_groups:
            _, _, scale = self._coefficients(group)
            for p in group["params"]:
                state, dtype = self.state.get(p, {}), accumulate_dtype(p.dtype)
                if saved[p] is not None:
                    state["r4"] = saved[p].to(p.device, dtype, copy=True)
                elif "v" in state:
                    state["r4"] = state.pop("v").to(dtype).mul_(scale)

    def _prepare_row_state(self, group, state, r0):
        """``r4 = r₀⁴`` in float32 for float16/bfloat16 rows (in float16 it overflows above a row
        norm of 16, and the row would then never move); ``live`` in the row's dtype."""
        state["r4"] = r0.to(accumulate_dtype(r0.dtype)).square().square()
        state["live"] = (r0 > 0).to(r0.dtype)

    def _init_state(self, group, w, state, n):  # state lost (e.g. cleared): the row is unit, r₀ = 1
        self._prepare_row_state(group, state, n)

    @staticmethod
    def _coefficients(group) -> tuple[float, float, float]:
        """``(−η/(1 − ηλ), (1 − ηλ)⁴, 2η²(1 − ηλ)²)``: step factor on ``g/√r4`` and ``r4``'s update."""
        lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        return -lr / decay, decay**4, 2.0 * (lr * decay) ** 2

    def _update_one(self, group, w, g, state, stats):
        step, keep, add = self._coefficients(group)
        r4 = state["r4"]
        w.add_(g * (step * safe_inv(r4.sqrt()) * state["live"]))
        normalize_(w)
        r4.mul_(keep).add_(sqnorm(g), alpha=add)

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        return kernels.run("adamg_star", ws, gs, s1=[st["r4"] for st in states],
                           s2=[st["live"] for st in states], h=self._coefficients(group))

    def _update_many(self, group, ws, gs, states, layout, stats):
        step, keep, add = self._coefficients(group)
        r4s = [st["r4"] for st in states]
        r4 = layout.gather(r4s)
        coef = safe_inv(r4.sqrt()).mul_(layout.gather([st["live"] for st in states])).mul_(step)
        if layout.fuse_reductions:
            ww, wg, gg = layout.sums([(ws, ws), (ws, gs), (gs, gs)])
            inv = safe_inv(sqnorm_of_sum(1.0, coef, ww, wg, gg).sqrt_())  # of w + coef·g
            torch._foreach_mul_(ws, layout.split(inv))
            torch._foreach_addcmul_(ws, gs, layout.split(coef.mul_(inv)))
        else:
            gg = layout.norms(gs).square_()
            torch._foreach_addcmul_(ws, gs, layout.split(coef))
            torch._foreach_mul_(ws, layout.split(safe_inv(layout.norms(ws))))
        torch._foreach_copy_(r4s, layout.split(r4.mul_(keep).add_(gg, alpha=add)))


# -- Cho & Lee: SGDG and AdamG ----------------------------------------------------------------------
def _penalised(group, w, g, residual=None):
    """``g + ω ∂/∂Y ½‖YYᵀ − I‖²_F = g + 2ω (YYᵀ − I) Y`` for the rows ``Y`` of one tensor
    (``residual(Y)`` = ``(YYᵀ − I) Y``, ``None`` for a single row).  Without ``residual``, one
    matrix product into a copy of ``g``: a single full-size temporary."""
    omega = group["ortho"]
    if not omega:
        return g
    if residual is not None:  # (a sharded layout's takes its collective on every rank)
        penalty = residual(w.flatten(1))
        return g if penalty is None else g.add(penalty.view_as(w), alpha=2.0 * omega)
    y = w.flatten(1)
    return add_orthogonality_residual(g.reshape(y.shape), y, 2.0 * omega).view_as(w)


def _sphere_kernel(group, ws, gs, states, buffer: str, second=None, scales=None, h=()) -> bool:
    """SGDG's and AdamG's fused kernel.  With Cho & Lee's penalty the penalised gradient is a
    full-size temporary (torch's SGD makes none), so the tensors are stepped one at a time and
    one such temporary is alive at once."""
    bufs, live = [st[buffer] for st in states], [st["live"] for st in states]
    seconds = None if second is None else [st[second] for st in states]
    if not group["ortho"]:
        return kernels.run("sphere", ws, gs, b=bufs, s1=live, s2=seconds, k=scales, h=h)
    if not kernels.state_fits(ws, bufs, live, seconds):  # before any tensor is stepped
        return False
    for i, (w, g) in enumerate(zip(ws, gs)):
        kernels.run("sphere", [w], [_penalised(group, w, g)], b=[bufs[i]], s1=[live[i]],
                    s2=None if seconds is None else [seconds[i]],
                    k=None if scales is None else [scales[i]], h=h)
    return True


def _direction(group, w, g, live):
    """``h = clip(proj(y, g + ω ∂/∂Y ½‖YYᵀ − I‖²_F), ν)`` for the rows ``y`` of one tensor."""
    return clip(tangent(w, _penalised(group, w, g)), group["clip"]) * live


def _directions(group, ys, gs, ms, live, layout):
    """Vectorized :func:`_direction` for the rows ``ys`` with momenta ``ms``: ``h = f (ĝ − t y)``
    with ``t = <y, ĝ>`` and ``f`` the clipping factor (``ĝ`` penalised), formed, and its norm
    summed from it, as the reference path does: taken as ``‖ĝ‖² − t²(2 − ‖y‖²)`` it cancels
    where ĝ is nearly radial (Cho & Lee's penalty on a weight of more rows than columns:
    AdamG's second moment was 0.6% off in float32 beside a tangential gradient of 1e-4).
    Returns ``(h, ‖h‖², sums)``: ``sums`` is, where the layout fuses its reductions,
    ``(‖y‖², <y, m>, ‖m‖², <y, h>, <m, h>)``, else ``None``."""
    gs = [_penalised(group, y, g, functools.partial(layout.orthogonality_residual, i))
          for i, (y, g) in enumerate(zip(ys, gs))]
    if layout.fuse_reductions:
        yy, yg, ym, mm = layout.sums([(ys, ys), (ys, gs), (ys, ms), (ms, ms)])
    else:
        yy, yg = None, layout.sums([(ys, gs)])[0]
    hs = torch._foreach_addcmul(gs, ys, layout.split(yg), value=-1.0)  # ĝ − t y
    f = (group["clip"] / layout.sums([(hs, hs)])[0].sqrt()).clamp_max_(1.0).mul_(live)
    torch._foreach_mul_(hs, layout.split(f))
    if yy is None:
        return hs, layout.sums([(hs, hs)])[0], None
    hh, mh = layout.sums([(hs, hs), (ms, hs)])
    return hs, hh, (yy, ym, mm, f * yg * (1.0 - yy), mh)


def _momentum_(ms, hs, a: float, b: float) -> None:
    """``m ← a m + b h`` for the directions ``hs`` of :func:`_directions`, in place."""
    torch._foreach_mul_(ms, a)
    torch._foreach_add_(ms, hs, alpha=b)


def _geodesic_sums(a, b, hh, sums):
    """``(‖y‖², <y, m'>, ‖m'‖²)`` for ``m' = a m + b h`` from :func:`_directions`'s sums."""
    if sums is None:
        return None
    yy, ym, mm, yh, mh = sums
    return yy, a * ym + b * yh, sqnorm_of_sum(a, b, mm, mh, hh)


class SGDG(_SphereOptimizer):
    r"""SGD with momentum on the sphere, "SGDG" (Cho & Lee 2017; baseline in Yi).

    Rows ``y`` are unit-normalised at construction, then::

        h  = clip(proj(y, g + ω ∂/∂Y ½‖YYᵀ−I‖²_F), ν)
        m' = β m − η h;   y ← exp(y, m');   m ← pt(y, m')

    ``ortho`` = ω weighs the orthogonality penalty ``½ω‖YYᵀ−I‖²_F`` among the rows of one tensor
    (gradient ``2ω(YYᵀ−I)Y``), the convention of Cho & Lee's own code (TensorFlow original and
    PyTorch port); it is not weight decay.  ``clip`` = ν is the gradient clipping.
    Non-invariant groups follow SGD with ``momentum``.
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.9, clip: float = 0.1,
                 ortho: float = 0.1, weight_decay: float = 0.0, *, grouping=None,
                 check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, clip=clip, ortho=ortho,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach, fused=fused))

    def _init_state(self, group, w, state, n):
        state["momentum_buffer"] = torch.zeros_like(w)
        state["live"] = self._live(n)

    def _update_one(self, group, w, g, state, stats):
        m = state["momentum_buffer"]
        m.mul_(group["momentum"]).add_(_direction(group, w, g, state["live"]), alpha=-group["lr"])
        new = sphere_exp(w, m)
        m.copy_(transport_self(w, m))
        w.copy_(new)

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        return _sphere_kernel(group, ws, gs, states, "momentum_buffer",
                              h=(group["momentum"], -group["lr"], group["clip"]))

    def _update_many(self, group, ws, gs, states, layout, stats):
        ms = [st["momentum_buffer"] for st in states]
        live = layout.gather([st["live"] for st in states])
        hs, hh, sums = _directions(group, ws, gs, ms, live, layout)
        a, b = group["momentum"], -group["lr"]
        _momentum_(ms, hs, a, b)
        geodesic_step_(ws, ms, torch.ones_like(live), layout, _geodesic_sums(a, b, hh, sums))


class AdamG(_SphereOptimizer):
    r"""Adam on the sphere, "AdamG" (Cho & Lee 2017; baseline in Yi and Roburin).

    With ``h`` as in :class:`SGDG` and one scalar second moment per row::

        m' = β1 m + (1−β1) h;   v' = β2 v + (1−β2)‖h‖²
        Δ  = −η √(1−β2^t)/(1−β1^t) · m'/√(v'+ε)
        y ← exp(y, Δ);   m ← pt2(y, m', Δ);   v ← v'

    Non-invariant groups follow Adam with their own ``lr``, ``betas``, ``eps``, ``weight_decay``.
    """

    counterpart = "adam"
    compile_per_tensor = False  # as Adam-S's (bias corrections, see AdamS.compile_per_tensor)

    def __init__(self, params, lr: float = 0.05, betas=(0.9, 0.99), eps: float = 1e-8,
                 clip: float = 0.1, ortho: float = 0.1, weight_decay: float = 0.0, *,
                 grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, ortho=ortho,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach, fused=fused))

    def _init_state(self, group, w, state, n):
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(w)
        state["exp_avg_sq"] = torch.zeros_like(sqnorm(w))
        state["live"] = self._live(n)

    @staticmethod
    def _scale(group, t) -> float:
        """``−η √(1 − β2^t)/(1 − β1^t)`` at step ``t`` (a number, or a 0-d tensor)."""
        beta1, beta2 = group["betas"]
        return -group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        beta1, beta2 = group["betas"]
        done = _sphere_kernel(group, ws, gs, states, "exp_avg", "exp_avg_sq",
                              [(self._scale(group, step_value(st["step"]) + 1),) for st in states],
                              (beta1, 1 - beta1, group["clip"], beta2, group["eps"]))
        if done:
            step_count(states)
        return done

    def _update_one(self, group, w, g, state, stats):
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        h = _direction(group, w, g, state["live"])
        m.lerp_(h, 1 - beta1)
        v.mul_(beta2).add_(sqnorm(h), alpha=1 - beta2)
        delta = m * (self._scale(group, step_value(state["step"])) * (v + group["eps"]).rsqrt())
        new = sphere_exp(w, delta)
        m.copy_(transport(w, m, delta))
        w.copy_(new)

    def _update_many(self, group, ws, gs, states, layout, stats):
        beta1, beta2 = group["betas"]
        steps = step_count(states)
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        live = layout.gather([st["live"] for st in states])
        hs, hh, sums = _directions(group, ws, gs, ms, live, layout)
        _momentum_(ms, hs, beta1, 1 - beta1)  # m.lerp_(h, 1 − β1)
        v = layout.gather(vs).mul_(beta2).add_(hh, alpha=1 - beta2)
        torch._foreach_copy_(vs, layout.split(v))
        k = layout.scale_per_tensor_((v + group["eps"]).rsqrt_(),
                                     [self._scale(group, step_value(s)) for s in steps])
        geodesic_step_(ws, ms, k, layout,  # Δ = k m', k < 0
                       _geodesic_sums(beta1, 1 - beta1, hh, sums))


__all__ = ["UnitNormSGD", "AdamGStar", "SGDG", "AdamG"]
