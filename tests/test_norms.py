"""Exactly invariant normalisation layers (Arora, Li & Lyu eq. 8) and the eps diagnostic (issue 24).

Ground truth as in the papers' statement: rescale a group of rows by 1e-6 … 1e6 in float64 and
watch the outputs, in train and in eval mode, with torch's default eps (1e-5) left in place.
"""

import copy

import pytest
import torch
from torch import nn

import psiopt
from psiopt.experiments import zoo
from psiopt.norms import EXACT, EpsMonitor, eps_ratios, exact_norms_
from psiopt.optim.geometry import rows

MODELS = ["mlp-bn", "vgg (conv-BN)", "RMSNorm MLP", "QK-norm (LayerNorm), separate qkv, no bias",
          "LN gain → linear → LN", "tokens: LN → linear → BN (LeViT-style)", "resnet20 (BN)"]


def _outputs(model, x, training):
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        model.train(training)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        model.load_state_dict(saved)  # a train pass moves the running statistics: put back
    return out


def _rescale(model, x, mapping):
    """Largest relative output change (train, eval) when each converted layer's weight has its
    groups multiplied by factors from 1e-6 to 1e6."""
    base = (_outputs(model, x, True), _outputs(model, x, False))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    worst = [0.0, 0.0]
    for name in mapping.values():
        p = params[name]
        grouping = psiopt.find_scale_invariant(model, x).get(name, "tensor")
        saved = p.detach().clone()
        view = rows(p.data, grouping)
        factors = 10.0 ** (12 * torch.rand(view.shape[0], generator=gen, dtype=p.dtype) - 6)
        factors[0] = 1e-6  # at least one group far below eps
        with torch.no_grad():
            view.mul_(factors.view(-1, *[1] * (view.dim() - 1)))
        for i, training in enumerate((True, False)):
            out = _outputs(model, x, training)
            worst[i] = max(worst[i], float((out - base[i]).abs().max() / base[i].abs().max()))
        with torch.no_grad():
            p.copy_(saved)
    return worst


@pytest.mark.parametrize("name", MODELS)
def test_converted_layers_are_exactly_invariant_at_any_scale(name):
    model, x = zoo.build(name)
    model, x = model.double(), x.double()
    for m in model.modules():
        if isinstance(m, nn.RMSNorm):
            m.eps = 1e-5  # (None: the dtype's epsilon, 2e-16 in float64)
    with torch.no_grad():
        model.train()(x)  # running statistics from data
    mapping = exact_norms_(copy.deepcopy(model), x)
    assert mapping, "nothing converted"
    plain = _rescale(model, x, mapping)  # torch's layers: eps breaks the invariance
    assert max(plain) > 1e-3, plain
    converted = exact_norms_(model, x)
    assert converted == mapping
    assert all(isinstance(m, tuple(EXACT.values())) for n, m in model.named_modules() if n in mapping)
    train, eval_ = _rescale(model, x, mapping)
    assert train < 1e-9 and eval_ < 1e-9, (train, eval_)


def test_conversion_keeps_the_state_dict_and_changes_eval_outputs_only_by_eps():
    model, x = zoo.build("vgg (conv-BN)")
    model, x = model.double(), x.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-14  # eps·‖w‖² and eps both negligible: the layers compute the same
    with torch.no_grad():
        model.train()(x)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    before = _outputs(model, x, False), _outputs(model, x, True)
    assert exact_norms_(model, x) == {"1": "0.weight", "4": "3.weight"}
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    after = _outputs(model, x, False), _outputs(model, x, True)
    for a, b in zip(after, before):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    # the same state dict loads into a fresh, unconverted model and back
    fresh = zoo.build("vgg (conv-BN)")[0].double()
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())


def test_discovery_sees_the_converted_layers_and_links_no_statistics():
    model, x = zoo.build("mlp-bn")
    exact_norms_(model, x)
    mapping = psiopt.find_scale_invariant(model, x)
    assert mapping == {"net.1.weight": "channel", "net.1.bias": "cancelled",
                       "net.4.weight": "channel", "net.4.bias": "cancelled"}
    for group in psiopt.param_groups(model, x):
        for stats in group.get("norm_stats") or []:
            assert all(st.index is not None and bool((st.index < 0).all()) for st in stats) or not stats


def test_conversion_has_no_side_effects_beyond_the_layers():
    model, x = zoo.build("resnet20 (BN)")
    with torch.no_grad():
        model.train()(x)
    model.eval()
    state, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    converted = exact_norms_(model, x)
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    for k, v in model.state_dict().items():
        layer = k.rpartition(".")[0]
        if layer in converted and k.endswith(("running_mean", "running_var")):
            continue
        assert torch.equal(v, state[k]), k


def test_layers_no_single_weight_feeds_are_left_alone():
    # a sum of two convs before a BatchNorm: no one weight scales its input
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(3, 4, 3, bias=False)
            self.bn, self.head = nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.bn(self.a(x) + self.b(x)).mean((2, 3)))

    model = Two()
    assert exact_norms_(model, torch.randn(2, 3, 6, 6)) == {}
    assert type(model.bn) is nn.BatchNorm2d


def _unbalanced(model):
    """Half the rows of every Linear feeding a BatchNorm ×1e-4 (the unbalanced initialisation)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 128:
                m.weight[64:].mul_(1e-4)
                m.bias.zero_()


def test_eps_ratios_find_the_rows_eps_hides_and_the_exact_layers_do_not():
    model, x = zoo.build("mlp-bn")
    x = torch.randn(32, 1, 4, 4)
    _unbalanced(model)
    ratios = eps_ratios(model, x)
    assert set(ratios) == {"net.2", "net.5"}
    small = ratios["net.2"] < 1
    assert bool(small[64:].all()) and not bool(small[:64].any())
    with EpsMonitor(model) as monitor:
        model.train()(x)
        assert monitor.below(1.0)[0] == int(sum((r < 1).sum() for r in ratios.values()))
        assert monitor.below(1.0)[1] == 256
        model.eval()(x)  # eval passes are not counted
        assert monitor.below(1.0)[1] == 256
    exact_norms_(model, x)
    assert all(bool((r > 1).all()) for r in eps_ratios(model, x).values())


def test_a_converted_model_trains_with_psi_and_keeps_its_eval_network_under_rescaling():
    # float64: in float32 the layer's z − b loses the digits of rows far below the bias
    # (a relative 5e-4 for rows ×1e-6 here), the cancellation of the bias being in the data
    model, x = zoo.build("mlp-bn")
    model, x, y = model.double(), x.double(), torch.randint(0, 10, (8,))
    exact_norms_(model, x)
    opt = psiopt.create_optimizer(model, "psi-sgdm", x, lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.train()(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    before = _outputs(model, x, False)
    with torch.no_grad():
        model.net[1].weight.mul_(1e-6)  # a dead layer for torch's BatchNorm, not for this one
    after = _outputs(model, x, False)
    assert torch.allclose(after, before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))


def test_the_harness_counts_groups_under_eps_warns_once_and_trains_with_exact_layers(tmp_path):
    import json

    from psiopt.experiments.report import summary_table
    from psiopt.experiments.train import RunConfig, train

    config = RunConfig(dataset="synthetic", model="mlp-bn", optimizer="psi-sgd", epochs=3,
                       init="unbalanced", subset=256)
    logged = []
    metrics = train(config, tmp_path / "plain", log=logged.append, progress=False)
    assert [m["eps_groups"] for m in metrics] == [256] * 3
    assert all(m["eps_below"] == 128 for m in metrics)  # PSI keeps the ×1e-4 rows' norms
    assert sum("below their eps" in line for line in logged) == 1
    assert "| 128.0 of 256 |" in summary_table({"psi-sgd": [(config.__dict__, metrics)]})
    exact = RunConfig(**{**config.__dict__, "exact_norms": True})
    logged = []
    metrics = train(exact, tmp_path / "exact", log=logged.append, progress=False)
    assert all(m["eps_below"] == 0 for m in metrics)
    assert not any("below their eps" in line for line in logged)
    assert json.loads((tmp_path / "exact" / "config.json").read_text())["exact_norms"] is True


def test_the_harness_refuses_exact_layers_it_cannot_honour():
    from psiopt.experiments.train import RunConfig, RunError, build

    with pytest.raises(RunError, match="sync_bn"):
        build(RunConfig(dataset="synthetic", model="mlp-bn", exact_norms=True, sync_bn=True))
    with pytest.raises(RunError, match="none can be made exact"):  # no normalisation layer
        build(RunConfig(dataset="synthetic", model="arora-vgg", exact_norms=True, subset=16,
                        model_kwargs={"batch_norm": False}))


def test_the_layer_reads_its_weight_from_the_module_replaced_parameters_included():
    # review: a replaced Parameter (load_state_dict(assign=True)) left the layer dividing by the
    # norm of the old tensor (train output change 0.83 under rows ×1e-6)
    model, x = zoo.build("mlp-bn")
    model, x = model.double(), x.double()
    exact_norms_(model, x)
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    before = _outputs(model, x, True)
    with torch.no_grad():
        model.net[1].weight.mul_(1e-6)
    assert torch.allclose(_outputs(model, x, True), before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))
