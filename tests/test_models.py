import pytest
import torch
from torch import nn

import psiopt
from psiopt.experiments.models import create_model, list_models

# name -> (input shape, number of invariant parameters, names that must / must not be invariant)
CASES = {
    "resnet20": ((2, 3, 32, 32), 19, ["features.0.weight"], ["fc.weight"]),
    "resnet32": ((2, 3, 32, 32), 31, ["features.5.body.3.weight"], ["fc.weight"]),
    "resnet44": ((2, 3, 32, 32), 43, [], ["fc.weight"]),
    "resnet56": ((2, 3, 32, 32), 55, [], ["fc.weight"]),
    "resnet110": ((2, 3, 32, 32), 109, [], ["fc.weight"]),
    "preact-resnet20": ((2, 3, 32, 32), 9, ["features.1.body.2.weight"],
                        ["features.0.weight", "features.1.body.5.weight"]),
    "vgg16-bn": ((2, 3, 32, 32), 13, ["features.0.weight"], ["classifier.0.weight"]),
    "archbn2": ((4, 1, 28, 28), 2, ["net.1.weight", "net.7.weight"], ["net.13.weight"]),
    "archbn4": ((4, 1, 28, 28), 4, ["net.19.weight"], ["net.25.weight"]),
    "arora-vgg": ((2, 3, 32, 32), 9, ["classifier.0.weight"], ["classifier.3.weight"]),
    "toy-elu": ((4, 10), 1, ["net.1.weight"], ["net.4.weight"]),
    "mlp-bn": ((4, 1, 28, 28), 2, ["net.1.weight", "net.4.weight"], ["net.7.weight"]),
}


def test_every_model_has_a_case():
    # vit-qk (QK-norm: invariant head blocks of a fused qkv, a cancelled k_norm bias) is checked
    # in tests/test_policy_harness.py
    assert set(CASES) | {"vit-qk"} == set(list_models())


@pytest.mark.parametrize("name", list(CASES))
def test_model_output_and_invariant_parameters(name):
    shape, count, must, must_not = CASES[name]
    model = create_model(name, in_channels=shape[1] if len(shape) == 4 else 10,
                         num_classes=1 if name == "toy-elu" else 10,
                         image_size=shape[-1] if len(shape) == 4 else 1)
    x = torch.randn(*shape)
    assert model(x).shape == (shape[0], 1 if name == "toy-elu" else 10)
    found = psiopt.find_scale_invariant(model, x)
    mapping = {k: v for k, v in found.items() if v != "cancelled"}
    cancelled = {k for k, v in found.items() if v == "cancelled"}
    assert len(mapping) == count
    # a cancelled bias belongs to an invariant layer with a bias
    assert {k.removesuffix(".bias") + ".weight" for k in cancelled} <= set(mapping)
    assert all(k.endswith(".bias") for k in cancelled)
    assert all(mapping[n] == "channel" for n in must)
    assert not set(must_not) & set(mapping)


def test_models_take_other_inputs_and_options():
    m = create_model("resnet20", in_channels=1, num_classes=100)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    plain = create_model("arora-vgg", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert psiopt.find_scale_invariant(plain, torch.randn(2, 3, 32, 32)) == {}
    eps = create_model("arora-vgg", eps=1e-3)
    assert all(m.eps == 1e-3 for m in eps.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="6n\\+2"):
        psiopt.experiments.models.CifarResNet(depth=21)
