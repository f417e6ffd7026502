import math

import pytest
import torch
import torch.nn.functional as F

import psiopt
from helpers import exact_groups, exact_setup
from psiopt.optim.baselines import SGD, Adam
from psiopt.optim.diagnostics import (
    StepProbe,
    angular_update,
    measured_effective_lr,
    scheduling_beta,
    theorem2_effective_lr,
    update_split,
)
from psiopt.optim.geometry import rows


def one_step(opt, model, x, y):
    w_old = model.hidden.weight.detach().clone()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    g = model.hidden.weight.grad.clone()
    opt.step()
    return w_old, g, model.hidden.weight.detach()


def test_measured_effective_lr_is_arora_eta_over_norm_squared_for_sgd():
    model, x, y = exact_setup()
    opt = torch.optim.SGD(exact_groups(model), lr=0.3)
    w_old, g, w_new = one_step(opt, model, x, y)
    got = measured_effective_lr(w_old, w_new, g)
    assert torch.allclose(got, 0.3 / w_old.pow(2).sum(1), rtol=1e-10)


def test_theorem2_matches_table1_for_sgd_with_l2():
    model, x, y = exact_setup()
    eta, lam = 0.3, 0.05
    opt = SGD(exact_groups(model, invariant_weight_decay=lam), lr=eta)
    w_old, _, w_new = one_step(opt, model, x, y)
    beta = scheduling_beta(opt, model.hidden.weight, w_new, w_old)
    got = theorem2_effective_lr(w_old, w_new, eta, beta)
    assert torch.allclose(got, eta / (w_old.pow(2).sum(1) * (1 - eta * lam)), rtol=1e-10)


def test_theorem2_effective_lr_predicts_adams_step_on_the_sphere():
    """Roburin eq. (12): u_{k+1} = (u_k − η_e c⊥)/√(1 + (η_e‖c⊥‖)²), exactly."""
    model, x, y = exact_setup()
    eta = 0.05
    opt = Adam(exact_groups(model), lr=eta, weight_decay=1e-2)
    for _ in range(3):
        one_step(opt, model, x, y)
    w_old, _, w_new = one_step(opt, model, x, y)
    p = model.hidden.weight
    state, (b1, b2) = opt.state[p], opt.param_groups[0]["betas"]
    t = float(state["step"])
    a = state["exp_avg"] / (1 - b1**t)
    b = (state["exp_avg_sq"] / (1 - b2**t)).sqrt() + opt.param_groups[0]["eps"]
    beta = scheduling_beta(opt, p, w_new, w_old)
    assert torch.allclose(beta.flatten(), b.norm(dim=1) / math.sqrt(b.shape[1]))
    r = w_old.norm(dim=1, keepdim=True)
    u = w_old / r
    c = r * a / (b / beta)
    c_perp = c - (c * u).sum(1, keepdim=True) * u
    eta_e = theorem2_effective_lr(w_old, w_new, eta, beta)[:, None]
    predicted = (u - eta_e * c_perp) / (1 + (eta_e * c_perp.norm(dim=1, keepdim=True)) ** 2).sqrt()
    assert torch.allclose(predicted, w_new / w_new.norm(dim=1, keepdim=True), atol=1e-12)


def test_adamsrt_beta_undoes_the_v_rescaling():
    model, x, y = exact_setup()
    opt = psiopt.AdamSRT(exact_groups(model), lr=0.05, eps=0.0)
    w_old, _, w_new = one_step(opt, model, x, y)
    beta = scheduling_beta(opt, model.hidden.weight, w_new, w_old)
    g = model.hidden.weight.grad
    v = (1 - 0.999) * g.pow(2).sum(1) / g.shape[1]
    assert torch.allclose(beta.flatten(), (v / (1 - 0.999)).sqrt(), rtol=1e-10)


def test_probe_reports_every_invariant_layer():
    model, x, y = exact_setup()
    opt = psiopt.PSISGD(exact_groups(model), lr=0.5)
    probe = StepProbe(opt)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    mean_norm = rows(model.hidden.weight, "channel").norm(dim=1).mean().item()
    probe.before()
    opt.step()
    layers = probe.after()
    assert set(layers) == {"hidden.weight"}
    assert abs(layers["hidden.weight"]["eff_lr"] - 0.5) < 1e-9  # PSI-SGD: η_e = η
    assert "eff_lr_theorem2" not in layers["hidden.weight"]  # not of the form x − η a ⊘ b
    assert layers["hidden.weight"]["norm"] == pytest.approx(mean_norm, rel=1e-12)  # before the step


def test_every_optimizer_states_its_own_effective_lr_factor():
    """Theorem 2's β comes from the optimizer (no class switch in the diagnostics): SGD-MRT and
    SGD are 1, Adam-S/SRT and Adam per group, PSI-SGD and a plain torch optimizer none."""
    model, x, y = exact_setup()
    expected = {"sgdmrt": True, "sgd": True, "adams": True, "adamsrt": True, "adam": True,
                "psi-sgd": False, "adamw": False, "psgd": False}
    for name, has in expected.items():
        m = exact_setup()[0]
        opt = psiopt.create_optimizer(m, name, mapping={"hidden.weight": "channel"})
        w_old, _, w_new = one_step(opt, m, x, y)
        beta = scheduling_beta(opt, m.hidden.weight, rows(w_new, "channel"), rows(w_old, "channel"))
        assert (beta is not None) == has, name
        if has:
            assert beta.shape == (5, 1) and bool((beta > 0).all())
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert scheduling_beta(plain, model.hidden.weight, model.hidden.weight, model.hidden.weight) is None


def test_angular_update_and_the_split_of_a_known_step():
    # x_new: x_old turned by θ in a plane and scaled by ρ, per group
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    u = x / x.norm(dim=1, keepdim=True)
    t = v - (v * u).sum(1, keepdim=True) * u
    t = t / t.norm(dim=1, keepdim=True)
    theta = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 3.0], dtype=torch.float64)[:, None]
    rho = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)[:, None]
    r = x.norm(dim=1, keepdim=True)
    new = rho * r * (u * theta.cos() + t * theta.sin())
    assert torch.allclose(angular_update(x, new), theta.flatten(), rtol=1e-9, atol=0)  # (1e-16/θ)
    radial, tangential = update_split(x, new)
    assert torch.allclose(radial, (rho * theta.cos() - 1).flatten(), rtol=1e-12, atol=1e-15)
    assert torch.allclose(tangential, (rho * theta.sin()).flatten(), rtol=1e-9, atol=0)


def test_sgd_on_an_invariant_group_steps_tangentially_and_any_optimizer_is_probed():
    # scale invariance: g ⊥ w, so SGD's update -ηg has no radial part; its tangential part is
    # η‖g‖/‖w‖ and the angle atan of it; AdamW's decoupled weight decay adds a radial part −ηλ
    model, x, y = exact_setup()
    opt = torch.optim.SGD(exact_groups(model), lr=0.3)
    probe = StepProbe(opt)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    w, g = model.hidden.weight.detach().clone(), model.hidden.weight.grad.clone()
    probe.before()
    opt.step()
    entry = probe.after()["hidden.weight"]
    ratio = (0.3 * g.norm(dim=1) / w.norm(dim=1))
    assert abs(entry["radial"]) < 1e-12
    assert entry["tangential"] == pytest.approx(float(ratio.median()), rel=1e-12)
    assert entry["angle"] == pytest.approx(float(torch.atan(ratio).median()), rel=1e-12)
    radial = {}
    for decay in (0.0, 0.1):  # AdamW: w ← w(1 − ηλ) − η·m/√v, so the radial part moves by −ηλ
        model, x, y = exact_setup()
        groups = psiopt.optimizer_groups(model, mapping={"hidden.weight": "channel"}, weight_decay=decay)
        adamw = torch.optim.AdamW(groups, lr=1e-3)
        probe = StepProbe(adamw)
        adamw.zero_grad()
        F.mse_loss(model(x), y).backward()
        probe.before()
        adamw.step()
        entry = probe.after()["hidden.weight"]
        radial[decay] = entry["radial"]
        assert entry["angle"] > 0
    assert radial[0.1] - radial[0.0] == pytest.approx(-1e-3 * 0.1, rel=1e-9)
