import pytest
import torch
from torch import nn

import psiopt
from psiopt.experiments.models import create_model


def found(model, *shape):
    return psiopt.find_scale_invariant(model, torch.randn(*shape))


def test_plain_cifar_resnet_every_conv_is_channel_invariant():
    model = create_model("resnet20")
    mapping = found(model, 2, 3, 32, 32)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert mapping == {f"{c}.weight": "channel" for c in convs}
    assert "features.0.weight" in mapping  # the stem conv feeds BN
    assert "fc.weight" not in mapping and "fc.bias" not in mapping


def test_preact_block_second_conv_feeds_the_sum_and_is_not_invariant():
    model = create_model("preact-resnet20")
    mapping = found(model, 2, 3, 32, 32)
    block = "features.1.body"
    assert mapping[f"{block}.2.weight"] == "channel"  # conv1 → bn2
    assert f"{block}.5.weight" not in mapping  # conv2 → residual sum
    assert "features.0.weight" not in mapping  # stem feeds bn1 *and* the shortcut
    assert len(mapping) == 9


def test_vgg_conv_bn_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    assert found(model, 2, 3, 8, 8) == {"0.weight": "channel", "0.bias": "cancelled",
                                        "3.weight": "channel"}


def test_mlp_batchnorm1d_bias_is_cancelled():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2))
    assert found(model, 4, 5) == {"0.weight": "channel", "0.bias": "cancelled"}


@pytest.mark.parametrize("bias, expected", [(False, {"0.weight": "groups:2"}), (True, {})])
def test_groupnorm_with_and_without_bias(bias, expected):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    assert found(model, 2, 3, 6, 6) == expected


def test_groupnorm_with_one_channel_per_group_is_per_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.GroupNorm(4, 4))
    assert found(model, 2, 3, 6, 6) == {"0.weight": "channel", "0.bias": "cancelled"}


@pytest.mark.parametrize("bias, expected", [(False, {"0.weight": "tensor"}), (True, {})])
def test_layernorm_with_and_without_bias(bias, expected):
    model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    assert found(model, 3, 5) == expected


def test_instancenorm_and_layernorm_over_spatial_dims_are_per_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.LayerNorm(4))
    assert found(model, 2, 3, 6, 6) == {"0.weight": "channel", "2.weight": "channel",
                                        "0.bias": "cancelled", "2.bias": "cancelled"}


def test_conv_transpose_then_bn_groups_on_dim_one():
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d(5))
    mapping = found(model, 2, 3, 4, 4)
    assert mapping == {"0.weight": "channel@1", "0.bias": "cancelled"}
    assert psiopt.check_invariance(model, torch.randn(4, 3, 4, 4), mapping).ok


class Tied(nn.Module):
    def __init__(self, second_normalised=True):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.bn1, self.bn2 = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.second_normalised = second_normalised

    def forward(self, x):
        h = torch.relu(self.bn1(self.a(x)))
        h = self.b(h)
        return self.bn2(h) if self.second_normalised else h


@pytest.mark.parametrize("normalised, expected", [(True, {"a.weight": "channel"}), (False, {})])
def test_tied_weight_invariant_only_if_every_use_is(normalised, expected):
    assert found(Tied(normalised), 6, 4) == expected


class Functional(nn.Module):
    """The weight is also used outside its module: not invariant."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x)) + x @ self.lin.weight.T


def test_functional_extra_use_is_not_invariant():
    assert found(Functional(), 6, 4) == {}


class Branchy(nn.Module):
    """Python ``if``/``for`` in forward: traced from the real pass."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.norms = nn.ModuleList(nn.BatchNorm1d(4) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for i, (lin, bn) in enumerate(zip(self.layers, self.norms)):
            x = torch.relu(bn(lin(x))) if i % 2 == 0 else x + lin(x)
        if x.shape[0] > 1:
            x = x * 2
        return self.head(x)


def test_python_control_flow():
    assert found(Branchy(), 5, 4) == {"layers.0.weight": "channel", "layers.2.weight": "channel",
                                      "layers.0.bias": "cancelled", "layers.2.bias": "cancelled"}


def test_residual_sum_before_norm_is_not_invariant():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.lin(x) + x)

    assert found(Res(), 5, 4) == {}


def test_discovery_leaves_model_state_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    psiopt.find_scale_invariant(model, x)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state, torch.get_rng_state())


def test_check_invariance_passes_true_groups_and_flags_wrong_ones():
    # seeded: for about 1 random init in 100 the LayerNorm's eps (1e-5, against a variance of
    # its 5 inputs that ×0.5 brings down) really moves the outputs by more than tol
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, bias=False), nn.GroupNorm(2, 6), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5, bias=False), nn.LayerNorm(5), nn.Linear(5, 3))
    x = torch.randn(8, 2, 6, 6)
    mapping = psiopt.find_scale_invariant(model, x)
    assert mapping == {"0.weight": "groups:2", "3.weight": "tensor"}
    report = psiopt.check_invariance(model, x, mapping)
    assert report.ok, str(report)
    wrong = {"0.weight": "channel", "3.weight": "tensor", "5.weight": "channel"}
    report = psiopt.check_invariance(model, x, wrong)
    assert {c.name for c in report.failures} == {"0.weight", "5.weight"}
    assert "NOT INVARIANT" in str(report)


def test_manual_override_of_a_non_invariant_parameter_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    groups = psiopt.param_groups(model, x, overrides={"3.weight": "channel"})
    report = psiopt.check_invariance(model, x, groups)
    assert [c.name for c in report.failures] == ["3.weight"]


def test_param_groups_options_and_overrides():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    groups = psiopt.param_groups(model, torch.randn(8, 4), lr=0.1, weight_decay=5e-4,
                                 invariant_lr=1.0)
    inv, cancelled, rest = groups
    assert inv["grouping"] == "channel" and inv["param_names"] == ["0.weight"]
    assert (inv["lr"], inv["weight_decay"]) == (1.0, 0.0)
    assert [len(s) for s in inv["norm_stats"]] == [1]  # 0.weight feeds the BatchNorm's statistics
    assert cancelled["grouping"] == "cancelled" and cancelled["param_names"] == ["0.bias"]
    assert (cancelled["lr"], cancelled["weight_decay"]) == (0.0, 0.0)
    assert rest["grouping"] is None and (rest["lr"], rest["weight_decay"]) == (0.1, 5e-4)
    assert len(rest["params"]) == 4
    groups = psiopt.param_groups(model, torch.randn(8, 4), overrides={"0.weight": None})
    assert [g["grouping"] for g in groups] == ["cancelled", None]
    with pytest.raises(ValueError, match="unknown parameter"):
        psiopt.param_groups(model, mapping={"nope": "channel"})
    with pytest.raises(ValueError, match="invalid grouping"):
        psiopt.param_groups(model, mapping={"0.weight": "rows"})
    with pytest.raises(ValueError, match="do not split"):
        psiopt.param_groups(model, mapping={"0.weight": "groups:4"})
    with pytest.raises(ValueError, match="example_inputs"):
        psiopt.param_groups(model)


def test_check_invariance_without_declared_groups_says_so():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="no parameter is declared"):
        psiopt.check_invariance(model, torch.randn(8, 4), {})
    report = psiopt.check_invariance(model, torch.randn(8, 4), {"0.bias": "cancelled"})
    assert report.ok and [c.name for c in report.checks] == ["0.bias"]  # a cancelled bias is checked


def test_mapping_without_inputs_warns_that_statistics_cannot_follow():
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6))
    with pytest.warns(UserWarning, match="running statistics"):
        groups = psiopt.param_groups(model, mapping={"0.weight": "channel"})
    assert "norm_stats" not in groups[0]
