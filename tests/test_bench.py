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
    """Step times replaced by known ones (psiopt 3 ms, torch 2 ms, alternating with 6 ms / 4 ms
    rounds): the row must report those medians and their paired ratio, 1.5."""
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
        assert r["torch_ms"] == pytest.approx(3.0)
    assert out[1]["state_mb"] < out[1]["torch_state_mb"]  # Adam-SRT: no full second moment
    table = bench.format_table(out)
    assert table.count("\n") == 4 and "| tiny | psi-sgdm |" in table


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
    assert "--device 'tpu': expected cpu, or cuda" in capsys.readouterr().err
