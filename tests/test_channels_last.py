"""channels_last (issue 23 item 1): psiopt's optimizers step conv weights in
``torch.channels_last`` memory format (strides ``(I·kh·kw, 1, I·kw, I)``: not contiguous) exactly
as they step contiguous ones.

Every optimizer reads and writes a weight through views of its groups of rows
(:func:`psiopt.optim.geometry.rows`); a path that reshaped such a weight into a copy and wrote the
update into the copy would lose the update silently.  So, for every registered optimizer and every
path (``foreach=False``, the default, which takes the fused kernels where they fit, and
``fused=False``), and for :class:`psiopt.NormPolicy` around ``torch.optim.SGD``, a small float64
conv net with every grouping a conv weight takes (``channel``, ``channel@1``, ``groups:G``,
``tensor``, a 1×1 conv whose two layouts coincide) is trained in channels_last (weights and
inputs) and contiguous from the same initial weights and data: parameters, running statistics and
optimizer state agree to 1e-10, the channels_last weights are still channels_last and have
turned, and the trained network stays invariant (its eval-mode output unchanged when a group of
rows is rescaled through its view with the running statistics following).  The optimizers' own
rescaling (the sphere methods' unit-normalisation at the first step) keeps the eval-mode output
too, and a checkpoint taken in one layout continues in the other.  The harness's
``--channels-last`` is tested at the end.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psiopt
from helpers import refused
from psiopt.experiments import train as train_module
from psiopt.experiments.cli import main
from psiopt.experiments.train import RunConfig, RunError
from psiopt.optim.geometry import CANCELLED, is_invariant, norm, rows

CL = torch.channels_last
STEPS = 5
TOL = dict(rtol=1e-10, atol=1e-10)
PATHS = {"reference": {"foreach": False}, "default": {}, "unfused": {"fused": False}}
OPTIMIZERS = psiopt.list_optimizers()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ConvNet(nn.Module):
    """Conv weights of every grouping: conv→BN (``channel``, bias cancelled), ConvTranspose→BN
    (``channel@1``), conv→GroupNorm(4) (``groups:4``), conv→GroupNorm(1) (``tensor``), a 1×1
    conv→BN (``channel``; its weight is contiguous in both layouts), then a linear head."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, eps=eps)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False)
        self.bn_up = nn.BatchNorm2d(4, eps=eps)
        self.grouped = nn.Conv2d(4, 8, 3, bias=False)
        self.gn = nn.GroupNorm(4, 8, eps=eps)
        self.whole = nn.Conv2d(8, 8, 3, bias=False)
        self.gn1 = nn.GroupNorm(1, 8, eps=eps)
        self.point = nn.Conv2d(8, 8, 1)
        self.bn_point = nn.BatchNorm2d(8, eps=eps)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn_up(self.up(x)))
        x = F.relu(self.gn(self.grouped(x)))
        x = F.relu(self.gn1(self.whole(x)))
        x = F.relu(self.bn_point(self.point(x)))
        return self.head(x.mean((2, 3)))


GROUPINGS = {"conv.weight": "channel", "conv.bias": CANCELLED, "up.weight": "channel@1",
             "grouped.weight": "groups:4", "whole.weight": "tensor", "point.weight": "channel",
             "point.bias": CANCELLED}
#: weights whose channels_last strides differ from the contiguous ones (the 1×1 conv's do not)
STRIDED = ("conv.weight", "up.weight", "grouped.weight", "whole.weight")


def net(channels_last: bool, eps=1e-5) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(eps).double()
    with torch.no_grad():  # rows of many norms
        for p in model.parameters():
            p.mul_(1 + torch.rand(p.shape, dtype=p.dtype))
    return model.to(memory_format=CL) if channels_last else model


def data(channels_last: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return (x.contiguous(memory_format=CL) if channels_last else x), y


def run(model, opt, channels_last, steps=STEPS):
    x, y = data(channels_last)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        if channels_last:  # the gradients the optimizer sees are channels_last too
            for name in STRIDED:
                g = model.get_parameter(name).grad
                assert g.is_contiguous(memory_format=CL) and not g.is_contiguous(), name
        opt.step()


def assert_layout(model, channels_last):
    """The channels_last weights are still channels_last (no step replaced their storage)."""
    for name in STRIDED:
        p = model.get_parameter(name)
        assert p.is_contiguous(memory_format=CL) == channels_last, name
        assert p.is_contiguous() == (not channels_last), name


def assert_same(model_a, model_b, opt_a=None, opt_b=None):
    """Parameters and buffers (by name), and every tensor of the optimizer state, agree."""
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    if opt_a is None:
        return
    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sorted(sa) == sorted(sb), name
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb[key], **TOL,
                                           msg=lambda m, n=name, k=key: f"state[{n}][{k}]: {m}")


def assert_turned(model, initial):
    """The invariant conv weights turned (invariant groups: in direction)."""
    for name, grouping in GROUPINGS.items():
        if not is_invariant(grouping):
            continue
        v, v0 = rows(model.get_parameter(name).detach(), grouping), rows(initial[name], grouping)
        turn = (v / norm(v) - v0 / norm(v0)).abs().max()
        assert turn > 1e-6, f"{name} did not turn ({float(turn):.2e})"


def eval_out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_invariant(model, channels_last=True):
    """Rescaling every group of every invariant weight, in place through its view
    (:func:`rows`), with the running statistics following, leaves the eval-mode output as it was
    (the BatchNorm eps is 1e-14 here); the weights did change."""
    x, _ = data(channels_last)
    before = eval_out(model, x)
    g = torch.Generator().manual_seed(2)
    for group in psiopt.param_groups(model, x):
        if not is_invariant(group["grouping"]):
            continue
        for p, stats in zip(group["params"], group["norm_stats"]):
            v = rows(p.detach(), group["grouping"])
            assert v.data_ptr() == p.data_ptr()  # a view of the parameter's storage
            factors = 0.5 + 1.5 * torch.rand((v.shape[0],) + (1,) * (v.dim() - 1), generator=g,
                                             dtype=v.dtype)
            old = p.detach().clone()
            psiopt.optim.discovery.rescale_rows_(v, factors, stats)
            torch.testing.assert_close(rows(p.detach(), group["grouping"]),
                                       rows(old, group["grouping"]) * factors, rtol=1e-14, atol=0)
    after = eval_out(model, x)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))
    model.train()


# -- the network ----------------------------------------------------------------------------------
def test_the_net_has_every_grouping_of_a_conv_weight_in_both_layouts():
    for channels_last in (False, True):
        model, (x, _) = net(channels_last), data(channels_last)
        assert psiopt.find_scale_invariant(model, x) == GROUPINGS
        assert_layout(model, channels_last)


def test_rows_of_a_channels_last_weight_are_views_that_write_through():
    """Every grouping's view of a channels_last weight shares its storage and strides: a write
    into the view is a write into the weight (the defect this file guards against: a copy)."""
    model = net(True)
    for name, grouping in GROUPINGS.items():
        if not is_invariant(grouping):
            continue
        p = model.get_parameter(name).detach()
        v = rows(p, grouping)
        assert v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr(), name
        expected = rows(p.contiguous(), grouping) * 2
        v.mul_(2)
        torch.testing.assert_close(rows(p, grouping), expected, rtol=0, atol=0)
        assert p.is_contiguous(memory_format=CL), name


# -- every optimizer, every path --------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_channels_last_trains_as_contiguous(name, path):
    """The same steps in both layouts on ``path``: parameters, running statistics and optimizer
    state agree to 1e-10; the channels_last weights stay channels_last and turn."""
    models, opts = [], []
    for channels_last in (False, True):
        model = net(channels_last, eps=1e-14)
        x, _ = data(channels_last)
        opts.append(psiopt.create_optimizer(model, name, x, **PATHS[path]))
        models.append(model)
    initial = {n: p.detach().clone() for n, p in net(False).named_parameters()}
    for channels_last, model, opt in zip((False, True), models, opts):
        run(model, opt, channels_last)
        assert_layout(model, channels_last)
    assert_same(models[0], models[1], opts[0], opts[1])
    assert_turned(models[1], initial)
    for pname, grouping in GROUPINGS.items():  # cancelled biases were never touched
        if grouping == CANCELLED:
            assert torch.equal(models[1].get_parameter(pname), initial[pname]), pname
    if path == "default":
        assert_invariant(models[1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_optimizers_own_rescaling_keeps_the_eval_network(name):
    """At ``lr`` 0 a step changes nothing but what the rule prepares (the sphere methods
    unit-normalise the rows at the first step, the running statistics following): on a
    channels_last net the eval-mode output is unchanged, and the weights are those of the
    contiguous net's same step."""
    outs = []
    for channels_last in (False, True):
        model, (x, y) = net(channels_last, eps=1e-14), data(channels_last)
        opt = psiopt.create_optimizer(model, name, x, lr=0.0)
        before = eval_out(model, x)
        F.cross_entropy(model.train()(x), y).backward()
        before = eval_out(model, x)  # the train pass moved the statistics: from here
        opt.step()
        torch.testing.assert_close(eval_out(model, x), before, rtol=1e-9,
                                   atol=1e-9 * float(before.abs().max()))
        assert_layout(model, channels_last)
        outs.append(model)
    assert_same(*outs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_checkpoint_continues_in_the_other_layout(name):
    """State made in one layout (its buffers in that layout) loaded for a net in the other: the
    steps after agree with those of the net that kept its layout (a weight, its gradient and its
    state of mixed strides)."""
    for channels_last in (True, False):  # the layout the checkpoint is continued in
        model = net(not channels_last)
        opt = psiopt.create_optimizer(model, name, data(not channels_last)[0])
        run(model, opt, not channels_last, steps=2)
        twin = copy.deepcopy(model).to(memory_format=CL if channels_last else torch.contiguous_format)
        twin_opt = psiopt.create_optimizer(twin, name, data(channels_last)[0])
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        assert_layout(twin, channels_last)
        run(model, opt, not channels_last, steps=3)
        run(twin, twin_opt, channels_last, steps=3)
        assert_layout(twin, channels_last)
        assert_same(model, twin, opt, twin_opt)


# -- NormPolicy around torch.optim.SGD ---------------------------------------------------------------
POLICIES = {"free": {}, "fixed": {}, "unit": {"project": True}, "equilibrium": {}}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_norm_policy_with_sgd_trains_channels_last_as_contiguous(policy, foreach):
    models, opts = [], []
    for channels_last in (False, True):
        model, (x, _) = net(channels_last, eps=1e-14), data(channels_last)
        groups = psiopt.optimizer_groups(model, x, weight_decay=1e-2)
        inner = torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=foreach)
        opts.append(psiopt.NormPolicy(inner, policy, model=model, example_inputs=x,
                                      **POLICIES[policy]))
        models.append(model)
    initial = {n: p.detach().clone() for n, p in net(False).named_parameters()}
    for channels_last, model, opt in zip((False, True), models, opts):
        run(model, opt, channels_last)
        assert_layout(model, channels_last)
    assert_same(models[0], models[1], opts[0].optimizer, opts[1].optimizer)
    assert_turned(models[1], initial)
    assert_invariant(models[1])


# -- the harness ------------------------------------------------------------------------------------
QUICK = ["--dataset", "synthetic", "--subset", "64", "--epochs", "1", "--batch-size", "32",
         "--no-progress"]
CONV = [*QUICK, "--model", "resnet20", "--optimizer", "psi-sgdm", "--threads", "1"]


def test_train_channels_last_on_the_cpu_runs_converts_and_records(tmp_path, monkeypatch):
    """``--channels-last``: the conv weights are channels_last (in the checkpoint too), every
    batch the model sees (training, evaluation, the BatchNorm recomputation) is converted, the
    record says so, and the run is the contiguous one to float32 rounding."""
    seen = []
    real = train_module.as_inputs
    monkeypatch.setattr(train_module, "as_inputs", lambda x, cl: seen.append(cl) or real(x, cl))
    built = []
    real_build = train_module.build

    def build(config, device=None, held=None):  # a conv deep in the net sees channels_last
        out = real_build(config, device, held)  # activations
        layer = [m for m in out[1].modules() if isinstance(m, nn.Conv2d)][-1]
        layer.register_forward_pre_hook(
            lambda m, args: built.append(args[0].is_contiguous(memory_format=CL)
                                         and not args[0].is_contiguous()))
        return out

    monkeypatch.setattr(train_module, "build", build)
    assert main(["train", *CONV, "--channels-last", "--out", str(tmp_path / "cl")]) == 0
    assert seen and all(seen) and built and all(built)
    seen.clear(), built.clear()
    assert main(["train", *CONV, "--out", str(tmp_path / "plain")]) == 0
    assert seen and not any(seen) and built and not any(built)

    cl, plain = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("cl", "plain"))
    assert cl["channels_last"] is True and plain["channels_last"] is False
    state = train_module.read_checkpoint(tmp_path / "cl" / "checkpoint.pt")["model"]
    convs = [k for k, v in state.items() if v.dim() == 4 and v.shape[1] > 1]
    assert convs and all(state[k].is_contiguous(memory_format=CL) and not state[k].is_contiguous()
                         for k in convs)
    (a,), (b,) = (train_module.read_metrics(tmp_path / d) for d in ("cl", "plain"))
    for key in ("train_loss", "test_loss", "test_loss_bn_recomputed"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_compare_channels_last_is_recorded_and_summarised(tmp_path):
    assert main(["compare", *QUICK, "--model", "resnet20", "--optimizers", "sgd",
                 "--channels-last", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "sgd" / "seed0" / "config.json").read_text())
    assert config["channels_last"] is True
    assert "channels_last" in (tmp_path / "summary.md").read_text()


def test_spawned_processes_train_channels_last(tmp_path):
    """The multi-process path (``--nproc 2``, gloo): DDP over channels_last weights, recorded."""
    assert main(["train", *CONV, "--nproc", "2", "--channels-last", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["channels_last"] is True and config["nproc"] == 2
    assert train_module.read_metrics(tmp_path)[0]["train_loss"] is not None
    state = train_module.read_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert any(v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=CL)
               for v in state.values())


@pytest.mark.parametrize("argv", [
    ["train", *QUICK, "--channels-last"],  # mlp-bn: no 4-D weight
    ["compare", *QUICK, "--optimizers", "sgd", "--model", "archbn2", "--channels-last"],
    ["compare", "--recipe", "yi-fig1", "--channels-last"],  # mlp-bn, a recipe with variants
], ids=["train", "compare", "recipe"])
def test_a_model_without_conv_weights_is_refused_in_one_line(tmp_path, capsys, argv):
    refused(capsys, [*argv, "--out", str(tmp_path / "out")], "--channels-last",
             "no 4-D (convolution) weight", "leave the flag out")
    assert not any((tmp_path / "out").rglob("config.json"))


def test_inputs_that_are_not_images_are_refused():
    config = RunConfig(model="resnet20", dataset="toy-regression", channels_last=True)
    with pytest.raises(RunError, match="are not images"):
        train_module.check_channels_last(nn.Conv2d(3, 4, 3), torch.randn(2, 10), config)
    train_module.check_channels_last(nn.Linear(3, 4), torch.randn(2, 3),
                                     RunConfig(channels_last=False))  # off: nothing is checked
    with pytest.raises(RunError, match="invalid channels_last"):
        RunConfig(channels_last="yes").validate()


def test_a_study_recipe_and_a_resume_in_the_other_layout_are_refused(tmp_path, capsys):
    refused(capsys, ["compare", "--recipe", "roburin-thm4", "--channels-last", "--out",
                      str(tmp_path / "s")], "study", "--channels-last")
    assert not (tmp_path / "s").exists()
    out = str(tmp_path / "run")
    assert main(["train", *CONV, "--out", out]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    refused(capsys, ["train", *CONV, "--epochs", "2", "--resume", "--channels-last", "--out", out],
             "channels_last (False → True)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_records_made_before_the_option_read_as_contiguous():
    assert train_module.run_identity({})["channels_last"] is False
    assert train_module.run_identity({}) == train_module.run_identity({"channels_last": False})
