"""Host time of an eager step: psiopt's against torch's fused step, on resnet56's parameter list
with every tensor shrunk to at most two rows of one entry (so that the kernels' own time is
close to nothing and what is left is what a step costs the host: Python, dispatch, checks).

    python scripts/host_overhead.py [optimizer ...]     # default: psi-sgdm adams un-sgd sgdg

One thread, median of 300 steps after 10, both optimizers in the same process.  On a GPU a
step's kernels take tens of microseconds, so this host time bounds how close psiopt's eager
step can come to torch's fused one there (issue 23's target: 1.2x); torch's fused step on the
CPU runs one kernel per tensor, on CUDA a few multi-tensor kernels.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict

import torch

import psiopt
from psiopt.experiments.bench import parameter_set

ADAM = ("adam", "adamw", "adams", "adamsrt", "adamg")


def tiny_groups(model, mapping) -> list[dict]:
    """resnet56's groups (its discovered groupings), each tensor shrunk to ``(min(2, rows), 1, ...)``
    with a random gradient."""
    groups = defaultdict(list)
    for name, p in model.named_parameters():
        q = torch.nn.Parameter(torch.randn(min(2, p.shape[0]), *[1] * (p.dim() - 1)))
        q.grad = torch.randn_like(q)
        groups[mapping.get(name)].append(q)
    return [{"params": ps, **({"grouping": g, "norm_stats": [[] for _ in ps]} if g else {})}
            for g, ps in groups.items()]


def median_us(step, n: int = 300) -> float:
    for _ in range(10):
        step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e6


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, mapping = parameter_set("resnet56")
    print("| optimizer | tensors | psiopt (µs) | torch fused (µs) | ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        opt = psiopt.create_optimizer(tiny_groups(model, mapping), name)
        params = [p for g in tiny_groups(model, mapping) for p in g["params"]]
        ref = (torch.optim.Adam(params, lr=1e-3, fused=True) if name in ADAM
               else torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))
        ours, theirs = median_us(opt.step), median_us(ref.step)
        print(f"| {name} | {len(params)} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["psi-sgdm", "adams", "un-sgd", "sgdg"])
