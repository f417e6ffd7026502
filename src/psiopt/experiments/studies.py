"""Experiments that are not a ``compare`` of final accuracies (recipes with a ``study``).

* ``thm4``: Roburin Theorem 4 in training: SGD+L2 (lr η, L2 λ, no momentum) from the model's raw
  rows against AdamG* built from the same (η, λ), on the same mini-batches; the largest angle
  between corresponding row directions over the iterations, for several ηλ.
* ``effective_lr``: the effective learning rate of the invariant layers measured from the steps
  (:mod:`psiopt.optim.diagnostics`) against Roburin's Theorem 2 / Table 1 and Arora's ``η/‖w‖²``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..optim.diagnostics import StepProbe, group_of
from ..optim.geometry import is_invariant, norm, rows
from ..optim.registry import create_optimizer
from .data import batches, load_dataset
from .models import create_model


def _max_angle(a: torch.nn.Module, b: torch.nn.Module, groups: list[dict]) -> float:
    """Largest angle (degrees) between corresponding rows of ``a`` and ``b``'s invariant weights."""
    worst = 0.0
    for group in groups:
        if not is_invariant(group.get("grouping")):
            continue
        for name in group["param_names"]:
            pa, pb = (rows(m.get_parameter(name).detach(), group["grouping"]).flatten(1)
                      for m in (a, b))
            ua, ub = F.normalize(pa, dim=1), F.normalize(pb, dim=1)
            angle = 2 * torch.asin(((ua - ub).norm(dim=1) / 2).clamp(max=1))  # exact near 0
            worst = max(worst, float(torch.rad2deg(angle).max()))
    return worst


def _set_eps(model: torch.nn.Module, eps: float | None) -> torch.nn.Module:
    for m in model.modules():
        if eps is not None and hasattr(m, "eps") and hasattr(m, "running_var"):
            m.eps = eps
    return model


def thm4(out: Path, dataset: str, model: str, lrs: list[float], decays: list[float], steps: int,
         subset: int | None, bn_eps: list = (None,), batch_size: int = 128, seed: int = 0,
         data_dir=None) -> str:
    """Angle between SGD+L2 and AdamG* row directions for every (BatchNorm eps, η, λ); writes
    ``thm4.json`` and ``thm4.png`` and returns a markdown table.  float64 throughout."""
    torch.manual_seed(seed)
    data = load_dataset(dataset, data_dir, subset, seed=seed)
    x, y = data.train_x.double(), data.train_y
    base = create_model(model, in_channels=data.in_channels, num_classes=data.num_classes,
                        image_size=data.image_size).double()
    marks = sorted({t for t in (1, 10, 100, 1000, 10_000, steps) if t <= steps})
    results = []
    for eps in bn_eps:
        for lr in lrs:
            for decay in decays:
                angles = _thm4_pair(_set_eps(copy.deepcopy(base), eps), x, y, lr, decay, steps,
                                    marks, batch_size, seed)
                results.append({"bn_eps": eps, "lr": lr, "weight_decay": decay, "angles": angles})
    out.mkdir(parents=True, exist_ok=True)
    (out / "thm4.json").write_text(json.dumps(results, indent=2))
    _plot_thm4(out / "thm4.png", results)
    lines = ["| BN eps | η | λ | ηλ | " + " | ".join(f"step {t}" for t in marks) + " |",
             "|" + "---|" * (len(marks) + 4)]
    for r in results:
        eps = "default" if r["bn_eps"] is None else f"{r['bn_eps']:g}"
        lines.append(f"| {eps} | {r['lr']:g} | {r['weight_decay']:g} | "
                     f"{r['lr'] * r['weight_decay']:.0e} | "
                     + " | ".join(f"{r['angles'][t]:.1e}°" for t in marks) + " |")
    return "\n".join(lines)


def _thm4_pair(model, x, y, lr, decay, steps, marks, batch_size, seed) -> dict[int, float]:
    sgd_model, star_model = model, copy.deepcopy(model)
    sgd = create_optimizer(sgd_model, "sgd", x[:16], lr=lr, momentum=0.0, weight_decay=decay,
                           invariant_weight_decay=decay)
    star = create_optimizer(star_model, "adamg-star", x[:16], lr=lr, weight_decay=decay)
    angles, t, epoch = {}, 0, 0
    while t < steps:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        for xb, yb in batches(x, y, batch_size, gen, min_size=2):
            for m, opt in ((sgd_model, sgd), (star_model, star)):
                opt.zero_grad()
                F.cross_entropy(m(xb), yb).backward()
                opt.step()
            t += 1
            if t in marks:
                angles[t] = _max_angle(sgd_model, star_model, sgd.param_groups)
            if t == steps:
                break
        epoch += 1
    return angles


def _plot_thm4(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for r in results:
        steps = sorted(r["angles"])
        eps = "default" if r["bn_eps"] is None else f"{r['bn_eps']:g}"
        ax.plot(steps, [max(r["angles"][t], 1e-16) for t in steps], marker="o",
                ls="-" if r["bn_eps"] is None else "--",
                label=f"η={r['lr']:g}, λ={r['weight_decay']:g}, BN eps {eps}")
    ax.set(xscale="log", yscale="log", xlabel="iteration",
           ylabel="largest angle between row directions (°)")
    ax.set_title("SGD+L2 vs AdamG* (Roburin Thm. 4), from raw rows", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def effective_lr(out: Path, dataset: str, model: str, optimizers: list[str], steps: int,
                 subset: int | None, batch_size: int = 128, seed: int = 0, data_dir=None) -> str:
    """Median over the invariant layers (of the median over rows) of the measured effective lr,
    Roburin's Theorem 2 value and Arora's ``η/‖w‖²`` at a few iterations.  ``optimizers`` are
    registry names with their defaults, or ``"name:key=value,..."`` (e.g. ``"sgd:momentum=0"``).
    The measured value is the step per unit of the *current* spherical gradient; Theorem 2's is
    per unit of the step's own direction (with momentum, the buffer), so the two agree at the
    first step and differ by about the momentum's accumulation after it."""
    data = load_dataset(dataset, data_dir, subset, seed=seed)
    marks = sorted({t for t in (1, 10, 100, 1000, steps) if t <= steps})
    results = {}
    for name in optimizers:
        torch.manual_seed(seed)
        net = create_model(model, in_channels=data.in_channels, num_classes=data.num_classes,
                           image_size=data.image_size)
        base_name, _, given = name.partition(":")  # "sgd:momentum=0": registry name + settings
        hyper = {k: float(v) for k, v in (item.split("=") for item in given.split(",") if item)}
        opt = create_optimizer(net, base_name, data.train_x[:16], **hyper)
        probe, rows_at, t, epoch = StepProbe(opt), {}, 0, 0
        while t < steps:
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            for xb, yb in batches(data.train_x, data.train_y, batch_size, gen, min_size=2):
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                t += 1
                if t in marks:
                    arora = _median([group_of(opt, p)["lr"] / norm(rows(p.detach(), g)).square().median()
                                     for _, p, g in probe.layers])
                    probe.before()
                opt.step()
                if t in marks:
                    layers = probe.after().values()
                    rows_at[t] = {"measured": _median([e["eff_lr"] for e in layers]),
                                  "theorem2": _median([e.get("eff_lr_theorem2") for e in layers]),
                                  "arora": arora}
                if t == steps:
                    break
            epoch += 1
        results[name] = rows_at
    out.mkdir(parents=True, exist_ok=True)
    (out / "effective_lr.json").write_text(json.dumps(results, indent=2))
    lines = ["| optimizer | step | measured | Theorem 2 | η/‖w‖² | measured / Theorem 2 | "
             "measured / (η/‖w‖²) |", "|---|---|---|---|---|---|---|"]
    for name, rows_at in results.items():
        for t, r in rows_at.items():
            ratio = (f"{r['measured'] / r['theorem2']:.3f}" if r["theorem2"] else "—")
            th2 = f"{r['theorem2']:.3e}" if r["theorem2"] else "—"
            lines.append(f"| {name} | {t} | {r['measured']:.3e} | {th2} | {r['arora']:.3e} | "
                         f"{ratio} | {r['measured'] / r['arora']:.3f} |")
    return "\n".join(lines)


def _median(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(torch.tensor(values).median()) if values else None


STUDIES = {"thm4": thm4, "effective_lr": effective_lr}


def run_study(name: str, params: dict, out: Path) -> str:
    """Run study ``name`` with ``params`` into ``out``; write and return ``summary.md``'s text."""
    table = STUDIES[name](out, **params)
    text = (f"# {name}\n\nSettings: " + ", ".join(f"{k}={v}" for k, v in params.items())
            + "\n\n" + table + "\n")
    (out / "summary.md").write_text(text)
    return text


__all__ = ["run_study", "STUDIES", "thm4", "effective_lr"]
