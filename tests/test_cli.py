import json
import subprocess
import sys
import types

import pytest
import torch

from helpers import refused
from psiopt.experiments.cli import _pairs, main
from psiopt.experiments.train import RunConfig, RunError, read_metrics, train


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
    """Records without timings and without the BN-recomputed figures, which every session adds
    at its last epoch (a split run has one more)."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")
             and not k.endswith("_bn_recomputed")} for m in metrics]


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
    with pytest.raises(RunError, match="--resume"):
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
    assert main(["compare", "--dataset", "toy-regression", "--model", "toy-elu", "--batch-size",
                 "100", "--seeds", "3", "--epochs", "2", "--optimizers", "sgd,psi-sgd",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "final test loss" in summary
    rows = {line.split(" | ")[0].strip("| "): line
            for line in summary.split("## Settings")[0].splitlines()}
    for name in ("sgd", "psi-sgd"):  # the summary says what the metrics say, whatever happened
        diverged = [bool(read_metrics(tmp_path / name / f"seed{s}")[-1].get("diverged"))
                    for s in range(3)]
        assert ("diverged: " in rows[name]) == any(diverged)
        if any(diverged):
            assert f"diverged: {sum(diverged)} run(s)" in rows[name]


def test_a_diverging_run_stops_and_is_reported(tmp_path):
    assert main(["compare", "--dataset", "toy-regression", "--model", "toy-elu", "--batch-size",
                 "100", "--epochs", "3", "--optimizers", "sgd",
                 "--lr", "1e30", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = read_metrics(tmp_path / "sgd" / "seed0")
    assert [m.get("diverged", False) for m in metrics] == [True]  # stopped after the first epoch
    text = (tmp_path / "sgd" / "seed0" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert "| sgd | — (diverged" in (tmp_path / "summary.md").read_text()


BAD_ARGUMENTS = [
    (["train", "--optimizer", "nope"], ["unknown optimizer 'nope'", "psi-sgdm"]),
    (["train", "--model", "resnet19"], ["unknown model", "resnet20"]),
    (["train", "--dataset", "imagenet"], ["unknown dataset", "fashion-mnist"]),
    (["train", "--epochs", "-2"], ["invalid epochs"]),
    (["train", "--dataset", "cifar10"], ["--data-dir"]),
    (["compare", "--optimizers", "sgd,adamx"], ["unknown optimizer 'adamx'"]),
    (["train", "--epochs", "x"], ["invalid int value"]),
]

#: ``python -m psiopt`` on each command line of argv[2] (JSON) in turn, in one process (one
#: import of torch instead of one per command line): file descriptor 2 captured per command line,
#: what the imports wrote to it before the first put in front of each, warnings shown again for
#: each (a fresh process shows a warning once), an uncaught exception's traceback written there
#: with status 1, as a process of its own would end; [status, stderr] of each to argv[1]
_RUN_EACH = """
import json, os, runpy, sys, tempfile, traceback, warnings

def captured(fn):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            code = fn()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return code, f.read().decode()

def run():
    try:
        runpy.run_module("psiopt", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    except BaseException:
        traceback.print_exc()
        return 1

out, cases = sys.argv[1], json.loads(sys.argv[2])
_, imported = captured(lambda: __import__("psiopt.experiments.cli"))
results = []
for argv in cases:
    sys.argv = ["psiopt", *argv]
    warnings._filters_mutated()
    code, err = captured(run)
    results.append([code, imported + err])
with open(out, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def bad_argument_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-arguments") / "runs.json"
    result = subprocess.run([sys.executable, "-c", _RUN_EACH, str(out),
                             json.dumps([args for args, _ in BAD_ARGUMENTS])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [types.SimpleNamespace(returncode=c, stderr=e) for c, e in json.loads(out.read_text())]


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)), ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_give_one_line(bad_argument_runs, case):
    result, words = bad_argument_runs[case], BAD_ARGUMENTS[case][1]
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


# -- a run directory never reports what did not happen (issue 8, part 1) --------------------------
QUICK = ["--dataset", "synthetic", "--subset", "128", "--epochs", "1", "--no-progress"]


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_compare_into_a_directory_made_with_other_settings_is_refused(tmp_path, capsys):
    argv = ["compare", *QUICK, "--optimizers", "sgd,psi-sgd", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = snapshot(tmp_path)
    refused(capsys, [*argv, "--lr", "0.05"], "sgd", "hyper", "0.05")
    assert snapshot(tmp_path) == before
    assert main(argv) == 0  # the same settings: the finished runs are reused as they are
    assert {k: v for k, v in snapshot(tmp_path).items() if k.suffix != ".md" and k.suffix != ".png"} \
        == {k: v for k, v in before.items() if k.suffix != ".md" and k.suffix != ".png"}


@pytest.mark.parametrize("change, words", [
    (["--lr", "0.5"], ["hyper", "0.5"]), (["--seed", "3"], ["seed", "0 → 3"]),
    (["--optimizer", "adam"], ["optimizer", "'sgd' → 'adam'"]),
])
def test_resume_with_other_settings_is_refused_and_touches_nothing(tmp_path, capsys, change, words):
    argv = ["train", *QUICK, "--optimizer", "sgd", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = snapshot(tmp_path)
    argv = [a for a in argv if a not in ("--optimizer", "sgd")]
    refused(capsys, [*argv, "--resume", *(["--optimizer", "sgd"] if "--optimizer" not in change
                                          else []), *change], *words)
    assert snapshot(tmp_path) == before


def test_resume_with_more_epochs_continues_and_records_it(tmp_path):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main([*[a if a != "1" else "2" for a in argv], "--resume"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["epochs"] == 2 and config["resumed"][0]["at_epoch"] == 1
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]
    before = snapshot(tmp_path)
    assert main([*argv, "--resume"]) == 2  # fewer epochs than were trained
    assert snapshot(tmp_path) == before


def test_resume_without_a_checkpoint_starts_over(tmp_path, capsys):
    """Runs are seeded: a run without a checkpoint (killed, or a full disk, before its first) is
    trained again from epoch 0, and its records are those of the first attempt (issue 22)."""
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    first = read_metrics(tmp_path)
    (tmp_path / "checkpoint.pt").unlink()
    assert main([*argv, "--resume"]) == 0
    assert "no checkpoint.pt, so the run starts over" in capsys.readouterr().out
    assert [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")}
            for m in read_metrics(tmp_path)] == \
        [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")} for m in first]
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("broken, words", [
    ("checkpoint.pt", ["checkpoint.pt", "cannot be loaded"]),
    ("metrics.jsonl", ["metrics.jsonl, line 1", "not a JSON record"]),
    ("config.json", ["config.json", "cannot be read"]),
])
def test_corrupt_run_files_are_named(tmp_path, capsys, broken, words):
    argv = ["train", *QUICK, "--out", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / broken
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    refused(capsys, [*argv, "--epochs", "2", "--resume"], *words)


def test_a_recipe_keeps_the_flags_the_user_gave(tmp_path, capsys):
    assert main(["compare", "--recipe", "yi-table1", "--model", "mlp-bn", "--dataset", "synthetic",
                 "--optimizers", "sgd", "--subset", "64", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "sgd" / "seed0" / "config.json").read_text())
    assert (config["model"], config["dataset"], config["epochs"]) == ("mlp-bn", "synthetic", 1)
    assert "your flags kept: --dataset synthetic, --model mlp-bn" in capsys.readouterr().out


def test_a_last_batch_of_one_sample_is_left_out(tmp_path):
    assert main(["train", "--dataset", "synthetic", "--subset", "129", "--batch-size", "128",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    (record,) = read_metrics(tmp_path)
    assert record["train_samples"] == 128


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["invalid batch_size: 0"]),
    (["--threads", "-1"], ["invalid threads: -1"]),
    (["--set", "betas=0.9"], ["invalid betas: 0.9"]),
    (["--optimizer", "sgd", "--lr", "-0.1"], ["invalid lr: -0.1"]),
    (["--optimizer", "un-sgd", "--momentum", "0.9"], ["invalid momentum for an invariant group"]),
    (["--milestones", "3,2"], ["invalid milestones"]),
])
def test_bad_settings_are_one_line_usage_errors(tmp_path, capsys, flags, words):
    refused(capsys, ["train", *QUICK, "--optimizer", "adam", *flags, "--out", str(tmp_path / "r")],
            *words)
    assert not (tmp_path / "r").exists()


def test_a_truncated_gz_file_is_named(tmp_path, capsys):
    import gzip

    for split, n in (("train", 8), ("t10k", 4)):
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(n * 784)))
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n)
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    refused(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress",
                     "--out", str(tmp_path / "r")], str(bad), "cannot read IDX file")


def test_errors_that_are_not_the_users_keep_their_traceback(monkeypatch, tmp_path):
    import psiopt.experiments.cli as cli

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", *QUICK, "--out", str(tmp_path)])


def test_the_run_records_what_ran(tmp_path):
    assert main(["train", *QUICK, "--optimizer", "psi-sgdm", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    settings = config["optimizer_settings"]
    assert (settings["invariant"]["lr"], settings["invariant"]["momentum"]) == (0.1, 0.9)
    assert (settings["other"]["lr"], settings["other"]["momentum"]) == (0.1, 0.9)
    assert config["threads"] == 1 and config["environment"]["threads"] == 1
    (record,) = read_metrics(tmp_path)
    assert record["lr"] == {"channel": 0.1, "other": 0.1} and record["threads"] == 1
    assert 0 <= record["test_acc_bn_recomputed"] <= 1  # the last epoch, statistics recomputed


def test_summary_states_each_runs_settings_and_the_plots_mark_lr_drops(tmp_path):
    assert main(["compare", *QUICK, "--epochs", "3", "--milestones", "2", "--optimizers",
                 "adam,psi-sgdm", "--lr", "0.01", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "synthetic / mlp-bn: 3 epochs, batch 128, first 128 training and 100 test samples, " \
        "lr ×0.1 at epochs 2" in summary
    assert "| adam | 0.01 | — | 0 | betas=(0.9, 0.999)" in summary.replace("[0.9, 0.999]", "(0.9, 0.999)")
    assert "| psi-sgdm | 0.01 | 0.9 | 0 |" in summary
    results = summary.split("## Settings")[0]
    table = [line.split(" | ")[0].strip("| ") for line in results.splitlines() if line.startswith("| ")][1:]
    accuracy = {name: read_metrics(tmp_path / name / "seed0")[-1]["test_acc"] for name in table}
    assert list(accuracy.values()) == sorted(accuracy.values(), reverse=True)  # rank order


# -- recipes (issue 8, part 2) ---------------------------------------------------------------------
COMPARE_RECIPES = ["yi-fig1", "yi-fig4", "yi-table1", "yi-table2", "badrinarayanan-table2",
                   "roburin-table2", "arora-lr-sweep", "norm-policies"]

def _recipe_argv(name, tmp_path, *extra):
    from psiopt.experiments.recipes import RECIPES

    data = [] if RECIPES[name]["small"]["dataset"] == "toy-regression" else ["--dataset", "synthetic"]
    return ["compare", "--recipe", name, *data, "--subset", "64", "--epochs", "1", "--seeds", "1",
            "--no-progress", "--out", str(tmp_path), *extra]


def _grid_ends(name):
    """The recipe, its grid cut to its two ends where its small runs repeat one setting over a
    grid of numbers (test time): arora-lr-sweep's four arms each once, two at the lr 0.01 and two
    at 100 (the grid's ends, of five lrs), roburin-table2's lr selection at 1e-4 and 0.1 (of
    four); every kind of arm and every optimizer still runs.
    test_every_full_recipe_validates_without_data builds every arm and every trial of the whole
    grids."""
    from psiopt.experiments.recipes import RECIPES

    recipe = RECIPES[name]
    if name == "arora-lr-sweep":
        ends = ("lr0.01-bn", "lr100-bn-tensor", "lr0.01-no-bn", "lr100-bn-exact")
        assert len(recipe["variants"]) == 20 and set(ends) <= set(recipe["variants"])
        return {**recipe, "variants": {k: recipe["variants"][k] for k in ends}}
    if name == "roburin-table2":
        small = recipe["select"]["small"]
        assert len(small["lrs"]) == 4
        return {**recipe, "select": {**recipe["select"], "small": {**small, "lrs": small["lrs"][::3]}}}
    return recipe


@pytest.mark.parametrize("name", COMPARE_RECIPES)
def test_every_recipe_runs_end_to_end_on_a_tiny_subset(tmp_path, monkeypatch, name):
    from psiopt.experiments.recipes import RECIPES

    monkeypatch.setitem(RECIPES, name, _grid_ends(name))
    assert main(_recipe_argv(name, tmp_path)) == 0
    variants = RECIPES[name]["variants"] or {"": {}}
    optimizers = RECIPES[name]["small"]["optimizers"].split(",")
    for variant, flags in variants.items():
        assert (tmp_path / variant / "summary.md").exists()
        for opt in flags.get("optimizers", ",".join(optimizers)).split(","):
            config = json.loads((tmp_path / variant / opt / "seed0" / "config.json").read_text())
            for key, value in flags.items():
                if key in ("init", "model", "grouping"):
                    assert config[key] == value
                elif key in ("lr", "invariant_lr", "invariant_weight_decay"):
                    assert config["hyper"][key] == value
                elif key == "set":
                    assert config["hyper"]["fixed_norm"] is False
                elif key == "model_kwarg":
                    assert config["model_kwargs"] == _pairs("--model-kwarg", value)
                elif key == "exact_norms":
                    assert config["exact_norms"] is value


def test_every_recipe_list_matches_the_tests():
    from psiopt.experiments.recipes import RECIPES

    tested = test_every_recipe_runs_end_to_end_on_a_tiny_subset.pytestmark[0].args[1]
    studies = test_every_study_recipe_runs_and_its_full_protocol_binds.pytestmark[0].args[1]
    assert sorted([*tested, *studies]) == sorted(RECIPES)


@pytest.mark.parametrize("name", ["roburin-thm4", "effective-lr"])
def test_every_study_recipe_runs_and_its_full_protocol_binds(tmp_path, name):
    import inspect

    from psiopt.experiments.recipes import RECIPES
    from psiopt.experiments.studies import STUDIES, run_study

    recipe = RECIPES[name]
    study = STUDIES[recipe["study"]]
    for budget in ("small", "full"):
        inspect.signature(study).bind(tmp_path, **recipe[budget])
    tiny = {**recipe["small"], "dataset": "synthetic", "subset": 64, "steps": 12}
    text = run_study(recipe["study"], tiny, tmp_path / "run")
    assert "| 12 |" in text or "step 12" in text
    assert (tmp_path / "run" / "summary.md").read_text() == text


@pytest.mark.parametrize("flags", [["--lr", "5"], ["--set", "betas=0.5,0.6"], ["--batch-size", "7"],
                                   ["--exact-norms"], ["--model-kwarg", "width=3"], ["--seeds", "2"]])
def test_a_study_refuses_the_settings_it_would_not_honour(tmp_path, capsys, monkeypatch, flags):
    """A study fixes its own settings: any flag but --dataset/--model/--subset/--data-dir/
    --threads/--out is refused, named, before anything runs."""
    from psiopt.experiments import studies

    monkeypatch.setattr(studies, "run_study", lambda *a: pytest.fail("the study ran"))
    refused(capsys, ["compare", "--recipe", "effective-lr", *flags, "--out", str(tmp_path / "s")],
            flags[0], "takes --dataset")
    assert not (tmp_path / "s").exists()


def test_effective_lr_of_plain_sgd_is_arora_eta_over_norm_squared(tmp_path):
    from psiopt.experiments.studies import effective_lr

    effective_lr(tmp_path, "synthetic", "mlp-bn", ["sgd:momentum=0", "psi-sgd"], 10, 64)
    result = json.loads((tmp_path / "effective_lr.json").read_text())
    for r in result["sgd:momentum=0"].values():  # the step is η g: exactly Table 1's η/r² ...
        assert r["measured"] == pytest.approx(r["theorem2"], rel=1e-3)
        assert r["measured"] == pytest.approx(r["arora"], rel=0.05)  # ... up to tan and medians
    assert all(r["measured"] == pytest.approx(1.0, rel=1e-3) for r in result["psi-sgd"].values())


def test_roburin_thm4_study_is_exact_at_the_first_step_with_exact_invariance(tmp_path):
    """With BN eps ≈ 0 the first step of SGD+L2 and AdamG* agree to rounding (Theorem 4)."""
    from psiopt.experiments.studies import thm4

    thm4(tmp_path, "synthetic", "mlp-bn", lrs=[0.05], decays=[1e-2], bn_eps=[1e-12], steps=1,
         subset=64)
    (result,) = json.loads((tmp_path / "thm4.json").read_text())
    assert result["angles"]["1"] < 1e-9


@pytest.mark.parametrize("name", COMPARE_RECIPES)
def test_every_full_recipe_validates_without_data(tmp_path, monkeypatch, name):
    import psiopt.experiments.cli as cli
    from psiopt.experiments.recipes import RECIPES

    seen = []
    monkeypatch.setattr(cli, "train", lambda config, out, **kw: seen.append(config))
    monkeypatch.setattr(cli, "_report", lambda directory: None)
    # no run has metrics: each optimizer "chooses" the last lr of the grid
    monkeypatch.setattr(cli, "_choose", lambda directory, select, runs: {n: lr for n, lr, _ in runs})
    assert main(["compare", "--recipe", name, "--budget", "full", "--out", str(tmp_path)]) == 0
    full, select = RECIPES[name]["full"], RECIPES[name]["select"].get("full")
    arms = RECIPES[name]["variants"] or {"": {}}
    per_arm = [len(flags.get("optimizers", full["optimizers"]).split(",")) for flags in arms.values()]
    trials = sum(per_arm) * len(select["lrs"]) if select else 0
    assert len(seen) == trials + sum(per_arm) * full.get("seeds", 1)
    assert all(c.dataset == full["dataset"] for c in seen)
    assert all(c.validation == select["validation"] and c.epochs == select["epochs"]
               for c in seen[:trials])
    assert all(c.epochs == full["epochs"] and c.validation is None for c in seen[trials:])
    if select:  # the main runs take the chosen lr
        assert all(c.hyper["lr"] == select["lrs"][-1] for c in seen[trials:])


def test_a_record_written_after_the_last_checkpoint_is_dropped_on_resume(tmp_path):
    """Killed between an epoch's record and its checkpoint: the resumed run redoes that epoch."""
    config = RunConfig(dataset="synthetic", subset=128, epochs=1)
    train(config, tmp_path, log=lambda *_: None)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n")
    metrics = train(RunConfig(**{**config.__dict__, "epochs": 2}), tmp_path, resume=True,
                    log=lambda *_: None)
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2] == [m["epoch"] for m in metrics]
    assert read_metrics(tmp_path)[1]["train_loss"] > 0


# -- validation split and lr selection -------------------------------------------------------------
def test_a_validation_split_is_held_out_of_training_and_named_in_the_metrics(tmp_path):
    from psiopt.experiments.data import load_dataset

    full = load_dataset("synthetic")
    held = load_dataset("synthetic", validation=300, subset=500)
    assert held.split == "validation" and len(held.train_x) == 500 and len(held.test_x) == 300
    # the held-out samples are the last 300 training samples (normalised with the other stats)
    assert torch.equal(held.test_y, full.train_y[-300:])
    # the same samples up to the (affine) normalisation: exactly correlated
    a, b = held.test_x.flatten(), full.train_x[-300:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 1 - 1e-6
    with pytest.raises(ValueError, match="validation"):
        load_dataset("synthetic", validation=len(full.train_x) - 1)
    config = RunConfig(dataset="synthetic", epochs=1, subset=256, validation=200)
    (record,) = train(config, tmp_path, log=lambda *_: None)
    assert "val_acc" in record and "val_acc_bn_recomputed" in record
    assert not any(k.startswith("test_") for k in record)  # nothing claims the test set


def test_lr_selection_picks_the_best_validation_accuracy_and_the_runs_use_it(tmp_path, capsys):
    out = tmp_path / "bt"
    assert main(_recipe_argv("badrinarayanan-table2", out)) == 0
    for variant in ("archbn2", "archbn4"):
        record = json.loads((out / variant / "selection.json").read_text())
        assert record["protocol"]["epochs"] == 1 and record["protocol"]["subset"] == 64
        for name, row in record["final_val"].items():
            best = max((acc, -i) for i, acc in enumerate(row.values()) if acc is not None)
            assert record["chosen"][name] == float(list(row)[-best[1]])
            config = json.loads((out / variant / name / "seed0" / "config.json").read_text())
            assert config["hyper"]["lr"] == record["chosen"][name]
            assert config["optimizer_settings"]["invariant"]["lr"] == record["chosen"][name]
            trial = json.loads((out / variant / "lr-selection" / name / "lr0.01" / "config.json")
                               .read_text())
            assert trial["validation"] == 500 and trial["seed"] == 0 and trial["milestones"] == []
        summary = (out / variant / "summary.md").read_text()
        assert "## Learning-rate selection" in summary and "held out" in summary
        results = summary.split("## Settings")[0]
        assert "validation" not in results  # the table is the test-set runs only
    assert "lr selection" in capsys.readouterr().out
    # asked again: every run is finished, nothing is retrained, the same lrs are chosen
    before = (out / "archbn2" / "selection.json").read_text()
    assert main(_recipe_argv("badrinarayanan-table2", out)) == 0
    assert (out / "archbn2" / "selection.json").read_text() == before


def test_an_lr_given_by_the_user_skips_the_selection(tmp_path, capsys):
    assert main(_recipe_argv("badrinarayanan-table2", tmp_path, "--lr", "0.05")) == 0
    assert "no lr selection" in capsys.readouterr().out
    assert not (tmp_path / "archbn2" / "lr-selection").exists()
    config = json.loads((tmp_path / "archbn2" / "b-sgd" / "seed0" / "config.json").read_text())
    assert config["hyper"]["lr"] == 0.05


def test_report_of_validation_runs_says_validation(tmp_path):
    from psiopt.experiments.report import write_report

    train(RunConfig(dataset="synthetic", epochs=1, subset=128, validation=100), tmp_path / "r",
          log=lambda *_: None)
    summary, _, table = write_report(tmp_path)
    assert "validation acc" in table and "last 100 held out" in summary.read_text()


def test_summary_says_when_the_bn_recomputed_figure_covers_only_some_seeds():
    """Runs made before the BN-recomputed evaluation existed lack it: the summary must not put a
    mean over fewer seeds beside the eval-mode mean over all of them without saying so."""
    from psiopt.experiments.report import summary_table

    def record(acc, fresh=None):
        r = {"epoch": 1, "train_loss": 0.5, "test_loss": 0.4, "test_acc": acc, "seconds": 1.0}
        return r if fresh is None else {**r, "test_acc_bn_recomputed": fresh}

    config = {"optimizer": "sgd"}
    partial = summary_table({"sgd": [(config, [record(0.80)]), (config, [record(0.90, 0.95)])]})
    assert "85.00 ± 7.07 (BN recomputed: 95.00, 1 of 2 seeds)" in partial
    whole = summary_table({"sgd": [(config, [record(0.80, 0.85)]), (config, [record(0.90, 0.95)])]})
    assert "85.00 ± 7.07 (BN recomputed: 90.00)" in whole


def test_a_setting_a_rule_cannot_honour_is_refused_before_any_run_trains(tmp_path, capsys):
    """``compare --optimizers sgd,un-sgd --momentum 0.9``: UN-SGD's invariant groups take no
    momentum.  Refused in one line before anything runs (sgd trained and wrote its run first)."""
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "synthetic", "--model", "mlp-bn", "--epochs", "1",
                 "--subset", "64", "--optimizers", "sgd,un-sgd", "--momentum", "0.9",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "un-sgd: invalid momentum for an invariant group" in err[0], err
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("flags", [["--optimizers", "sgd"], ["--invariant-weight-decay", "0.001"],
                                   ["--set", "fixed_norm=true"]])
def test_a_flag_a_recipe_variant_sets_otherwise_is_refused(tmp_path, capsys, flags):
    """yi-table2's variants set their optimizers, Yi's L2 and fixed_norm=false: a flag the user
    gives for one of them was replaced by the variant's, while the recipe printed "your flags
    kept" (the psi arm ran psi-sgd and psi-sgdm with L2 5e-4); refused in one line, nothing
    written."""
    out = tmp_path / "rt2"
    assert main(["compare", "--recipe", "yi-table2", "--dataset", "synthetic", "--model", "mlp-bn",
                 "--epochs", "1", "--subset", "64", "--seeds", "1", *flags, "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which your " + flags[0] + " would replace" in err[0], err
    assert not out.exists()
