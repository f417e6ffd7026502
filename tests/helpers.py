"""Tiny models and data shared by the tests."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import psiopt


class RowNormLinear(nn.Module):
    """Linear layer whose rows are normalised in forward: exactly scale-invariant per row."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))

    def forward(self, x):
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True))


class ExactNet(nn.Module):
    """x → tanh(RowNormLinear) → Linear: invariant ``hidden.weight`` rows, exact in float64."""

    def __init__(self, cin=6, hidden=5, cout=3):
        super().__init__()
        self.hidden = RowNormLinear(cin, hidden)
        self.out = nn.Linear(hidden, cout)

    def forward(self, x):
        return self.out(torch.tanh(2 * self.hidden(x)))


def exact_setup(seed=0, n=64, dtype=torch.float64):
    torch.manual_seed(seed)
    model = ExactNet().to(dtype)
    x = torch.randn(n, 6, dtype=dtype)
    y = torch.randn(n, 3, dtype=dtype)
    return model, x, y


def exact_groups(model, **kw):
    return psiopt.param_groups(model, mapping={"hidden.weight": "channel"}, **kw)


def bn_net(seed=0, dtype=torch.float64):
    """Small network with channel, groups and tensor groupings and non-invariant parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.GroupNorm(4, 8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 12, bias=False), nn.LayerNorm(12), nn.ReLU(),
        nn.Linear(12, 3),
    ).to(dtype)


def bn_data(seed=1, n=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()


def train(model, opt, x, y, steps, loss=F.cross_entropy):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


def clone(model):
    return copy.deepcopy(model)


class StatsNet(nn.Module):
    """Linear+bias → BN (channel, cancelled bias), conv → BN and, with ``tensor_branch``, a
    linear over the last dimension → BatchNorm1d over dimension 1 (a "tensor" group feeding
    every channel): rows that feed running statistics."""

    def __init__(self, eps=1e-5, tensor_branch=True):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8, eps=eps)
        self.conv = nn.Conv1d(2, 4, 2, bias=False)
        self.bn_conv = nn.BatchNorm1d(4, eps=eps)
        if tensor_branch:
            self.seq = nn.Linear(3, 3, bias=False)
            self.bn_seq = nn.BatchNorm1d(2, eps=eps)
        self.head = nn.Linear(8 + 4 * 2 + (2 * 3 if tensor_branch else 0), 3)

    def forward(self, x):
        parts = [torch.relu(self.bn(self.fc(x))),
                 torch.relu(self.bn_conv(self.conv(x.view(-1, 2, 3)))).flatten(1)]
        if hasattr(self, "seq"):
            parts.append(torch.relu(self.bn_seq(self.seq(x.view(-1, 2, 3)))).flatten(1))
        return self.head(torch.cat(parts, 1))


def eval_out(model, x):
    """The eval-mode outputs (no gradient); the model is left in train mode."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


def refused(capsys, argv, *words):
    """``psiopt argv`` exits 2 with one line naming ``words``."""
    from psiopt.experiments.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psiopt: error:"), err
    assert all(w in err[0] for w in words), err[0]
