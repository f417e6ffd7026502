"""Norm policies on top of any optimizer (issue 25, item 2).

The four papers psiopt implements split a scale-invariant weight into its *direction* and its
*norm*, and treat the two apart: PSGD = SGD + the norm held fixed (Arora et al. App. D), UN/B-SGD
= SGD on the tangent space + unit norm (Badrinarayanan et al. eq. 2).  :class:`NormPolicy` wraps
any ``torch.optim`` optimizer (its own update and state untouched) and, for the parameter groups
that carry an invariant ``grouping`` only:

1. ``project=True``: gives the inner step the tangent gradient of each group,
   ``g − <w, g> w/‖w‖²`` (the radial part of ``g`` is rounding noise for an invariant group);
2. after the inner step, applies the norm policy to each group of rows:

   * ``"free"``: nothing (the inner rule and its weight decay decide the norm);
   * ``"fixed"``: back to the norm the group had before the step (Arora's PSGD; Hyperball);
   * ``"unit"``: unit norm (UN, B-SGD); the groups are unit-normalised once, at the first
     step, whose gradient is then ``‖w‖·g`` (the gradient at the unit rows, by scale
     invariance).

The one-time unit-normalisation carries the BatchNorm running statistics along (``norm_stats``,
as psiopt's optimizers do), so the eval-mode network does not change; the rescaling after each
step is part of the update, as in psiopt's PSGD and UN-SGD (the statistics do not follow it).
``p.grad`` is never written: the inner step reads a projected or rescaled gradient through a
swapped ``.grad`` attribute, and the original tensor is put back.  No host synchronisation.
With ``torch.optim.SGD`` this is psiopt's :class:`~psiopt.optim.euclidean.ProjectedSGD` (``"fixed"``) and
:class:`~psiopt.optim.sphere.UnitNormSGD` (``"unit"``, ``project=True``), to rounding (tested in
float64 to 1e-12).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .base import run_closure, warn_unlinked
from .discovery import _discover, rescale_rows_
from .geometry import accumulate_dtype, dot, is_invariant, norm, rows, safe_inv

POLICIES = ("free", "fixed", "unit")


class NormPolicy:
    """``policy`` (``"free"``, ``"fixed"``, ``"unit"``) and ``project`` on the invariant groups of
    ``optimizer`` (groups with an invariant ``grouping``, as :func:`psiopt.optimizer_groups` and
    :func:`psiopt.param_groups` build them); see the module docstring.

    ``model`` and ``example_inputs`` (both or neither): the running statistics each invariant
    parameter feeds (by its ``param_names``) are found by discovery, so that they follow the
    one-time unit-normalisation; without them none follow (``"unit"`` then warns once, as
    psiopt's sphere methods do).  It is not a ``torch.optim.Optimizer``: attach schedulers (and
    GradScaler's ``unscale_``) to the inner optimizer, and step this one (``scaler.step(policy)``
    works: a skipped step skips the policy too).  ``state_dict`` holds the inner optimizer's
    and which parameters ``"unit"`` has prepared (by group and position: build the groups of a
    resumed run as they were).  Weight decay of the inner optimizer on invariant groups is
    undone by ``"fixed"`` and ``"unit"`` (but for its effect on the step's direction).
    """

    def __init__(self, optimizer: Optimizer, policy: str = "fixed", *, project: bool = False,
                 model=None, example_inputs=None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"invalid policy {policy!r}: choose from {', '.join(POLICIES)}")
        if not isinstance(project, bool):
            raise ValueError(f"invalid project: {project!r} (must be True or False)")
        if not any(is_invariant(g.get("grouping")) for g in optimizer.param_groups):
            raise ValueError("NormPolicy: no parameter group of the optimizer declares an invariant "
                             "'grouping' (a norm policy has no meaning on other groups); build the "
                             "groups with psiopt.optimizer_groups(model, example_inputs)")
        if (model is None) != (example_inputs is None):
            raise ValueError("NormPolicy: pass model and example_inputs together (discovery needs "
                             "both to find the running statistics that follow), or neither")
        self.optimizer, self.policy, self.project = optimizer, policy, project
        self._linked = model is not None
        self._stats: dict[str, list] = {}
        if self._linked:
            self._stats = _discover(model, example_inputs)[1]
        self._check_groupings()
        self.prepared: set[tuple[int, int]] = set()  # (group, position) unit-normalised

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def _check_groupings(self) -> None:
        """``ValueError`` before anything changes if a grouping does not fit its parameter."""
        for group in self.optimizer.param_groups:
            if is_invariant(group.get("grouping")):
                for p in group["params"]:
                    rows(torch.empty(p.shape, device="meta"), group["grouping"])

    def _invariant(self):
        """``(key, p, grouping, running statistics)`` of every invariant parameter with a gradient."""
        for i, group in enumerate(self.optimizer.param_groups):
            grouping = group.get("grouping")
            if not is_invariant(grouping):
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            own = group.get("norm_stats") or [()] * len(group["params"])
            for j, (p, name) in enumerate(zip(group["params"], names)):
                if p.grad is not None:
                    yield (i, j), p, grouping, self._stats.get(name, own[j])

    @torch.no_grad()
    def step(self, closure=None):
        """The inner optimizer's step with the policy around it; returns the closure's loss."""
        loss = run_closure(closure)
        self._check_groupings()  # (a group may have been added since)
        work = list(self._invariant())
        swapped, before = [], []
        for key, p, grouping, stats in work:
            w, g = rows(p, grouping), p.grad
            gv = None  # the gradient the inner step reads, where it is not p.grad
            if self.policy == "unit" and key not in self.prepared:
                if not stats and not self._linked and "norm_stats" not in self.param_groups[key[0]]:
                    warn_unlinked(self, stacklevel=4)
                n = norm(w, accumulate_dtype(w.dtype)).to(w.dtype)  # unit rows first; the
                # gradient at them is ‖w‖·g
                rescale_rows_(w, safe_inv(n), stats)
                self.prepared.add(key)
                gv = rows(g, grouping) * n
            if self.project:  # g − <w, g> w/‖w‖²; a zero row has no tangent space: not moved
                gv = rows(g, grouping) if gv is None else gv
                acc = accumulate_dtype(w.dtype)  # (float32 sums for 16-bit rows)
                wa, ga = w.to(acc), gv.to(acc)
                ww = dot(wa, wa)
                gv = (torch.addcmul(ga, wa, dot(wa, ga) * safe_inv(ww), value=-1.0) * (ww > 0)).to(gv.dtype)
            if gv is not None:
                new = torch.empty_like(g)
                rows(new, grouping).copy_(gv)
                swapped.append((p, g))
                p.grad = new
            before.append(norm(w, accumulate_dtype(w.dtype)) if self.policy == "fixed" else None)
        try:
            self.optimizer.step()
        finally:
            for p, g in swapped:
                p.grad = g
        if self.policy != "free":  # the step's retraction: part of the update, as in psiopt's
            for (_, p, grouping, _), n in zip(work, before):  # rules (the statistics follow the
                w = rows(p, grouping)  # one-time unit-normalisation only)
                after = safe_inv(norm(w, accumulate_dtype(w.dtype)))
                w.mul_((after if n is None else n * after).to(w.dtype))
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "policy": self.policy,
                "project": self.project, "prepared": sorted(self.prepared)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("policy") != self.policy or state_dict.get("project") != self.project:
            raise ValueError(f"NormPolicy.load_state_dict: saved with policy="
                             f"{state_dict.get('policy')!r}, project={state_dict.get('project')!r}; "
                             f"this one has policy={self.policy!r}, project={self.project!r}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.prepared = {tuple(k) for k in state_dict["prepared"]}
