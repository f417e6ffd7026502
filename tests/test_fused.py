"""The fused per-row CPU kernels (``psiopt.optim.kernels``, ``fused=`` of every psiopt optimizer).

Every rule with a kernel is checked against the reference path in ``tests/test_optimizer_matrix.py``
(every setting, float64, 1e-12).  Here: the split of rows among threads (tensors above the grain,
two threads), float32, views the kernels do not take mixed with views they take, the choice of
path (``fused``/``foreach``), errors, a machine without a C compiler, and old state dicts.
"""

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psiopt
from helpers import bn_data, bn_net, train
from psiopt.optim import kernels

FUSED = [n for n in psiopt.list_optimizers() if getattr(psiopt.REGISTRY[n].cls, "fused_rule", False)]
RULES = {  # settings that reach every branch of the kernels
    "psi-sgd": {}, "psi-sgdm": {}, "psgd": {"momentum": 0.9}, "un-sgd": {}, "adamg-star": {},
    "sgdmrt": {"weight_decay": 1e-3}, "adams": {"weight_decay": 1e-3}, "adamsrt": {},
    "sgdg": {}, "adamg": {"ortho": 0.0},  # with and without Cho & Lee's penalty
}


def test_every_rule_with_a_kernel_is_listed():
    assert sorted(RULES) == sorted(FUSED)


def wide_net(dtype):
    """Conv rows of 576 entries (64 rows: above the kernels' one-thread grain), a GroupNorm
    weight and a LayerNorm weight of one row."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 300, bias=False), nn.LayerNorm(300),
        nn.Linear(300, 5)).to(dtype)


def wide_run(name, dtype, steps=4, **kw):
    model = wide_net(dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    x = x.to(dtype)
    opt = psiopt.create_optimizer(model, name, x, **RULES[name], **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", FUSED)
def test_two_threads_split_the_rows_as_the_reference_path_steps_them(name):
    """To 1e-10: the kernels derive norms after the step from sums before it (the reference
    path reduces again), and four training steps carry those 1e-16 differences into the head."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused, opt = wide_run(name, torch.float64, fused=True)
        reference, ref_opt = wide_run(name, torch.float64, foreach=False)
    finally:
        torch.set_num_threads(threads)
    for (pname, a), b in zip(fused.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=pname)
    for p, q in zip(fused.parameters(), reference.parameters()):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, ref_opt.state[q][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FUSED)
def test_float32_steps_agree_with_the_reference_path(name):
    fused, _ = wide_run(name, torch.float32, fused=True)
    reference, _ = wide_run(name, torch.float32, foreach=False)
    for a, b in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FUSED)
def test_float32_sums_are_as_accurate_as_torchs(name):
    """The kernels sum chunks of a row in float32 (as torch's reductions) and add the chunks in
    double: after eight float32 steps, their distance to the float64 run is of the order of
    the foreach and reference paths' (measured: at most 1.4x the larger of the two)."""
    @torch.no_grad()
    def error(model, truth):
        return max(float((a.double() - b).abs().max() / b.abs().max())
                   for a, b in zip(model.parameters(), truth.parameters()))

    truth, _ = wide_run(name, torch.float64, steps=8, foreach=False)
    others = [error(wide_run(name, torch.float32, steps=8, foreach=f)[0], truth) for f in (False, True)]
    assert error(wide_run(name, torch.float32, steps=8, fused=True)[0], truth) <= 3 * max(others)


@pytest.mark.parametrize("path", [{"fused": True}, {"foreach": True}])
@pytest.mark.parametrize("name", ["adamg", "sgdg"])
@pytest.mark.parametrize("tangential", [1e-3, 1e-4])
def test_a_nearly_radial_penalised_gradient_in_float32(name, tangential, path):
    """Cho & Lee's penalty on a weight of more rows than columns (64 unit rows of 27 entries:
    YYᵀ − I cannot vanish) is radial beside a small tangential loss gradient; ‖h‖², the
    tangential part, taken as ‖ĝ‖² − <y,ĝ>²(2 − ‖y‖²) from float32 sums cancelled (AdamG's
    second moment 0.9% off at 1e-4 with the kernels' float32 sums, 0.6% on the vectorized path,
    0.04% on the reference path, which forms the tangent).  Each path's distance to the
    float64 run is at most 3x the float32 reference path's."""
    k, f = torch.arange(64.0, dtype=torch.float64)[:, None], torch.arange(1.0, 14.0, dtype=torch.float64)
    angle = 2 * math.pi * k * f / 64  # a harmonic tight frame, YᵀY = 64/27 I: the penalty
    frame = torch.cat([torch.full((64, 1), 27 ** -0.5, dtype=torch.float64),  # 2ω(YYᵀ − I)Y
                       (2 / 27) ** 0.5 * angle.cos(), (2 / 27) ** 0.5 * angle.sin()], dim=1)  # is radial
    torch.manual_seed(0)
    frame = frame @ torch.linalg.qr(torch.randn(27, 27, dtype=torch.float64))[0]

    def run(dtype, **kw):
        torch.manual_seed(1)
        w = nn.Parameter(frame.to(dtype, copy=True))
        clip = {"clip": tangential / 2} if name == "sgdg" else {}  # SGDG reads ‖h‖ to clip
        opt = psiopt.REGISTRY[name].cls([{"params": [w], "grouping": "channel"}], **clip, **kw)
        for _ in range(3):
            with torch.no_grad():
                u = torch.randn(64, 27, dtype=torch.float64)
                y = w.double() / w.double().norm(dim=1, keepdim=True)
                u -= (u * y).sum(1, keepdim=True) * y  # tangent to the rows
                w.grad = (u * tangential / u.norm(dim=1, keepdim=True)).to(dtype)
            opt.step()
        return {"w": w.detach().double(), **{k: v.double() for k, v in opt.state[w].items()}}

    truth, reference, tried = run(torch.float64, foreach=False), run(torch.float32, foreach=False), \
        run(torch.float32, **path)
    for key, value in truth.items():
        error, allowed = (float((run[key] - value).abs().max()) for run in (tried, reference))
        assert error <= 3 * allowed + 1e-12 * float(value.abs().max()), key


@pytest.mark.parametrize("name", FUSED)
def test_float32_sums_that_overflow(name):
    """Gradients of 1e30 (‖g‖² beyond float32's range) on unit rows.  The kernels' float32 sums
    overflow where the other paths' do, and the step is theirs (double sums stepped where the
    others stopped).  SGDG's and AdamG's clipping takes the tangent's norm in double on every
    path (the kernel's sums, ``geometry.clip``, ``RowLayout.sums(dtype=)``): the gradient is
    clipped to ``clip`` and the rows step alike (the other paths' norm overflowed and their step
    was zero, AdamG's vectorized second moment NaN, inf·0)."""
    results = {}
    for kw in ({"fused": True}, {"foreach": True}, {"foreach": False}):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(4, 8) / 8 ** 0.5)
        before = w.detach().clone()
        opt = psiopt.REGISTRY[name].cls([{"params": [w], "grouping": "channel"}], lr=0.1, **kw)
        w.grad = torch.randn(4, 8) * 1e30
        opt.step()
        assert torch.isfinite(w).all(), kw
        results[str(kw)] = w.detach()
    fused, vectorized, reference = results.values()
    torch.testing.assert_close(vectorized, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-6)
    if name in ("sgdg", "adamg"):  # a clipped step: every row moved
        assert (reference - before / before.norm(dim=1, keepdim=True)).norm(dim=1).min() > 1e-3


@pytest.mark.parametrize("name", ["sgdg", "adamg"])
def test_float16_tangent_norm_beyond_float16s_range_is_clipped_on_every_path(name):
    """float16 rows of 4096 entries (vectorized and reference paths; the kernels take no float16
    CPU tensors) with a finite gradient whose tangent norm (about 6e5) is beyond float16's
    65504: every path clips it to ``clip`` and moves each row as float64 does, to 1% (the
    reference path's float16 norm was inf and its step zero; then, with the norm in float64, its
    clipping factor, about 1.6e-7, rounded to float16 moved the rows 24% short)."""
    moved = {}
    for dtype, kw in ((torch.float16, {"foreach": True}), (torch.float16, {"foreach": False}),
                      (torch.float64, {"foreach": False})):
        torch.manual_seed(0)
        w0, g0 = torch.randn(4, 4096) / 64, torch.randn(4, 4096) * 1e4
        w, unit = nn.Parameter(w0.to(dtype)), w0.double() / w0.double().norm(dim=1, keepdim=True)
        extra = {"eps": 1e-4} if name == "adamg" else {}
        opt = psiopt.REGISTRY[name].cls([{"params": [w], "grouping": "channel"}], lr=0.1, **kw,
                                        **extra)
        w.grad = g0.to(dtype)
        assert torch.isfinite(w.grad).all() and float(w.grad.double().norm(dim=1).min()) > 65504
        opt.step()
        moved[(dtype, str(kw))] = (w.detach().double() - unit).norm(dim=1)
    vectorized, reference, wide = moved.values()
    torch.testing.assert_close(vectorized, wide, rtol=1e-2, atol=0)
    torch.testing.assert_close(reference, wide, rtol=1e-2, atol=0)


def test_views_the_kernels_do_not_take_step_as_the_others_do():
    """A channels-last weight (its gradient is channels-last: rows not contiguous) in a group with
    contiguous ones: the kernel steps these, the vectorized path that one, same result."""
    results = []
    for fused in (True, False):
        model, (x, y) = bn_net(), bn_data()
        model[0].to(memory_format=torch.channels_last)
        opt = psiopt.create_optimizer(model, "psi-sgdm", x, fused=fused)
        train(model, opt, x, y, 3)
        assert not model[0].weight.grad.is_contiguous()
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_default_takes_the_kernels_and_foreach_or_fused_false_does_not(kernel_calls):
    calls = kernel_calls
    for kw, expected in [({}, 1), ({"foreach": True}, 0), ({"fused": False}, 0),
                         ({"foreach": False}, 0), ({"fused": True}, 1)]:
        calls.clear()
        model, (x, y) = bn_net(), bn_data()
        train(model, psiopt.create_optimizer(model, "un-sgd", x, **kw), x, y, 1)
        assert len(calls) == expected * 3, kw  # three invariant groups: channel, groups:4, tensor


@pytest.mark.parametrize("name, op", [("psi-sgdm", "_fused_sgd_"), ("adams", "_fused_adam_")])
def test_the_other_parameters_take_torchs_fused_step_where_the_kernels_run(name, op, monkeypatch):
    """The non-invariant parameters (BatchNorm's affine, biases) take torch.optim's fused CPU
    SGD/Adam in eager steps unless ``foreach`` or ``fused=False`` is set; the step is the
    vectorized path's to rounding."""
    calls, real = [], getattr(torch, op)
    monkeypatch.setattr(torch, op, lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    models = {}
    for kw, fused in [({}, True), ({"fused": True}, True), ({"fused": False}, False),
                      ({"foreach": True}, False)]:
        calls.clear()
        model, (x, y) = bn_net(), bn_data()
        train(model, psiopt.create_optimizer(model, name, x, **kw), x, y, 3)
        assert bool(calls) == fused, kw
        models[str(kw)] = model
    for a, b in zip(models["{}"].parameters(), models["{'foreach': True}"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, op", [("psi-sgdm", "_fused_sgd_"), ("adams", "_fused_adam_")])
def test_the_other_parameters_of_cuda_tensors_take_torchs_fused_step(name, op, monkeypatch):
    """On CUDA the other parameters take torch's fused CUDA SGD/Adam (one call per dtype and
    step, bfloat16 included), unless ``foreach`` or ``fused=False`` is set; torch's Adam
    counters of CUDA tensors live on their device in float32, as ``torch.optim.Adam(fused=True)``
    keeps them, and stay there through a state_dict round trip, while the rule's own counters
    (Adam-S's invariant rows) stay on the CPU.  Fake CUDA tensors (no GPU here: torch's fused
    SGD has no fake kernel, so it is recorded and not run; the invariant rows take the
    vectorized path, the Triton kernels set aside)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls, real = [], getattr(torch, op)
    record = lambda *a, **k: calls.append([t.dtype for t in a[0]])  # noqa: E731
    monkeypatch.setattr(torch, op, (lambda *a, **k: record(*a) or real(*a, **k)) if name == "adams"
                        else record)
    monkeypatch.setattr(kernels, "backend", lambda t: None)
    for kw, fused in [({}, True), ({"fused": False}, False), ({"foreach": True}, False)]:
        calls.clear()
        with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            others = [torch.nn.Parameter(torch.randn(4, 3, device="cuda")),
                      torch.nn.Parameter(torch.randn(5, device="cuda", dtype=torch.bfloat16))]
            inv = [torch.nn.Parameter(torch.randn(4, 3, device="cuda"))] if name == "adams" else []
            for p in [*inv, *others]:
                p.grad = torch.randn_like(p)
            groups = [{"params": others}] + \
                [{"params": inv, "grouping": "channel", "norm_stats": [[]]}] * bool(inv)
            opt = psiopt.create_optimizer(groups, name, **kw)
            opt.step()
            opt.step()
            if name == "adams":
                assert [(st["step"].device.type, st["step"].dtype) for st in
                        (opt.state[p] for p in others)] == [("cuda" if fused else "cpu",
                                                             torch.float32)] * 2, kw
                assert opt.state[inv[0]]["step"].is_cpu
        assert sorted(map(str, calls)) == (sorted(map(str, [[torch.float32], [torch.bfloat16]] * 2))
                                           if fused else []), kw


@pytest.mark.parametrize("case", ["cpu-and-cuda", "strided-gradient"])
def test_torchs_adam_on_tensors_it_cannot_fuse_steps_with_foreach(case, monkeypatch):
    """A CUDA tensor with a strided gradient (torch's fused step would read it with the
    parameter's strides) steps with torch's foreach Adam; in a group of CPU and CUDA tensors
    (counters on the CPU for the first, on the device for the second: torch's capturable
    foreach Adam takes no CPU tensor) they step apart, a bfloat16 CPU tensor with foreach, the
    CUDA one fused (fake tensors, as above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls, fused, real = [], [], torch._foreach_add_
    monkeypatch.setattr(kernels, "backend", lambda t: None)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        others = [torch.nn.Parameter(torch.randn(4, 3, device="cuda"))]
        if case == "cpu-and-cuda":
            others.append(torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16)))
            for p in others:
                p.grad = torch.randn_like(p)
        else:
            others[0].grad = torch.randn(3, 4, device="cuda").t()
        opt = psiopt.create_optimizer([{"params": others}], "adams")
        monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: fused.append(a[0][0].device.type))
        monkeypatch.setattr(torch, "_foreach_add_",
                            lambda ts, *a, **k: calls.append(ts[0].device.type) or real(ts, *a, **k))
        opt.step()
        opt.step()
        if case == "cpu-and-cuda":
            assert fused == ["cuda"] * 2 and "cpu" in calls  # (and the fused step's counters' add)
            assert [opt.state[p]["step"].device.type for p in others] == ["cuda", "cpu"]
        else:
            assert not fused and set(calls) == {"cuda"} and opt.state[others[0]]["step"].is_cuda


def test_torchs_adam_counters_of_cuda_tensors_come_back_to_the_device_after_a_load(monkeypatch):
    """A state loaded with the counters of torch's Adam elsewhere (on the CPU: a checkpoint read
    with ``map_location="cpu"``, or written before they lived on the device; torch moves them to
    the device only for a group that sets ``fused``) or in float64: they go back to the
    parameter's device in float32, the rule's own counters to the CPU, and torch's fused CUDA
    Adam takes every parameter again, one whose first gradient comes after the load included
    (fake CUDA tensors, as above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls, real = [], torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    monkeypatch.setattr(kernels, "backend", lambda t: None)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        others = [torch.nn.Parameter(torch.randn(4, 3, device="cuda")) for _ in range(3)]
        inv = torch.nn.Parameter(torch.randn(4, 3, device="cuda"))
        for p in [inv, *others[:2]]:
            p.grad = torch.randn_like(p)
        for fused in (None, True):
            groups = [{"params": others, "fused": fused},
                      {"params": [inv], "grouping": "channel", "norm_stats": [[]]}]
            opt = psiopt.create_optimizer(groups, "adams")
            opt.step()
            state = opt.state_dict()
            for st in state["state"].values():
                st["step"] = st["step"].to("cpu", torch.float64)
            opt.load_state_dict(state)
            where = [(opt.state[p]["step"].device.type, opt.state[p]["step"].dtype) for p in others[:2]]
            assert where == [("cuda", torch.float32)] * 2 and opt.state[inv]["step"].is_cpu, fused
            others[2].grad = torch.randn_like(others[2])
            calls.clear()
            opt.step()
            assert calls == [3], fused
            assert all(opt.state[p]["step"].is_cuda for p in others) and opt.state[inv]["step"].is_cpu
            others[2].grad = None


@pytest.mark.parametrize("name", ["psi-sgdm", "adams"])
@pytest.mark.parametrize("case", ["late-gradient", "strided-gradient", "strided-state"])
def test_the_other_parameters_step_as_foreach_where_torchs_fused_step_cannot(name, case):
    """Where torch's fused SGD/Adam would raise (some momentum buffers made, others not: a
    parameter whose first gradient comes late) or step wrongly (a gradient or state with other
    strides than the parameter), the other parameters take the foreach path."""
    results = []
    for kw in ({}, {"foreach": True}):
        model, (x, y) = bn_net(), bn_data()
        opt = psiopt.create_optimizer(model, name, x, **kw)
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            bias = model[1].bias  # a BatchNorm bias: a non-invariant parameter
            if case == "late-gradient" and step == 0:
                bias.grad = None
            elif case == "strided-gradient":
                bias.grad = torch.stack([bias.grad, bias.grad], dim=1)[:, 0]
            elif case == "strided-state" and step == 1:
                for key, value in opt.state[bias].items():
                    if key != "step":
                        opt.state[bias][key] = torch.stack([value, value], dim=1)[:, 0]
            opt.step()
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw, error, word", [
    ({"fused": True, "foreach": True}, ValueError, "cannot be set together"),
    ({"fused": True, "foreach": False}, ValueError, "cannot be set together"),
    ({"fused": 1}, ValueError, "invalid fused"),
    ({"foreach": 0}, ValueError, "invalid foreach"),
])
def test_conflicting_or_malformed_fused_is_refused(kw, error, word):
    model, x = bn_net(), bn_data()[0]
    with pytest.raises(error, match=word):
        psiopt.create_optimizer(model, "psi-sgd", x, **kw)


def test_fused_true_on_a_rule_without_a_kernel_is_refused():
    class Plain(psiopt.UnitNormSGD):
        fused_rule = False

    model, x = bn_net(), bn_data()[0]
    with pytest.raises(ValueError, match="Plain has no fused kernel"):
        Plain(psiopt.param_groups(model, x), fused=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_takes_the_vectorized_path_and_fused_true_says_why_not(dtype):
    model, (x, y) = bn_net(dtype=dtype), bn_data(dtype=dtype)
    before = model[0].weight.detach().clone()
    train(model, psiopt.create_optimizer(model, "psi-sgd", x), x, y, 1)
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        psiopt.create_optimizer(model, "psi-sgd", x, fused=True)


def test_fused_true_is_checked_before_any_group_is_stepped():
    """A parameter moved to float16 after construction: refused at the next step, before the
    float32 group (stepped first) changes."""
    model, (x, y) = bn_net(dtype=torch.float32), bn_data(dtype=torch.float32)
    opt = psiopt.create_optimizer(model, "psi-sgd", x, fused=True)
    F.cross_entropy(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model[7].weight.data = model[7].weight.data.half()  # the Linear weight LayerNorm normalises
    with pytest.raises(ValueError, match="not torch.float16"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.dtype == torch.float32)


def test_without_a_compiler_steps_warn_once_and_fused_true_raises(tmp_path):
    """A machine without a C compiler: a fresh process (the library is built once per process)."""
    code = """
import warnings
import torch
import psiopt
from helpers import bn_data, bn_net, train
model, (x, y) = bn_net(), bn_data()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train(model, psiopt.create_optimizer(model, "un-sgd", x), x, y, 2)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "could not build its fused CPU kernels" in messages[0], messages
assert torch.isfinite(model[0].weight).all()
try:
    psiopt.create_optimizer(model, "un-sgd", x, fused=True)
except RuntimeError as e:
    assert "could not build" in str(e), e
else:
    raise AssertionError("fused=True did not raise")
print("ok")
"""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "PSIOPT_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PSIOPT_CACHE_DIR", str(tmp_path))
    kernels._build()
    (built,) = tmp_path.iterdir()
    assert built.suffix == ".so"
    inode = built.stat().st_ino
    kernels._build()
    assert list(tmp_path.iterdir()) == [built] and built.stat().st_ino == inode  # not rebuilt
    built.unlink()  # (this process has the file mapped: a new file, not the old one truncated)
    built.write_bytes(b"not a library")  # a file that does not load is built again (in a new
    subprocess.run([sys.executable, "-c", "from psiopt.optim import kernels; kernels._build()"],
                   check=True, env={**os.environ, "PSIOPT_CACHE_DIR": str(tmp_path)})  # process)
    assert built.stat().st_size > 1000


def test_a_compiler_command_with_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("PSIOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "env cc")
    kernels._build()
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


@pytest.mark.parametrize("fused,compiled", [(True, False), (False, False), (True, True)])
def test_steps_bump_the_version_counters_autograd_checks(fused, compiled, kernel_calls):
    """A second backward through a graph that saved a weight the step changed must fail, as
    with torch's in-place updates (the kernels write through pointers; compiled, the op
    ``psiopt::fused_rows`` does)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    opt = psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=0.1, momentum=0.9, fused=fused)
    step = opt.step
    if compiled:
        w.grad = torch.randn(3, 4)
        opt.step()  # state made eagerly: the compiled steps below run the kernel
        torch._dynamo.reset()
        step = torch.compile(opt.step)
    loss = (w * w).sum()  # saves w
    loss.backward(retain_graph=True)
    version, calls = w._version, len(kernel_calls)
    step()
    assert len(kernel_calls) > calls if fused else not kernel_calls
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_op_bumps_versions_refuses_grad_and_survives_a_reload():
    """``psiopt::fused_rows`` called directly: it bumps the versions of what it writes, refuses
    tensors that require grad under grad mode (it has no derivative), and importing the module
    again (``importlib.reload``) finds it declared."""
    import importlib

    H = torch.tensor([0.1], dtype=torch.float64)  # (h: a float64 tensor, see rowrules.OP_SIGNATURE)
    g, live = torch.randn(4, 8), torch.ones(4, 1)
    w = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="require grad"):
        kernels.fused_rows("unit", [w], [g], [], [live], [], None, H, False)
    with torch.no_grad():
        version = w._version
        kernels.fused_rows("unit", [w], [g], [], [live], [], None, H, False)
    assert w._version > version
    importlib.reload(kernels)
    assert kernels.fused_rows is torch.ops.psiopt.fused_rows.default
    with torch.no_grad():
        kernels.fused_rows("unit", [w], [g], [], [live], [], None, H, False)
    assert w._version > version + 1


def test_state_of_the_wrong_size_is_not_handed_to_the_kernels():
    """State loaded from another model (a scalar exp_avg_sq per tensor): the kernel would read
    and write past it; the step takes the vectorized path, which refuses it."""
    model, (x, y) = bn_net(), bn_data()
    opt = psiopt.create_optimizer(model, "adams", x)
    train(model, opt, x, y, 1)
    saved = opt.state_dict()
    for state in saved["state"].values():
        if "exp_avg_sq" in state and state["exp_avg_sq"].dim() > 1:
            state["exp_avg_sq"] = state["exp_avg_sq"].sum()
    opt.load_state_dict(saved)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError):
        opt.step()


@pytest.mark.parametrize("name", ["adamg", "psgd", "sgdmrt", "adams"])
def test_non_finite_values_give_the_reference_path_state(name):
    """NaN survives the kernels' clamps as it does torch's clamp_min (AdamG's second moment was
    finite), and without weight decay no 0·w is taken (Adam-S's moments were NaN beside an
    infinite weight, the reference's inf and finite)."""
    runs = []
    for kw in ({"fused": True}, {"foreach": False}):
        model, (x, y) = bn_net(), bn_data()
        extra = {"momentum": 0.9} if name == "psgd" else {}
        opt = psiopt.create_optimizer(model, name, x, **extra, **kw)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model[0].weight.grad[0, 0, 0, 0] = float("nan")
            model[3].weight.grad[1, 0, 0, 0] = float("inf")
            model[7].weight[2, 0] = float("inf")
        opt.step()
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, equal_nan=True, rtol=1e-12, atol=1e-14)
        for key, value in oa.state[pa].items():
            torch.testing.assert_close(value, ob.state[pb][key], equal_nan=True, rtol=1e-12,
                                       atol=1e-14, msg=f"{name} {key}")


def test_rows_larger_than_the_cache_are_split_among_threads_reproducibly():
    """A one-group weight of 90 000 entries (above the kernels' 65 536) with two threads: the
    threads' partial sums are added in thread order, so two runs agree bit for bit, and both
    with the reference path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        finals = []
        for kw in ({"fused": True}, {"fused": True}, {"foreach": False}):
            torch.manual_seed(0)
            w = nn.Parameter(torch.randn(300, 300, dtype=torch.float64))
            opt = psiopt.SGDMRT([{"params": [w], "grouping": "tensor"}], lr=0.1, **kw)
            for step in range(3):
                g = torch.Generator().manual_seed(step)
                w.grad = torch.randn(300, 300, dtype=torch.float64, generator=g)
                opt.step()
            finals.append(w.detach().clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(finals[0], finals[1])
    torch.testing.assert_close(finals[0], finals[2], rtol=1e-12, atol=1e-14)


def test_state_dicts_saved_before_fused_existed_load():
    model, (x, y) = bn_net(), bn_data()
    opt = psiopt.create_optimizer(model, "psi-sgdm", x)
    train(model, opt, x, y, 2)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["fused"]
    twin = copy.deepcopy(model)
    other = psiopt.create_optimizer(twin, "psi-sgdm", x, fused=False)
    other.load_state_dict(saved)
    assert {g["fused"] for g in other.param_groups} == {False}  # this optimizer's setting kept
    train(model, opt, x, y, 2)
    train(twin, other, x, y, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = other.__getstate__()
        for group in state["param_groups"]:
            group.pop("fused")
        other.__setstate__(state)
    assert {g["fused"] for g in other.param_groups} == {None}  # (unpickled: the default)


@pytest.mark.parametrize("name", ["sgdg", "adamg"])
def test_with_the_penalty_one_penalised_gradient_is_alive_at_once(name):
    """Cho & Lee's penalised gradient is a full-size temporary torch's SGD does not make: the
    fused path steps the tensors one at a time, so the step's peak is one of them (and its
    Gram matrix), not all four."""
    from psiopt.experiments.bench import peak_extra_bytes

    weights = [nn.Parameter(torch.randn(64, 32, 3, 3)) for _ in range(4)]
    for w in weights:
        w.grad = torch.randn_like(w)
    opt = psiopt.create_optimizer([{"params": weights, "grouping": "channel"}], name, ortho=0.1)
    opt.step()  # state made
    one = weights[0].numel() * 4 + 64 * 64 * 4
    assert one <= peak_extra_bytes(opt) <= 1.5 * one
