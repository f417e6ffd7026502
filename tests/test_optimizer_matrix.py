"""Every registered optimizer × a table of settings, in the spirit of torch's OptimizerInfo.

(a) Reference vs vectorized paths.  For each ``(optimizer, setting)`` pair of ``TABLE``, two
identical float64 copies of ``MatrixNet`` are trained for ``STEPS`` steps in a closed loop, one
with ``foreach=False`` and one with ``foreach=True``.  ``MatrixNet`` has every grouping kind:
``channel`` (BatchNorm, per-channel GroupNorm, InstanceNorm), ``groups:4`` (GroupNorm),
``tensor`` (LayerNorm), ``channel@1`` (ConvTranspose→BatchNorm) and three ``cancelled`` biases.
Parameters, buffers and the whole optimizer state (every key of ``opt.state[p]``, step counters
included) must agree to 1e-12 relative; every trained parameter must have moved (invariant ones
in direction, since the sphere methods unit-normalise rows at construction); cancelled biases and
frozen layers must be bit-identical to their initial values.  Settings: defaults, momentum on
the other / invariant groups, Adam betas, weight decay on the other groups, invariant weight
decay, a frozen invariant layer, steps where some gradients (invariant and not) are ``None``,
and PSI-SGD(M) with ``fixed_norm=False`` and a guard that fires.  Pairs outside the table must
raise ``ValueError`` (``REJECTED`` lists the rejections of ``invariant_zero``), so the table is
exhaustive.

(b) No host synchronisation in ``step()``.  The model is moved to the ``meta`` device and every
optimizer steps under :func:`host_syncs`, which records any read of a meta tensor to the host
(``aten._local_scalar_dense``: ``.item()``, ``float()``, ``if tensor:``; ``aten.equal``), any
copy between the host and the meta device (``aten._to_copy``, ``aten.copy_``,
``aten._foreach_copy_``), any tensor lifted onto the meta device (``aten.lift_fresh``), and any
tensor built from Python data for the meta device (``torch.tensor``, ``torch.as_tensor``,
``Tensor.new_tensor``: on meta these dispatch no copy at all, so a ``TorchFunctionMode`` catches
them).  Reading the optimizers' own CPU step counters is allowed, as in torch.optim.  The
detector is proven live by subclasses that leak on purpose and by ``check_finite=True``.
"""

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import psiopt
from psiopt.optim import base
from psiopt.optim.geometry import CANCELLED, RowLayout, is_invariant, norm, rows

STEPS = 8
RTOL, ATOL = 1e-12, 1e-14
FROZEN = "grouped.weight"  # the invariant layer frozen by the "frozen-layer" setting
#: step index -> parameters whose gradient is set to None before that step ("missing-grads")
DROPS = {2: ("conv.weight", "head.bias"), 4: ("fc.weight", "up.weight", "bn.weight"),
         5: ("conv.weight", "mix.weight")}


# -- the model ---------------------------------------------------------------------------------------
class MatrixNet(nn.Module):
    """Tiny float64 network with every grouping kind (see ``GROUPINGS``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)  # bias cancelled by the BatchNorm
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, bias=False)
        self.bn_up = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 8, 3, bias=False)
        self.gn = nn.GroupNorm(4, 8)
        self.mix = nn.Conv2d(8, 8, 1)  # bias cancelled by the per-channel GroupNorm
        self.gn_mix = nn.GroupNorm(8, 8)
        self.inst = nn.Conv2d(8, 8, 1)  # bias cancelled by the InstanceNorm
        self.inn = nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8 * 5 * 5, 12, bias=False)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn_up(self.up(x)))
        x = F.relu(self.gn(self.grouped(x)))
        x = F.relu(self.gn_mix(self.mix(x)))
        x = F.relu(self.inn(self.inst(x)))
        x = F.relu(self.ln(self.fc(x.flatten(1))))
        return self.head(x)


GROUPINGS = {"conv.weight": "channel", "conv.bias": CANCELLED, "up.weight": "channel@1",
             "grouped.weight": "groups:4", "mix.weight": "channel", "mix.bias": CANCELLED,
             "inst.weight": "channel", "inst.bias": CANCELLED, "fc.weight": "tensor"}


def matrix_net(frozen=False):
    torch.manual_seed(0)
    model = MatrixNet().double()
    if frozen:
        model.get_parameter(FROZEN).requires_grad_(False)
    return model


def matrix_data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# -- the table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    hyper: dict = field(default_factory=dict)
    frozen: bool = False  # FROZEN.requires_grad_(False) before building the optimizer
    drop_grads: bool = False  # .grad = None on the steps and parameters of DROPS
    rtol: float = RTOL  # between paths that sum in different orders


_GUARD = {"fixed_norm": False, "max_norm": 0.5, "guard_every": 2}
SETTINGS = {
    "defaults": Setting(),
    "other-momentum": Setting({"other_momentum": 0.9}),
    "invariant-momentum": Setting({"invariant_momentum": 0.5}),
    "betas": Setting({"betas": (0.8, 0.95)}),
    "weight-decay": Setting({"weight_decay": 1e-3}),
    "invariant-weight-decay": Setting({"invariant_weight_decay": 1e-2}),
    "frozen-layer": Setting(frozen=True),
    "missing-grads": Setting(drop_grads=True),
    "psi-guard": Setting(_GUARD),
    "psi-guard-missing-grads": Setting(_GUARD, drop_grads=True),
    # coupled L2 scales with ‖w‖² under PSI (fc.weight: ‖w‖ ≈ 8, lr 1): 1e-2 diverges in 8 steps;
    # the step ‖w‖² lr g amplifies rounding: after 8 steps the reference and vectorized paths
    # differ by up to 4e-13 of |w| + 0.01, the fused kernels (their sums in another order) by up
    # to 9e-13 (one entry of fc.weight by 1.8e-12 of itself)
    "psi-literal-l2": Setting({"fixed_norm": False, "invariant_weight_decay": 1e-4}, rtol=1e-11),
}

_COMMON = ("defaults", "weight-decay", "frozen-layer", "missing-grads")
_SGD_MOMENTUM = ("other-momentum", "invariant-momentum")
_PSI = (*_COMMON, *_SGD_MOMENTUM, "psi-guard", "psi-guard-missing-grads", "psi-literal-l2")
#: optimizer -> the settings it accepts (every other setting must raise ValueError)
TABLE = {
    "sgd": (*_COMMON, *_SGD_MOMENTUM, "invariant-weight-decay"),
    "adam": (*_COMMON, "betas", "invariant-weight-decay"),
    "adamw": (*_COMMON, "betas", "invariant-weight-decay"),
    "psi-sgd": _PSI,
    "psi-sgdm": _PSI,
    "un-sgd": (*_COMMON, "other-momentum"),
    "b-sgd": (*_COMMON, *_SGD_MOMENTUM, "invariant-weight-decay"),
    "psgd": (*_COMMON, *_SGD_MOMENTUM),
    "sgdg": (*_COMMON, *_SGD_MOMENTUM),
    "adamg": (*_COMMON, "betas"),
    "adams": (*_COMMON, "betas", "invariant-weight-decay"),
    "adamsrt": (*_COMMON, "betas", "invariant-weight-decay"),
    "sgdmrt": (*_COMMON, *_SGD_MOMENTUM, "invariant-weight-decay"),
    "adamg-star": (*_COMMON, "other-momentum", "invariant-weight-decay"),
}
#: settings an optimizer rejects on its invariant groups (class attribute ``invariant_zero``)
REJECTED = {
    "un-sgd": ("invariant-momentum", "invariant-weight-decay"),
    "psgd": ("invariant-weight-decay",),
    "sgdg": ("invariant-weight-decay",),
    "adamg": ("invariant-weight-decay",),
    "adamg-star": ("invariant-momentum",),
}
#: settings refused because of another setting (PSI: coupled L2 needs fixed_norm=False)
CONFLICTS = {"psi-sgd": ("invariant-weight-decay",), "psi-sgdm": ("invariant-weight-decay",)}
CASES = [(name, setting) for name, settings in TABLE.items() for setting in settings]
OUTSIDE = [(name, setting) for name in TABLE for setting in SETTINGS if setting not in TABLE[name]]


def case_id(case):
    return "-".join(case)


def setting_key(setting):
    """The hyperparameter a setting sets, without its ``invariant_`` / ``other_`` prefix."""
    return next(iter(SETTINGS[setting].hyper)).removeprefix("invariant_").removeprefix("other_")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- helpers -----------------------------------------------------------------------------------------
def build(name, setting, foreach, **extra):
    """A fresh model (optionally frozen) and its optimizer from the registry."""
    x, _ = matrix_data()
    model = matrix_net(frozen=setting.frozen)
    opt = psiopt.create_optimizer(model, name, x, foreach=foreach, **{**setting.hyper, **extra})
    return model, opt


def dropped(setting, step):
    return DROPS.get(step, ()) if setting.drop_grads else ()


def train(model, opt, setting, steps=STEPS):
    x, y = matrix_data()
    params = dict(model.named_parameters())
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name in dropped(setting, step):
            params[name].grad = None
        opt.step()


def direction(t, grouping):
    v = rows(t.detach(), grouping)
    return v / norm(v)


def assert_same_state(opt_a, model_a, opt_b, model_b, rtol=RTOL):
    """Every key of ``opt.state[p]`` for every parameter, matched by parameter name."""
    pairs = list(zip(model_a.named_parameters(), model_b.named_parameters()))
    with_state = [[name for name, p in model.named_parameters() if p in opt.state and opt.state[p]]
                  for opt, model in ((opt_a, model_a), (opt_b, model_b))]
    assert with_state[0] == with_state[1]
    for (name, pa), (_, pb) in pairs:
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sorted(sa) == sorted(sb), name
        for key in sa:
            if isinstance(sa[key], Tensor):
                torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=ATOL,
                                           msg=lambda m, n=name, k=key: f"state[{n}][{k!r}]: {m}")
            else:
                assert sa[key] == sb[key], (name, key)


def assert_same_model(model_a, model_b, rtol=RTOL):
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def assert_moved(model, initial, frozen):
    """Trained parameters moved (invariant ones in direction); cancelled and frozen ones did not."""
    for name, p in model.named_parameters():
        grouping = GROUPINGS.get(name)
        if grouping == CANCELLED or (frozen and name == FROZEN):
            assert torch.equal(p, initial[name]), f"{name} changed"
        elif is_invariant(grouping):
            turn = (direction(p, grouping) - direction(initial[name], grouping)).abs().max()
            assert turn > 1e-6, f"{name} did not turn ({float(turn):.2e})"
        else:
            assert (p - initial[name]).abs().max() > 1e-8, f"{name} did not move"


def expected_steps(setting, name):
    return STEPS - sum(name in dropped(setting, step) for step in range(STEPS))


# -- (a) reference vs vectorized ----------------------------------------------------------------------
def test_table_lists_every_registered_optimizer():
    assert list(TABLE) == psiopt.list_optimizers()
    assert set(REJECTED) | set(CONFLICTS) <= set(TABLE)
    assert all(s in SETTINGS for settings in [*TABLE.values(), *REJECTED.values(), *CONFLICTS.values()]
               for s in settings)
    for name, spec in psiopt.REGISTRY.items():
        rejected = {setting_key(s) for s in REJECTED.get(name, ())}
        assert rejected == set(getattr(spec.cls, "invariant_zero", ())), name


def test_matrix_net_has_every_grouping_kind():
    x, _ = matrix_data()
    assert psiopt.find_scale_invariant(matrix_net(), x) == GROUPINGS
    frozen = psiopt.find_scale_invariant(matrix_net(frozen=True), x)
    assert frozen == {k: v for k, v in GROUPINGS.items() if k != FROZEN}


@pytest.mark.parametrize("case", OUTSIDE, ids=case_id)
def test_settings_outside_the_table_are_rejected_before_touching_the_model(case):
    name, setting = case
    hyper, key = SETTINGS[setting].hyper, setting_key(setting)
    invariant_zero = setting in REJECTED.get(name, ()) + CONFLICTS.get(name, ())
    model, (x, _) = matrix_net(), matrix_data()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"invalid {key} for an invariant group" if invariant_zero
                       else "unknown hyperparameter"):
        psiopt.create_optimizer(model, name, x, **hyper)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


PATHS = [(*case, "vectorized") for case in CASES] + [
    (*case, "fused") for case in CASES if getattr(psiopt.REGISTRY[case[0]].cls, "fused_rule", False)]


@pytest.mark.parametrize("case", PATHS, ids=case_id)
def test_reference_and_vectorized_paths_agree(case, kernel_calls):
    """The vectorized path (``foreach=True``) and, for the rules that have one, the fused
    kernels (``fused=True``; MatrixNet's ``channel@1`` weight, whose rows are not contiguous,
    takes the vectorized path) against the reference path."""
    name, setting, path = case[0], SETTINGS[case[1]], case[2]
    model_a, opt_a = build(name, setting, False)
    model_b, opt_b = build(name, setting, True) if path == "vectorized" else \
        build(name, setting, None, fused=True)
    initial = {n: p.detach().clone() for n, p in matrix_net().named_parameters()}
    train(model_a, opt_a, setting)
    train(model_b, opt_b, setting)

    assert_same_model(model_a, model_b, setting.rtol)
    assert_same_state(opt_a, model_a, opt_b, model_b, setting.rtol)
    assert_moved(model_b, initial, setting.frozen)
    assert bool(kernel_calls) == (path == "fused")
    for pname, p in model_b.named_parameters():
        state = opt_b.state.get(p, {})
        if not p.requires_grad:
            assert not state, f"{pname} has optimizer state"
        elif GROUPINGS.get(pname) == CANCELLED and not psiopt.REGISTRY[name].baseline:
            # never stepped, and its state says so (checkpoints want state for every parameter)
            assert state.keys() == {"step"} and float(state["step"]) == 0.0, pname
        elif "step" in state:  # a parameter without a gradient is skipped, not stepped with zero
            assert float(state["step"]) == expected_steps(setting, pname), pname


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in ("defaults", "invariant-momentum",
                                                                "missing-grads")], ids=case_id)
def test_fused_reductions_agree_with_the_sequential_ones(case, monkeypatch):
    """The forms FSDP2 layouts take (every per-group sum of a step from one reduction, the later
    ones derived: ``RowLayout.fuse_reductions``) equal the sequential ones one process takes."""
    name, setting = case[0], SETTINGS[case[1]]
    model_a, opt_a = build(name, setting, True)
    train(model_a, opt_a, setting)
    monkeypatch.setattr(RowLayout, "_fuse", True)
    model_b, opt_b = build(name, setting, True)
    train(model_b, opt_b, setting)
    assert_same_model(model_a, model_b)
    assert_same_state(opt_a, model_a, opt_b, model_b)


@pytest.mark.parametrize("name", ["psi-sgd", "psi-sgdm"])
def test_psi_guard_setting_really_fires(name):
    """Groups that start above ``max_norm`` are divided by their norm at every guard step (the last
    one just before the last update), so they end near radius 1; the other groups keep the radius
    they have without the guard (Yi Theorem 1: the guard does not change the directions)."""
    setting = SETTINGS["psi-guard"]
    guarded, opt = build(name, setting, True)
    free, free_opt = build(name, setting, True, max_norm=1e4)
    train(guarded, opt, setting)
    train(free, free_opt, setting)
    fired = 0
    for pname, grouping in GROUPINGS.items():
        if is_invariant(grouping):
            start, after, without = (norm(rows(m.get_parameter(pname).detach(), grouping)).flatten()
                                     for m in (matrix_net(), guarded, free))
            above = start > setting.hyper["max_norm"]
            assert ((after[above] > 0.95) & (after[above] < 1.5)).all(), pname
            torch.testing.assert_close(after[~above], without[~above], rtol=1e-3, atol=0)
            fired += int(((after - without).abs() > 0.1)[above].sum())
    assert fired > 10


# -- (b) no host synchronisation in step() ------------------------------------------------------------
aten = torch.ops.aten
_READS = {aten._local_scalar_dense, aten.equal}
_COPIES = {aten._to_copy, aten.copy_, aten._foreach_copy_}
_LIFTS = {aten.lift_fresh, aten.lift_fresh_copy}
_FROM_DATA = {torch.tensor, torch.as_tensor, Tensor.new_tensor}


def _devices(tree):
    return {t.device for t in tree_leaves(tree) if isinstance(t, Tensor)}


def _transfers(func, args, kwargs):
    """``(source, destination)`` devices of every copy a copy op makes."""
    if func.overloadpacket is aten._to_copy:
        return [(args[0].device, torch.device(kwargs.get("device") or args[0].device))]
    dst, src = tree_leaves(args[0]), tree_leaves(args[1])  # copy_(dst, src), _foreach_copy_
    return [(b.device, a.device) for a, b in zip(dst, src) if isinstance(b, Tensor)]


@dataclass
class Recording:
    found: list = field(default_factory=list)  # host synchronisations / transfers, described
    ops: int = 0  # aten ops on the device: proof that the step really ran under the recorder
    host_reads: int = 0  # allowed reads of CPU tensors (step counters)


class _DeviceOps(TorchDispatchMode):
    """Records aten ops that read a ``device`` tensor to the host or move host data onto ``device``.

    On the meta device a read cannot run: it is recorded and answered with a placeholder, so one
    step reports every offending op instead of stopping at the first."""

    def __init__(self, device, record):
        super().__init__()
        self.device, self.record = device, record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet, meta = func.overloadpacket, self.device.type == "meta"
        self.record.ops += self.device in _devices((args, kwargs))
        self.record.host_reads += packet in _READS and self.device not in _devices(args)
        if packet in _READS and self.device in _devices(args):
            self.record.found.append(f"{func} reads a {self.device} tensor to the host")
            if meta:
                return True if packet is aten.equal or args[0].dtype == torch.bool else 1
        if packet in _COPIES:
            moves = [(s, d) for s, d in _transfers(func, args, kwargs)
                     if {s, d} == {torch.device("cpu"), self.device}]
            self.record.found += [f"{func} copies {s} -> {d}" for s, d in moves]
            if meta and any(s == self.device for s, _ in moves):  # no data: placeholder on the host
                if packet is aten._to_copy:
                    return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
                return args[0]
        out = func(*args, **kwargs)
        if packet in _LIFTS and self.device in _devices(out):
            self.record.found.append(f"{func} lifts a tensor onto {self.device}")
        return out


class _FromPythonData(TorchFunctionMode):
    """Records tensors built from Python data for ``device`` (on meta this dispatches no copy)."""

    def __init__(self, device, record):
        super().__init__()
        self.device, self.record = device, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA:
            method = func is Tensor.new_tensor
            target = kwargs.get("device") or (args[0].device if method else None)
            data = args[1] if method else args[0]
            if target is not None and torch.device(target) == self.device and not isinstance(data, Tensor):
                self.record.found.append(f"{func.__qualname__}(<Python data>, device={self.device})")
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs(device, record):
    """Add to ``record`` the host synchronisations / transfers with ``device`` made inside."""
    device = torch.device(device)
    with _FromPythonData(device, record), _DeviceOps(device, record):
        yield record


def meta_model(setting):
    """MatrixNet moved to meta, and the mapping discovered on its CPU copy."""
    x, _ = matrix_data()
    model = matrix_net(frozen=setting.frozen)
    mapping = psiopt.find_scale_invariant(model, x)
    return model.to("meta"), mapping


@contextlib.contextmanager
def no_running_stats_warning():
    with warnings.catch_warnings():  # meta: running statistics cannot be linked without a CPU pass
        warnings.filterwarnings("ignore", message="param_groups: without example_inputs")
        yield


def meta_steps(model, opt, setting, steps=4, record_from=1) -> Recording:
    """Step on meta gradients; record from step ``record_from`` on (the first step may create
    state lazily, so by default it is not recorded)."""
    torch.manual_seed(0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    record = Recording()
    for step in range(steps):
        for name, p in params:
            p.grad = None if name in dropped(setting, step) else torch.randn_like(p)
        with host_syncs("meta", record) if step >= record_from else contextlib.nullcontext():
            opt.step()
    return record


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_does_not_synchronise_with_the_device(case):
    name, setting = case[0], SETTINGS[case[1]]
    model, mapping = meta_model(setting)
    with no_running_stats_warning():
        opt = psiopt.create_optimizer(model, name, mapping=mapping, foreach=True, **setting.hyper)
    record = meta_steps(model, opt, setting)
    assert record.found == []
    assert record.ops > 0


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_reference_path_does_not_synchronise_either(name):
    model, mapping = meta_model(SETTINGS["defaults"])
    with no_running_stats_warning():
        opt = psiopt.create_optimizer(model, name, mapping=mapping, foreach=False)
    record = meta_steps(model, opt, SETTINGS["defaults"])
    assert record.found == []
    assert record.ops > 0


#: deliberate leak inside step() -> what the detector must report
LEAKS = {
    "float(p.sum())": (lambda p: float(p.sum()), "_local_scalar_dense"),
    "if tensor:": (lambda p: bool(p.sum() > 0), "_local_scalar_dense"),
    "torch.equal(p, p)": (lambda p: torch.equal(p, p), "aten.equal"),
    "p.tolist()": (lambda p: p.tolist(), "copies meta -> cpu"),
    "torch.tensor([1.0]).to(p.device)": (
        lambda p: p.add_(torch.tensor([1.0], dtype=p.dtype).to(p.device)), "copies cpu -> meta"),
    "p.copy_(cpu tensor)": (lambda p: p.copy_(torch.zeros(p.shape, dtype=p.dtype)), "copies cpu -> meta"),
    "torch._foreach_copy_([p], [cpu tensor])": (
        lambda p: torch._foreach_copy_([p], [torch.zeros(p.shape, dtype=p.dtype)]), "copies cpu -> meta"),
    "torch.tensor(1.0, device=p.device)": (
        lambda p: p.mul_(torch.tensor(1.0, dtype=p.dtype, device=p.device)), "tensor(<Python data>"),
    "p.new_tensor([2.0])": (lambda p: p.mul_(p.new_tensor([2.0])), "new_tensor(<Python data>"),
}


@pytest.mark.parametrize("leak", LEAKS)
def test_detector_catches_a_deliberate_leak(leak):
    action, report = LEAKS[leak]

    class Leaky(psiopt.PSISGD):
        def _invariant(self, group, index, params, grads):
            action(params[0])
            super()._invariant(group, index, params, grads)

    model, mapping = meta_model(SETTINGS["defaults"])
    with no_running_stats_warning():
        opt = Leaky(psiopt.param_groups(model, mapping=mapping))
    found = meta_steps(model, opt, SETTINGS["defaults"], steps=2, record_from=0).found
    assert found and all(report in f for f in found), (leak, found)


def test_detector_sees_the_documented_sync_of_check_finite():
    model, mapping = meta_model(SETTINGS["defaults"])
    with no_running_stats_warning():
        opt = psiopt.create_optimizer(model, "psi-sgd", mapping=mapping, check_finite=True)
    found = meta_steps(model, opt, SETTINGS["defaults"], steps=2, record_from=0).found
    assert any("_local_scalar_dense" in f for f in found), found


def test_cpu_step_counters_are_allowed():
    """torch.optim.Adam reads its CPU ``step`` tensors each step: not a device synchronisation."""
    model, _ = meta_model(SETTINGS["defaults"])
    opt = torch.optim.Adam(model.parameters(), foreach=False)
    record = meta_steps(model, opt, SETTINGS["defaults"], steps=3)
    assert record.found == [] and record.host_reads > 0
    assert all(s["step"].device.type == "cpu" for s in opt.state.values())


def test_frozen_and_dropped_parameters_include_invariant_ones():
    assert is_invariant(GROUPINGS[FROZEN])
    names = {n for ns in DROPS.values() for n in ns}
    assert any(is_invariant(GROUPINGS.get(n)) for n in names)
    assert any(n not in GROUPINGS for n in names)


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_first_step_with_counters_on_the_device_does_not_synchronise(name, monkeypatch):
    """A tensor ``lr`` on the parameters' device puts the step counters there (as on CUDA, see
    ``base.counters_on_device``; here the meta device stands for it): the first step, which
    makes every counter and buffer, is recorded too.  Counters were made as
    ``torch.tensor(0.0, device=...)``, a copy from the host that CUDA's synchronisation
    detector flags (``tests/test_cuda.py``'s step with a CUDA ``lr``)."""
    if name in ("sgd", "adam", "adamw", "b-sgd"):
        pytest.skip("torch.optim's own step (an eager tensor lr: torch reads it)")
    monkeypatch.setattr(base, "counters_on_device", lambda group, p: not p.is_cpu)
    model, mapping = meta_model(SETTINGS["defaults"])
    lr = psiopt.REGISTRY[name].invariant.get("lr", 0.1)
    with no_running_stats_warning():  # (the invariant groups: torch's capturable Adam of the
        groups = [g for g in psiopt.param_groups(model, mapping=mapping)  # others takes no meta)
                  if is_invariant(g.get("grouping"))]
        opt = psiopt.create_optimizer(groups, name, lr=torch.tensor(lr, device="meta"))
    record = meta_steps(model, opt, SETTINGS["defaults"], steps=2, record_from=0)
    assert record.found == []
    assert any(s["step"].is_meta for s in opt.state.values() if "step" in s) or all(
        "step" not in s for s in opt.state.values())
