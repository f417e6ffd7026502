"""The benchmark's own machinery (no timing assertions: speed is reported, not tested)."""

import pytest
import torch

import psiopt
from psiopt.experiments import bench
from psiopt.experiments.models import MLP
from psiopt.optim.geometry import dot, rows


def test_parameter_set_gradients_are_tangent(monkeypatch):
    monkeypatch.setitem(bench.SETS, "tiny", lambda: (MLP(8, 3, widths=(6,)), torch.randn(4, 8)))
    model, mapping = bench.parameter_set("tiny")
    assert mapping == {"net.1.weight": "channel"}
    w = model.net[1].weight
    assert dot(rows(w, "channel"), rows(w.grad, "channel")).abs().max() < 1e-5


def test_bench_rows_and_table(monkeypatch):
    """Step times replaced by known ones (psiopt 3 ms, torch's fused and foreach steps 2 ms,
    alternating with 6 ms / 4 ms rounds): the row must report those medians and their paired
    ratios, 1.5, against both forms of torch's step; launches are counted, as integers, and
    memory passes estimated."""
    monkeypatch.setitem(bench.SETS, "tiny", lambda: (MLP(8, 3, widths=(6,)), torch.randn(4, 8)))
    def fake_time(step):
        step()
        opt = step.__self__  # its own count (an id() could be reused by a later optimizer)
        opt.fake_calls = getattr(opt, "fake_calls", 0) + 1
        slow = 2.0 if opt.fake_calls % 2 else 1.0  # the machine's speed changes between rounds
        return slow * (3e-3 if isinstance(opt, psiopt.ScaleInvariantOptimizer) else 2e-3)

    monkeypatch.setattr(bench, "_time", fake_time)
    out = bench.bench_optimizers("tiny", steps=4, names=["psi-sgdm", "adamsrt", "sgdg ω=0"])
    assert [r["optimizer"] for r in out] == ["psi-sgdm", "adamsrt", "sgdg ω=0"]
    for r in out:
        assert r["ratio"] == pytest.approx(1.5) and r["ms"] == pytest.approx(4.5)
        assert r["ratio_foreach"] == pytest.approx(1.5)
        assert r["torch_ms"] == pytest.approx(3.0) and r["foreach_ms"] == pytest.approx(3.0)
        for prefix in ("", "torch_", "foreach_"):
            assert type(r[prefix + "launches"]) is int and r[prefix + "launches"] >= 1
            assert type(r[prefix + "ops"]) is int and r[prefix + "passes"] > 0
    assert out[0]["torch_launches"] == 1 and out[0]["torch_passes"] == pytest.approx(5.0)
    assert out[1]["state_mb"] < out[1]["torch_state_mb"]  # Adam-SRT: no full second moment
    table = bench.format_table(out)
    assert table.count("\n") == 4 and "| tiny | psi-sgdm |" in table
    head = table.splitlines()[0]
    for column in ("fused ms", "ratio to fused", "foreach ms", "ratio to foreach",
                   "launches (fused, foreach)", "passes (fused, foreach)"):
        assert f"| {column} |" in head
    assert all(line.count("|") == head.count("|") for line in table.splitlines())


def _model_with_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("family, impl, launches, passes", [
    ("sgd", "fused", 1, 5.0),  # one _fused_sgd_: reads w, g, buffer; writes w, buffer
    ("sgd", "foreach", 3, 8.0),  # mul_/add_ on the buffers, add_ on the weights
    ("adam", "fused", 2, 7.0),  # the step counters' add_, one _fused_adam_
])
def test_launches_and_passes_of_torch_steps(family, impl, launches, passes):
    opt = bench._counterpart(family, _model_with_grads(), {}, impl)
    opt.step()  # the state exists: the steady state is counted
    counts = bench.count_step(opt)
    assert counts["launches"] == counts["ops"] == launches
    assert counts["passes"] == pytest.approx(passes, abs=0.05)  # Adam's counters: a few bytes


def test_psiopt_kernel_calls_are_counted_with_their_traffic():
    """psiopt's CPU kernels are called through ctypes, not dispatched: the counter sees them."""
    from psiopt.optim import kernels

    if not kernels.available():
        pytest.skip("psiopt's C kernels are not built here (no compiler): nothing to count")
    model = _model_with_grads()
    opt = bench._create(model, "psi-sgd", {"0.weight": "channel"})
    opt.step()
    counter = bench._StepCounter()
    with counter, bench._counting_kernels(counter):
        opt.step()
    assert counter.kernel_calls == 1  # one call for the invariant group
    counts = bench.count_step(opt)
    assert counts["launches"] == counts["ops"] >= 2 and counts["passes"] >= 3


def test_device_events_are_counted_by_their_device():
    """GPU events count, but for the ranges of record_function the profiler also marks as GPU
    events (``is_user_annotation``: torch.optim's ``Optimizer.step#SGD.step``)."""
    from torch.autograd import DeviceType

    class Event:
        def __init__(self, device_type, annotation=False):
            self.device_type, self.is_user_annotation = device_type, annotation

    events = [Event(DeviceType.CPU), Event(DeviceType.CUDA), Event(DeviceType.CUDA),
              Event(DeviceType.CUDA, annotation=True)]
    assert bench.count_device_events(events) == 2


def test_triton_steps_are_counted_as_kernel_calls(monkeypatch):
    """The Triton step (``triton_rows._launch``, on CUDA) is not dispatched either: counted with
    its traffic, as the C kernels' calls."""
    from psiopt.optim import triton_rows

    seen = []
    monkeypatch.setattr(triton_rows, "_launch", lambda *args: seen.append(args[0]))
    w, g, b = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    counter = bench._StepCounter()
    with counter, bench._counting_kernels(counter):
        triton_rows._launch("psi", [w], [g], [b], [], [], None, None, False)
    assert seen == ["psi"] and counter.kernel_calls == 1 and counter.bytes == 5 * w.nbytes
    assert triton_rows._launch.__name__ == "<lambda>"  # put back


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    """``--device cuda``: torch.cuda.set_device takes no device without an index (a ValueError
    in torch 2.13): the bench sets the current one."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def set_device(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError("Expected a torch.device with a specified index")
        chosen.append(device)
        raise KeyboardInterrupt  # (stop here: there is no GPU to bench)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(bench, "DEVICE", bench.DEVICE)
    with pytest.raises(KeyboardInterrupt):
        bench.run(out=None, device="cuda")
    assert chosen == [torch.device("cuda", 0)]


def test_machine_line_names_threads_commit_and_load():
    line = bench.machine()
    assert f"{torch.get_num_threads()} torch thread(s)" in line and "commit " in line
    assert bench._load().startswith("load average")


def test_cuda_targets_are_those_of_issue_23():
    rows_ = [{"optimizer": "un-sgd", "ratio": 1.25}, {"optimizer": "sgdg ω=0", "ratio": 1.4}]
    text = bench.targets_table(rows_, [], targets=bench.CUDA_TARGETS)
    assert "| un-sgd ≤ 1.2 × torch fused | 1.25 | no |" in text
    assert "| sgdg ω=0 ≤ 1.5 × torch fused | 1.40 | yes |" in text


def test_allocation_tracker_counts_temporaries():
    w = [torch.zeros(1000) for _ in range(3)]

    class Opt:
        def step(self):
            a = torch._foreach_mul(w, 2.0)  # 3 × 4000 bytes alive at once
            del a
            torch._foreach_mul_(w, 2.0)  # in place: nothing new

    assert bench.peak_extra_bytes(Opt()) == 12000


@pytest.mark.slow
def test_compiled_rows_and_penalty_flops(monkeypatch):
    """The compiled benchmark compiles psiopt's and torch's steps and finds no graph break; the
    penalty's FLOPs are 4R²d per weight (tiny MLP: one 6×8 weight → 4·36·8)."""
    monkeypatch.setitem(bench.SETS, "tiny", lambda: (MLP(8, 3, widths=(6,)), torch.randn(4, 8)))
    (row,) = bench.bench_compiled("tiny", names=["un-sgd"], steps=2)
    assert row["graph_breaks"] == 0 and row["counterpart"] == "torch sgd"
    assert row["compiled_ms"] > 0 and row["torch_compiled_ms"] > 0
    assert "| tiny | un-sgd |" in bench.compiled_table([row])
    assert bench.penalty_gflop("tiny") == pytest.approx(4 * 36 * 8 / 1e9)


def test_targets_table_judges_compiled_rows_on_the_worst_set():
    compiled = [{"optimizer": "un-sgd", "counterpart": "torch sgd", "ratio": r, "speedup": s}
                for r, s in ((1.05, 1.5), (1.08, 1.2))]
    text = bench.targets_table([], [], compiled)
    assert ("| compiled un-sgd ≤ 1.1 × compiled torch sgd, faster than eager "
            "| 1.08, speed-up 1.20 | yes |") in text
    compiled[1]["speedup"] = 0.9  # slower than its own eager step on one set
    assert "1.08, speed-up 0.90 | no |" in bench.targets_table([], [], compiled)


def test_bench_refuses_a_device_it_cannot_use(capsys):
    from psiopt.experiments.cli import main

    assert main(["bench", "--device", "tpu"]) == 2
    assert "--device 'tpu': invalid device 'tpu': cpu, cuda or cuda:N" in capsys.readouterr().err


def test_bench_policies_times_each_policy_against_its_inner_step(monkeypatch):
    """Each policy around torch's fused AdamW, with its kernels and with fused=False: the step
    that runs is the one named (a NormPolicy of that policy, or the inner AdamW alone), and the
    table reports the medians' ratios."""
    monkeypatch.setitem(bench.SETS, "tiny", lambda: (MLP(8, 3, widths=(6,)), torch.randn(4, 8)))
    seen = []

    def fake_time(step):
        opt = step.__self__
        seen.append((type(opt).__name__, getattr(opt, "policy", None), getattr(opt, "fused", "inner")))
        step()
        return 2e-3 if type(opt).__name__ == "NormPolicy" else 1e-3

    monkeypatch.setattr(bench, "_time", fake_time)
    out = bench.bench_policies("tiny", steps=2)
    assert [r["policy"] for r in out] == [label for label, _, _ in bench.POLICY_CASES]
    assert all(r["fused_ratio"] == r["torch_ratio"] == 2.0 for r in out)
    for _, policy, _ in bench.POLICY_CASES:
        assert ("NormPolicy", policy, None) in seen and ("NormPolicy", policy, False) in seen
    assert ("AdamW", None, "inner") in seen
    assert "| tiny | equilibrium | 1.00 | 2.00 (2.00) | 2.00 (2.00) |" in bench.policies_table(out)
