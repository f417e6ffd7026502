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
     invariance);
   * ``"equilibrium"``: REQ's rotational policy (Kosson et al. 2024): each group turns, every
     step, by exactly the angle ``η̂_r`` at which weight decay would hold the inner rule in
     equilibrium (:func:`equilibrium_angle`), towards the inner step's tangential part, its norm
     kept: ``w ← ‖w‖ (cos η̂_r u + sin η̂_r e)`` with ``u = w/‖w‖`` before the step and ``e`` the
     unit part of the stepped group orthogonal to ``u`` (a group whose step has no such part
     stays where it was).  REQ's rotational variants scale the update by a running average of
     its norm, so that the angle is ``η̂_r`` *on average*, and centre the rows; this policy holds
     it at every step and does not centre.

Equilibrium angular update (:func:`equilibrium_angle`; Kosson et al. 2024, §3, whose values
their reference code ``epfml/rotational-optimizers`` uses too; Wan et al. 2021 for SGD).  The
random-walk model: a scale-invariant group (``<g, w> = 0``) whose gradients are zero-mean,
independent between steps, of ``C`` entries, at a steady state, with ``ηλ ≪ 1``.  Weight decay
removes ``2ηλ‖w‖²`` (AdamW) from ``‖w‖²`` per step; one gradient adds, over all the steps its
momentum spreads it across, a total step orthogonal to ``w``; the two balance, and the angle is
the RMS step over the equilibrium norm, ``η̂_r² = E‖Δw‖²/‖w‖²``:

* AdamW, ``w ← (1 − ηλ)w − η m̂/(√v̂ + ε)``: with ``v̂ ≈ E g²`` and ``ε ≪ √v̂``, a gradient's total
  step is ``η g/√v`` (the weights ``(1 − β1)β1^k`` sum to 1), ``E‖·‖² = η²C``, so
  ``‖w‖² = ηC/(2λ)``; one step is ``η m/√v`` with ``E‖m/√v‖² = C(1 − β1)/(1 + β1)``
  (``Σ (1 − β1)² β1^{2k}``), hence ``η̂_r = √(2ηλ (1 − β1)/(1 + β1))``.
* SGD with heavy-ball momentum ``α`` and L2 ``λ`` (torch's ``m ← αm + g + λw``, ``w ← w − ηm``):
  a gradient's total step is ``η g/(1 − α)``, the decay ``ηλ/(1 − α)`` per step, and
  ``g = g̃/‖w‖`` (scale invariance), so ``‖w‖⁴ = η E‖g̃‖²/(2λ(1 − α))``; one step has
  ``E‖ηm‖² = η² E‖g‖²/(1 − α²)``, hence ``η̂_r = √(2ηλ/(1 + α))``.

The inner optimizer's ``lr``, ``weight_decay`` and ``betas``/``momentum`` are read from its
groups at every step (a scheduler may change them; tensors are used as they are, no host
synchronisation).  Other inner rules (Adam with coupled L2, AMSGrad, Nesterov or dampened
momentum, Muon, …) have no formula here and are refused, as is ``λ ≤ 0`` (no equilibrium).

The one-time unit-normalisation carries the BatchNorm running statistics along (``norm_stats``,
as psiopt's optimizers do), so the eval-mode network does not change; the rescaling after each
step is part of the update, as in psiopt's PSGD and UN-SGD (the statistics do not follow it).
``p.grad`` is never written: the inner step reads a projected or rescaled gradient through a
swapped ``.grad`` attribute, and the original tensor is put back.  No host synchronisation.
Under DDP every rank applies the policy to the same averaged gradients.  Under FSDP2
(``fully_shard``: DTensor parameters sharded on dimension 0) it works on each rank's local rows
(:class:`~psiopt.optim.sharded.ShardedRows`, parts ``"<grouping>[a:b]"`` included) and completes
the per-group sums of groups that span ranks with one ``all_reduce`` per reduction for every
parameter of the step (:class:`~psiopt.optim.sharded.ShardedLayout`: ``‖w‖²`` with ``<w, g>`` for
the projection, the norms before and after for ``"fixed"``/``"unit"``, two for
``"equilibrium"``); nothing is gathered.  The running statistics of a BatchNorm fed by rows split
between ranks cannot follow ``"unit"``'s one-time unit-normalisation: refused when built.
With ``torch.optim.SGD`` this is psiopt's :class:`~psiopt.optim.euclidean.ProjectedSGD` (``"fixed"``) and
:class:`~psiopt.optim.sphere.UnitNormSGD` (``"unit"``, ``project=True``), to rounding (tested in
float64 to 1e-12).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from . import kernels
from .base import check_row_scale, float64_setting, run_closure, warn_unlinked
from .discovery import _discover, rescale_rows_
from .geometry import accumulate_dtype, dot, is_invariant, norm, rest, rows, safe_inv
from .sharded import ShardedLayout, ShardedRows, is_sharded, stats_over_split_rows

POLICIES = ("free", "fixed", "unit", "equilibrium")


def equilibrium_angle(optimizer: Optimizer, group: dict):
    """REQ's equilibrium angular update ``η̂_r`` (radians) of ``group`` under ``optimizer``'s rule
    (module docstring): ``√(2ηλ(1 − β1)/(1 + β1))`` for AdamW (and Adam with
    ``decoupled_weight_decay``), ``√(2ηλ/(1 + α))`` for SGD (momentum ``α``, 0 included).  A
    Python number, or a float64 tensor where the group's settings are tensors (never read back;
    a float32 lr's angle, cos and sin in float32 let the kept norm drift 1e-8 per step).
    ``ValueError`` for a rule without a formula or a weight decay that is not positive."""
    name = type(optimizer).__name__
    decay, lr = (float64_setting(group.get(key, 0)) for key in ("weight_decay", "lr"))
    if not isinstance(decay, torch.Tensor) and not decay > 0:
        raise ValueError(f"equilibrium: {name} group with weight_decay={decay!r}: the equilibrium "
                         "angle needs weight decay > 0 on every invariant group")
    if isinstance(optimizer, torch.optim.SGD) and not group["nesterov"] and not group["dampening"]:
        return (2 * lr * decay / (1 + group["momentum"])) ** 0.5
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay")
    if isinstance(optimizer, torch.optim.Adam) and decoupled and not group["amsgrad"]:
        beta1 = group["betas"][0]
        return (2 * lr * decay * (1 - beta1) / (1 + beta1)) ** 0.5
    raise ValueError(f"equilibrium: no equilibrium angle for {name} with these settings (known: "
                     "torch.optim.AdamW or Adam(decoupled_weight_decay=True) without amsgrad; "
                     "torch.optim.SGD without nesterov or dampening)")


def _cos_sin(theta):
    """``(cos θ, sin θ)`` of a number (Python floats) or of a tensor (tensors)."""
    if isinstance(theta, torch.Tensor):
        return theta.cos(), theta.sin()
    return math.cos(theta), math.sin(theta)


class _Sums:
    """Per-group sums of lists of views (one per invariant parameter of a step), complete across
    ranks, in the accumulate dtype (:func:`accumulate_dtype`), keepdim per view.  Plain views
    reduce by themselves; FSDP2-sharded ones (:class:`ShardedRows`) go through one
    :class:`ShardedLayout` per dtype and device: per-row partial sums and one ``all_reduce`` per
    call, whatever the number of pairs and parameters; nothing is gathered."""

    def __init__(self, views: list[torch.Tensor], shards: list, layouts: dict):
        self.views, self.shards, self.layouts = views, shards, layouts
        self.size, self.plain = len(views), {i for i, s in enumerate(shards) if s is None}
        buckets: dict = {}
        for i, (v, s) in enumerate(zip(views, shards)):
            if s is not None:
                buckets.setdefault((accumulate_dtype(v.dtype), v.device), []).append(i)
        self.sharded = []
        for index in buckets.values():  # layouts cached by their shards and shapes
            key = tuple((id(shards[i]), tuple(views[i].shape)) for i in index)
            if key not in layouts:
                layouts[key] = ShardedLayout([views[i] for i in index], [shards[i] for i in index])
            self.sharded.append((index, layouts[key]))

    def subset(self, index: list[int]) -> _Sums:
        """The sums of the views at positions ``index`` (every rank must take the same)."""
        if index == list(range(self.size)):
            return self
        return _Sums([self.views[i] for i in index], [self.shards[i] for i in index], self.layouts)

    def __call__(self, pairs: list[tuple[list, list]]) -> list[list[torch.Tensor]]:
        """``Σ x y`` per group of each pair ``(xs, ys)`` of lists (``xs is ys``: ``‖x‖²``)."""
        out = self._sharded_sums(pairs)
        for i in self.plain:
            for o, (xs, ys) in zip(out, pairs):
                acc = accumulate_dtype(xs[i].dtype)
                o[i] = norm(xs[i], acc).square() if xs is ys else dot(xs[i].to(acc), ys[i])
        return out

    def norms(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``‖x‖`` per group (of a plain view: one norm, as psiopt's rules take it)."""
        (out,) = self._sharded_sums([(xs, xs)])
        for i in self.plain:
            out[i] = norm(xs[i], accumulate_dtype(xs[i].dtype))
        return [o if i in self.plain else o.sqrt_() for i, o in enumerate(out)]

    def _sharded_sums(self, pairs: list[tuple[list, list]]) -> list[list]:
        """The sums of the sharded views (``None`` for the plain ones): one collective per layout."""
        out = [[None] * self.size for _ in pairs]
        for index, layout in self.sharded:
            picked = [[x[i] for i in index] for x, _ in pairs]
            flat = layout.sums([(xs, xs if x is y else [y[i] for i in index])
                                for xs, (x, y) in zip(picked, pairs)])
            for o, row in zip(out, flat):
                for i, v in zip(index, layout.split(row)):
                    o[i] = v
        return out


def _fused_sets(ws: list[torch.Tensor], others: list[list], candidates, fused: bool) -> list:
    """The positions among ``candidates`` of the views the fused per-row kernels take
    (:mod:`psiopt.optim.kernels`: contiguous rows of the dtypes and devices they take, with
    contiguous ``others`` of the same shape), in lists of one dtype and device: one kernel call
    each.  ``fused`` off: none."""
    sets: dict = {}
    for i in sorted(candidates) if fused else ():
        w = ws[i]
        if _kernels_take(w, *(x[i] for x in others)) \
                and (kernels.backend(w) == "triton" or kernels.available()):
            sets.setdefault((w.dtype, w.device), []).append(i)
    return list(sets.values())


def _kernels_take(w: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the fused kernels take the view ``w`` with the views ``others``: contiguous rows of
    a dtype and device they take (:func:`psiopt.optim.kernels.backend`, ``kernels.fits``)."""
    return kernels.backend(w) is not None and all(kernels.fits(w, x) for x in others)


def _keepdim(w: torch.Tensor) -> torch.Tensor:
    """An empty per-group scalar of the view ``w`` (keepdim shape, its accumulate dtype)."""
    return w.new_empty((w.shape[0],) + (1,) * (w.dim() - 1), dtype=accumulate_dtype(w.dtype))


def _project(ws: list[torch.Tensor], gs: list[torch.Tensor], outs: list[torch.Tensor], sums: _Sums,
             fused: bool) -> list:
    """Write into ``outs`` the tangent gradients ``g − <w, g> w/‖w‖²`` of the groups (a zero group
    has no tangent space: its gradient is zero), in ``g``'s dtype, the sums in float32 for
    16-bit rows (one reduction for every group, or the fused kernel ``"project"`` on the views it
    takes); returns ``‖w‖²`` per group."""
    sq = [None] * len(ws)
    for index in _fused_sets(ws, [gs, outs], sums.plain, fused):
        made = [_keepdim(ws[i]) for i in index]
        if kernels.run("project", [ws[i] for i in index], [gs[i] for i in index],
                       b=[outs[i] for i in index], s1=made):
            for i, x in zip(index, made):
                sq[i] = x
    index = [i for i, x in enumerate(sq) if x is None]
    if not index:
        return sq
    acc = [accumulate_dtype(ws[i].dtype) for i in index]
    was = [ws[i].to(a) for i, a in zip(index, acc)]
    gas = [gs[i].to(a) for i, a in zip(index, acc)]
    squares, wg = sums.subset(index)([(was, was), (was, gas)])
    for i, wa, ga, ww, c in zip(index, was, gas, squares, wg):
        outs[i].copy_(torch.addcmul(ga, wa, c * safe_inv(ww), value=-1.0) * (ww > 0))
        sq[i] = ww
    return sq


#: a step ``x`` whose part ``t`` orthogonal to ``old`` has ``‖t‖² ≤ RADIAL ‖x‖²`` is radial to
#: rounding (the direction of ``t`` is noise): the group goes back to ``old`` (rowrules' "rotate")
RADIAL = 1e-12


def rotate_(ws: list[torch.Tensor], olds: list[torch.Tensor], thetas: list, sums: _Sums,
            fused: bool = False) -> None:
    """``w ← ‖old‖ (cos θ u + sin θ e)`` per group of the views ``w`` (stepped) and ``old`` (before
    the step), ``u = old/‖old‖``, ``e = t/‖t‖`` with ``t = x − <x, u> u`` the part of the step
    ``x = w − old`` orthogonal to ``u``: the angle ``∠(old, w)`` becomes ``θ`` and the norm
    ``‖old‖``.  Where the step has no such part (``‖t‖² ≤`` :data:`RADIAL` ``‖x‖²``: a step
    radial to rounding, e.g. weight decay alone on a zero gradient) the group goes back to
    ``old``; a zero group stays zero.  Sums in float32 for 16-bit rows; two reductions
    (``sums``: ``‖old‖²`` with ``<x, old>``, then ``‖t‖²`` with ``‖x‖²``) for every group at
    once; or, with ``fused``, the fused kernel ``"rotate"`` on the views it takes (angles that
    are numbers), one pass (``‖t‖²`` derived from sums in float64)."""
    done = set()
    numbers = [i for i in sums.plain if not isinstance(thetas[i], torch.Tensor)]
    for index in _fused_sets(ws, [olds], numbers, fused):
        if kernels.run("rotate", [ws[i] for i in index], [ws[i] for i in index],
                       b=[olds[i] for i in index], k=[_cos_sin(thetas[i]) for i in index]):
            done.update(index)
    index = [i for i in range(len(ws)) if i not in done]
    if not index:
        return
    sums = sums.subset(index)
    acc = [accumulate_dtype(ws[i].dtype) for i in index]
    os_ = [olds[i].to(a) for i, a in zip(index, acc)]
    xs = [ws[i].to(a) - o for i, a, o in zip(index, acc, os_)]  # the step
    rr, xo = sums([(os_, os_), (xs, os_)])
    ts = [torch.addcmul(x, o, c * safe_inv(r), value=-1.0)  # its part orthogonal to old
          for x, o, c, r in zip(xs, os_, xo, rr)]
    tt, xx = sums([(ts, ts), (xs, xs)])
    for i, o, r, t, t2, x2 in zip(index, os_, rr, ts, tt, xx):
        cos, sin = _cos_sin(thetas[i])
        turns = (t2 > RADIAL * x2).to(r.dtype)  # (in acc's dtype: cos keeps its digits)
        ws[i].copy_((1 + (cos - 1) * turns) * o + (r.sqrt() * sin * turns * safe_inv(t2.sqrt())) * t)


class NormPolicy:
    """``policy`` (``"free"``, ``"fixed"``, ``"unit"``, ``"equilibrium"``) and ``project`` on the
    invariant groups of ``optimizer`` (groups with an invariant ``grouping``, as
    :func:`psiopt.optimizer_groups` and :func:`psiopt.param_groups` build them); see the module
    docstring.

    ``model`` and ``example_inputs`` (both or neither): the running statistics each invariant
    parameter feeds (by its ``param_names``) are found by discovery, so that they follow the
    one-time unit-normalisation; without them none follow (``"unit"`` then warns once, as
    psiopt's sphere methods do).  It is not a ``torch.optim.Optimizer``: attach schedulers to
    the inner optimizer, and step this one.  With a GradScaler, give it this one for both calls,
    ``scaler.unscale_(policy)`` (e.g. before clipping) and ``scaler.step(policy)`` (a skipped
    step skips the policy too): GradScaler keeps its record per optimizer object, and
    ``unscale_`` on the inner optimizer then ``step(policy)`` unscaled the gradients twice.
    ``state_dict`` holds the inner optimizer's and which parameters ``"unit"`` has prepared (by
    group and position: build the groups of a resumed run as they were).  Weight decay of the
    inner optimizer on invariant groups is undone by ``"fixed"``, ``"unit"`` and ``"equilibrium"``
    (but for its effect on the step's direction); ``"equilibrium"`` needs it (``λ > 0``) to set
    the angle, and refuses, when built and at each step, an inner rule :func:`equilibrium_angle`
    has no formula for (it keeps a copy of the invariant parameters during the step).
    :meth:`equilibrium_angles` gives the predicted angle of every group (for any policy: with
    ``"free"`` it is the value the inner rule's angular update should approach).
    """

    def __init__(self, optimizer: Optimizer, policy: str = "fixed", *, project: bool = False,
                 model=None, example_inputs=None, fused: bool | None = None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"invalid policy {policy!r}: choose from {', '.join(POLICIES)}")
        if not isinstance(project, bool):
            raise ValueError(f"invalid project: {project!r} (must be True or False)")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"invalid fused: {fused!r} (must be None, True or False)")
        if not any(is_invariant(g.get("grouping")) for g in optimizer.param_groups):
            raise ValueError("NormPolicy: no parameter group of the optimizer declares an invariant "
                             "'grouping' (a norm policy has no meaning on other groups); build the "
                             "groups with psiopt.optimizer_groups(model, example_inputs)")
        if (model is None) != (example_inputs is None):
            raise ValueError("NormPolicy: pass model and example_inputs together (discovery needs "
                             "both to find the running statistics that follow), or neither")
        self.optimizer, self.policy, self.project, self.fused = optimizer, policy, project, fused
        self._linked = model is not None
        self._stats: dict[str, list] = {}
        self._shards: dict = {}  # (id(p), grouping) -> (p, ShardedRows) of FSDP2-sharded p
        self._layouts: dict = {}  # ShardedLayouts of the sharded views (see _Sums)
        self._scale_checked: set = set()  # (id(p), grouping) whose row scale was checked
        #: each group's parameter names at construction (its ``param_names``, else the model's
        #: names of its tensors): the running statistics are found by name
        self._names: list[list] = []
        if self._linked:
            self._stats = _discover(model, example_inputs)[1]
            named = {id(p): n for n, p in model.named_parameters()}
            self._names = [list(g.get("param_names") or [named.get(id(p)) for p in g["params"]])
                           for g in optimizer.param_groups]
        self._check_groupings()
        if policy == "unit":
            self._check_sharded_stats()
        if policy == "equilibrium":
            self.equilibrium_angles()  # a ValueError now rather than at the first step
        self.prepared: set[tuple[int, int]] = set()  # (group, position) unit-normalised

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def equilibrium_angles(self) -> list:
        """The equilibrium angular update ``η̂_r`` of every parameter group (``None`` for a group
        that is not invariant), from the inner optimizer's current settings
        (:func:`equilibrium_angle`)."""
        return [equilibrium_angle(self.optimizer, g) if is_invariant(g.get("grouping")) else None
                for g in self.optimizer.param_groups]

    def _check_groupings(self) -> None:
        """``ValueError`` before anything changes if a grouping does not fit its parameter (or a
        sharded parameter's placement is not one psiopt can update), or, where the policy reads
        row norms, if a row's squared norm leaves the range of the dtype it is summed in
        (:func:`check_row_scale`, once per tensor: it reads the values; float32 for 16-bit
        rows: rows ×1e20 in float32 became NaN, rows ×1e-25 zero, as psiopt's own rules
        refuse)."""
        norms = self.policy != "free" or self.project
        for group in self.optimizer.param_groups:
            if is_invariant(group.get("grouping")):
                for j, p in enumerate(group["params"]):
                    rows(torch.empty(p.shape, device="meta"), group["grouping"])
                    self._shard(p, group["grouping"])
                    if norms and (id(p), group["grouping"]) not in self._scale_checked:
                        wide = accumulate_dtype(p.dtype)  # (16-bit rows are summed in float32)
                        name = (group.get("param_names") or [None] * (j + 1))[j] or f"parameter {j}"
                        check_row_scale(p if p.dtype == wide or is_sharded(p) else p.detach().to(wide),
                                        group["grouping"], name)
                        self._scale_checked.add((id(p), group["grouping"]))

    def _shard(self, p: torch.Tensor, grouping: str):
        """The cached :class:`ShardedRows` of an FSDP2-sharded ``p``, else ``None``."""
        if not is_sharded(p):
            return None
        if (id(p), grouping) not in self._shards:
            self._shards[(id(p), grouping)] = (p, ShardedRows(p, grouping))  # p kept: ids stay valid
        return self._shards[(id(p), grouping)][1]

    def _check_sharded_stats(self) -> None:
        """``"unit"`` under FSDP2: ``ValueError`` when built, before anything changes, where running
        statistics would have to follow rows split between ranks (psiopt's sphere optimizers
        refuse them at their first step: :meth:`NormStats.rescale_`)."""
        for _, p, grouping, stats in self._invariant(every=True):
            norm = stats_over_split_rows(self._shard(p, grouping), stats)
            if norm is not None:
                raise ValueError(
                    f"NormPolicy 'unit': the running statistics of a {norm} are fed by rows "
                    f"({grouping}) split between FSDP2 ranks and cannot follow the one-time "
                    "unit-normalisation; use GroupNorm or LayerNorm, or the 'fixed', "
                    "'equilibrium' or 'free' policy (their rescaling after each step is part of "
                    "the update: no statistics follow it)")

    def _invariant(self, every: bool = False):
        """``(key, p, grouping, running statistics)`` of every invariant parameter with a gradient
        (``every``: with or without)."""
        for i, group in enumerate(self.optimizer.param_groups):
            grouping = group.get("grouping")
            if not is_invariant(grouping):
                continue
            names = group.get("param_names") or self._names_of(i)
            own = group.get("norm_stats") or [()] * len(group["params"])
            for j, (p, name) in enumerate(zip(group["params"], names)):
                if every or p.grad is not None:
                    yield (i, j), p, grouping, self._stats.get(name, own[j])

    def _names_of(self, i: int) -> list:
        """The names group ``i``'s tensors had at construction (``None`` each for a group added
        later without ``param_names``)."""
        group = self.optimizer.param_groups[i]
        if i < len(self._names) and len(self._names[i]) == len(group["params"]):
            return self._names[i]
        return [None] * len(group["params"])

    @staticmethod
    def _view(t: torch.Tensor, grouping: str, shard) -> torch.Tensor:
        """The grouped rows of ``t`` (a parameter or its gradient; the local shard's, sharded), a
        view of ``t.detach()``: written in place, it writes ``t`` (and bumps its version); a view
        of ``t`` itself, made under no_grad and written after, stopped ``torch.compile`` of
        :meth:`step` where it resumes after torch.optim's graph break ("A view was created in
        no_grad mode ...": "tensor" groupings, parts, "groups:k")."""
        return rows(t.detach(), grouping) if shard is None else shard.view(t.to_local())

    @torch.no_grad()
    def step(self, closure=None):
        """The inner optimizer's step with the policy around it; returns the closure's loss."""
        loss = run_closure(closure)
        self._check_groupings()  # (a group may have been added since)
        if self.policy == "unit":
            self._check_sharded_stats()
        # the equilibrium angles from the settings the inner step reads (a scheduler steps
        # after it); a ValueError here comes before anything changes
        angles = self.equilibrium_angles() if self.policy == "equilibrium" else None
        work = list(self._invariant())
        shards = [self._shard(p, grouping) for _, p, grouping, _ in work]
        ws = [self._view(p, grouping, s) for (_, p, grouping, _), s in zip(work, shards)]
        gs = [self._view(p.grad, grouping, s) for (_, p, grouping, _), s in zip(work, shards)]
        sums = _Sums(ws, shards, self._layouts)
        self._check_fused(ws, gs, shards)
        gvs = self._prepare(work, ws, gs, shards) if self.policy == "unit" else [None] * len(ws)
        swapped, outs = [], []  # (p, its gradient) put back after the step; the new rows
        try:
            for (_, p, grouping, _), shard, gv in zip(work, shards, gvs):
                if gv is not None or self.project:
                    g, out = self._swap(p, grouping, shard)
                    swapped.append((p, g))
                    outs.append(out)
            sq = None  # ‖w‖² per group, where the projection took it
            if self.project:
                sq = _project(ws, [g if v is None else v for g, v in zip(gs, gvs)], outs, sums,
                              self.fused is not False)
            else:
                for out, gv in zip(outs, (gv for gv in gvs if gv is not None)):
                    out.copy_(gv)
            before = self._before(ws, sums, sq)
            self.optimizer.step()
        finally:
            for p, g in swapped:
                p.grad = g
        self._retract_(ws, before, sums, [angles[key[0]] for key, *_ in work] if angles else None)
        return loss

    def _check_fused(self, ws: list[torch.Tensor], gs: list[torch.Tensor], shards: list) -> None:
        """``fused=True``: ``ValueError``, before anything changes, for a group the fused kernels
        do not take (sharded, not contiguous, or of a dtype or device they do not take)."""
        if self.fused is not True:
            return
        for w, g, shard in zip(ws, gs, shards):
            if shard is not None or not _kernels_take(w, g):
                raise ValueError(
                    f"NormPolicy(fused=True): a group of {tuple(w.shape)} {w.dtype} rows on "
                    f"{w.device}{' sharded by FSDP2' if shard is not None else ''} is not one "
                    "the fused kernels take (contiguous float32/float64 CPU rows, or CUDA rows "
                    "with triton); pass fused=None (the default) to take them where they apply")
            if kernels.backend(w) == "c":
                kernels.load()  # RuntimeError, saying why, if they cannot be built

    def _prepare(self, work, ws, gs, shards) -> list:
        """``"unit"``'s one-time unit-normalisation of the groups not prepared yet (the running
        statistics follow: under FSDP2 those fed by sharded rows cannot, and
        :meth:`NormStats.rescale_` refuses them); returns the gradients the inner step reads,
        ``‖w‖·g`` (the gradient at the unit rows, by scale invariance), ``None`` elsewhere."""
        fresh = [i for i, (key, *_) in enumerate(work) if key not in self.prepared]
        gvs = [None] * len(ws)
        if not fresh:
            return gvs
        norms = _Sums([ws[i] for i in fresh], [shards[i] for i in fresh], self._layouts) \
            .norms([ws[i] for i in fresh])
        for i, n in zip(fresh, norms):
            key, _, _, stats = work[i]
            group = self.param_groups[key[0]]
            if not stats and "norm_stats" not in group and (not self._linked or (
                    group.get("param_names") or self._names_of(key[0]))[key[1]] is None):
                warn_unlinked(self, stacklevel=5)  # (linked: a tensor no name finds, added later)
            n = n.to(ws[i].dtype)
            rescale_rows_(ws[i], safe_inv(n), stats)
            self.prepared.add(key)
            gvs[i] = gs[i] * n
        return gvs

    @staticmethod
    def _swap(p: torch.Tensor, grouping: str, shard) -> tuple:
        """Put a new ``p.grad``, the gradient outside a part's rows; returns ``(the original
        gradient, the new one's rows)`` (to be written)."""
        g = p.grad
        new = torch.empty_like(g)  # (a DTensor sharded as g, for a sharded p)
        outside = (rest(new, grouping), rest(g, grouping)) if shard is None else \
            (shard.rest(new.to_local()), shard.rest(g.to_local()))
        for piece, given in zip(*outside):
            piece.copy_(given)  # the rows outside a part: the gradient as it is
        p.grad = new
        return g, NormPolicy._view(new, grouping, shard)

    def _before(self, ws: list[torch.Tensor], sums: _Sums, sq) -> list:
        """What the policy keeps of each group before the step: its norm (``"fixed"``; from
        the projection's ``‖w‖²`` where it took them), the group itself (``"equilibrium"``),
        else nothing."""
        if self.policy == "fixed":
            return sums.norms(ws) if sq is None else [x.sqrt() for x in sq]
        if self.policy == "equilibrium":
            return [w.clone() for w in ws]
        return [None] * len(ws)

    def _retract_(self, ws: list[torch.Tensor], olds: list, sums: _Sums, angles) -> None:
        """The policy after the step, in place (as in psiopt's rules, the running statistics
        follow the one-time unit-normalisation only, not this): the fused kernels ``"rotate"``
        and ``"retract"`` on the views they take, else torch."""
        fused = self.fused is not False
        if self.policy == "equilibrium":
            rotate_(ws, olds, angles, sums, fused)
            return
        if self.policy == "free":
            return
        done = set()
        for index in _fused_sets(ws, [ws], sums.plain, fused):
            targets = None if self.policy == "unit" else [olds[i] for i in index]
            if kernels.run("retract", [ws[i] for i in index], [ws[i] for i in index], s1=targets):
                done.update(index)
        index = [i for i in range(len(ws)) if i not in done]
        for i, after in zip(index, sums.subset(index).norms([ws[i] for i in index])):
            after = safe_inv(after)
            ws[i].mul_((after if olds[i] is None else olds[i] * after).to(ws[i].dtype))

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
