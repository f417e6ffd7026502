"""Tables and plots from run directories (``psiopt report``)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

from .train import RunError, read_metrics, read_run_config

#: hyperparameters shown in the settings table (the others are listed when set)
_SHOWN = ("lr", "momentum", "weight_decay")
#: (how a step is computed, not what it computes: never listed)
_QUIET = {"foreach", "check_finite", "differentiable", "fused", "capturable"}


def split_of(config: dict) -> str:
    """``"val"`` for a run evaluated on a held-out part of the training set, else ``"test"``."""
    return "val" if config.get("validation") else "test"


def load_runs(root: str | Path, split: str | None = None) -> dict[str, list[tuple[dict, list[dict]]]]:
    """``{optimizer: [(config, metrics) of each seed]}`` for a compare directory or one run.

    ``split``: only the runs evaluated on that set (``"test"`` or ``"val"``); by default the
    test-set runs, or the validation runs where there are no others (an lr selection).
    """
    root = Path(root)
    found: dict[str, list] = {}
    for path in sorted(root.glob("**/metrics.jsonl")):
        config = read_run_config(path.parent / "config.json")
        metrics = read_metrics(path.parent)
        if metrics:
            found.setdefault(split_of(config), {}).setdefault(config["optimizer"], []).append(
                (config, metrics))
    split = split or ("test" if "test" in found or not found else "val")
    if not found.get(split):
        raise RunError(f"no runs with metrics under {root}"
                       + (" evaluated on the validation split" if split == "val" else ""))
    return _told_apart(found[split])


def _told_apart(runs: dict) -> dict:
    """Runs of one optimizer with other hyperparameters (``train`` runs into one directory, an
    lr selection) as rows of their own, named by what differs (``sgd (lr=2)``), not averaged
    as seeds of one row."""
    out = {}
    for name, seeds in runs.items():
        kinds: dict[str, list] = {}
        for config, metrics in seeds:
            key = json.dumps([config.get("hyper"), config.get("optimizer_settings")], sort_keys=True,
                             default=str)
            kinds.setdefault(key, []).append((config, metrics))
        if len(kinds) == 1:
            out[name] = seeds
            continue
        hypers = [group[0][0].get("hyper") or {} for group in kinds.values()]
        differ = sorted({k for h in hypers for k in h
                         if len({json.dumps(x.get(k), default=str) for x in hypers}) > 1})
        for i, (hyper, group) in enumerate(zip(hypers, kinds.values())):
            label = ", ".join(f"{k}={hyper[k]:g}" if isinstance(hyper.get(k), float)
                              else f"{k}={hyper.get(k, '—')}" for k in differ)
            out[f"{name} ({label or f'settings {i + 1}'})"] = group
    return out


def _split(runs) -> str:
    return split_of(next(iter(runs.values()))[0][0])


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _regression(runs) -> bool:
    acc = f"{_split(runs)}_acc"
    return all(e.get(acc) is None for seeds in runs.values() for _, m in seeds for e in m)


def _ranked(runs) -> list[str]:
    """Optimizer names, best final test metric first (diverged runs last)."""
    regression = _regression(runs)
    key = f"{_split(runs)}_{'loss' if regression else 'acc'}"

    def score(name):
        finals = [m[-1][key] for _, m in runs[name] if m[-1].get(key) is not None]
        if not finals:
            return math.inf
        mean = _mean_std(finals)[0]
        return mean if regression else -mean

    return sorted(runs, key=score)


def summary_table(runs) -> str:
    """Markdown table in rank order of the final test accuracy (test loss for regression); runs
    that diverged are listed with the epoch at which they stopped."""
    regression, split = _regression(runs), _split(runs)
    key, scale = (f"{split}_loss", 1) if regression else (f"{split}_acc", 100)
    what = {"test": "test", "val": "validation"}[split] + (" loss" if regression else " acc (%)")
    counted = any(m[-1].get("eps_groups") for seeds in runs.values() for _, m in seeds)
    extra = " groups under eps |" if counted else ""  # the variance of their input (last batch)
    lines = [f"| optimizer | final {what} | best {what} | final train loss | final grad norm | "
             f"s/epoch | seeds | epochs |{extra}", "|---|---|---|---|---|---|---|---|" + "---|" * counted]
    for name in _ranked(runs):
        seeds = [m for _, m in runs[name]]
        ok = [m[-1][key] for m in seeds if m[-1].get(key) is not None]
        values = [e[key] for m in seeds for e in m if e.get(key) is not None]
        best = (min(values) if regression else max(values)) if values else None
        losses = [m[-1]["train_loss"] for m in seeds if m[-1]["train_loss"] is not None]
        grads = [m[-1]["grad_norm"] for m in seeds if m[-1].get("grad_norm") is not None
                 and math.isfinite(m[-1]["grad_norm"])]
        seconds = _mean_std([e["seconds"] for m in seeds for e in m])[0]
        diverged = [m[-1]["epoch"] for m in seeds if m[-1].get("diverged")]
        final = f"{_mean_std(ok)[0] * scale:.2f} ± {_mean_std(ok)[1] * scale:.2f}" if ok else "—"
        fresh = [m[-1].get(key + "_bn_recomputed") for m in seeds]
        fresh = [f for f in fresh if f is not None]
        if fresh and ok:  # runs from before the BN-recomputed evaluation existed lack it: say so
            part = f", {len(fresh)} of {len(seeds)} seeds" if len(fresh) < len(seeds) else ""
            final += f" (BN recomputed: {_mean_std(fresh)[0] * scale:.2f}{part})"
        if diverged:
            final += f" (diverged: {len(diverged)} run(s), epoch {min(diverged)})"
        best_text = f"{best * scale:.2f}" if best is not None else "—"
        loss_text = f"{_mean_std(losses)[0]:.4f}" if losses else "—"
        grad_text = f"{_mean_std(grads)[0]:.3g} ± {_mean_std(grads)[1]:.2g}" if grads else "—"
        row = f"| {name} | {final} | {best_text} | {loss_text} | {grad_text} | {seconds:.2f} | " \
              f"{len(seeds)} | {max(len(m) for m in seeds)} |"
        if counted:
            below = [m[-1]["eps_below"] for m in seeds if m[-1].get("eps_groups")]
            total = max((m[-1].get("eps_groups") or 0) for m in seeds)
            row += f" {_mean_std(below)[0]:.1f} of {total} |" if below else " — |"
        lines.append(row)
    return "\n".join(lines)


def _side(settings: dict | None, key: str) -> str:
    if not settings:
        return "—"
    inv, other = (settings[side].get(key) for side in ("invariant", "other"))
    inv, other = ("—" if v is None else f"{v:g}" for v in (inv, other))
    return inv if inv == other else f"{inv} / {other}"


def settings_table(runs) -> str:
    """What each optimizer ran with: hyperparameters (invariant / other groups when they
    differ, as the run recorded them), seeds, and any other setting that is not a default."""
    lines = ["| optimizer | lr | momentum | weight decay | other settings | seeds |",
             "|---|---|---|---|---|---|"]
    for name in _ranked(runs):
        config = runs[name][0][0]
        settings = config.get("optimizer_settings")
        extra = []
        if settings:
            inv, other = settings["invariant"], settings["other"]
            for k in dict.fromkeys([*inv, *other]):
                if k in _SHOWN or k in _QUIET or not (inv.get(k) or other.get(k)):
                    continue
                same = inv.get(k) == other.get(k)
                extra.append(f"{k}={inv.get(k)}" if same else f"{k}={inv.get(k)} / {other.get(k)}")
        seeds = ", ".join(str(c["seed"]) for c, _ in runs[name])
        lines.append(f"| {name} | {_side(settings, 'lr')} | {_side(settings, 'momentum')} | "
                     f"{_side(settings, 'weight_decay')} | {'; '.join(extra) or '—'} | {seeds} |")
    return "\n".join(lines)


def _setting(config: dict) -> str:
    """One line: data, model, budget and schedule of a run."""
    schedule = (f"lr ×{config['gamma']:g} at epochs {', '.join(map(str, config['milestones']))}"
                if config["milestones"] else "constant lr")
    n, held = config.get("subset"), config.get("validation")
    # the numbers of samples used, as the run recorded them (runs made before it did: as asked)
    samples = config.get("samples") or {}
    trained = samples.get("train", n)
    more = f" (--subset {n}: the set holds fewer)" if n and trained is not None and trained < n else ""
    if held:
        subset = (f", {'first ' + str(trained) if n else 'all other'} training samples{more}, "
                  f"evaluated on the last {samples.get('validation', held)} held out "
                  "(validation split)")
    elif n:
        subset = (f", {'first' if not more else 'all'} {trained} training and "
                  f"{samples.get('test', max(n // 5, 100))} test samples{more}")
    else:
        subset = ""
    options = "".join(f", {k}={v}" for k, v in sorted((config.get("model_kwargs") or {}).items()))
    grouping = f", every invariant weight grouped by {config['grouping']}" \
        if config.get("grouping") else ""
    if config.get("exact_norms"):
        grouping += ", exact normalisation layers (eps·‖w‖²)"
    return (f"{config['dataset']} / {config['model']}{options}: {config['epochs']} epochs, batch "
            f"{config['batch_size']}{subset}, {schedule}, init {config['init']}{grouping}, "
            f"{config.get('threads', '?')} thread(s){_device(config)}")


def _device(config: dict) -> str:
    """Where a run trained, as its record says (runs made before the device was recorded: on the
    CPU), its autocast and its memory format."""
    env = config.get("environment") or {}
    where = env.get("device") or config.get("device") or "cpu"
    gpu = f" ({env['gpu']})" if env.get("gpu") else ""
    amp = ", bfloat16 autocast" if config.get("amp") == "bf16" else ""
    layout = ", channels_last" if config.get("channels_last") else ""
    return f" on {where}{gpu}{amp}{layout}"


def _band(ax, seeds: list[list[dict]], key: str, label: str, scale: float) -> list[float]:
    """Plot the mean (and spread) over seeds per epoch; return the plotted means."""
    n = max(len(m) for m in seeds)
    cols = [[m[i].get(key) * scale for m in seeds if i < len(m) and m[i].get(key) is not None]
            for i in range(n)]
    points = [(i + 1, _mean_std(c)) for i, c in enumerate(cols) if c]
    if not points:
        return []
    epochs = [e for e, _ in points]
    mean = [m for _, (m, _) in points]
    line = ax.plot(epochs, mean, label=label, marker="o" if n < 15 else None)[0]
    if len(seeds) > 1:
        ax.fill_between(epochs, [m - s for _, (m, s) in points], [m + s for _, (m, s) in points],
                        color=line.get_color(), alpha=0.2)
    return mean


def plot(runs, out_dir: str | Path) -> list[Path]:
    """Write ``accuracy.png`` (or ``test_loss.png``), ``train_loss.png``, ``eff_lr.png``: mean
    and spread over seeds per epoch, legend in rank order, lr drops marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    regression, split = _regression(runs), _split(runs)
    config = next(iter(runs.values()))[0][0]
    what = {"test": "test", "val": "validation"}[split]
    specs = [(f"{split}_loss", f"{what} loss", True, 1) if regression else
             (f"{split}_acc", f"{what} accuracy (%)", False, 100),
             ("train_loss", "train loss", True, 1),
             ("grad_norm", "gradient norm (mean over the epoch's batches)", True, 1),
             ("eff_lr", "effective learning rate (median over invariant layers)", True, 1),
             ("angle", "angular update per step, radians (median over invariant layers)", True, 1)]
    paths = []
    for key, what, log, scale in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        drawn = [v for name in _ranked(runs) for v in _band(ax, [m for _, m in runs[name]], key, name, scale)]
        if not drawn:
            plt.close(fig)
            continue
        for i, milestone in enumerate(config["milestones"]):
            ax.axvline(milestone + 0.5, color="grey", ls=":", lw=1,
                       label=f"lr ×{config['gamma']:g}" if i == 0 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=what)
        ax.set_title("\n".join([what, *textwrap.wrap(_setting(config), 90)]), fontsize=8)
        if log and min(drawn) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = Path(out_dir) / ("accuracy.png" if key.endswith("_acc") else f"{key}.png")
        fig.tight_layout()
        try:
            write_atomically(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def selection_table(root: Path) -> str:
    """The lr selection recorded in ``root/selection.json`` as a markdown section ('' if none)."""
    path = root / "selection.json"
    if not path.exists():
        return ""
    try:
        record = json.loads(path.read_text())
        spec, table, chosen = record["protocol"], record["final_val"], record["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: cannot be read ({e})") from None
    lrs = list(next(iter(table.values())))
    how = (f"each optimizer at lr {', '.join(lrs)}, seed 0, {spec['epochs']} epochs "
           f"{'with the lr schedule' if spec.get('milestones') else 'at a constant lr'}, trained on "
           f"{'the first ' + str(spec['subset']) if spec.get('subset') else 'all other'} training "
           f"samples and evaluated on the last {spec['validation']} (held out); {record['metric']}")
    lines = [f"| optimizer | {' | '.join(lrs)} | chosen |", "|---" * (len(lrs) + 2) + "|"]
    for name, row in table.items():
        cells = ["diverged" if row[lr] is None else f"{row[lr]:.4g}" for lr in lrs]
        lines.append(f"| {name} | {' | '.join(cells)} | {chosen.get(name, '—'):g} |")
    return "\n## Learning-rate selection\n\n" + how + "\n\n" + "\n".join(lines) + "\n"


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: the file is whole or as it was.  A failed
    write (read-only directory, ``path`` a directory, disk full) is a :class:`RunError` naming
    ``path``; the temporary file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RunError(f"{path}: cannot be written ({e.strerror or e}); make {path.parent} "
                       "writable (and move away anything in that file's place), then run "
                       f"psiopt report {path.parent}") from None


def _header(runs) -> str:
    """The settings of the runs: one line when they share them, else each setting with the
    optimizers (and seeds) that ran with it."""
    users: dict[str, list[str]] = {}
    for name, seeds in runs.items():
        for config, _ in seeds:
            users.setdefault(_setting(config), []).append(f"{name} seed {config['seed']}")
    if len(users) == 1:
        return f"# {next(iter(users))}\n\n"
    return "# Runs with different settings\n\n" + "".join(
        f"* {setting}: {', '.join(runs_)}\n" for setting, runs_ in sorted(users.items())) + "\n"


def write_report(root: str | Path) -> tuple[Path, list[Path], str]:
    """Regenerate ``summary.md`` and the plots of a run directory; return paths and the table."""
    root = Path(root)
    runs = load_runs(root)
    table = summary_table(runs)
    text = (_header(runs) + "## Results\n\n" + table
            + "\n\n## Settings (invariant / other groups)\n\n" + settings_table(runs) + "\n"
            + selection_table(root))
    write_atomically(root / "summary.md", lambda tmp: tmp.write_text(text))
    return root / "summary.md", plot(runs, root), table
