"""The harness with ``<inner>+<policy>`` optimizers (issue 25, item 4): the names are parsed and
refused as documented, the run records say what ran, resume is exact, and the policies do what
they say on the trained model."""

import json

import pytest
import torch

import psiopt
from psiopt.experiments import wrapped
from psiopt.experiments.cli import main
from psiopt.experiments.models import create_model
from psiopt.experiments.train import RunConfig, RunError, build, read_checkpoint, read_metrics, train
from psiopt.optim.geometry import is_invariant, norm, rows

QUIET = {"log": lambda *_: None, "progress": False}


def tiny(optimizer, **kw):
    return RunConfig(**{"dataset": "synthetic", "model": "vit-qk", "optimizer": optimizer,
                        "epochs": 2, "subset": 256, "batch_size": 64, **kw})


# -- names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, parsed", [
    ("adamw+fixed", ("adamw", "fixed", False)), ("sgd+equilibrium", ("sgd", "equilibrium", False)),
    ("muon+fixed", ("muon", "fixed", False)), ("adamw+unit+project", ("adamw", "unit", True)),
    ("muon", ("muon", None, False)), ("adamw", None), ("psi-sgdm", None), ("sgd", None)])
def test_names_are_parsed(name, parsed):
    assert wrapped.parse(name) == parsed


@pytest.mark.parametrize("name, words", [
    ("lion+fixed", "unknown inner optimizer 'lion'"), ("adamw+rigid", "unknown norm policy 'rigid'"),
    ("adamw+", "unknown norm policy ''"), ("adamw+fixed+twice", r"only '\+project'"),
    ("muon+equilibrium", "no formula|not for Muon"), ("psi-sgd+fixed", "unknown inner")])
def test_malformed_names_are_refused_in_one_line(tmp_path, capsys, name, words):
    with pytest.raises(ValueError, match=words):
        wrapped.parse(name)
    assert main(["train", "--optimizer", name, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("psiopt: error:") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, words", [
    (["--optimizer", "adamw+fixed", "--momentum", "0.9"], r"unknown hyperparameter\(s\) \['momentum'\]"),
    (["--optimizer", "adamw+equilibrium", "--invariant-weight-decay", "0"], "needs invariant weight decay"),
    (["--optimizer", "sgd+equilibrium", "--set", "nesterov=true"], "Nesterov"),
    (["--optimizer", "muon", "--set", "ns_steps=0"], "ns_steps"),
    (["--optimizer", "adamw+fixed", "--lr", "-1"], "lr"),
    (["--optimizer", "adamw+fixed", "--invariant-lr", "inf"], "invalid invariant_lr: inf"),
    # vit-qk's invariant groups are all parts of fused qkv weights: torch.optim trains each
    # tensor with the others' settings, so these would reach no group
    (["--optimizer", "adamw+fixed", "--model", "vit-qk", "--invariant-weight-decay", "0.2"],
     "--invariant-weight-decay: no group takes it.*groups:8\\[0:128\\]"),
    (["--optimizer", "adamw+fixed", "--model", "vit-qk", "--invariant-lr", "0.005"],
     "--invariant-lr: no group takes it"),
])
def test_settings_that_cannot_apply_are_refused(tmp_path, capsys, flags, words):
    assert main(["train", *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert __import__("re").search(words, err), err
    assert not (tmp_path / "r").exists()


def test_a_policy_without_invariant_groups_and_muon_without_2d_weights_are_refused(tmp_path):
    plain = RunConfig(dataset="synthetic", model="arora-vgg", optimizer="adamw+fixed", subset=64,
                      model_kwargs={"batch_norm": False})
    with pytest.raises(RunError, match="finds none in this model.*'\\+fixed' would do nothing"):
        train(plain, tmp_path / "a", **QUIET)
    with pytest.raises(RunError, match="muon\\+fixed on resnet20: torch.optim.Muon takes 2-D weights only"):
        train(RunConfig(dataset="synthetic", model="resnet20", optimizer="muon+fixed", subset=64),
              tmp_path / "b", **QUIET)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_vit_qk_has_invariant_qk_heads_and_a_cancelled_key_norm_bias():
    model, x = create_model("vit-qk"), torch.randn(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    found = psiopt.find_scale_invariant(model, x)
    assert {k for k, v in found.items() if v != "cancelled"} == {
        f"blocks.{i}.attn.qkv.weight" for i in range(4)}
    assert all(found[f"blocks.{i}.attn.qkv.weight"] == "groups:8[0:128]" for i in range(4))
    assert {k for k, v in found.items() if v == "cancelled"} == {
        f"blocks.{i}.attn.k_norm.bias" for i in range(4)}


# -- runs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw+fixed", "muon+fixed"])
def test_a_tiny_run_records_what_ran(tmp_path, name):
    config = tiny(name, hyper={"weight_decay": 0.1})  # (vit-qk: its invariant groups are parts)
    metrics = train(config, tmp_path, **QUIET)
    record = json.loads((tmp_path / "config.json").read_text())
    s = record["optimizer_settings"]
    assert (s["inner"], s["policy"], s["project"]) == (name.split("+")[0], "fixed", False)
    assert s["invariant"]["weight_decay"] == s["other"]["weight_decay"] == 0.1
    groups = record["optimizer_groups"]
    rules = {g["rule"] for g in groups}
    qkv = [g for g in groups if g["grouping"] == "groups:8[0:128]"]
    # a partly invariant tensor takes the others' lr and weight_decay as a whole
    assert len(qkv) == 1 and qkv[0]["weight_decay"] == 0.1 and len(qkv[0]["params"]) == 4
    assert qkv[0]["lr"] == s["other"]["lr"]
    if name.startswith("muon"):
        assert rules == {"torch.optim.Muon", "torch.optim.AdamW"}
        assert s["muon_fixed"] == {"adjust_lr_fn": "match_rms_adamw", "eps": 1e-7}
        muon = {p for g in groups if g["rule"] == "torch.optim.Muon" for p in g["params"]}
        assert "head.weight" not in muon and "blocks.0.mlp.0.weight" in muon
        assert "blocks.0.attn.qkv.weight" in muon
    else:
        assert rules == {"torch.optim.AdamW"}
    assert [g["weight_decay"] for g in groups if g["grouping"] == "cancelled"] == [0.0]
    assert {g["weight_decay"] for g in groups if "blocks.0.norm1.weight" in g["params"]} == {0.0}
    for m in metrics:  # the diagnostics of the invariant groups
        assert {"angle", "radial", "tangential", "eff_lr", "norm"} <= set(m)
        assert abs(m["radial"]) < 1e-4  # the norm is held: the step is tangential
    assert ("angle_eq" in metrics[-1]) == name.startswith("adamw")  # no formula for Muon


@pytest.mark.parametrize("name", ["adamw+fixed", "muon+fixed", "sgd+unit+project",
                                  "adamw+equilibrium"])
def test_resume_gives_the_uninterrupted_run(tmp_path, name):
    def strip(metrics):
        return [{k: v for k, v in m.items() if k not in ("seconds", "samples_per_s")
                 and not k.endswith("_bn_recomputed")} for m in metrics]

    config = tiny(name, epochs=3, milestones=[2])
    whole = train(config, tmp_path / "whole", **QUIET)
    train(RunConfig(**{**config.__dict__, "epochs": 1}), tmp_path / "split", **QUIET)
    resumed = train(config, tmp_path / "split", resume=True, **QUIET)
    assert strip(whole) == strip(resumed) == strip(read_metrics(tmp_path / "split"))
    a = read_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = read_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "split" / "config.json").read_text())
    assert record["resumed"][0]["at_epoch"] == 1


def _group_norms(config, state=None):
    """Per-group norms of every invariant parameter: of the built model, or of ``state``."""
    _, model, optimizer, _ = build(config)
    if state is not None:
        model.load_state_dict(state)
    out = {}
    for g in optimizer.param_groups:
        if is_invariant(g.get("grouping")):
            for name, p in zip(g["param_names"], g["params"]):
                out[name] = norm(rows(p.detach().double(), g["grouping"])).flatten()
    return out


@pytest.mark.parametrize("name, kept", [("adamw+fixed", "initial"), ("muon+fixed", "initial"),
                                        ("adamw+unit", "one"), ("adamw+equilibrium", "initial"),
                                        ("adamw+free", None)])
def test_group_norms_in_the_trained_model(tmp_path, name, kept):
    config = tiny(name, hyper={"lr": 3e-3})  # (weight decay 0.05, the qkv parts' as the others')
    train(config, tmp_path, **QUIET)
    before = _group_norms(config)
    after = _group_norms(config, read_checkpoint(tmp_path / "checkpoint.pt")["model"])
    assert before.keys() == after.keys() and len(before) == 4
    for key in before:
        assert before[key].numel() == 8  # one group per head of q (4) and of k (4)
        if kept == "initial":
            assert torch.allclose(after[key], before[key], rtol=1e-5)
        elif kept == "one":
            assert torch.allclose(after[key], torch.ones_like(after[key]), rtol=1e-5)
        else:  # AdamW with weight decay moves them: the test above can fail
            assert not torch.allclose(after[key], before[key], rtol=1e-2)


def test_equilibrium_turns_each_group_by_the_predicted_angle(tmp_path):
    metrics = train(tiny("adamw+equilibrium", epochs=1), tmp_path, **QUIET)
    for layer in metrics[-1]["layers"].values():
        assert layer["angle"] == pytest.approx(layer["angle_eq"], rel=1e-6)
        assert layer["angle_eq"] == pytest.approx((2 * 1e-3 * 0.05 * 0.1 / 1.9) ** 0.5, rel=1e-9)


def test_compare_runs_the_new_names_beside_registered_ones(tmp_path):
    assert main(["compare", "--dataset", "synthetic", "--model", "vit-qk", "--optimizers",
                 "adamw+free,adamw+fixed,muon,adams", "--subset", "128", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    for name in ("adamw+free", "adamw+fixed", "muon", "adams"):
        assert f"| {name} |" in summary
        assert read_metrics(tmp_path / name / "seed0")
