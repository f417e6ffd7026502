"""Stress benchmark (not a test): long runs at an extreme learning rate, and kill -9 during training.

``steps``: 1e5 PSI-SGD steps at lr 10 on the invariant rows of a small BatchNorm MLP (the output
layer at the registry's lr; random data), in both modes
(``fixed_norm``, and the literal eq. 10 with Yi's overflow guard).  Every 1e4 steps: every
parameter and buffer finite, the largest invariant row norm, and whether the eval-mode network is
intact — BatchNorm's running variance against the variance of the current pre-activations (a
row rescaled without its statistics would be off by the square of the factor) and eval-mode
accuracy against accuracy with the statistics recomputed.

``kill``: ``psiopt train`` killed with SIGKILL at random moments (checkpoint every epoch), resumed
each time, then finished; its metrics and final weights must equal an uninterrupted run's bit for
bit.

    python scripts/stress.py steps --steps 100000
    python scripts/stress.py kill --kills 20 --out runs/stress-kill
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

import psiopt
from psiopt.experiments.train import read_checkpoint


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 4))


def _health(model, x, y) -> dict:
    finite = all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *model.buffers()])
    norms = max(float(model[i].weight.detach().norm(dim=1).max()) for i in (0, 3))  # invariant rows
    with torch.no_grad():  # pre-activation variance of each BN layer with the current weights
        ratios, h = [], x
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                ratios.append((m.running_var / h.var(0).clamp_min(1e-30)).log10().abs().max())
            h = m(h) if not isinstance(m, nn.BatchNorm1d) else F.batch_norm(
                h, None, None, m.weight, m.bias, True, 0.0, m.eps)
        model.eval()
        acc = float((model(x).argmax(1) == y).float().mean())
        fresh = copy.deepcopy(model)
        update_bn([x], fresh)
        fresh.eval()
        acc_fresh = float((fresh(x).argmax(1) == y).float().mean())
        model.train()
    return {"finite": finite, "max_row_norm": norms, "log10_var_ratio": float(max(ratios)),
            "eval_acc": acc, "recomputed_acc": acc_fresh}


def steps(n_steps: int, every: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, generator=gen)
    y = (x @ torch.randn(20, 4, generator=gen)).argmax(1)
    ok = True
    for fixed_norm in (True, False):
        torch.manual_seed(0)
        model = _net()
        opt = psiopt.create_optimizer(model, "psi-sgd", x[:64], invariant_lr=10.0,
                                      invariant_fixed_norm=fixed_norm)
        started = time.perf_counter()
        for step in range(1, n_steps + 1):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if step % every == 0:
                h = _health(model, x, y)
                ok &= h["finite"] and h["log10_var_ratio"] < 2
                print(f"fixed_norm={fixed_norm} step {step}: " + ", ".join(
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items())
                    + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return ok


def _train(out: Path, epochs: int, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "psiopt", "train", "--dataset", "synthetic", "--model", "mlp-bn",
            "--optimizer", "psi-sgdm", "--subset", "2048", "--batch-size", "64", "--epochs",
            str(epochs), "--checkpoint-seconds", "0", "--no-progress", "--out", str(out)]
    argv += ["--milestones", str(epochs // 2)] if epochs > 1 else []
    argv += ["--resume"] if resume else []
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _strip(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")} for m in metrics]


def kill(kills: int, epochs: int, out: Path, seed: int) -> bool:
    from psiopt.experiments.train import read_metrics

    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    whole, killed = out / "uninterrupted", out / "killed"
    started = time.perf_counter()
    assert _train(out / "startup", 0, False).wait() == 0
    startup = time.perf_counter() - started
    started = time.perf_counter()
    assert _train(whole, epochs, False).wait() == 0
    training = time.perf_counter() - started - startup
    print(f"uninterrupted: {epochs} epochs in {training:.1f} s after {startup:.1f} s of start-up",
          flush=True)
    for i in range(kills):  # each session trains ~1/kills of the run on average, then is killed
        proc = _train(killed, epochs, (killed / "config.json").exists())
        time.sleep(startup + rng.uniform(0.0, 2 * training / kills))
        proc.kill()
        proc.wait()
        done = len(read_metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
        print(f"kill {i + 1}: after {done} epochs on record", flush=True)
    proc = _train(killed, epochs, (killed / "config.json").exists())
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    same = _strip(read_metrics(whole)) == _strip(read_metrics(killed))
    a = read_checkpoint(whole / "checkpoint.pt")["model"]
    b = read_checkpoint(killed / "checkpoint.pt")["model"]
    weights = all(torch.equal(a[k], b[k]) for k in a)
    sessions = len(json.loads((killed / "config.json").read_text()).get("resumed", [])) + 1
    print(f"killed {kills} times ({sessions} sessions wrote config.json): metrics identical "
          f"{same}, final weights identical {weights}")
    return same and weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--steps", type=int, default=100_000)
    s.add_argument("--every", type=int, default=10_000)
    k = sub.add_parser("kill")
    k.add_argument("--kills", type=int, default=20)
    k.add_argument("--epochs", type=int, default=1000)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", type=Path, default=Path("runs/stress-kill"))
    args = p.parse_args()
    torch.set_num_threads(1)
    ok = steps(args.steps, args.every) if args.what == "steps" else \
        kill(args.kills, args.epochs, args.out, args.seed)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
