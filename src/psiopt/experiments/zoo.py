"""A zoo of small modern architectures in plain torch, and a numerical ground truth for discovery.

``ZOO`` maps a name to ``(builder, example input)``: pre-LN ViT, per-head QK-norm (LayerNorm or
RMSNorm, separate or fused qkv, with and without biases), ConvNeXt with a channels-first
LayerNorm that permutes (timm's ``LayerNorm2d``), ResNets with GroupNorm and weight
standardisation (by hand and through ``F.batch_norm`` on the weight), an NF-ResNet (scaled
weight standardisation, no normalisation layer), ``weight_norm`` and ``spectral_norm``, an
nGPT-style block, an RMSNorm MLP, MLP-Mixer, a LayerNorm LSTM, and the ReLU / depthwise /
scalar-gain cases.

:func:`holds` is the ground truth: a float64 copy of the model with every normalisation's eps at
1e-30, one parameter's groups multiplied by random positive factors (or the parameter shifted by a
random offset, for ``"cancelled"``), outputs compared in train mode and, with the running
statistics following through the links discovery reports, in eval mode.  :func:`table` compares
discovery with it (``python -m psiopt.experiments.zoo`` writes ``docs/discovery.md``'s table).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..optim.discovery import candidate_groupings, find_scale_invariant, part_spans
from ..optim.geometry import CANCELLED, parse_grouping, part, rows, split_part

D, H = 16, 2  # width and heads of the transformer models


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: normalises dimension 1 of NCHW through a permute."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; ``qk_norm``: ``"ln"``/``"rms"`` per head or ``None``."""

    def __init__(self, fused=True, bias=True, qk_norm=None, dim=D, heads=H):
        super().__init__()
        self.fused, self.dim, self.heads = fused, dim, heads
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        norm = {"ln": nn.LayerNorm, "rms": nn.RMSNorm, None: None}[qk_norm]
        self.q_norm = norm(dim // heads) if norm else nn.Identity()
        self.k_norm = norm(dim // heads) if norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, _ = x.shape
        h, d = self.heads, self.dim // self.heads
        if self.fused:
            q, k, v = self.qkv(x).view(B, L, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(x).view(B, L, h, d).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, L, self.dim))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, norm=nn.LayerNorm, dim=D, **attention):
        super().__init__()
        self.norm1, self.attn = norm(dim), Attention(dim=dim, **attention)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-LN ViT (``vit_base(16)`` is ViT-B/16 at 224 × 224: ``ViT(768, 12, 12, 16, 224)``)."""

    def __init__(self, dim=D, depth=2, heads=H, patch=4, image=8, classes=3, **attention):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim=dim, heads=heads, **attention) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class Tokens(nn.Module):
    """A block applied to a sequence of token vectors, then a head (QK-norm variants)."""

    def __init__(self, **attention):
        super().__init__()
        self.block, self.head = Block(**attention), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


class TokenBN(nn.Module):
    """Tokens through a LayerNorm and a linear map into a BatchNorm over the channels (a
    transpose each way): the norm's gain is invariant as a whole, its bias cancelled."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc, self.bn = nn.LayerNorm(D), nn.Linear(D, D), nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        x = self.fc(self.norm(x)).transpose(1, 2)
        return self.head(torch.relu(self.bn(x)).mean(2))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, D, 4, 4), LayerNorm2d(D))
        self.blocks = nn.Sequential(ConvNeXtBlock(D), ConvNeXtBlock(D))
        self.down = nn.Sequential(LayerNorm2d(D), nn.Conv2d(D, 2 * D, 2, 2))
        self.norm, self.head = nn.LayerNorm(2 * D), nn.Linear(2 * D, 3)

    def forward(self, x):
        x = self.down(self.blocks(self.stem(x)))
        return self.head(self.norm(x.mean((2, 3))))


class StdConv2d(nn.Conv2d):
    """Weight standardisation by hand (BiT): each output channel's weights to mean 0, variance 1."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, bias=False, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + self.eps), None)


class BatchNormStdConv2d(StdConv2d):
    """Weight standardisation through ``F.batch_norm`` on the weight (timm's StdConv2d)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return self._conv_forward(x, w, None)


class ScaledStdConv2d(StdConv2d):
    """NF-ResNet's scaled weight standardisation with a learnable gain per output channel."""

    def __init__(self, cin, cout, k, **kwargs):
        super().__init__(cin, cout, k, **kwargs)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = 1 / math.sqrt(cin * k * k)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return self._conv_forward(x, w * (self.gain * self.scale), None)


class WSResNet(nn.Module):
    """conv-GN-ReLU residual blocks with standardised convs (``conv``: the WS flavour)."""

    def __init__(self, conv=StdConv2d):
        super().__init__()
        self.stem = conv(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.GroupNorm(4, 8), nn.ReLU(), conv(8, 8, 3, padding=1),
                                  nn.GroupNorm(4, 8), nn.ReLU(), conv(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head((x + self.body(x)).mean((2, 3)))


class NFResNet(nn.Module):
    """Normaliser-free residual blocks: x + α·f(x/β) with scaled WS convs, no norm layer."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = ScaledStdConv2d(8, 8, 3, padding=1), ScaledStdConv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv2(F.relu(self.conv1(F.relu(x) / 1.1)))
        return self.head((x + 0.2 * y).mean((2, 3)))


class NGPTBlock(nn.Module):
    """nGPT-style: every matrix used as W/‖W‖ per row, hidden states on the sphere."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(2 * D, D)), nn.Parameter(torch.randn(D, 2 * D))
        self.alpha = nn.Parameter(torch.full((D,), 0.05))
        self.head = nn.Parameter(torch.randn(3, D))

    def forward(self, x):
        h = F.normalize(x, dim=-1)
        u = F.silu(h @ F.normalize(self.w1, dim=1).T) @ F.normalize(self.w2, dim=1).T
        h = F.normalize(h + self.alpha * (F.normalize(u, dim=-1) - h), dim=-1)
        return h @ F.normalize(self.head, dim=1).T


class Mixer(nn.Module):
    """MLP-Mixer block: a token-mixing MLP across the sequence, then a channel MLP."""

    def __init__(self, tokens=5):
        super().__init__()
        self.norm1, self.norm2, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.tok = nn.Sequential(nn.Linear(tokens, 8), nn.GELU(), nn.Linear(8, tokens))
        self.chan = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.chan(self.norm2(x))
        return self.head(self.norm(x).mean(1))


class LNLSTM(nn.Module):
    """An LSTM whose gate pre-activations are layer-normalised (Ba et al. 2016)."""

    def __init__(self, hidden=8):
        super().__init__()
        self.wx, self.wh = nn.Linear(D, 4 * hidden, bias=False), nn.Linear(hidden, 4 * hidden, bias=False)
        self.nx, self.nh, self.nc = nn.LayerNorm(4 * hidden), nn.LayerNorm(4 * hidden), nn.LayerNorm(hidden)
        self.head, self.hidden = nn.Linear(hidden, 3), hidden

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            i, f, g, o = (self.nx(self.wx(x[:, t])) + self.nh(self.wh(h))).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.nc(c))
        return self.head(h)


class ScalarGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.g = nn.Linear(D, D, bias=False), nn.Parameter(torch.tensor(1.5))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin(x) * self.g))


class SplitBN(nn.Module):
    """A conv whose first half of the channels goes through a BatchNorm and the other half does not
    (a part of the weight invariant per channel, a part of the bias cancelled)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.head(torch.cat([self.bn(a), F.relu(b)], 1).flatten(1))


def _seq(*layers):
    return nn.Sequential(*layers)


def _weight_norm_mlp():
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(D, D, bias=False))
    return _seq(lin, nn.BatchNorm1d(D), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(D, 3)))


def _spectral_norm_mlp():
    return _seq(nn.utils.parametrizations.spectral_norm(nn.Linear(D, D)), nn.ReLU(), nn.Linear(D, 3))


def _images(n=4, size=8):
    return torch.randn(n, 3, size, size)


def _tokens(n=4):
    return torch.randn(n, 5, D)


def _vectors(n=8):
    return torch.randn(n, D)


def _zoo():
    from .models import create_model

    zoo = {
        "resnet20 (BN)": (lambda: create_model("resnet20"), lambda: torch.randn(2, 3, 8, 8)),
        "preact-resnet20 (BN)": (lambda: create_model("preact-resnet20"), lambda: torch.randn(2, 3, 8, 8)),
        "vgg (conv-BN)": (lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(4 * 4 * 4, 5)), _images),
        "mlp-bn": (lambda: create_model("mlp-bn", image_size=4), lambda: torch.randn(8, 1, 4, 4)),
        "pre-LN ViT (fused qkv)": (ViT, _images),
        "attention, separate q/k/v": (lambda: Tokens(fused=False), _tokens),
    }
    for norm in ("ln", "rms"):
        for fused in (False, True):
            for bias in (True, False):
                name = f"QK-norm ({'LayerNorm' if norm == 'ln' else 'RMSNorm'}), " \
                       f"{'fused' if fused else 'separate'} qkv, {'bias' if bias else 'no bias'}"
                zoo[name] = (lambda n=norm, f=fused, b=bias: Tokens(fused=f, bias=b, qk_norm=n), _tokens)
    zoo.update({
        "ConvNeXt (LayerNorm2d)": (ConvNeXt, _images),
        "ResNet GN + WS (by hand)": (WSResNet, _images),
        "ResNet GN + WS (F.batch_norm)": (lambda: WSResNet(BatchNormStdConv2d), _images),
        "NF-ResNet (scaled WS)": (NFResNet, _images),
        "weight_norm + BN": (_weight_norm_mlp, _vectors),
        "spectral_norm": (_spectral_norm_mlp, _vectors),
        "nGPT block": (NGPTBlock, _tokens),
        "RMSNorm MLP": (lambda: _seq(nn.Linear(D, D, bias=False), nn.RMSNorm(D), nn.GELU(),
                                     nn.Linear(D, D, bias=False), nn.RMSNorm(D), nn.Linear(D, 3)),
                        _vectors),
        "MLP-Mixer": (Mixer, _tokens),
        "LayerNorm LSTM": (LNLSTM, _tokens),
        "conv-ReLU-conv-BN": (lambda: _seq(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(),
                                           nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4),
                                           nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), _images),
        "conv-depthwise-BN": (lambda: _seq(nn.Conv2d(3, 4, 3, bias=False),
                                           nn.Conv2d(4, 4, 3, groups=4, bias=False),
                                           nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
                              _images),
        "scalar gain + LN": (ScalarGain, _vectors),
        "LN gain → linear → LN": (lambda: _seq(nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D, bias=False),
                                              nn.LayerNorm(D), nn.Linear(D, 3)), _vectors),
        "LN gain → linear → BN": (lambda: _seq(nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D, bias=False),
                                              nn.BatchNorm1d(D), nn.Linear(D, 3)), _vectors),
        "tokens: LN → linear → BN (LeViT-style)": (TokenBN, _tokens),
        "conv split: half → BN": (SplitBN, _images),
        "BN → 1×1 conv → BN (MaxViT pre-norm)": (
            lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), _images),
    })
    return zoo


ZOO = _zoo()


def build(name: str, seed: int = 0):
    """The zoo model ``name`` and its example input, seeded."""
    builder, inputs = ZOO[name]
    torch.manual_seed(seed)
    return builder(), inputs()


# -- ground truth ------------------------------------------------------------------------------

TOL = 1e-8


def float64_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy whose normalisations' eps are 1e-30 (exact invariance, not up to eps) and
    whose parameters are moved off special values (a zero bias, a gain of one) by noise of 10 %
    of each tensor's RMS."""
    m = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            rms = float(p.square().mean().sqrt()) or 1.0
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 * rms)
    for mod in m.modules():
        if isinstance(getattr(mod, "eps", None), float) or isinstance(mod, nn.RMSNorm):
            mod.eps = 1e-30
    return m


def _run(model, x, training: bool) -> torch.Tensor:
    """The outputs, with the RNG and every buffer but the running statistics as they were (a
    spectral_norm's power iteration does not move between two runs)."""
    saved = {n: b.clone() for n, b in model.named_buffers() if "running_" not in n}
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        model.train(training)
        out = model(x)
        for n, b in model.named_buffers():
            if n in saved:
                b.copy_(saved[n])
    leaves = out if isinstance(out, (tuple, list)) else [out]
    return torch.cat([t.reshape(-1) for t in leaves if t.is_floating_point()])


def _eval(model, x) -> torch.Tensor:
    """Eval-mode outputs, the running statistics first set to this batch's statistics (so that
    they follow any rescaling exactly, as psiopt makes them follow)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.reset_running_stats()
            m.momentum = 1.0
    _run(model, x, True)
    return _run(model, x, False)


def _change(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def holds(model: nn.Module, x, name: str, grouping: str, seed: int = 0, *, copy64=None,
          baseline=None) -> bool:
    """True when rescaling ``name``'s groups by random factors in [e⁻², e²] (or shifting it,
    for ``"cancelled"``) leaves the outputs of the float64, eps-free network put: in train mode,
    and for scaled groups also in eval mode (running statistics re-estimated on the batch).
    ``copy64``: a :func:`float64_copy` of ``model`` to reuse (its parameter is restored);
    ``baseline``: its ``(train, eval)`` outputs, when already computed."""
    m = copy64 if copy64 is not None else float64_copy(model)
    x = x.double() if x.is_floating_point() else x
    p = dict(m.named_parameters())[name]
    gen = torch.Generator().manual_seed(seed)
    base, base_eval = baseline if baseline is not None else (_run(m, x, True), _eval(m, x))
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            if parse_grouping(grouping)[0] == CANCELLED:  # (of a part: the other rows kept)
                worst, noise = 0.0, torch.randn(p.shape, generator=gen, dtype=p.dtype)
                for size in (1.0, -1.0, 10.0, -10.0, 0.1):  # both signs: crosses zero too
                    p.copy_(saved)
                    part(p, grouping).add_(part(noise, grouping) * size * (1 + saved.abs().max()))
                    worst = max(worst, _change(base, _run(m, x, True)))
                return worst < TOL
            view = rows(p, grouping)
            factors = torch.exp(4 * torch.rand(view.shape[0], generator=gen, dtype=p.dtype) - 2)
            view.mul_(factors.view(-1, *[1] * (view.dim() - 1)))
        return _change(base, _run(m, x, True)) < TOL and _change(base_eval, _eval(m, x)) < TOL
    finally:
        with torch.no_grad():
            p.copy_(saved)


def _gradients(m: nn.Module, x) -> dict[str, list[torch.Tensor]]:
    """Per parameter, the train-mode gradients of two random projections of ``m``'s outputs
    (buffers and RNG left as they were)."""
    saved = {n: b.clone() for n, b in m.named_buffers()}
    params = dict(m.named_parameters())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = m.train()(x)
    leaves = out if isinstance(out, (tuple, list)) else [out]
    out = torch.cat([t.reshape(-1) for t in leaves if t.is_floating_point()])
    directions = torch.randn(2, out.numel(), generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = [torch.autograd.grad(out @ r, list(params.values()), allow_unused=True, retain_graph=True)
             for r in directions]
    with torch.no_grad():
        for n, b in m.named_buffers():
            b.copy_(saved[n])
    return {n: [g[i] for g in grads] for i, n in enumerate(params)}


def _may_hold(p: torch.Tensor, grads: list, grouping: str, scale: float) -> bool:
    """A necessary condition for ``grouping`` of ``p`` to hold, from its gradients: zero on a
    cancelled part (any shift leaves the outputs put), orthogonal to every group otherwise
    (Euler's theorem for a function of degree 0); ``scale``: the largest gradient entry of the
    model.  It spares the full check of most candidates (of every part of every parameter)."""
    for g in grads:
        if g is None:
            return True
        if parse_grouping(grouping)[0] == CANCELLED:
            if float(part(g, grouping).abs().max()) > 1e-8 * scale:
                return False
            continue
        v, w = (rows(t, grouping) for t in (g, p.detach()))
        v, w = v.reshape(v.shape[0], -1), w.reshape(w.shape[0], -1)
        bound = 1e-8 * w.norm(dim=1) * v.norm(dim=1).clamp_min(scale)  # (a group of one entry:
        if bool(((v * w).sum(1).abs() > bound).any()):  # its gradient must vanish)
            return False
    return True


def truth(model: nn.Module, x) -> dict[str, set[str]]:
    """Every candidate grouping that holds numerically, per parameter (none: left out).  When
    the whole tensor (or part) is not invariant, no finer grouping of it is tried (none can
    hold); parts (:func:`~psiopt.optim.discovery.part_spans`) are tried when no grouping of the
    whole tensor holds."""
    out, m = {}, float64_copy(model)
    xd = x.double() if x.is_floating_point() else x
    grads = _gradients(m, xd)
    scale = max((float(g.abs().max()) for gs in grads.values() for g in gs if g is not None and g.numel()),
                default=0.0)
    baseline = _run(m, xd, True), _eval(m, xd)  # the same for every candidate (m is restored)
    params64 = dict(m.named_parameters())
    for name, p in model.named_parameters():
        ok = set()
        for span in [None, *part_spans(p)]:
            if ok and span is not None and not any(split_part(g)[1] for g in ok):
                break  # a grouping of the whole tensor holds (every part is tried otherwise:
            scaled = False  # discovery may report any of them)
            for g in candidate_groupings(p, span):
                kind = parse_grouping(g)[0]
                if kind not in ("tensor", CANCELLED) and not scaled:
                    break
                if _may_hold(params64[name], grads[name], g, scale) and \
                        holds(model, x, name, g, copy64=m, baseline=baseline):
                    ok.add(g)
                    scaled = scaled or kind == "tensor"
        if ok:
            out[name] = ok
    return out


def unused(model: nn.Module, x) -> set[str]:
    """Parameters the forward pass does not reach (no gradient): nothing to claim about them."""
    params = dict(model.named_parameters())
    out = model(x)
    leaves = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if t.requires_grad]
    grads = torch.autograd.grad([t.sum() for t in leaves], list(params.values()), allow_unused=True)
    return {n for n, g in zip(params, grads) if g is None}


def finest(groupings: set[str]) -> str:
    """The best of a set of groupings that hold: of the whole tensor before a part, the larger
    part first, then the finest grouping (``cancelled`` first)."""
    def rank(g):
        kind, blocks, _ = parse_grouping(g)
        span = split_part(g)[1]
        size = 0 if span is None else span[0] - span[1]
        order = {CANCELLED: 0, "channel": 1, "groups": 2, "tensor": 3}[kind]
        return size, order, -blocks
    return min(groupings, key=rank)


def compare(model: nn.Module, x) -> dict:
    """Discovery against the ground truth: ``found``, ``false`` (claims the truth refutes),
    ``missed`` (invariant parameters not reported; parameters the pass does not reach are left
    out) and ``coarser`` (reported, but a finer
    grouping holds)."""
    found = find_scale_invariant(model, x)
    skip = unused(model, x)
    true = {n: g for n, g in truth(model, x).items() if n not in skip}
    return {
        "found": found,
        "true": {n: finest(g) for n, g in true.items()},
        "false": {n: g for n, g in found.items() if g not in true.get(n, set())},
        "missed": {n: finest(g) for n, g in true.items() if n not in found},
        "coarser": {n: (found[n], finest(g)) for n, g in true.items()
                    if n in found and found[n] in g and found[n] != finest(g)},
    }


def table() -> str:
    """The Markdown table of ``docs/discovery.md``: for every zoo model, what discovery finds,
    and how it compares with the ground truth."""
    lines = ["| architecture | parameters | psiopt finds | ground truth | false claims | missed "
             "| coarser |", "|---|---|---|---|---|---|---|"]
    for name in ZOO:
        model, x = build(name)
        r = compare(model, x)
        kinds: dict[str, int] = {}
        for g in r["found"].values():
            kinds[g] = kinds.get(g, 0) + 1
        found = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "nothing"
        lines.append(f"| {name} | {len(list(model.parameters()))} | {found} | {len(r['true'])} "
                     f"| {len(r['false'])} | {len(r['missed'])} | {len(r['coarser'])} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m psiopt.experiments.zoo
    print(table())
