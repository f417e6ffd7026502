import json
import subprocess
import sys

import pytest

from psiopt.experiments.cli import main
from psiopt.experiments.train import RunConfig, read_metrics, train


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "psiopt", *args], capture_output=True,
                          text=True, timeout=300)


def test_train_one_epoch_on_synthetic_through_the_cli(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", "synthetic", "--model", "mlp-bn", "--optimizer",
                     "psi-sgdm", "--epochs", "1", "--subset", "512", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "psi-sgdm" and config["environment"]["torch"].startswith("2.13")
    (record,) = read_metrics(out)
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                "grad_norm", "eff_lr", "norm", "layers"):
        assert key in record
    assert record["test_acc"] > 0.2  # ten classes: clearly above chance after one epoch
    assert (out / "checkpoint.pt").exists()


def _strip(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")} for m in metrics]


@pytest.mark.parametrize("optimizer", ["psi-sgdm", "adamsrt"])
def test_resume_gives_the_uninterrupted_metrics(tmp_path, optimizer):
    config = RunConfig(dataset="synthetic", model="mlp-bn", optimizer=optimizer, epochs=3,
                       subset=384, batch_size=64, milestones=[2])
    whole = train(config, tmp_path / "whole", log=lambda *_: None)
    first = RunConfig(**{**config.__dict__, "epochs": 1})
    train(first, tmp_path / "split", log=lambda *_: None)
    resumed = train(config, tmp_path / "split", resume=True, log=lambda *_: None)
    assert _strip(whole) == _strip(resumed)
    assert _strip(read_metrics(tmp_path / "split")) == _strip(whole)


def test_existing_run_needs_resume(tmp_path):
    config = RunConfig(subset=128, epochs=1)
    train(config, tmp_path, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path, log=lambda *_: None)


def test_compare_writes_table_and_plots(tmp_path, capsys):
    code = main(["compare", "--dataset", "synthetic", "--subset", "256", "--optimizers",
                 "sgd,psi-sgd", "--seeds", "2", "--epochs", "2", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| sgd |" in summary and "| psi-sgd |" in summary and "±" in summary
    for name in ("accuracy.png", "train_loss.png", "eff_lr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "summary.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text() == summary
    assert "summary:" in capsys.readouterr().out


def test_compare_regression_recipe(tmp_path):
    assert main(["compare", "--recipe", "yi-fig4", "--epochs", "2", "--optimizers", "sgd,psi-sgd",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "final test loss" in summary
    for name in ("sgd", "psi-sgd"):  # the summary says what the metrics say, whatever happened
        diverged = bool(read_metrics(tmp_path / name / "seed0")[-1].get("diverged"))
        assert (f"| {name} | — (diverged" in summary) == diverged


def test_a_diverging_run_stops_and_is_reported(tmp_path):
    assert main(["compare", "--recipe", "yi-fig4", "--epochs", "3", "--optimizers", "sgd",
                 "--lr", "1e30", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = read_metrics(tmp_path / "sgd" / "seed0")
    assert [m.get("diverged", False) for m in metrics] == [True]  # stopped after the first epoch
    assert "| sgd | — (diverged" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["train", "--optimizer", "nope"], ["unknown optimizer 'nope'", "psi-sgdm"]),
    (["train", "--model", "resnet19"], ["unknown model", "resnet20"]),
    (["train", "--dataset", "imagenet"], ["unknown dataset", "fashion-mnist"]),
    (["train", "--epochs", "-2"], ["invalid epochs"]),
    (["train", "--dataset", "cifar10"], ["--data-dir"]),
    (["compare", "--optimizers", "sgd,adamx"], ["unknown optimizer 'adamx'"]),
    (["train", "--epochs", "x"], ["invalid int value"]),
])
def test_bad_arguments_give_one_line(args, words):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psiopt: error:"), result.stderr
    assert all(w in lines[0] for w in words)
    assert "Traceback" not in result.stderr


def test_list_shows_dataset_presence():
    result = run_cli("list")
    assert result.returncode == 0
    assert "synthetic       present" in result.stdout and "cifar10" in result.stdout
    assert "roburin-table2" in result.stdout
