"""Diagnostics for scale-invariant groups: norms and effective learning rates (SPEC §2).

Two effective learning rates per group, both from one optimizer step ``x_k → x_{k+1}``:

* ``measured``: ``tan∠(x_k, x_{k+1}) / ‖∇L(u_k)‖`` with ``∇L(u_k) = r_k g_k`` — the step taken on
  the unit sphere per unit of the current spherical gradient.  It is defined for every optimizer,
  equals Arora's ``η/‖w‖²`` for plain SGD, ``η`` for PSI-SGD and UN, and is what the plots show.
* ``theorem2``: Roburin Theorem 2 (eq. 11) for schemes ``x_{k+1} = x_k − η a ⊘ b`` (SGD, SGD-M,
  SGD-MRT, Adam, Adam-S, Adam-SRT): ``η_e = η/(r² β) · (1 − <x_k − x_{k+1}, x_k>/r²)^(-1)`` with
  ``β = d^{-1/2}‖b‖`` (1 for the SGD family).  This is Table 1 (e.g. ``η/r²`` for SGD,
  ``η/(r²(1−ηλ))`` with L2), with ``<c, u>`` read off the step itself.

And, for any optimizer (a ``torch.optim`` one built from :func:`psiopt.optimizer_groups`
included), the *angular update* ``∠(x_k, x_{k+1})`` (Kosson et al. 2024's measure of how fast a
scale-invariant group turns) and the split of the update ``Δ = x_{k+1} − x_k`` into its radial
part ``<Δ, u_k>/r_k`` (the relative change of the norm, to first order) and its tangential part
``‖Δ − <Δ, u_k> u_k‖/r_k``; beside it, where the rule has a formula, the angle ``η̂_r`` at
which weight decay holds it in equilibrium (:func:`~psiopt.optim.policies.equilibrium_angle`:
``√(2ηλ(1 − β1)/(1 + β1))`` for AdamW, ``√(2ηλ/(1 + α))`` for SGD with momentum ``α``).
"""

from __future__ import annotations

import torch

from .geometry import dot, is_invariant, norm, rows, safe_inv, sqnorm
from .policies import NormPolicy, equilibrium_angle
from .sharded import is_sharded


def group_of(optimizer, p: torch.Tensor) -> dict:
    """The parameter group of ``optimizer`` that holds ``p``."""
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


def invariant_parameters(optimizer) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, parameter, grouping)`` of every parameter in a group with a ``grouping``."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        if is_invariant(group.get("grouping")):
            names = group.get("param_names") or [f"group{gi}.{j}" for j in range(len(group["params"]))]
            out += [(n, p, group["grouping"]) for n, p in zip(names, group["params"])]
    return out


def _sin_cos(x_old, x_new) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(sin, cos)`` of ``∠(x_old, x_new)`` (keepdim), the sine as the norm of
    ``u_new``'s part orthogonal to ``u_old`` (no ``1 − cos²``)."""
    u_old, u_new = x_old * safe_inv(norm(x_old)), x_new * safe_inv(norm(x_new))
    cos = dot(u_old, u_new)
    return norm(u_new - cos * u_old), cos


def measured_effective_lr(x_old, x_new, grad) -> torch.Tensor:
    """Per-group ``tan∠(x_old, x_new) / (‖x_old‖ ‖g‖)`` for grouped views (flat result)."""
    sin, cos = _sin_cos(x_old, x_new)
    return (sin * safe_inv(cos) * safe_inv(norm(x_old) * norm(grad))).flatten()


def angular_update(x_old, x_new) -> torch.Tensor:
    """Per-group angle ``∠(x_old, x_new)`` in radians (``atan2(sin, cos)``, no ``arccos`` near
    1: a relative error of about 1e-16/θ in float64; flat result)."""
    return torch.atan2(*_sin_cos(x_old, x_new)).flatten()


def update_split(x_old, x_new) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(radial, tangential)`` parts of ``Δ = x_new − x_old`` relative to ``‖x_old‖``:
    ``<Δ, u>/r`` and ``‖Δ − <Δ, u> u‖/r`` with ``u = x_old/r`` (flat results)."""
    r = norm(x_old)
    u, delta = x_old * safe_inv(r), x_new - x_old
    radial = dot(delta, u)
    return (radial * safe_inv(r)).flatten(), (norm(delta - radial * u) * safe_inv(r)).flatten()


def theorem2_effective_lr(x_old, x_new, lr: float, beta) -> torch.Tensor:
    """Roburin eq. (11) with ``η<c,u>/(r²β) = <x_old − x_new, x_old>/r²`` (flat result)."""
    r2 = sqnorm(x_old)
    radial = dot(x_old - x_new, x_old) * safe_inv(r2)
    return (lr * safe_inv(r2 * beta * (1 - radial))).flatten()


def scheduling_beta(optimizer, p: torch.Tensor, view: torch.Tensor, before: torch.Tensor):
    """``β = d^{-1/2}‖b‖`` per group for the last step of ``p`` as the optimizer states it
    (its ``scheduling_beta`` method), or ``None`` if the step is not of the form ``x − η a ⊘ b``
    or the optimizer does not say (e.g. a plain torch.optim optimizer)."""
    method = getattr(optimizer, "scheduling_beta", None)
    return method(p, view, before) if method is not None else None


def predicted_angle(optimizer, group: dict) -> float | None:
    """REQ's equilibrium angular update of ``group`` under ``optimizer``'s rule (a
    :class:`~psiopt.optim.policies.NormPolicy`'s inner one), or ``None`` where
    :func:`~psiopt.optim.policies.equilibrium_angle` has no formula (another rule, no weight
    decay)."""
    inner = optimizer.optimizer if isinstance(optimizer, NormPolicy) else optimizer
    try:
        return float(equilibrium_angle(inner, group))
    except ValueError:
        return None


class StepProbe:
    """Wraps one optimizer step: call :meth:`before` just before ``step()`` and :meth:`after`
    just after; returns per-layer summaries (mean row norm; medians over the groups of the
    effective learning rates, the angular update and the radial and tangential parts of the
    update; ``angle_eq``, the predicted equilibrium angle, where :func:`predicted_angle` has
    one).  Any optimizer whose invariant groups carry a ``grouping``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.layers = invariant_parameters(optimizer)
        sharded = [name for name, p, _ in self.layers if is_sharded(p)]
        if sharded:  # (its figures are of whole groups: a shard's would be other numbers)
            raise ValueError(
                f"StepProbe takes no FSDP2-sharded parameters ({sharded[0]}): its figures "
                "(row norms, effective learning rates, angles) are of whole groups, and a rank "
                "holds its own rows only")
        self.saved = {}

    def before(self) -> None:
        self.saved = {name: (p.detach().clone(), p.grad.detach().clone())
                      for name, p, _ in self.layers if p.grad is not None}

    @torch.no_grad()
    def after(self) -> dict[str, dict]:
        out = {}
        for name, p, grouping in self.layers:
            if name not in self.saved:
                continue
            # in float64: the step x_new − x_old of float32 rows is exact there, and the angle
            # and the split of a small step keep their digits
            old, grad = (rows(t, grouping).double() for t in self.saved[name])
            new = rows(p.detach(), grouping).double()
            group = group_of(self.optimizer, p)
            radial, tangential = update_split(old, new)
            entry = {"norm": norm(old).mean().item(),
                     "eff_lr": measured_effective_lr(old, new, grad).median().item(),
                     "angle": angular_update(old, new).median().item(),
                     "radial": radial.median().item(), "tangential": tangential.median().item()}
            beta = scheduling_beta(self.optimizer, p, new, old)
            if beta is not None:
                eff = theorem2_effective_lr(old, new, float(group["lr"]), beta)
                entry["eff_lr_theorem2"] = eff.median().item()
            predicted = predicted_angle(self.optimizer, group)
            if predicted is not None:
                entry["angle_eq"] = predicted
            out[name] = entry
        self.saved = {}
        return out


def summarize(layers: dict[str, dict]) -> dict:
    """Medians over layers of the per-layer summaries (for one number per epoch)."""
    if not layers:
        return {}
    keys = {k for entry in layers.values() for k in entry}
    return {k: float(torch.tensor([e[k] for e in layers.values() if k in e]).median())
            for k in sorted(keys)}
