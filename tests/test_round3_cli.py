"""Issue 22, command-line half: records that mislead, and faults that gave a traceback instead of
one line ``psiopt: error: …`` with exit status 2 (docs/reliability.md rows 68 on)."""

import errno
import json
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch

import psiopt.experiments.train as harness
from psiopt.experiments.cli import main
from psiopt.experiments.data import load_dataset
from psiopt.experiments.train import read_metrics
from test_data import make_idx_dir, write_idx

QUICK = ["--dataset", "synthetic", "--subset", "128", "--epochs", "1", "--no-progress"]


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def refused(capsys, argv, *words):
    """``psiopt argv`` exits 2 with one line naming ``words``; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psiopt: error:"), err
    assert all(w in err[0] for w in words), err[0]
    return err[0]


def strip(metrics):
    """Records without timings and the figures every session adds at its last epoch."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")
             and not k.endswith("_bn_recomputed")} for m in metrics]


# -- item 8: one summary, one setting ---------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (["--dataset", "toy-regression", "--model", "toy-elu"], ["dataset ('synthetic' → 'toy-regression')"]),
    (["--epochs", "2"], ["epochs (1 → 2)"]),
    (["--model-kwarg", "eps=0.001"], ["model_kwargs", "0.001"]),
    (["--grouping", "tensor"], ["grouping (None → 'tensor')"]),
])
def test_compare_refuses_a_new_optimizer_with_other_settings(tmp_path, capsys, change, words):
    assert main(["compare", *QUICK, "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    before = snapshot(tmp_path)
    refused(capsys, ["compare", *QUICK, "--optimizers", "psi-sgd", *change, "--out", str(tmp_path)],
            str(tmp_path), "sgd/seed0", *words)
    assert snapshot(tmp_path) == before  # nothing trained, no summary rewritten


def test_compare_adds_an_optimizer_with_the_same_settings(tmp_path):
    assert main(["compare", *QUICK, "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    assert main(["compare", *QUICK, "--optimizers", "psi-sgd", "--lr", "0.05",
                 "--out", str(tmp_path)]) == 0  # another lr per optimizer is a row's own setting
    summary = (tmp_path / "summary.md").read_text()
    assert "| sgd |" in summary and "| psi-sgd |" in summary
    assert "Runs with different settings" not in summary


def test_the_report_names_each_runs_own_settings(tmp_path):
    """Runs trained into one directory with ``train`` (or before compare refused the mix): the
    header says which run had which setting."""
    assert main(["train", *QUICK, "--optimizer", "sgd", "--out", str(tmp_path / "sgd" / "seed0")]) == 0
    assert main(["train", *QUICK, "--optimizer", "psi-sgd", "--grouping", "tensor",
                 "--model-kwarg", "eps=0.001", "--out", str(tmp_path / "psi-sgd" / "seed0")]) == 0
    assert main(["report", str(tmp_path)]) == 0
    header = (tmp_path / "summary.md").read_text().split("## Results")[0]
    lines = [line for line in header.splitlines() if line.startswith("* ")]
    assert len(lines) == 2, header
    (mine,) = [line for line in lines if line.endswith(": psi-sgd seed 0")]
    assert "grouped by tensor" in mine and "eps=0.001" in mine
    (other,) = [line for line in lines if line.endswith(": sgd seed 0")]
    assert "tensor" not in other and "eps" not in other


def test_runs_of_one_optimizer_with_other_hyperparameters_are_rows_of_their_own(tmp_path):
    """Two ``train`` runs of sgd into one directory, one with ``--lr 2 --set nesterov=true``:
    the summary averaged them as two seeds of one row and listed the first's settings only;
    nesterov=True, set, was never listed.  Each is a row, named by what differs."""
    assert main(["train", *QUICK, "--optimizer", "sgd", "--lr", "0.1", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *QUICK, "--optimizer", "sgd", "--lr", "2", "--set", "nesterov=true",
                 "--out", str(tmp_path / "b")]) == 0
    assert main(["report", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| sgd")]
    assert len(rows) == 4, summary  # a results row and a settings row each
    assert sum(line.startswith("| sgd (lr=2, nesterov=True) |") for line in rows) == 2
    assert sum(line.startswith("| sgd (lr=0.1, nesterov=—) |") for line in rows) == 2
    settings = summary.split("## Settings")[1]
    assert "nesterov=True" in next(line for line in settings.splitlines() if "lr=2" in line)


# -- item 9: the samples that were used --------------------------------------------------------------
def test_a_subset_larger_than_the_set_is_recorded_as_what_ran(tmp_path):
    full = load_dataset("synthetic")
    n_train, n_test = len(full.train_x), len(full.test_x)
    assert main(["compare", "--dataset", "synthetic", "--subset", "100000", "--epochs", "1",
                 "--optimizers", "sgd", "--no-progress", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "sgd" / "seed0" / "config.json").read_text())
    assert config["samples"] == {"train": n_train, "test": n_test}
    summary = (tmp_path / "summary.md").read_text()
    assert "100000 training" not in summary
    assert f"all {n_train} training and {n_test} test samples (--subset 100000" in summary
    (record,) = read_metrics(tmp_path / "sgd" / "seed0")
    assert record["train_samples"] <= n_train


def test_a_subset_within_the_set_is_described_as_before(tmp_path):
    assert main(["compare", *QUICK, "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    assert "first 128 training and 100 test samples, constant lr" in \
        (tmp_path / "summary.md").read_text()


# -- item 10: a checkpoint is checked and bound to its run ----------------------------------------------
@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path, capsys, where):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])  # the same size, other bytes
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    line = refused(capsys, [*argv, "--epochs", "2", "--resume"], str(path))
    assert "sha256" in line or "cannot be loaded" in line
    assert snapshot(tmp_path) == before


def test_another_runs_checkpoint_of_the_same_shapes_is_refused(tmp_path, capsys):
    """The same model and data, another lr: the shapes fit, the settings do not."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main(["train", *QUICK, "--out", str(mine)]) == 0
    assert main(["train", *QUICK, "--lr", "0.05", "--out", str(other)]) == 0
    shutil.copy(other / "checkpoint.pt", mine / "checkpoint.pt")
    before = snapshot(mine)
    refused(capsys, ["train", *QUICK, "--epochs", "2", "--resume", "--out", str(mine)],
            "checkpoint.pt", "other settings", "hyper", "0.05")
    assert snapshot(mine) == before


def test_a_run_continued_from_its_own_checkpoint_is_still_exact(tmp_path):
    assert main(["train", *QUICK, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *QUICK, "--out", str(tmp_path / "split")]) == 0
    assert main(["train", *QUICK, "--epochs", "2", "--resume", "--out", str(tmp_path / "split")]) == 0
    assert strip(read_metrics(tmp_path / "split")) == strip(read_metrics(tmp_path / "whole"))


# -- item 11: a full disk inside torch.save; a run without a checkpoint -----------------------------------
def full_disk_in_torch_save(monkeypatch):
    """``torch.save`` as on a full disk: part of the file written, then the zip writer's error
    (the message torch 2.x gives, not an OSError)."""
    real = torch.save

    def save(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")
    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_in_torch_save_is_one_line_and_the_run_starts_over(tmp_path, capsys, monkeypatch):
    whole, run = tmp_path / "whole", tmp_path / "run"
    argv = ["train", *QUICK, "--epochs", "2", "--checkpoint-seconds", "0"]
    assert main([*argv, "--out", str(whole)]) == 0
    full_disk_in_torch_save(monkeypatch)
    refused(capsys, [*argv, "--out", str(run)], str(run / "checkpoint.pt"), "cannot be written",
            "PytorchStreamWriter", "disk")
    monkeypatch.undo()
    assert not (run / "checkpoint.pt").exists() and not (run / "checkpoint.pt.tmp").exists()
    assert len(read_metrics(run)) == 1  # the record the checkpoint never covered
    assert main([*argv, "--resume", "--out", str(run)]) == 0  # killed before its first checkpoint
    assert strip(read_metrics(run)) == strip(read_metrics(whole))
    assert "starts over" in capsys.readouterr().out


def test_compare_is_not_blocked_by_a_run_without_a_checkpoint(tmp_path, capsys, monkeypatch):
    argv = ["compare", *QUICK, "--optimizers", "sgd,psi-sgd"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    full_disk_in_torch_save(monkeypatch)
    refused(capsys, [*argv, "--out", str(tmp_path / "run")], "checkpoint.pt", "disk")
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    for name in ("sgd", "psi-sgd"):
        assert strip(read_metrics(tmp_path / "run" / name / "seed0")) == \
            strip(read_metrics(tmp_path / "whole" / name / "seed0"))


def test_a_checkpoint_moved_away_means_the_run_starts_over(tmp_path):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    first = read_metrics(tmp_path)
    (tmp_path / "checkpoint.pt").unlink()
    assert main([*argv, "--resume"]) == 0
    assert strip(read_metrics(tmp_path)) == strip(first)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["resumed"][0]["at_epoch"] == 0


# -- tracebacks that are now one line --------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["train", *QUICK, "--model-kwarg", "in_channels=3"], ["in_channels", "set by the dataset",
                                                           "--model-kwarg"]),
    (["train", *QUICK, "--model-kwarg", "num_classes=5"], ["num_classes", "--model-kwarg"]),
    (["compare", *QUICK, "--optimizers", "sgd", "--model-kwarg", "eps=1,2"],
     ["model mlp-bn with options {'eps': (1, 2)}", "--model-kwarg"]),
    (["train", *QUICK, "--seed", "99999999999999999999999"], ["invalid seed", "99999999999999999999999"]),
    (["train", *QUICK, "--seed", "-1"], ["invalid seed: -1"]),
    (["train", "--dataset", "toy-regression", "--model", "resnet20", "--epochs", "1", "--no-progress"],
     ["resnet20", "toy-regression", "choose a model"]),
])
def test_bad_settings_that_gave_a_traceback_are_one_line(tmp_path, capsys, argv, words):
    refused(capsys, [*argv, "--out", str(tmp_path / "r")], *words)
    assert not (tmp_path / "r").exists()


def test_compare_with_more_seeds_than_there_are_is_one_line(tmp_path, capsys):
    refused(capsys, ["compare", *QUICK, "--optimizers", "sgd", "--seeds", "99999999999",
                     "--out", str(tmp_path / "r")], "invalid --seeds: 99999999999")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_bench_with_no_steps_is_one_line(tmp_path, capsys, steps):
    out = tmp_path / "performance.md"
    refused(capsys, ["bench", "--steps", steps, "--sets", "mlp-ln", "--no-compile", "--out", str(out)],
            "--steps", steps)
    assert not out.exists()


@pytest.mark.parametrize("record, words", [
    ([], ["list, not a JSON object"]),
    ("no-environment", ["missing environment"]),
    ("resumed-not-a-list", ["malformed"]),
])
def test_a_config_json_that_is_not_a_run_record_is_one_line(tmp_path, capsys, record, words):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    if record == "no-environment":
        del config["environment"]
    elif record == "resumed-not-a-list":
        config["resumed"] = 5
    path.write_text(json.dumps(config if isinstance(record, str) else record))
    before = snapshot(tmp_path)
    refused(capsys, [*argv, "--epochs", "2", "--resume"], str(path), "not a psiopt run record",
            *words)
    assert snapshot(tmp_path) == before
    refused(capsys, ["report", str(tmp_path)], str(path), "not a psiopt run record")


def mnist_dir(root, train_shape=(8, 28, 28), test_shape=(4, 28, 28), labels=None):
    rng = np.random.default_rng(0)
    for split, shape in (("train", train_shape), ("t10k", test_shape)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, shape), True)
        n = (labels or {}).get(split, shape[0])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), True)
    return root


@pytest.mark.parametrize("shapes, words", [
    ({"train_shape": (8, 28, 20), "test_shape": (4, 28, 20)},
     ["train-images-idx3-ubyte.gz", "28×20", "28×28"]),
    ({"test_shape": (4, 20, 20)}, ["t10k-images-idx3-ubyte.gz", "20×20"]),
    ({"train_shape": (0, 28, 28)}, ["train-images-idx3-ubyte.gz", "0 samples"]),
    ({"test_shape": (0, 28, 28)}, ["t10k-images-idx3-ubyte.gz", "0 samples"]),
])
def test_mnist_files_of_another_shape_or_empty_are_one_line(tmp_path, capsys, shapes, words):
    mnist_dir(tmp_path, **shapes)
    refused(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress",
                     "--out", str(tmp_path / "r")], *words)
    assert not (tmp_path / "r").exists()


def test_good_mnist_files_still_train(tmp_path):
    make_idx_dir(tmp_path)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0


def test_a_cifar_batch_with_fewer_labels_than_images_is_one_line(tmp_path, capsys):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = 190 if name == "data_batch_2" else 200
        batch = {b"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, labels))}
        (base / name).write_bytes(pickle.dumps(batch))
    refused(capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-progress",
                     "--out", str(tmp_path / "r")], "data_batch_2", "200 images but 190 labels")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", [
    "summary.md", "accuracy.png", "permission-denied",
    pytest.param("read-only", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only directories")),
])
def test_a_report_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch, where):
    """A file in summary.md's (or a plot's) place, or a directory that refuses writes: as root
    (these tests' machine) a read-only directory does not refuse, so "permission-denied" makes
    the write of summary.md's temporary file raise the EACCES a read-only directory gives."""
    assert main(["compare", *QUICK, "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    if where == "read-only":
        os.chmod(tmp_path, 0o555)
        path = tmp_path / "summary.md"
    elif where == "permission-denied":
        path = tmp_path / "summary.md"
        real = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name.endswith(".tmp"):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    else:
        path = tmp_path / where
        path.unlink()
        path.mkdir()  # something in the file's place
    try:
        refused(capsys, ["report", str(tmp_path)], str(path), "cannot be written")
    finally:
        os.chmod(tmp_path, 0o755)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_state_is_not_read_before_it_is_verified(tmp_path, monkeypatch):
    """The checksum is checked before the state is unpickled (what was corrupted is never run)."""
    config = harness.RunConfig(dataset="synthetic", subset=128, epochs=1)
    harness.train(config, tmp_path, log=lambda *_: None)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["sha256"] = "0" * 64
    torch.save(ckpt, path)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real(*a, **k))
    with pytest.raises(harness.RunError, match="sha256"):
        harness.train(harness.RunConfig(**{**config.__dict__, "epochs": 2}), tmp_path,
                      resume=True, log=lambda *_: None)
    assert [k.get("weights_only") for k in loads] == [True]


def test_the_recorded_commit_is_the_code_the_process_imported(monkeypatch):
    # a commit made while a long compare runs did not change the code Python loaded at its start:
    # config.json took `git rev-parse HEAD` at each run's start and named later commits
    import subprocess

    from psiopt.experiments import train as train_module

    run = subprocess.run

    def no_git(cmd, *args, **kwargs):
        assert cmd[0] != "git", "git read again after import"
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_git)
    env = train_module.environment()
    assert (env["git_commit"], env["git_dirty"]) == train_module._SOURCE
