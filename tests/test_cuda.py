"""On a machine with a GPU: every optimizer steps on CUDA without a host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``).  Skipped here (no GPU); the meta-device detector of
``tests/test_optimizer_matrix.py`` checks the same property on any machine."""

import pytest
import torch
import torch.nn.functional as F

import psiopt
from test_compile import net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_step_on_cuda_has_no_host_synchronisation(name):
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    opt = psiopt.create_optimizer(model, name, x)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        step_without_sync(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def step_without_sync(opt):
    """One eager step with CUDA's synchronisation detector raising on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_steps_keep_step_counters_on_the_cpu():
    """dynamo moves every ``state["step"]`` to its parameter's device before it runs
    ``_init_group`` (``move_step_if_cpu``, for torch.optim's capturable steps); psiopt moves its
    counters back while tracing, so that a parameter whose first gradient comes after a compiled
    step (a counter made on the CPU) joins the others, and an eager step after compiled ones
    reads its counters without a host synchronisation."""
    w1, w2 = (torch.nn.Parameter(torch.randn(4, 3, device="cuda")) for _ in range(2))
    opt = psiopt.AdamS([{"params": [w1, w2], "grouping": "channel"}])
    step = torch.compile(opt.step)
    w1.grad = torch.randn_like(w1)
    step()
    step()
    w2.grad = torch.randn_like(w2)
    step()
    step()
    assert all(st["step"].is_cpu for st in opt.state.values())
    step_without_sync(opt)
    assert all(torch.isfinite(w).all() for w in (w1, w2))


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


@pytest.mark.parametrize("name", ["adams", "psi-sgdm", "adamg"])
def test_a_loaded_state_keeps_step_counters_on_the_cpu_and_steps_without_sync(name):
    """torch's ``load_state_dict`` moves ``state["step"]`` to the parameter's device for a group
    that sets ``fused`` (psiopt's groups carry it): psiopt moves its counters back."""
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    opt = psiopt.create_optimizer(model, name, x, fused=True)  # (the Triton kernels)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    again = psiopt.create_optimizer(model, name, x, fused=True)
    again.load_state_dict(opt.state_dict())
    assert all(st["step"].is_cpu for st in again.state.values() if "step" in st)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    step_without_sync(again)
