"""The harness on a device (``--device``, ``--amp``): refused in one line, before anything is
written, when it cannot be honoured; on the CPU exactly what it was before the option existed;
recorded in every run directory.  The CUDA tests at the end are skipped on a machine without a GPU
(as in ``tests/test_cuda.py``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import refused
from psiopt.experiments import train as train_module
from psiopt.experiments.cli import main
from psiopt.experiments.data import augment_batch, batches, hold_on, load_dataset
from psiopt.experiments.train import (
    RunConfig,
    RunError,
    _checkpoint,
    build,
    read_checkpoint,
    read_metrics,
    run_identity,
    train,
)

QUICK = ["--dataset", "synthetic", "--subset", "128", "--epochs", "1", "--no-progress"]
TIMINGS = ("seconds", "samples_per_s")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")


def timeless(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def quiet(*_):
    pass


# -- refused before anything runs ------------------------------------------------------------------
@no_cuda
@pytest.mark.parametrize("argv", [
    ["train", *QUICK, "--device", "cuda"],
    ["train", *QUICK, "--device", "cuda:1"],
    ["train", *QUICK, "--device", "cuda", "--nproc", "2"],
    ["compare", *QUICK, "--optimizers", "sgd,psi-sgdm", "--device", "cuda"],
    ["compare", "--recipe", "yi-fig1", "--device", "cuda"],  # a recipe (lr selection too)
    ["compare", "--recipe", "badrinarayanan-table2", "--device", "cuda:0"],
], ids=["train", "train-index", "nproc", "compare", "recipe", "recipe-selection"])
def test_an_absent_device_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, argv):
    out = tmp_path / "out"
    refused(capsys, [*argv, "--out", str(out)], "device 'cuda", "is not available",
            "--device cpu")
    assert not out.exists()


@pytest.mark.parametrize("flags, words", [
    (["--device", "mps"], ["invalid device 'mps'", "cpu, cuda or cuda:N"]),
    (["--device", "gpu"], ["invalid device 'gpu'"]),
    (["--device", "cuda:x"], ["invalid device 'cuda:x'"]),
    (["--device", "cpu:0"], ["invalid device 'cpu:0'"]),
    (["--amp", "fp16"], ["invalid amp 'fp16'", "none, or bf16"]),
    (["--amp", "bfloat16"], ["invalid amp 'bfloat16'"]),
])
def test_an_invalid_device_or_amp_is_refused(tmp_path, capsys, flags, words):
    for command in (["train"], ["compare", "--optimizers", "sgd"]):
        refused(capsys, [*command, *QUICK, *flags, "--out", str(tmp_path / "out")], *words)
        assert not (tmp_path / "out").exists()


def test_a_study_recipe_refuses_device_and_amp(tmp_path, capsys):
    for flags in (["--device", "cuda"], ["--amp", "bf16"]):
        refused(capsys, ["compare", "--recipe", "roburin-thm4", *flags, "--out",
                         str(tmp_path / "s")], "study", "leave out --device and --amp")
    assert not (tmp_path / "s").exists()


def test_validate_refuses_what_cannot_be_honoured():
    with pytest.raises(RunError, match="invalid amp"):
        RunConfig(amp="fp16").validate()
    with pytest.raises(RunError, match="invalid device"):
        RunConfig(device="cuda:-1").validate()
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="not available"):
            RunConfig(device="cuda").validate()
    else:
        with pytest.raises(RunError, match="not available"):
            RunConfig(device=f"cuda:{torch.cuda.device_count()}").validate()
        with pytest.raises(RunError, match="rank r uses cuda:r"):
            RunConfig(device="cuda:0", nproc=2, batch_size=128).validate()


# -- on the CPU nothing changes -------------------------------------------------------------------
def _batches_before_the_device_option(x, y, batch_size, generator, pad=4, min_size=1):
    """``data.batches`` with augmentation as written before ``--device`` (commit ff633f9): the
    CPU random stream a CPU run must keep."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < min_size:
            return
        xb = x[idx]
        n, c, h, w = xb.shape
        padded = F.pad(xb, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        rows = (dy + torch.arange(h))[:, None, :, None]
        cols = (dx + torch.arange(w))[:, None, None, :]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows, cols]
        mask = torch.rand(n, generator=generator) < 0.5
        yield torch.where(mask[:, None, None, None], out.flip(3), out), y[idx]


def test_cpu_batches_and_augmentation_draw_what_they_drew_before():
    x, y = torch.randn(70, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(70)
    for seed in range(3):
        new = list(batches(x, y, 32, torch.Generator().manual_seed(seed), augment=True,
                           min_size=2))
        old = list(_batches_before_the_device_option(x, y, 32, torch.Generator().manual_seed(seed),
                                                     min_size=2))
        assert len(new) == len(old) == 3  # 32 + 32 + 6
        for (a, ya), (b, yb) in zip(new, old):
            assert torch.equal(a, b) and torch.equal(ya, yb)


def test_device_cpu_is_the_default_run_bit_for_bit(tmp_path):
    argv = ["train", *QUICK, "--epochs", "2", "--optimizer", "psi-sgdm", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    assert main([*argv, "--device", "cpu", "--amp", "none", "--out", str(tmp_path / "cpu")]) == 0
    default, cpu = (read_metrics(tmp_path / d) for d in ("default", "cpu"))
    assert timeless(default) == timeless(cpu) and len(cpu) == 2
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("default", "cpu"))
    assert (a["device"], a["amp"]) == (b["device"], b["amp"]) == ("cpu", "none")
    for record in (a, b):
        assert record["environment"]["device"] == "cpu" and record["data_device"] == "cpu"
        assert "gpu" not in record["environment"]


def test_records_name_the_device_and_the_summary_says_it(tmp_path):
    assert main(["compare", *QUICK, "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "sgd" / "seed0" / "config.json").read_text())
    assert config["device"] == "cpu" and config["environment"]["device"] == "cpu"
    assert "thread(s) on cpu" in (tmp_path / "summary.md").read_text()


# -- bf16 autocast ---------------------------------------------------------------------------------
def test_amp_bf16_on_the_cpu_autocasts_the_forward_and_keeps_float32_parameters(tmp_path,
                                                                                monkeypatch):
    dtypes = []
    real = train_module._loss
    monkeypatch.setattr(train_module, "_loss",
                        lambda out, y, regression: dtypes.append(out.dtype) or real(out, y, regression))
    config = RunConfig(dataset="synthetic", model="mlp-bn", optimizer="adamsrt", epochs=1,
                       subset=128, batch_size=32)
    plain = train(config, tmp_path / "none", log=quiet)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    mixed = train(dataclasses.replace(config, amp="bf16"), tmp_path / "bf16", log=quiet)
    assert set(dtypes) == {torch.bfloat16}  # training and evaluation forward passes
    assert timeless(plain) != timeless(mixed)  # the autocast did something
    assert all(m["train_loss"] is not None for m in mixed)
    recorded = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert recorded["amp"] == "bf16" and recorded["device"] == "cpu"
    state = read_checkpoint(tmp_path / "bf16" / "checkpoint.pt", dataclasses.replace(config,
                                                                                     amp="bf16"))
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values()
               for k, v in s.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and k != "step")


def test_amp_bf16_through_the_cli_is_recorded_and_summarised(tmp_path):
    assert main(["compare", *QUICK, "--optimizers", "psi-sgdm", "--amp", "bf16",
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "psi-sgdm" / "seed0" / "config.json").read_text())["amp"] == "bf16"
    assert "on cpu, bfloat16 autocast" in (tmp_path / "summary.md").read_text()


# -- bound to the checkpoint -----------------------------------------------------------------------
def test_resuming_with_another_amp_is_refused_and_touches_nothing(tmp_path, capsys):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refused(capsys, [*argv, "--epochs", "2", "--resume", "--amp", "bf16"],
            "amp ('none' → 'bf16')")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_device_type_is_bound_to_the_checkpoint_and_the_gpu_index_is_not(tmp_path):
    assert run_identity({"device": "cuda:0"}) == run_identity({"device": "cuda:1"}) \
        == run_identity({"device": "cuda"})
    assert run_identity({"device": "cuda:0"}) != run_identity({"device": "cpu"})
    assert run_identity({}) == run_identity({"device": "cpu", "amp": "none"})  # older records
    config = RunConfig(subset=128)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state(),
             "epoch": 1}
    torch.save(_checkpoint(state, dataclasses.replace(config, device="cuda:0")),
               tmp_path / "gpu.pt")
    with pytest.raises(RunError, match=r"device \('cuda' → 'cpu'\)"):
        read_checkpoint(tmp_path / "gpu.pt", config)
    read_checkpoint(tmp_path / "gpu.pt", dataclasses.replace(config, device="cuda:1"))


def test_a_checkpoint_written_before_device_and_amp_existed_is_read(tmp_path):
    config = RunConfig(subset=128)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state(),
             "epoch": 1}
    ckpt = _checkpoint(state, config)
    del ckpt["settings"]["device"], ckpt["settings"]["amp"]
    ckpt["sha256"] = train_module._digest(ckpt["state"].numpy().tobytes(), 1, ckpt["settings"])
    torch.save(ckpt, tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt", config)["epoch"] == 1
    with pytest.raises(RunError, match="amp"):
        read_checkpoint(tmp_path / "old.pt", dataclasses.replace(config, amp="bf16"))


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------
@cuda
def test_a_run_on_cuda_keeps_everything_there_and_records_the_gpu(tmp_path):
    config = RunConfig(dataset="synthetic", model="mlp-bn", optimizer="psi-sgdm", epochs=2,
                       subset=256, batch_size=64, device="cuda")
    data, model, optimizer, _ = build(config)
    assert data.device.type == "cuda" and all(p.is_cuda for p in model.parameters())
    metrics = train(config, tmp_path, log=quiet)
    assert len(metrics) == 2 and all(m["test_acc"] is not None for m in metrics)
    recorded = json.loads((tmp_path / "config.json").read_text())
    index = torch.cuda.current_device()
    assert recorded["environment"]["device"] == f"cuda:{index}"
    assert recorded["environment"]["gpu"] == torch.cuda.get_device_name(index)
    assert recorded["data_device"] == f"cuda:{index}"


@cuda
@pytest.mark.parametrize("settings", [
    dict(model="resnet20", optimizer="psi-sgdm", init="unbalanced"),
    dict(model="mlp-bn", optimizer="sgdg", exact_norms=True),
    dict(model="arora-vgg", optimizer="psgd", init="glorot", grouping="tensor"),
], ids=["resnet20-unbalanced", "mlp-exact-norms", "vgg-glorot-tensor"])
def test_cuda_starts_from_the_cpu_model_with_the_same_groups(settings):
    """The model is prepared on the CPU and moved: the same weights, buffers and discovered
    groups on CUDA (discovery traced there, through cuDNN's BatchNorm) as on the CPU."""
    config = RunConfig(dataset="synthetic", subset=64, **settings)
    _, cpu_model, cpu_opt, _ = build(config)
    _, gpu_model, gpu_opt, _ = build(dataclasses.replace(config, device="cuda"))
    for (name, a), (_, b) in zip(cpu_model.state_dict().items(), gpu_model.state_dict().items()):
        assert b.is_cuda and torch.equal(a, b.cpu()), name
    groups = [[(g.get("grouping"), g.get("param_names")) for g in o.param_groups]
              for o in (cpu_opt, gpu_opt)]
    assert groups[0] == groups[1] and any(g for g, _ in groups[0] if g not in (None, "cancelled"))


@cuda
def test_a_cuda_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    config = RunConfig(dataset="synthetic", model="mlp-bn", optimizer="adamsrt", epochs=3,
                       subset=256, batch_size=64, milestones=[2], device="cuda")
    whole = train(config, tmp_path / "whole", log=quiet)
    train(dataclasses.replace(config, epochs=1), tmp_path / "split", log=quiet)
    resumed = train(config, tmp_path / "split", resume=True, log=quiet)
    strip = [{k: v for k, v in m.items() if not k.endswith("_bn_recomputed")}
             for m in timeless(whole)]
    assert strip == [{k: v for k, v in m.items() if not k.endswith("_bn_recomputed")}
                     for m in timeless(resumed)]


@cuda
def test_amp_bf16_on_cuda_runs_with_float32_parameters(tmp_path):
    config = RunConfig(dataset="synthetic", model="resnet20", optimizer="sgdg", epochs=1,
                       subset=128, batch_size=32, device="cuda", amp="bf16")
    metrics = train(config, tmp_path, log=quiet)
    assert metrics[0]["train_loss"] is not None
    state = read_checkpoint(tmp_path / "checkpoint.pt", config)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


@cuda
def test_batches_of_a_dataset_held_on_cuda_copy_nothing_from_the_host():
    data = hold_on(load_dataset("synthetic"), "cuda")
    assert data.device.type == "cuda"
    x = data.train_x.repeat(1, 3, 2, 2)  # 3×32×32, augmented as CIFAR is
    gen = torch.Generator(x.device).manual_seed(0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for xb, yb in batches(x, data.train_y, 128, gen, augment=True, min_size=2):
            assert xb.is_cuda and yb.is_cuda
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "HtoD" in e.name or "Memcpy HtoD" in e.name]
    assert not copies, copies
    again = augment_batch(x[:8], torch.Generator(x.device).manual_seed(0), pad=2)
    assert again.is_cuda and again.shape == x[:8].shape


@cuda
def test_a_dataset_that_does_not_fit_stays_on_the_host_and_is_recorded(tmp_path, monkeypatch):
    from psiopt.experiments import data as data_module

    monkeypatch.setattr(data_module, "DEVICE_DATA_FRACTION", 0.0)
    said = []
    config = RunConfig(subset=128, device="cuda")
    metrics = train(config, tmp_path, log=said.append)
    assert metrics[0]["train_loss"] is not None and any("stays on the host" in s for s in said)
    assert json.loads((tmp_path / "config.json").read_text())["data_device"] == "cpu"


@cuda
def test_more_processes_than_gpus_is_refused(tmp_path, capsys):
    n = torch.cuda.device_count() + 1
    refused(capsys, ["train", *QUICK, "--device", "cuda", "--nproc", str(n), "--batch-size",
                     str(32 * n), "--out", str(tmp_path / "r")], "one GPU per process")
    refused(capsys, ["train", *QUICK, "--device", f"cuda:{n}", "--out", str(tmp_path / "r")],
            "not available")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_processes_on_two_gpus_over_nccl(tmp_path):
    flags = ["train", *QUICK, "--epochs", "2", "--batch-size", "64", "--device", "cuda"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    assert main([*flags, "--nproc", "2", "--sync-bn", "--out", str(tmp_path / "two")]) == 0
    recorded = json.loads((tmp_path / "two" / "config.json").read_text())
    assert [r["device"] for r in recorded["environment"]["ranks"]] == ["cuda:0", "cuda:1"]
    one, two = (read_metrics(tmp_path / d) for d in ("one", "two"))
    for a, b in zip(one, two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_where_the_data_is_held_is_decided_for_every_rank_together():
    """``hold_on`` takes the decision it is given (``fits``: in a multi-process run, every
    rank's, one collective in ``build``): ranks whose data lived on different devices would
    draw other batches (each device's generator).  Here the meta device stands for a GPU."""
    from psiopt.experiments import data as data_module

    data = load_dataset("synthetic", None, 64, seed=0)
    assert hold_on(data, "meta", fits=True).device.type == "meta"
    assert hold_on(data, "meta", fits=False) is data
    assert data_module.fits_on(data, "meta")  # (only a CUDA device's free memory is asked)
    assert train_module._fits_everywhere(data, torch.device("cpu"))  # one process: its own


def test_a_resumed_run_holds_its_data_where_its_first_session_did(tmp_path, monkeypatch):
    """Continued from a checkpoint, the data is held where ``config.json`` says the first
    session held it (another device draws other batches), not where it would fit now; a new
    run asks :func:`_fits_everywhere`.  Here ``hold_on`` is watched: on the CPU it moves
    nothing, and the GPU's free memory is played by ``_fits_everywhere``."""
    asked = []

    def watched(data, device, fits=None):
        asked.append(fits)
        return data

    monkeypatch.setattr(train_module, "hold_on", watched)
    monkeypatch.setattr(train_module, "_fits_everywhere", lambda data, device: True)
    config = RunConfig(dataset="synthetic", subset=128, epochs=1)
    train(config, tmp_path, log=lambda *_: None)
    assert asked == [True]  # a new run: as it fits now
    assert json.loads((tmp_path / "config.json").read_text())["data_device"] == "cpu"
    train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, log=lambda *_: None)
    assert asked == [True, False]  # resumed: on the host, as the record says
    record = json.loads((tmp_path / "config.json").read_text())
    record["data_device"] = "cuda:1"  # as if the first session had held it on a GPU
    (tmp_path / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(train_module, "_fits_everywhere", lambda data, device: False)
    train(dataclasses.replace(config, epochs=3), tmp_path, resume=True, log=lambda *_: None)
    assert asked[-1] is True


def test_a_resumed_run_whose_data_no_longer_fits_where_it_was_held_is_refused(tmp_path,
                                                                             monkeypatch):
    """Held where the record says and out of memory there: a ``RunError`` naming the way out,
    not the allocator's error (nor a silent move to the host: other batches)."""
    def full(data, device, fits=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    config = RunConfig(dataset="synthetic", subset=128, epochs=1)
    train(config, tmp_path, log=lambda *_: None)
    record = json.loads((tmp_path / "config.json").read_text())
    record["data_device"] = "cuda:0"  # as if the first session had held it on a GPU
    (tmp_path / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(train_module, "hold_on", full)
    with pytest.raises(RunError, match="where the session that started the run held it"):
        train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, log=lambda *_: None)
