"""Groupings of part of a tensor (``"groups:4[0:32]"``, ``"cancelled[16:32]"``).

The ground truth is the same network with the fused tensor split into separate parameters: a
fused qkv projection under per-head QK-norm trains exactly as separate q, k, v projections do
(q and k invariant per head, v ordinary), on every path (reference, vectorized, fused kernels),
with learning-rate schedules and across a ``state_dict`` round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import psiopt
from psiopt.experiments import zoo
from psiopt.optim.geometry import parse_grouping, part, rest, rows, split_part
from psiopt.optim.registry import REGISTRY

STEPS = 4
#: the rules whose update of a group reads that group only (SGDG/AdamG's orthogonality penalty
#: couples the rows of a tensor: with it on, a fused part couples q's rows with k's); AdamW's
#: baseline trains the fused tensor as one, with the others' weight decay
PER_GROUP = [n for n in psiopt.list_optimizers() if n != "adamw"]


def fused_and_separate():
    """The same network twice: with a fused qkv projection, and with q, k, v apart."""
    torch.manual_seed(0)
    fused = zoo.Tokens(fused=True, bias=False, qk_norm="ln").double()
    separate = zoo.Tokens(fused=False, bias=False, qk_norm="ln").double()
    state = fused.state_dict()
    w = state.pop("block.attn.qkv.weight")
    for name, block in zip("qkv", w.chunk(3)):
        state[f"block.attn.{name}.weight"] = block
    separate.load_state_dict(state)
    x = torch.randn(4, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return fused, separate, x


def qkv(model) -> torch.Tensor:
    attn = model.block.attn
    if attn.fused:
        return attn.qkv.weight.detach()
    return torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]).detach()


def train(model, opt, x, steps=STEPS, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def extra(name) -> dict:
    return {"ortho": 0.0} if name in ("sgdg", "adamg") else {}


def test_discovery_finds_the_part_the_split_network_has():
    fused, separate, x = fused_and_separate()
    found, apart = psiopt.find_scale_invariant(fused, x), psiopt.find_scale_invariant(separate, x)
    assert apart["block.attn.q.weight"] == apart["block.attn.k.weight"] == "groups:2"
    assert "block.attn.v.weight" not in apart
    assert found["block.attn.qkv.weight"] == "groups:4[0:32]"  # 2 heads of q, then 2 of k
    report = psiopt.check_invariance(fused, x, found)
    assert report.ok and all(c.verdict == "exact" for c in report.checks), str(report)
    wrong = psiopt.check_invariance(fused, x, {"block.attn.qkv.weight": "groups:6[0:48]"})
    assert not wrong.ok  # the v rows are not invariant


@pytest.mark.parametrize("name", PER_GROUP)
def test_a_fused_part_trains_as_separate_tensors_on_every_path(name):
    # (the groups are discovered once per network: no running statistics to link)
    fused, separate, x = fused_and_separate()
    mappings = [psiopt.find_scale_invariant(m, x) for m in (fused, separate)]
    start = qkv(fused)
    paths = []
    for kw in ({"foreach": False}, {"fused": False}, {}):  # reference, vectorized, default
        a, b = (copy.deepcopy(m) for m in (fused, separate))
        for model, mapping in zip((a, b), mappings):
            train(model, psiopt.create_optimizer(model, name, mapping=mapping, **extra(name), **kw), x)
        assert torch.allclose(qkv(a), qkv(b), rtol=0, atol=1e-12), (kw, float((qkv(a) - qkv(b)).abs().max()))
        for (n, p), q in zip(((n, p) for n, p in a.named_parameters() if "qkv" not in n),
                             (q for n, q in b.named_parameters() if n.split(".")[-2] not in "qkv")):
            assert torch.allclose(p, q, rtol=0, atol=1e-12), (kw, n)
        assert not torch.equal(qkv(a), start)  # it did train
        paths.append(qkv(a))
    for other in paths[1:]:
        assert torch.allclose(paths[0], other, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["psi-sgdm", "adamg"])
def test_a_scheduler_reaches_the_rest_as_the_part(name):
    fused, separate, x = fused_and_separate()
    results = []
    for model in (fused, separate):
        opt = psiopt.create_optimizer(model, name, x, **extra(name))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
        train(model, opt, x, scheduler=sched)
        results.append(qkv(model))
    assert torch.allclose(*results, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["psi-sgdm", "adams", "sgdmrt"])
def test_state_dict_round_trip_continues_identically(name):
    model, _, x = fused_and_separate()
    straight = copy.deepcopy(model)
    train(straight, psiopt.create_optimizer(straight, name, x), x, steps=2 * STEPS)
    opt = psiopt.create_optimizer(model, name, x)
    train(model, opt, x)
    saved = copy.deepcopy(opt.state_dict())
    assert any("rest" in st for st in saved["state"].values())
    resumed = psiopt.create_optimizer(model, name, x)
    resumed.load_state_dict(saved)
    train(model, resumed, x)
    assert torch.equal(qkv(model), qkv(straight))


def test_a_partly_cancelled_bias_keeps_its_part_and_trains_the_rest():
    torch.manual_seed(0)
    model = zoo.ViT().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mapping = psiopt.find_scale_invariant(model, x)
    assert mapping["blocks.0.attn.qkv.bias"] == "cancelled[16:32]"
    bias = model.blocks[0].attn.qkv.bias
    before = bias.detach().clone()
    opt = psiopt.create_optimizer(model, "psi-sgdm", x)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert torch.equal(bias[16:32], before[16:32])  # never updated
    assert not torch.equal(bias[:16], before[:16]) and not torch.equal(bias[32:], before[32:])
    # and shifting the cancelled part does not change the network (train and eval mode)
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        with torch.no_grad():
            bias[16:32] += 3.0
        assert torch.allclose(model(x), out, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            bias[16:32] -= 3.0


def test_grouping_strings_and_views():
    t = torch.arange(48.0).view(12, 4)
    assert split_part("groups:2[0:8]") == ("groups:2", (0, 8))
    assert split_part("channel") == ("channel", None)
    assert parse_grouping("groups:2[0:8]") == ("groups", 2, 0)
    assert torch.equal(rows(t, "groups:2[0:8]").reshape(8, 4), t[:8])
    assert rows(t, "groups:2[0:8]").data_ptr() == t.data_ptr()  # a view
    assert torch.equal(part(t, "cancelled[4:8]"), t[4:8])
    assert [v.shape[0] for v in rest(t, "channel[4:8]")] == [4, 4]
    assert [v.shape[0] for v in rest(t, "tensor[0:8]")] == [4]
    assert rest(t, "channel") == []
    for bad in ("channel[3:2]", "channel[a:b]", "channel@1[0:2]", "[0:2]", "channel[0:2"):
        with pytest.raises(ValueError):
            rows(t, bad) if bad.endswith("]") else parse_grouping(bad)
    with pytest.raises(ValueError, match="needs at least 20 rows"):
        rows(t, "channel[0:20]")


def test_settings_of_the_rest_are_checked():
    model, _, x = fused_and_separate()
    groups = psiopt.param_groups(model, x)
    partial = next(g for g in groups if split_part(g["grouping"] or "")[1])
    with pytest.raises(ValueError, match="rest_lr: invalid lr"):
        psiopt.optim.PSISGD([{**partial, "rest_lr": -1.0}])
    with pytest.raises(ValueError, match="rest_betas"):
        psiopt.optim.PSISGD([{**partial, "rest_betas": (0.9, 0.99)}])  # SGD's counterpart
    whole = next(g for g in groups if g["grouping"] == "cancelled")
    with pytest.raises(ValueError, match="rest_lr"):
        psiopt.optim.PSISGD([{**whole, "rest_lr": 0.1}])
    with pytest.raises(ValueError, match="one tensor"):
        psiopt.optim.baselines.AdamW([{**partial, "rest_lr": 0.1}])
    with pytest.raises(ValueError, match="qkv.weight"):
        psiopt.param_groups(model, mapping={"block.attn.qkv.weight": "groups:4[0:64]"})
    opt = psiopt.create_optimizer(model, "psi-sgdm", x, other_lr=0.02, other_momentum=0.5)
    group = next(g for g in opt.param_groups if g["grouping"] == "groups:4[0:32]")
    assert (group["rest_lr"], group["rest_momentum"], group["lr"]) == (0.02, 0.5, 0.1)


@pytest.mark.parametrize("policy", ["fixed", "unit", "equilibrium"])
def test_a_norm_policy_on_a_part_equals_it_on_separate_tensors(policy):
    # AdamW with weight decay 0.05 everywhere: the split network's q and k are invariant groups,
    # its v an ordinary weight, as the fused part and its rest are
    fused, separate, x = fused_and_separate()
    results = []
    for model in (fused, separate):
        inner = torch.optim.AdamW(psiopt.optimizer_groups(model, x, weight_decay=0.05), lr=1e-2)
        policy_ = psiopt.NormPolicy(inner, policy, project=True, model=model, example_inputs=x)
        for _ in range(STEPS):
            inner.zero_grad()
            model(x).square().sum().backward()
            policy_.step()
        results.append(qkv(model))
    assert torch.allclose(*results, rtol=0, atol=1e-12), float((results[0] - results[1]).abs().max())


def test_the_harness_grouping_option_keeps_a_part_and_never_refines():
    from psiopt.experiments.train import RunError, regrouped

    found = {"qkv.weight": "groups:4[0:32]", "conv.weight": "channel", "ln.weight": "tensor",
             "bias": "cancelled[16:32]", "b0": "cancelled"}
    assert regrouped(found, "tensor") == {**found, "qkv.weight": "tensor[0:32]", "conv.weight": "tensor"}
    with pytest.raises(RunError, match="qkv.weight is invariant only as 'groups:4"):
        regrouped(found, "channel")
    assert regrouped({"conv.weight": "channel", "b0": "cancelled"}, "channel") == \
        {"conv.weight": "channel", "b0": "cancelled"}
    model, _, x = fused_and_separate()
    tensor = regrouped(psiopt.find_scale_invariant(model, x), "tensor")
    assert psiopt.check_invariance(model, x, tensor).ok  # a coarser grouping of the part holds


def test_a_group_with_lr_zero_moves_neither_its_part_nor_its_rest():
    # torch.distributed.checkpoint initialises a fresh optimizer's state with one lr=0 step
    model, _, x = fused_and_separate()
    opt = psiopt.create_optimizer(model, "adams", x, other_weight_decay=0.1)
    group = next(g for g in opt.param_groups if g["grouping"] == "groups:4[0:32]")
    assert group["rest_weight_decay"] == 0.1
    group["lr"] = 0.0
    before = qkv(model).clone()
    train(model, opt, x, steps=1)
    assert torch.equal(qkv(model), before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["psi-sgdm", "adams"])  # an SGD and an Adam rest
def test_a_compiled_step_on_a_part_agrees_with_eager_without_graph_breaks(name):
    import torch._dynamo as dynamo

    fused, _, x = fused_and_separate()
    eager, compiled = fused.float(), copy.deepcopy(fused).float()
    x = x.float()
    mapping = psiopt.find_scale_invariant(eager, x)
    opt_e, opt_c = (psiopt.create_optimizer(m, name, mapping=mapping) for m in (eager, compiled))
    step = torch.compile(opt_c.step)
    dynamo.reset()
    try:
        for _ in range(3):
            for model, fn in ((eager, opt_e.step), (compiled, step)):
                model.zero_grad()
                model(x).square().sum().backward()
                fn()
        torch.testing.assert_close(qkv(compiled), qkv(eager), rtol=1e-5, atol=1e-6)
        compiled.zero_grad()
        compiled(x).square().sum().backward()
        report = dynamo.explain(opt_c.step)()
    finally:
        dynamo.reset()
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]


@pytest.mark.parametrize("name", ["psi-sgdm", "adams"])
def test_a_part_of_every_row_steps_as_the_whole_grouping(name):
    model, _, x = fused_and_separate()
    mapping = psiopt.find_scale_invariant(model, x)
    whole = copy.deepcopy(model)
    mapping_all = {**mapping, "block.attn.qkv.weight": "tensor[0:48]"}
    for m, mp in ((model, mapping_all), (whole, {**mapping, "block.attn.qkv.weight": "tensor"})):
        train(m, psiopt.create_optimizer(m, name, mapping=mp), x)
    assert torch.equal(qkv(model), qkv(whole))


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_a_cancelled_part_is_an_ordinary_group_for_the_rules_checks(name):
    # nn.MultiheadAttention's key bias part is cancelled; its group takes the others' settings
    # (weight decay included), which an invariant rule's own checks must not refuse
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.m = nn.LayerNorm(16), nn.MultiheadAttention(16, 2, batch_first=True)
            self.o = nn.Linear(16, 3)

        def forward(self, x):
            h = self.ln(x)
            return self.o(self.m(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 16)
    opt = psiopt.create_optimizer(model, name, x, weight_decay=5e-4)
    assert "cancelled[16:32]" in [g["grouping"] for g in opt.param_groups]
    bias = model.m.in_proj_bias
    before = bias.detach().clone()
    model(x).square().sum().backward()
    opt.step()
    if not REGISTRY[name].baseline:  # (torch.optim's rules train the tensor as one)
        assert torch.equal(bias[16:32], before[16:32])
    assert not torch.equal(bias[:16], before[:16])


@pytest.mark.parametrize("schedule", ["plateau", "by hand"])
def test_a_decay_written_into_lr_reaches_the_rest_as_the_part(schedule):
    fused, separate, x = fused_and_separate()
    results = []
    for model in (fused, separate):
        opt = psiopt.create_optimizer(model, "psi-sgdm", x)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=0)
        for _ in range(STEPS):
            train(model, opt, x, steps=1)
            if schedule == "plateau":
                plateau.step(1.0)  # never improves: lr × 0.3 each step after the first
            else:
                for g in opt.param_groups:
                    g["lr"] *= 0.5
        results.append(qkv(model))
    assert torch.allclose(*results, rtol=0, atol=1e-12)


def test_param_groups_settings_of_the_others_reach_the_rest():
    model, _, x = fused_and_separate()
    groups = psiopt.param_groups(model, x, lr=0.05, weight_decay=5e-4, invariant_lr=0.2)
    part = next(g for g in groups if g["grouping"] == "groups:4[0:32]")
    assert (part["lr"], part["rest_lr"], part["rest_weight_decay"]) == (0.2, 0.05, 5e-4)
    opt = psiopt.SGDG(groups)
    assert opt._rest_settings(opt.param_groups[0])["lr"] == 0.05


def test_a_keyword_of_create_optimizer_wins_over_the_groups_rest_settings():
    """``create_optimizer(groups, name, lr=…)``: a keyword wins over what the groups set, for the
    rows outside a part too (param_groups wrote ``rest_lr``/``rest_weight_decay``)."""
    model, _, x = fused_and_separate()
    groups = psiopt.param_groups(model, x, lr=0.05, weight_decay=5e-4)
    opt = psiopt.create_optimizer(groups, "psi-sgdm", lr=0.01, weight_decay=1e-3, momentum=0.5)
    part = next(g for g in opt.param_groups if g["grouping"] == "groups:4[0:32]")
    other = next(g for g in opt.param_groups if g["grouping"] is None)
    rest = opt._rest_settings(part)
    assert (rest["lr"], rest["weight_decay"], rest["momentum"]) == \
        (other["lr"], other["weight_decay"], other["momentum"]) == (0.01, 1e-3, 0.5)
    unset = psiopt.create_optimizer(psiopt.param_groups(model, x, lr=0.05), "psi-sgdm")
    part = next(g for g in unset.param_groups if g["grouping"] == "groups:4[0:32]")
    assert unset._rest_settings(part)["lr"] == 0.05  # (no keyword: the group's own setting)
    for name in ("sgd", "adamw", "b-sgd"):  # a baseline trains the tensor with the others' settings
        groups = psiopt.param_groups(model, x, lr=0.05, invariant_lr=0.2, weight_decay=5e-4)
        opt = psiopt.create_optimizer(groups, name)
        part = next(g for g in opt.param_groups if g["grouping"] == "groups:4[0:32]")
        assert (part["lr"], part["weight_decay"]) == (0.05, 5e-4)
        assert not any(k.startswith("rest_") for k in part)
    groups = psiopt.param_groups(model, x)  # no rest_ settings: a baseline takes the others'
    part = next(g for g in groups if g["grouping"] == "groups:4[0:32]")
    part["lr"] = 0.05
    opt = psiopt.create_optimizer(groups, "sgd")
    lrs = {g["grouping"]: g["lr"] for g in opt.param_groups}
    assert lrs["groups:4[0:32]"] == lrs[None] != 0.05
    part["rest_lr"] = torch.tensor(0.01)  # a tensor lr: torch's Adam then takes it (not foreach)
    opt = psiopt.create_optimizer(groups, "adam")
    train(model, opt, x, steps=1)
