"""``torch.compile(opt.step)`` for every registered optimizer: it compiles, agrees with the eager
step, and the steady-state step is one graph (no graph break: ``torch._dynamo.explain``).

The network has every grouping kind the rules split on ("channel" before BatchNorm, two such
weights: compiled, most rules run per tensor, see ``compile_per_tensor``; "groups:2" before
GroupNorm, "tensor" before LayerNorm) and a cancelled bias; float32, four steps, one
thread.  Compilation takes a few seconds per optimizer on CPU, hence the ``slow`` mark.
"""

import warnings

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

import psiopt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 3))


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_compiled_step_agrees_with_eager_and_has_no_graph_break(name):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    eager, compiled = net(), net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_e = psiopt.create_optimizer(eager, name, x)
        opt_c = psiopt.create_optimizer(compiled, name, x)
    step = torch.compile(opt_c.step)
    dynamo.reset()
    try:
        for _ in range(4):
            for model, fn in ((eager, opt_e.step), (compiled, step)):
                backward(model, x, y)
                fn()
        for a, b in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        backward(compiled, x, y)
        report = dynamo.explain(opt_c.step)()
    finally:
        dynamo.reset()
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]
    assert report.graph_count == 1


PATHS = {"fused": {}, "vectorized": {"fused": False}, "reference": {"foreach": False}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["psgd", "sgdmrt", "psi-sgdm", "sgdg", "adamg", "adams", "adamsrt"])
def test_compiled_momentum_rules_on_rows_inductor_fuses(name, path, kernel_calls):
    """Rules that update a momentum buffer and then the weights from it, with the momentum on,
    on a weight whose rows inductor fuses with their reductions (288 entries a row): inductor
    (torch 2.13, CPU) failed there with "KeyError: 'bufN'" (pytorch#196570) for PSGD and
    SGD-MRT, whose sums are now kept apart from the update (``RowLayout.sums(apart=True)``),
    and with ``foreach=False`` for PSGD, SGD-MRT, PSI-SGDM and SGDG, whose reference paths
    update the buffer in place: compiled, every step now takes the vectorized rule (compared
    here with the eager reference path).  By default (``fused=None``) the compiled steady-state
    step calls the fused kernels through their op instead."""
    calls = kernel_calls
    gen = torch.Generator().manual_seed(0)
    start, grads = torch.randn(64, 32, 3, 3, generator=gen), torch.randn(3, 64, 32, 3, 3, generator=gen)
    weights = [nn.Parameter(start.clone()) for _ in range(2)]
    hyper = {"momentum": 0.9} if name == "psgd" else {}
    opts = [psiopt.create_optimizer([{"params": [w], "grouping": "channel"}], name, **PATHS[path],
                                    **hyper) for w in weights]
    step = torch.compile(opts[1].step)
    dynamo.reset()
    try:
        for g in grads:
            for w, fn in zip(weights, (opts[0].step, step)):
                w.grad = 0.01 * g
                calls.clear()
                fn()
    finally:
        dynamo.reset()
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    assert bool(calls) == (path == "fused")  # the last compiled step


@pytest.mark.parametrize("name", ["psi-sgdm", "sgdg", "adams"])
def test_compiled_group_of_mixed_dtypes_agrees_with_eager(name):
    """A group whose tensors differ in dtype has no :class:`RowLayout` and takes the reference
    path in eager mode; compiled, each tensor takes the vectorized rule on its own."""
    gen = torch.Generator().manual_seed(0)
    starts = [torch.randn(16, 8, generator=gen), torch.randn(8, 4, generator=gen, dtype=torch.float64)]
    grads = [[0.1 * torch.randn_like(s) for s in starts] for _ in range(3)]
    runs = [[nn.Parameter(s.clone()) for s in starts] for _ in range(2)]
    opts = [psiopt.create_optimizer([{"params": ws, "grouping": "channel"}], name) for ws in runs]
    step = torch.compile(opts[1].step)
    dynamo.reset()
    try:
        for gs in grads:
            for ws, fn in zip(runs, (opts[0].step, step)):
                for w, g in zip(ws, gs):
                    w.grad = g.clone()
                fn()
    finally:
        dynamo.reset()
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["psi-sgdm", "adams", "sgdg"])
def test_compiled_step_guards_state_by_identity_and_gradients_by_presence(name):
    """``_init_group`` (run eagerly by dynamo, as torch.optim's) hands dynamo the gradients and
    marks the state static: no guard checks a state tensor's or a gradient's metadata
    (TENSOR_MATCH), which traced lookups installed for each, a guard cost per step that
    outweighed the update itself on small tensors."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = psiopt.create_optimizer(model, name, x)
    backward(model, x, y)
    opt.step()  # state made
    try:
        report = dynamo.explain(opt.step)()
    finally:
        dynamo.reset()
    checked = [g.name for g in report.out_guards if g.create_fn_name() == "TENSOR_MATCH"
               and (".state[" in g.name or g.name.endswith(".grad"))]
    assert not checked, checked[:3]
    assert sum(g.create_fn_name() == "NOT_NONE_MATCH" and g.name.endswith(".grad")
               for g in report.out_guards) == sum(1 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("grouping", ["tensor", "channel"])
def test_compiled_first_step_with_state_made_before_it(grouping, kernel_calls):
    """AdamG*'s state is made at the first step, which also prepares the rows (a hand-built
    group: its warning is left out of compiled steps, a graph break there failed with "A view
    was created in no_grad mode ..."): handed to the fused kernels' op in that step, AOT
    autograd failed on two LayerNorm-like ("tensor") weights (the same message); that step
    takes the vectorized rule, the next ones the kernels."""
    calls = kernel_calls
    gen = torch.Generator().manual_seed(0)
    starts = [torch.randn(16, 8, generator=gen) for _ in range(2)]
    grads = [[0.1 * torch.randn_like(s) for s in starts] for _ in range(3)]
    runs = [[nn.Parameter(s.clone()) for s in starts] for _ in range(2)]
    opts = [psiopt.create_optimizer([{"params": ws, "grouping": grouping}], "adamg-star") for ws in runs]
    step = torch.compile(opts[1].step)
    dynamo.reset()
    compiled_calls = []
    try:
        for gs in grads:
            for ws, fn in zip(runs, (opts[0].step, step)):
                for w, g in zip(ws, gs):
                    w.grad = g.clone()
                calls.clear()
                fn()
            compiled_calls.append(len(calls))
    finally:
        dynamo.reset()
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert compiled_calls[0] == 0 and compiled_calls[-1] > 0  # vectorized, then the kernels


def test_compiled_psgd_without_momentum_takes_the_kernels(kernel_calls):
    """PSGD without momentum keeps no state: its compiled steps call the kernels from the first
    (a step that makes state does not)."""
    calls = kernel_calls
    w = nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    opt = psiopt.ProjectedSGD([{"params": [w], "grouping": "channel"}], lr=0.1)
    step = torch.compile(opt.step)
    dynamo.reset()
    try:
        w.grad = torch.ones_like(w)
        step()
    finally:
        dynamo.reset()
    assert calls == ["psgd"]


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_compiled_layout_sums_agree_with_eager(dtype):
    """``RowLayout.sums`` compiled (its own branch: the reductions as they are) gives what the
    eager one does for every pair and ``dtype``: inner products of two lists, squared norms of
    one list in another dtype (the compiled branch once took any pair for a squared norm when a
    dtype was given); a dtype with an inner product is refused alike."""
    from psiopt.optim.geometry import RowLayout

    torch.manual_seed(0)
    xs, ys = [torch.randn(3, 5), torch.randn(2, 4, 2)], [torch.randn(3, 5), torch.randn(2, 4, 2)]
    layout = RowLayout(xs)
    square = dtype not in (None, torch.float32)
    pairs = (lambda a, b: [(a, a)]) if square else (lambda a, b: [(a, a), (a, b), (b, b)])

    def sums(a, b):
        out = layout.sums(pairs(a, b), dtype=dtype)
        return torch.stack(list(out))

    eager = sums(xs, ys)
    dynamo.reset()
    compiled = torch.compile(sums, backend="eager", fullgraph=True)(xs, ys)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert eager.dtype == (dtype or torch.float32)
    want = [torch.cat([(a * b).flatten(1).sum(1) for a, b in zip(p, q)]) for p, q in pairs(xs, ys)]
    torch.testing.assert_close(eager.double(), torch.stack(want).double(), rtol=1e-5, atol=1e-6)
    if square:
        with pytest.raises(ValueError, match="squared norms only"):
            layout.sums([(xs, ys)], dtype=dtype)
