"""Parameter groups for any optimizer: torch.optim (SGD, AdamW, Adafactor, Muon), timm's factory,
LARS-style optimizers, Lightning, Hugging Face.

Every training codebase decides by hand which parameters get weight decay: timm's
``weight_decay_exclude_1d`` (``ndim <= 1`` or a name ending in ``.bias``, plus the model's
``no_weight_decay()`` names), REQ's ``p.dim() > 1``, Muon's "2-D weights".  psiopt knows which
parameters are scale-invariant (:func:`~psiopt.optim.discovery.find_scale_invariant`), so it can
place weight decay by what it does:

* on an **invariant** weight, weight decay does not change the function; it shrinks ‖w‖ and so
  raises the effective learning rate η/‖w‖² (Arora et al. 2019, §2.5; Kosson et al. 2024): it is
  an effective-learning-rate control, ``invariant_weight_decay`` (default: ``weight_decay``);
* a **cancelled** parameter (a bias a normalisation removes) has no effect at all: its gradient
  is rounding noise, so it goes to a group of its own with ``lr=0`` and no weight decay (in the
  optimizer, so that ``zero_grad`` and GradScaler's ``unscale_`` reach its gradient; a scheduler
  that sets ``lr`` outright, ``OneCycleLR``, moves it, to no effect on the network);
* the **other** parameters follow timm's convention: ``weight_decay`` on tensors of two or more
  dimensions, none on gains, biases and the model's ``no_weight_decay()`` names.

The groups carry only ``params``, ``param_names``, ``weight_decay``, ``grouping`` (a string:
``None`` for the other parameters) and, for the cancelled group, ``lr``, which every
``torch.optim`` optimizer accepts and saves in its ``state_dict``.  ``select`` keeps the
parameters a given optimizer takes, e.g. Muon's 2-D weights, and its complement the rest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from torch import nn

from .discovery import _check_mapping, find_scale_invariant
from .geometry import CANCELLED, is_invariant, split_part


def _no_weight_decay(model: nn.Module) -> set[str]:
    """timm's ``model.no_weight_decay()`` names (of the model and of its submodules)."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            out |= {f"{prefix}.{n}" if prefix else n for n in names()}
    return out


def optimizer_groups(model: nn.Module, example_inputs=None, *, mapping: dict | None = None,
                     weight_decay: float = 0.0, invariant_weight_decay: float | None = None,
                     select: Callable[[str, nn.Parameter], bool] | None = None) -> list[dict]:
    """torch-style parameter groups for any optimizer (see the module docstring): invariant
    weights (one group per grouping, ``invariant_weight_decay``), the other weights of two or
    more dimensions (``weight_decay``), gains, biases and ``no_weight_decay()`` names (no decay),
    then the cancelled parameters (``lr=0``, no decay).  Frozen parameters are left out.

    ``mapping`` replaces discovery (``{name: grouping}``, as :func:`find_scale_invariant`
    returns); ``select(name, param)`` keeps only the parameters it accepts (e.g.
    ``lambda n, p: p.ndim == 2`` for ``torch.optim.Muon``; pass the complement to the optimizer
    of the rest).  Empty groups are dropped.

    >>> groups = optimizer_groups(model, x, weight_decay=0.05)          # doctest: +SKIP
    >>> opt = torch.optim.AdamW(groups, lr=1e-3)                        # doctest: +SKIP
    """
    for name, value in (("weight_decay", weight_decay), ("invariant_weight_decay", invariant_weight_decay)):
        if value is None and name == "invariant_weight_decay":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"invalid {name}: {value!r} (must be a finite number >= 0)")
    if mapping is None:
        if example_inputs is None:
            raise ValueError("optimizer_groups needs example_inputs (or an explicit mapping)")
        mapping = find_scale_invariant(model, example_inputs)
    params = _check_mapping(model, mapping)  # names and groupings
    invariant_decay = weight_decay if invariant_weight_decay is None else invariant_weight_decay
    excluded = _no_weight_decay(model)
    buckets: dict = {}
    for name, p in params.items():
        grouping = mapping.get(name)
        if not p.requires_grad or (select is not None and not select(name, p)):
            continue
        if grouping == CANCELLED:
            key = (CANCELLED, 0.0)
        elif is_invariant(grouping) and split_part(grouping)[1] is None:
            key = (grouping, float(invariant_decay))
        else:  # a part invariant (or cancelled): the tensor's other rows are ordinary ones
            part = grouping if is_invariant(grouping) else None
            ordinary = p.ndim <= 1 or name.endswith(".bias") or name in excluded
            key = (part, 0.0 if ordinary else float(weight_decay))
        bucket = buckets.setdefault(key, {"params": [], "param_names": []})
        bucket["params"].append(p)
        bucket["param_names"].append(name)
    rank = {CANCELLED: 2, None: 1}
    order = sorted(buckets, key=lambda k: (rank.get(k[0], 0), -k[1], str(k[0])))
    return [{**buckets[k], "weight_decay": k[1], "grouping": k[0],
             **({"lr": 0.0} if k[0] == CANCELLED else {})} for k in order]
