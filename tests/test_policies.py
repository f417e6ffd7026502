"""Norm policies around any optimizer (issue 25, item 2): with torch.optim.SGD they are psiopt's
PSGD (``fixed``) and UN-SGD (``unit`` with tangent gradients), to 1e-12 in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F

import psiopt
from psiopt.experiments import zoo


def _setup(name="vgg (conv-BN)"):
    model, x = zoo.build(name)
    model, x = model.double(), x.double()
    with torch.no_grad():
        model.train()(x)
        for p in model.parameters():  # rows of many norms, no special values
            p.mul_(1 + torch.rand(p.shape, dtype=p.dtype))
    y = torch.randint(0, 5 if name.startswith("vgg") else 3, (x.shape[0],))
    return model, x, y


def _train(model, x, y, opt, steps=6):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("foreach", [False, None])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_with_the_fixed_policy_is_psgd(foreach, momentum):
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    psgd = psiopt.ProjectedSGD(psiopt.param_groups(twin, x, lr=0.05, invariant_lr=0.2),
                               lr=0.05, momentum=momentum, foreach=foreach)
    groups = psiopt.optimizer_groups(model, x)
    for g in groups:
        g["lr"] = 0.2 if g["grouping"] else 0.05
    policy = psiopt.NormPolicy(torch.optim.SGD(groups, lr=0.05, momentum=momentum), "fixed",
                               model=model, example_inputs=x)
    ours, theirs = _train(model, x, y, policy), _train(twin, x, y, psgd)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())


@pytest.mark.parametrize("foreach", [False, None])
def test_sgd_with_unit_norm_and_tangent_gradients_is_un_sgd(foreach):
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    un = psiopt.UnitNormSGD(psiopt.param_groups(twin, x, lr=0.05, invariant_lr=0.3), lr=0.05,
                            foreach=foreach)
    groups = psiopt.optimizer_groups(model, x)
    for g in groups:
        g["lr"] = 0.3 if g["grouping"] else 0.05
    policy = psiopt.NormPolicy(torch.optim.SGD(groups, lr=0.05), "unit", project=True,
                               model=model, example_inputs=x)
    ours, theirs = _train(model, x, y, policy), _train(twin, x, y, un)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), float((a - b).abs().max())
    for a, b in zip(model.buffers(), twin.buffers()):  # running statistics followed alike
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", ["fixed", "unit"])
def test_rescaling_keeps_the_eval_network_and_never_writes_p_grad(policy):
    model, x, y = _setup()
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.eps = 1e-14
    opt = psiopt.NormPolicy(torch.optim.AdamW(psiopt.optimizer_groups(model, x), lr=0.0), policy,
                            project=True, model=model, example_inputs=x)
    before = model.eval()(x)
    F.cross_entropy(model.train()(x), y).backward()
    with torch.no_grad():
        model.eval()  # the train pass moved the statistics: compare from here
        before = model(x)
    grads = {p: (p.grad, p.grad.clone()) for p in model.parameters()}
    opt.step()
    for p, (g, saved) in grads.items():
        assert p.grad is g and torch.equal(g, saved)
    assert torch.allclose(model(x), before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))


def test_state_dict_round_trip_and_the_unit_preparation_is_not_repeated():
    model, x, y = _setup()
    make = lambda m: psiopt.NormPolicy(torch.optim.SGD(psiopt.optimizer_groups(m, x), lr=0.1,  # noqa: E731
                                                       momentum=0.9), "unit", model=m, example_inputs=x)
    opt = make(model)
    _train(model, x, y, opt, steps=2)
    twin = copy.deepcopy(model)
    resumed = make(twin)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(_train(model, x, y, opt, 3), _train(twin, x, y, resumed, 3)):
        assert torch.equal(a, b)


def test_bad_policies_are_refused():
    model, x, _ = _setup("mlp-bn")
    sgd = torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.1)
    with pytest.raises(ValueError, match="policy"):
        psiopt.NormPolicy(sgd, "equilibrium")
    with pytest.raises(ValueError, match="project"):
        psiopt.NormPolicy(sgd, "fixed", project=1)
    with pytest.raises(ValueError, match="invariant"):
        psiopt.NormPolicy(torch.optim.SGD(model.parameters(), lr=0.1), "fixed")
    with pytest.raises(TypeError):
        psiopt.NormPolicy(object(), "fixed")
    opt = psiopt.NormPolicy(sgd, "fixed")
    with pytest.raises(ValueError, match="policy"):
        psiopt.NormPolicy(torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.1), "unit") \
            .load_state_dict(opt.state_dict())


def test_after_review_groupings_checked_first_half_precision_sums_and_unlinked_warning():
    from torch import nn

    # a grouping that does not fit is refused when the policy is built, before anything changes
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    sgd = torch.optim.SGD([{"params": [a], "grouping": "channel"},
                           {"params": [b], "grouping": "groups:3"}], lr=0.1)
    with pytest.raises(ValueError):
        psiopt.NormPolicy(sgd, "unit", project=True)
    # float16 rows with ‖w‖² beyond float16's range: the projection sums in float32 (was NaN)
    w = nn.Parameter(torch.full((2, 1024), 10.0, dtype=torch.float16))
    w.grad = torch.randn(2, 1024).to(torch.float16)
    policy = psiopt.NormPolicy(torch.optim.SGD([{"params": [w], "grouping": "channel"}], lr=1e-3),
                               "fixed", project=True)
    policy.step()
    assert torch.isfinite(w).all()
    assert torch.allclose(w.float().norm(dim=1), torch.full((2,), 320.0), rtol=2e-3)
    # "unit" without running statistics warns once; model without example_inputs is refused
    model, x, y = _setup("mlp-bn")
    with pytest.raises(ValueError, match="together"):
        psiopt.NormPolicy(torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.1), "unit", model=model)
    unlinked = psiopt.NormPolicy(torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.1), "unit")
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="norm_stats"):
        unlinked.step()
