"""Two ranks (gloo, CPU, spawned processes) against one process, float64.

FSDP2 (``fully_shard``: every parameter a DTensor sharded on dimension 0) and DDP, for every
registered optimizer, on a network whose groups are whole on a rank (conv→GroupNorm(C):
"channel"), span ranks ("groups:2" of a conv, "tensor" of a linear→LayerNorm) and are cancelled
(the conv bias before GroupNorm(C)).  GroupNorm and LayerNorm are per sample, so each rank's
half of the batch gives, averaged over ranks, the gradient of the whole batch.  A BatchNorm network
(conv→BatchNorm2d, linear→BatchNorm1d) under DDP with :class:`psiopt.SyncBatchNorm` (statistics of
the global batch) must equal one process with plain BatchNorm too, running statistics included.
A transformer of two blocks under DDP and FSDP2 trains groupings of part of a tensor: the q and k
rows of a fused qkv projection under per-head QK-norm ("groups:4[0:32]") and the key part of a
fused qkv bias ("cancelled[16:32]"), the other rows with the ordinary rule.  Under FSDP2 the
(48, 16) qkv weight is split 24 | 24 between the ranks, so the part ends inside rank 1's shard
and rank 0 holds no row of its rest; "fsdp-parts-edges" places parts by hand where a rank holds
no row of the part (a "channel" and a "tensor" part), where a group of a part that starts inside
a rank's shard spans the ranks, and where the rest lies on both sides of the part (the equality
of two ranks and one process holds for any grouping, invariant or not).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import psiopt
from psiopt.experiments.train import _free_port, close_process_group

STEPS = 8
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.GroupNorm(2, 6), nn.ReLU(),   # groups:2, split 3 | 3
        nn.Conv2d(6, 5, 3), nn.GroupNorm(5, 5), nn.ReLU(),              # channel (5 = 3 + 2)
        nn.Flatten(), nn.Linear(5 * 4 * 4, 7, bias=False), nn.LayerNorm(7), nn.ReLU(),  # tensor
        nn.Linear(7, 3)).double()


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),                    # channel, cancelled bias
        nn.Flatten(), nn.Linear(6 * 6 * 6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 3)).double()


def parts_net() -> nn.Module:
    from psiopt.experiments.zoo import Block

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Block(qk_norm="ln", bias=False)  # qkv.weight: groups:4[0:32]
            self.b = Block()  # qkv.bias: cancelled[16:32]
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.b(self.a(x)).mean(1))

    torch.manual_seed(0)
    return Net().double()


#: parts of "fsdp-parts-edges", placed by hand on parts_net (rows 0..23 on rank 0, 24..47 on 1)
EDGES = {
    "a.attn.qkv.weight": "groups:2[0:32]",    # the k group (rows 16..31) spans the ranks
    "a.attn.k_norm.bias": "cancelled",
    "a.mlp.0.weight": "channel[40:64]",       # (64, 16), 32 | 32: none on rank 0
    "a.mlp.2.weight": "groups:2[2:6]",        # (16, 64), 8 | 8: on rank 0 only, rest both sides
    "b.attn.qkv.weight": "groups:2[4:36]",    # from inside rank 0's shard; group 1 spans
    "b.attn.qkv.bias": "cancelled[16:32]",
    "b.mlp.0.weight": "tensor[40:64]",        # none on rank 0, one group across rank 1's rows
}
PARTS = ("ddp-parts", "fsdp-parts", "fsdp-parts-edges")


def data(mode=None):
    gen = torch.Generator().manual_seed(1)
    shape = (5, 16) if mode in PARTS else (3, 8, 8)
    return (torch.randn(STEPS, 8, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (STEPS, 8), generator=gen))


def train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def full(model) -> dict:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()
            for n, p in tensors}


def _worker(rank, world, port, mode, names, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    found = {}  # what discovery finds on the wrapped network: the same for every name (test time)
    results = {name: _compare(rank, mode, name, found) for name in names}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    close_process_group()


def _compare(rank, mode, name, found: dict) -> dict:
    """Largest relative difference between ``mode`` on two ranks and one process; ``found``: the
    groups discovery finds on the wrapped network, found at the first call."""
    xs, ys = data(mode)
    half = slice(rank * 4, rank * 4 + 4)
    make = bn_net if mode == "ddp-syncbn" else parts_net if mode in PARTS else net
    mapping = EDGES if mode == "fsdp-parts-edges" else None
    ref = make()
    ref_opt = _optimizer(ref, name, xs[0], mapping)
    train(ref, ref_opt, xs, ys)
    model = psiopt.convert_sync_batchnorm(make()) if mode == "ddp-syncbn" else make()
    fsdp = mode.startswith("fsdp")
    wrapped = _sharded(model) if fsdp else nn.parallel.DistributedDataParallel(model)
    if "mapping" not in found:
        found["mapping"] = mapping or psiopt.find_scale_invariant(wrapped, xs[0])
    opt = _optimizer(wrapped, name, xs[0][half], mapping)
    from psiopt.optim import kernels

    real, calls = kernels.run, []

    def counted(kernel, ws, *args, **kwargs):  # the kernel steps taken (True: it stepped)
        done = real(kernel, ws, *args, **kwargs)
        calls.extend([kernel] if done else [])
        return done

    kernels.run = counted
    try:
        train(wrapped, opt, xs[:, half], ys[:, half])
    finally:
        kernels.run = real
    everyone = [None] * dist.get_world_size()  # each rank's count
    dist.all_gather_object(everyone, len(calls))
    got, want = full(wrapped), full(ref)
    prefix = "" if fsdp else "module."
    errs = {n: float((got[prefix + n] - w).abs().max() / w.abs().max().clamp_min(1e-12))
            for n, w in want.items()}
    worst = max(errs, key=errs.get)
    return {"error": errs[worst], "worst": worst, "mapping": found["mapping"], "kernel_steps": everyone}


#: NormPolicy (issue 25) on torch.optim rules built on psiopt.optimizer_groups:
#: "<inner>+<policy>[+project]", every policy with and without projection, AdamW and SGD-momentum
POLICY_CASES = [f"{inner}+{policy}{extra}" for inner in ("adamw", "sgd")
                for policy in psiopt.optim.policies.POLICIES for extra in ("", "+project")]


def _optimizer(model, name, x, mapping=None):
    """A registered psiopt optimizer, or a ``POLICY_CASES`` norm policy (decay on every
    invariant group, parts included: ``"equilibrium"`` needs it)."""
    if "+" not in name:
        return psiopt.create_optimizer(model, name, x, mapping=mapping)
    inner, policy, *project = name.split("+")
    groups = psiopt.optimizer_groups(model, x, mapping=mapping, weight_decay=0.05,
                                     invariant_weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2) if inner == "adamw" else \
        torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return psiopt.NormPolicy(opt, policy, project=bool(project), model=model, example_inputs=x)


def _sharded(model):
    """FSDP2 on the test networks: each block (of parts_net) or layer with parameters (of net),
    then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in (model.a, model.b) if hasattr(model, "a") else (model[i] for i in (0, 3, 7, 10)):
        fully_shard(block)
    fully_shard(model)
    return model


def _checkpoint_worker(rank, world, port, names, root, out, modes):
    """For each mode of ``modes`` (one spawn for all, test time): train 2 steps (state made and
    stepped once), save with torch.distributed.checkpoint, train 2 more; a fresh model and
    optimizer loaded from the checkpoint must train the last 2 steps identically ("fsdp-parts":
    parts_net, whose parts' state and rest buffers are saved too)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {mode: _checkpoint_mode(rank, names, f"{root}/{mode}", mode) for mode in modes}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    close_process_group()


def _checkpoint_mode(rank, names, root, mode):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    xs, ys = data(mode)
    xs, ys = xs[:, rank * 4:rank * 4 + 4], ys[:, rank * 4:rank * 4 + 4]
    make = parts_net if mode == "fsdp-parts" else net
    results = {}
    for name in names:
        model = _sharded(make())
        opt = psiopt.create_optimizer(model, name, xs[0])
        train(model, opt, xs[:2], ys[:2])
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/{name}")
        train(model, opt, xs[2:4], ys[2:4])
        again = _sharded(make())
        opt2 = psiopt.create_optimizer(again, name, xs[0])
        msd, osd = get_state_dict(again, opt2)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=f"{root}/{name}")
        set_state_dict(again, opt2, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        train(again, opt2, xs[2:4], ys[2:4])
        a, b = full(model), full(again)
        results[name] = max(float((a[n] - b[n]).abs().max()) for n in a)
    return results


CHECKPOINT_MODES = ("fsdp", "fsdp-parts")


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """``_checkpoint_worker``'s results for every mode of ``CHECKPOINT_MODES``, one spawn."""
    root = tmp_path_factory.mktemp("dcp")
    out = root / "dcp.json"
    mp.spawn(_checkpoint_worker, args=(2, _free_port(), psiopt.list_optimizers(), str(root),
                                       str(out), CHECKPOINT_MODES), nprocs=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_optimizer_state_saved_with_distributed_checkpoint_continues_identically(checkpointed, mode):
    names = psiopt.list_optimizers()
    results = checkpointed[mode]
    print(json.dumps(results, indent=1), file=sys.stderr)
    assert set(results) == set(names)
    assert all(e == 0.0 for e in results.values()), results


#: all_reduce calls in one FSDP2 step of the test network, whose spanning groups are of two kinds
#: ("groups:2" of a conv, "tensor" of a linear; "channel" rows are whole): one per kind, summing
#: every per-group scalar of the step at once (RowLayout.sums).  SGDG/AdamG take three per kind
#: (<y,ĝ>, then ‖ĝ − t y‖² of the formed tangent, then the clipped tangent's sums: derived,
#: ‖ĝ‖² − t²(2 − ‖y‖²) cancels) and add Cho & Lee's penalty on the two sharded matrices.
COLLECTIVES = {"sgd": 0, "adam": 0, "adamw": 0, "b-sgd": 0, "psi-sgd": 2, "psi-sgdm": 2,
               "adams": 2, "un-sgd": 2, "sgdmrt": 2, "adamg-star": 2, "psgd": 2, "adamsrt": 2,
               "sgdg": 8, "adamg": 8}
#: NormPolicy (one layout for the float64 views: one all_reduce per reduction for every
#: parameter): the projection's <w, g> with ‖w‖² (which "fixed" reuses), the norms before
#: ("fixed") and after ("fixed", "unit"; "unit"'s preparation is done by then), "equilibrium"'s
#: ‖old‖² with <w, old>, then the norm of the tangential part
_POLICY_COLLECTIVES = {"free": 0, "free+project": 1, "fixed": 2, "fixed+project": 2, "unit": 1,
                       "unit+project": 2, "equilibrium": 2, "equilibrium+project": 3}
COLLECTIVES.update({f"{inner}+{case}": n for inner in ("adamw", "sgd")
                    for case, n in _POLICY_COLLECTIVES.items()})


def _collectives_worker(rank, world, port, out):
    """Count the collectives of one FSDP2 step (after two warm-up steps) of every optimizer
    and norm policy."""
    from torch.distributed.tensor.debug import CommDebugMode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    xs, ys = data()
    xs, ys = xs[:, rank * 4:rank * 4 + 4], ys[:, rank * 4:rank * 4 + 4]
    results, all_reduce = {}, dist.all_reduce
    for name in [*psiopt.list_optimizers(), *POLICY_CASES]:
        model = _sharded(net())
        opt = _optimizer(model, name, xs[0])
        train(model, opt, xs[:3], ys[:3])  # the third step's backward is left for the count
        sizes = []

        def counted(t, *args, sizes=sizes, **kwargs):
            sizes.append(t.numel())
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = counted
        try:
            with CommDebugMode() as comm:
                opt.step()
        finally:
            dist.all_reduce = all_reduce
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        results[name] = {"counts": counts, "sizes": sizes}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    close_process_group()


def test_collectives_per_step_are_all_reduces_of_per_group_scalars(tmp_path):
    out = tmp_path / "collectives.json"
    mp.spawn(_collectives_worker, args=(2, _free_port(), str(out)), nprocs=2)
    results = json.loads(out.read_text())
    print(json.dumps(results), file=sys.stderr)
    for name, r in results.items():
        assert set(r["counts"]) <= {"c10d.allreduce_"}, (name, r)  # nothing gathered
        assert sum(r["counts"].values()) == len(r["sizes"]) == COLLECTIVES[name], (name, r)
        scalars = [n for n in r["sizes"] if n <= 6 * 2]  # ≤ 6 sums per group (2 of groups:2)
        penalty = 2 if name in ("sgdg", "adamg") else 0  # the two sharded weights, zero-padded
        assert len(scalars) == len(r["sizes"]) - penalty, (name, r)


def spawn(mode, names, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    mp.spawn(_worker, args=(2, _free_port(), mode, names, str(out)), nprocs=2)
    return json.loads(out.read_text())


#: modes whose two tests (every optimizer, every norm policy) share one spawn (test time)
SHARED = ("ddp", "fsdp", "fsdp-parts")
#: the norm-policy cases of each shared mode: all under DDP; under FSDP2 the AdamW ones on net
#: and the SGD ones on parts_net (test time: every case runs under FSDP2 once, every policy on
#: both networks)
MODE_POLICIES = {"ddp": POLICY_CASES,
                 "fsdp": [c for c in POLICY_CASES if c.startswith("adamw+")],
                 "fsdp-parts": [c for c in POLICY_CASES if c.startswith("sgd+")]}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``spawn(mode, names)`` results by mode: every optimizer and every norm policy in one spawn
    for the modes of ``SHARED`` (each name trained from scratch, as in a spawn of its own)."""
    cache = {}

    def get(mode):
        if mode not in cache:
            names = [*psiopt.list_optimizers(), *MODE_POLICIES.get(mode, ())]
            cache[mode] = spawn(mode, names, tmp_path_factory.mktemp(mode))
        return cache[mode]

    return get


@pytest.mark.parametrize("mode", SHARED)
def test_two_ranks_equal_one_process_for_norm_policies_on_adamw_and_sgd(spawned, mode):
    """NormPolicy under DDP and FSDP2 (its per-group sums of sharded rows complete across ranks,
    "groups:2" and "tensor" groups and the parts of parts_net spanning them) equals one process,
    for every policy with and without projection, on AdamW and SGD-momentum (under FSDP2 each
    inner optimizer on one of the two networks: ``MODE_POLICIES``)."""
    results = spawned(mode)
    errors = {name: (r["error"], r["worst"]) for name, r in results.items() if name in POLICY_CASES}
    print(json.dumps(errors, indent=1), file=sys.stderr)
    assert set(errors) == set(MODE_POLICIES[mode])
    assert set(MODE_POLICIES["fsdp"]) | set(MODE_POLICIES["fsdp-parts"]) == set(POLICY_CASES)
    assert {c.split("+")[1] for c in MODE_POLICIES["fsdp"]} == \
        {c.split("+")[1] for c in MODE_POLICIES["fsdp-parts"]} == set(psiopt.optim.policies.POLICIES)
    assert all(e < 1e-6 for e, _ in errors.values()), errors


def _unit_refusal_worker(rank, world, port, out):
    """bn_net under FSDP2: "unit" (whose one-time unit-normalisation the BatchNorm1d statistics
    fed by the split rows of "4.weight" would have to follow) is refused when built, nothing
    changed; "fixed" (no statistics follow its rescaling) is taken and steps."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    xs, ys = data()
    x, y = xs[0][rank * 4:rank * 4 + 4], ys[0][rank * 4:rank * 4 + 4]
    model = bn_net()
    for i in (0, 4):
        fully_shard(model[i])
    fully_shard(model)
    before = full(model)
    result = {}
    try:
        psiopt.NormPolicy(torch.optim.AdamW(psiopt.optimizer_groups(model, x)), "unit", model=model,
                          example_inputs=x)
    except ValueError as e:
        result["unit"] = str(e)
    result["unchanged"] = all(torch.equal(v, full(model)[n]) for n, v in before.items())
    policy = psiopt.NormPolicy(torch.optim.AdamW(psiopt.optimizer_groups(model, x)), "fixed",
                               model=model, example_inputs=x)
    train(model, policy, x[None], y[None])
    result["fixed stepped"] = not torch.equal(before["4.weight"], full(model)["4.weight"])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    close_process_group()


def test_unit_policy_refuses_running_statistics_of_sharded_rows_when_built(tmp_path):
    out = tmp_path / "refusal.json"
    mp.spawn(_unit_refusal_worker, args=(2, _free_port(), str(out)), nprocs=2)
    result = json.loads(out.read_text())
    assert "BatchNorm1d" in result.get("unit", "") and "FSDP2" in result["unit"], result
    assert result["unchanged"] and result["fixed stepped"], result


@pytest.mark.parametrize("mode", ["fsdp", "ddp", "ddp-syncbn", *PARTS])
def test_two_ranks_equal_one_process_for_every_optimizer(spawned, mode):
    names = psiopt.list_optimizers()
    results = {name: r for name, r in spawned(mode).items() if name in names}
    assert set(results) == set(names)
    prefix = "" if mode.startswith("fsdp") else "module."
    expected = {f"{prefix}0.weight": "groups:2", f"{prefix}3.weight": "channel",
                f"{prefix}3.bias": "cancelled", f"{prefix}7.weight": "tensor"}
    if mode == "ddp-syncbn":
        expected = {"module.0.weight": "channel", "module.0.bias": "cancelled",
                    "module.4.weight": "channel"}
    if mode in ("ddp-parts", "fsdp-parts"):
        found = psiopt.find_scale_invariant(parts_net(), data(mode)[0][0])
        assert found["a.attn.qkv.weight"] == "groups:4[0:32]"
        assert found["b.attn.qkv.bias"] == "cancelled[16:32]"
        expected = {prefix + n: g for n, g in found.items()}
    if mode == "fsdp-parts-edges":
        expected = EDGES
    for name in names:
        assert results[name]["mapping"] == expected, name
    errors = {name: (r["error"], r["worst"]) for name, r in results.items()}
    print(json.dumps(errors, indent=1), file=sys.stderr)
    assert all(e < 1e-6 for e, _ in errors.values()), errors
    if mode == "fsdp":  # "3.weight"'s "channel" rows, whole on each rank: the fused kernels
        # (SGDG's and AdamG's penalty couples a tensor's rows across ranks: vectorized)
        fused = {name for name in names if getattr(psiopt.REGISTRY[name].cls, "fused_rule", False)}
        took = {name for name in names if all(results[name]["kernel_steps"])}  # every rank
        assert not {name for name in names if any(results[name]["kernel_steps"])} - took
        assert took == fused - {"sgdg", "adamg"}, (took, fused)


def _sharded_bn_net():
    """``(xs, ys, model, mapping)``: bn_net's data, the network under FSDP2 (its conv's and
    linear's rows split between the ranks) and its groupings."""
    from torch.distributed.fsdp import fully_shard

    xs, ys = data()
    model = bn_net()
    mapping = psiopt.find_scale_invariant(model, xs[0])
    for i in (0, 4):
        fully_shard(model[i])
    fully_shard(model)
    return xs, ys, model, mapping


def _bad_shard(rank) -> dict:
    """bn_net under FSDP2 (float64) with one row of "0.weight" (grouping "channel", whole rows on
    each rank) scaled by 1e200 on rank 1's shard only (its squared norm overflows): building
    PSI-SGD, which needs ‖w‖², raises on every rank (each rank's count summed over the mesh)."""
    xs, _, model, mapping = _sharded_bn_net()
    if rank == 1:
        with torch.no_grad():
            model[0].weight.to_local()[0].mul_(1e200)
    try:
        psiopt.create_optimizer(model, "psi-sgd", mapping=mapping)
        said = None
    except ValueError as e:
        said = str(e)
    return {"mapping": mapping.get("0.weight"), "said": said}


def _uneven(rank) -> dict:
    """PSI-SGD's literal mode (``fixed_norm=False``) on two linear→LayerNorm weights ("tensor"
    groups: each spans the ranks under FSDP2) of one parameter group, the first missing step 2
    (no gradient), so that the group's step counters are uneven from then on: two ranks against
    one process."""
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(STEPS, 8, 6, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, 8), generator=gen)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 7, bias=False), nn.LayerNorm(7), nn.ReLU(),
                             nn.Linear(7, 5, bias=False), nn.LayerNorm(5), nn.ReLU(),
                             nn.Linear(5, 3)).double()

    def run(model, x, y):
        opt = psiopt.create_optimizer(model, "psi-sgd", x[0], lr=0.1, fixed_norm=False,
                                      guard_every=3, max_norm=1.5)
        for t, (xb, yb) in enumerate(zip(x, y)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            if t == 2:
                model[0].weight.grad = None
            opt.step()
        groups = [g.get("grouping") for g in opt.param_groups if len(g["params"]) == 2]
        return full(model), groups

    want, groups = run(make(), xs, ys)
    model = make()
    for i in (0, 3, 6):
        fully_shard(model[i])
    fully_shard(model)
    half = slice(rank * 4, rank * 4 + 4)
    got, _ = run(model, xs[:, half], ys[:, half])
    errs = {n: float((got[n] - w).abs().max() / w.abs().max()) for n, w in want.items()}
    return {"errors": errs, "groups": groups}


def _refusals(rank) -> dict:
    """bn_net under FSDP2 (its conv's "channel" rows split 3 | 3 between the ranks, feeding a
    BatchNorm2d): the optimizers that rescale rows outside their update are refused when built;
    then PSI-SGD with ``check_finite`` and a NaN in rank 1's shard of the gradient alone."""
    xs, ys, model, mapping = _sharded_bn_net()
    said, x = {}, xs[0][rank * 4: rank * 4 + 4]
    for name, kw in [("un-sgd", {}), ("b-sgd", {}), ("adamg-star", {}), ("sgdg", {}),
                     ("psi-sgd", {"fixed_norm": False}), ("psi-sgd", {})]:
        key = name + ("-literal" if kw else "")
        try:
            psiopt.create_optimizer(model, name, x, mapping=mapping, **kw)
            said[key] = None
        except ValueError as e:
            said[key] = str(e)
    opt = psiopt.create_optimizer(model, "psi-sgd", x, mapping=mapping, check_finite=True)
    from psiopt.optim.diagnostics import StepProbe

    try:
        StepProbe(opt)
        said["probe"] = None
    except ValueError as e:
        said["probe"] = str(e)
    nn.functional.cross_entropy(model(x), ys[0][:4]).backward()
    if rank == 1:
        model[0].weight.grad.to_local()[0, 0, 0, 0] = float("nan")
    before = full(model)["0.weight"]
    try:
        opt.step()
        raised = None
    except FloatingPointError as e:
        raised = str(e)
    unchanged = bool(torch.equal(full(model)["0.weight"], before))
    return {"mapping": mapping.get("0.weight"), "said": said, "raised": raised,
            "unchanged": unchanged}


def _bf16(rank) -> dict:
    """Adam-S on a bfloat16 linear→LayerNorm weight ("tensor") under FSDP2: one step, then its
    state through ``get_state_dict``/``set_state_dict`` into a new optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, generator=gen).bfloat16()
    y = torch.randint(0, 3, (4,), generator=gen)

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.LayerNorm(6), nn.ReLU(),
                              nn.Linear(6, 3)).bfloat16()
        fully_shard(model[0])
        fully_shard(model)
        return model

    model = make()
    opt = psiopt.create_optimizer(model, "adams", x)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()
    saved = opt.state[model[0].weight]["exp_avg_sq"]
    model_sd, optim_sd = get_state_dict(model, opt)
    again = make()
    opt2 = psiopt.create_optimizer(again, "adams", x)
    set_state_dict(again, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = opt2.state[again[0].weight]["exp_avg_sq"]
    return {"saved": str(saved.dtype), "loaded": str(loaded.dtype),
            "equal": bool(torch.equal(loaded.full_tensor(), saved.full_tensor()))}


#: FSDP2 checks run in one spawn of two ranks (test time), in this order on every rank
FSDP_CHECKS = {"bad_shard": _bad_shard, "uneven": _uneven, "refusals": _refusals, "bf16": _bf16}


def _checks_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {name: check(rank) for name, check in FSDP_CHECKS.items()}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    close_process_group()


@pytest.fixture(scope="module")
def fsdp_checks(tmp_path_factory):
    """Each rank's results of :data:`FSDP_CHECKS`: ``[rank 0's, rank 1's]``, by check."""
    out = tmp_path_factory.mktemp("checks") / "checks"
    mp.spawn(_checks_worker, args=(2, _free_port(), str(out)), nprocs=2)
    return [json.loads(out.with_suffix(f".{rank}").read_text()) for rank in (0, 1)]


def test_a_bad_row_in_one_ranks_shard_is_refused_on_every_rank(fsdp_checks):
    results = [r["bad_shard"] for r in fsdp_checks]
    assert all(r["mapping"] == "channel" for r in results), results
    assert all(r["said"] and "1 group(s) (channel) have squared norms outside" in r["said"]
               for r in results), results
    assert "another rank's rows" in results[0]["said"] and "largest entries" in results[1]["said"]


def test_uneven_step_counters_of_groups_that_span_ranks_equal_one_process(fsdp_checks):
    """Uneven counters step each tensor on its own; under FSDP2 their norms were taken on the
    local shard alone (a silent wrong result: relative errors of order 1 at the time)."""
    result = fsdp_checks[0]["uneven"]
    assert result["groups"] == ["tensor"], result
    assert max(result["errors"].values()) < 1e-12, result


def test_sharded_rows_feeding_running_statistics_and_a_nan_in_one_shard_are_refused(fsdp_checks):
    """Under FSDP2, on every rank alike: (1) the optimizers whose rules rescale rows outside
    their update (the sphere methods' and B-SGD's unit-normalisation, PSI-SGD's guard) are
    refused when built where the rows are split between the ranks and feed a BatchNorm (the
    statistics cannot follow: a rank raised alone at the rescaling, or every channel took its
    rows' factor, silently); PSI-SGD with fixed_norm is built.  (2) ``check_finite`` finds a NaN
    in rank 1's shard alone (the DTensor's max norm, reduced by gloo's MAX, dropped it: the
    step wrote NaN into the weights).  (3) ``StepProbe`` is refused (its figures are of whole
    groups: on shards they were each rank's own, silently)."""
    for result in (r["refusals"] for r in fsdp_checks):
        assert result["mapping"] == "channel", result
        said = result["said"]
        assert said.pop("psi-sgd") is None, result
        assert "StepProbe takes no FSDP2-sharded parameters" in said.pop("probe"), result
        assert all(s and "BatchNorm" in s and "FSDP2" in s for s in said.values()), result
        assert result["raised"] and "0.weight" in result["raised"], result
        assert result["unchanged"], result


def test_float32_state_of_bfloat16_shards_stays_float32_through_a_checkpoint(fsdp_checks):
    """``accumulated_state`` (Adam-S's ‖g‖² average) of 16-bit parameters is kept in float32 and
    stays so when loaded; under FSDP2 it came back as bfloat16 (torch's cast to the parameter's
    dtype was left on DTensors), the stall that float32 state prevents."""
    for result in (r["bf16"] for r in fsdp_checks):
        assert result == {"saved": "torch.float32", "loaded": "torch.float32", "equal": True}, result
