"""Eval-mode accuracy against accuracy after recomputing BatchNorm statistics, PSI-SGD(M).

Measures how far the running statistics lag behind the weights (psiopt issue 7, item 6):
Fashion-MNIST, mlp-bn, batch 128, 20 epochs, lr ×0.1 at epochs 10 and 15, one thread.

    python scripts/psi_norm_stats.py --seeds 0 1 2 --out runs/psi-norm-stats
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from torch.optim.swa_utils import update_bn

from psiopt.experiments.data import batches
from psiopt.experiments.train import RunConfig, build, evaluate, read_checkpoint, train

SETTINGS = {
    "psi-sgd fixed_norm": ("psi-sgd", {"invariant_fixed_norm": True}),
    "psi-sgd literal (eq. 10 + guard)": ("psi-sgd", {"invariant_fixed_norm": False}),
    "psi-sgdm fixed_norm": ("psi-sgdm", {"invariant_fixed_norm": True}),
    "psi-sgdm literal (eq. 11 + guard)": ("psi-sgdm", {"invariant_fixed_norm": False}),
    "sgd control (lr 0.1, momentum 0.9)": ("sgd", {}),
}


def checkpoints(epochs: int) -> list[int]:
    """Epochs measured: the first, each quarter of the run, and the last."""
    return sorted({max(1, epochs * k // 4) for k in range(5)})


def measure(name: str, hyper: dict, seed: int, epochs: int, out: Path) -> dict[int, dict]:
    """Train once; at each of :func:`checkpoints`, test accuracy (%) of the saved model in eval
    mode and after recomputing its BatchNorm statistics on the training set (torch's
    ``update_bn``: the average of per-batch means and unbiased variances, batches of 1024)."""
    milestones = sorted({m for m in (epochs // 2, 3 * epochs // 4) if m >= 1})
    config = RunConfig(dataset="fashion-mnist", model="mlp-bn", optimizer=name, epochs=epochs,
                       seed=seed, hyper=hyper, milestones=milestones, threads=1)
    saved = []

    def snapshot(_line):  # called after each epoch, once checkpoint.pt is written
        saved.append(read_checkpoint(out / "checkpoint.pt", config)["model"])

    train(config, out, log=snapshot)
    data, model, _, _ = build(config)
    results = {}
    for epoch in checkpoints(epochs):
        model.load_state_dict(saved[epoch - 1])
        _, eval_acc = evaluate(model, data.test_x, data.test_y, regression=False)
        update_bn(batches(data.train_x, data.train_x, 1024), model)
        _, recomputed_acc = evaluate(model, data.test_x, data.test_y, regression=False)
        results[epoch] = {"eval": 100 * eval_acc, "recomputed": 100 * recomputed_acc}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/psi-norm-stats"))
    parser.add_argument("--only", default="", help="run the settings whose label contains this")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists: choose another --out (runs are not overwritten)")
    chosen = {label: v for label, v in SETTINGS.items() if args.only in label}
    if not chosen:
        sys.exit(f"--only {args.only!r} matches none of: {', '.join(SETTINGS)}")
    spread = statistics.stdev if len(args.seeds) > 1 else (lambda values: 0.0)
    print("| setting | epoch | eval-mode acc (%) | recomputed BN acc (%) | gap mean (max) |")
    print("|---|---|---|---|---|")
    rows = []
    for label, (name, hyper) in chosen.items():
        runs = [measure(name, hyper, s, args.epochs, args.out / label.split()[0] / label.split()[1]
                        / f"seed{s}") for s in args.seeds]
        for epoch in checkpoints(args.epochs):
            ev = [r[epoch]["eval"] for r in runs]
            rc = [r[epoch]["recomputed"] for r in runs]
            gap = [b - a for a, b in zip(ev, rc)]
            rows.append({"setting": label, "epoch": epoch, "eval": ev, "recomputed": rc})
            print(f"| {label} | {epoch} | {statistics.mean(ev):.2f} ± {spread(ev):.2f} | "
                  f"{statistics.mean(rc):.2f} ± {spread(rc):.2f} | "
                  f"{statistics.mean(gap):+.2f} ({max(gap):+.2f}) |", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
