"""The eval-mode network: cancelled biases are never trained, and every rescaling of rows that
psiopt does (PSI overflow guard, unit-normalisation of the sphere methods at their first step and
of B-SGD, the harness's unbalanced initialisation) carries the running statistics along (issue 7,
items 5 and 6)."""

import pytest
import torch
import torch.nn.functional as F

import psiopt
from helpers import StatsNet, eval_out, train
from psiopt.experiments.train import initialise


def setup(seed=0, eps=1e-5):
    torch.manual_seed(seed)
    model = StatsNet(eps).double()
    x = torch.randn(64, 6, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 3, (64,))
    warm = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, warm, x, y, 30)  # running statistics far from their initial 0 / 1
    return model, x, y


def test_discovery_links_rows_to_the_statistics_they_feed():
    model, x, _ = setup()
    mapping = psiopt.find_scale_invariant(model, x)
    assert mapping == {"fc.weight": "channel", "fc.bias": "cancelled", "conv.weight": "channel",
                       "seq.weight": "tensor"}
    groups = psiopt.param_groups(model, x)
    links = {n: s for g in groups if "norm_stats" in g for n, s in zip(g["param_names"], g["norm_stats"])}
    assert {n: [st.norm for st in s] for n, s in links.items()} == {
        "fc.weight": [model.bn], "conv.weight": [model.bn_conv], "seq.weight": [model.bn_seq]}
    centre, leaves = links["fc.weight"][0].bias, []  # rescaled around the fc's bias
    centre.mapped(leaves.append)
    assert len(leaves) == 1 and leaves[0] is model.fc.bias
    assert torch.equal(centre.value(torch.Tensor.detach), model.fc.bias.detach())


# BatchNorm's eps makes the network only nearly invariant: with eps = 1e-5 a rescaling changes
# the train-mode output too, by as much as the eval-mode one; with eps = 1e-12 both are exact.
TOLERANCE = [(1e-5, 1e-4), (1e-12, 1e-10)]


@pytest.mark.parametrize("eps, tol", TOLERANCE)
@pytest.mark.parametrize("foreach", [False, True])
def test_forced_guard_leaves_the_eval_mode_network_unchanged(foreach, eps, tol):
    model, x, _ = setup(eps=eps)
    norms = model.fc.weight.norm(dim=1).clone()
    opt = psiopt.PSISGD(psiopt.param_groups(model, x), lr=1e-12, fixed_norm=False, max_norm=1e-3,
                        guard_every=1, foreach=foreach)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.zeros(64, dtype=torch.long)).backward()
    before = eval_out(model, x)  # after the forward pass that updated the statistics
    opt.step()
    assert torch.allclose(model.fc.weight.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert (norms - 1).abs().min() > 0.05  # the guard really rescaled every row
    after = eval_out(model, x)
    assert (after - before).abs().max() <= tol * before.abs().max()


@pytest.mark.parametrize("eps, tol", TOLERANCE)
@pytest.mark.parametrize("name", ["un-sgd", "sgdg", "adamg", "adamg-star", "b-sgd"])
def test_unit_normalisation_leaves_the_eval_mode_network_unchanged(name, eps, tol):
    """B-SGD and the sphere methods normalise at their first step (here at lr 0, so that the
    step itself changes nothing); building them changes nothing."""
    model, x, y = setup(eps=eps)
    before = eval_out(model, x)
    assert (model.fc.weight.norm(dim=1) - 1).abs().min() > 0.05
    opt = psiopt.create_optimizer(model, name, x, lr=0.0)
    assert torch.equal(eval_out(model, x), before)
    F.cross_entropy(model(x), y).backward()
    before = eval_out(model, x)  # after the forward pass that updated the statistics
    opt.step()
    assert torch.allclose(model.fc.weight.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(model.seq.weight.norm(), torch.tensor(1.0, dtype=torch.float64))
    after = eval_out(model, x)
    assert (after - before).abs().max() <= tol * before.abs().max()


def test_unbalanced_initialisation_is_an_equivalent_network_in_eval_mode_too():
    model, x, _ = setup(eps=1e-12)
    before = eval_out(model, x)
    initialise(model, "unbalanced", psiopt.param_groups(model, x))
    assert model.fc.weight[0].norm() > 100 and model.fc.weight[-1].norm() < 1e-2
    after = eval_out(model, x)  # eps = 1e-12 against variances ~1e-8 of the ×1e-4 rows: 1e-4
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_cancelled_biases_are_never_updated(name):
    """A bias before BatchNorm gets rounding noise times 1/σ as its gradient; with a tiny eps
    that noise is large.  No registered optimizer may train it."""
    model, x, y = setup(eps=1e-12)
    bias = model.fc.bias.detach().clone()
    opt = psiopt.create_optimizer(model, name, x)
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.fc.bias.grad = torch.ones_like(bias)  # any optimizer that steps it would move it
        opt.step()
    assert torch.equal(model.fc.bias, bias)
    assert not torch.equal(model.head.bias, setup(eps=1e-12)[0].head.bias)  # others do move


@pytest.mark.parametrize("name", ["un-sgd", "adamg-star"])
def test_harness_applies_the_unbalanced_init_before_the_sphere_normalisation(name):
    from psiopt.experiments.train import RunConfig, build

    _, _, opt, _ = build(RunConfig(dataset="synthetic", model="mlp-bn", optimizer=name,
                                   init="unbalanced", subset=64, threads=1))
    groups = [g for g in opt.param_groups if g["grouping"] == "channel"]
    assert groups
    assert not opt.state  # building the optimizer prepared nothing: the rows are unbalanced
    assert groups[0]["params"][0].norm(dim=1).max() > 100
    opt.prepare()  # what the first step does
    for p in groups[0]["params"]:
        assert torch.allclose(p.norm(dim=1), torch.ones(p.shape[0]), atol=1e-5)
    if name == "adamg-star":  # r4 = r0⁴ was taken from the unbalanced rows
        v = opt.state[groups[0]["params"][0]]["r4"].flatten()
        assert v.max() / v.min() > 1e30
