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
    """Markdown table sorted by final test accuracy (test loss for regression)."""
    regression = next(iter(runs.values()))[0][-1]["test_acc"] is None
    rows = []
    for name, seeds in runs.items():
        final = [m[-1]["test_loss" if regression else "test_acc"] for m in seeds]
        best = [min(e["test_loss"] for e in m) if regression else max(e["test_acc"] for e in m)
                for m in seeds]
        train_loss = _mean_std([m[-1]["train_loss"] for m in seeds])[0]
        seconds = _mean_std([e["seconds"] for m in seeds for e in m])[0]
        rows.append((name, _mean_std(final), max(best) if not regression else min(best),
                     train_loss, seconds, len(seeds), len(seeds[0])))
    rows.sort(key=lambda r: r[1][0], reverse=not regression)
    scale = 1 if regression else 100
    what = "test loss" if regression else "test acc (%)"
    lines = [f"| optimizer | final {what} | best {what} | final train loss | s/epoch | seeds | epochs |",
             "|---|---|---|---|---|---|---|"]
    for name, (mean, std), best, train_loss, seconds, n_seeds, epochs in rows:
        lines.append(f"| {name} | {mean * scale:.2f} ± {std * scale:.2f} | {best * scale:.2f} | "
                     f"{train_loss:.4f} | {seconds:.2f} | {n_seeds} | {epochs} |")
    return "\n".join(lines)


def _band(ax, seeds: list[list[dict]], key: str, label: str) -> bool:
    series = [[e.get(key) for e in m] for m in seeds]
    n = min(len(s) for s in series)
    cols = [[s[i] for s in series if s[i] is not None] for i in range(n)]
    if not all(cols):
        return False
    stats = [_mean_std(c) for c in cols]
    epochs = list(range(1, n + 1))
    mean = [m for m, _ in stats]
    line = ax.plot(epochs, mean, label=label, marker="o" if n < 15 else None)[0]
    if len(seeds) > 1:
        ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats],
                        color=line.get_color(), alpha=0.2)
    return True


def plot(runs: dict[str, list[list[dict]]], out_dir: str | Path) -> list[Path]:
    """Write ``accuracy.png`` (or ``test_loss.png``), ``train_loss.png``, ``effective_lr.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = next(iter(runs.values()))[0][-1]["test_acc"] is None
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
