"""Training loop with diagnostics, run directories and exact resume.

A run directory holds ``config.json`` (every setting and the environment), ``metrics.jsonl`` (one
JSON object per epoch) and ``checkpoint.pt`` (written atomically each epoch: model, optimizer,
scheduler, RNG state and metrics).  Shuffling and augmentation draw from a generator seeded by
``(seed, epoch)``, so a resumed run gives exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..optim.diagnostics import StepProbe, summarize
from ..optim.discovery import param_groups, rescale_rows_
from ..optim.geometry import is_invariant, rows
from ..optim.registry import create_optimizer
from .data import batches, load_dataset
from .models import create_model, glorot_

INITS = ("default", "glorot", "unbalanced")


@dataclass
class RunConfig:
    """Every setting of one training run (what ``psiopt train`` takes)."""

    dataset: str = "synthetic"
    model: str = "mlp-bn"
    optimizer: str = "sgd"
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    subset: int | None = None
    hyper: dict = field(default_factory=dict)  # optimizer keywords (lr, invariant_lr, ...)
    milestones: list = field(default_factory=list)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    init: str = "default"
    model_kwargs: dict = field(default_factory=dict)
    data_dir: str | None = None
    threads: int | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                least = 0 if name == "epochs" else 1
                raise ValueError(f"invalid {name}: {getattr(self, name)} (must be at least {least})")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose from {', '.join(INITS)}")


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"psiopt": __version__, "git_commit": commit, "torch": torch.__version__,
            "python": sys.version.split()[0], "machine": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def initialise(model: nn.Module, how: str, groups: list[dict]) -> None:
    """``glorot``: Glorot-uniform weights (Arora App. D); ``unbalanced``: Yi Fig. 1, the first
    half of the rows of every invariant weight ×1e4, the second half ×1e-4."""
    if how == "glorot":
        glorot_(model)
    elif how == "unbalanced":  # an equivalent network: running statistics follow the rows
        for group in groups:
            if not is_invariant(group.get("grouping")):
                continue
            links = group.get("norm_stats") or [()] * len(group["params"])
            for p, stats in zip(group["params"], links):
                v = rows(p, group["grouping"])
                factors = torch.full((v.shape[0],) + (1,) * (v.dim() - 1), 1e-4,
                                     dtype=v.dtype, device=v.device)
                factors[: max(v.shape[0] // 2, 1)] = 1e4
                rescale_rows_(v, factors, stats)


def _loss(out, y, regression: bool):
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model, x, y, regression: bool, batch_size: int = 1024) -> tuple[float, float | None]:
    model.eval()
    loss, correct = torch.zeros(()), torch.zeros(())
    for xb, yb in batches(x, y, batch_size):
        out = model(xb)
        loss += _loss(out, yb, regression) * len(xb)
        if not regression:
            correct += (out.argmax(1) == yb).sum()
    model.train()
    return loss.item() / len(x), None if regression else correct.item() / len(x)


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch",
                disable=not sys.stderr.isatty() if enabled is None else not enabled)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, path)


def build(config: RunConfig):
    """Dataset, model, optimizer and scheduler for ``config`` (seeded)."""
    config.validate()
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir, config.subset, seed=config.seed)
    model = create_model(config.model, in_channels=data.in_channels,
                         num_classes=data.num_classes or 1, image_size=data.image_size,
                         **config.model_kwargs)
    example = data.train_x[:16]
    if config.init == "glorot":
        initialise(model, "glorot", [])
    elif config.init == "unbalanced":  # before the optimizer: sphere methods normalise rows there
        initialise(model, "unbalanced", param_groups(model, example))
    optimizer = create_optimizer(model, config.optimizer, example, **config.hyper)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones),
                                                     config.gamma)
    return data, model, optimizer, scheduler


def train(config: RunConfig, out_dir: str | Path, resume: bool = False,
          progress: bool | None = None, log=print) -> list[dict]:
    """Train per ``config``, writing the run directory ``out_dir``; return the metrics."""
    config = replace(config, threads=config.threads or os.cpu_count() or 1)  # recorded
    torch.set_num_threads(config.threads)
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    if out.exists() and (out / "metrics.jsonl").exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    data, model, optimizer, scheduler = build(config)
    metrics, start = [], 0
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        metrics, start = ckpt["metrics"], ckpt["epoch"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**asdict(config), "environment": environment()},
                                                indent=2))
    _write_metrics(out / "metrics.jsonl", metrics)
    regression = data.task == "regression"
    probe = StepProbe(optimizer)
    for epoch in range(start, config.epochs):
        if metrics and metrics[-1].get("diverged"):
            break
        started = time.perf_counter()
        try:
            record = _epoch(config, data, model, optimizer, probe, epoch, progress)
        except FloatingPointError as e:  # raised by psiopt optimizers on a non-finite gradient
            record = {"train_loss": None, "train_acc": None, "error": str(e)}
        scheduler.step()
        seconds = time.perf_counter() - started
        diverged = record["train_loss"] is None or not math.isfinite(record["train_loss"])
        if diverged:
            record.update(test_loss=None, test_acc=None, diverged=True)
        else:
            record["test_loss"], record["test_acc"] = evaluate(model, data.test_x, data.test_y,
                                                               regression)
        record = {"epoch": epoch + 1, **record, "seconds": seconds,
                  "lr": optimizer.param_groups[0]["lr"]}
        metrics.append(record)
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                      "epoch": epoch + 1, "metrics": metrics}, ckpt_path)
        _write_metrics(out / "metrics.jsonl", metrics)
        head = f"[{config.optimizer} seed {config.seed}] epoch {epoch + 1}/{config.epochs}:"
        if diverged:
            log(f"{head} diverged (non-finite loss or gradient); training of this run stops")
            continue
        acc = "" if regression else f" test acc {record['test_acc']:.4f}"
        log(f"{head} train loss {record['train_loss']:.4f} test loss {record['test_loss']:.4f}"
            f"{acc} ({seconds:.1f} s)")
    return metrics


def _epoch(config, data, model, optimizer, probe, epoch, progress) -> dict:
    """One pass over the training set; returns the epoch's training metrics."""
    regression = data.task == "regression"
    gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    loss_sum, correct, grad_sq, seen = torch.zeros(()), torch.zeros(()), torch.zeros(()), 0
    n_batches = -(-len(data.train_x) // config.batch_size)
    layers: dict = {}
    started = time.perf_counter()
    bar = _progress(n_batches, f"{config.optimizer} epoch {epoch + 1}/{config.epochs}", progress)
    for i, (xb, yb) in enumerate(batches(data.train_x, data.train_y, config.batch_size, gen,
                                         augment=data.augment)):
        out = model(xb)
        loss = _loss(out, yb, regression)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_sq += torch.stack(torch._foreach_norm(grads)).square().sum()
        last = i == n_batches - 1
        if last:
            probe.before()
        optimizer.step()
        if last:
            layers = probe.after()
        with torch.no_grad():
            loss_sum += loss.detach() * len(xb)
            if not regression:
                correct += (out.argmax(1) == yb).sum()
        seen += len(xb)
        if not bar.disable and (i % 20 == 0 or last):
            rate = seen / (time.perf_counter() - started)
            shown = {"loss": f"{loss.item():.3f}", "samples_per_s": f"{rate:.0f}"}
            if not regression:
                shown["acc"] = f"{correct.item() / seen:.3f}"
            bar.set_postfix(shown)
        bar.update()
    bar.close()
    return {"train_loss": loss_sum.item() / seen,
            "train_acc": None if regression else correct.item() / seen,
            "samples_per_s": seen / (time.perf_counter() - started),
            "grad_norm": (grad_sq.item() / n_batches) ** 0.5, **summarize(layers), "layers": layers}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["RunConfig", "train", "build", "evaluate", "read_metrics"]
