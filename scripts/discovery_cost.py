"""Time and peak memory of discovery on a full-size ResNet-50 and ViT-B/16 (batch 2, one thread).

    python scripts/discovery_cost.py            # prints a Markdown table for docs/discovery.md

Both models are written in plain torch (torchvision and timm cannot be imported here); the
ResNet-50 is torchvision's layout (bottlenecks 3-4-6-3, stride on the 3×3 conv, projection
shortcuts with BatchNorm), the ViT-B/16 is ``psiopt.experiments.zoo.ViT(768, 12, 12, 16, 224)``.
Peak memory is the process's peak resident set (``ru_maxrss``) measured in a fresh process per
model, and what discovery adds over building the model and one forward pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from psiopt.experiments.zoo import ViT


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def resnet50() -> nn.Module:
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                   nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


MODELS = {"ResNet-50": resnet50, "ViT-B/16": lambda: ViT(768, 12, 12, 16, 224, classes=1000)}


def measure(name: str) -> dict:
    import psiopt

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = MODELS[name](), torch.randn(2, 3, 224, 224)
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    forward = time.perf_counter() - t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    mapping = psiopt.find_scale_invariant(model, x)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kinds = {}
    for g in mapping.values():
        kinds[g] = kinds.get(g, 0) + 1
    return {"model": name, "params": len(list(model.parameters())), "found": kinds,
            "forward_s": forward, "discovery_s": seconds, "peak_mb": peak / 1024,
            "added_mb": (peak - before) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=list(MODELS))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print("| model | parameters | found | one forward (s) | discovery (s) | peak RSS (MB) "
          "| added by discovery (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        found = ", ".join(f"{v} {k}" for k, v in sorted(r["found"].items()))
        print(f"| {r['model']} | {r['params']} | {found} | {r['forward_s']:.2f} | {r['discovery_s']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['added_mb']:.0f} |")


if __name__ == "__main__":
    main()
