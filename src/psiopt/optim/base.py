"""Base class shared by every psiopt optimizer.

Parameter groups that carry a ``grouping`` (see :mod:`psiopt.optim.geometry`) are scale-invariant
and follow the subclass's rule; every other group follows the ordinary counterpart (SGD with
momentum or Adam, through torch.optim's own functional code) with its own ``lr`` and
``weight_decay``.  Groups with ``grouping="cancelled"`` (biases a normalisation removes) are never
updated.  A grouping of part of a tensor (``"groups:4[0:32]"``, ``"cancelled[16:32]"``, see
:mod:`psiopt.optim.geometry`) applies the group's rule (or no update) to those rows, and the
ordinary counterpart to the other rows, the *rest*, with the group's ``rest_<key>`` settings
(:meth:`ScaleInvariantOptimizer._rest_settings`).

``lr`` may be a 0-d tensor, which a scheduler writes in place so that a compiled step is not
compiled again (see "Tensor settings" in :class:`ScaleInvariantOptimizer`); step counters live on
the parameters' device in compiled steps (:func:`counters_on_device`).

Each subclass writes its invariant rule twice: ``_update_one`` is the plain per-tensor reference
path (``foreach=False``), ``_update_many`` the vectorized path over lists with ``torch._foreach_*``
(the default).  Tests check that the two agree in float64, in parameters and state.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from . import kernels
from .geometry import (
    CANCELLED,
    RowLayout,
    accumulate_dtype,
    is_invariant,
    norm,
    parse_grouping,
    rest,
    rows,
    split_part,
)
from .sharded import ShardedLayout, ShardedRows, any_sharded, is_sharded, stats_over_split_rows

#: hyperparameter -> (low, high, low inclusive, high inclusive)
_RANGES = {
    "lr": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "momentum": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, True, False),
    "max_norm": (0.0, math.inf, False, True),
    "clip": (0.0, math.inf, False, True),
    "ortho": (0.0, math.inf, True, False),
}
_FLAGS = ("check_finite", "fixed_norm")
#: SGDG/AdamG's ``ortho_rows``: Cho & Lee's penalty where rows fit (fewer than inputs), or on all
ORTHO_ROWS = ("fitting", "all")
#: group keys that are not hyperparameters (never validated as such, never saved)
_NOT_SAVED = ("norm_stats",)
#: settings of the ordinary counterpart that a group of part of a tensor may set for its rest
#: (``rest_lr``, …; see :meth:`ScaleInvariantOptimizer._rest_settings`)
REST_KEYS = {"sgd": ("lr", "momentum", "weight_decay"), "adam": ("lr", "betas", "weight_decay", "eps")}


def _in_range(v: float, name: str) -> bool:
    """Does the number ``v`` lie in ``name``'s range (:data:`_RANGES`)?  (NaN does not.)"""
    low, high, low_in, high_in = _RANGES[name]
    return (v > low or (low_in and v == low)) and (v < high or (high_in and v == high))


#: settings that may be 0-d tensors (see :class:`ScaleInvariantOptimizer`, "Tensor settings"):
#: those torch's learning-rate schedulers write in place (``fill_``); the momentum schedules
#: (``OneCycleLR``, ``CyclicLR``) write Python numbers, so ``momentum``/``betas`` stay numbers
TENSOR_KEYS = ("lr",)


def readable(value) -> bool:
    """Whether a setting can be read as a Python number without a host synchronisation and
    without a graph break: a number, or a CPU tensor outside a ``torch.compile`` trace."""
    if not isinstance(value, Tensor):
        return True
    return value.is_cpu and not value.is_meta and not torch.compiler.is_compiling()


def _check_tensor(name: str, value: Tensor, read: bool = True) -> float | None:
    """A tensor setting's form (0-d, floating point, no autograd); returns its value where it
    may be read: with ``read`` (a group being added: a host read is acceptable then) on any
    device but meta outside a trace, else where :func:`readable`; else ``None``."""
    base = name[len("rest_"):] if name.startswith("rest_") else name
    if base not in TENSOR_KEYS:
        raise ValueError(
            f"invalid {name}: a tensor ({value!r}); only {', '.join(TENSOR_KEYS)} may be a tensor "
            "(torch's schedulers write the others as Python numbers): pass a number")
    if value.dim() != 0 or not value.dtype.is_floating_point or value.requires_grad:
        raise ValueError(
            f"invalid {name}: {value!r} (a tensor {name} must be a 0-d floating-point tensor that "
            "does not require grad, e.g. torch.tensor(0.1, dtype=torch.float64))")
    if readable(value) or (read and not value.is_meta and not torch.compiler.is_compiling()):
        return float(value)
    return None


def _check_range(name: str, value, read: bool = True) -> None:
    if isinstance(value, Tensor):
        value = _check_tensor(name, value, read)
        if value is None:
            return  # on a device (or traced): not read (no host synchronisation)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"invalid {name}: {value!r} (must be a real number)")
    low, high, low_in, high_in = _RANGES[name]
    v = float(value)
    if not _in_range(v, name) or math.isnan(v):
        lo, hi = "[" if low_in else "(", "]" if high_in else ")"
        raise ValueError(f"invalid {name}: {value!r} (must lie in {lo}{low}, {high}{hi})")


def check_row_scale(p: Tensor, grouping: str, name: str) -> None:
    """Raise ``ValueError`` when a nonzero group of ``p`` has a squared norm outside the normal
    range of its dtype (overflow to inf, or below the smallest normal number): every rule that
    reads row norms needs ``‖w‖²`` (rows ×1e30 or ×1e-30 in float32 were set to 0 or NaN).
    Reads the values once (a host synchronisation: at construction, never in ``step``).
    Sharded (FSDP2), each rank checks its own rows and the counts are summed over the mesh
    (one collective), so that every rank raises alike (a rank left alone would wait for the
    others in FSDP's next collective: until the timeout under NCCL)."""
    shard = ShardedRows(p, grouping) if is_sharded(p) else None
    if shard is not None and shard.index is not None:
        return  # groups spanning shards: not checked (their norms need a collective)
    local = p.to_local() if is_sharded(p) else p
    if local.is_meta:  # nothing to read (a model built on meta: on every rank alike)
        return
    count, peaks = _bad_rows(local, grouping, shard)
    if shard is not None:
        total = torch.full((), float(count), device=local.device)
        dist.all_reduce(total, group=shard.mesh.get_group())
        count = int(total.item())
    if count:
        where = "another rank's rows" if peaks is None else \
            f"largest entries {peaks[0]:.3g}…{peaks[1]:.3g}"
        raise ValueError(
            f"{name}: {count} group(s) ({grouping}) have squared norms outside the range "
            f"of {str(p.dtype).removeprefix('torch.')} ({where}); the rule needs ‖w‖²: rescale "
            "those rows (the network does not change) or train in float64")


def _bad_rows(local: Tensor, grouping: str, shard) -> tuple[int, tuple[float, float] | None]:
    """How many nonzero, finite groups of ``local`` (a tensor, or a rank's shard) have a squared
    norm outside their dtype's normal range, and the least and largest of their largest
    entries (``None`` where none)."""
    if local.numel() == 0:  # an empty shard
        return 0, None
    v = rows(local.detach(), grouping) if shard is None else shard.view(local.detach())
    if v.numel() == 0:  # no row of the part on this rank
        return 0, None
    v = v.reshape(v.shape[0], -1)
    sq = v.square().sum(1)
    bad = (v != 0).any(1) & torch.isfinite(v).all(1) & \
        ~(torch.isfinite(sq) & (sq >= torch.finfo(v.dtype).tiny))
    if not bool(bad.any()):
        return 0, None
    peak = v[bad].abs().amax(1)
    return int(bad.sum()), (float(peak.min()), float(peak.max()))


#: settings that may be left unset (``None``): PSI-SGD's overflow guard, whose defaults apply only
#: where it runs (``fixed_norm=False``)
_UNSET_ALLOWED = ("max_norm", "guard_every")


def check_hyper(key: str, value, read: bool = True) -> None:
    """Raise ``ValueError`` naming ``key`` if ``value`` is not a valid setting for it (a tensor
    :data:`TENSOR_KEYS` setting: its form always, its value where :func:`readable`; a tensor for
    any other key is refused).  ``read=False`` (at a step): a tensor is read only where
    :func:`readable`."""
    if value is None and key in _UNSET_ALLOWED:
        return
    if isinstance(value, Tensor) and key not in _RANGES and key[len("rest_"):] not in _RANGES:
        _check_tensor(key, value)  # ValueError: no tensor but lr
    if key.startswith("rest_"):
        try:
            check_hyper(key[len("rest_"):], value, read)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    elif key in _RANGES:
        _check_range(key, value, read)
    elif key == "betas":
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"invalid betas: {value!r} (need a pair, e.g. (0.9, 0.999))")
        if any(isinstance(b, Tensor) for b in value):
            raise ValueError(f"invalid betas: {value!r} (must be Python numbers: only "
                             f"{', '.join(TENSOR_KEYS)} may be a tensor)")
        for b in value:
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= b < 1.0:
                raise ValueError(f"invalid betas: {value!r} (each must lie in [0, 1))")
    elif key == "guard_every":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid guard_every: {value!r} (must be an integer >= 1)")
    elif key in _FLAGS:
        if not isinstance(value, bool):
            raise ValueError(f"invalid {key}: {value!r} (must be True or False)")
    elif key == "ortho_rows":
        if value not in ORTHO_ROWS:
            raise ValueError(f"invalid ortho_rows: {value!r} (must be 'fitting' or 'all')")
    elif key in ("foreach", "fused"):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"invalid {key}: {value!r} (must be None, True or False)")
    elif key == "grouping" and value not in (None, CANCELLED):
        parse_grouping(value)


def run_closure(closure):
    """``closure()`` with gradients enabled (inside a ``no_grad`` step), or ``None``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def warn_unlinked(optimizer, stacklevel: int) -> None:
    """Warn once per optimizer that it unit-normalises the rows of a group without
    ``norm_stats`` (``stacklevel``: the user's frame)."""
    if optimizer.__dict__.get("_warned_unlinked"):
        return
    optimizer.__dict__["_warned_unlinked"] = True
    warnings.warn(
        f"{type(optimizer).__name__}: unit-normalising the rows of a parameter group that carries "
        "no 'norm_stats' (a hand-built group, or param_groups without example_inputs): if "
        "they feed a BatchNorm/InstanceNorm with running statistics, those do not follow and "
        "the eval-mode network changes. Build the groups with psiopt.param_groups(model, "
        "example_inputs), or give the group norm_stats=[[] for each parameter] to declare that "
        "no running statistics follow its rows", stacklevel=stacklevel)


def float64_setting(x):
    """A tensor setting in float64 (its arithmetic as a Python number's: a float32 ``lr`` rounded
    ``1 − ηλ`` and an angle's cosine), a number as it is."""
    return x.double() if isinstance(x, Tensor) else x


def own_tensor_settings(groups: list[dict]) -> None:
    """Give each group of ``groups`` its own tensor settings: a tensor that an earlier group (or
    key) holds is replaced by a copy.  One ``lr`` tensor given for several groups (by
    :func:`psiopt.create_optimizer`, :func:`psiopt.param_groups`, or the defaults a group added
    later takes) would otherwise be one object that every group's scheduler writes in place:
    ``ReduceLROnPlateau``'s factor was taken once per group, ``LambdaLR``'s last group's value
    set every group's."""
    seen: set[int] = set()
    for group in groups:
        for key, value in group.items():
            if key == "params" or not isinstance(value, Tensor):
                continue
            if id(value) in seen:
                group[key] = value = value.detach().clone()
            seen.add(id(value))


#: torch.optim settings that psiopt's rules (and their ordinary counterparts) do not implement: a
#: group that sets one (not False/0) is refused, never stepped as if it were unset.  (Not
#: ``capturable``: psiopt decides it, and torch.compile writes ``True`` into the groups it traces.)
TORCH_ONLY = ("maximize", "nesterov", "dampening", "amsgrad", "differentiable", "decoupled_weight_decay")


def check_torch_only(group: dict, owner: str) -> None:
    """Raise ``ValueError`` if ``group`` sets one of :data:`TORCH_ONLY` (``owner``: the optimizer)."""
    for key in TORCH_ONLY:
        if group.get(key):
            raise ValueError(f"{owner} does not implement torch.optim's {key} (the group sets "
                             f"{key}={group[key]!r}); leave it unset, or use torch.optim")


def check_step_settings(group: dict) -> None:
    """Raise ``ValueError`` if a setting of ``group`` that the rules read at each step is out of
    range, without a host synchronisation: Python numbers, and tensor settings
    (:data:`TENSOR_KEYS`) on the CPU outside ``torch.compile`` (their form and value); a tensor on
    a device, or in a traced step, is checked for its form only (its value was checked when the
    group was added, and a scheduler writes it in place); a tensor for another key is refused."""
    for key in _RANGES:
        if key in group:
            v = group[key]
            if (type(v) is float or type(v) is int) and _in_range(v, key):
                continue  # the common case, decided without the general check (NaN falls through)
            check_hyper(key, v, read=False)
    betas = group.get("betas")
    if betas is not None and not (type(betas) is tuple and len(betas) == 2 and all(
            type(b) is float and 0.0 <= b < 1.0 for b in betas)):
        check_hyper("betas", betas)
    if "guard_every" in group:
        check_hyper("guard_every", group["guard_every"])
    for key, value in group.items():
        if key.startswith("rest_"):
            check_hyper(key, value, read=False)


class GroupHandling:
    """Parameter-group handling shared by every psiopt optimizer (torch.optim baselines included).

    * a ``params`` generator is read once; every group is validated (:meth:`_validate`) when it
      is added, and nothing is done to its parameters (the methods that unit-normalise rows,
      B-SGD and the sphere methods, do it at each parameter's first step or on ``prepare()``);
    * ``invariant_defaults``: settings a group with a ``grouping`` takes before ``defaults``
      (:func:`psiopt.create_optimizer` stores the registry's settings there, so an added group
      gets them);
    * groups with ``grouping="cancelled"`` (biases a normalisation removes) are never updated;
    * a group without ``param_names`` added to an optimizer whose groups have them (or the
      reverse) gets placeholder names instead of torch's error;
    * ``norm_stats`` (live references to normalisation layers) stay out of ``state_dict`` and
      survive ``load_state_dict``.
    """

    invariant_defaults: dict = {}
    #: whether the rule reads row norms of invariant groups (their squares must be representable)
    uses_row_norms: bool = False
    #: the ordinary rule of the rows outside a part (``REST_KEYS``), ``None``: no ``rest_<key>``
    #: settings (torch.optim's rules train a parameter as one tensor)
    rest_rule: str | None = None

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if not isinstance(param_group["params"], (Tensor, set)):  # a generator is read once
            param_group["params"] = list(param_group["params"])
        params = param_group["params"]
        if params and all(isinstance(p, tuple) for p in params):  # named, as torch >= 2.6 takes
            param_group["param_names"] = [name for name, _ in params]
            param_group["params"] = [p for _, p in params]
        if is_invariant(param_group.get("grouping")):
            for key, value in self.invariant_defaults.items():
                param_group.setdefault(key, value)
        self._validate({**self.defaults, **param_group})
        grouping = param_group.get("grouping", self.defaults.get("grouping"))
        if self.uses_row_norms and is_invariant(grouping):
            ps = param_group["params"]
            ps = [ps] if isinstance(ps, Tensor) else ps
            names = param_group.get("param_names") or [f"parameter {i}" for i in range(len(ps))]
            for p, name in zip(ps, names):
                check_row_scale(p, grouping, name)
        named = [("param_names" in g) for g in self.param_groups]
        renamed = []
        if named and all(named) and "param_names" not in param_group:
            param_group["param_names"] = self._placeholder_names(len(self.param_groups), param_group)
        elif named and not any(named) and "param_names" in param_group:
            renamed = self.param_groups
            for i, g in enumerate(renamed):
                g["param_names"] = self._placeholder_names(i, g)
        try:
            super().add_param_group(param_group)
        except Exception:
            for g in renamed:  # torch refused the group: the others stay as they were
                del g["param_names"]
            raise
        added = self.param_groups[-1]
        own_tensor_settings(self.param_groups)
        if is_invariant(grouping) and split_part(grouping)[1] is not None and self.rest_rule:
            lr = added["lr"]  # (a tensor lr read once, here: the scheduler writes it in place)
            added.setdefault("part_lr0", float(lr) if isinstance(lr, Tensor) else lr)
            base = added.get("rest_lr", self.defaults.get("lr"))
            if isinstance(base, Tensor):  # the rest's lr as it is now: a scheduler writes the
                # tensor it shares with lr (or the others' groups, or the defaults) in place,
                # and the rest follows lr / part_lr0 already
                added["rest_lr"] = base.detach().clone()

    def _rescales_rows(self, group: dict) -> bool:
        """Whether the rule rescales ``group``'s rows outside its update, the running statistics
        fed by them following (:meth:`NormStats.rescale_`): the sphere methods' and B-SGD's
        one-time unit-normalisation, PSI-SGD's overflow guard."""
        return False

    @staticmethod
    def _check_stats_can_follow(group: dict, params: list[Tensor], stats: list) -> None:
        """``ValueError`` when built (every rank alike, nothing changed) where such statistics
        are fed by rows split between FSDP2 ranks (:func:`stats_over_split_rows`: they cannot
        follow; at the rescaling, a rank raised alone, or scaled every channel by its own rows'
        factors, silently)."""
        grouping = group.get("grouping")
        for p, st in zip(params, stats):
            norm = stats_over_split_rows(ShardedRows(p, grouping) if is_sharded(p) else None, st)
            if norm is not None:
                raise ValueError(
                    f"the running statistics of a {norm} are fed by rows ({grouping}) split "
                    "between FSDP2 ranks and cannot follow the rescaling of the rows that this "
                    "optimizer makes (unit-normalisation, or PSI-SGD's overflow guard); use "
                    "GroupNorm or LayerNorm, or an optimizer that does not rescale rows: "
                    "psi-sgd with fixed_norm=True, adams, adamsrt, sgdmrt")

    def _validate(self, group: dict) -> None:
        """Raise ``ValueError`` if ``group`` (merged with the defaults) is not valid."""
        stats = group.get("norm_stats")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else params
        rest_keys = sorted(k for k in group if k.startswith("rest_"))
        if rest_keys:
            grouping = group.get("grouping")
            allowed = REST_KEYS.get(self.rest_rule, ())
            if not (is_invariant(grouping) and split_part(grouping)[1]) or \
                    any(k[len("rest_"):] not in allowed for k in rest_keys):
                raise ValueError(
                    f"{type(self).__name__}: {', '.join(rest_keys)} set the rows outside the part of "
                    "a grouping '<grouping>[a:b]'; "
                    + (f"this group's grouping is {grouping!r}" if allowed else
                       "this optimizer trains every parameter as one tensor")
                    + (f" (valid: {', '.join('rest_' + k for k in allowed)})" if allowed else ""))
        if stats is not None and len(stats) != len(params):
            raise ValueError("norm_stats must list the running statistics of every parameter")
        if stats is not None and self._rescales_rows(group):
            self._check_stats_can_follow(group, params, stats)
        eps = group.get("eps")
        if isinstance(eps, numbers.Real) and any(p.dtype == torch.float16 for p in params) \
                and float(torch.tensor(float(eps), dtype=torch.float16)) == 0:
            raise ValueError(
                f"invalid eps for float16 parameters: {eps!r} is 0 in float16, and so is "
                "(1-beta2)·g² for small gradients: Adam's step m/(√v + eps) would write inf into the "
                "weights (torch.optim.Adam does); pass eps >= 6e-8 (1e-4 is usual in float16) or "
                "keep float32 weights (torch.autocast)")

    def _check_state_shapes(self, state_dict: dict) -> None:
        """Raise ``ValueError`` naming the parameter when a saved state tensor fits neither the
        parameter nor its groups (a state dict of a model with other shapes: torch.optim accepts
        it and the next ``step()`` fails with a shape error that names nothing)."""
        saved = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        current = [(g, j) for g in self.param_groups for j in range(len(g["params"]))]
        if len(saved) != len(current):
            return  # torch refuses it, naming the groups
        for key, (group, j) in zip(saved, current):
            p = group["params"][j]
            saved_state = state_dict.get("state", {}).get(key, {})
            grouping = group.get("grouping")
            pairs = [(name, v, self._state_shapes(p, grouping)) for name, v in saved_state.items()]
            if isinstance(saved_state.get("rest"), dict):  # the rows outside a part
                rows_ = [v.shape for v in rest(torch.empty(p.shape, device="meta"), grouping)] \
                    if grouping is not None else []
                shape = [torch.Size((sum(r[0] for r in rows_), *p.shape[1:]))] if rows_ else []
                pairs += [("rest." + name, v, shape) for name, v in saved_state["rest"].items()]
            for name, v, shapes in pairs:
                if not isinstance(v, Tensor) or v.dim() == 0 or is_sharded(v) or is_sharded(p):
                    continue
                if v.shape not in shapes:
                    names = group.get("param_names")
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: state {name!r} of "
                        f"{names[j] if names else 'parameter ' + str(j)} has shape "
                        f"{tuple(v.shape)}, which fits neither the parameter {tuple(p.shape)} nor "
                        "its groups: the state dict is of another model")

    @staticmethod
    def _state_shapes(p: Tensor, grouping) -> list[torch.Size]:
        """Shapes a state tensor of ``p`` may have: ``p``'s, and for invariant groups its grouped
        view's and one scalar per group (keepdim)."""
        shapes = [p.shape]
        if is_invariant(grouping):
            view = rows(torch.empty(p.shape, device="meta"), grouping)
            shapes += [view.shape, torch.Size((view.shape[0],) + (1,) * (view.dim() - 1))]
        return shapes

    @staticmethod
    def _placeholder_names(index: int, group: dict) -> list[str]:
        params = group["params"]
        count = 1 if isinstance(params, Tensor) else len(params)
        return [f"param_groups[{index}][{j}]" for j in range(count)]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "invariant_defaults": self.invariant_defaults}

    def state_dict(self) -> dict:
        out = super().state_dict()
        for group in out["param_groups"]:
            for key in _NOT_SAVED:
                group.pop(key, None)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim, and refused with ``ValueError`` when a saved group lacks a setting of
        this optimizer (another optimizer's state dict: it failed at the next step before).
        Keys a scheduler adds to the live groups (``initial_lr``, ``max_lr``…) are not settings
        of this optimizer: a saved group without them is accepted, as torch.optim accepts it.
        Settings added since a state dict was saved are upgraded (:meth:`_upgrade_saved_group`:
        ``fused`` keeps this optimizer's value, ``None`` where the saved group chose
        ``foreach``)."""
        needed = set.intersection(*(set(g) for g in self.param_groups)) if self.param_groups \
            else set()  # the settings every group of this optimizer holds ...
        needed &= set(self.defaults)  # ... that are settings of it (not a scheduler's keys)
        needed -= {"params", "param_names", *_NOT_SAVED}
        if "param_groups" in state_dict:
            live = self.param_groups
            state_dict = {**state_dict, "param_groups": [
                self._upgrade_saved_group(dict(g), live[i] if i < len(live) else None)
                for i, g in enumerate(state_dict["param_groups"])]}
        for i, saved in enumerate(state_dict.get("param_groups", [])):
            missing = sorted(needed - set(saved))
            if missing:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: saved group {i} has no "
                    f"{', '.join(map(repr, missing))}: the state dict is not from a "
                    f"{type(self).__name__}")
        self._check_state_shapes(state_dict)
        kept = [{k: g[k] for k in _NOT_SAVED if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, extra in zip(self.param_groups, kept):
            group.update(extra)
        own_tensor_settings(self.param_groups)  # (a state dict saved when groups shared one)

    def _upgrade_saved_group(self, saved: dict, live: dict | None) -> dict:
        """A saved group (a copy) with the settings added since older versions filled in from
        the live group ``live`` (``None`` past the live groups)."""
        if "fused" in self.defaults and "fused" not in saved:
            saved["fused"] = live["fused"] if live is not None and saved.get("foreach") is None \
                else None
        return saved


class ScaleInvariantOptimizer(GroupHandling, Optimizer):
    """Common machinery: validation, lazy state, closure, gradient checks, counterpart updates.

    Options common to every subclass:

    * ``check_finite`` (default ``False``): as in torch.optim, non-finite gradients propagate.
      With ``True``, one fused check over all gradients runs before updating; a NaN/inf gradient
      raises :class:`FloatingPointError` naming the parameters and nothing is updated.  The check
      costs one host synchronisation and one read of the gradients per step.
    * ``foreach`` (default ``None`` = vectorized): ``False`` selects the per-tensor reference path.
      Groups whose tensors differ in dtype or device also take the reference path.  Both paths
      are the same rule (to rounding), a choice of speed only; while ``torch.compile`` traces a
      step it takes the vectorized rule whatever ``foreach`` says (per tensor, or over the group
      where ``compile_per_tensor`` is off; PSI-SGD's literal mode with uneven step counters
      aside): the reference path's in-place forms (a momentum buffer updated, then read with a
      reduction) make inductor's CPU backend fail, "KeyError: 'bufN'" (pytorch#196570).
    * ``fused`` (default ``None``): with ``foreach`` left at ``None``, invariant groups of
      float32/float64 CPU tensors take the fused per-row kernels (:mod:`psiopt.optim.kernels`:
      each row read once, one call per group) where the rule has one (:attr:`fused_rule`) and
      they could be built, else the vectorized path; ``True`` requires them (``ValueError``
      with ``foreach`` set, for a rule without a kernel or for tensors that are not
      float32/float64 on the CPU, checked before any group is stepped; ``RuntimeError`` if they
      cannot be built); ``False`` never uses them.  Where ``fused`` is not ``False`` and
      ``foreach`` unset, the other parameters' eager steps take torch.optim's fused SGD/Adam
      (float32/float64 CPU tensors, one kernel per tensor where foreach makes several; floating
      CUDA tensors, multi-tensor kernels; see :meth:`_torch_fused`; SGD with a CUDA tensor
      ``lr`` takes psiopt's foreach form, which reads it on the device).
      Views whose rows are not contiguous (``"@1"`` groupings, channels-last gradients), steps
      the kernel does not cover (PSI-SGD's literal mode: its guard steps, and every step where
      its counters live on a device, with a device ``lr`` or compiled, as the guard's schedule
      is not read there), groups whose tensors differ in dtype, and FSDP2 shards of groups
      that span ranks or (SGDG/AdamG) with Cho & Lee's penalty on take the other paths (FSDP2
      shards of whole-row groups, ``"channel"``, take the kernels, each rank its own rows:
      :meth:`_kernels_take_shards`).  Compiled steps call the kernels through the op
      ``psiopt::fused_rows`` (but for a step that makes state).  The same rule to rounding
      (sums in the tensor's precision over chunks of a row, the chunks added in double, but
      SGDG's and AdamG's ‖y‖², <y,ĝ>, ‖ĝ‖² in double; norms after the step derived from sums
      before it); SGDG's and AdamG's clipping takes the tangent's norm in double on every
      path, so a gradient whose norm leaves its dtype's range is clipped alike.  Invariant groups of
      CUDA tensors take, likewise, the Triton kernels built from the same rule definitions
      (:mod:`psiopt.optim.triton_rows`, :mod:`psiopt.optim.rowrules`; one launch per group and
      step, four with rows longer than 4096 entries, split across programs) when triton is
      importable; not yet run on a GPU.

    Every group is validated in full before anything is changed, and building an optimizer
    never changes the model: subclasses that keep rows on the unit sphere prepare them (rows
    unit-normalised, running statistics following) at each parameter's first step, or when
    :meth:`~psiopt.optim.sphere.UnitNormSGD.prepare` is called.  Every setting the rules read is
    range-checked when a group is added and again at each step (a scheduler may have written it
    since: ``LambdaLR`` driving ``lr`` below 0), on Python numbers, without a host
    synchronisation; a setting with no meaning for the rule (``invariant_zero``) is refused
    likewise.

    Tensor settings.  As torch.optim's SGD and Adam, ``lr`` (and ``rest_lr``) may be a 0-d
    floating-point tensor (not requiring grad), on the CPU or on the parameters' device; torch's
    learning-rate schedulers then write it in place (``fill_``), so a step compiled with
    ``torch.compile`` is not compiled again when the schedule changes it (a Python number is
    specialised: each new value compiles anew).  The other settings must be Python numbers
    (``ValueError`` for a tensor): the momentum schedules (``OneCycleLR``, ``CyclicLR``) write
    numbers.  A tensor ``lr`` is range-checked, reading it, when its group is added; at each
    step a CPU tensor is read and checked as a number (and an eager step is that number's: the
    same result, as fast), while a tensor on a device, or in a compiled step, is never read
    (its form is checked, its value is not: a scheduler writing it out of range goes
    unnoticed there).  The rules compute with such a tensor without reading it (the fused
    kernels' ops take the hyperparameters as a tensor, :data:`psiopt.optim.rowrules.OP_SIGNATURE`).
    Use a float64 tensor for the steps of a float ``lr`` to the last bit (a float32 one rounds
    it).

    Step counters (``state["step"]``) live on the CPU, as torch.optim's, in eager steps (read
    as numbers without a device synchronisation), and on the parameters' device in compiled
    steps and in the steps of a group whose ``lr`` is a tensor on that device (the step then
    reads nothing on the host: it can be captured in a CUDA graph); see
    :func:`counters_on_device`.  A counter on a device stays there.  The counters of torch's
    Adam on the other parameters of CUDA tensors live on their device (float32, as
    ``torch.optim.Adam(fused=True)``'s) where ``fused`` is not ``False`` and ``foreach`` unset:
    torch's fused CUDA Adam reads them there (:func:`rest_counter_on_device`).
    """

    counterpart = "sgd"  # or "adam"
    uses_row_norms = True

    @property
    def rest_rule(self) -> str:
        return self.counterpart
    #: under ``torch.compile``, run the vectorized rule once per tensor: each tensor's scalars then
    #: depend on its own reductions only, and inductor fuses those reductions with the update in
    #: one loop over the rows (each row read from memory once); over the whole group, every
    #: update waits for every reduction (UN-SGD on VGG16-BN's weights, compiled: 11.4 ms over
    #: the group, 8.2 per tensor; compiled torch SGD-momentum 6.8-7.0)
    compile_per_tensor = True
    #: hyperparameters that have no meaning on invariant groups: they must be 0 there
    invariant_zero: tuple[str, ...] = ()
    #: whether the rule has a fused per-row kernel (:meth:`_update_fused`, ``kernels.c``)
    fused_rule = False

    def __init__(self, params, defaults: dict):
        defaults = {"grouping": None, "check_finite": False, "foreach": None, "fused": None,
                    **defaults}
        for key, value in defaults.items():
            check_hyper(key, value)
        super().__init__(params, defaults)
        if not any(is_invariant(g["grouping"]) for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no parameter group declares a 'grouping', so every "
                "parameter is updated by the ordinary counterpart; build the groups with "
                "psiopt.param_groups(model, example_inputs)",
                stacklevel=2,
            )

    # -- validation (nothing is changed before every check has passed) -----------------------
    def _validate(self, group: dict) -> None:
        super()._validate(group)
        check_torch_only(group, type(self).__name__)
        for key, value in group.items():
            if key not in ("params", "param_names") + _NOT_SAVED:
                check_hyper(key, value)
        params = group["params"]
        devices = {p.device for p in ([params] if isinstance(params, Tensor) else params)}
        for key, value in group.items():
            if isinstance(value, Tensor) and not value.is_cpu and devices - {value.device}:
                raise ValueError(
                    f"invalid {key}: a tensor on {value.device}, but the group's parameters are "
                    f"on {', '.join(sorted(map(str, devices)))} (put it on the CPU or on their "
                    "device)")
        grouping = group["grouping"]
        if is_invariant(grouping):  # (a tensor setting read: the group is being added)
            self._check_rule({**group, **{k: float(v) for k, v in group.items() if k in TENSOR_KEYS
                                          and isinstance(v, Tensor) and not v.is_meta}})
            params = group["params"]
            for p in [params] if isinstance(params, Tensor) else params:
                rows(torch.empty(p.shape, device="meta"), grouping)  # ValueError if it does not fit
                if is_sharded(p):
                    ShardedRows(p, grouping)  # ValueError for a placement psiopt cannot update
        if grouping is not None and split_part(grouping)[1] is not None:
            params = group["params"]
            for p in [params] if isinstance(params, Tensor) else params:
                rest(torch.empty(p.shape, device="meta"), grouping)  # ValueError if it does not fit
                if is_sharded(p):
                    ShardedRows(p, grouping)  # ValueError for a placement psiopt cannot update

    def _check_settings(self, group: dict) -> None:
        """At each step: raise ``ValueError`` if a setting the rules read is out of range, or if an
        invariant group sets what its rule cannot honour (a scheduler, or a user, may have
        written it since the group was added: ``LambdaLR`` driving ``lr`` below 0,
        ``OneCycleLR(max_momentum=1.0)``).  No host synchronisation: Python numbers, and a tensor
        ``lr`` on the CPU outside a trace (see :func:`check_step_settings`)."""
        check_step_settings(group)
        check_torch_only(group, type(self).__name__)
        if is_invariant(group["grouping"]):  # (not a cancelled part: an ordinary group)
            self._check_rule(group)

    @classmethod
    def _check_rule(cls, group: dict) -> None:
        """Raise ``ValueError`` if an invariant group sets what the rule cannot honour (a class
        method: :func:`psiopt.optim.registry.settings` checks a run's settings with it, before
        anything is built; a group without ``params`` skips the checks of ``fused=True``)."""
        if group.get("fused") and is_invariant(group["grouping"]) and "params" in group:
            cls._check_fused(group)
        for key in cls.invariant_zero:
            if group.get(key):
                raise ValueError(
                    f"invalid {key} for an invariant group of {cls.__name__}: "
                    f"{group[key]!r} (it has no meaning there; use 0, or set it for the other "
                    f"parameters only with other_{key})")

    @classmethod
    def _check_fused(cls, group: dict) -> None:
        """``fused=True``: refused with ``foreach`` set, for a rule without a kernel, or for tensors
        the kernels do not take (``ValueError``); ``RuntimeError`` if they cannot be built."""
        if group["foreach"] is not None:
            raise ValueError(f"fused=True and foreach={group['foreach']!r} cannot be set together")
        if not cls.fused_rule:
            raise ValueError(f"fused=True: {cls.__name__} has no fused kernel")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else params
        for p in params:
            if not is_sharded(p) and not p.is_meta and kernels.backend(p) is None:  # (meta: at the step)
                raise ValueError(f"fused=True: the fused kernels take float32/float64 CPU tensors "
                                 "(and float16/bfloat16/float32/float64 CUDA tensors with triton "
                                 f"installed), not {p.dtype} on {p.device} (pass fused=None or False)")
        if not params or any(kernels.backend(p) != "triton" for p in params):
            kernels.load()  # RuntimeError, saying why, if the kernels cannot be built

    @staticmethod
    def _stats(group: dict, index: list[int]) -> list:
        """The running statistics fed by parameters ``index`` of ``group`` (see ``norm_stats``)."""
        stats = group.get("norm_stats")
        return [stats[i] for i in index] if stats else [()] * len(index)

    # -- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        work = []
        for group in self.param_groups:
            index, params, grads = [], [], []
            self._init_group(group, index, params, grads)
            if params:
                work.append((self._numbers(group), index, params, grads))
        for group, *_ in work:  # a scheduler may have written a setting since the group was added
            self._check_settings(group)
        if any(group["check_finite"] for group, *_ in work):
            self._check_finite([t for g, _, ps, gs in work if g["check_finite"] for t in zip(ps, gs)])
        for group, index, params, grads in work:
            grouping = group["grouping"]
            if grouping is None:
                self._counterpart(group, params, grads)
                continue
            if is_invariant(grouping):
                self._invariant(group, index, params, grads)
            if split_part(grouping)[1] is not None:  # after: a fresh part's state is made first
                self._rest(group, params, grads)
        return loss

    @staticmethod
    def _numbers(group: dict) -> dict:
        """``group``, or a copy with its tensor settings as Python numbers where they are
        :func:`readable` (a CPU tensor in an eager step: read without a device
        synchronisation, so the step is the one of that number, computed as fast)."""
        tensors = [k for k in TENSOR_KEYS if isinstance(group.get(k), Tensor) and readable(group[k])]
        for key in tensors:  # its form first, as a traced step checks it (an int64 lr read as a
            check_hyper(key, group[key], read=False)  # number, then filled with 0.5 by StepLR: 0)
        return {**group, **{k: group[k].item() for k in tensors}} if tensors else group

    def _init_group(self, group: dict, index: list[int], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        """Append the positions, parameters and gradients of ``group``'s parameters that have a
        gradient (none for a cancelled group: never stepped, its state says so, step 0, so that
        every parameter a step saw has state).  Named as torch.optim's: ``torch.compile`` runs
        it eagerly and guards what it returns as torch.optim's (state tensors by identity,
        gradients by presence), a fraction of the guards a traced state lookup installs.

        Step counters (see :func:`counters_on_device`): before calling it, dynamo moves every
        ``state["step"]`` to its parameter's device (as for torch.optim's capturable steps), and
        they stay there; here the others (``state["rest"]``'s) follow, and, in an eager step of
        a group whose ``lr`` is a tensor on the parameters' device, CPU counters are copied to
        that device (``non_blocking``: no host synchronisation)."""
        if group["params"] and counters_on_device(group, group["params"][0]):
            for p in group["params"]:
                st = self.state.get(p)
                for sub in (st, (st or {}).get("rest")):
                    step = (sub or {}).get("step")
                    if isinstance(step, Tensor) and step.device != p.device and not is_sharded(step):
                        sub["step"] = step.to(p.device, non_blocking=True)
        if is_invariant(group["grouping"]) and self._wants_kernels(group) and group["params"]:
            backend = kernels.backend(group["params"][0])  # (triton imported here, if at all)
            if backend == "c":
                kernels.available()  # built here, before torch.compile traces the step
        if group["grouping"] == CANCELLED:
            for p in group["params"]:
                if p.grad is not None and p not in self.state:
                    self.state[p]["step"] = new_step(group, p)
            return
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is not None:
                index.append(i)
                params.append(p)
                grads.append(g)
        self._check_grads(params, grads)

    @staticmethod
    def _check_grads(params: list[Tensor], grads: list[Tensor]) -> None:
        """Refuse sparse gradients and complex parameters or gradients (the first parameter of
        ``params`` that has one says which)."""
        for p, g in zip(params, grads):
            if g.is_sparse:
                raise RuntimeError("psiopt optimizers do not support sparse gradients")
            if g.dtype.is_complex or p.dtype.is_complex:
                raise RuntimeError("psiopt optimizers do not support complex parameters or gradients")

    def _check_finite(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        grads = [g for _, g in pairs]
        if any_sharded(grads):
            finite = self._finite_shards(grads)
        else:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf)))  # inf/NaN
        if bool(finite.all()):  # (a max cannot overflow)
            return
        bad = [self._name(p) for (p, _), ok in zip(pairs, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"non-finite gradient in {', '.join(bad)}; nothing was updated "
            "(check the loss, lower the learning rate, or pass check_finite=False)"
        )

    @staticmethod
    def _finite_shards(grads: list[Tensor]) -> Tensor:
        """Whether each gradient is finite, FSDP2-sharded ones over every rank's shard: each
        rank's count of non-finite entries summed over the mesh (a DTensor's max norm, reduced
        by a MAX that drops NaN under gloo, passed a NaN in rank 1's shard alone)."""
        local = [g.to_local() if is_sharded(g) else g for g in grads]
        bad = torch.stack([(~torch.isfinite(g)).sum() for g in local]).double()
        mesh = next(g.device_mesh for g in grads if is_sharded(g))
        dist.all_reduce(bad, group=mesh.get_group())
        return bad == 0

    def _name(self, p: Tensor) -> str:
        for i, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return names[j] if names else f"param_groups[{i}]['params'][{j}]"
        return "a parameter"

    # -- invariant groups -------------------------------------------------------------------------
    def _invariant(self, group: dict, index: list[int], params: list[Tensor],
                   grads: list[Tensor]) -> None:
        stats = self._stats(group, index)
        compiling = torch.compiler.is_compiling()  # compiled: kernels or vectorized (see `foreach`)
        # compiled, state made in this step (and rows prepared, see _init_states) is not handed to the
        # kernels' op, which declares it mutated: inductor (torch 2.13) then gave the
        # second tensor of a group the first one's state, and AOT autograd failed on views of
        # the parameters ("A view was created in no_grad mode ..."); the step after, the state
        # is the graph's input
        fresh = compiling and self._keeps_state(group) and any(not self.state.get(p) for p in params)
        ws, layout, shards = self._rows(group["grouping"], params)
        gs = [rows(g, group["grouping"]) for g in grads] if shards is None else \
            [s.view(g.to_local()) for s, g in zip(shards, grads)]
        states = [self.state[p] for p in params]
        if shards is not None:  # the rules run on local tensors; state is kept as DTensors
            states, kept = self._local_states(states, shards)
        per_tensor = compiling and shards is None and (self.compile_per_tensor or layout is None)
        vectorized = compiling or shards is not None or (group["foreach"] is not False
                                                          and layout is not None)
        gs = self._init_states(group, ws, gs, states, layout, stats)
        kernel = self._wants_kernels(group) and layout is not None and not fresh and (
            shards is None or not compiling and self._kernels_take_shards(group, shards))
        if kernel and self._fused(group, ws, gs, states, stats):
            pass  # (stepped by the kernels; sharded state is stored back below)
        elif per_tensor:  # see compile_per_tensor
            for i, w in enumerate(ws):
                self._update_many(group, [w], [gs[i]], [states[i]], self._layout([w]), [stats[i]])
        elif vectorized:
            self._update_many(group, ws, gs, states, layout, stats)
        else:
            for w, g, state, st in zip(ws, gs, states, stats):
                self._update_one(group, w, g, state, st)
        if shards is not None:
            self._store_states(params, shards, ws, states, kept)

    def _kernels_take_shards(self, group: dict, shards: list[ShardedRows]) -> bool:
        """Whether the fused kernels may step ``group``'s FSDP2 shards, each rank its own: where
        every local row is a whole group (``"channel"`` rows: dimension 0, the sharded one), the
        rules' per-row sums need no collective and the step is the one process's, row by row;
        groups that span ranks (``"tensor"``, ``"groups:G"``, ``"@1"``) take the vectorized path
        and its ``all_reduce``.  A rule whose kernel step couples the rows of a tensor (SGDG's and
        AdamG's penalty) says no.  The ranks may then still step one group by different paths
        (a rank holding no row of a part, state that the kernels do not take): safe because the
        vectorized step of whole-row groups makes no collective (a ``ShardedLayout`` without
        spanning groups reduces locally); a rule whose ``_update_many`` makes one there must
        say no here too."""
        return all(s.index is None for s in shards)

    def _keeps_state(self, group: dict) -> bool:
        """Whether the rule keeps state for ``group``'s parameters (PSGD without momentum keeps
        none, so its compiled steps can always take the kernels)."""
        return True

    def _wants_kernels(self, group: dict) -> bool:
        """Whether ``fused`` asks for the kernels (``True``, or ``None`` with ``foreach`` unset)."""
        return bool(group["fused"]) or (group["fused"] is None and group["foreach"] is None
                                        and self.fused_rule)

    def _fused(self, group: dict, ws: list[Tensor], gs: list[Tensor], states: list[dict],
               stats: list) -> bool:
        """Step the views the fused kernels take with :meth:`_update_fused`, the others with
        :meth:`_update_many`; ``False`` (nothing done) when the kernels take none of them."""
        backend = kernels.backend(ws[0])  # (fused=True was refused for others by _check_rule)
        if backend is None:
            return False
        if backend == "c" and group["fused"] is None and not kernels.available():
            return False
        fit = [kernels.fits(w, g) for w, g in zip(ws, gs)]
        if all(fit):  # (the usual step: the lists as they are, no copies)
            return self._update_fused(group, ws, gs, states, stats)
        if not any(fit):
            return False

        def take(keep):  # (views, gradients, states, stats) of the tensors that fit, or not
            return [[x for x, f in zip(xs, fit) if f == keep] for xs in (ws, gs, states, stats)]

        if not self._update_fused(group, *take(True)):
            return False
        rest_ws, rest_gs, rest_states, rest_stats = take(False)
        self._update_many(group, rest_ws, rest_gs, rest_states, self._layout(rest_ws), rest_stats)
        return True

    def _update_fused(self, group: dict, ws: list[Tensor], gs: list[Tensor], states: list[dict],
                      stats: list) -> bool:
        """Fused path (see ``fused``) for views :func:`kernels.fits` takes; returns ``False``,
        having changed nothing, for a step the kernel does not cover."""
        return False

    def _rows(self, grouping: str, params: list[Tensor]):
        """``(views, layout, shards)``: the grouped views of ``params``, their
        :class:`RowLayout` (``None`` when dtypes or devices differ) and, for FSDP2-sharded
        parameters, their :class:`~psiopt.optim.sharded.ShardedRows` (else ``None``)."""
        if not is_sharded(params[0]):
            ws = [rows(p, grouping) for p in params]
            return ws, self._layout(ws) if len({(w.dtype, w.device) for w in ws}) == 1 else None, None
        shards = [self._shard(p, grouping) for p in params]
        ws = [s.view(p.to_local()) for s, p in zip(shards, params)]
        if len({(w.dtype, w.device) for w in ws}) != 1:
            raise ValueError("psiopt: the sharded parameters of one group must share dtype and device")
        key = (tuple(w.shape for w in ws), tuple(id(s) for s in shards))
        layouts = self.__dict__.setdefault("_layouts", {})
        if key not in layouts:
            layouts[key] = ShardedLayout(ws, shards)
        return ws, layouts[key], shards

    def _shard(self, p: Tensor, grouping: str) -> ShardedRows:
        """The :class:`~psiopt.optim.sharded.ShardedRows` of the sharded ``p`` (cached)."""
        cache = self.__dict__.setdefault("_shards", {})
        if (id(p), grouping) not in cache:
            cache[(id(p), grouping)] = (p, ShardedRows(p, grouping))  # p kept: ids stay valid
        return cache[(id(p), grouping)][1]

    @staticmethod
    def _local_states(states: list[dict], shards: list[ShardedRows]) -> tuple[list[dict], list[dict]]:
        """Per-parameter state with every DTensor replaced by its local tensor (the view's rows:
        :meth:`ShardedRows.local`), and those."""
        local = [{k: shard.local(v) if is_sharded(v) else v for k, v in st.items()}
                 for st, shard in zip(states, shards)]
        return local, [dict(st) for st in local]

    def _store_states(self, params, shards, ws, states, kept, into=None) -> None:
        """Write back local state as DTensors (new or replaced entries only) into
        ``self.state`` (or the dicts ``into``)."""
        for i, (p, shard, w, st, old) in enumerate(zip(params, shards, ws, states, kept)):
            target = self.state[p] if into is None else into[i]
            for key, value in st.items():
                if key not in old or old[key] is not value:
                    target[key] = shard.wrap(value, w) if isinstance(value, Tensor) else value

    def _init_states(self, group: dict, ws: list[Tensor], gs: list[Tensor] | None,
                     states: list[dict], layout, stats: list) -> list[Tensor] | None:
        """Create the state of parameters stepped for the first time (with their row norms);
        returns the gradients the step is to use (``gs``; the sphere methods prepare rows here,
        see :class:`~psiopt.optim.sphere.UnitNormSGD`)."""
        fresh = [i for i, st in enumerate(states) if not st]
        if not fresh:
            return gs
        ns = self._norms(ws, layout)
        for i in fresh:  # state in the parameter's dtype, as torch.optim's
            self._init_state(group, ws[i], states[i], ns[i].to(ws[i].dtype))
        return gs

    @staticmethod
    def _norms(ws: list[Tensor], layout) -> list[Tensor]:
        """Per-group norms of each view (keepdim; float32 for float16/bfloat16 views)."""
        if layout is not None:
            return layout.split(layout.norms(ws))
        return [norm(w, accumulate_dtype(w.dtype)) for w in ws]

    def _layout(self, ws: list[Tensor]) -> RowLayout:
        """The :class:`RowLayout` of these views, cached by their shapes, dtype and device."""
        key = (tuple(w.shape for w in ws), ws[0].dtype, ws[0].device)
        cache = self.__dict__.setdefault("_layouts", {})
        if key not in cache:
            cache[key] = RowLayout(ws)
        return cache[key]

    def _init_state(self, group: dict, w: Tensor, state: dict, n: Tensor) -> None:
        """Create the state of the grouped view ``w`` (``n``: its per-group norms, keepdim)."""
        state["step"] = new_step(group, w)

    def _update_one(self, group: dict, w: Tensor, g: Tensor, state: dict, stats) -> None:
        """Reference path for one grouped view ``w``; ``stats``: the running statistics it feeds
        (for an update that rescales rows, see :func:`psiopt.optim.discovery.rescale_rows_`)."""
        raise NotImplementedError

    def _update_many(self, group, ws: list[Tensor], gs: list[Tensor], states: list[dict],
                     layout: RowLayout, stats: list) -> None:
        """Vectorized path over the group's views (same arguments as :meth:`_update_one`)."""
        raise NotImplementedError

    #: per-group statistics kept in float32 for float16/bfloat16 parameters (torch.optim's
    #: ``load_state_dict`` casts every state tensor to the parameter's dtype; psiopt's keeps these)
    accumulated_state: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim; step counters stay on the CPU (torch moves them to the parameter's
        device for a group that sets ``fused``, and psiopt reads them without a device
        synchronisation), but those of torch's Adam on the other parameters of CUDA tensors,
        which go to the parameter's device in float32, wherever they were saved, so that torch's
        fused CUDA Adam takes them (:func:`rest_counter_on_device`); state in
        :attr:`accumulated_state` of invariant float16/bfloat16 parameters stays float32 (read
        from the saved tensor, not from its cast)."""
        saved = [{k: state_dict["state"].get(i, {}).get(k) for k in self.accumulated_state}
                 for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p) or {}
                for st in (state, state.get("rest") or {}):
                    step = st.get("step")
                    if not isinstance(step, Tensor) or is_sharded(step):
                        continue
                    if _on_device_counter(group, p, state, st):  # torch's fused CUDA Adam's
                        if step.device != p.device or step.dtype != torch.float32:
                            st["step"] = step.to(p.device, torch.float32, non_blocking=True)
                    elif not step.is_cpu:
                        st["step"] = step.cpu()
        if not self.accumulated_state:
            return
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        for (group, p), values in zip(params, saved):
            state = self.state.get(p)
            if not state or not is_invariant(group.get("grouping")):
                continue
            for key, value in values.items():  # (an FSDP2 state's DTensor too: as sharded)
                if isinstance(value, Tensor) and key in state:
                    state[key] = value.to(p.device, accumulate_dtype(p.dtype), copy=True)

    def __setstate__(self, state: dict) -> None:
        initial = state.pop("_initial", None)  # pickled by earlier psiopt: state held apart
        super().__setstate__(state)
        for p, pending in (initial or {}).items():
            if not self.state.get(p):
                self.state[p].update(pending)
        for group in self.param_groups:  # pickled before `fused` was added
            group.setdefault("fused", None)

    # -- diagnostics --------------------------------------------------------------------------------
    def scheduling_beta(self, p: Tensor, view: Tensor, before: Tensor) -> Tensor | None:
        """Roburin Theorem 2's ``β = d^{-1/2}‖b‖`` per group for the last step of invariant ``p``,
        when that step has the form ``x − η a ⊘ b`` (keepdim shape), else ``None``.  ``view`` and
        ``before`` are ``p``'s grouped views after and before the step."""
        return None

    # -- non-invariant groups: torch.optim's own SGD / Adam ---------------------------------------
    def _counterpart(self, group: dict, params: list[Tensor], grads: list[Tensor],
                     states: list[dict] | None = None) -> None:
        """torch.optim's SGD or Adam on ``params`` (state in ``states``, default their own)."""
        states = [self.state[p] for p in params] if states is None else states
        fused = self._torch_fused(group, params, grads, states)
        foreach = group["foreach"] is not False and not fused
        if self.counterpart == "sgd":
            self._sgd(group, params, grads, states, foreach, fused)
            return
        for p, s in zip(params, states):
            if not s:
                s["step"] = new_rest_step(group, p)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [s["step"] for s in states]
        if len({t.is_cpu for t in steps}) > 1:  # (a group of CPU and CUDA tensors): torch's
            for cpu in (True, False):  # capturable foreach Adam takes no CPU tensor, so apart
                keep = [i for i, t in enumerate(steps) if t.is_cpu == cpu]
                self._counterpart(group, *([xs[i] for i in keep] for xs in (params, grads, states)))
            return
        beta1, beta2 = group["betas"]
        # torch's capturable Adam reads nothing on the host: compiled, and for counters on the
        # parameters' device (see counters_on_device); else a tensor lr on the CPU is a number
        capturable = torch.compiler.is_compiling() or not all(t.is_cpu for t in steps)
        lr = host_lr(group["lr"])  # (a tensor on a device, or traced, stays one)
        if isinstance(lr, Tensor) and not capturable:  # (not met: see counters_on_device)
            foreach = fused = False  # torch's per-tensor Adam reads it, as torch.optim.Adam's
        _torch_adam(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [], steps, foreach=foreach, fused=fused, amsgrad=False, beta1=beta1,
                    beta2=beta2, lr=lr,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    capturable=capturable)

    def _rest_settings(self, group: dict) -> dict:
        """The settings of the rows outside the part of a grouping ``"<grouping>[a:b]"``: of an
        invariant part, ``rest_<key>`` where the group sets it, else the optimizer's defaults
        (what a group without a grouping takes; :func:`psiopt.create_optimizer` sets the
        others' settings there), ``lr`` scaled as the group's has been since it was added
        (``rest_lr · lr / part_lr0``, ``part_lr0`` recorded then: a scheduler's or a hand-written
        decay reaches the rest in proportion, and a group with ``lr = 0`` moves neither, as
        torch.distributed.checkpoint's initialising step expects).  Schedules of absolute values
        (``OneCycleLR``'s and ``CyclicLR``'s ``max_lr``, an ``eta_min``, ``ReduceLROnPlateau``'s
        ``min_lr``) and other scheduled settings (momentum) reach the rest only in that
        proportion, or not at all: there a separate tensor would follow another schedule.  Of a
        cancelled part: the group's own settings."""
        if not is_invariant(group["grouping"]):
            return group
        out = dict(group)
        for key in REST_KEYS[self.counterpart]:
            out[key] = group["rest_" + key] if "rest_" + key in group else \
                self.defaults[key] if key in self.defaults else group[key]
        lr0, lr = group.get("part_lr0") or 0.0, group["lr"]
        moved = (lr != 0).double() if isinstance(lr, Tensor) else float(lr != 0)
        out["lr"] = out["lr"] * (lr / lr0 if lr0 else moved)
        return out

    def _rest(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """The ordinary update (:meth:`_counterpart`) of the rows outside a part (one or two
        pieces per parameter, views), with :meth:`_rest_settings`, their state in
        ``state["rest"]`` (:meth:`_rest_pieces`), each piece stepping on its slice of it (Adam:
        one step count, copied for a second piece)."""
        settings = self._rest_settings(group)
        pieces, piece_grads, states = [], [], []
        for p, g in zip(params, grads):
            st = self.state[p].setdefault("rest", {})
            ps, gs, split = self._rest_pieces(p, g, group["grouping"], st, settings)
            for i, (v, gv) in enumerate(zip(ps, gs)):
                pieces.append(v)
                piece_grads.append(gv)
                piece = {k: parts[i] for k, parts in split.items()}
                if "step" in st:
                    piece["step"] = st["step"] if i == 0 else st["step"].clone()
                states.append(piece)
        if pieces:
            self._counterpart(settings, pieces, piece_grads, states)

    def _rest_pieces(self, p: Tensor, g: Tensor, grouping: str, st: dict, settings: dict):
        """``(pieces of p, of g, {key: pieces of each state buffer})`` outside the part, views.
        The state ``st`` (made here) holds the rest's rows stacked (``t[:a]`` then ``t[b:]``).
        Under FSDP2 the rest's rows are spread unevenly over the ranks: its buffers are shaped
        and sharded like the parameter (DTensors, which ``torch.distributed.checkpoint`` saves),
        the part's rows in them unused, and a rank without rows of the rest steps its count
        only, so that every rank's count is alike."""
        if not is_sharded(p):
            ps = rest(p, grouping)
            if not ps:  # a part of every row ("channel[0:N]"): nothing else to step
                return [], [], {}
            self._rest_state(st, ps, settings)
            return ps, rest(g, grouping), {k: v.split([v.shape[0] for v in ps])
                                           for k, v in st.items() if k != "step"}
        cut = self._shard(p, grouping).rest  # the local rows outside the part
        ps = cut(p.to_local())
        self._rest_state(st, [p], settings)  # (zeros_like of a DTensor: sharded like it)
        if not ps and "step" in st:
            st["step"] += 1
        return ps, cut(g.to_local()), {k: cut(v.to_local()) for k, v in st.items() if k != "step"}

    def _rest_state(self, state: dict, pieces: list[Tensor], settings: dict) -> dict:
        """``state`` (a parameter's ``state["rest"]``) with the buffers the counterpart needs made
        (zeros: torch's first SGD-momentum step, ``buf = g``, is ``0·μ + g``)."""
        def zeros():
            return torch.cat([torch.zeros_like(v) for v in pieces]) if len(pieces) > 1 \
                else torch.zeros_like(pieces[0], memory_format=torch.contiguous_format)

        if self.counterpart == "sgd":
            if settings["momentum"] and "momentum_buffer" not in state:
                state["momentum_buffer"] = zeros()
        elif not state:
            state.update(step=new_rest_step(settings, pieces[0]), exp_avg=zeros(), exp_avg_sq=zeros())
        return state

    @staticmethod
    def _torch_fused(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> bool:
        """Whether the other parameters take torch.optim's fused SGD/Adam (one kernel per
        tensor on the CPU where foreach makes three to a dozen; multi-tensor kernels on CUDA):
        eager steps of contiguous tensors and state of the dtypes torch's fused kernels take
        (:func:`torch_fused_takes`; torch's fused kernels read gradients and state with the
        parameter's strides: others gave wrong steps), with ``fused`` not ``False`` and
        ``foreach`` unset, momentum buffers for all the parameters or none (torch's fused SGD
        raises on a mix, e.g. a parameter whose first gradient comes late), and Adam's
        counters of CUDA tensors on their device in float32 (:func:`rest_counter_on_device`;
        :meth:`load_state_dict` brings loaded ones there; others, e.g. made by a compiled step
        in float64, keep the foreach step)."""
        if group["fused"] is False or group["foreach"] is not None or torch.compiler.is_compiling():
            return False
        if len({"momentum_buffer" in s for s in states}) > 1:
            return False
        # each check one pass over a list, no call per tensor (a step's host time, on a GPU)
        if not (torch_fused_takes(params) and all(map(Tensor.is_contiguous, params))
                and all(map(Tensor.is_contiguous, grads))) or any_sharded(params):
            return False
        if not all(t.is_contiguous() for s in states for key, t in s.items() if key != "step"):
            return False
        return not any("step" in s and p.is_cuda and (s["step"].device != p.device
                                                      or s["step"].dtype != torch.float32)
                       for p, s in zip(params, states))

    @staticmethod
    def _sgd(group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
             foreach: bool, fused: bool = False) -> None:
        """torch.optim's SGD (momentum, L2) on ``params``; buffers kept in ``states``."""
        bufs = [s.get("momentum_buffer") for s in states]
        lr = host_lr(group["lr"])  # a CPU tensor: the step of its number (no synchronisation)
        if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
            _sgd_device_lr(group, params, grads, bufs)  # (torch's foreach SGD would read it)
        else:  # (compiled, torch's foreach SGD multiplies by a tensor lr: no graph break)
            _torch_sgd(params, grads, bufs, foreach=foreach or (isinstance(lr, Tensor) and not fused),
                       fused=fused, weight_decay=group["weight_decay"], momentum=group["momentum"],
                       lr=lr, dampening=0.0, nesterov=False, maximize=False)
        if group["momentum"]:
            for s, b in zip(states, bufs):
                s["momentum_buffer"] = b


def _sgd_device_lr(group: dict, params: list[Tensor], grads: list[Tensor], bufs: list) -> None:
    """torch.optim's SGD step (momentum, L2; no dampening or Nesterov) for an ``lr`` tensor on
    the parameters' device in an eager step, without reading it: torch's foreach SGD passes it as
    ``alpha`` (a host synchronisation; it multiplies instead while compiling, as here)."""
    wd, mu = group["weight_decay"], group["momentum"]
    ds = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
    if mu:
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            torch._foreach_mul_([bufs[i] for i in old], mu)
            torch._foreach_add_([bufs[i] for i in old], [ds[i] for i in old])
        for i, b in enumerate(bufs):
            if b is None:
                bufs[i] = ds[i].detach().clone()
        ds = bufs
    torch._foreach_add_(params, torch._foreach_mul(ds, -group["lr"]))


def host_lr(lr):
    """``lr`` as a Python number where :func:`readable` (a CPU tensor outside a trace), else as
    it is."""
    return lr.item() if isinstance(lr, Tensor) and readable(lr) else lr


def counters_on_device(group: dict, p: Tensor) -> bool:
    """Where the step counters of ``group``'s parameter ``p`` live.  As torch.optim's: on the CPU
    (an eager step reads them as Python numbers without a device synchronisation), but on
    ``p``'s device while ``torch.compile`` traces a step (dynamo puts torch.optim's there for
    capturable steps: the graph then holds no CPU tensor, and ``mode="reduce-overhead"`` can
    capture it in a CUDA graph) and in the steps of a group whose ``lr`` is a tensor on that
    device (nothing of the step is then read on the host: it can be captured in a CUDA graph).
    A counter on a device stays there (moving it back would synchronise): an eager step after
    compiled ones computes with it as a tensor (bias corrections, PSI-SGD's guard schedule),
    without reading it."""
    if p.is_cpu or p.is_meta:
        return False
    lr = group.get("lr")
    return torch.compiler.is_compiling() or (isinstance(lr, Tensor) and lr.device == p.device)


def new_step(group: dict, p: Tensor) -> Tensor:
    """A new step counter (0., in the default dtype as torch.optim's) for ``group``'s parameter
    (or view) ``p``, where :func:`counters_on_device` says."""
    if counters_on_device(group, p):  # (not torch.tensor(0.0, device=...): a synchronising copy)
        return torch.zeros((), device=p.device)
    return torch.tensor(0.0)


_CUDA_FUSED = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def torch_fused_takes(ts: list[Tensor]) -> bool:
    """Whether torch.optim's fused SGD/Adam take every tensor of ``ts``, as psiopt calls them:
    float32/float64 CPU tensors (as the C kernels), floating CUDA tensors (from the set of their
    kinds: no call per tensor, a step's host time)."""
    kinds = {(t.is_cpu, t.is_cuda, t.dtype) for t in ts}
    return all(dtype in (kernels.TYPES if cpu else _CUDA_FUSED if cuda else ())
               for cpu, cuda, dtype in kinds)


def _on_device_counter(group: dict, p: Tensor, state: dict, st: dict) -> bool:
    """Whether ``st`` (``p``'s ``state``, or its ``state["rest"]``) holds a counter of torch's
    Adam that lives on ``p``'s device (:func:`rest_counter_on_device`): not the rule's own (an
    invariant or cancelled group's ``state``), which psiopt reads on the host."""
    theirs = st is not state or not (is_invariant(group["grouping"]) or group["grouping"] == CANCELLED)
    return theirs and rest_counter_on_device(group, p)


def rest_counter_on_device(group: dict, p: Tensor) -> bool:
    """Whether torch's Adam steps the other parameter (or piece of a part's rest) ``p`` of
    ``group`` with its counter on ``p``'s device: a CUDA tensor with ``fused`` not ``False`` and
    ``foreach`` unset, so that torch's fused CUDA Adam can take it (it reads its counters on the
    device, as ``torch.optim.Adam(fused=True)`` keeps them: float32, on the device); where it
    does not (a strided gradient), torch's capturable foreach Adam does, reading nothing on the
    host either.  Not for a sharded (FSDP2) parameter, whose counters stay on the CPU."""
    return p.is_cuda and not is_sharded(p) and group.get("fused") is not False \
        and group.get("foreach") is None


def new_rest_step(group: dict, p: Tensor) -> Tensor:
    """A new step counter for torch's Adam on the other parameter ``p``: as
    ``torch.optim.Adam(fused=True)``'s where :func:`rest_counter_on_device`, else
    :func:`new_step`."""
    if rest_counter_on_device(group, p) and not torch.compiler.is_compiling():
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return new_step(group, p)


def add_scaled_(t: Tensor, x: Tensor, c) -> Tensor:
    """``t += c·x`` in place for a number ``c`` (``alpha``) or a 0-d tensor (multiplied: a tensor
    passed as ``alpha`` is read on the host)."""
    return t.add_(x, alpha=c) if not isinstance(c, Tensor) else t.add_(x * c)


def foreach_add_scaled_(ts: list[Tensor], xs: list[Tensor], c) -> None:
    """:func:`add_scaled_` over lists (``torch._foreach_*``)."""
    if isinstance(c, Tensor):
        torch._foreach_add_(ts, torch._foreach_mul(xs, c))
    else:
        torch._foreach_add_(ts, xs, alpha=c)


def momentum_buffer(state: dict, like: Tensor, make=torch.zeros_like) -> Tensor:
    """``state["momentum_buffer"]``, made from ``like`` the first time only (no allocation later)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = make(like)
    return state["momentum_buffer"]


def step_value(step: Tensor):
    """A CPU step counter as a Python number (no device synchronisation, as in torch.optim), or,
    while ``torch.compile`` traces the step or for a counter on a device (see
    :func:`counters_on_device`), the tensor itself in float64 (no graph break, no
    synchronisation; the number's precision: powers of β taken in the counter's float32 were
    1e-8 off)."""
    return step.item() if readable(step) else step.to(torch.float64)


def step_count(states: list[dict]) -> list[Tensor]:
    """Advance and return the per-parameter step counters (see :func:`counters_on_device`)."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1.0)
    return steps
