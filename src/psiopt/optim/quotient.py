"""SGD on the positively-scale-invariant (PSI) quotient manifold (Yi et al.)."""

from __future__ import annotations

import torch

from . import kernels
from .base import ScaleInvariantOptimizer, momentum_buffer, new_step, readable, step_count
from .geometry import accumulate_dtype, is_invariant, norm, safe_inv


class PSISGD(ScaleInvariantOptimizer):
    r"""PSI-GD / PSI-SGD / PSI-SGDM (Yi, eqs. 9–11 and Algorithm 1).

    For every scale-invariant group ``w`` with gradient ``g``::

        u ← ρ·u − η·‖w‖²·(g + λ·w)        (Riemannian gradient ‖w‖² g of the quotient metric)
        w ← w + u                          (retraction R_W(Ξ) = W + Ξ)

    ``momentum=0`` gives PSI-SGD (PSI-GD with full batches).  The iterates are equivariant under
    per-group rescaling (Yi Theorem 1): starting from ``(a w, a u)`` gives ``a w(t)``.  The
    velocity ``u`` is stored as it is (state ``momentum_buffer``, kept from the first step with
    ``momentum ≠ 0``), so eq. 11 holds exactly whatever the momentum schedule does.
    ``weight_decay`` on an invariant group is Yi's coupled L2 (Table 2); the default is none.
    L2 makes the loss depend on the norm, so it needs ``fixed_norm=False`` (refused otherwise).
    A zero group stays zero.

    Norms.  Under eq. 10 the norms grow geometrically (``‖w + u‖² = ‖w‖²(1 + η²‖∇L(w/‖w‖)‖²)``
    for ``ρ = 0``), and a BatchNorm's running statistics, an average over past steps, could lag
    behind the scale of its input.

    * ``fixed_norm=True`` (default): before each update, ``(w, u)`` are rescaled together by
      ``s = r₀/‖w‖`` (``r₀`` the group's norm at its first step) and the update is taken at
      ``s w`` (gradient ``g/s``).  By Theorem 1 the directions, and so the train-mode network, are
      those of eq. 10–11; the norm that forward passes see stays within one step's growth of
      ``r₀`` and cannot overflow.  This per-step rescaling is deliberately not applied to the
      running statistics: it keeps the scale they track constant.
    * ``fixed_norm=False``: eq. 10–11 literally, with Yi's overflow guard (§6.2): every
      ``guard_every`` steps, a group whose norm exceeds ``max_norm`` is divided, with its
      velocity, by its norm; the running statistics it feeds follow that rescaling, so the
      eval-mode network is unchanged by it.  ``max_norm`` (default ``1e4``) and ``guard_every``
      (default 16) are used in this mode only: left unset (``None``) they take those defaults
      there, and setting them with ``fixed_norm=True``, where they would change nothing, is
      refused (``ValueError``).

    Measured with ``python scripts/psi_norm_stats.py`` (Fashion-MNIST, ``mlp-bn``, batch 128, 20
    epochs, lr ×0.1 at epochs 10 and 15, seeds 0–2, one thread; registry settings: PSI-SGD lr 1.0,
    PSI-SGDM lr 0.1 ρ 0.9, SGD-M lr 0.1 ρ 0.9): test accuracy (%) in eval mode → after
    recomputing the BatchNorm statistics on the training set, mean of 3 seeds::

        epoch                  1              5              10             20
        PSI-SGD  fixed_norm    83.80→84.88    84.93→86.27    84.19→85.97    90.05→90.05
        PSI-SGD  literal       83.58→84.67    84.00→85.38    83.64→85.62    89.92→89.90
        PSI-SGDM fixed_norm    85.00→85.37    87.01→87.30    86.40→86.94    90.02→90.02
        PSI-SGDM literal       85.46→85.61    86.85→87.20    86.37→86.96    89.95→89.95
        SGD-M (control)        85.68→85.76    88.04→88.13    88.57→88.78    89.80→89.91

    So at this budget the norm growth is not what makes the statistics lag: at PSI-SGD's lr 1.0
    they lag by 1–2 points in both modes (the rows turn fast: the effective learning rate on the
    sphere is η), PSI-SGDM's by 0.15–0.6; the two modes' gaps differ by at most 0.22 points, in
    either direction (within the seed noise), and once the learning rate has dropped the gap is
    ≤ 0.1 point either way.  ``fixed_norm`` stays the default because it removes the norm growth
    and with it the overflow guard, at the cost of one more pass over the weights per step; to
    evaluate mid-training at a high learning rate, recompute the statistics first
    (``torch.optim.swa_utils.update_bn``, as the script does; it covers BatchNorm layers only).

    Non-invariant groups follow SGD with their own ``lr``, ``momentum`` and ``weight_decay``.
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 fixed_norm: bool = True, max_norm: float | None = None,
                 guard_every: int | None = None, *,
                 grouping=None, check_finite: bool = False, foreach=None, fused=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      fixed_norm=fixed_norm, max_norm=max_norm,
                                      guard_every=guard_every, grouping=grouping,
                                      check_finite=check_finite, foreach=foreach, fused=fused))

    #: the overflow guard's settings where they are left unset (literal mode only)
    MAX_NORM, GUARD_EVERY = 1e4, 16

    @classmethod
    def _check_rule(cls, group):
        super()._check_rule(group)
        if group["fixed_norm"]:
            unused = [k for k in ("max_norm", "guard_every") if group.get(k) is not None]
            if unused:
                raise ValueError(
                    f"invalid {' and '.join(unused)} for an invariant group of PSISGD with "
                    f"fixed_norm=True: {', '.join(repr(group[k]) for k in unused)} (the overflow "
                    "guard runs only with fixed_norm=False; with the norm held fixed it would "
                    "change nothing: leave it unset, or pass fixed_norm=False)")
        if group["fixed_norm"] and group["weight_decay"]:
            raise ValueError(
                f"invalid weight_decay for an invariant group of PSISGD with fixed_norm=True: "
                f"{group['weight_decay']!r} (coupled L2 makes the loss depend on the norm, so "
                "rescaling rows to their first norm would change the trajectory; pass "
                "fixed_norm=False to run eq. 10-11 with L2 literally)")

    def _upgrade_saved_group(self, saved, live):
        """Groups saved before the guard's settings could be left unset held the defaults
        ``max_norm=1e4, guard_every=16`` also with ``fixed_norm=True``: those mean unset."""
        saved = super()._upgrade_saved_group(saved, live)
        if saved.get("fixed_norm") and saved.get("max_norm") == self.MAX_NORM \
                and saved.get("guard_every") == self.GUARD_EVERY:
            saved.update(max_norm=None, guard_every=None)
        return saved

    def _init_state(self, group, w, state, n):
        if group["fixed_norm"]:
            state["norm"] = n.clone()
        else:
            state["step"] = new_step(group, w)

    @staticmethod
    def _steps(group, states, ws) -> bool:
        """Literal mode's step counters, the guard's schedule (made if ``fixed_norm`` was on
        before; with it on no counter is kept: torch.optim.SGD keeps none either).  Returns
        whether the counters are uneven (parameters that missed steps), where they can be read
        (:func:`~psiopt.optim.base.readable`); counters on a device, or traced, are not read
        (``False``): :meth:`_factor` then schedules the guard per tensor without a branch."""
        if group["fixed_norm"]:
            return False
        for st, w in zip(states, ws):
            if "step" not in st:
                st["step"] = new_step(group, w)
        if len(states) < 2 or not all(readable(st["step"]) for st in states):
            return False
        return len({float(st["step"]) for st in states}) > 1

    @staticmethod
    def _guard(n, max_norm):
        """Per-group factor ``1/‖w‖`` above ``max_norm``, else 1."""
        return torch.where(n > max_norm, safe_inv(n), torch.ones_like(n))

    def _factor(self, group, n, states, r0, layout=None):
        """Per-group rescaling ``s`` applied before this step, or ``None``; and whether the
        running statistics follow it (they do for the guard, not for the fixed norm).  The
        guard's schedule is read from a CPU counter (no device synchronisation, as in
        torch.optim); counters on a device, or traced by ``torch.compile``, are not read: the
        guard's factor is then taken at every step and applied where the counter says (1
        elsewhere; no graph break, one more pass over the weights per step)."""
        if group["fixed_norm"]:
            return r0 * safe_inv(n), False
        max_norm = group["max_norm"]
        max_norm = self.MAX_NORM if max_norm is None else max_norm
        every = self._guard_every(group)
        steps = [st["step"] for st in states]
        if all(readable(t) for t in steps):
            if int(steps[0]) % every:
                return None, False
            return self._guard(n, max_norm), True
        due = torch.stack(steps).remainder(every).eq(0).to(n.device)  # per tensor
        if layout is not None and len(steps) > 1:
            due = torch.cat([d.expand(k) for d, k in zip(due, layout.sizes)]).view(n.shape)
        else:
            due = due.view(())
        return torch.where(due, self._guard(n, max_norm), torch.ones_like(n)), True

    @classmethod
    def _guard_every(cls, group) -> int:
        every = group["guard_every"]
        return cls.GUARD_EVERY if every is None else every

    @staticmethod
    def _has_velocity(group, states) -> bool:
        return bool(group["momentum"]) or any("momentum_buffer" in st for st in states)

    def _update_one(self, group, w, g, state, stats):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        self._steps(group, [state], [w])
        if not group["fixed_norm"]:
            step_count([state])
        n = norm(w, accumulate_dtype(w.dtype))  # (‖w‖² leaves float16's range past 256)
        if group["fixed_norm"]:
            state.setdefault("norm", n.to(w.dtype, copy=True))  # (as the vectorized path keeps it)
        s, follow = self._factor(group, n, [state], state.get("norm"))
        coef = n.square().mul_(-lr)
        if s is not None:
            coef.mul_(s)  # the update at s·w: ‖s w‖² (g/s) = s ‖w‖² g
            if follow:
                for st in stats:
                    st.rescale_(s)
        if wd:  # L2 at the point s·w
            g = g.add(w, alpha=wd) if s is None else g.addcmul(w, s.square() * wd)
        step = g * coef
        if self._has_velocity(group, [state]):
            step = momentum_buffer(state, w).mul_(rho if s is None else rho * s).add_(step)
        if s is not None:
            w.mul_(s)
        w.add_(step)

    fused_rule = True

    def _rescales_rows(self, group: dict) -> bool:
        return is_invariant(group.get("grouping")) and not group["fixed_norm"]  # (the guard)

    def _update_fused(self, group, ws, gs, states, stats):
        literal = not group["fixed_norm"]
        if literal and (self._steps(group, states, ws)
                        or not all(readable(st["step"]) for st in states)
                        or (int(states[0]["step"]) + 1) % self._guard_every(group) == 0):
            return False  # uneven or unread counters, or a guard step: the vectorized path
        if not literal and any("norm" not in st for st in states):
            return False  # fixed_norm switched on later: the vectorized path takes the norms
        us = [momentum_buffer(st, w) for st, w in zip(states, ws)] \
            if self._has_velocity(group, states) else None
        done = kernels.run("psi", ws, gs, b=us, s1=None if literal else [st["norm"] for st in states],
                           h=(group["lr"], group["momentum"], group["weight_decay"]))
        if done and literal:
            step_count(states)
        return done

    def _update_many(self, group, ws, gs, states, layout, stats):
        lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
        if self._steps(group, states, ws):
            # uneven counters: each tensor on its own guard schedule, its norms reduced as the
            # group's layout reduces them (under FSDP2, across ranks)
            for i, (w, g, st, sts) in enumerate(zip(ws, gs, states, stats)):
                self._update_many(group, [w], [g], [st], layout.single(i, w), [sts])
            return
        if not group["fixed_norm"]:
            step_count(states)
        n = layout.norms(ws)
        r0 = None
        if group["fixed_norm"]:
            if any("norm" not in st for st in states):  # fixed_norm switched on later
                for st, v, w in zip(states, layout.split(n), ws):  # in the parameter's dtype
                    st.setdefault("norm", v.to(w.dtype, copy=True))
            r0 = layout.gather([st["norm"] for st in states])
        s, follow = self._factor(group, n, states, r0, layout)
        coef = n.square().mul_(-lr)
        if s is not None:
            coef.mul_(s)
            if follow:
                for sts, factors in zip(stats, layout.split(s)):
                    for st in sts:
                        st.rescale_(factors)
        if wd:
            gs = (torch._foreach_add(gs, ws, alpha=wd) if s is None
                  else torch._foreach_addcmul(gs, ws, layout.split(s.square() * wd)))
        if self._has_velocity(group, states):
            us = [momentum_buffer(st, w) for st, w in zip(states, ws)]
            torch._foreach_mul_(us, rho if s is None else layout.split(s * rho))
            torch._foreach_addcmul_(us, gs, layout.split(coef))
            if s is not None and torch.compiler.is_compiling():
                # in place, inductor (torch 2.13, CPU) fails in outer-loop fusion ("KeyError:
                # 'bufN'"); out of place it compiles, and the fused kernel writes w once anyway
                torch._foreach_copy_(ws, torch._foreach_add(torch._foreach_mul(ws, layout.split(s)), us))
                return
            if s is not None:
                torch._foreach_mul_(ws, layout.split(s))
            torch._foreach_add_(ws, us)
        else:
            if s is not None:
                torch._foreach_mul_(ws, layout.split(s))
            torch._foreach_addcmul_(ws, gs, layout.split(coef))


__all__ = ["PSISGD"]
