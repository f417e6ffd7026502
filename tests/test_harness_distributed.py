"""``psiopt train`` data-parallel: torchrun and ``--nproc`` equal one process with the same
global batch, log once, write one run directory, resume identically and refuse what they cannot
honour.  BatchNorm network (mlp-bn): with ``--sync-bn`` the statistics are the global batch's."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch.distributed as dist

from psiopt.experiments.cli import main
from psiopt.experiments.train import RunConfig, read_metrics, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

FLAGS = ["--dataset", "synthetic", "--model", "mlp-bn", "--optimizer", "psi-sgdm",
         "--subset", "448", "--batch-size", "64", "--milestones", "2", "--no-progress"]
TIMINGS = ("seconds", "samples_per_s", "nproc")


def _flat(record: dict, prefix: str = "", skip=TIMINGS) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}.", skip))
        elif not key.endswith(skip):
            out[prefix + key] = value
    return out


def _worst(a: list[dict], b: list[dict], skip=TIMINGS) -> float:
    """Largest relative difference over every number of two runs' records (same keys)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = _flat(x, skip=skip), _flat(y, skip=skip)
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, float):  # the radial part of a step on an invariant group is
                # zero to first order (<Δ, u> of nearly orthogonal vectors): compared absolutely
                floor = 1.0 if key.endswith("radial") else 1e-12
                worst = max(worst, abs(value - y[key]) / max(abs(value), floor))
            else:
                assert value == y[key], key
    return worst


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, capfd):
    one = train(RunConfig(dataset="synthetic", model="mlp-bn", optimizer="psi-sgdm", epochs=3,
                          subset=448, batch_size=64, milestones=[2]),
                tmp_path / "one", log=lambda *_: None)
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "psiopt", "train", *FLAGS, "--epochs", "3", "--sync-bn",
         "--out", str(tmp_path / "torchrun")], capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert torchrun.stdout.count("epoch 1/3") == 1  # rank 0 alone logs
    whole = read_metrics(tmp_path / "torchrun")
    assert _worst(one, whole) < 1e-5  # float32 sums in another order
    config = json.loads((tmp_path / "torchrun" / "config.json").read_text())
    assert (config["nproc"], config["sync_bn"]) == (2, True)
    assert sorted(p.name for p in (tmp_path / "torchrun").iterdir()) == \
        ["checkpoint.pt", "config.json", "metrics.jsonl"]

    split = ["train", *FLAGS, "--nproc", "2", "--sync-bn", "--out", str(tmp_path / "split")]
    assert main([*split, "--epochs", "1"]) == 0
    assert main([*split, "--epochs", "3", "--resume"]) == 0  # spawned, resumed from rank 0's file
    # each session adds the BN-recomputed figures at its last epoch: the split run has one more
    assert _worst(whole, read_metrics(tmp_path / "split"), (*TIMINGS, "_bn_recomputed")) == 0.0
    assert capfd.readouterr().out.count("epoch 1/1") == 1

    assert main(["train", *FLAGS, "--epochs", "3", "--nproc", "2",
                 "--out", str(tmp_path / "local-bn")]) == 0
    local = read_metrics(tmp_path / "local-bn")  # each rank normalises its own 32 samples
    assert _worst(one, local) > 1e-3, "BatchNorm without --sync-bn should differ"
    assert all(math.isfinite(m["test_loss"]) for m in local)


def test_what_two_processes_cannot_honour_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", *FLAGS, "--nproc", "2", "--batch-size", "63",
                 "--out", str(tmp_path / "odd")]) == 2
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()

    assert main(["train", *FLAGS, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert main(["train", *FLAGS, "--epochs", "2", "--nproc", "2", "--resume",
                 "--out", str(tmp_path / "run")]) == 2
    assert "nproc (1 → 2)" in capsys.readouterr().err

    assert main(["train", *FLAGS, "--epochs", "1", "--nproc", "2",
                 "--out", str(tmp_path / "two")]) == 0
    (tmp_path / "two" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["train", *FLAGS, "--epochs", "2", "--nproc", "2", "--resume",
                 "--out", str(tmp_path / "two")]) == 2  # found by rank 0, said once by the parent
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt: cannot be loaded" in err and len(err.splitlines()) == 1
