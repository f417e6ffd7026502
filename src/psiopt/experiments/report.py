"""Tables and plots from run directories (``psiopt report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .train import read_metrics


def load_runs(root: str | Path) -> dict[str, list[list[dict]]]:
    """``{optimizer: [metrics of each seed]}`` for a compare directory or a single run."""
    root = Path(root)
    found: dict[str, list] = {}
    for path in sorted(root.glob("**/metrics.jsonl")):
        config = json.loads((path.parent / "config.json").read_text())
        metrics = read_metrics(path.parent)
        if metrics:
            found.setdefault(config["optimizer"], []).append(metrics)
    if not found:
        raise ValueError(f"no runs with metrics under {root}")
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def summary_table(runs: dict[str, list[list[dict]]]) -> str:
    """Markdown table sorted by final test accuracy (test loss for regression); runs that
    diverged are listed last with the epoch at which they stopped."""
    regression = all(e.get("test_acc") is None for seeds in runs.values() for m in seeds for e in m)
    key, scale = ("test_loss", 1) if regression else ("test_acc", 100)
    rows = []
    for name, seeds in runs.items():
        finals = [m[-1][key] for m in seeds]
        ok = [f for f in finals if f is not None]
        values = [e[key] for m in seeds for e in m if e.get(key) is not None]
        best = (min(values) if regression else max(values)) if values else None
        losses = [m[-1]["train_loss"] for m in seeds if m[-1]["train_loss"] is not None]
        seconds = _mean_std([e["seconds"] for m in seeds for e in m])[0]
        diverged = [m[-1]["epoch"] for m in seeds if m[-1].get("diverged")]
        rows.append((name, _mean_std(ok) if ok else None, best, losses, seconds, len(seeds),
                     max(len(m) for m in seeds), diverged))
    worst = math.inf if regression else -math.inf
    rows.sort(key=lambda r: (r[1][0] if r[1] else worst) * (1 if regression else -1))
    what = "test loss" if regression else "test acc (%)"
    lines = [f"| optimizer | final {what} | best {what} | final train loss | s/epoch | seeds | epochs |",
             "|---|---|---|---|---|---|---|"]
    for name, stats, best, losses, seconds, n_seeds, epochs, diverged in rows:
        final = f"{stats[0] * scale:.2f} ± {stats[1] * scale:.2f}" if stats else "—"
        if diverged:
            final += f" (diverged: {len(diverged)} run(s), epoch {min(diverged)})"
        best_text = f"{best * scale:.2f}" if best is not None else "—"
        loss_text = f"{_mean_std(losses)[0]:.4f}" if losses else "—"
        lines.append(f"| {name} | {final} | {best_text} | {loss_text} | {seconds:.2f} | {n_seeds} "
                     f"| {epochs} |")
    return "\n".join(lines)


def _band(ax, seeds: list[list[dict]], key: str, label: str) -> bool:
    n = max(len(m) for m in seeds)
    cols = [[m[i].get(key) for m in seeds if i < len(m) and m[i].get(key) is not None]
            for i in range(n)]
    points = [(i + 1, _mean_std(c)) for i, c in enumerate(cols) if c]
    if not points:
        return False
    epochs = [e for e, _ in points]
    mean = [m for _, (m, _) in points]
    line = ax.plot(epochs, mean, label=label, marker="o" if n < 15 else None)[0]
    if len(seeds) > 1:
        ax.fill_between(epochs, [m - s for _, (m, s) in points], [m + s for _, (m, s) in points],
                        color=line.get_color(), alpha=0.2)
    return True


def plot(runs: dict[str, list[list[dict]]], out_dir: str | Path) -> list[Path]:
    """Write ``accuracy.png`` (or ``test_loss.png``), ``train_loss.png``, ``effective_lr.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = all(e.get("test_acc") is None for seeds in runs.values() for m in seeds for e in m)
    specs = [("test_loss" if regression else "test_acc", "test loss" if regression else
              "test accuracy", regression),
             ("train_loss", "train loss", True),
             ("eff_lr", "effective learning rate (median over invariant layers)", True)]
    paths = []
    for key, title, log in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = [_band(ax, seeds, key, name) for name, seeds in runs.items()]
        if not any(drawn):
            plt.close(fig)
            continue
        ax.set(xlabel="epoch", ylabel=title, title=title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = Path(out_dir) / ("accuracy.png" if key == "test_acc" else f"{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(root: str | Path) -> tuple[Path, list[Path], str]:
    """Regenerate ``summary.md`` and the plots of a run directory; return paths and the table."""
    root = Path(root)
    runs = load_runs(root)
    table = summary_table(runs)
    config = json.loads(next(root.glob("**/config.json")).read_text())
    header = (f"# {config['dataset']} / {config['model']}\n\n"
              f"Budget: {len(next(iter(runs.values()))[0])} epochs, batch {config['batch_size']}, "
              f"subset {config['subset']}; seeds per optimizer as listed.\n\n")
    (root / "summary.md").write_text(header + table + "\n")
    return root / "summary.md", plot(runs, root), table
