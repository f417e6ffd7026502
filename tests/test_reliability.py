"""Faults and bad input: each ends in correct behaviour or a clear one-line error (docs/reliability.md).

Every test here is a row (or part of a row) of the table in ``docs/reliability.md``.  An open defect's
test asserts the correct behaviour under ``pytest.mark.xfail(strict=True, reason=...)``, so that it fails
the suite once the defect is fixed and the mark (and the table) get updated; none is open now.

``Killed`` stands for SIGKILL: raised at a chosen moment, it runs no code that writes a file on the
way out, so the run directory is left as a ``kill -9`` at that moment leaves it (real kills at
random moments: ``python scripts/stress.py kill``).  Disk full is an OSError(ENOSPC) from the write.
"""

import copy
import errno
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psiopt
import psiopt.experiments.train as harness
from helpers import bn_data, bn_net, train
from psiopt.experiments.cli import main
from psiopt.experiments.train import RunConfig, read_metrics

NAMES = psiopt.list_optimizers()
BASELINES = {n for n in NAMES if psiopt.REGISTRY[n].baseline}  # torch.optim updates: sgd, adam, adamw, b-sgd
PSI = {"psi-sgd", "psi-sgdm"}  # equivariant: rows ×a give a·w(t) (Yi Theorem 1)
UNIT_START = {"un-sgd", "sgdg", "adamg", "b-sgd"}  # unit-normalise rows at the first step: a·w gives w(t)
QUICK = ["--dataset", "synthetic", "--subset", "128", "--epochs", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def steps(model, opt, x, y, n):
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def mlp(dtype=torch.float64, width=6, cin=8, eps=1e-5):
    """Linear → BatchNorm → ReLU → Linear: ``0.weight`` is channel-invariant."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(cin, width, bias=False), nn.BatchNorm1d(width, eps=eps), nn.ReLU(),
                         nn.Linear(width, 3)).to(dtype)


def mlp_data(dtype=torch.float64, cin=8, n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, cin, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def one_line(capsys, code, *words, codes=(2,)):
    """The CLI returned ``codes`` with one line on stderr naming ``words`` (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code in codes and len(err) == 1 and err[0].startswith("psiopt: error:"), (code, err)
    assert all(w in err[0] for w in words), err[0]


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def strip(metrics):
    """Records without timings and the BN-recomputed figures each session adds at its last epoch."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")
             and not k.endswith("_bn_recomputed")} for m in metrics]


# -- non-finite gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_gradient_stays_visible_and_in_its_group(name, bad):
    """Default ``check_finite=False``: as torch.optim, the value propagates, but only into the
    group it hit (``3.weight`` rows 0-1, one GroupNorm group), never silently masked."""
    x, y = bn_data()
    model = bn_net()
    opt = psiopt.create_optimizer(model, name, x)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[1, 0, 0, 0] = bad
    opt.step()
    w = model[3].weight.detach()
    assert not torch.isfinite(w[:2]).all() and torch.isfinite(w[2:]).all()
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if n != "3.weight")


@pytest.mark.parametrize("name", NAMES)
def test_check_finite_refuses_an_inf_gradient_in_one_line(name):
    x, y = bn_data()
    model = bn_net()
    if name in BASELINES:  # torch.optim's own classes have no such option: said, not ignored
        with pytest.raises(ValueError, match="unknown hyperparameter.*check_finite"):
            psiopt.create_optimizer(model, name, x, check_finite=True)
        return
    opt = psiopt.create_optimizer(model, name, x, check_finite=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[1, 0, 0, 0] = float("-inf")
    with pytest.raises(FloatingPointError, match="non-finite gradient in 3.weight; nothing was updated") as e:
        opt.step()
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_check_finite_accepts_a_finite_gradient_whose_norm_overflows():
    x, y = bn_data(dtype=torch.float32)
    model = bn_net(dtype=torch.float32)
    opt = psiopt.create_optimizer(model, "psi-sgd", x, check_finite=True)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad.fill_(1e20)
    assert torch.isfinite(model[3].weight.grad).all()
    opt.step()
    assert finite(model)


# -- precision ---------------------------------------------------------------------------------------
#: optimizers whose update (torch.optim.Adam's for adam, adamw and the non-invariant parameters of
#: adamg, adams, adamsrt) divides by sqrt(v) + eps: in float16 eps=1e-8 is 0 and (1-beta2)g² underflows,
#: so the step would be inf; refused at construction, trained with an eps float16 can hold
ADAM_TYPE = ("adam", "adamw", "adamg", "adams", "adamsrt")


@pytest.mark.parametrize("name, dtype", [pytest.param(n, d, id=f"{n}-{str(d).removeprefix('torch.')}")
                                         for d in (torch.float16, torch.bfloat16, torch.float64)
                                         for n in NAMES])
def test_float16_bfloat16_float64_parameters_train_in_their_dtype(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 3)).to(dtype)
    x, y = mlp_data(dtype)
    extra = {}
    if dtype == torch.float16 and name in ADAM_TYPE:
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="invalid eps for float16 parameters: 1e-08 is 0 in float16"):
            psiopt.create_optimizer(model, name, x)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        extra = {"eps": 1e-4}
    opt = psiopt.create_optimizer(model, name, x, **extra)
    losses = steps(model, opt, x, y, 10)
    assert finite(model), "non-finite parameters"
    assert all(p.dtype == dtype for p in model.parameters())
    per_row = ("r4", "exp_avg_sq")  # per-row statistics: float32 for half-precision rows
    assert all(v.dtype == (torch.float32 if k in per_row and v.shape != p.shape
                           and dtype != torch.float64 else dtype)
               for p, s in opt.state.items() for k, v in s.items()
               if isinstance(v, torch.Tensor) and v.dim() > 0)  # (CPU step counters aside; r4:
    #              AdamG*'s r₀⁴, exp_avg_sq of Adam-S/Adam-SRT/AdamG; torch Adam's: full size)
    assert min(losses[1:]) < losses[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["sgdg", "adamg"])
def test_half_precision_tangent_norm_survives_a_nearly_radial_gradient(name, dtype):
    """SGDG/AdamG take ``‖h‖² = ‖ĝ‖² − <y, ĝ>²`` from per-group sums (the tangent ``h`` is never
    formed); for ``ĝ = 3y + 0.03u`` that is 9.0009 − 9 = 9e-4, 0 if the sums are rounded to 8 bits
    of mantissa.  The clipping factor (SGDG, clip below 0.03) and AdamG's second moment read it:
    the half-precision step agrees with the float64 reference path on the same numbers."""
    gen = torch.Generator().manual_seed(0)
    y = F.normalize(torch.randn(3, 64, generator=gen), dim=1)
    u = torch.randn(3, 64, generator=gen)
    u = F.normalize(u - (u * y).sum(1, keepdim=True) * y, dim=1)
    results = []
    for dt, foreach in ((dtype, True), (torch.float64, False)):
        w = nn.Parameter(y.to(dtype).to(dt))
        w.grad = (3 * y + 0.03 * u).to(dtype).to(dt)
        extra = {"clip": 0.01} if name == "sgdg" else {"clip": 1.0, "betas": (0.9, 0.5), "eps": 1e-4}
        opt = psiopt.REGISTRY[name].cls([w], grouping="channel", ortho=0.0, foreach=foreach, **extra)
        opt.step()
        state = opt.state[w]
        results.append(state["exp_avg_sq"] if name == "adamg" else state["momentum_buffer"].norm(dim=1))
    half, ref = results
    assert half.dtype == (torch.float32 if name == "adamg" else dtype)  # AdamG's v: float32
    torch.testing.assert_close(half.double().view(-1), ref.view(-1), rtol=0.05, atol=0)


@pytest.mark.parametrize("name", sorted(set(psiopt.list_optimizers()) - {"sgd", "adam", "adamw"}))
def test_float16_rows_whose_norm_grows_past_256_stay_finite_on_the_reference_path(name):
    """A float16 tensor of norm 16 (accepted: ‖w‖² is in float16's range) that a step moves to
    norm 320 (‖w‖² ≈ 1e5 > 65504): PSI-SGD's reference path took ‖w‖² in float16 (inf, then
    NaN weights; also the path a group mixing dtypes takes by default); SGD-MRT (which keeps the
    norm, and accepts rows of any norm) from norm 320, its transport's inner products.  Both
    paths stay finite and agree to float16's precision."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 16, generator=gen, dtype=torch.float64) * (20 if name == "sgdmrt" else 1)
    hs = [torch.randn(16, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    extra = {"eps": 1e-4} if name in ADAM_TYPE else {}
    ends = []
    for foreach in (False, True):
        w = nn.Parameter(w0.half())
        opt = psiopt.create_optimizer([{"params": [w], "grouping": "tensor"}], name, foreach=foreach,
                                      **extra)
        for h in hs:  # the gradient of a scale-invariant loss: orthogonal to w, 20/‖w‖ long
            x = w.detach().double()
            u, h = x / x.norm(), h * (20 / h.norm())
            w.grad = ((h - (h * u).sum() * u) / x.norm()).half()
            opt.step()
        assert torch.isfinite(w).all(), foreach
        ends.append(w.detach().double())
    torch.testing.assert_close(ends[0], ends[1], rtol=0.02, atol=0.02 * float(ends[1].abs().max()))


@pytest.mark.parametrize("foreach", [None, False], ids=["vectorized", "reference"])
def test_psi_norm_state_made_mid_run_is_in_the_parameter_dtype(foreach):
    """PSI-SGD with ``fixed_norm`` switched on mid-run takes each row's norm then; the state is in
    the parameter's dtype on both paths (the vectorized one made it float32 for bfloat16, and a
    ``state_dict`` round trip then changed it)."""
    w = nn.Parameter(torch.randn(4, 6, dtype=torch.bfloat16))
    opt = psiopt.PSISGD([w], grouping="channel", fixed_norm=False, foreach=foreach)
    for fixed in (False, True):
        opt.param_groups[0]["fixed_norm"] = fixed
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["norm"].dtype == torch.bfloat16


@pytest.mark.parametrize("foreach", [None, False], ids=["vectorized", "reference"])
def test_adamg_star_float16_rows_above_norm_16_keep_moving(foreach):
    """AdamG* keeps ``r4 = r₀⁴`` per row: in float16 that overflows for rows of norm above 16
    (inf, and the row never moved again, silently).  ``r4`` of half-precision rows is float32,
    also through a ``state_dict`` round trip (torch.optim casts floating state to the
    parameter's dtype); the float16 step follows the float64 one."""
    gen = torch.Generator().manual_seed(0)
    start, grad = 3 * torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)
    runs = {}
    for dt in (torch.float16, torch.float64):
        w = nn.Parameter(start.to(torch.float16).to(dt))
        opt = psiopt.AdamGStar([w], grouping="channel", lr=1.0, foreach=foreach)
        before = w.detach().clone()  # unit rows
        w.grad = grad.to(torch.float16).to(dt)
        opt.step()
        runs[dt] = (w.detach() - before).double(), opt
    (moved, opt), (reference, _) = runs[torch.float16], runs[torch.float64]
    assert start.norm(dim=1).min() > 16
    torch.testing.assert_close(moved, reference, rtol=0, atol=0.05 * float(reference.abs().max()))
    r4 = next(iter(opt.state.values()))["r4"]
    assert r4.dtype == torch.float32 and torch.isfinite(r4).all()
    w2 = nn.Parameter(torch.zeros(4, 64, dtype=torch.float16))
    again = psiopt.AdamGStar([w2], grouping="channel", lr=1.0, foreach=foreach)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(again.state[w2]["r4"], r4)


# -- huge and tiny rows ------------------------------------------------------------------------------
F32_SPHERE = ("float32: the row norm sqrt(sum w^2) (torch.linalg.vector_norm, no scaling) overflows to inf "
              "for rows x1e30 and underflows to 0 for rows x1e-30; the rows are set to exactly zero (with "
              "their BatchNorm statistics) when the optimizer is built")
F32_ZERO = ("float32: the row norm of rows x1e-30 underflows to 0; the first step sets the rows to exactly "
            "zero (PSI: s = r0*safe_inv(0) = 0; PSGD: rescaled back to a norm of 0)")
F32_NAN = ("float32: the row norm of rows x1e30 overflows to inf (and |w|^2 with it); the first step "
           "(Adam-SRT: the second) makes the rows NaN (inf*0), the step after every parameter (loss NaN)")
#: float32 cases where ‖w‖² leaves the dtype's range: refused when the optimizer is built (before,
#: these rows were silently zeroed or turned NaN: the reasons above)
REFUSED = {
    **{(n, s, torch.float32): F32_SPHERE for n in (*UNIT_START, "adamg-star") for s in (1e30, 1e-30)},
    **{(n, 1e-30, torch.float32): F32_ZERO for n in ("psi-sgd", "psi-sgdm", "psgd", "adamsrt")},
    **{(n, 1e30, torch.float32): F32_NAN for n in ("psi-sgd", "psi-sgdm", "psgd", "adamsrt")},
}


def scale_case(name, scale, dtype):
    return pytest.param(name, scale, dtype, id=f"{name}-{scale:g}-{str(dtype).removeprefix('torch.')}")


def scaled_run(name, dtype, scale):
    """Five steps from ``mlp`` with rows 0-2 of ``0.weight`` multiplied by ``scale``; BatchNorm's eps
    is negligible in float64 (1e-300), so the network is exactly invariant there."""
    model = mlp(dtype, eps=1e-300 if dtype == torch.float64 else 1e-5)
    x, y = mlp_data(dtype)
    with torch.no_grad():
        model[0].weight[:3] *= scale
    steps(model, psiopt.create_optimizer(model, name, x), x, y, 5)
    return model[0].weight.detach()


@pytest.mark.parametrize("name, scale, dtype", [scale_case(n, s, d) for d in (torch.float64, torch.float32)
                                                for s in (1e30, 1e-30) for n in NAMES])
def test_rows_scaled_by_1e30_or_1e_30(name, scale, dtype):
    """Every optimizer: finite, no row set to zero.  PSI-SGD(M) are equivariant (the run is the
    unscaled run ×scale) and UN, SGDG, AdamG, B-SGD start from unit rows (the run is the unscaled
    run); AdamG* follows SGD+L2 from the raw rows (Theorem 4), whose steps depend on the scale.
    Where ‖w‖² leaves float32's range the optimizer is refused at construction, in one line."""
    if (name, scale, dtype) in REFUSED:
        with pytest.raises(ValueError, match="squared norms outside the range of float32"):
            scaled_run(name, dtype, scale)
        return
    w = scaled_run(name, dtype, scale)
    assert torch.isfinite(w).all(), "non-finite rows"
    assert torch.count_nonzero(w, dim=1).min() > 0, "a row was set to exactly zero"
    if dtype == torch.float64 and name in PSI | UNIT_START:
        expected = scaled_run(name, dtype, 1.0).clone()
        if name in PSI:
            expected[:3] *= scale
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=0)


# -- models: frozen, nothing invariant, eval mode, bad inputs, tied, weight_norm, transformer ----------
def test_a_model_without_invariant_parameters_warns_and_is_torch_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    twin = copy.deepcopy(model)
    x, y = mlp_data()
    match = r"found no scale-invariant parameter in Sequential \(it has no normalisation layer\)"
    with pytest.warns(UserWarning, match=match):
        opt = psiopt.create_optimizer(model, "psi-sgdm", x)
    steps(model, opt, x, y, 3)
    steps(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_model_with_every_parameter_frozen_is_refused():
    model = mlp().requires_grad_(False)
    for name in ("psi-sgd", "sgd"):
        with pytest.raises(ValueError, match="empty parameter list"):
            psiopt.create_optimizer(model, name, mlp_data()[0])


@pytest.mark.parametrize("name", ["un-sgd", "psi-sgdm", "sgd"])
def test_an_eval_mode_model_is_discovered_in_train_mode_and_left_in_eval_mode(name):
    model = mlp(eps=1e-12)
    for _ in range(3):  # running statistics of a few batches
        model(torch.randn(16, 8, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    model.eval()
    x, _ = mlp_data()
    out = model(x)
    opt = psiopt.create_optimizer(model, name, x)
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight"], ["1.weight", "1.bias", "3.weight",
                                                                           "3.bias"]]
    assert not model.training
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-9)  # (UN normalised the rows: stats followed)


def test_bad_example_inputs_raise_and_leave_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        psiopt.create_optimizer(model, "un-sgd", torch.randn(16, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        psiopt.create_optimizer(model, "un-sgd", torch.randn(1, 8))  # discovery runs in train mode
    with pytest.raises(ValueError, match="needs example_inputs"):
        psiopt.create_optimizer(model, "un-sgd")
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Tied(nn.Module):
    """One Parameter used by two layers, each followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.bn1, self.bn2 = nn.BatchNorm1d(4, eps=1e-12), nn.BatchNorm1d(4, eps=1e-12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.b(torch.relu(self.bn1(self.a(x)))))))


@pytest.mark.parametrize("name", ["un-sgd", "adamg", "psi-sgdm"])
def test_a_tied_weight_is_one_parameter_and_both_statistics_follow_it(name):
    torch.manual_seed(0)
    model = Tied().double()
    for _ in range(3):
        model(torch.randn(16, 4, dtype=torch.float64))
    with torch.no_grad():
        model.a.weight.mul_(3.0)
    model.eval()
    x, y = mlp_data(cin=4)
    out = model(x)
    opt = psiopt.create_optimizer(model, name, x)
    assert opt.param_groups[0]["param_names"] == ["a.weight"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-9)  # bn1 and bn2 both followed
    model.train()
    steps(model, opt, x, y, 3)
    assert model.a.weight is model.b.weight and finite(model)


@pytest.mark.parametrize("name", ["psi-sgdm", "un-sgd", "adamg"])
def test_weight_norm_direction_is_found_by_discovery(name):
    """``original1`` (v) of weight_norm is invariant per row by construction: discovery reads the
    parametrization's ops and finds it, the check confirms it, optimizers train it."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = mlp_data()
    declared = {"0.parametrizations.weight.original1": "channel"}
    assert psiopt.find_scale_invariant(model, x) == declared
    assert psiopt.check_invariance(model, x, declared).ok
    out = model(x)
    opt = psiopt.create_optimizer(model, name, x)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)  # v unit-normalised or not: same net
    losses = steps(model, opt, x, y, 10)
    assert finite(model) and min(losses[1:]) < losses[0]


class Tx(nn.Module):
    """Linear → LayerNorm embedding, one TransformerEncoderLayer, mean-pooled head."""

    def __init__(self):
        super().__init__()
        self.embed, self.ln = nn.Linear(4, 16, bias=False), nn.LayerNorm(16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, s):
        return self.head(self.block(self.ln(self.embed(s))).mean(1))


def test_transformer_block_internals_are_not_claimed_invariant():
    """Attention's in_proj/out_proj are used functionally and linear1/linear2 feed residual sums;
    the key part of in_proj_bias is cancelled by the softmax (with dropout too: on the CPU the
    attention then runs ``_safe_softmax``; checked numerically)."""
    seq = torch.randn(4, 5, 16)
    for norm_first in (False, True):
        block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first).eval()
        found = psiopt.find_scale_invariant(block, seq)
        assert found == {"self_attn.in_proj_bias": "cancelled[16:32]"} and not block.training
        assert psiopt.check_invariance(block, seq, found).ok
    torch.manual_seed(0)
    model, s = Tx().double(), torch.randn(8, 5, 4, dtype=torch.float64)
    mapping = psiopt.find_scale_invariant(model, s)
    assert mapping == {"embed.weight": "tensor", "block.self_attn.in_proj_bias": "cancelled[16:32]"}
    assert psiopt.check_invariance(model, s, mapping).ok


@pytest.mark.parametrize("name", NAMES)
def test_transformer_block_trains_with_every_optimizer(name):
    torch.manual_seed(0)
    model, s = Tx().double(), torch.randn(8, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = steps(model, psiopt.create_optimizer(model, name, s), s, y, 10)
    assert finite(model) and min(losses[1:]) < losses[0]


# -- wrong overrides and hyperparameters -------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"mapping": {"nope.weight": "channel"}}, "unknown parameter name"),
    ({"overrides": {"0.weight": "rows"}}, "invalid grouping 'rows'"),
    ({"overrides": {"0.weight": "groups:3"}}, "8 channels do not split into 3"),
    ({"overrides": {"0.weight": 3}}, "grouping must be a string"),
    ({"lr": -0.1}, "invalid lr: -0.1"),
    ({"lr": float("nan")}, "invalid lr: nan"),
    ({"lr": float("inf")}, "invalid lr: inf"),
    ({"lr": "0.1"}, "invalid lr: '0.1'"),
    ({"invariant_lrr": 0.1}, r"unknown hyperparameter\(s\) \['lrr'\]"),
    ({"momentum": 1.0}, "invalid momentum: 1.0"),
    ({"betas": (0.9, 0.99)}, r"unknown hyperparameter\(s\) \['betas'\]"),
], ids=lambda v: str(v)[:40])
def test_wrong_overrides_and_hyperparameters_are_value_errors_before_any_change(kwargs, words):
    model = bn_net()
    x, _ = bn_data()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        psiopt.create_optimizer(model, "sgdg", x, **kwargs)  # SGDG would unit-normalise rows
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_wrong_cancelled_declaration_is_caught_by_check_invariance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    declared = {**psiopt.find_scale_invariant(model, x), "3.bias": "cancelled"}
    assert declared["0.bias"] == "cancelled"  # the true one
    report = psiopt.check_invariance(model, x, declared)
    assert [c.name for c in report.failures] == ["3.bias"]


# -- foreign or mismatched optimizer state -----------------------------------------------------------
@pytest.mark.parametrize("source, target", [("psi-sgdm", "adamg"), ("sgd", "psi-sgdm"), ("adam", "adams")])
def test_a_foreign_optimizer_state_dict_is_refused_when_loaded(source, target):
    x, y = bn_data()
    model, other = bn_net(), bn_net()
    opt = psiopt.create_optimizer(model, source, x)
    train(model, opt, x, y, 2)
    mine = psiopt.create_optimizer(other, target, x)
    with pytest.raises(ValueError):
        mine.load_state_dict(opt.state_dict())
    train(other, mine, x, y, 1)  # and the optimizer still works


@pytest.mark.parametrize("name", ["psi-sgdm", "un-sgd", "adams"])
def test_a_state_dict_of_a_model_with_other_shapes_is_refused_when_loaded(name):
    x, y = mlp_data(cin=4)
    small, large = mlp(width=6, cin=4), mlp(width=8, cin=4)
    opt = psiopt.create_optimizer(small, name, x)
    steps(small, opt, x, y, 2)
    mine = psiopt.create_optimizer(large, name, x)
    with pytest.raises(ValueError, match="0.weight"):
        mine.load_state_dict(opt.state_dict())


# -- run directories: corrupt files, unwritable output, disk full, kill -9 ----------------------------
@pytest.mark.parametrize("kind", ["not-a-checkpoint", "another-runs"])
def test_a_checkpoint_that_is_not_this_runs_is_one_line(tmp_path, capsys, kind):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    if kind == "not-a-checkpoint":
        torch.save({"hello": 1}, run / "checkpoint.pt")
    else:
        assert main(["train", *QUICK, "--dataset", "toy-regression", "--model", "toy-elu",
                     "--out", str(tmp_path / "other")]) == 0
        os.replace(tmp_path / "other" / "checkpoint.pt", run / "checkpoint.pt")
    before = snapshot(run)
    capsys.readouterr()
    one_line(capsys, main(["train", *QUICK, "--epochs", "2", "--resume", "--out", str(run)]), "checkpoint.pt")
    assert snapshot(run) == before


@pytest.mark.parametrize("where", [
    "under-a-file",
    pytest.param("read-only", marks=pytest.mark.skipif(os.geteuid() == 0,
                                                       reason="root writes into read-only directories")),
])
def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    one_line(capsys, main(["train", *QUICK, "--out", str(out)]), str(out.parent))


class Killed(BaseException):
    """SIGKILL at a chosen moment (see the module docstring)."""


def enospc(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def killed(path):
    return Killed(str(path))


def fail_write(monkeypatch, where, error):
    """Make the next write of ``where`` raise ``error(path)``, leaving the files a full disk or a kill
    leaves: "save": half of checkpoint.pt.tmp; "rename": all of it, not yet renamed to checkpoint.pt;
    "config": config.json (or its temporary file) written in part (``Path.write_text``);
    "metrics": half of the epoch's record appended to metrics.jsonl."""
    if where == "save":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            raise error(path)
        monkeypatch.setattr(torch, "save", save)
    elif where == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith("checkpoint.pt"):
                raise error(dst)
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    elif where == "config":
        real_write = pathlib.Path.write_text

        def write_text(self, data, *args, **kwargs):
            if not self.name.startswith("config.json"):  # config.json or its temporary file
                return real_write(self, data, *args, **kwargs)
            with open(self, "w") as f:
                f.write(data[: len(data) // 3])
            raise error(self)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    else:
        class Short:
            def __init__(self, path, mode):
                self.path, self.f = path, open(path, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                raise error(self.path)
        monkeypatch.setattr(harness, "open", Short, raising=False)


@pytest.mark.parametrize("where", ["save", "config", "metrics"])
def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch, where):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    capsys.readouterr()
    fail_write(monkeypatch, where, enospc)
    argv = ["train", *QUICK, "--epochs", "2", "--checkpoint-seconds", "0", "--resume", "--out", str(run)]
    one_line(capsys, main(argv), "No space left on device", codes=(1, 2))


CONFIG_LOST = ("config.json is rewritten in place (Path.write_text) at the start of every resumed "
               "session: when that write fails (disk full) or is killed, config.json is left truncated and "
               "every later --resume is refused ('config.json: cannot be read ...; move the run directory "
               "away'); the run is lost although checkpoint.pt is intact")
METRICS_LOST = ("a short write of an epoch's record (disk full) leaves a torn last line in metrics.jsonl; "
                "although that record lies beyond the checkpoint, every later --resume is refused "
                "('metrics.jsonl, line 2: not a JSON record'); the run is lost")


@pytest.mark.parametrize("where", ["save", "config", "metrics"])
def test_after_a_disk_full_error_the_run_resumes_as_if_uninterrupted(tmp_path, monkeypatch, where):
    """The harness API raises a RunError naming the file; the last good checkpoint stays, and once
    space is freed
    the resumed run is the uninterrupted one."""
    def quiet(*_):
        pass

    config = RunConfig(dataset="synthetic", subset=128, epochs=3)
    whole = harness.train(config, tmp_path / "whole", log=quiet, checkpoint_seconds=0)
    run = tmp_path / "run"
    harness.train(RunConfig(**{**config.__dict__, "epochs": 1}), run, log=quiet)
    fail_write(monkeypatch, where, enospc)
    with pytest.raises(harness.RunError, match="No space left on device"):
        harness.train(config, run, resume=True, log=quiet, checkpoint_seconds=0)
    monkeypatch.undo()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    harness.train(config, run, resume=True, log=quiet, checkpoint_seconds=0)
    assert strip(read_metrics(run)) == strip(whole)


@pytest.mark.parametrize("moment", [
    "save", "rename",
    "config",
])
def test_kill_9_during_a_write_loses_nothing(tmp_path, monkeypatch, moment):
    whole, run = tmp_path / "whole", tmp_path / "run"
    argv = ["train", *QUICK, "--epochs", "2", "--checkpoint-seconds", "0", "--resume"]
    assert main([*argv, "--out", str(whole)]) == 0
    assert main(["train", *QUICK, "--out", str(run)]) == 0
    fail_write(monkeypatch, moment, killed)
    with pytest.raises(Killed):
        main([*argv, "--out", str(run)])
    monkeypatch.undo()
    assert main([*argv, "--out", str(run)]) == 0
    assert strip(read_metrics(run)) == strip(read_metrics(whole))


# -- data files --------------------------------------------------------------------------------------
def write_mnist(root, labels=None):
    import gzip

    for split, n in (("train", 8), ("t10k", 4)):
        head = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + bytes(range(98)) * 8 * n))
        values = bytes(labels if split == "train" and labels else [i % 10 for i in range(n)])
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + values))


def train_on(dataset, data_dir):
    return main(["train", "--dataset", dataset, "--data-dir", str(data_dir), "--no-progress",
                 "--out", str(data_dir / "r")])


def test_a_file_that_is_not_gzip_is_named(tmp_path, capsys):
    write_mnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    one_line(capsys, train_on("mnist", tmp_path), str(bad), "cannot read IDX file", "Not a gzipped file")
    assert not (tmp_path / "r").exists()


def test_a_label_out_of_range_is_named_before_training(tmp_path, capsys):
    write_mnist(tmp_path, labels=[0, 200, 2, 3, 4, 5, 6, 7])
    one_line(capsys, train_on("mnist", tmp_path), "200")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("broken, words", [
    ("truncated", ["data_batch_3: cannot read CIFAR pickle batch", "truncated"]),
    ("rows-of-another-length", ["malformed CIFAR batch"]),
    pytest.param("a-list", ["cifar-10-batches-py"]),
])
def test_a_malformed_cifar_batch_is_named(tmp_path, capsys, broken, words):
    import pickle

    import numpy as np

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    good = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps([1, 2, 3]) if broken == "a-list" else good)
    if broken == "truncated":
        (base / "data_batch_3").write_bytes(good[: len(good) // 2])
    elif broken == "rows-of-another-length":
        (base / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8),
                                                          b"labels": [0, 1, 2, 3]}))
    one_line(capsys, train_on("cifar10", tmp_path), *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("grouping", ["tensor", "channel"])
@pytest.mark.parametrize("path", [{"foreach": False}, {}, {"fused": True}],
                         ids=["reference", "default", "fused"])
@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_an_empty_parameter_in_a_group_changes_nothing(name, path, grouping):
    """A (0, 4) parameter (a layer with no output) beside a (6, 4) one: the step is that of the
    group without it (Adam-S and Adam-SRT divided by its group size, 0, and raised
    ZeroDivisionError; torch's Adam steps it)."""
    if path.get("fused") and not getattr(psiopt.REGISTRY[name].cls, "fused_rule", False):
        pytest.skip("no fused kernel")
    gen = torch.Generator().manual_seed(0)
    w0, gs = torch.randn(6, 4, generator=gen), [torch.randn(6, 4, generator=gen) for _ in range(2)]
    ends = []
    for empty in (False, True):
        w, e = nn.Parameter(w0.clone()), nn.Parameter(torch.zeros(0, 4))
        opt = psiopt.create_optimizer([{"params": [w, e] if empty else [w], "grouping": grouping}], name,
                                      **path)
        for g in gs:
            w.grad, e.grad = g.clone(), torch.zeros(0, 4)
            opt.step()
        ends.append(w.detach())
    torch.testing.assert_close(ends[1], ends[0], rtol=1e-6, atol=1e-7)
