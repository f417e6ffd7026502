"""Methods that keep every scale-invariant row on the unit sphere: UN, SGDG, AdamG and AdamG*.

Building the optimizer does not touch the model.  Each parameter's rows are prepared once, at
its first step (or when :meth:`~_SphereOptimizer.prepare` is called): unit-normalised, with the
running statistics of the normalisation layers they feed following (see ``norm_stats`` in
:func:`psiopt.param_groups`), so the eval-mode network is unchanged by it; AdamG* takes ``r₀``
from the rows as they are then.  That first step uses the gradient at the unit row
(``∇L(w/‖w‖) = ‖w‖ ∇L(w)`` by scale invariance, a temporary for that step only).  The state the
preparation creates marks it done: it travels in ``state_dict``, so a resumed optimizer never
prepares again (and fine-tuning, ``create_optimizer`` then ``model.load_state_dict``, prepares
the loaded rows).  A zero row has no direction: it stays zero (state ``live`` is 0 for it, 1 for
every other row).
"""

from __future__ import annotations

import functools

import torch

from . import kernels
from .base import (
    ScaleInvariantOptimizer,
    add_scaled_,
    float64_setting,
    foreach_add_scaled_,
    new_step,
    readable,
    step_count,
    step_value,
    warn_unlinked,
)
from .discovery import rescale_rows_
from .geometry import (
    accumulate_dtype,
    add_orthogonality_residual,
    clip,
    geodesic_step_,
    group_size,
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
    """Rows live on the unit sphere: normalised at each parameter's first step (or by
    :meth:`prepare`); weight decay (and, where the rule has none, momentum) have no meaning on
    them."""

    invariant_zero = ("weight_decay",)

    def _rescales_rows(self, group: dict) -> bool:
        return is_invariant(group.get("grouping"))  # (the unit-normalisation)

    @torch.no_grad()
    def prepare(self) -> None:
        """Prepare now, rather than at their first step, the rows of every invariant parameter
        not yet prepared (no state): unit-normalise them, the running statistics in the group's
        ``norm_stats`` following, and create their state (AdamG*'s ``r₀``: the norms before).
        Needs no gradient; a parameter with state (stepped, or loaded from a state dict) is left
        alone, so calling it again, or after ``load_state_dict``, changes nothing."""
        for group in self.param_groups:
            if not is_invariant(group["grouping"]):
                continue
            index = [i for i, p in enumerate(group["params"]) if not self.state.get(p)]
            if not index:
                continue
            params = [group["params"][i] for i in index]
            ws, layout, shards = self._rows(group["grouping"], params)
            states = [self.state[p] for p in params]
            if shards is not None:
                states, kept = self._local_states(states, shards)
            self._init_states(group, ws, None, states, layout, self._stats(group, index))
            if shards is not None:
                self._store_states(params, shards, ws, states, kept)

    def _init_states(self, group, ws, gs, states, layout, stats):
        """The one-time preparation of the parameters without state: rows scaled to unit norm
        (running statistics following), state created from the norms before, and the
        gradients (taken at the raw rows) scaled to the unit rows' for this step."""
        fresh = [i for i, st in enumerate(states) if not st]
        if not fresh:
            return gs
        if "norm_stats" not in group and not torch.compiler.is_compiling():  # (a graph break)
            warn_unlinked(self, stacklevel=4)
        ns = self._norms(ws, layout)  # float32 for float16/bfloat16 rows
        gs = None if gs is None else list(gs)
        for i in fresh:
            n = ns[i]
            rescale_rows_(ws[i], safe_inv(n), stats[i])
            if gs is not None:  # ∇L(w/‖w‖) = ‖w‖ ∇L(w): the gradient at the unit row
                gs[i] = gs[i] * n.to(gs[i].dtype)
            self._init_state(group, ws[i], states[i], n)
        return gs

    @staticmethod
    def _live(n, w) -> torch.Tensor:
        """1 for a row of nonzero norm ``n``, 0 for a zero row (which stays zero), in ``w``'s
        dtype."""
        return (n > 0).to(w.dtype)


class UnitNormSGD(_SphereOptimizer):
    r"""Unit-norm manifold SGD, "UN" (Badrinarayanan et al., eq. 2).

    Rows are unit-normalised at their first step (or by :meth:`prepare`), then::

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
        state["live"] = self._live(n, w)

    def _update_one(self, group, w, g, state, stats):
        add_scaled_(w, tangent(w, g) * state["live"], -group["lr"])
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
    old η's scale.  ``r4`` is taken from ``r₀`` and the row is then unit-normalised (the first
    step's gradient scaled to the unit row), so the direction sequence matches SGD+L2 from the
    raw rows to second order.  ``r4`` is kept in float32 for float16/bfloat16 rows (in float16
    it overflows above a row norm of 16, and the row would then never move).  Non-invariant
    groups follow SGD with the same ``lr`` and ``weight_decay`` and no momentum (Theorem 4 as
    written); ``momentum`` applies to them only.
    """

    invariant_zero = ("momentum",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    @classmethod
    def _check_rule(cls, group):
        super()._check_rule(group)
        lr = group["lr"]  # (a tensor on a device, or traced: checked when the group was added)
        if readable(lr) and lr * group["weight_decay"] >= 1.0:
            raise ValueError(f"invalid lr·weight_decay for AdamGStar: {group['lr']}·"
                             f"{group['weight_decay']} (SGD+L2 needs lr·weight_decay < 1)")

    accumulated_state = ("r4",)

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the state of earlier psiopt versions, which saved Roburin's ``v``:
        ``r4 = 2η²(1 − ηλ)² v``.  ``r4`` of a float16/bfloat16 parameter stays float32
        (:attr:`accumulated_state`)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _, _, scale = self._coefficients(group)
            for p in group["params"]:
                state = self.state.get(p, {})
                if "r4" not in state and "v" in state:
                    state["r4"] = state.pop("v").to(accumulate_dtype(p.dtype)).mul_(scale)

    def _init_state(self, group, w, state, n):
        """``r4 = r₀⁴`` (``n``: the rows' norms before they are unit-normalised, float32 for
        float16/bfloat16 rows, where ``r4`` stays); ``live`` in the row's dtype."""
        state["r4"] = n.to(accumulate_dtype(w.dtype)).square().square()
        state["live"] = self._live(n, w)

    @staticmethod
    def _coefficients(group) -> tuple[float, float, float]:
        """``(−η/(1 − ηλ), (1 − ηλ)⁴, 2η²(1 − ηλ)²)``: step factor on ``g/√r4`` and ``r4``'s update.
        A tensor ``η`` (a device lr, or a compiled step's) is taken in float64, as a number is: a
        float32 one rounded ``1 − ηλ`` to 1 for ηλ below 6e-8 (no weight decay, silently)."""
        lr = float64_setting(group["lr"])
        decay = 1.0 - lr * group["weight_decay"]
        return -lr / decay, decay**4, 2.0 * (lr * decay) ** 2

    def _update_one(self, group, w, g, state, stats):
        step, keep, add = self._coefficients(group)
        r4 = state["r4"]
        w.add_(g * (step * safe_inv(r4.sqrt()) * state["live"]))
        normalize_(w)
        add_scaled_(r4.mul_(keep), sqnorm(g, r4.dtype), add)

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
        torch._foreach_copy_(r4s, layout.split(add_scaled_(r4.mul_(keep), gg, add)))


# -- Cho & Lee: SGDG and AdamG ----------------------------------------------------------------------
def _omega(group, rows: int, size: int) -> float:
    """The penalty weight ω for a tensor of ``rows`` groups of ``size`` entries: ``ortho`` where
    ``YYᵀ = I`` can hold as Cho & Lee's code requires (fewer rows than entries per row, the
    authors' ``value.size(0) < prod(value.size()[1:])``), or everywhere with
    ``ortho_rows="all"``; else 0 (the row's sphere step without the penalty)."""
    if group.get("ortho_rows", "fitting") == "all" or rows < size:
        return group["ortho"]
    return 0.0


def _penalised(group, w, g, residual=None, fits=None):
    """``g + ω ∂/∂Y ½‖YYᵀ − I‖²_F = g + 2ω (YYᵀ − I) Y`` for the rows ``Y`` of one tensor
    (``residual(Y)`` = ``(YYᵀ − I) Y``, ``None`` for a single row; ω from :func:`_omega`, with
    ``fits`` = ``(rows, size)`` of the whole tensor, else of ``w``).  Without ``residual``, one
    matrix product into a copy of ``g``: a single full-size temporary."""
    omega = _omega(group, *(fits or (w.shape[0], group_size(w))))
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
    penalised = [i for i, w in enumerate(ws) if _omega(group, w.shape[0], group_size(w))]
    if not penalised:
        return kernels.run("sphere", ws, gs, b=bufs, s1=live, s2=seconds, k=scales, h=h)
    if not kernels.state_fits(ws, bufs, live, seconds):  # before any tensor is stepped
        return False

    def pick(xs, index):
        return None if xs is None else [xs[i] for i in index]

    plain = [i for i in range(len(ws)) if i not in penalised]
    if plain:  # one call for the tensors without the penalty
        kernels.run("sphere", pick(ws, plain), pick(gs, plain), b=pick(bufs, plain),
                    s1=pick(live, plain), s2=pick(seconds, plain), k=pick(scales, plain), h=h)
    for i in penalised:
        kernels.run("sphere", [ws[i]], [_penalised(group, ws[i], gs[i])], b=[bufs[i]],
                    s1=[live[i]], s2=pick(seconds, [i]), k=pick(scales, [i]), h=h)
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
    gs = [_penalised(group, y, g, functools.partial(layout.orthogonality_residual, i),
                     layout.rows_and_size(i))
          for i, (y, g) in enumerate(zip(ys, gs))]
    if layout.fuse_reductions:
        yy, yg, ym, mm = layout.sums([(ys, ys), (ys, gs), (ys, ms), (ms, ms)])
    else:
        yy, yg = None, layout.sums([(ys, gs)])[0]
    hs = torch._foreach_addcmul(gs, ys, layout.split(yg), value=-1.0)  # ĝ − t y
    # ‖ĝ − t y‖² in float64, as geometry.clip and the kernels: a norm beyond float32's range is
    # clipped, not zeroed (torch reduces a float64 copy of each tensor: this step took 5-15% longer
    # on resnet56's shapes, one CPU thread)
    hh = layout.sums([(hs, hs)], dtype=torch.float64)[0]
    f = (group["clip"] / hh.sqrt()).clamp_max_(1.0).to(live.dtype).mul_(live)
    torch._foreach_mul_(hs, layout.split(f))
    if yy is None:
        return hs, layout.sums([(hs, hs)])[0], None
    hh, mh = layout.sums([(hs, hs), (ms, hs)])
    return hs, hh, (yy, ym, mm, f * yg * (1.0 - yy), mh)


def _momentum_(ms, hs, a: float, b) -> None:
    """``m ← a m + b h`` for the directions ``hs`` of :func:`_directions`, in place."""
    torch._foreach_mul_(ms, a)
    foreach_add_scaled_(ms, hs, b)


def _geodesic_sums(a, b, hh, sums):
    """``(‖y‖², <y, m'>, ‖m'‖²)`` for ``m' = a m + b h`` from :func:`_directions`'s sums."""
    if sums is None:
        return None
    yy, ym, mm, yh, mh = sums
    return yy, a * ym + b * yh, sqnorm_of_sum(a, b, mm, mh, hh)


class _ChoLee(_SphereOptimizer):
    """What SGDG and AdamG share: ``ortho_rows`` (see :class:`SGDG`)."""

    def _upgrade_saved_group(self, saved, live):
        """State dicts saved before ``ortho_rows`` existed take this optimizer's choice."""
        saved = super()._upgrade_saved_group(saved, live)
        if "ortho_rows" not in saved:
            saved["ortho_rows"] = live["ortho_rows"] if live is not None else "fitting"
        return saved

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # pickled before ortho_rows was added
            group.setdefault("ortho_rows", "fitting")

    def _kernels_take_shards(self, group, shards) -> bool:
        """Not with the penalty on: ``(YYᵀ − I)Y`` couples a tensor's rows across ranks (and its
        weight ω depends on the whole tensor's rows), which only the vectorized path's
        collectives see (``ShardedLayout.orthogonality_residual``)."""
        return not group["ortho"] and super()._kernels_take_shards(group, shards)


class SGDG(_ChoLee):
    r"""SGD with momentum on the sphere, "SGDG" (Cho & Lee 2017; baseline in Yi).

    Rows ``y`` are unit-normalised at their first step (or by :meth:`prepare`), then::

        h  = clip(proj(y, g + ω ∂/∂Y ½‖YYᵀ−I‖²_F), ν)
        m' = β m − η h;   y ← exp(y, m');   m ← pt(y, m')

    ``ortho`` = ω weighs the orthogonality penalty ``½ω‖YYᵀ−I‖²_F`` among the rows of one tensor
    (gradient ``2ω(YYᵀ−I)Y``), the convention of Cho & Lee's own code (TensorFlow original and
    PyTorch port); it is not weight decay.  ``ortho_rows="fitting"`` (default) applies it, as
    the authors' code does, only to tensors with fewer rows than entries per row (their
    ``value.size(0) < prod(value.size()[1:])``), where ``YYᵀ = I`` can hold; the rows of the
    others take the same sphere step without the penalty (each row is still scale-invariant).
    ``ortho_rows="all"`` penalises every tensor of two rows or more (psiopt before this
    option).  ``clip`` = ν is the gradient clipping.  Non-invariant groups follow SGD with
    ``momentum``.
    """

    def __init__(self, params, lr: float = 0.2, momentum: float = 0.9, clip: float = 0.1,
                 ortho: float = 0.1, weight_decay: float = 0.0, *, ortho_rows: str = "fitting",
                 grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, clip=clip, ortho=ortho,
                                      ortho_rows=ortho_rows,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach, fused=fused))

    def _init_state(self, group, w, state, n):
        state["momentum_buffer"] = torch.zeros_like(w)
        state["live"] = self._live(n, w)

    def _update_one(self, group, w, g, state, stats):
        m = state["momentum_buffer"]
        add_scaled_(m.mul_(group["momentum"]), _direction(group, w, g, state["live"]), -group["lr"])
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


class AdamG(_ChoLee):
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
                 ortho_rows: str = "fitting", grouping=None, check_finite: bool = False,
                 foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip, ortho=ortho,
                                      ortho_rows=ortho_rows,
                                      weight_decay=weight_decay, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach, fused=fused))

    accumulated_state = ("exp_avg_sq",)

    def _init_state(self, group, w, state, n):
        state["step"] = new_step(group, w)
        state["exp_avg"] = torch.zeros_like(w)  # in w's dtype, as torch.optim.Adam's
        # one scalar per row, float32 for float16/bfloat16 rows: (1 − β2)‖h‖² is below half a
        # unit in the last place of a bfloat16 v once v ≳ 0.5‖h‖², and v stalled there
        state["exp_avg_sq"] = torch.zeros(n.shape, dtype=accumulate_dtype(w.dtype), device=w.device)
        state["live"] = self._live(n, w)

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
        v.mul_(beta2).add_(sqnorm(h, v.dtype), alpha=1 - beta2)
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
