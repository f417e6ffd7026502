"""On a machine with a GPU (``make gpu-check``): every optimizer steps on CUDA without a host
synchronisation (``torch.cuda.set_sync_debug_mode("error")``), with a float or a tensor ``lr``;
the Triton kernels, compiled for the GPU, agree with the reference path (float64, float32,
bfloat16); compiled steps agree with eager ones and a scheduled tensor ``lr`` compiles once;
steps are captured in CUDA graphs.  Skipped here (no GPU); the meta-device detector of
``tests/test_optimizer_matrix.py`` checks the no-synchronisation property on any machine, and
``tests/test_triton.py`` the kernels under Triton's interpreter."""

import copy

import pytest
import torch
import torch.nn.functional as F

import psiopt
from psiopt.optim.geometry import is_invariant
from test_compile import net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def deterministic_cudnn(monkeypatch):
    """Tests here compare two trainings of a conv net (eager and compiled, fused and foreach)
    to 1e-5: cuDNN's deterministic algorithms and no TF32 (on by default for convolutions: a
    10-bit mantissa, so that one ulp of difference in the weights could pass the tolerance after
    a few steps), so that only the optimizers can differ."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# The kernels' agreement first: on a GPU run past its time cap, their results come first.

@pytest.fixture
def on_triton(monkeypatch):
    """The Triton steps of CUDA tensors (the kernels compiled for the GPU, not interpreted)."""
    from psiopt.optim import triton_rows

    calls, launch = [], triton_rows._launch
    monkeypatch.setattr(triton_rows, "_launch",
                        lambda kernel, ws, *args: calls.append(kernel) or launch(kernel, ws, *args))
    return calls


#: (dtype, absolute slack of the 16/32-bit comparisons)
DTYPES = [(torch.float64, 0.0), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


@pytest.mark.parametrize("dtype, slack", DTYPES, ids=[str(d)[6:] for d, _ in DTYPES])
@pytest.mark.parametrize("case", range(14))
def test_the_triton_kernels_on_the_gpu_agree_with_the_reference_path(case, dtype, slack, on_triton,
                                                                      monkeypatch):
    """tests/test_triton.py's cases on the GPU, with rows longer than a block (``MAX_BLOCK``
    16: all four kernels run, short rows beside split ones): float64 to 1e-12 of the reference
    path on the GPU, float32 and bfloat16 within 4x the reference path's own error against
    float64 (and the slack)."""
    from psiopt.optim import triton_rows
    from test_triton import CASES, SPLIT, max_error, run

    assert len(CASES) == 14
    name, settings = CASES[case]
    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    fused = run(name, settings, "groups:2", dtype, device="cuda", fused=True)
    assert on_triton, "the Triton kernels did not run"
    reference = run(name, settings, "groups:2", dtype, device="cuda", foreach=False)
    if dtype == torch.float64:
        assert max_error(fused, reference) < 1e-12
    else:
        truth = run(name, settings, "groups:2", torch.float64, device="cuda", foreach=False)
        assert max_error(fused, truth) <= 4 * max_error(reference, truth) + slack


#: rows at the kernels' real block (``MAX_BLOCK`` 4096 entries): 3000 entries (one program of
#: sixteen warps), 5000 and 4104 (split: two chunks each), 64; lengths multiples of 8 entries, so
#: that 16-bit rows take the 16-byte body too
LONG_SHAPES = [(4, 3000), (3, 5000), (6, 64), (2, 4104)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("case", range(14))
def test_the_triton_kernels_at_their_real_block_size_agree_with_the_reference_path(case, dtype,
                                                                                  on_triton):
    """The kernels as a GPU user runs them (the test above shrinks the block to 16 entries):
    float64 to 1e-12 of the reference path, bfloat16 within 4x its own error (and 1e-2), errors
    relative to each tensor's largest entry (PSI-SGD's steps of ‖w‖² η g on rows of 5000
    entries reach entries of 1e5)."""
    from test_triton import CASES, run

    def max_error(a, b):
        (pa, oa), (pb, ob) = a, b
        pairs = [*zip(pa, pb), *((oa.state[x][k], ob.state[y][k]) for x, y in zip(pa, pb)
                                 for k, v in oa.state[x].items()
                                 if isinstance(v, torch.Tensor) and v.dim())]
        return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in pairs)

    name, settings = CASES[case]
    fused = run(name, settings, "channel", dtype, device="cuda", shapes=LONG_SHAPES, fused=True)
    assert on_triton, "the Triton kernels did not run"
    reference = run(name, settings, "channel", dtype, device="cuda", shapes=LONG_SHAPES,
                    foreach=False)
    if dtype == torch.float64:
        assert max_error(fused, reference) < 1e-12
    else:
        truth = run(name, settings, "channel", torch.float64, device="cuda", shapes=LONG_SHAPES,
                    foreach=False)
        assert max_error(fused, truth) <= 4 * max_error(reference, truth) + 1e-2


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_step_on_cuda_has_no_host_synchronisation(name, on_triton):
    """Every optimizer's default step; the rules with a fused kernel take the Triton kernels
    (not a fallback to the vectorized path)."""
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    opt = psiopt.create_optimizer(model, name, x)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        step_without_sync(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert bool(on_triton) == getattr(psiopt.REGISTRY[name].cls, "fused_rule", False), on_triton


def step_without_sync(opt):
    """One eager step with CUDA's synchronisation detector raising on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["adams", "psi-sgd"])
def test_compiled_steps_keep_step_counters_on_the_parameters_device(name):
    """dynamo moves every ``state["step"]`` to its parameter's device before it runs
    ``_init_group`` (``move_step_if_cpu``, as for torch.optim's capturable steps), and psiopt
    keeps them there (``psiopt.optim.base.counters_on_device``): a parameter whose first
    gradient comes after a compiled step gets its counter there too, and an eager step after
    compiled ones computes with the counters as tensors, without a host synchronisation
    (PSI-SGD's literal guard included)."""
    w1, w2 = (torch.nn.Parameter(torch.randn(4, 3, device="cuda")) for _ in range(2))
    kw = {"fixed_norm": False, "guard_every": 2} if name == "psi-sgd" else {}
    opt = psiopt.create_optimizer([{"params": [w1, w2], "grouping": "channel"}], name, **kw)
    step = torch.compile(opt.step, backend="aot_eager")  # (dynamo moves the counters; no inductor)
    w1.grad = torch.randn_like(w1)
    step()
    step()
    w2.grad = torch.randn_like(w2)
    step()
    step()
    assert all(st["step"].is_cuda for st in opt.state.values())
    step_without_sync(opt)
    assert all(torch.isfinite(w).all() for w in (w1, w2))


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_eager_step_with_a_cuda_tensor_lr_has_no_host_synchronisation(name):
    """A tensor lr on the parameters' device: never read on the host (counters on the device,
    torch's capturable Adam for the other parameters, the kernels' ``h`` on the device)."""
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    lr = psiopt.REGISTRY[name].invariant.get("lr", 0.1)
    opt = psiopt.create_optimizer(model, name, x, lr=torch.tensor(lr, device="cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if name in ("sgd", "adam", "adamw", "b-sgd"):
            opt.step()  # torch.optim's own steps (eager, a tensor lr: torch reads it)
        else:
            step_without_sync(opt)
        sched.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_compiled_step_with_a_scheduled_cuda_lr_compiles_once(name):
    from torch._dynamo.testing import CompileCounter

    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    lr = psiopt.REGISTRY[name].invariant.get("lr", 0.1)
    opt = psiopt.create_optimizer(model, name, x, lr=torch.tensor(lr, device="cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=counter)
    frames = []
    try:
        for _ in range(5):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step()
            frames.append(counter.frame_count)
            sched.step()
    finally:
        torch._dynamo.reset()
    assert frames[1:] == [frames[1]] * 4, frames


@pytest.mark.parametrize("fused", [False, True], ids=["vectorized", "triton"])
@pytest.mark.parametrize("name", ["psi-sgdm", "adams", "un-sgd"])
def test_a_step_with_a_cuda_tensor_lr_is_captured_in_a_cuda_graph(name, fused, on_triton):
    """Nothing of such a step is read on the host, so it can be captured (after a warm-up step
    that makes the state) and replayed: the replays equal eager steps, and a scheduler's new lr
    (written in place) reaches the replays.  Both paths: the vectorized one, and the Triton
    kernels (whose hyperparameters' Python numbers and tables were copied to the device at the
    warm-up steps: ``rowrules.on_device``; the capture copies nothing from the host)."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(8, 6, device="cuda")) for _ in range(2)]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    grads = [torch.randn(8, 6, device="cuda") for _ in ws]
    opts = [psiopt.create_optimizer([{"params": ps, "grouping": "channel",
                                      "norm_stats": [[], []]}], name, fused=f,
                                    lr=torch.tensor(0.05, device="cuda"))
            for ps, f in ((ws, fused), (ref, False))]
    for ps in (ws, ref):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opts[0].step()  # warm-up: state made (un-sgd's first step reads scaled gradients)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        opts[1].step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for i in range(3):
        if i == 2:
            for opt in opts:
                opt.param_groups[0]["lr"].fill_(0.01)
        graph.replay()
        opts[1].step()
    torch.cuda.synchronize()
    assert bool(on_triton) == fused, on_triton  # (the eager steps beside the replays: fused=False)
    for a, b in zip(ref, ws):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_capturing_a_step_without_a_warm_up_is_refused_in_one_line(monkeypatch):
    """A Triton step whose hyperparameters and tables were not copied to the device before (here:
    the copies dropped after an eager step that made the state) cannot be captured (the copy
    would be captured reading host memory): refused, saying to warm up first.  (The copies
    earlier captures read are set aside too: kept for good, they would answer this one's.)"""
    from psiopt.optim import rowrules

    w = torch.nn.Parameter(torch.randn(8, 6, device="cuda"))
    w.grad = torch.randn_like(w)
    opt = psiopt.create_optimizer([{"params": [w], "grouping": "channel", "norm_stats": [[]]}],
                                  "psi-sgdm", fused=True, lr=torch.tensor(0.05, device="cuda"))
    opt.step()
    torch.cuda.synchronize()
    monkeypatch.setattr(rowrules, "_KEPT", {})
    monkeypatch.setattr(rowrules, "_CAPTURED", {})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm up"), torch.cuda.graph(graph):
        opt.step()


@pytest.mark.parametrize("name, backend", [(n, "aot_eager") for n in psiopt.list_optimizers()]
                         + [("psi-sgdm", "inductor"), ("adams", "inductor")])
def test_a_compiled_step_on_cuda_agrees_with_the_eager_one(name, backend):
    """tests/test_compile.py's check on the GPU: four compiled steps (the Triton kernels through
    their op) equal four eager ones; inductor for two rules only (its compilation is slow)."""
    from test_compile import backward

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=gen).cuda()
    y = torch.randint(0, 3, (8,), generator=gen).cuda()
    eager, compiled = net().cuda(), net().cuda()
    opt_e = psiopt.create_optimizer(eager, name, x)
    opt_c = psiopt.create_optimizer(compiled, name, x)
    step = torch.compile(opt_c.step, backend=backend)
    torch._dynamo.reset()
    try:
        for _ in range(4):
            for model, fn in ((eager, opt_e.step), (compiled, step)):
                backward(model, x, y)
                fn()
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, op", [("psi-sgdm", "_fused_sgd_"), ("adams", "_fused_adam_")])
def test_the_other_parameters_take_torchs_fused_cuda_step(name, op, monkeypatch):
    """The non-invariant parameters take torch's fused CUDA SGD/Adam by default (its counters
    on the device), and step as with ``foreach=True`` to rounding, without a host
    synchronisation."""
    calls, real = [], getattr(torch, op)
    monkeypatch.setattr(torch, op, lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    models = []
    for kw in ({}, {"foreach": True}):
        calls.clear()
        model = net().cuda()
        opt = psiopt.create_optimizer(model, name, x, **kw)
        for _ in range(3):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step_without_sync(opt)
        assert bool(calls) == (not kw), kw
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bench_times_with_cuda_events_and_counts_kernels(monkeypatch):
    """``psiopt bench --device cuda``'s machinery on a small model: CUDA-event timings, kernel
    launches from the profiler (integers, at least one per step), memory passes estimated."""
    from psiopt.experiments import bench
    from psiopt.experiments.models import MLP

    monkeypatch.setattr(bench, "DEVICE", torch.device("cuda"))
    monkeypatch.setitem(bench.SETS, "tiny", lambda: (MLP(8, 3, widths=(6,)), torch.randn(4, 8)))
    assert bench._time(lambda: torch.ones(1000, device="cuda").sum()) > 0
    (row,) = bench.bench_optimizers("tiny", steps=2, names=["psi-sgdm"])
    assert row["ms"] > 0 and row["torch_ms"] > 0 and row["foreach_ms"] > 0
    assert row["ratio"] > 0 and row["ratio_foreach"] > 0
    for prefix in ("", "torch_", "foreach_"):
        assert type(row[prefix + "launches"]) is int and row[prefix + "launches"] >= 1
    assert row["torch_passes"] == pytest.approx(5.0)  # _fused_sgd_: w, g, buffer in; w, buffer out
    assert "GPU " in bench.machine()


@pytest.mark.parametrize("name, settings", [("adams", {}), ("psi-sgdm", {"fixed_norm": False}),
                                            ("adamg", {})])
def test_a_loaded_state_keeps_step_counters_on_the_cpu_and_steps_without_sync(name, settings):
    """torch's ``load_state_dict`` moves ``state["step"]`` to the parameter's device for a group
    that sets ``fused`` (psiopt's groups carry it): psiopt moves its rules' counters back (a
    float lr: eager steps read CPU counters as numbers), and leaves those of torch's Adam on
    the other parameters there (torch's fused CUDA Adam reads them on the device).  (PSI-SGDM
    counts steps in its literal mode only: with its default fixed norm it keeps no counter.)"""
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    opt = psiopt.create_optimizer(model, name, x, fused=True, **settings)  # (the Triton kernels)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    again = psiopt.create_optimizer(model, name, x, fused=True, **settings)
    again.load_state_dict(opt.state_dict())
    for group in again.param_groups:
        for p in group["params"]:
            if "step" in again.state[p]:
                assert again.state[p]["step"].is_cpu == is_invariant(group["grouping"]), group
    assert any("step" in st for st in again.state.values())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    step_without_sync(again)


@pytest.mark.parametrize("model_name", ["conv-ReLU-conv-BN", "QK-norm (LayerNorm), fused qkv, no bias",
                                        "RMSNorm MLP"])
@pytest.mark.parametrize("policy, project, inner", [("fixed", True, "adamw"), ("unit", False, "sgd"),
                                                    ("equilibrium", True, "adamw")])
def test_norm_policies_take_the_triton_kernels_on_cuda_and_step_as_torch(model_name, policy,
                                                                        project, inner, on_triton,
                                                                        monkeypatch):
    """The norm policies around torch's AdamW/SGD on CUDA: the Triton kernels of their rules
    ("project", "retract", "rotate") on channels, whole tensors and a part (QK-norm's fused
    qkv), rows longer than a block split (``MAX_BLOCK`` 16), no host synchronisation after the
    first step (which prepares "unit"'s rows), and the steps of ``fused=False`` (torch) to
    rounding."""
    from psiopt.experiments import zoo
    from psiopt.optim import triton_rows
    from test_triton import SPLIT

    monkeypatch.setattr(triton_rows, "MAX_BLOCK", SPLIT)
    model, x = zoo.build(model_name)
    model, x = model.float().cuda(), x.float().cuda()  # (the three take float inputs)
    results = []
    for fused in (None, False):
        on_triton.clear()
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        groups = psiopt.optimizer_groups(m, x, weight_decay=1e-2, invariant_weight_decay=0.1)
        opt = (torch.optim.AdamW(groups, lr=3e-3) if inner == "adamw"
               else torch.optim.SGD(groups, lr=0.05, momentum=0.9))
        wrapped = psiopt.NormPolicy(opt, policy, project=project, model=m, example_inputs=x,
                                    fused=fused)
        for i in range(3):
            opt.zero_grad()
            m(x).float().square().mean().backward()
            wrapped.step() if i == 0 else step_without_sync(wrapped)
        assert bool(on_triton) == (fused is None), on_triton
        assert all(p.is_cuda for p in m.parameters())
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
