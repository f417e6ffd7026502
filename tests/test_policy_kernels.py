"""NormPolicy's fused per-row kernels, and the C kernels generated from the rule definitions.

The policies' per-group work (the tangent projection, the fixed/unit retraction, the equilibrium
rotation) are rules of :mod:`psiopt.optim.rowrules` (``"project"``, ``"retract"``, ``"rotate"``)
like the optimizers' own: C on the CPU (:mod:`psiopt.optim.c_rows`), Triton on CUDA.  Here:

* every rule's generated C kernel equals the same definition run with torch
  (``rowrules.evaluate``) on every combination of the tensors it takes (float64 to 1e-12);
* NormPolicy with the kernels (the default) equals its torch path (``fused=False``) for every
  policy, with and without the projection, around SGD-momentum and AdamW, on models of several
  groupings (channel, tensor, a part ``groups:4[0:32]``): float64 to 1e-12, float32 close; the
  kernels are called, one call per rule and step;
* the same through the Triton kernels under Triton's interpreter;
* ``fused=True`` refuses, before anything changes, rows the kernels do not take.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import psiopt
from psiopt.experiments import zoo
from psiopt.optim import kernels, rowrules

MODELS = ["LN gain → linear → BN", "QK-norm (LayerNorm), fused qkv, no bias", "conv-ReLU-conv-BN"]
INNER = {"sgdm": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
         "adamw": lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.99))}
CASES = [("fixed", False, "sgdm"), ("fixed", True, "adamw"), ("unit", True, "sgdm"),
         ("unit", False, "adamw"), ("equilibrium", False, "adamw"), ("equilibrium", True, "sgdm"),
         ("free", True, "adamw")]


def _setup(name, dtype=torch.float64):
    model, x = zoo.build(name)
    model, x = model.to(dtype), x.to(dtype)
    out = model(x)
    y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(0))
    return model, x, y


def _train(model, x, y, policy, project, inner, fused, steps=4):
    groups = psiopt.optimizer_groups(model, x, weight_decay=1e-2, invariant_weight_decay=0.1)
    opt = INNER[inner](groups)
    wrapped = psiopt.NormPolicy(opt, policy, project=project, model=model, example_inputs=x,
                                fused=fused)
    for _ in range(steps):
        opt.zero_grad()
        out = model.train()(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        wrapped.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def calls(monkeypatch):
    """The rules the fused kernels ran, in order."""
    seen = []
    run = kernels.run

    def counted(kernel, *args, **kw):
        seen.append(kernel)
        return run(kernel, *args, **kw)

    monkeypatch.setattr(kernels, "run", counted)
    return seen


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy,project,inner", CASES)
def test_fused_policy_equals_its_torch_path_in_float64(name, policy, project, inner, calls):
    model, x, y = _setup(name)
    twin = copy.deepcopy(model)
    fused = _train(model, x, y, policy, project, inner, None)
    expected = {"fixed": ["retract"], "unit": ["retract"], "equilibrium": ["rotate"], "free": []}
    assert calls == (["project"] * project + expected[policy]) * 4  # one call per rule and step
    calls.clear()
    plain = _train(twin, x, y, policy, project, inner, False)
    assert calls == []
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("policy,project,inner", CASES)
def test_fused_policy_in_float32_is_as_close_to_float64_as_its_torch_path(policy, project, inner):
    name = "conv-ReLU-conv-BN"
    model, x, y = _setup(name)
    exact = _train(copy.deepcopy(model), x, y, policy, project, inner, False)
    low = model.float()
    fused = _train(copy.deepcopy(low), x.float(), y, policy, project, inner, None)
    plain = _train(low, x.float(), y, policy, project, inner, False)
    for e, a, b in zip(exact, fused, plain):
        assert (a.double() - e).abs().max() <= 4 * (b.double() - e).abs().max() + 1e-6


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split"])
def test_the_fused_policy_runs_through_triton_kernels_as_through_torch(monkeypatch, calls, split):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    launched, forms = [], set()
    from psiopt.optim import triton_rows
    launch, kernel = triton_rows._launch, triton_rows._kernel
    monkeypatch.setattr(triton_rows, "_launch", lambda *a: (launched.append(a[0]), launch(*a)))
    monkeypatch.setattr(triton_rows, "_kernel", lambda *a: (forms.add(a[1:]), kernel(*a))[1])
    if split:  # rows longer than 16 entries (all here): one program per chunk, in two launches
        monkeypatch.setattr(triton_rows, "MAX_BLOCK", 16)
    for policy, project, inner in [("fixed", True, "adamw"), ("equilibrium", False, "sgdm"),
                                   ("unit", False, "sgdm")]:
        model, x, y = _setup("QK-norm (LayerNorm), fused qkv, no bias")
        twin = copy.deepcopy(model)
        fused = _train(model, x, y, policy, project, inner, True, steps=2)
        plain = _train(twin, x, y, policy, project, inner, False, steps=2)
        for a, b in zip(fused, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert launched == calls and {"project", "rotate", "retract"} <= set(launched)
    assert {form for _, form in forms} == ({"partials", "reduce", "update"} if split else {"rows"})


def test_fused_true_refuses_rows_the_kernels_do_not_take_before_anything_changes():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(psiopt.optimizer_groups(model, x), lr=0.1)
    with pytest.raises(ValueError, match="fused"):
        psiopt.NormPolicy(opt, "fixed", fused=1)
    policy = psiopt.NormPolicy(opt, "unit", model=model, example_inputs=x, fused=True)
    model(x.to(memory_format=torch.channels_last)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="fused=True"):
        policy.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert policy.prepared == set()


# -- the generated C kernels against the same definitions run with torch ----------------------
#: per rule: the optional tensors it can take (b, s1, s2, k), the option's values, and h
TAKES = {
    "psi": ([(False, False), (True, False), (False, True), (True, True)], "bs1", (0.1, 0.9, 0.01)),
    "psgd": ([(False, False), (True, False)], "bk", (0.1,)),  # (k: the momentum, with b)
    "unit": ([(False, True)], "s1", (0.05,)),
    "adamg_star": ([(False, True)], "s1s2", (0.1, 0.9, 0.1)),
    "sgdmrt": ([(True, False)], "b", (0.1, 0.9, 0.01)),
    "adams": ([(True, True)], "bs1k", (0.9, 0.99, 0.01, 1e-8, 0.0)),
    "sphere": ([(True, True)], "bs1s2k", (0.9, 0.1, 1.0, 0.99, 1e-8)),
    "project": ([(True, False), (True, True)], "bs1", ()),
    "retract": ([(False, False), (False, True)], "s1", ()),
    "rotate": ([(True, False)], "bk", ()),
}


def test_every_rule_is_covered():
    assert sorted(TAKES) == sorted(rowrules.RULES)


def _inputs(shapes, dtype, b, s1, s2, k, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    gs = [0.3 * torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    out = {"ws": ws, "gs": gs}
    if b:
        out["b"] = [w + 0.2 * torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype) for w in ws]
    for key, on in (("s1", s1), ("s2", s2)):
        if on:
            out[key] = [(0.5 + torch.rand((s[0], 1), generator=g, dtype=torch.float64)).to(dtype)
                        for s in shapes]
    if k:
        out["k"] = [(math.cos(0.3 + i), math.sin(0.3 + i)) for i in range(len(shapes))]
    return out


@pytest.mark.parametrize("rule", sorted(TAKES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generated_c_kernel_equals_the_definition_run_with_torch(rule, dtype):
    combos, takes, h = TAKES[rule]
    shapes = [(5, 7), (3, 130), (2, 1), (4, 600)]  # rows of several chunks of the C loop
    spec = rowrules.RULES[rule]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for b, s in combos:
        for option in (0.0, 1.0) if spec.option is not None else (None,):
            hh = list(h)
            if option is not None:
                hh[spec.option] = option
            made = _inputs(shapes, dtype, b, s and "s1" in takes, s and "s2" in takes,
                           "k" in takes, seed=10 * b + 100 * s)
            twin = {key: [x.clone() if isinstance(x, torch.Tensor) else x for x in v]
                    for key, v in made.items()}
            ws, gs, tws, tgs = made.pop("ws"), made.pop("gs"), twin.pop("ws"), twin.pop("gs")
            assert kernels.run(rule, ws, gs, **made, h=tuple(hh)) is not False
            rowrules.evaluate(rule, tws, tgs, **twin, h=tuple(hh))
            for key, got, want in [("w", ws, tws)] + [(k, made[k], twin[k]) for k in ("b", "s1", "s2")
                                                      if k in made]:
                for a, e in zip(got, want):
                    torch.testing.assert_close(a, e, **tol, msg=lambda m, key=key: f"{rule} {key}: {m}")


@pytest.mark.parametrize("inner", ["sgdm", "adamw"])
@pytest.mark.parametrize("fused", [None, False])
def test_equilibrium_leaves_a_group_whose_step_is_radial_where_it_was(inner, fused):
    """A dead filter (zero gradient) under weight decay steps radially, to rounding: the
    direction of its step's tangential part is noise, so the group goes back to where it was
    (the torch path turned it in that direction and changed its norm by 7 %), on the kernels'
    path, the torch path and channels_last rows (which take the torch path)."""
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4).double())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net = copy.deepcopy(model).to(memory_format=layout)
        opt = INNER[inner](psiopt.optimizer_groups(net, x, weight_decay=0.1))
        policy = psiopt.NormPolicy(opt, "equilibrium", model=net, example_inputs=x, fused=fused)
        w = net[0].weight
        start = w.detach().clone()
        for _ in range(3):
            opt.zero_grad()
            net(x.to(memory_format=layout)).square().mean().backward()
            w.grad[1] = 0  # filter 1 is dead
            policy.step()
        torch.testing.assert_close(w[1], start[1], rtol=1e-12, atol=0)
        assert (w[0] - start[0]).abs().max() > 1e-4  # the others turned
        out.append(w.detach().clone())
    # (the layouts' convolutions round differently: 3e-10 apart after three steps)
    torch.testing.assert_close(out[0], out[1], rtol=1e-8, atol=1e-12)
