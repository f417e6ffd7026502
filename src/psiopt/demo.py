"""A short built-in comparison: a BatchNorm MLP on generated data, sgd vs psi-sgdm vs adamsrt."""

import time

import torch
import torch.nn.functional as F

from . import create_optimizer
from .models import MLP


def main(names=("sgd", "psi-sgdm", "adamsrt"), steps=300, seed=0) -> None:
    torch.manual_seed(seed)
    x = torch.randn(2048, 20)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5:10].sum(1) > 0).long()
    print(f"{'optimizer':12s} {'first loss':>10s} {'final loss':>10s} {'accuracy':>9s} {'seconds':>8s}")
    for name in names:
        torch.manual_seed(seed)
        model = MLP(20, 3, widths=(64, 64))
        opt = create_optimizer(model, name, x[:16])
        start, first = time.perf_counter(), None
        for step in range(steps):
            batch = torch.randint(0, len(x), (128,))
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first if step else loss.item()
        with torch.no_grad():
            out = model(x)
        acc = (out.argmax(1) == y).float().mean().item()
        final = F.cross_entropy(out, y).item()
        print(f"{name:12s} {first:10.4f} {final:10.4f} {acc:9.3f} {time.perf_counter() - start:8.2f}")


if __name__ == "__main__":
    main()
