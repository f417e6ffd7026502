"""Euclidean SGD and Adam steps corrected for the scale symmetry: PSGD (Arora et al.) and Adam-S,
Adam-SRT, SGD-MRT (Roburin et al.).

RT (rescale + transport, Roburin eq. 18) maps a buffer ``a`` from ``x_old`` to ``x_new``.  When the
step itself is ``x_new = x_old − c·a`` for a per-row scalar ``c`` (true for Adam-S and SGD-M), RT
reduces to the tangent projection ``a − <x_new, a>/‖x_new‖² · x_new``, which the vectorized paths
use (no copy of the weights); the reference paths apply eq. 18 literally.

These are Euclidean steps: a zero row with a nonzero gradient moves off zero exactly as under
torch's SGD or Adam (PSGD then scales it back to its norm, zero).
"""

from __future__ import annotations

import torch

from . import kernels
from .base import (
    ScaleInvariantOptimizer,
    add_scaled_,
    foreach_add_scaled_,
    momentum_buffer,
    new_step,
    step_count,
    step_value,
)
from .geometry import (
    accumulate_dtype,
    group_size,
    norm,
    rescale_transport,
    safe_inv,
    sqnorm,
    sqnorm_of_sum,
)


def _step_and_project_(xs, bufs, c, layout, xx, xa, aa):
    """``x ← x + c a``, then ``a ← a − <x, a>/‖x‖² · x`` at the new ``x`` per row, vectorized
    (the fast form of RT, see above); ``c`` and the sums ``‖x‖², <x, a>, ‖a‖²`` taken before the
    step are flat tensors.  Returns ``‖x_new‖²``, derived from them as is ``<x_new, a>``."""
    after = sqnorm_of_sum(1.0, c, xx, xa, aa)
    k = xa.addcmul(aa, c).mul_(safe_inv(after))  # <x_new, a>/‖x_new‖²
    torch._foreach_addcmul_(xs, bufs, layout.split(c))
    torch._foreach_addcmul_(bufs, xs, layout.split(-k))
    return after


class ProjectedSGD(ScaleInvariantOptimizer):
    r"""Projected SGD, "PSGD" (Arora et al., Appendix D).

    A plain SGD step (torch.optim's, with ``momentum`` if set), then every invariant group is
    rescaled back to the norm it had before the step.  This removes SGD's auto rate-tuning
    (the growth ``‖w_{t+1}‖² = ‖w_t‖² + η²‖g‖²`` of Arora Lemma 2.4).  Weight decay has no
    meaning on invariant groups (the projection undoes it).
    """

    invariant_zero = ("weight_decay",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    def _init_states(self, group, ws, gs, states, layout, stats):
        return gs  # no state but torch.optim.SGD's momentum buffer (so no norms to take for it)

    def _keeps_state(self, group):
        return bool(group["momentum"])

    def _update_one(self, group, w, g, state, stats):
        before = norm(w)
        self._sgd(group, [w], [g], [state], foreach=False)
        w.mul_(before * safe_inv(norm(w)))

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        bufs = mu = None
        if group["momentum"]:  # torch.optim.SGD's buffer: the first step's is the gradient
            mu = [(group["momentum"] if "momentum_buffer" in st else 0.0,) for st in states]
            bufs = [momentum_buffer(st, g) for st, g in zip(states, gs)]
        return kernels.run("psgd", ws, gs, b=bufs, k=mu, h=(group["lr"],))

    def _update_many(self, group, ws, gs, states, layout, stats):
        if not layout.fuse_reductions:  # torch.optim's SGD step, then back to the norm before it
            before = layout.norms(ws)
            self._sgd(group, ws, gs, states, foreach=True)
            torch._foreach_mul_(ws, layout.split(before.mul_(safe_inv(layout.norms(ws)))))
            return
        ds = gs
        if group["momentum"]:  # torch.optim.SGD's buffer (weight decay is 0 here)
            old = [(st["momentum_buffer"], g) for st, g in zip(states, gs) if "momentum_buffer" in st]
            if old:
                bufs, grads = map(list, zip(*old))
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
            ds = [momentum_buffer(st, g, torch.clone) for st, g in zip(states, gs)]
        ww, wd, dd = layout.sums([(ws, ws), (ws, ds), (ds, ds)], apart=ds is not gs)
        # w ← (w − η d)·‖w‖/‖w − η d‖, with ‖w − η d‖² = ‖w‖² − 2η<w, d> + η²‖d‖²
        lr = group["lr"]
        f = ww.sqrt().mul_(safe_inv(sqnorm_of_sum(1.0, -lr, ww, wd, dd).sqrt_()))
        torch._foreach_mul_(ws, layout.split(f))
        torch._foreach_addcmul_(ws, ds, layout.split(f.mul_(-lr)))

    def scheduling_beta(self, p, view, before):
        return None  # the projection is not of the form x − η a ⊘ b


class AdamS(ScaleInvariantOptimizer):
    r"""Adam-S (Roburin §4.1, eq. 15): Adam with one scalar second moment per invariant group.

    With ``ĝ = g + λx`` (coupled L2, as in the paper) and ``d`` the group size::

        m ← β1 m + (1−β1) ĝ;   v ← β2 v + (1−β2) ‖ĝ‖²/d
        x ← x − η (m/(1−β1^t)) / (√(v/(1−β2^t)) + ε)

    Non-invariant groups follow Adam.  State: ``exp_avg`` (one buffer per parameter) and
    ``exp_avg_sq`` (one scalar per group).
    """

    uses_row_norms = False  # finite at rows ×1e±30 in float32 (tests/test_reliability.py)

    counterpart = "adam"
    _transport = False
    #: per tensor, inductor (torch 2.13, CPU) recomputes the bias corrections (powers of the step)
    #: in the innermost loop: 2.7× slower than over the group on VGG16-BN
    compile_per_tensor = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grouping=None, check_finite: bool = False,
                 foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    #: one scalar per group, float32 for float16/bfloat16 parameters: (1 − β2)‖g‖²/d is below
    #: half a unit in the last place of a bfloat16 v once v ≳ 0.5‖g‖²/d (β2 = 0.999), and v
    #: stalled there (bias-corrected 0.263 where torch's Adam reached 0.526: steps 2× too large)
    accumulated_state = ("exp_avg_sq",)

    def _init_state(self, group, w, state, n):
        state["step"] = new_step(group, w)
        state["exp_avg"] = torch.zeros_like(w)  # in w's dtype, as torch.optim.Adam's
        state["exp_avg_sq"] = torch.zeros(n.shape, dtype=accumulate_dtype(w.dtype), device=w.device)

    @staticmethod
    def _hyper(group, t):
        """``(η/(1 − β1^t), (1 − β2^t)^(-1/2))`` at step ``t`` (a number, or a 0-d tensor)."""
        beta1, beta2 = group["betas"]
        return group["lr"] / (1 - beta1**t), (1 - beta2**t) ** -0.5

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        beta1, beta2 = group["betas"]
        hyper = [self._hyper(group, step_value(st["step"]) + 1) for st in states]
        done = kernels.run("adams", ws, gs, b=[st["exp_avg"] for st in states],
                           s1=[st["exp_avg_sq"] for st in states], k=hyper,
                           h=(beta1, beta2, group["weight_decay"], group["eps"], float(self._transport)))
        if done:
            step_count(states)
        return done

    def _update_one(self, group, w, g, state, stats):
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"]:
            g = g.add(w, alpha=group["weight_decay"])
        m.lerp_(g, 1 - beta1)
        d = max(group_size(w), 1)  # (an empty tensor: no entry)
        v.mul_(beta2).add_(sqnorm(g, v.dtype), alpha=(1 - beta2) / d)
        lr_hat, v_hat = self._hyper(group, step_value(state["step"]))
        coef = -lr_hat / (v.sqrt() * v_hat + group["eps"])
        old = w.clone() if self._transport else None
        w.addcmul_(m, coef)
        if self._transport:
            m.copy_(rescale_transport(m, old, w))
            v.mul_(sqnorm(old, v.dtype) * safe_inv(sqnorm(w, v.dtype)))

    def _update_many(self, group, ws, gs, states, layout, stats):
        beta1, beta2 = group["betas"]
        steps = step_count(states)
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        if group["weight_decay"]:
            gs = torch._foreach_add(gs, ws, alpha=group["weight_decay"])
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        pairs = [(gs, gs)] + ([(ws, ws), (ws, ms), (ms, ms)] if self._transport else [])
        g2, *sums = layout.sums(pairs)
        layout.scale_per_tensor_(g2, [(1 - beta2) / max(d, 1) for d in layout.group_sizes])
        v = layout.gather(vs).mul_(beta2).add_(g2)
        hyper = [self._hyper(group, step_value(s)) for s in steps]
        denom = layout.scale_per_tensor_(v.sqrt(), [vh for _, vh in hyper]).add_(group["eps"])
        coef = layout.scale_per_tensor_(denom.reciprocal_(), [-lh for lh, _ in hyper])
        if self._transport:
            after = _step_and_project_(ws, ms, coef, layout, *sums)
            v.mul_(sums[0] * safe_inv(after))
        else:
            torch._foreach_addcmul_(ws, ms, layout.split(coef))
        torch._foreach_copy_(vs, layout.split(v))

    def scheduling_beta(self, p, view, before):
        state = self.state[p]
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        v = state["exp_avg_sq"]
        if self._transport:  # undo the rescaling after the step
            v = v * sqnorm(view) * safe_inv(sqnorm(before))
        return (v / (1 - group["betas"][1] ** float(state["step"]))).sqrt() + group["eps"]


class AdamSRT(AdamS):
    r"""Adam-SRT (Roburin §4.2, eqs. 19–21, Algorithm 1): Adam-S, then after each step::

        m ← RT(m);   v ← v · ‖x_old‖²/‖x_new‖²

    so that the momentum is transported to the new point and the effective direction does not
    depend on the radius history.
    """

    uses_row_norms = True  # its rescaling needs ‖w‖²

    _transport = True


class SGDMRT(ScaleInvariantOptimizer):
    r"""SGD-MRT (Roburin Appendix E.2): SGD with momentum and ``buf ← RT(buf)`` after each step::

        buf ← μ buf + g + λx;   x ← x − η buf;   buf ← RT(buf)

    Non-invariant groups follow SGD with momentum.
    """

    uses_row_norms = False  # finite at rows ×1e±30 in float32 (tests/test_reliability.py)
    #: its sums are kept apart from the update (see RowLayout.sums): per tensor gains nothing
    compile_per_tensor = False

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 *, grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      grouping=grouping, check_finite=check_finite,
                                      foreach=foreach, fused=fused))

    def _init_state(self, group, w, state, n):
        state["momentum_buffer"] = torch.zeros_like(w)

    def _update_one(self, group, w, g, state, stats):
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        if group["weight_decay"]:
            buf.add_(w, alpha=group["weight_decay"])
        old = w.clone()
        add_scaled_(w, buf, -group["lr"])
        buf.copy_(rescale_transport(buf, old, w))

    fused_rule = True

    def _update_fused(self, group, ws, gs, states, stats):
        return kernels.run("sgdmrt", ws, gs, b=[st["momentum_buffer"] for st in states],
                           h=(group["lr"], group["momentum"], group["weight_decay"]))

    def _update_many(self, group, ws, gs, states, layout, stats):
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, gs)
        if group["weight_decay"]:
            torch._foreach_add_(bufs, ws, alpha=group["weight_decay"])
        if layout.fuse_reductions:
            sums = layout.sums([(ws, ws), (ws, bufs), (bufs, bufs)], apart=True)
            _step_and_project_(ws, bufs, torch.zeros_like(sums[0]).sub_(group["lr"]), layout, *sums)
            return
        foreach_add_scaled_(ws, bufs, -group["lr"])
        coef = layout.dots(ws, bufs).neg_().mul_(safe_inv(layout.norms(ws).square_()))
        torch._foreach_addcmul_(bufs, ws, layout.split(coef))

    def scheduling_beta(self, p, view, before):
        return torch.ones_like(sqnorm(view))


__all__ = ["ProjectedSGD", "AdamS", "AdamSRT", "SGDMRT"]
