"""Parameter groups for any optimizer (issue 25, item 1): built from discovery, taken by
torch.optim's SGD, AdamW, Adafactor and Muon, weight decay placed by rule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psiopt
from psiopt.experiments import zoo


def _timm_split(model, no_decay=()):
    """timm's ``param_groups_weight_decay`` rule, written out: no decay for ``ndim <= 1``, a
    name ending in ``.bias`` or a ``no_weight_decay()`` name."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if p.ndim <= 1 or name.endswith(".bias") or name in no_decay else decay).append(name)
    return decay, rest


def _names(groups, **match):
    return [n for g in groups if all(g.get(k) == v for k, v in match.items()) for n in g["param_names"]]


def test_groups_place_weight_decay_by_what_it_does():
    model, x = zoo.build("vgg (conv-BN)")
    mapping = psiopt.find_scale_invariant(model, x)
    groups = psiopt.optimizer_groups(model, x, weight_decay=0.05, invariant_weight_decay=5e-4)
    invariant = {n for n, g in mapping.items() if g not in ("cancelled",)}
    assert set(_names(groups, weight_decay=5e-4)) == invariant  # an effective-lr control
    cancelled = {n for n, g in mapping.items() if g == "cancelled"}
    listed = {n for g in groups for n in g["param_names"]}
    # no effect on the output: lr 0, no decay (in the optimizer: zero_grad reaches them)
    assert cancelled and set(_names(groups, grouping="cancelled", lr=0.0, weight_decay=0.0)) == cancelled
    decay, rest = _timm_split(model)
    assert set(_names(groups, grouping=None, weight_decay=0.05)) == set(decay) - invariant
    assert set(_names(groups, grouping=None, weight_decay=0.0)) == set(rest) - cancelled
    assert listed == {n for n, _ in model.named_parameters()}
    for g in groups:
        assert (g["grouping"] in (None, "cancelled")) == all(n not in invariant for n in g["param_names"])


def test_with_nothing_invariant_the_groups_are_timms_and_honour_no_weight_decay():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.pos, self.head = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8)), nn.Linear(8, 2)

        def no_weight_decay(self):
            return {"pos"}

        def forward(self, x):
            return self.head(F.gelu(self.fc(x)) + self.pos.sum(0))

    model = Net()
    groups = psiopt.optimizer_groups(model, torch.randn(5, 4), weight_decay=0.1)
    decay, rest = _timm_split(model, {"pos"})
    assert _names(groups, weight_decay=0.1) == decay
    assert sorted(_names(groups, weight_decay=0.0)) == sorted(rest)


@pytest.mark.parametrize("make", [
    lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
    lambda g: torch.optim.AdamW(g, lr=1e-2),
    lambda g: torch.optim.Adafactor(g, lr=1e-2),
], ids=["SGD", "AdamW", "Adafactor"])
def test_torch_optimizers_take_the_groups_and_train(make):
    model, x = zoo.build("RMSNorm MLP")
    y = torch.randint(0, 3, (x.shape[0],))
    opt = make(psiopt.optimizer_groups(model, x, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = opt.state_dict()
    assert [g["grouping"] for g in state["param_groups"]] == [g["grouping"] for g in opt.param_groups]
    opt.load_state_dict(state)


def test_muon_takes_the_two_dimensional_weights_and_adamw_the_rest():
    model, x = zoo.build("RMSNorm MLP")
    y = torch.randint(0, 3, (x.shape[0],))
    two_d = psiopt.optimizer_groups(model, x, weight_decay=0.1, select=lambda n, p: p.ndim == 2)
    rest = psiopt.optimizer_groups(model, x, weight_decay=0.1, select=lambda n, p: p.ndim != 2)
    assert all(p.ndim == 2 for g in two_d for p in g["params"])
    both = [n for g in two_d + rest for n in g["param_names"]]
    assert sorted(both) == sorted(n for g in psiopt.optimizer_groups(model, x) for n in g["param_names"])
    muon, adamw = torch.optim.Muon(two_d, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)
    first = None
    for _ in range(10):
        muon.zero_grad(), adamw.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        muon.step(), adamw.step()
        first = float(loss) if first is None else first
    assert float(loss) < first


def test_bad_settings_are_refused():
    model, x = zoo.build("mlp-bn")
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match="weight_decay"):
            psiopt.optimizer_groups(model, x, weight_decay=bad)
    with pytest.raises(ValueError, match="example_inputs"):
        psiopt.optimizer_groups(model)
    with pytest.raises(ValueError, match="does not have"):
        psiopt.optimizer_groups(model, mapping={"nope.weight": "channel"})
