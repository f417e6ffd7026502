"""Optimizers by name, with the papers' default hyperparameters."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import REST_KEYS, ScaleInvariantOptimizer, check_hyper
from .baselines import BSGD, SGD, Adam, AdamW
from .discovery import param_groups
from .euclidean import SGDMRT, AdamS, AdamSRT, ProjectedSGD
from .geometry import CANCELLED, is_invariant, split_part
from .quotient import PSISGD
from .sphere import SGDG, AdamG, AdamGStar, UnitNormSGD


@dataclass(frozen=True)
class OptimizerSpec:
    """How a registered name is built: class, hyperparameters of invariant / other groups."""

    cls: type
    paper: str
    invariant: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)
    shared_decay: bool = False  # ``weight_decay`` applies to every group (AdamG*: Theorem 4)

    @property
    def baseline(self) -> bool:
        """A torch.optim update rule (invariant groups are not treated specially)."""
        return issubclass(self.cls, (SGD, Adam, AdamW))


_SGD = {"lr": 0.1, "momentum": 0.9}
_ADAM = {"lr": 1e-3}
REGISTRY: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(SGD, "baseline (torch.optim, foreach)", _SGD, _SGD),
    "adam": OptimizerSpec(Adam, "baseline (torch.optim, foreach)", _ADAM, _ADAM),
    "adamw": OptimizerSpec(AdamW, "baseline (torch.optim, foreach)",
                           {"lr": 1e-3, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 1e-2}),
    "psi-sgd": OptimizerSpec(PSISGD, "Yi et al., PSI-SGD (eq. 10)", {"lr": 1.0, "momentum": 0.0},
                             _SGD),
    "psi-sgdm": OptimizerSpec(PSISGD, "Yi et al., PSI-SGDM (eq. 11, Alg. 1)",
                              {"lr": 0.1, "momentum": 0.9}, _SGD),
    "un-sgd": OptimizerSpec(UnitNormSGD, "Badrinarayanan et al., UN (eq. 2)", {"lr": 0.01},
                            {"lr": 0.01, "momentum": 0.0}),
    "b-sgd": OptimizerSpec(BSGD, "Badrinarayanan et al., B-SGD", {"lr": 0.01}, {"lr": 0.01}),
    "psgd": OptimizerSpec(ProjectedSGD, "Arora et al., projected SGD (App. D)", {"lr": 0.1},
                          {"lr": 0.1}),
    "sgdg": OptimizerSpec(SGDG, "Cho & Lee, SGDG (baseline in Yi)", {"lr": 0.2}, _SGD),
    "adamg": OptimizerSpec(AdamG, "Cho & Lee, AdamG (baseline in Yi, Roburin)", {"lr": 0.05},
                           {"lr": 1e-3, "betas": (0.9, 0.999)}),
    "adams": OptimizerSpec(AdamS, "Roburin et al., Adam-S (eq. 15)", _ADAM, _ADAM),
    "adamsrt": OptimizerSpec(AdamSRT, "Roburin et al., Adam-SRT (eqs. 19-21)", _ADAM, _ADAM),
    "sgdmrt": OptimizerSpec(SGDMRT, "Roburin et al., SGD-MRT (App. E.2)", _SGD, _SGD),
    "adamg-star": OptimizerSpec(AdamGStar, "Roburin et al., AdamG* (Theorem 4: SGD+L2 on the sphere)",
                                {"lr": 0.1, "weight_decay": 5e-4},
                                {"lr": 0.1, "momentum": 0.0, "weight_decay": 5e-4},
                                shared_decay=True),
}


def list_optimizers() -> list[str]:
    """Registered optimizer names, in a stable order."""
    return list(REGISTRY)


def _spec(name: str) -> OptimizerSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(REGISTRY)}") from None


def _explicit(spec: OptimizerSpec, hyper: dict) -> tuple[dict, dict]:
    """``hyper`` split into what it sets on the invariant groups and on the others."""
    invariant, other = {}, {}
    for key, value in hyper.items():
        if key.startswith("invariant_"):
            invariant[key[len("invariant_"):]] = value
        elif key.startswith("other_") or (key == "weight_decay" and not spec.shared_decay):
            other[key.removeprefix("other_")] = value
        else:
            invariant[key] = other[key] = value
    return invariant, other


def settings(name: str, **hyper) -> tuple[dict, dict]:
    """``(invariant, other)``: every hyperparameter ``create_optimizer(…, name, **hyper)`` gives
    the invariant groups and the other groups (class defaults, then the registry's, then
    ``hyper``), validated."""
    spec = _spec(name)
    signature = {k: p for k, p in inspect.signature(spec.cls).parameters.items()
                 if k not in ("params", "grouping")}  # groupings come from discovery
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    if spec.baseline:
        defaults["foreach"] = True
    set_invariant, set_other = _explicit(spec, hyper)
    invariant = {**defaults, **spec.invariant, **set_invariant}
    other = {**defaults, **spec.other, **set_other}
    if spec.baseline and issubclass(spec.cls, torch.optim.Adam) and any(
            isinstance(g.get("lr"), torch.Tensor) for g in (invariant, other)):
        # torch.optim.Adam/AdamW refuse a tensor lr with foreach=True (but capturable, which
        # torch.compile sets on CUDA): left to torch's choice
        invariant["foreach"] = other["foreach"] = None
    unknown = sorted((set(invariant) | set(other)) - set(signature))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; valid: {sorted(signature)}")
    for key, value in [*invariant.items(), *other.items()]:
        check_hyper(key, value)
    if issubclass(spec.cls, ScaleInvariantOptimizer):
        try:  # what the rule cannot honour, before anything is built (fused=True: when built)
            spec.cls._check_rule({**invariant, "grouping": "channel"})
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return invariant, other


def create_optimizer(model_or_param_groups, name: str, example_inputs=None, *,
                     mapping: dict | None = None, overrides: dict | None = None,
                     **hyper) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for a model (discovering its invariant groups) or param groups.

    Hyperparameters: a plain key (``lr=0.05``) sets every group; ``invariant_<key>`` only the
    scale-invariant groups and ``other_<key>`` only the rest.  ``weight_decay`` is the exception:
    it applies to the non-invariant groups only (use ``invariant_weight_decay`` for coupled L2 on
    invariant weights), except for ``adamg-star``, where Theorem 4 uses the same λ everywhere.
    Unset keys take the paper's defaults (see ``REGISTRY``); groups added later with
    ``add_param_group`` take them too.  Given parameter groups, a key a group sets itself wins
    over the paper's default, and a keyword passed here wins over both.  Everything is validated
    before the model is touched.  Biases cancelled by a normalisation are never updated.
    """
    spec = _spec(name)
    invariant, other = settings(name, **hyper)
    from_model = isinstance(model_or_param_groups, nn.Module)
    if from_model:
        groups = param_groups(model_or_param_groups, example_inputs, mapping=mapping,
                              overrides=overrides)
        explicit = invariant, other  # the groups carry param_groups' defaults only
    else:
        items = list(model_or_param_groups)
        groups = ([dict(g) for g in items] if items and isinstance(items[0], dict)
                  else [{"params": items}])
        explicit = _explicit(spec, hyper)
    trained = [g for g in groups if g.get("grouping") != CANCELLED]
    for group in trained:
        grouping = group.get("grouping")
        partial = is_invariant(grouping) and split_part(grouping)[1] is not None
        side = 0 if is_invariant(grouping) and not (partial and spec.baseline) else 1
        if partial and spec.baseline:  # one ordinary tensor: the settings of its rest (rest_<key>,
            kind = "adam" if issubclass(spec.cls, torch.optim.Adam) else "sgd"  # else the others')
            for key in REST_KEYS[kind]:
                if "rest_" + key in group:
                    group[key] = group.pop("rest_" + key)
                else:
                    group.pop(key, None)
            for key in [k for k in group if k.startswith("rest_")]:  # (the other kind's: moot)
                del group[key]
        group.update({**(invariant, other)[side], **group, **explicit[side]})
        if spec.baseline and issubclass(spec.cls, torch.optim.Adam) and \
                isinstance(group.get("lr"), torch.Tensor) and "foreach" not in explicit[side]:
            group["foreach"] = None  # (torch's Adam refuses a tensor lr with foreach=True: see settings)
        if partial and not spec.baseline:  # the rows outside the part: the others' settings,
            for key in REST_KEYS[spec.cls.counterpart]:  # a keyword passed here winning again
                if key in explicit[1]:
                    group["rest_" + key] = explicit[1][key]
                elif key in other:
                    group.setdefault("rest_" + key, other[key])
    for group in groups:  # cancelled biases: the others' settings (momentum: the same kind of
        if group.get("grouping") == CANCELLED:  # state, as checkpoints expect), lr and wd 0
            group.update({**other, **group, "lr": 0.0, "weight_decay": 0.0})
    decays = sorted({g["weight_decay"] for g in trained}) if spec.shared_decay and not from_model else []
    if len(decays) > 1:  # param_groups' weight_decay=0 on invariant groups would silently win
        raise ValueError(
            f"{name}: Theorem 4 takes one weight_decay, but the groups have {decays} "
            "(param_groups gives invariant groups weight_decay=0 unless asked); pass "
            f"weight_decay=λ, which sets every group, or build {spec.cls.__name__} directly for "
            "a λ per group")
    with warnings.catch_warnings():
        if from_model:  # param_groups has already said so, in terms of the model
            warnings.filterwarnings("ignore", message=".*no parameter group declares a 'grouping'")
        optimizer = spec.cls(groups)
    optimizer.defaults.update(other)  # for groups added later
    optimizer.invariant_defaults = invariant
    return optimizer
