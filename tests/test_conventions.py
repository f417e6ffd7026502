"""torch.optim conventions, reference-vs-vectorized agreement, bad input, and training smoke tests."""

import copy

import pytest
import torch
import torch.nn.functional as F

import psiopt
from helpers import bn_data, bn_net, train

PSIOPT_CLASSES = [psiopt.PSISGD, psiopt.UnitNormSGD, psiopt.ProjectedSGD, psiopt.SGDG,
                  psiopt.AdamG, psiopt.AdamS, psiopt.AdamSRT, psiopt.SGDMRT, psiopt.AdamGStar]


def groups(model, x):
    return psiopt.param_groups(model, x, lr=0.05, weight_decay=1e-3, invariant_lr=0.05)


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_state_dict_round_trip_continues_exactly(name):
    x, y = bn_data()
    model = bn_net()
    opt = psiopt.create_optimizer(model, name, x)
    train(model, opt, x, y, 5)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, 5)

    other = bn_net(seed=7)
    other_opt = psiopt.create_optimizer(other, name, x)
    other.load_state_dict(saved_model)
    other_opt.load_state_dict(saved_opt)
    train(other, other_opt, x, y, 5)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", PSIOPT_CLASSES, ids=lambda c: c.__name__)
def test_lr_scheduler_changes_the_step(cls):
    x, y = bn_data()
    a, b = bn_net(), bn_net()
    opt_a = cls(groups(a, x))
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.1)
    train(a, opt_a, x, y, 1)
    sched.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.005)
    train(a, opt_a, x, y, 1)
    opt_b = cls(groups(b, x))
    train(b, opt_b, x, y, 1)
    for group in opt_b.param_groups:
        group["lr"] *= 0.1
    train(b, opt_b, x, y, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = bn_net()
    opt_c = cls(groups(c, x))
    train(c, opt_c, x, y, 2)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("cls", PSIOPT_CLASSES, ids=lambda c: c.__name__)
def test_closure_and_parameters_without_grad(cls):
    x, y = bn_data()
    model = bn_net()
    opt = cls(groups(model, x))
    frozen = model[0].weight
    before = frozen.detach().clone()  # after construction (sphere methods normalise rows there)
    state_before = copy.deepcopy(dict(opt.state.get(frozen, {})))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        frozen.grad = None
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert torch.equal(frozen, before)
    state_after = dict(opt.state.get(frozen, {}))
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("kwargs, word", [
    ({"lr": -1.0}, "lr"), ({"momentum": 1.5}, "momentum"), ({"weight_decay": -1}, "weight_decay"),
    ({"max_norm": 0.0}, "max_norm"), ({"grouping": "rows"}, "grouping"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, word):
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=word):
        psiopt.PSISGD([{"params": [p], "grouping": "channel"}], **kwargs)


def test_grouping_that_does_not_fit_the_shape_is_rejected_at_construction():
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="do not split"):
        psiopt.PSISGD([p], grouping="groups:2")


@pytest.mark.parametrize("cls, kwargs, word", [
    (psiopt.AdamS, {"betas": (1.0, 0.9)}, "betas"), (psiopt.AdamSRT, {"eps": -1.0}, "eps"),
    (psiopt.SGDG, {"clip": 0.0}, "clip"), (psiopt.AdamG, {"ortho": -1.0}, "ortho"),
    (psiopt.UnitNormSGD, {"weight_decay": 1e-4}, "weight_decay"),
])
def test_invalid_hyperparameters_other_classes(cls, kwargs, word):
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=word):
        cls([{"params": [p], "grouping": "channel"}], **kwargs)


def test_registry_errors():
    model = bn_net()
    x, _ = bn_data()
    with pytest.raises(ValueError, match="unknown optimizer"):
        psiopt.create_optimizer(model, "sgdx", x)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        psiopt.create_optimizer(model, "psi-sgd", x, betas=(0.9, 0.9))


def test_plain_parameters_warn():
    with pytest.warns(UserWarning, match="grouping"):
        psiopt.PSISGD(bn_net().parameters())


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_every_registered_optimizer_lowers_the_loss(name):
    x, y = bn_data(n=64, dtype=torch.float32)
    model = bn_net(dtype=torch.float32)
    opt = psiopt.create_optimizer(model, name, x)
    losses = train(model, opt, x, y, 60)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    # paper defaults, full batch: PSI-SGD at lr 1.0 oscillates here, so compare the best loss
    # of the second half of training with the first loss
    assert min(losses[30:]) < 0.8 * losses[0], losses[::10]


#: zero rows stay exactly zero under these (steps scale with ‖w‖, or rows have no direction);
#: the others take Euclidean steps and move a zero row as torch's SGD/Adam would (README)
ZERO_STAYS = {"psi-sgd", "psi-sgdm", "psgd", "un-sgd", "sgdg", "adamg", "adamg-star"}


def zero_row_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),  # with a bias
        torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3)).double()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_zero_rows_behave_as_the_readme_says(name, foreach):
    x, y = bn_data()
    model = zero_row_net()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[3].weight[:2].zero_()  # one whole GroupNorm group
        model[1].bias.fill_(0.5)  # so that the ReLU passes the zero channels' gradient
        model[4].bias.fill_(0.5)
    opt = psiopt.create_optimizer(model, name, x, foreach=foreach)
    F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad[2].abs().max() > 0  # the zero row does get a gradient
    train(model, opt, x, y, 5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = (model[0].weight[2], model[3].weight[:2])
    if name in ZERO_STAYS:
        assert all(torch.count_nonzero(r) == 0 for r in rows)
    else:
        assert all(torch.count_nonzero(r) > 0 for r in rows)


@pytest.mark.parametrize("cls", PSIOPT_CLASSES, ids=lambda c: c.__name__)
def test_non_finite_gradient_raises_and_updates_nothing(cls):
    x, y = bn_data()
    model = bn_net()
    opt = cls(groups(model, x), check_finite=True)
    train(model, opt, x, y, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="3.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sparse_and_complex_gradients_raise():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = psiopt.PSISGD([{"params": [emb.weight], "grouping": "channel"}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        psiopt.AdamS([{"params": [z], "grouping": "channel"}]).step()


def test_non_finite_gradient_propagates_by_default_like_torch_optim():
    x, y = bn_data()
    model = bn_net()
    opt = psiopt.PSISGD(groups(model, x))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    w = model[3].weight.detach()
    assert torch.isnan(w).sum() == 1 and torch.isnan(w[0, 0, 0, 0])


# -- validation before mutation, registry settings for added groups (issue 7, items 2, 8, 9) -------
def test_momentum_on_rows_of_rules_without_momentum_is_rejected():
    p = torch.nn.Parameter(torch.randn(3, 4))
    for cls in (psiopt.UnitNormSGD, psiopt.AdamGStar):
        with pytest.raises(ValueError, match="momentum"):
            cls([{"params": [p], "grouping": "channel"}], momentum=0.9)
        cls([{"params": [p], "grouping": "channel", "momentum": 0.0},
             {"params": [torch.nn.Parameter(torch.randn(2))]}], momentum=0.9)  # others: fine
    model = bn_net()
    x, _ = bn_data()
    with pytest.raises(ValueError, match="momentum"):
        psiopt.create_optimizer(model, "un-sgd", x, momentum=0.9)
    psiopt.create_optimizer(model, "un-sgd", x, other_momentum=0.9)


@pytest.mark.parametrize("bad, word", [
    ({"grouping": "groups:3"}, "do not split"), ({"guard_every": 0}, "guard_every"),
    ({"lr": -0.1}, "lr"), ({"momentum": "0.9"}, "momentum"), ({"fixed_norm": 1}, "fixed_norm"),
])
def test_add_param_group_validates_before_appending(bad, word):
    model = bn_net()
    x, _ = bn_data()
    opt = psiopt.PSISGD(psiopt.param_groups(model, x))
    count = len(opt.param_groups)
    extra = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=word):
        opt.add_param_group({"params": [extra], "grouping": "channel", **bad})
    assert len(opt.param_groups) == count


@pytest.mark.parametrize("cls, kwargs, word", [
    (psiopt.AdamS, {"betas": 0.9}, "betas"), (psiopt.AdamG, {"betas": (0.9,)}, "betas"),
    (psiopt.PSISGD, {"guard_every": 2.5}, "guard_every"), (psiopt.PSISGD, {"lr": None}, "lr"),
])
def test_malformed_hyperparameters_raise_value_error(cls, kwargs, word):
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=word):
        cls([{"params": [p], "grouping": "channel"}], **kwargs)
    with pytest.raises(ValueError, match=word):
        cls([{"params": [p], "grouping": "channel", **kwargs}])


def test_nothing_is_changed_before_everything_is_valid():
    model = bn_net()
    x, _ = bn_data()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="bogus"):
        psiopt.create_optimizer(model, "b-sgd", x, bogus=1)
    with pytest.raises(ValueError, match="lr"):
        psiopt.create_optimizer(model, "un-sgd", x, other_lr=-1.0)
    groups = psiopt.param_groups(model, x)
    groups[-1]["weight_decay"] = -1.0  # the last group is bad: the first must not be normalised
    with pytest.raises(ValueError, match="weight_decay"):
        psiopt.SGDG(groups)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("foreach", [False, True])
def test_projected_sgd_takes_a_group_mixing_dtypes(foreach):
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(2, 5, dtype=torch.float64))
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    norms = [a.norm(dim=1).clone(), b.norm(dim=1).clone()]
    psiopt.ProjectedSGD([a, b], grouping="channel", lr=0.1, foreach=foreach).step()
    assert torch.allclose(a.norm(dim=1), norms[0]) and torch.allclose(b.norm(dim=1), norms[1])


STAY_UNIT = {"un-sgd", "sgdg", "adamg", "adamg-star"}  # on the sphere after every step


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_add_param_group_on_a_registry_optimizer_takes_the_registry_settings(name):
    """Generators (read once), the registry's settings, placeholder names, and rows left alone
    when the group is added (B-SGD and the sphere methods normalise at the first step)."""
    from psiopt.optim.registry import settings

    model = bn_net()
    x, _ = bn_data()
    opt = psiopt.create_optimizer(model, name, x)
    head = torch.nn.Linear(3, 4).double()
    extra = torch.nn.Linear(3, 5, bias=False).double()
    with torch.no_grad():
        extra.weight.mul_(3.0)
    start = extra.weight.detach().clone()
    opt.add_param_group({"params": head.parameters()})
    opt.add_param_group({"params": extra.parameters(), "grouping": "channel"})
    invariant, other = settings(name)
    for group, expected, count in zip(opt.param_groups[-2:], (other, invariant), (2, 1)):
        assert len(group["params"]) == count
        assert {k: group[k] for k in expected} == expected
        assert len(group["param_names"]) == len(group["params"])
    assert torch.equal(extra.weight, start)  # not normalised when added
    before = [p.detach().clone() for p in (*head.parameters(), extra.weight)]
    opt.zero_grad()
    out = model(x)
    F.cross_entropy(out + 1e-2 * head(out)[:, :3] + 1e-2 * extra(out)[:, :3], bn_data()[1]).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, (*head.parameters(), extra.weight)))
    if name in STAY_UNIT:
        assert torch.allclose(extra.weight.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_create_optimizer_from_groups_keeps_what_the_groups_set():
    """Registry defaults fill in what a group lacks; a group's own key wins over them; a keyword
    passed to create_optimizer wins over both."""
    model = bn_net()
    x, _ = bn_data()
    groups = psiopt.param_groups(model, x)
    groups[-1]["lr"] = 0.123
    groups[-1]["momentum"] = 0.5
    opt = psiopt.create_optimizer(groups, "psi-sgdm")
    inv, rest = opt.param_groups[0], opt.param_groups[-1]
    assert (inv["lr"], inv["momentum"]) == (0.1, 0.9)  # registry
    assert (rest["lr"], rest["momentum"], rest["weight_decay"]) == (0.123, 0.5, 0.0)
    opt = psiopt.create_optimizer(psiopt.param_groups(model, x), "psi-sgdm", lr=0.5, other_momentum=0.3)
    assert (opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]) == (0.5, 0.5)
    assert opt.param_groups[-1]["momentum"] == 0.3


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "b-sgd", "psi-sgd", "un-sgd"])
def test_cancelled_groups_stay_put_whatever_a_scheduler_writes(name):
    """OneCycleLR sets every group's lr from max_lr; a cancelled bias with a large gradient
    must still not move (torch baselines: forced to a zero step; psiopt: skipped)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3))  # the first bias is cancelled
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = psiopt.create_optimizer(model, name, x, other_momentum=0.0) if name == "un-sgd" else \
        psiopt.create_optimizer(model, name, x)
    cancelled = [g for g in opt.param_groups if g["grouping"] == "cancelled"]
    assert len(cancelled) == 1
    bias = cancelled[0]["params"][0]
    start = bias.detach().clone()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10,
                                                cycle_momentum=False)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        bias.grad = torch.ones_like(bias)
        opt.step()
        sched.step()
    assert torch.equal(bias, start)


def test_a_cancelled_group_added_to_a_baseline_is_not_trained():
    w, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = psiopt.optim.baselines.Adam([w], lr=0.1)
    opt.add_param_group({"params": [b], "grouping": "cancelled", "lr": 0.1})
    starts = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.equal(b, starts[1]) and not torch.equal(w, starts[0])


def test_placeholder_names_are_not_left_behind_when_torch_refuses_a_group():
    a = torch.nn.Parameter(torch.randn(3))
    opt = psiopt.optim.baselines.SGD([a], lr=0.1)
    with pytest.raises(ValueError, match="appear in more than one"):
        opt.add_param_group({"params": [a], "param_names": ["a"]})
    assert "param_names" not in opt.param_groups[0] and len(opt.param_groups) == 1


def test_settings_a_scheduler_writes_are_checked_at_each_step():
    """OneCycleLR's cycle_momentum writes a momentum into UN's invariant group; coupled L2 added
    to a fixed-norm PSI group: refused at the next step, nothing updated."""
    model = bn_net()
    x, y = bn_data()
    groups = psiopt.param_groups(model, x)
    opt = psiopt.create_optimizer(groups[::-1], "un-sgd")  # the ordinary group first
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="invalid momentum for an invariant group of UnitNormSGD"):
        opt.step()
    opt = psiopt.create_optimizer(model, "psi-sgd", x)
    assert [g["grouping"] for g in opt.param_groups][:3] == ["channel", "groups:4", "tensor"]
    opt.param_groups[2]["weight_decay"] = 1e-3  # the first two groups are fine
    with pytest.raises(ValueError, match="fixed_norm=False"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="fixed_norm=False"):
        psiopt.create_optimizer(model, "psi-sgdm", x, invariant_weight_decay=1e-3)
    psiopt.create_optimizer(model, "psi-sgdm", x, invariant_weight_decay=1e-3, fixed_norm=False)
    with pytest.raises(ValueError, match="lr·weight_decay"):
        psiopt.create_optimizer(model, "adamg-star", x, lr=1.0, weight_decay=1.0)


@pytest.mark.parametrize("cls", PSIOPT_CLASSES, ids=lambda c: c.__name__)
def test_torch_settings_the_rules_do_not_implement_are_refused(cls):
    """A group that asks for torch.optim's maximize (or Nesterov, dampening, AMSGrad, Adam's
    decoupled weight decay (was: accepted, and stepped as coupled L2)...) is
    refused, in either kind of group and when written after construction, not stepped as a plain
    minimisation; the value torch.optim's state dicts hold (False, 0) is accepted."""
    model = bn_net()
    x, y = bn_data()
    groups = psiopt.param_groups(model, x)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    for key, value in [("maximize", True), ("nesterov", True), ("dampening", 0.5),
                       ("amsgrad", True), ("differentiable", True), ("decoupled_weight_decay", True)]:
        for i in range(2):  # the invariant group, then the ordinary one
            with pytest.raises(ValueError, match=f"does not implement torch.optim's {key}"):
                cls([{**g, key: value} if j == i else dict(g) for j, g in enumerate(groups)])
        opt = cls([{**g, key: type(value)(0)} for g in groups])
        opt.param_groups[-1][key] = value
        with pytest.raises(ValueError, match=key):
            opt.step()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_an_optimizer_survives_pickling():
    import pickle

    model = bn_net()
    x, y = bn_data()
    for name in ("sgd", "b-sgd", "psi-sgdm"):
        opt = psiopt.create_optimizer(model, name, x, lr=0.01)
        again = pickle.loads(pickle.dumps(opt))
        assert again.invariant_defaults == opt.invariant_defaults
        for _ in range(3):
            again.load_state_dict(opt.state_dict())
        assert len(again._optimizer_step_pre_hooks) == len(opt._optimizer_step_pre_hooks)
        again.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 3))], "grouping": "channel"})


def test_adamg_star_through_the_registry_is_theorem4_as_written():
    model = bn_net()
    x, _ = bn_data()
    opt = psiopt.create_optimizer(model, "adamg-star", x, lr=0.01, weight_decay=0.025)
    for group in opt.param_groups:
        if group["grouping"] != "cancelled":
            assert (group["lr"], group["weight_decay"]) == (0.01, 0.025)
            assert group["momentum"] == 0.0


def test_a_generator_of_parameters_is_read_once():
    model = bn_net()
    opt = psiopt.PSISGD([{"params": model[0].parameters(), "grouping": "channel"},
                         {"params": (p for p in model[1:].parameters())}])
    assert [len(g["params"]) for g in opt.param_groups] == [1, len(list(model[1:].parameters()))]


def test_adamg_star_from_param_groups_refuses_two_lambdas():
    """param_groups gives invariant groups weight_decay=0: Theorem 4 needs one λ, so the groups
    path must not silently train the rows without it; weight_decay=λ sets every group."""
    model = bn_net()
    x, _ = bn_data()
    with pytest.raises(ValueError, match="one weight_decay"):
        psiopt.create_optimizer(psiopt.param_groups(model, x), "adamg-star")
    opt = psiopt.create_optimizer(psiopt.param_groups(model, x), "adamg-star", weight_decay=1e-3)
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-3}


def test_adamg_star_reads_the_state_of_earlier_versions():
    """Earlier versions saved Roburin's v = r4/(2η²(1 − ηλ)²); loading it gives the same steps."""
    model, x = bn_net(), bn_data()[0]
    opt = psiopt.create_optimizer(model, "adamg-star", x, lr=0.05, weight_decay=1e-3)
    train(model, opt, x, bn_data()[1], 2)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        if "r4" in state:
            state["v"] = state.pop("r4") / (2 * 0.05**2 * (1 - 0.05 * 1e-3) ** 2)
    twin = copy.deepcopy(model)
    other = psiopt.create_optimizer(twin, "adamg-star", x, lr=0.05, weight_decay=1e-3)
    other.load_state_dict(saved)
    train(model, opt, x, bn_data()[1], 3)
    train(twin, other, x, bn_data()[1], 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_named_parameters_are_taken_as_torch_does():
    model = bn_net()
    opt = psiopt.PSISGD([{"params": list(model[0].named_parameters()), "grouping": "channel"},
                         {"params": model[1:].named_parameters()}])
    assert opt.param_groups[0]["param_names"] == ["weight"]
    assert len(opt.param_groups[1]["params"]) == len(list(model[1:].parameters()))


@pytest.mark.parametrize("name", ["sgd", "b-sgd", "adam", "adamw"])
def test_fused_baselines_refuse_a_parameter_that_is_not_contiguous(name):
    """torch's fused SGD/Adam (2.13, CPU) read the gradient with the parameter's strides: a
    ``[..., :1]`` slice of a larger tensor was stepped wrongly, silently (0.79 off the
    ``fused=False`` step for SGD with momentum); with fused=True it is refused, nothing updated,
    and the default steps it as torch's unfused step does."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, 5, 5)
    grads = [torch.randn(4, 3, 5, 1) for _ in range(2)]
    ends = []
    for kw in ({"fused": True}, {}, {"foreach": False}):
        p = torch.nn.Parameter(base.clone()[:, :, :, :1])
        opt = psiopt.create_optimizer([p], name, lr=0.1, **kw)
        before = p.detach().clone()
        for g in grads:
            p.grad = g.clone()
            if kw.get("fused"):
                with pytest.raises(ValueError, match="not contiguous"):
                    opt.step()
                assert torch.equal(p.detach(), before)
                break
            opt.step()
        else:
            ends.append(p.detach().clone())
    torch.testing.assert_close(ends[0], ends[1])
