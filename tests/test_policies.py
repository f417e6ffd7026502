"""Norm policies around any optimizer (issue 25, item 2): with torch.optim.SGD they are psiopt's
PSGD (``fixed``) and UN-SGD (``unit`` with tangent gradients), to 1e-12 in float64; the
``equilibrium`` policy turns each group by REQ's equilibrium angle, which plain AdamW and
SGD-momentum reach by themselves on a scale-invariant problem."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import psiopt
from psiopt.experiments import zoo
from psiopt.optim.diagnostics import StepProbe, angular_update
from psiopt.optim.geometry import rows
from psiopt.optim.policies import equilibrium_angle


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


@pytest.mark.parametrize("policy", ["unit", "equilibrium"])
def test_state_dict_round_trip_continues_identically(policy):
    # (``unit``: the preparation is not repeated; ``equilibrium``: needs weight decay)
    model, x, y = _setup()

    def make(m):
        groups = psiopt.optimizer_groups(m, x, weight_decay=1e-2)
        return psiopt.NormPolicy(torch.optim.SGD(groups, lr=0.1, momentum=0.9), policy, model=m,
                                 example_inputs=x)

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
        psiopt.NormPolicy(sgd, "spherical")
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


# REQ's equilibrium angular update (Kosson et al. 2024; Wan et al. 2021 for SGD), written here
# from the papers, independently of psiopt.optim.policies
def adamw_angle(lr, decay, beta1):
    return math.sqrt(2 * lr * decay * (1 - beta1) / (1 + beta1))


def sgdm_angle(lr, decay, momentum):
    return math.sqrt(2 * lr * decay / (1 + momentum))


def _invariant(group):
    return group["grouping"] not in (None, "cancelled")


INNER = {"adamw": (lambda groups: torch.optim.AdamW(groups, lr=2e-3, betas=(0.8, 0.99)),
                   lambda g: adamw_angle(g["lr"], g["weight_decay"], 0.8)),
         "sgdm": (lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
                  lambda g: sgdm_angle(g["lr"], g["weight_decay"], 0.9))}


@pytest.mark.parametrize("inner", INNER)
def test_equilibrium_turns_every_group_by_the_predicted_angle_and_keeps_its_norm(inner):
    make, predicted = INNER[inner]
    model, x, y = _setup()
    opt = make(psiopt.optimizer_groups(model, x, weight_decay=0.01, invariant_weight_decay=0.3))
    opt.param_groups[0]["lr"] *= 3  # groups of several learning rates
    policy = psiopt.NormPolicy(opt, "equilibrium", model=model, example_inputs=x)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # the angle follows it
    invariant = [(g, p) for g in opt.param_groups if _invariant(g) for p in g["params"]]
    for _ in range(4):
        for g, angle in zip(opt.param_groups, policy.equilibrium_angles()):
            assert angle == (pytest.approx(predicted(g), rel=1e-15) if _invariant(g) else None)
        before = [rows(p.detach(), g["grouping"]).clone() for g, p in invariant]
        angles = [predicted(g) for g, _ in invariant]
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        policy.step()
        scheduler.step()
        for (g, p), old, angle in zip(invariant, before, angles):
            new = rows(p.detach(), g["grouping"])
            assert torch.allclose(angular_update(old, new), torch.tensor(angle, dtype=torch.float64),
                                  rtol=1e-12, atol=0)
            assert torch.allclose(new.flatten(1).norm(dim=1), old.flatten(1).norm(dim=1), rtol=1e-13, atol=0)


def _probe_one_step(opt, model, x, y):
    probe = StepProbe(opt)
    opt.zero_grad()
    F.cross_entropy(model.train()(x), y).backward()
    probe.before()
    opt.step()
    return probe.after()


def test_equilibrium_leaves_the_other_groups_to_the_inner_step_and_the_probe_reports_the_angle():
    model, x, y = _setup()
    twin = copy.deepcopy(model)
    groups = lambda m: psiopt.optimizer_groups(m, x, weight_decay=0.01, invariant_weight_decay=0.3)  # noqa: E731
    opt = torch.optim.AdamW(groups(model), lr=1e-3)
    ours = _probe_one_step(psiopt.NormPolicy(opt, "equilibrium"), model, x, y)
    plain = _probe_one_step(torch.optim.AdamW(groups(twin), lr=1e-3), twin, x, y)
    angle = adamw_angle(1e-3, 0.3, 0.9)
    for name in ours:  # plain AdamW is given the prediction too; under the policy it is the angle
        assert ours[name]["angle_eq"] == plain[name]["angle_eq"] == pytest.approx(angle, rel=1e-15)
        assert ours[name]["angle"] == pytest.approx(angle, rel=1e-12)
    invariant = {p for g in opt.param_groups if _invariant(g) for p in g["params"]}
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (a in invariant) != torch.equal(a, b)  # the other parameters: AdamW's step
    sgd = _probe_one_step(torch.optim.SGD(groups(model), lr=0.1), model, x, y)  # α = 0
    assert all(e["angle_eq"] == pytest.approx(sgdm_angle(0.1, 0.3, 0.0)) for e in sgd.values())
    adam = _probe_one_step(torch.optim.Adam(groups(model), lr=1e-3), model, x, y)  # no formula
    assert adam and not any("angle_eq" in e for e in adam.values())


def _noise_walk(opt, w, steps, generator, tail):
    """``steps`` steps of ``opt`` on the rows of ``w`` (a linear layer followed by a per-channel
    normalisation over the batch, without eps: every row exactly scale invariant), each on fresh
    random inputs and targets; returns the root mean square of the rows' angular updates over
    the last ``tail`` steps."""
    angles = []
    for k in range(steps):
        x = torch.randn(64, w.shape[1], dtype=torch.float64, generator=generator)
        target = torch.randn(64, w.shape[0], dtype=torch.float64, generator=generator)
        opt.zero_grad()
        h = x @ w.T
        F.mse_loss((h - h.mean(0)) / h.std(0), target).backward()  # BatchNorm's, without eps
        old = w.detach().clone()
        opt.step()
        if k >= steps - tail:
            angles.append(angular_update(old, w.detach()))
    return float(torch.stack(angles).square().mean().sqrt())


THEORY = {"adamw b1=0.9": ((torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5)), adamw_angle(1e-2, 0.5, 0.9)),
          "adamw b1=0.5": ((torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5, betas=(0.5, 0.999))),
                           adamw_angle(1e-2, 0.5, 0.5)),
          "sgd a=0.9": ((torch.optim.SGD, dict(lr=0.1, weight_decay=0.05, momentum=0.9)),
                        sgdm_angle(0.1, 0.05, 0.9)),
          "sgd a=0": ((torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)), sgdm_angle(0.1, 0.05, 0.0))}


@pytest.mark.parametrize("rule", THEORY)
def test_plain_optimizers_with_weight_decay_reach_the_equilibrium_angle(rule):
    """The theory: on scale-invariant rows whose gradients are noise (fresh random inputs and
    targets), weight decay brings the angular update of plain AdamW / SGD-momentum to REQ's
    ``η̂_r``.  The rows start at norm 3, away from equilibrium (AdamW's is ‖w‖² = ηC/(2λ) =
    0.64); ``ηλ/(1 − β1)`` and ``ηλ/(1 − α)`` are 0.05 or less, so 2000 steps forget the start
    (AdamW decays ``w`` by ``e^{-10}`` over them, SGD-momentum by ``e^{-100}``), and the last 1000
    are measured.  Tolerance 2 %: the random-walk model is exact only to first order in
    ``ηλ/(1 − β1)`` and with Adam's ``v̂`` equal to ``E g²`` (β2 = 0.999 averages over ~1000
    steps); measured, the RMS angle is within 0.7 % of ``η̂_r`` (seeds 0–2).  A formula missing
    the momentum factor would be 28 % (SGD, α=0.9) to 4.4× (AdamW, β1=0.9) off."""
    (cls, settings), angle = THEORY[rule]
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, dtype=torch.float64, generator=generator)
    w = torch.nn.Parameter(3 * w / w.norm(dim=1, keepdim=True))
    opt = cls([{"params": [w], "grouping": "channel"}], **settings)
    assert equilibrium_angle(opt, opt.param_groups[0]) == pytest.approx(angle, rel=1e-15)
    assert _noise_walk(opt, w, 2000, generator, tail=1000) == pytest.approx(angle, rel=0.02)


def test_equilibrium_refuses_rules_without_a_formula_and_no_weight_decay():
    model, x, y = _setup("mlp-bn")
    found = psiopt.optimizer_groups(model, x, weight_decay=0.1)
    groups = lambda decay=0.1: [{**g, "weight_decay": decay} for g in found]  # noqa: E731
    for opt in (torch.optim.AdamW(groups(0.0)), torch.optim.SGD(groups(0.0), lr=0.1)):
        with pytest.raises(ValueError, match="weight_decay"):
            psiopt.NormPolicy(opt, "equilibrium")
    for opt in (torch.optim.Adam(groups()),  # coupled L2
                torch.optim.AdamW(groups(), amsgrad=True),
                torch.optim.SGD(groups(), lr=0.1, momentum=0.9, nesterov=True),
                torch.optim.SGD(groups(), lr=0.1, momentum=0.9, dampening=0.5),
                torch.optim.Adagrad(groups())):
        with pytest.raises(ValueError, match="no equilibrium angle"):
            psiopt.NormPolicy(opt, "equilibrium")
    decoupled = torch.optim.Adam(groups(), decoupled_weight_decay=True, betas=(0.5, 0.9))
    angles = psiopt.NormPolicy(decoupled, "equilibrium").equilibrium_angles()
    assert angles[0] == pytest.approx(adamw_angle(1e-3, 0.1, 0.5), rel=1e-15)
    # a setting changed later is refused at the step, before anything moves
    opt = torch.optim.AdamW(groups(), lr=1e-3)
    policy = psiopt.NormPolicy(opt, "equilibrium")
    opt.param_groups[0]["weight_decay"] = 0.0
    F.cross_entropy(model(x), y).backward()
    saved = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="weight_decay"):
        policy.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved))


@pytest.mark.parametrize("policy, project", [("fixed", False), ("unit", True), ("equilibrium", True)])
def test_a_compiled_policy_step_equals_the_eager_one(policy, project):
    """``torch.compile(policy.step)`` on a model whose groups include views of whole tensors
    (the first conv of conv-ReLU-conv-BN is grouped "tensor"): it resumes after torch.optim's
    graph break with the rows it made (views of ``p.detach()``; views of ``p`` made under
    no_grad and written after stopped dynamo: "A view was created in no_grad mode") and steps as
    the eager policy."""
    model, x = zoo.build("conv-ReLU-conv-BN")
    model, x = model.float(), x.float()
    out = model(x)
    y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(psiopt.optimizer_groups(m, x, weight_decay=1e-2,
                                                        invariant_weight_decay=0.1), lr=3e-3)
        wrapped = psiopt.NormPolicy(opt, policy, project=project, model=m, example_inputs=x)
        assert any(g.get("grouping") == "tensor" for g in opt.param_groups)
        torch._dynamo.reset()
        step = torch.compile(wrapped.step, backend="eager") if compiled else wrapped.step
        for _ in range(3):
            opt.zero_grad()
            o = m(x)
            F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1)).backward()
            step()
        results.append([p.detach().clone() for p in m.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_gradscaler_unscales_the_policy_once():
    """With a GradScaler, ``scaler.unscale_(policy)`` then ``scaler.step(policy)``: the inner
    step sees the gradients unscaled once (GradScaler keeps its record per optimizer object:
    ``unscale_`` on the inner optimizer, then ``step(policy)``, divided them twice)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4),
                            torch.nn.Flatten(), torch.nn.Linear(64, 2))
    x = torch.randn(4, 3, 6, 6)
    plain = copy.deepcopy(m)
    plain(x).square().mean().backward()
    opt = torch.optim.SGD(psiopt.optimizer_groups(m, x), lr=0.1)
    policy = psiopt.NormPolicy(opt, "free", model=m, example_inputs=x)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(m(x).square().mean()).backward()
    scaler.unscale_(policy)
    seen = []
    step = opt.step
    opt.step = lambda *a, **k: seen.append(m[3].weight.grad.clone()) or step(*a, **k)
    scaler.step(policy)
    torch.testing.assert_close(seen[0], plain[3].weight.grad, rtol=1e-5, atol=1e-7)


def test_equilibrium_with_a_float32_tensor_lr_keeps_the_norm_and_turns_by_the_numbers_angle():
    """The angle of a float32 ``lr`` tensor (``torch.tensor(0.05)``) is taken in float64, as the
    number's: in float32, its cosine's ``1 + (cos − 1)`` let the norm drift 1e-8 a step."""
    model, x, y = _setup()
    lr = torch.tensor(0.05, dtype=torch.float32)
    opt = torch.optim.SGD(psiopt.optimizer_groups(model, x, weight_decay=0.01, invariant_weight_decay=0.3),
                          lr=lr, momentum=0.9)
    policy = psiopt.NormPolicy(opt, "equilibrium", model=model, example_inputs=x)
    invariant = [(g, p) for g in opt.param_groups if _invariant(g) for p in g["params"]]
    angle = sgdm_angle(float(lr), 0.3, 0.9)
    for _ in range(3):
        before = [rows(p.detach(), g["grouping"]).clone() for g, p in invariant]
        opt.zero_grad()
        F.cross_entropy(model.train()(x), y).backward()
        policy.step()
        for (g, p), old in zip(invariant, before):
            new = rows(p.detach(), g["grouping"])
            assert torch.allclose(angular_update(old, new), torch.tensor(angle, dtype=torch.float64),
                                  rtol=1e-12, atol=0)
            assert torch.allclose(new.flatten(1).norm(dim=1), old.flatten(1).norm(dim=1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("policy, project", [("fixed", False), ("unit", False), ("equilibrium", False),
                                             ("free", True)])
def test_a_policy_refuses_rows_whose_squared_norm_leaves_the_dtypes_range(policy, project, scale):
    """float32 rows ×1e20 (‖w‖² overflows) or ×1e-25 (underflows): psiopt's own rules refuse
    them when built; a policy that reads row norms stepped them to NaN or to zero rows.  It
    refuses them too; "free" without the projection reads no norm and takes them."""
    torch.manual_seed(0)
    model, x = zoo.build("vgg (conv-BN)")
    with torch.no_grad():
        model[0].weight.mul_(scale)
    groups = psiopt.optimizer_groups(model, x)
    with pytest.raises(ValueError, match="squared norms outside the range of float32"):
        psiopt.NormPolicy(torch.optim.SGD(groups, lr=0.05), policy, project=project)
    psiopt.NormPolicy(torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.05), "free")


def _eval_change_after_unit(model, x, groups):
    """Max change of the eval-mode output after one "unit" step at lr 0 (BatchNorm eps 1e-14,
    running statistics estimated first): the one-time unit-normalisation alone."""
    for m in model.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-14
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(x)
    model.eval()
    with torch.no_grad():
        before = model(x)
    policy = psiopt.NormPolicy(torch.optim.SGD(groups(model), lr=0.0), "unit", model=model, example_inputs=x)
    model(x).square().sum().backward()
    policy.step()
    with torch.no_grad():
        return float((model(x) - before).abs().max() / before.abs().max())


def test_unit_on_a_tensor_part_that_feeds_a_batchnorm_keeps_the_eval_network():
    """"tensor[0:4]" (what --grouping tensor makes of "channel[0:4]"): the running statistics
    took one factor per channel of the part and raised IndexError mid-step, after the rows had
    been unit-normalised (the eval network changed by 0.055)."""
    torch.manual_seed(0)
    model, x = zoo.build("conv split: half → BN")
    mapping = {"conv.weight": "tensor[0:4]", "conv.bias": "cancelled[0:4]"}
    assert _eval_change_after_unit(model, x, lambda m: psiopt.optimizer_groups(m, x, mapping=mapping)) < 1e-5


def test_unit_finds_the_statistics_of_groups_without_param_names():
    """Groups without ``param_names`` (hand-built, or added with torch's add_param_group): the
    statistics were looked up by name only, none were found, nothing warned, and the
    unit-normalisation changed the eval network by 0.37 (of 0.21)."""
    torch.manual_seed(0)
    model, x = zoo.build("vgg (conv-BN)")
    with torch.no_grad():
        model[0].weight.mul_(3.0)

    def unnamed(m):
        groups = psiopt.optimizer_groups(m, x)
        for g in groups:
            g.pop("param_names")
        return groups
    assert _eval_change_after_unit(model, x, unnamed) < 1e-5
