"""The few models the papers use, written plainly (torchvision is not available on CPU here).

Registry names: ``resnet20/32/44/56/110`` and ``preact-resnet20`` (CIFAR ResNets, He et al.),
``vgg16-bn``, ``archbn2``/``archbn4`` (Badrinarayanan's ArchBN), ``arora-vgg`` (Arora App. D),
``toy-elu`` (Yi §6.1), ``mlp-bn`` and ``vit-qk`` (a small ViT with QK-norm, issue 25).
Every builder takes ``in_channels``, ``num_classes`` and
``image_size`` (``in_features`` for vector inputs) so that one harness can feed any dataset.
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, eps: float = 1e-5) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, eps=eps)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a parameter-free shortcut ("option A": subsample, zero-pad)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(inplace=True),
                                  *conv_bn(cout, cout))
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class PreActBlock(BasicBlock):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut: the second conv feeds the sum (not invariant)."""

    def __init__(self, cin: int, cout: int, stride: int):
        nn.Module.__init__(self)
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride,
                                  1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class CifarResNet(nn.Module):
    """ResNet for 32×32 images with depth 6n+2 (He et al. 2016, §4.2): widths 16/32/64."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 preact: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"invalid depth: {depth} (must be 6n+2, e.g. 20, 32, 44, 56, 110)")
        n, block = (depth - 2) // 6, PreActBlock if preact else BasicBlock
        stem = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        layers, cin = stem if preact else [*stem, nn.BatchNorm2d(16), nn.ReLU()], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(block(cin, width, 2 if i and not j else 1))
                cin = width
        if preact:
            layers += [nn.BatchNorm2d(64), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class VGG(nn.Module):
    """VGG with conv-BN-ReLU blocks; pooling uses ``ceil_mode`` so 28×28 inputs work too."""

    CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")

    def __init__(self, cfg=CFG16, in_channels: int = 3, num_classes: int = 10,
                 batch_norm: bool = True, eps: float = 1e-5, hidden: int = 0):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            layers += (conv_bn(cin, v, eps=eps) if batch_norm
                       else [nn.Conv2d(cin, v, 3, 1, 1)]) + [nn.ReLU(inplace=True)]
            cin = v
        self.features = nn.Sequential(*layers)
        head = [nn.Linear(cin, hidden), nn.BatchNorm1d(hidden, eps=eps), nn.ReLU(),
                nn.Linear(hidden, num_classes)] if hidden else [nn.Linear(cin, num_classes)]
        if hidden and not batch_norm:
            head = [nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))


class ArchBN(nn.Module):
    """Badrinarayanan's ArchBN: (linear → BN → ReLU → max-pool over pairs of units) × depth,
    then a linear soft-max layer."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, depth: int = 2,
                 width: int = 64):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU(),
                       nn.Unflatten(1, (1, width)), nn.MaxPool1d(2), nn.Flatten()]
            cin = width // 2
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class MLP(nn.Module):
    """Flatten → (Linear → norm → activation) × len(widths) → Linear."""

    def __init__(self, in_features: int, num_classes: int, widths=(128, 128),
                 norm: str = "batch", activation=nn.ReLU, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for w in widths:
            layers.append(nn.Linear(cin, w, bias=bias))
            layers.append(nn.BatchNorm1d(w, eps=eps) if norm == "batch" else nn.LayerNorm(w, eps=eps))
            layers.append(activation())
            cin = w
        layers.append(nn.Linear(cin, num_classes, bias=num_classes != 1 or bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def glorot_(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for every Linear/Conv layer (Arora App. D)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _resnet(depth, preact=False):
    return lambda in_channels=3, num_classes=10, image_size=32: CifarResNet(
        depth, in_channels, num_classes, preact=preact)


def _flat(in_channels, image_size):
    return in_channels * image_size * image_size


def vit_qk(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, dim: int = 64,
           depth: int = 4, heads: int = 4, patch: int = 4, qk_norm: str = "ln") -> nn.Module:
    """A small pre-LN ViT with per-head QK-norm (``psiopt.experiments.zoo.ViT``): a fused qkv
    projection without bias (with a bias, the q and k rows alone are not invariant), LayerNorm
    on each head's queries and keys, so that each head's block of q rows and of k rows is
    scale-invariant ("groups:2H[0:2·dim]"); 7 × 7 patches of 4 × 4 on 28 × 28 images, a class
    token, learned positions; width 64, 4 blocks, 4 heads (about 0.2 M parameters)."""
    from .zoo import ViT

    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch {patch}")
    model = ViT(dim=dim, depth=depth, heads=heads, patch=patch, image=image_size,
                classes=num_classes, qk_norm=qk_norm, fused=True, bias=False)
    model.patch = nn.Conv2d(in_channels, dim, patch, patch)
    return model


MODELS = {
    **{f"resnet{d}": _resnet(d) for d in (20, 32, 44, 56, 110)},
    "preact-resnet20": _resnet(20, preact=True),
    "vgg16-bn": lambda in_channels=3, num_classes=10, image_size=32: VGG(
        VGG.CFG16, in_channels, num_classes),
    "archbn2": lambda in_channels=1, num_classes=10, image_size=28: ArchBN(
        _flat(in_channels, image_size), num_classes, depth=2),
    "archbn4": lambda in_channels=1, num_classes=10, image_size=28: ArchBN(
        _flat(in_channels, image_size), num_classes, depth=4),
    "arora-vgg": lambda in_channels=3, num_classes=10, image_size=32, batch_norm=True,
    eps=1e-5: glorot_(VGG((64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"),
                                in_channels, num_classes, batch_norm=batch_norm, eps=eps,
                                hidden=512)),
    "toy-elu": lambda in_channels=10, num_classes=1, image_size=1: MLP(
        _flat(in_channels, image_size), num_classes, widths=(100,), activation=nn.ELU,
        bias=False),
    "mlp-bn": lambda in_channels=1, num_classes=10, image_size=28, eps=1e-5: MLP(
        _flat(in_channels, image_size), num_classes, eps=eps),
    "vit-qk": vit_qk,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names and options raise ``ValueError``."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    known = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(known))
    if unknown:  # an option a model does not have is refused, never ignored
        raise ValueError(f"model {name} has no option(s) {unknown}; it takes {sorted(known)}")
    return builder(**kwargs)


def list_models() -> list[str]:
    return list(MODELS)


__all__ = ["CifarResNet", "VGG", "ArchBN", "MLP", "create_model", "list_models", "glorot_"]
