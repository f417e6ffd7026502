"""``<inner>+<policy>`` in the harness: a ``torch.optim`` rule built on
:func:`psiopt.optimizer_groups`, with a :class:`psiopt.NormPolicy` on its invariant groups
(issue 25, item 4).

Names (``psiopt train --optimizer``, ``psiopt compare --optimizers``):

* ``<inner>+<policy>`` and ``<inner>+<policy>+project``: ``inner`` one of :data:`INNERS`,
  ``policy`` one of :data:`psiopt.optim.policies.POLICIES`; ``+project`` gives the inner step
  the tangent gradient (``NormPolicy(project=True)``).  ``adamw+free`` is plain AdamW on
  psiopt's groups, wrapped in a policy that does nothing: the baseline of the other policies.
* ``muon``: ``torch.optim.Muon`` and AdamW, no policy.

Inner rules and their defaults (:data:`DEFAULTS`; ``--lr``, ``--invariant-lr``,
``--weight-decay``, ``--invariant-weight-decay``, ``--momentum`` and ``--set key=value`` set
them, and any other key is refused naming the valid ones):

* ``adamw``: ``torch.optim.AdamW``, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.05;
* ``sgd``: ``torch.optim.SGD``, lr 0.1, momentum 0.9 (heavy ball, no dampening, no Nesterov),
  weight decay 5e-4 (coupled L2, as torch's SGD does);
* ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5 Newton–Schulz steps,
  ``adjust_lr_fn="match_rms_adamw"``, so that one lr suits both sides) on the 2-D weights but
  the output layer (the ``nn.Linear`` whose output is the network's, which Muon's authors leave
  to AdamW), and ``torch.optim.AdamW`` (betas, eps as above) on everything else; lr 1e-3 and
  weight decay 0.05 on both sides.  ``torch.optim.Muon`` takes 2-D parameters only: a model
  with no other 2-D weight (ResNet-20: 4-D convolutions and the classifier) is refused.

Weight decay is placed by :func:`psiopt.optimizer_groups`: ``weight_decay`` on the other weights of
two or more dimensions, none on gains, biases and ``no_weight_decay()`` names,
``invariant_weight_decay`` (default: ``weight_decay``) on the invariant groups, lr 0 and no decay on
cancelled parameters; a tensor only part of which is invariant (a fused qkv weight) takes ``lr`` and
``weight_decay`` as a whole (torch.optim has one setting per tensor; the policy acts on the part's
rows). ``invariant_lr`` (default: ``lr``) sets the other invariant groups' rate; ``invariant_lr`` or
``invariant_weight_decay`` set on a model whose invariant groups are all parts reaches no group and
is refused. ``"fixed"``, ``"unit"`` and ``"equilibrium"`` undo the invariant weight decay's effect
on the norm; ``"equilibrium"`` needs it positive (it sets the angle) and has a formula for AdamW and
SGD (without Nesterov or dampening) only, so ``muon+equilibrium`` is refused. A policy on a model in
which discovery finds no invariant group is refused.

``config.json`` records the resolved settings (:func:`settings`: inner rule, policy, project,
every hyperparameter per side) and the groups as built (:func:`describe`: rule, grouping, lr,
weight decay and parameter names of each).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict

import torch
from torch import nn
from torch.optim import Optimizer

from ..optim.base import check_hyper
from ..optim.geometry import is_invariant, split_part
from ..optim.groups import optimizer_groups
from ..optim.policies import POLICIES, NormPolicy

INNERS = ("adamw", "sgd", "muon")
#: each inner rule's defaults (``invariant_lr`` and ``invariant_weight_decay`` default to
#: ``lr`` and ``weight_decay``)
DEFAULTS = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999), "eps": 1e-8},
    "sgd": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False, "dampening": 0.0},
    "muon": {"lr": 1e-3, "weight_decay": 0.05, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
             "betas": (0.9, 0.999), "eps": 1e-8},
}
#: fixed settings of torch.optim.Muon (recorded, not settable; ``eps``: Muon's own, torch's default,
#: apart from AdamW's)
MUON_FIXED = {"adjust_lr_fn": "match_rms_adamw", "eps": 1e-7}
PROJECT = "project"


def parse(name: str) -> tuple[str, str | None, bool] | None:
    """``(inner, policy or None, project)`` of a harness name ``<inner>+<policy>[+project]`` or
    ``muon``; ``None`` for any other name (a registered psiopt optimizer).  ``ValueError`` with
    one line for a malformed name or a combination that has no meaning."""
    if not isinstance(name, str) or ("+" not in name and name != "muon"):
        return None
    parts = name.split("+")
    inner, rest = parts[0], parts[1:]
    if inner not in INNERS:
        raise ValueError(f"unknown inner optimizer {inner!r} in {name!r}: <inner>+<policy> takes "
                         f"{', '.join(INNERS)} before the '+'")
    if not rest:
        return inner, None, False
    policy, extra = rest[0], rest[1:]
    if policy not in POLICIES:
        raise ValueError(f"unknown norm policy {policy!r} in {name!r}: choose from "
                         f"{', '.join(POLICIES)}")
    if extra not in ([], [PROJECT]):
        raise ValueError(f"{name!r}: after <inner>+<policy> only '+{PROJECT}' may follow "
                         "(the tangent gradient for the inner step)")
    if inner == "muon" and policy == "equilibrium":
        raise ValueError(f"{name!r}: the equilibrium angle has a formula for AdamW and SGD only, "
                         "not for Muon; use muon+fixed, muon+unit or muon+free")
    return inner, policy, bool(extra)


def is_wrapped(name: str) -> bool:
    """Is ``name`` a harness name of this module (not a registered psiopt optimizer)?"""
    return isinstance(name, str) and ("+" in name or name == "muon")


def _check(key: str, value) -> None:
    if key in ("nesterov",):
        if not isinstance(value, bool):
            raise ValueError(f"invalid {key}: {value!r} (must be true or false)")
    elif key == "ns_steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid ns_steps: {value!r} (must be an integer >= 1)")
    elif key == "dampening":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"invalid dampening: {value!r} (must lie in [0, 1))")
    else:
        bare = key.removeprefix("invariant_")
        try:
            check_hyper(bare, value)
        except ValueError as e:  # (naming the flag that was given)
            raise ValueError(str(e).replace(f"invalid {bare}:", f"invalid {key}:", 1)) from None
        if key.endswith("lr") and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise ValueError(f"invalid {key}: {value!r} (must be a finite number >= 0)")


def settings(name: str, **hyper) -> dict:
    """Everything ``name`` runs with (see the module docstring), validated: ``inner``,
    ``policy``, ``project``, ``rule`` (the torch classes), and the hyperparameters of the
    ``invariant`` and ``other`` groups (for ``muon``: Muon's momentum, Nesterov and steps with
    AdamW's betas and eps, each applying to its own side).  ``ValueError`` naming the key."""
    inner, policy, project = parse(name)
    defaults = DEFAULTS[inner]
    valid = sorted([*defaults, "invariant_lr", "invariant_weight_decay"])
    unknown = sorted(set(hyper) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; valid: {valid}")
    for key, value in hyper.items():
        _check(key, value)
    base = {**defaults, **{k: v for k, v in hyper.items() if not k.startswith("invariant_")}}
    if isinstance(base.get("betas"), list):
        base["betas"] = tuple(base["betas"])
    invariant = {**base, "lr": hyper.get("invariant_lr", base["lr"]),
                 "weight_decay": hyper.get("invariant_weight_decay", base["weight_decay"])}
    if policy == "equilibrium":
        if not invariant["weight_decay"] > 0:
            raise ValueError(f"{name}: the equilibrium angle √(2ηλ…) needs invariant weight decay "
                             f"λ > 0 (got {invariant['weight_decay']:g}); set "
                             "--invariant-weight-decay (or --weight-decay)")
        if inner == "sgd" and (base["nesterov"] or base["dampening"]):
            raise ValueError(f"{name}: the equilibrium angle has no formula for Nesterov or "
                             "dampened momentum; leave nesterov and dampening at false and 0")
    rule = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD",
            "muon": "torch.optim.Muon (2-D weights but the output layer) + torch.optim.AdamW (the "
                    "rest)"}[inner]
    out = {"inner": inner, "policy": policy, "project": project, "rule": rule,
           "invariant": invariant, "other": base,
           "weight_decay_placement": "other weights of >= 2 dims: weight_decay; gains, biases, "
                                     "no_weight_decay(): 0; invariant groups: invariant weight "
                                     "decay (a partly invariant tensor: weight_decay); cancelled: "
                                     "lr 0, no decay (psiopt.optimizer_groups)"}
    if inner == "muon":
        out["muon_fixed"] = dict(MUON_FIXED)
    return out


class Combined(Optimizer):
    """Several ``torch.optim`` optimizers stepped as one (Muon and AdamW): ``param_groups`` is
    theirs, in order (a scheduler sets their ``lr``), ``state_dict`` a list of theirs."""

    def __init__(self, optimizers: list[Optimizer]):  # (super().__init__ is not called: the
        self.optimizers = list(optimizers)  # groups live in the inner optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"Combined.load_state_dict: expected the states of "
                             f"{len(self.optimizers)} optimizers")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"Combined({', '.join(type(o).__name__ for o in self.optimizers)})"


def output_layer(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of the parameters of the ``nn.Linear`` whose output is the network's output (the
    classifier), found by one forward pass of a copy in eval mode; empty if there is none."""
    probe = copy.deepcopy(model).eval()
    outs = {}
    for name, m in probe.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, i, o, name=name: outs.__setitem__(name, o))
    with torch.no_grad():
        y = probe(example[:2])
    heads = [n for n, o in outs.items() if o is y]
    return {f"{h}.{p}" if h else p for h in heads
            for p, _ in probe.get_submodule(h).named_parameters()}


def create(name: str, model: nn.Module, example: torch.Tensor, mapping: dict | None = None,
           **hyper):
    """``(optimizer the harness steps, optimizer a scheduler drives)`` for harness name ``name``
    on ``model``: a :class:`NormPolicy` around the inner rule (or the inner rule alone for
    ``muon``).  ``ValueError`` with one line for what cannot be built (no invariant group under
    a policy, nothing 2-D for Muon)."""
    s = settings(name, **hyper)
    inner, policy, project = s["inner"], s["policy"], s["project"]
    inv, other = s["invariant"], s["other"]

    def groups(select=None):
        made = optimizer_groups(model, example, mapping=mapping, select=select,
                                weight_decay=other["weight_decay"],
                                invariant_weight_decay=inv["weight_decay"])
        for g in made:  # (a part of a tensor: the tensor takes the others' lr and decay)
            if is_invariant(g["grouping"]) and split_part(g["grouping"])[1] is None:
                g["lr"] = inv["lr"]
        return made

    if inner == "adamw":
        opt = torch.optim.AdamW(groups(), lr=other["lr"], betas=other["betas"], eps=other["eps"])
    elif inner == "sgd":
        opt = torch.optim.SGD(groups(), lr=other["lr"], momentum=other["momentum"],
                              nesterov=other["nesterov"], dampening=other["dampening"])
    else:
        head = output_layer(model, example)
        to_muon = {n for n, p in model.named_parameters()
                   if p.requires_grad and p.ndim == 2 and n not in head}
        if not to_muon:
            raise ValueError("torch.optim.Muon takes 2-D weights only, and this model has none "
                             "but its output layer (convolutions are 4-D): nothing for Muon to "
                             "train; use adamw or sgd")
        muon = torch.optim.Muon(groups(lambda n, p: n in to_muon), lr=other["lr"],
                                momentum=other["momentum"], nesterov=other["nesterov"],
                                ns_steps=other["ns_steps"], **MUON_FIXED)
        rest = groups(lambda n, p: n not in to_muon)
        optimizers = [muon]
        if rest:
            optimizers.append(torch.optim.AdamW(rest, lr=other["lr"], betas=other["betas"],
                                                eps=other["eps"]))
        opt = Combined(optimizers)
    _check_reached(opt, {k for k in hyper if k.startswith("invariant_")})
    if policy is None:
        return opt, opt
    if not any(is_invariant(g.get("grouping")) for g in opt.param_groups):
        raise ValueError(f"a norm policy needs scale-invariant parameters, and discovery finds "
                         f"none in this model: '+{policy}' would do nothing; choose an optimizer "
                         "without '+<policy>' or a model with normalised weights")
    return NormPolicy(opt, policy, project=project, model=model, example_inputs=example), opt


def _check_reached(opt, keys: set[str]) -> None:
    """``ValueError`` when ``--invariant-lr``/``--invariant-weight-decay`` was set and no group
    takes it: every invariant group is part of a tensor, which torch.optim trains as one tensor
    with the other weights' settings (a fused qkv weight under QK-norm)."""
    whole = [g for g in opt.param_groups
             if is_invariant(g.get("grouping")) and split_part(g["grouping"])[1] is None]
    if keys and not whole:
        parts = sorted({g["grouping"] for g in opt.param_groups if is_invariant(g.get("grouping"))})
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(keys))
        raise ValueError(f"{flags}: no group takes it: the model's invariant groups are all parts "
                         f"of tensors ({', '.join(parts) or 'none'}), which torch.optim trains as "
                         "one tensor with the other weights' lr and weight decay; leave it unset")


def describe(optimizer) -> list[dict]:
    """The groups as built, for ``config.json``: per group the rule (torch class), grouping, lr,
    weight decay and parameter names (cancelled groups included: lr 0)."""
    inner = optimizer.optimizer if isinstance(optimizer, NormPolicy) else optimizer
    rules = inner.optimizers if isinstance(inner, Combined) else [inner]
    out = []
    for rule in rules:
        for g in rule.param_groups:
            out.append({"rule": f"torch.optim.{type(rule).__name__}", "grouping": g.get("grouping"),
                        "lr": float(g.get("initial_lr", g["lr"])),  # (as built: before any
                        "weight_decay": float(g["weight_decay"]),  # scheduler step, resumed too)
                        "params": list(g.get("param_names") or [])})
    return out
