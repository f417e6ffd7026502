"""Hyperparameters as tensors (issue 23, item 5): ``lr`` may be a 0-d tensor, which torch's
schedulers write in place (``fill_``), so that a compiled step is not compiled again when the
schedule changes it; the step with a tensor lr is the step with its number.

Every registered optimizer, on a small network with the groupings the rules split on (float64,
one thread, ``aot_eager``: the graphs are those inductor would take, without its code
generation).  PSI-SGD's literal mode (``fixed_norm=False``) compiles to one graph (its overflow
guard scheduled without a branch on the step counter).
"""

import warnings

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import psiopt
from psiopt.optim import base

pytestmark = pytest.mark.usefixtures("one_thread", "float64_default")


@pytest.fixture
def float64_default():
    """Step counters are made in the default dtype, as torch.optim's: float64 here, so that
    compiled Adam steps (bias corrections from the counter tensors, torch's counterpart
    included) agree with eager ones to 1e-12 (in float32, torch's own Adam: 3e-8)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 6, bias=False), nn.LayerNorm(6),
                         nn.Linear(6, 3)).double()


def data():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=gen))


def build(name, lr, **kw):
    x, _ = data()
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = psiopt.create_optimizer(model, name, x, lr=lr, **kw)
    return model, opt


def train(model, opt, wrap, steps):
    """``steps`` steps of ``wrap(opt.step)`` (made after the scheduler, which wraps ``opt.step``),
    lr halved every two."""
    x, y = data()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step = wrap(opt.step)
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        step()
        sched.step()


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_scheduled_tensor_lr_compiles_once_and_steps_as_the_number(name):
    lr = psiopt.REGISTRY[name].invariant.get("lr", 0.1)
    runs = {"float": build(name, lr), "tensor": build(name, torch.tensor(lr, dtype=torch.float64)),
            "compiled": build(name, torch.tensor(lr, dtype=torch.float64))}
    for key in ("float", "tensor"):
        model, opt = runs[key]
        train(model, opt, lambda f: f, 6)
    model, opt = runs["compiled"]
    counter = CompileCounter()
    dynamo.reset()
    frames = []
    try:
        def counted(fn):
            step = torch.compile(fn, backend=counter)

            def run():
                step()
                frames.append(counter.frame_count)
            return run

        train(model, opt, counted, 6)
    finally:
        dynamo.reset()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # written in place
    # the first step makes state (another graph); from the second on, no new compilation while
    # the scheduler halves lr (steps 2 and 4)
    assert frames[1:] == [frames[1]] * 5, frames
    for key in ("tensor", "compiled"):
        for a, b in zip(runs["float"][0].parameters(), runs[key][0].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=f"{key}")


@pytest.mark.parametrize("name", ["psi-sgdm", "adams", "adamg", "sgdmrt", "un-sgd", "adamg-star",
                                  "psgd", "sgdg", "adamsrt", "psi-sgd"])
def test_tensor_arithmetic_of_a_device_lr_agrees(name, monkeypatch):
    """The paths a tensor lr on a device takes in eager steps (nothing read on the host: the lr
    and the step counters computed with as tensors, the kernels' ``h`` a tensor), taken here on
    the CPU by making tensors unreadable (:func:`base.readable`), on every path."""
    lr = psiopt.REGISTRY[name].invariant.get("lr", 0.1)
    for path in ({}, {"fused": False}, {"foreach": False}):
        ref_model, ref_opt = build(name, lr, **path)
        train(ref_model, ref_opt, lambda f: f, 4)
        model, opt = build(name, torch.tensor(lr, dtype=torch.float64), **path)
        with monkeypatch.context() as m:
            m.setattr(base, "readable", lambda v: not isinstance(v, torch.Tensor))
            for mod in ("quotient", "sphere"):
                if hasattr(getattr(psiopt.optim, mod), "readable"):
                    m.setattr(getattr(psiopt.optim, mod), "readable",
                              lambda v: not isinstance(v, torch.Tensor))
            train(model, opt, lambda f: f, 4)
        for a, b in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=str(path))


def test_psi_sgd_literal_mode_compiles_without_a_graph_break():
    """``fixed_norm=False``: the guard (every second step here, rows above norm 0.5: it rescales
    rows and the BatchNorm's running statistics) is scheduled from the traced counter."""
    model, opt = build("psi-sgdm", 0.1, fixed_norm=False, guard_every=2, max_norm=0.5)
    ref_model, ref_opt = build("psi-sgdm", 0.1, fixed_norm=False, guard_every=2, max_norm=0.5)
    x, y = data()
    dynamo.reset()
    try:
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
        for _ in range(5):
            for m, fn in ((ref_model, ref_opt.step), (model, step)):
                m.zero_grad()
                F.cross_entropy(m(x), y).backward()
                fn()
        for a, b in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        # the running statistics followed the guard's rescaling alike
        for a, b in zip(ref_model.buffers(), model.buffers()):
            torch.testing.assert_close(b.double(), a.double(), rtol=1e-12, atol=1e-12)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        report = dynamo.explain(opt.step)()
    finally:
        dynamo.reset()
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]
    assert report.graph_count == 1


def test_compiled_counters_live_on_the_parameters_device():
    """While compiling, new counters are made on the parameters' device (meta here, standing in
    for a GPU: the decision, :func:`base.counters_on_device`)."""
    p = torch.empty(3, 2, device="meta")
    assert not base.counters_on_device({"lr": 0.1}, torch.empty(2))
    assert not base.counters_on_device({"lr": 0.1}, p)  # (meta: nothing to compile on)
    q = torch.empty(2)
    assert base.new_step({"lr": torch.tensor(0.1)}, q).is_cpu


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0.1]), "0-d"),
    (torch.tensor(1, dtype=torch.int64), "floating-point"),
    (torch.tensor(0.1, requires_grad=True), "require grad"),
    (torch.tensor(-0.1), r"must lie in"),
    (torch.tensor(float("nan")), r"must lie in"),
])
def test_a_bad_tensor_lr_is_refused_when_added(bad, match):
    with pytest.raises(ValueError, match=match):
        build("psi-sgdm", bad)


def test_tensors_other_than_lr_are_refused():
    with pytest.raises(ValueError, match="only lr may be a tensor"):
        build("psi-sgdm", 0.1, momentum=torch.tensor(0.9))
    with pytest.raises(ValueError, match="only lr may be a tensor"):
        build("adams", 1e-3, betas=(torch.tensor(0.9), 0.999))


def test_a_cpu_tensor_lr_written_out_of_range_is_refused_at_the_step():
    model, opt = build("psi-sgdm", torch.tensor(0.1, dtype=torch.float64))
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.param_groups[0]["lr"].fill_(-1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="invalid lr"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_part_s_rest_follows_a_tensor_lr_in_proportion():
    """``part_lr0`` is the lr's number when the group is added (not the tensor, which the
    scheduler writes in place)."""
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = psiopt.PSISGD([{"params": [w], "grouping": "channel[0:3]"}],
                        lr=torch.tensor(0.2, dtype=torch.float64), momentum=0.9)
    group = opt.param_groups[0]
    assert group["part_lr0"] == pytest.approx(0.2) and not isinstance(group["part_lr0"], torch.Tensor)
    group["lr"].fill_(0.1)
    assert float(opt._rest_settings(group)["lr"]) == pytest.approx(0.1)  # 0.2 · 0.1/0.2, once


@pytest.mark.parametrize("name", ["psi-sgdm", "adams"])
def test_a_scheduled_tensor_lr_reaches_a_part_s_rest_as_a_float_lr_does(name):
    """The rest's lr shared the tensor the scheduler writes (the group's, through the defaults
    or the others' settings): it took the schedule twice, once in place and once through
    lr / part_lr0."""
    out = []
    for lr in (0.2, torch.tensor(0.2, dtype=torch.float64)):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
        opt = psiopt.create_optimizer([{"params": [w], "grouping": "channel[0:3]"}], name, lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        for step in range(4):
            w.grad = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            opt.step()
            scheduler.step()
        out.append((w.detach().clone(), float(opt._rest_settings(opt.param_groups[0])["lr"])))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=0)
    assert out[1][1] == pytest.approx(out[0][1]) == pytest.approx(0.2 * 0.5 ** 4)


def test_numbers_copied_to_a_device_once_per_distinct_values():
    """The kernels' hyperparameters and per-tensor scalars given as Python numbers are copied to
    a device once and kept by their values (``rowrules.on_device``): a step whose numbers did
    not change copies nothing from the host, as capture in a CUDA graph needs (on the meta
    device here: the tensor kept, or a new one).  Values that differ (-0.0 and 0.0 included)
    get their own tensor; CPU tensors are made anew (the C kernels read them)."""
    from psiopt.optim import kernels, rowrules

    rowrules._KEPT.clear()
    h = rowrules.hyper_tensor((0.1, 0.9, 0.0), "meta")
    assert h.shape == (6,) and h.dtype == torch.float64 and h.is_meta
    assert rowrules.hyper_tensor((0.1, 0.9, 0.0), "meta") is h
    assert rowrules.hyper_tensor((0.1, 0.9, -0.0), "meta") is not h
    assert rowrules.hyper_tensor((0.2, 0.9, 0.0), "meta") is not h
    assert kernels.scalars([(x,) for x in (0.1, 0.9, 0.0, 0.0, 0.0, 0.0)], "meta").shape == (6, 2)
    k = kernels.scalars([(1.0, 2.0), (3.0, 4.0)], "meta")
    assert k.shape == (2, 2) and kernels.scalars([(1.0, 2.0), (3.0, 4.0)], "meta") is k
    lr = torch.tensor(0.5, device="meta")
    mixed = rowrules.hyper_tensor((lr, 0.9), "meta")
    assert mixed.shape == (6,) and mixed is not rowrules.hyper_tensor((lr, 0.9), "meta")
    cpu = rowrules.hyper_tensor((0.1, -0.0), "cpu")
    assert cpu.tolist() == [0.1, 0.0, 0.0, 0.0, 0.0, 0.0] and str(cpu[1].item()) == "-0.0"
    assert rowrules.hyper_tensor((0.1, -0.0), "cpu") is not cpu
    assert kernels.scalars([(1.0, 2.0), (3.0, 4.0)]).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_each_group_holds_its_own_tensor_lr_so_per_group_schedules_do_not_compound():
    """One tensor ``lr`` given to ``create_optimizer`` (or ``param_groups``, or the defaults
    that a group added later takes) becomes one tensor per group: a scheduler writes each
    group's lr in place, and on a tensor the groups shared, ReduceLROnPlateau's halving was
    taken once per group (0.1 → 0.0125 with three groups) and LambdaLR's last group won."""
    runs = {}
    for key, lr in (("float", 0.1), ("tensor", torch.tensor(0.1, dtype=torch.float64))):
        model, opt = build("psi-sgdm", lr)
        x, y = data()
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        for _ in range(4):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            plateau.step(1.0)  # no improvement: halved at every step but the first
        runs[key] = model, opt
    lrs = [float(g["lr"]) for g in runs["tensor"][1].param_groups if g["grouping"] != "cancelled"]
    assert len(lrs) > 2 and lrs == [pytest.approx(0.1 * 0.5 ** 3)] * len(lrs), lrs
    for a, b in zip(runs["float"][0].parameters(), runs["tensor"][0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    opt = runs["tensor"][1]
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})  # takes the defaults' lr
    tensors = [g[k] for g in opt.param_groups for k in g if isinstance(g[k], torch.Tensor)]
    assert len({id(t) for t in tensors}) == len(tensors) == len(opt.param_groups)
    lr = torch.tensor(0.5, dtype=torch.float64)
    groups = psiopt.param_groups(net(), data()[0], lr=lr, invariant_lr=lr)
    assert len({id(g["lr"]) for g in groups}) == len(groups)
    assert all(float(g["lr"]) == 0.5 for g in groups if g["grouping"] != "cancelled")
    sgd = torch.optim.SGD(groups)  # LambdaLR, one factor per group
    torch.optim.lr_scheduler.LambdaLR(sgd, [lambda e, i=i: 1.0 / (i + 1) for i in range(len(groups))])
    assert [float(g["lr"]) for g in sgd.param_groups] == \
        [0.5 / (i + 1) for i in range(len(groups))]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "b-sgd", "psi-sgdm"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_a_tensor_lr_written_out_of_range_is_refused_at_the_step_by_every_optimizer(name, bad):
    """torch.optim's baselines included (their step checked only numbers: a negative tensor lr
    took steps up the gradient, NaN or inf wrote NaN into the weights)."""
    model, opt = build(name, torch.tensor(0.1, dtype=torch.float64))
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    for g in opt.param_groups:
        g["lr"].fill_(bad)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="invalid lr"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0.1]), "0-d"),
    (torch.tensor(1, dtype=torch.int64), "floating-point"),
    (torch.tensor(0.1, requires_grad=True), "require grad"),
])
def test_a_tensor_lr_of_the_wrong_form_written_later_is_refused_by_an_eager_step(bad, match):
    """As when the group is added, and as a compiled step refuses it (an eager step read the
    number first: an int64 lr that StepLR then filled with 0.5 became 0, silently)."""
    model, opt = build("psi-sgdm", torch.tensor(0.1, dtype=torch.float64))
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match=match):
        opt.step()


@pytest.mark.parametrize("name", ["adamg-star", "psi-sgdm", "adams", "un-sgd", "sgdg"])
def test_a_float32_tensor_lr_steps_as_its_number_on_a_device(name, monkeypatch):
    """A float32 lr tensor (``torch.tensor(1e-3)``'s dtype) on the path of a device lr (taken here
    by making tensors unreadable, as above): the rules' arithmetic on it is float64, as on its
    number (AdamG*'s ``1 − ηλ`` in float32 lost λ = 1e-5 entirely, so a compiled step, or one
    with a device lr, took no weight decay).  Invariant groups compared; torch's own Adam rounds
    a float32 lr tensor."""
    lr32 = torch.tensor(1e-3, dtype=torch.float32)
    kw = {"weight_decay": 1e-5} if name == "adamg-star" else {}
    ref_model, ref_opt = build(name, float(lr32), **kw)
    train(ref_model, ref_opt, lambda f: f, 4)
    model, opt = build(name, lr32.clone(), **kw)
    with monkeypatch.context() as m:
        for mod in (base, psiopt.optim.quotient, psiopt.optim.sphere):
            if hasattr(mod, "readable"):
                m.setattr(mod, "readable", lambda v: not isinstance(v, torch.Tensor))
        train(model, opt, lambda f: f, 4)
    for g, ref_g in zip(opt.param_groups, ref_opt.param_groups):
        if g["grouping"] not in (None, "cancelled"):
            for a, b in zip(ref_g["params"], g["params"]):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_numbers_new_at_every_step_do_not_push_the_row_tables_out(monkeypatch):
    """A float lr's Adam bias corrections are new numbers at every step: when the kept tensors
    fill up, those go (were: everything, the tables and addresses copied again every 1024 steps)."""
    from psiopt.optim import rowrules

    monkeypatch.setattr(rowrules, "_KEPT", {})
    monkeypatch.setattr(rowrules, "_KEEP", 8)
    table = rowrules.on_device(("rows", (1, 2)), lambda: torch.zeros(2), "meta")
    for step in range(20):
        rowrules.numbers_on([0.1, 1 - 0.9 ** (step + 1)], "meta")
    assert rowrules.on_device(("rows", (1, 2)), lambda: torch.zeros(2), "meta") is table
    assert len(rowrules._KEPT) < 8


def _added_group(name, setting: dict, explicit: bool):
    """``create_optimizer(…, name)`` with a zero parameter added in a group with ``setting`` (and
    ``foreach=True`` where ``explicit``), every gradient taken: ``(model, opt, the added
    parameter, the model's parameters before the step)``."""
    x, y = data()
    model, opt = build(name, 1e-3)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], **setting, **({"foreach": True} if explicit else {})})
    F.cross_entropy(model(x) + extra, y).backward()
    return model, opt, extra, [p.detach().clone() for p in model.parameters()]


def _refused_before_any_step(model, opt, before, match):
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_a_group_added_with_a_tensor_lr_steps_as_torch_s_adam_does(name):
    """The registry's Adam/AdamW default to foreach=True, which torch's Adam refuses with a
    tensor lr: a group added later with one took it from the defaults, and the next step
    updated the other groups before torch raised (a partial step).  Such a group now leaves
    foreach to torch, as create_optimizer's own groups do; one that sets foreach=True itself is
    refused before any parameter is stepped."""
    lr = {"lr": torch.tensor(1e-2, dtype=torch.float64)}
    model, opt, _, before = _added_group(name, lr, True)
    _refused_before_any_step(model, opt, before, "lr as a tensor with foreach=True")
    model, opt, extra, before = _added_group(name, lr, False)
    twin = extra.detach().clone().requires_grad_()
    twin.grad = extra.grad.clone()
    added = opt.param_groups[-1]  # (its weight decay moves nothing: the parameter is zero)
    torch.optim.Adam([twin], lr=lr["lr"], betas=added["betas"], eps=added["eps"]).step()
    opt.step()
    assert added["foreach"] is None
    assert torch.allclose(extra, twin, rtol=1e-12, atol=0) and bool(extra.ne(0).all())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before) if p.grad is not None)


def test_a_group_added_with_tensor_betas_steps_and_an_explicit_foreach_is_refused_first():
    """As a tensor lr: torch's foreach Adam refuses tensor betas only once it reaches that group,
    after stepping the others."""
    betas = {"betas": (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64))}
    model, opt, _, before = _added_group("adam", betas, True)
    _refused_before_any_step(model, opt, before, "beta1 and beta2 as a tensor with foreach=True")
    _, opt, extra, _ = _added_group("adam", betas, False)
    opt.step()
    assert opt.param_groups[-1]["foreach"] is None and bool(extra.ne(0).all())
