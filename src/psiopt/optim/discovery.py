"""Exact, structural discovery of scale-invariant parameters (SPEC §1) and its numerical check.

:func:`find_scale_invariant` records the aten operations of the model's forward pass, once in
train mode and once in eval mode (:mod:`psiopt.optim.symmetry`), and for every parameter asks
whether shifting it (``"cancelled"``: a bias a normalisation or a softmax removes) or rescaling its
groups (``"tensor"``, then ``"channel"``, ``"channel@1"``, ``"groups:G"``, the finest that holds)
leaves every output and buffer unchanged in both passes.  Nothing is guessed from names, module
types or gradients; Python control flow in ``forward`` is fine (the real pass is recorded); an op
the analysis does not know makes the parameters it reads not invariant (the safe answer).  The
model's parameters, buffers, train/eval flags and random state are left as they were.  Declare
what discovery cannot find with ``overrides`` and confirm it with :func:`check_invariance`.
``docs/discovery.md`` describes the analysis and what it finds on a zoo of architectures.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch built without distributed support
    FSDPModule = None

from ..parallel import SyncBatchNorm
from .base import own_tensor_settings
from .geometry import CANCELLED, is_invariant, norm, parse_grouping, part, rows, safe_inv, split_part
from .sharded import grouped_norms, is_sharded
from .symmetry import (
    EVERYWHERE,
    LABELS,
    Expr,
    Failed,
    Propagation,
    Value,
    compact,
    perturbed,
    record,
    tensors_in,
    unrecorded,
)

_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _call(model: nn.Module, example_inputs):
    """``model`` on ``example_inputs`` (a dict: keywords; a tuple or list: arguments), their
    containers fresh (:func:`_fresh_containers`)."""
    example_inputs = _fresh_containers(example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _outputs(out) -> list[Tensor]:
    """The floating-point tensors ``out`` holds, wherever discovery finds them
    (:func:`~psiopt.optim.symmetry.tensors_in`: containers, dataclasses, other objects)."""
    return [t for t in tensors_in(out) if t.is_floating_point()]


@dataclass(eq=False)
class _Snapshot:
    """``(parameter, its tensor, a copy)`` for every unsharded parameter: what :func:`_pristine`
    puts back after a forward pass that writes its own parameters (``wrote`` is then set)."""

    params: list
    wrote: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> _Snapshot:
        return cls([(p, p.detach(), p.detach().clone()) for p in model.parameters() if not is_sharded(p)])


@contextlib.contextmanager
def _pristine(model: nn.Module, training: bool = True, seed: int = 0, params: _Snapshot | None = None):
    """Train (or eval) mode and a fixed seed inside; on exit modes, buffers, the RNG states and
    each module's attributes restored (see :class:`_Bound`), and the parameters of ``params`` if
    the pass wrote them.  Train mode is the modes the model trains in: ``model.train()`` (which
    may freeze layers itself: mmdetection's ``norm_eval``), and where the model was already in
    train mode the modules that were in eval mode stay there (``model.train(); bn.eval()``: a
    frozen BatchNorm, where its input's bias is not cancelled).
    ``seed`` seeds torch's generator, Python's ``random`` and numpy's; other than 0 (a redrawn
    pass, see :func:`_redrawn`), the random streams the modules hold.  ``ValueError`` if the
    pass registered parameters (a module built in its first forward)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    bound = _Bound.of(model)
    registered = {id(p) for p in model.parameters()}
    # SyncBatchNorm normalises exactly as BatchNorm does (over the global batch): traced as the
    # local BatchNorm, with no collective during discovery
    synced = [m for m in model.modules() if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm))]
    for m in synced:
        m.forward = types.MethodType(_BatchNorm.forward, m)
    devices = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    added = set()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            bound.seed(seed)
            model.train(training)  # (the model's own train(), which may freeze layers itself)
            if training and modes[0][1]:  # (modes[0]: the model's own)
                for m, mode in modes:  # layers the user froze in a model in train mode
                    if not mode:
                        m.training = False
            yield bound
    finally:
        _reshard(model)  # (FSDP2's unsharded parameters back to the registered ones, then:)
        added = [n for n, p in model.named_parameters() if id(p) not in registered and p.requires_grad]
        for m in synced:
            del m.forward
        for m, mode in modes:
            m.training = mode
        bound.restore()
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):  # (a copy bumps the version: only where needed)
                    b.copy_(saved)
            for p, data, saved in params.params if params else ():  # a forward pass that writes
                if p.data_ptr() != data.data_ptr() or not torch.equal(p, saved):  # its parameters
                    params.wrote = True
                    p.data = data
                    p.copy_(saved)
    if added:
        raise ValueError(f"{type(model).__name__}'s forward pass registers trainable parameters "
                         f"({_some(added)}): an "
                         "optimizer built before they exist would miss them; for a module built "
                         "by its first batch, run one forward pass before discovery and before "
                         "building the optimizer")


def _some(names: list[str]) -> str:
    """The first three of ``names``, and "..." for more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


@dataclass(eq=False)
class _Bound:
    """What a forward pass may change besides tensors' values, put back after it: each module's
    attributes as they were bound (a buffer bound anew, ``self.center = h.mean(0)``; a cache
    and the length it records; a flag; a hook handle), the contents of the dicts, lists and sets
    a module holds (its registries of parameters, buffers, submodules and hooks; a cache dict),
    the random streams the modules hold, Python's ``random``, numpy's, and torch's parametrize
    cache (off during the pass)."""

    attrs: list
    containers: list
    generators: list  # (stream, its state): see _random_stream
    python: object
    numpy: object
    parametrize: tuple  # torch.nn.utils.parametrize's cache: off during the pass, then as it was

    @classmethod
    def of(cls, model: nn.Module) -> _Bound:
        mods = list(model.modules())
        np = sys.modules.get("numpy")
        held = [v for m in mods for v in vars(m).values() if _random_stream(v)]
        return cls([(m, dict(vars(m))) for m in mods],
                   [(v, copy.copy(v)) for m in mods for v in vars(m).values()
                    if isinstance(v, (dict, list, set))],
                   [(g, _stream_state(g)) for g in held],
                   random.getstate(), np.random.get_state() if np else None,
                   (parametrize._cache_enabled, dict(parametrize._cache)))

    def seed(self, seed: int) -> None:
        """Seed the pass's draws (the streams the modules hold only for a redrawn pass: seed 0
        is the user's own draw); parametrize's cache off."""
        parametrize._cache_enabled = 0
        random.seed(seed)
        if self.numpy is not None:
            sys.modules["numpy"].random.seed(seed)
        for i, (g, _) in enumerate(self.generators if seed else ()):
            _seed_stream(g, 1_000_003 * seed + i)

    def python_state(self):
        """What the pass's Python-level draws change (Python's random, numpy's, the streams the
        modules hold): a pass that draws there may branch on it."""
        np = sys.modules.get("numpy")
        return (random.getstate(), np.random.get_state()[1].tobytes() if np else None,
                [repr(_stream_state(g)) for g, _ in self.generators if not isinstance(g, torch.Generator)])

    def restore(self) -> None:
        try:
            for g, state in self.generators:
                _set_stream_state(g, state)
            random.setstate(self.python)
            if self.numpy is not None:
                sys.modules["numpy"].random.set_state(self.numpy)
        finally:
            parametrize._cache_enabled = self.parametrize[0]
            parametrize._cache.clear()
            parametrize._cache.update(self.parametrize[1])
            for m, attrs in self.attrs:
                vars(m).clear()
                vars(m).update(attrs)
            for v, saved in self.containers:
                if not _changed(v, saved):  # (some refuse any mutation: fx's immutable_dict)
                    continue
                if isinstance(v, list):
                    v[:] = saved
                else:
                    v.clear()
                    v.update(saved)


def _changed(v, saved) -> bool:
    """Whether a container holds other objects than its copy ``saved`` (compared by identity:
    tensors do not compare as booleans)."""
    if isinstance(v, dict):
        return v.keys() != saved.keys() or any(v[k] is not saved[k] for k in saved)
    if isinstance(v, list):
        return len(v) != len(saved) or any(a is not b for a, b in zip(v, saved))
    return {id(x) for x in v} != {id(x) for x in saved}


def _random_stream(v) -> bool:
    """A random stream a module holds: a ``torch.Generator``, a ``random.Random``, numpy's
    ``Generator`` or ``RandomState`` (not ``random.SystemRandom``, which keeps no state)."""
    np = sys.modules.get("numpy")
    return isinstance(v, (torch.Generator, random.Random)) and not isinstance(v, random.SystemRandom) \
        or (np is not None and isinstance(v, (np.random.Generator, np.random.RandomState)))


def _bits(g):
    """A numpy ``Generator``'s or ``RandomState``'s bit generator (any kind: PCG64, MT19937…)."""
    return getattr(g, "bit_generator", None) or g._bit_generator


def _stream_state(g):
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, random.Random):
        return g.getstate()
    return copy.deepcopy(_bits(g).state)


def _set_stream_state(g, state) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, random.Random):
        g.setstate(state)
    else:
        _bits(g).state = state


def _seed_stream(g, seed: int) -> None:
    if isinstance(g, torch.Generator):
        g.manual_seed(seed)
    elif isinstance(g, random.Random):
        g.seed(seed)
    else:
        _bits(g).state = type(_bits(g))(seed).state


def _tensor_attributes(m: nn.Module) -> dict:
    """The tensors a module holds as plain attributes (neither parameters nor buffers)."""
    return {k: v for k, v in vars(m).items() if isinstance(v, Tensor)}


@dataclass(eq=False)
class NormStats:
    """Running statistics of a BatchNorm/InstanceNorm layer fed by the rows of an invariant weight.

    Scaling row ``i`` by ``s_i`` scales channel ``i`` of the layer's input around a centre ``b``
    (the cancelled bias of a conv; ``W β + b`` for a norm's gain followed by a linear map; zero
    without a bias), so the eval-mode network is unchanged when the statistics follow:
    ``mean ← s (mean − b) + b`` and ``var ← s² var``.  For a ``"tensor"`` group one factor
    applies to every channel.  ``bias``: a tensor of the model, or an
    :class:`~psiopt.optim.symmetry.Expr` that computes ``b`` from the model's current tensors.
    """

    norm: nn.Module
    bias: Tensor | Expr | None
    #: channel ``c`` of the layer follows group ``index[c]`` (``-1``: no group); ``None``: the
    #: groups are the channels in order (or one group for all)
    index: Tensor | None = None

    @torch.no_grad()
    def rescale_(self, factors: Tensor) -> None:
        """Follow a rescaling of the rows by ``factors`` (one per row, or a single one)."""
        mean, var = self.norm.running_mean, self.norm.running_var
        if mean is None or var is None:
            return
        s = factors.reshape(-1).to(mean.dtype)
        if self.index is not None:
            if self.index.device != s.device:  # moved once (a copy at each rescaling could not
                self.index = self.index.to(s.device, non_blocking=True)  # be captured in a graph)
            if s.numel() == 1:  # one factor for the whole tensor (or part): "tensor[0:4]"
                s = torch.where(self.index >= 0, s, s.new_ones(()))
            else:
                s = torch.cat([s, s.new_ones(1)])[self.index]
        if s.numel() not in (1, mean.numel()):  # e.g. the rows of one FSDP2 shard
            raise ValueError(
                f"{type(self.norm).__name__}: its running statistics cover {mean.numel()} channels "
                f"but {s.numel()} row factors were given; the running statistics of a layer fed "
                "by FSDP2-sharded rows cannot follow a rescaling (use GroupNorm or LayerNorm, or "
                "an optimizer that does not rescale rows: psi-sgd with fixed_norm=True, adams, "
                "adamsrt, sgdmrt)")
        if self.bias is None:
            mean.mul_(s)
        else:
            b = self.bias if isinstance(self.bias, Tensor) else self.bias.value(Tensor.detach)
            b = b.detach().reshape(-1).to(mean.dtype)
            mean.sub_(b).mul_(s).add_(b)
        var.mul_(s.square())


@torch.no_grad()
def rescale_rows_(view: Tensor, factors: Tensor, stats=()) -> None:
    """Multiply the groups of ``view`` by ``factors`` (keepdim, one per group) in place, and let
    the running statistics in ``stats`` (:class:`NormStats`) follow (first: a layer whose
    statistics cannot follow raises before the rows change)."""
    for st in stats:
        st.rescale_(factors)
    view.mul_(factors)


def _has_running_stats(module: nn.Module) -> bool:
    return getattr(module, "running_mean", None) is not None


def _outside_inference_mode(model: nn.Module, what: str) -> None:
    """``RuntimeError`` under ``torch.inference_mode()``, or for a model built under it: the
    passes record versions of tensors and take gradients, which inference tensors do not have."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} cannot run under torch.inference_mode() (it records tensor "
                           "versions and takes gradients): call it outside")
    built = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
             if not isinstance(t, nn.parameter.UninitializedTensorMixin) and t.is_inference()]
    if built:
        raise RuntimeError(f"{what}: {_some(built)} of {type(model).__name__} were made under "
                           "torch.inference_mode() (inference tensors have no versions nor "
                           "gradients): build the model outside it")


def _discover(model: nn.Module, example_inputs) -> tuple[dict[str, str], dict[str, list[NormStats]]]:
    """``(mapping, stats)``: the grouping of every invariant parameter and cancelled one, and
    the running statistics each invariant parameter feeds."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"{type(model).__name__} has parameters not yet initialised (lazy modules: "
                         f"{_some(lazy)}): run one "
                         "forward pass before discovery and before building the optimizer")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{type(model).__name__} has tensors on the meta device ({_some(meta)}): "
                         "discovery runs the model on example_inputs and reads the values; "
                         "discover on a materialised copy (to_empty and initialise), then build "
                         "the optimizer from its mapping")
    empty = [tuple(t.shape) for t in tensors_in(example_inputs) if t.numel() == 0]
    if empty:
        raise ValueError(f"example_inputs hold an empty tensor (shape {empty[0]}): an example "
                         "without entries shows nothing about the model (every claim would hold "
                         "vacuously); give one with samples and positions")
    _outside_inference_mode(model, "discovery")
    names, substitute, saved = {}, {}, _Snapshot.of(model)

    def recorded(training: bool, seed: int = 0, values: dict = substitute):
        """One pass, its parameters' recorded tensors credited to their names (under FSDP2 each
        pass has its own unsharded copies)."""
        trace, seen = _trace(model, example_inputs, training, values, saved, seed)
        for k, name in seen.items():
            names.setdefault(name, []).append(k)
        return trace

    traces = [recorded(True), recorded(False)]
    redrawn = _redrawn(traces[0], recorded)
    if redrawn is None:
        warnings.warn(f"{type(model).__name__}'s forward pass takes other ops under other random "
                      "draws (a branch on torch.rand: LayerDrop?): discovery sees one draw's ops "
                      "and claims nothing; declare groups with overrides= and check them with "
                      "psiopt.check_invariance", stacklevel=3)
        return {}, {}
    traces += redrawn + _traces_of_other_buffers(model, substitute, recorded)
    stats_of = {id(m.running_mean): m for m in model.modules()
                if isinstance(getattr(m, "running_mean", None), Tensor)}
    params = dict(model.named_parameters())
    shared = _sharing_storage(model) | _read_through_other_tensors(model, traces)
    if saved.wrote:
        warnings.warn(f"{type(model).__name__}'s forward pass writes its own parameters (an "
                      "exponential average through .data?): discovery cannot follow that and "
                      "claims nothing (the parameters were restored)", stacklevel=3)
        return {}, {}
    mapping, stats = {}, {}
    for name, p in params.items():
        ids = names.get(name)
        if not ids or not p.is_floating_point() or not p.requires_grad or not p.numel() or id(p) in shared:
            continue  # unused, frozen (nothing to train), empty, or one storage for two parameters
        found = _first_holding(traces, ids, p, candidate_groupings(p), stats_of)
        split = found is None and any(t.split_after(ids) for t in traces)
        for span in part_spans(p) if split else ():  # a part: the largest that holds
            found = _first_holding(traces, ids, p, candidate_groupings(p, span), stats_of)
            if found is not None:
                break
        if found is not None:
            mapping[name], stats[name] = found
    return mapping, {k: v for k, v in stats.items() if v}


def _redrawn(trace, recorded) -> list | None:
    """The train-mode pass recorded again under other random draws, where it draws (dropout,
    drop path: two more seeds): a claim must hold under every draw (an offset that one draw's
    mask made constant for the norm after it need not be under the next).  Where Python reads a
    value made from a draw (``if torch.rand([]) < p``, ``random.random()``), seeds 0 to 4, which
    must run the same ops (LayerDrop with p > 0 does not: ``None``; with p = 0, as HF models draw
    by default, they do).  (Seed 0 again: the first pass may have run a lazy initialisation,
    FSDP2's, with ops of its own.)"""
    if not (trace.random or trace.branches_on_random):
        return []
    if not trace.branches_on_random:
        return [recorded(True, seed) for seed in (1, 2)]
    again = [recorded(True, seed) for seed in range(5)]
    ops = [[op.func for op in t.ops] for t in again]
    return None if any(o != ops[0] for o in ops[1:]) else again[1:]


def _first_holding(traces, ids, p, candidates, stats_of) -> tuple[str, list] | None:
    """``(grouping, running statistics)`` for the finest of ``candidates`` that holds (see
    :func:`candidate_groupings` for their order), or ``None``."""
    found = None
    for grouping in candidates:
        kind = parse_grouping(grouping)[0]
        links = _holds(traces, ids, p, grouping, stats_of)
        if links is not None:
            found = grouping, links
            if kind != "tensor":
                break
        elif kind == "tensor":
            break  # no finer grouping can hold
    return found


def _sharing_storage(model: nn.Module) -> set[int]:
    """Parameters (``id``) whose storage another tensor of the model shares: a second
    ``Parameter`` over the same tensor, a buffer or a tensor attribute made from it (rescaling
    the parameter moves that tensor too, which the trace does not show)."""
    params = {id(p): p for p in model.parameters() if not is_sharded(p) and p.numel()}
    key = {k: (p.device, p.untyped_storage().data_ptr()) for k, p in params.items()}
    owners: dict = {}
    for k, where in key.items():
        owners.setdefault(where, set()).add(k)
    others = [*model.buffers(), *(v for m in model.modules() for v in vars(m).values()
                                   if isinstance(v, Tensor) and not isinstance(v, nn.Parameter))]
    out = {k for ids in owners.values() if len(ids) > 1 for k in ids}
    for t in others:
        if t.layout == torch.strided and t.numel() and not is_sharded(t):
            out |= owners.get((t.device, t.untyped_storage().data_ptr()), set())
    return out


def _read_through_other_tensors(model: nn.Module, traces) -> set[int]:
    """Parameters (``id``) whose storage a pass read through a tensor that no recorded op made
    and discovery did not substitute: a view made once and kept where :func:`_sharing_storage`
    does not look (``self.views = [w.t()]``, a closure), which the trace reads as a constant
    (``l.weight`` was claimed "channel" while ``x @ views[0]`` moved with it)."""
    params = {(p.device, p.untyped_storage().data_ptr()): id(p) for p in model.parameters()
              if not is_sharded(p) and p.numel() and p.layout == torch.strided}
    out = set()
    for trace in traces:
        known = {id(t) for op in trace.ops for t in op.outs} | trace.originals.keys()
        for op in trace.ops:
            for t in tree_leaves(list(op.args.values())):
                if isinstance(t, Tensor) and id(t) not in known and t.layout == torch.strided \
                        and t.numel() and not is_sharded(t):
                    k = params.get((t.device, t.untyped_storage().data_ptr()))
                    if k is not None:
                        out.add(k)
    return out


def _traces_of_other_buffers(model: nn.Module, substitute: dict, recorded) -> list:
    """Two more passes (train, eval) where the float buffers whose values are not generic
    (zeros, a constant) read perturbed copies, as parameters and inputs do: a claim must hold in
    them too.  A zero per-position bias before a BatchNorm made the offset it adds "constant"
    (rows claimed; once the buffer was filled from a checkpoint a rescaling moved the output by
    0.03-0.24); the passes with the buffers as they are keep the branches a flag buffer takes (a
    0/1 float flag read by ``if`` takes the other one when perturbed: the perturbed passes alone
    claimed what the model never runs).  None when no buffer needs it, or when a perturbed pass
    fails (a float buffer used as an index)."""
    stats = {id(getattr(m, k)) for m in model.modules() for k in ("running_mean", "running_var")
             if isinstance(getattr(m, k, None), Tensor)}  # (what the links read: left as they are)
    gen, others, changed = torch.Generator().manual_seed(2), dict(substitute), []
    for b in model.buffers():
        if id(b) not in stats and b.is_floating_point() and not is_sharded(b):
            moved = perturbed(b, gen)
            if moved.data_ptr() != b.data_ptr():  # (a generic buffer is read as it is)
                others[id(b)] = moved
                changed.append(b)
    if not changed:
        return []
    traces = []
    try:
        for training in (True, False):
            trace = recorded(training, values=others)
            trace.originals.update({id(others[id(b)]): b for b in changed})
            traces.append(trace)
    except Exception:  # noqa: BLE001 (whatever the model raises on those values: not claimed on them)
        return []
    return traces


def _fresh_containers(example_inputs):
    """``example_inputs`` with its containers and objects copied, holding the same tensors,
    random generators and modules (:data:`_SHARED`): a pass that rebinds what they hold (a KV
    cache appending to itself) neither changes the caller's containers nor the next pass's
    inputs, and frees no input tensor (whose ``id``, the key of its perturbed copy, a later
    tensor could take: a Hugging Face ``DynamicCache`` given as input made discovery multiply
    mismatched shapes).  A generator is not copied, so that each pass draws anew from it.  A
    tensor written in place (a static cache's) is written as in any forward pass.  As given
    where it cannot be copied."""
    try:
        return copy.deepcopy(example_inputs, {id(t): t for t in tensors_in(example_inputs, _SHARED)})
    except Exception:  # (an object deepcopy cannot copy: a lock, a C handle)
        return example_inputs


#: what :func:`_fresh_containers` leaves shared: tensors, random generators, modules
_SHARED = (Tensor, torch.Generator, random.Random, nn.Module)


def _trace(model: nn.Module, example_inputs, training: bool, substitute: dict, saved: _Snapshot,
           seed: int = 0):
    """Record one forward pass (train or eval mode, random draws from ``seed``) on perturbed
    parameters and inputs; return the trace and ``{id of a recorded parameter tensor: its
    name}``.  ``substitute`` keeps the copies of the registered parameters and inputs for the
    next pass."""
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    registered = {id(p): name for name, p in params.items()}
    for p in params.values():
        if not is_sharded(p) and id(p) not in substitute:
            substitute[id(p)] = perturbed(p, gen)
    for x in _outputs(example_inputs):
        if id(x) not in substitute:
            substitute[id(x)] = perturbed(x, gen)
    local = dict(substitute)
    seen = {id(local[id(p)]): name for name, p in params.items() if id(p) in local}
    owner = {(id(m), k): registered[id(p)] for m in model.modules() for k, p in m._parameters.items()
             if p is not None and id(p) in registered}

    def on_start(module, args):  # FSDP2 swaps in unsharded tensors for the forward pass
        for k, t in module._parameters.items():
            name = owner.get((id(module), k))
            if name is not None and isinstance(t, Tensor) and id(t) not in local:
                with unrecorded():  # FSDP2 frees the storage after the pass: a copy, not
                    local[id(t)] = perturbed(t, gen).clone()  # part of the recorded pass
                seen[id(local[id(t)])] = name

    instance_inputs: list = []  # (the tensors themselves: alive, so their ids stay theirs)

    def on_instance_norm(module, args):
        instance_inputs.extend(a for a in args[:1] if isinstance(a, Tensor))

    handles = [m.register_forward_pre_hook(on_start) for m in model.modules() if m._parameters]
    handles += [m.register_forward_pre_hook(on_instance_norm) for m in model.modules()
                if isinstance(m, _InstanceNorm)]
    keep = list(model.buffers()) + list(local.values())
    try:
        with _pristine(model, training, seed, params=saved) as bound:
            python = bound.python_state()
            trace = record(lambda: _call(_unwrapped(model), example_inputs), local, keep)
            # a draw from Python's random or numpy's (``if random.random() < p``): as a branch
            trace.branches_on_random |= bound.python_state() != python
            # tensors the pass left on its modules (a cache, a buffer bound anew) are results too
            trace.pin([*model.buffers(), *(v for m in model.modules()
                                           for v in _tensor_attributes(m).values())])
    finally:
        for h in handles:
            h.remove()
    # what a running statistic may follow: the model's own parameters and buffers
    trace.originals = {k: params[name] for k, name in seen.items()}
    trace.originals.update({id(b): b for b in model.buffers()})
    trace.instance_inputs = {id(t) for t in instance_inputs}
    trace.training = training
    return trace, seen


def candidate_groupings(p: Tensor, span: tuple[int, int] | None = None):
    """Groupings to try (of rows ``span`` of dimension 0 only, a part, when given): cancelled,
    then ``tensor`` (when the whole tensor is not invariant, no finer grouping is), then finer
    ones from the finest; the last that holds is kept."""
    suffix = "" if span is None else f"[{span[0]}:{span[1]}]"
    if p.dim() <= 1:
        yield CANCELLED + suffix
    yield "tensor" + suffix
    if p.dim() == 0:
        return
    n = p.shape[0] if span is None else span[1] - span[0]
    if n > 1:
        yield "channel" + suffix
    if span is None and p.dim() >= 2 and p.shape[1] > 1:
        yield "channel@1"
    for g in sorted((g for g in range(2, n) if n % g == 0), reverse=True):
        yield f"groups:{g}{suffix}"


def part_spans(p: Tensor) -> list[tuple[int, int]]:
    """Row ranges of dimension 0 tried as parts when no grouping of the whole tensor holds: the
    runs of its halves and of its thirds short of the whole (a fused key-value or gate-up
    projection, a fused qkv one), the largest first."""
    n = p.shape[0] if p.dim() else 0
    spans = {(i * n // k, j * n // k) for k in (2, 3) if n % k == 0 and n >= k
             for i in range(k) for j in range(i + 1, k + 1) if j - i < k}
    return sorted(spans, key=lambda s: (s[0] - s[1], s[0]))


def _seed(p: Tensor, grouping: str, gen: torch.Generator) -> tuple[Value, dict[float, int]]:
    """The starting value of ``p`` for one candidate, and ``{label: group index}``."""
    if parse_grouping(grouping)[0] == CANCELLED:  # a random offset of every entry (of the part)
        offset = torch.zeros(p.shape, dtype=torch.float64)
        shifted = part(offset, grouping)
        shifted.copy_(torch.randn(shifted.shape, generator=gen, dtype=torch.float64))
        return Value(torch.zeros((1,) * p.dim(), dtype=torch.float64, device=p.device),
                     offset.to(p.device), fixed=EVERYWHERE), {}
    view = rows(torch.empty(p.shape, device="meta"), grouping)
    count = view.shape[0]
    while True:  # distinct random labels
        labels = torch.randint(*LABELS, (count,), generator=gen, dtype=torch.int64)
        if labels.unique().numel() == count:
            break
    labels = labels.double()
    F = torch.zeros(p.shape, dtype=torch.float64)
    rows(F, grouping).copy_(labels.view(-1, *[1] * (view.dim() - 1)).expand(view.shape))
    F = compact(F)
    return Value(F.to(p.device)), {float(v): i for i, v in enumerate(labels.tolist())}


def _holds(traces, ids: list[int], p: Tensor, grouping: str, stats_of: dict) -> list | None:
    """``None`` if ``grouping`` of ``p`` may change an output of a trace (or its buffers);
    else the running statistics (:class:`NormStats`) that must follow its rescaling: one per
    BatchNorm, every call of which (in either pass) sees the same per-channel factors."""
    gen = torch.Generator().manual_seed(1)
    value, labels = _seed(p, grouping, gen)
    shift = parse_grouping(grouping)[0] == CANCELLED
    found: dict[int, list] = {}
    for trace in [t for t in traces if t.training] if shift else traces:  # a cancelled parameter
        mine = [k for k in ids if k in trace.first]  # is never updated: the eval-mode network stays
        if not mine:
            return None  # unused in this pass: claim nothing
        if any(k in trace.outputs or id(trace.originals.get(k)) in trace.outputs for k in ids):
            return None  # the parameter itself is returned (a head handing its weight to a loss)
        prop = Propagation(trace, follow_stats=not shift)
        try:
            env = prop.run(min(trace.first[k] for k in mine), {k: value for k in mine})
        except Failed:
            return None
        if env.keys() - set(mine) or not prop.removed:  # a transformed output, buffer or other
            return None  # parameter; or no op removed it (rows the pass never read, or dropped)
        counted: dict[int, int] = {}
        for mean, F, centre in prop.links:
            counted[id(mean)] = counted.get(id(mean), 0) + 1
            bound = None if centre is None else trace.bind(centre, lambda t: not is_sharded(t))
            if centre is not None and bound is None:
                return None  # a centre that is not a function of the model's own tensors
            found.setdefault(id(mean), []).append((mean, F, bound))
        if any(n != trace.bn_calls.get(k) for k, n in counted.items()):
            return None  # the layer also normalises other inputs: its statistics cannot follow
    links = []
    for calls in found.values():
        mean, F, centre = calls[0]
        c = None if centre is None else centre.value(Tensor.detach)
        if any(not torch.equal(F, F2) or (c2 is None) != (c is None) or
               c is not None and not torch.equal(c, c2.value(Tensor.detach)) for _, F2, c2 in calls[1:]):
            return None
        links.append(_stats(stats_of, mean, F, centre, labels, grouping))
    if any(link is None for link in links):
        return None
    return links


def _stats(stats_of: dict, mean: Tensor, F: Tensor, centre: Expr | None, labels: dict,
           grouping: str):
    """The :class:`NormStats` of a BatchNorm whose input channels carry labels ``F`` (and the
    offset ``(1 − s)·c``, ``c`` given by ``centre`` from the model's tensors)."""
    norm = stats_of.get(id(mean))
    if norm is None or centre is not None and centre.value(Tensor.detach).numel() not in (1, F.numel()):
        return None
    index = [labels.get(float(v), None) if v else -1 for v in F.tolist()]
    if None in index:
        return None
    if grouping == "channel" and index == list(range(len(index))):
        return NormStats(norm, centre)
    return NormStats(norm, centre, torch.tensor(index))


def _reshard(model: nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward pass (until the backward
    pass that discovery never runs): shard them again, so that ``named_parameters()`` gives the
    sharded parameters an optimizer must hold."""
    for m in model.modules():
        if FSDPModule and isinstance(m, FSDPModule):
            m.reshard()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module to call for discovery: DistributedDataParallel's forward would arm its
    gradient reducer for a backward pass that never comes, so its ``module`` is called instead
    (the same parameters; names keep the ``module.`` prefix)."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return model.module if ddp is not None and isinstance(model, ddp) else model


def find_scale_invariant(model: nn.Module, example_inputs) -> dict[str, str]:
    """Map the name of every scale-invariant parameter to its grouping.

    ``example_inputs`` is what ``model`` is called with: a tensor, a tuple of positional
    arguments, or a dict of keyword arguments.  Values are ``"channel"``, ``"groups:G"`` or
    ``"tensor"`` (see :mod:`psiopt.optim.geometry`; ``"@1"`` marks ConvTranspose weights), and
    ``"cancelled"`` for a bias that the following normalisation removes (its gradient is rounding
    noise: psiopt optimizers never update it).  Parameters absent from the result are not
    scale-invariant.

    The model is traced in eval mode and in the modes it trains in: ``model.train()`` (an
    override that freezes layers runs), and where the model was in train mode already, the
    modules the user put in eval mode stay there (a frozen BatchNorm cancels nothing).
    """
    return _discover(model, example_inputs)[0]


def _mapping(model: nn.Module, groups_or_mapping) -> dict[str, str]:
    """The declared groupings: invariant ones and cancelled biases (``None`` left out)."""
    if isinstance(groups_or_mapping, dict):
        return {k: v for k, v in groups_or_mapping.items() if v is not None}
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in groups_or_mapping:
        if group.get("grouping") is not None:
            for p in group["params"]:
                out[names[id(p)]] = group["grouping"]
    return out


def _check_mapping(model: nn.Module, mapping: dict) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = sorted(set(mapping) - set(params))
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}: the model does not have them (it "
                         f"has {sorted(params)})")
    for name, grouping in mapping.items():
        if grouping is None:
            continue
        try:  # ValueError for a bad grouping or shape (shape only: meta)
            meta = torch.empty(params[name].shape, device="meta")
            if is_invariant(grouping):
                rows(meta, grouping)
            else:
                part(meta, grouping)
        except ValueError as e:
            raise ValueError(f"invalid grouping {grouping!r} for {name}: {e}") from None
    return params


def param_groups(model: nn.Module, example_inputs=None, *, mapping: dict | None = None,
                 overrides: dict | None = None, lr: float | None = None,
                 weight_decay: float | None = None, invariant_lr: float | None = None,
                 invariant_weight_decay: float = 0.0) -> list[dict]:
    """torch-style parameter groups: one per grouping of invariant parameters, then the rest.

    ``mapping`` replaces discovery; ``overrides`` maps parameter names to a grouping (declare a
    parameter invariant) or ``None`` (declare it not invariant).  ``lr``/``weight_decay`` go to
    the non-invariant group, ``invariant_lr`` and ``invariant_weight_decay`` (default 0: no L2 on
    invariant weights) to the invariant groups; anything left unset takes the optimizer's
    defaults.  Every group carries ``param_names``.

    Biases cancelled by a normalisation go to a group with ``grouping="cancelled"`` and
    ``lr=0``: psiopt optimizers never update it (and a torch.optim optimizer given these groups
    leaves it alone too).  With ``example_inputs``, invariant groups also carry ``norm_stats``:
    the running statistics their rows feed, which follow every rescaling psiopt does so that the
    eval-mode network is unchanged (kept out of ``state_dict``).
    """
    stats: dict[str, list[NormStats]] = {}
    if example_inputs is not None:
        found, stats = _discover(model, example_inputs)
        if mapping is None and not overrides and not any(map(is_invariant, found.values())):
            norms = any(isinstance(m, _NORMS) for m in model.modules())
            warnings.warn(
                f"psiopt found no scale-invariant parameter in {type(model).__name__}"
                + (" although it has normalisation layers" if norms else " (it has no normalisation layer)")
                + ", so every parameter takes the ordinary update (docs/discovery.md says what "
                "discovery reads; declare groups with overrides= and verify them with "
                "psiopt.check_invariance)", stacklevel=2)
        mapping = found if mapping is None else mapping
    elif mapping is None:
        raise ValueError("param_groups needs example_inputs (or an explicit mapping)")
    elif any(_has_running_stats(m) for m in model.modules()):
        warnings.warn("param_groups: without example_inputs the running statistics of the model's "
                      "normalisation layers cannot follow rows that psiopt rescales; pass "
                      "example_inputs", stacklevel=2)
    mapping = {**mapping, **(overrides or {})}
    _check_mapping(model, mapping)
    buckets: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            bucket = buckets.setdefault(mapping.get(name), {"params": [], "param_names": []})
            bucket["params"].append(p)
            bucket["param_names"].append(name)
    groups = []
    order = {CANCELLED: 1, None: 2}
    for grouping, bucket in sorted(buckets.items(), key=lambda kv: order.get(kv[0], 0)):
        group = {**bucket, "grouping": grouping}
        if grouping == CANCELLED:
            group.update(lr=0.0, weight_decay=0.0)
        elif not is_invariant(grouping):  # (a cancelled part: the rest is an ordinary parameter)
            group.update({k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None})
        else:
            group.update({k: v for k, v in (("lr", invariant_lr), ("weight_decay", invariant_weight_decay))
                          if v is not None})
            if split_part(grouping)[1] is not None:  # the other rows of a part: the others' settings
                group.update({f"rest_{k}": v for k, v in (("lr", lr), ("weight_decay", weight_decay))
                              if v is not None})
            if example_inputs is not None:
                group["norm_stats"] = [stats.get(n, []) for n in bucket["param_names"]]
        groups.append(group)
    own_tensor_settings(groups)  # one tensor lr given: a tensor per group (schedulers write it)
    return groups


@torch.no_grad()
def unit_normalize_(groups: list[dict]) -> None:
    """Scale every invariant group to unit norm in place (zero groups stay zero); the running
    statistics listed in a group's ``norm_stats`` follow."""
    for group in groups:
        if is_invariant(group.get("grouping")):
            links = group.get("norm_stats") or [()] * len(group["params"])
            for p, st in zip(group["params"], links):
                v, n = grouped_norms(p, group["grouping"])
                rescale_rows_(v, safe_inv(n), st)


EXACT, UP_TO_EPS, NOT_INVARIANT = "exact", "up to eps", "NOT INVARIANT"


@dataclass
class GroupCheck:
    """Numerical evidence for one declared parameter (worst over its groups)."""

    name: str
    grouping: str
    loss_change: float  # max relative change of the outputs (or loss) when groups are rescaled
    cosine: float  # max over groups of more than one entry of |<∇, w>| / (‖∇‖ ‖w‖)
    worst_group: int  # index of the group with the largest cosine
    #: ``"exact"``; ``"up to eps"`` (beyond ``tol`` only because of the normalisation layers'
    #: ``eps``: within it once every ``eps`` attribute is set to ~0); ``"NOT INVARIANT"``
    verdict: str = EXACT


@dataclass
class InvarianceReport:
    """Result of :func:`check_invariance`: ``ok`` is False when a declared group is not invariant
    (``up_to_eps`` lists those invariant only up to the normalisation layers' eps)."""

    checks: list[GroupCheck]
    tol: float
    failures: list[GroupCheck] = field(init=False)
    up_to_eps: list[GroupCheck] = field(init=False)

    def __post_init__(self):
        self.checks.sort(key=lambda c: -max(c.loss_change, c.cosine))
        self.failures = [c for c in self.checks if c.verdict == NOT_INVARIANT]
        self.up_to_eps = [c for c in self.checks if c.verdict == UP_TO_EPS]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{'parameter':40s} {'grouping':10s} {'Δloss':>10s} {'cos(∇,w)':>10s}  verdict"]
        for c in self.checks:
            lines.append(f"{c.name:40s} {c.grouping:10s} {c.loss_change:10.2e} "
                         f"{c.cosine:10.2e}  {c.verdict}")
        return "\n".join(lines)


#: the attributes a normalisation layer keeps its eps in
EPS_NAMES = ("eps", "variance_epsilon")


@contextlib.contextmanager
def _no_eps(model: nn.Module):
    """Every float ``eps`` attribute of the model's modules (normalisation layers) set to 1e-30
    inside (``nn.RMSNorm``'s ``None`` too), and the other names norms keep it under
    (:data:`EPS_NAMES`: Hugging Face's RMSNorms and T5's LayerNorm use ``variance_epsilon``);
    restored on exit."""
    saved = [(m, k, getattr(m, k)) for m in model.modules() for k in EPS_NAMES
             if isinstance(getattr(m, k, None), float) or (k == "eps" and isinstance(m, nn.RMSNorm))]
    try:
        for m, k, _ in saved:
            setattr(m, k, 1e-30)
        yield
    finally:
        for m, k, eps in saved:
            setattr(m, k, eps)


def check_invariance(model: nn.Module, example_inputs, groups_or_mapping, *,
                     scales=(0.5, 2.0, 10.0), tol: float = 1e-3, loss_fn=None) -> InvarianceReport:
    """Check declared scale-invariant groups numerically, in train mode (the modes the model
    trains in: see :func:`find_scale_invariant`).

    For every declared parameter and every ``c`` in ``scales``, the even-indexed groups and then
    the odd-indexed groups are multiplied by ``c`` (so a wrong ``"channel"`` declaration on a
    weight that is only invariant as a whole is caught), and the relative change of the loss is
    recorded (of every output entry, relative to the largest output, or of ``loss_fn(output)``);
    the gradient's radial part ``|<∇, w>|/(‖∇‖‖w‖)`` is measured per group of more than one entry
    (a group of one entry is parallel to its gradient whatever it is: the rescaling decides), for
    ``loss_fn`` or by default a fixed random projection of the outputs.  A bias declared
    ``"cancelled"`` (never updated by psiopt) gets a random offset of ``c·max(1, max|b|)`` per
    entry instead (its ``cosine`` is reported as 0: the change of the outputs decides).  Where
    two random seeds give different outputs (dropout, drop path), every change is measured under
    three seeds' draws.

    Each parameter gets a verdict: ``"exact"`` when both measures are within ``tol``; else the
    check is repeated with every normalisation layer's ``eps`` set to ~0, and a parameter within
    ``tol`` then is invariant ``"up to eps"`` (a row whose variance is not large against the
    layer's eps, e.g. with a tiny batch: relative effect about ``eps/σ²``); otherwise ``"NOT
    INVARIANT"`` (a failure).  The model's parameters, buffers and modes are restored.
    """
    _outside_inference_mode(model, "check_invariance")
    mapping = _mapping(model, groups_or_mapping)
    if not mapping:
        raise ValueError("check_invariance: nothing to check: no parameter is declared "
                         "scale-invariant or cancelled (pass param groups with a 'grouping' or a mapping "
                         "{name: grouping}, e.g. from find_scale_invariant)")
    params = _check_mapping(model, mapping)
    measured = _measure(model, example_inputs, mapping, params, scales, loss_fn)
    failing = [n for n, (change, cos, _) in measured.items() if max(change, cos) > tol]
    again = {}
    if failing:
        with _no_eps(model):
            again = _measure(model, example_inputs, {n: mapping[n] for n in failing}, params,
                             scales, loss_fn)
    checks = []
    for name, (change, cos, worst) in measured.items():
        verdict = EXACT
        if name in again:
            verdict = UP_TO_EPS if max(again[name][:2]) <= tol else NOT_INVARIANT
        checks.append(GroupCheck(name, mapping[name], change, cos, worst, verdict))
    return InvarianceReport(checks, tol)


def _measure(model, example_inputs, mapping, params, scales, loss_fn) -> dict:
    """``{name: (loss_change, cosine, worst_group)}`` for the declared parameters."""

    def observed(out) -> Tensor:
        """What rescaling must not change: ``loss_fn(out)``, or every output entry."""
        if loss_fn is not None:
            return loss_fn(out).reshape(1)
        return torch.cat([t.reshape(-1) for t in _outputs(out)])

    def observed_at(seed: int = 0) -> Tensor:
        with _pristine(model, seed=seed), torch.no_grad():
            return observed(_call(model, example_inputs)).double()

    with _pristine(model), torch.enable_grad():
        out = observed(_call(model, example_inputs))
        gen = torch.Generator(device="cpu").manual_seed(1234)
        weights = (torch.ones(1, dtype=out.dtype) if loss_fn is not None
                   else torch.randn(out.numel(), generator=gen, dtype=out.dtype))
        grads = torch.autograd.grad(out @ weights.to(out.device), [params[n] for n in mapping],
                                    allow_unused=True)
    base = out.detach().double()
    scale = base.abs().max().clamp_min(1e-12)
    # a pass with random draws (dropout, drop path): every change measured under three draws,
    # as a shift that one draw removes need not be removed by the next
    bases = {0: base}
    if not torch.equal(observed_at(1), base):
        bases.update({seed: observed_at(seed) for seed in (1, 2)})

    def moved() -> float:
        return max(float((observed_at(seed) - b).abs().max() / scale) for seed, b in bases.items())

    results = {}
    for (name, grouping), grad in zip(mapping.items(), grads):
        p = params[name]
        saved = p.detach().clone()
        change = 0.0
        if parse_grouping(grouping)[0] == CANCELLED:  # (of a part: the other rows kept)
            offset = torch.zeros_like(p.data)
            shifted = part(offset, grouping)
            shifted.copy_(torch.randn(shifted.shape, generator=gen, dtype=p.dtype).to(p.device))
            offset.mul_(saved.abs().max().clamp_min(1.0))
            for c in scales:
                p.data.add_(offset, alpha=c)
                change = max(change, moved())
                p.data.copy_(saved)
            results[name] = (change, 0.0, 0)
            continue
        view = rows(p.data, grouping)
        for c in scales:
            for parity in (0, 1)[: min(2, view.shape[0])]:
                factors = torch.ones(view.shape[0], dtype=p.dtype, device=p.device)
                factors[parity::2] = c
                view.mul_(factors.view(-1, *[1] * (view.dim() - 1)))
                change = max(change, moved())
                p.data.copy_(saved)
        g = rows(grad if grad is not None else torch.zeros_like(p), grouping)
        w = view.double()
        cos = (w * g.double()).flatten(1).sum(1).abs() / (norm(w) * norm(g.double())).flatten()
        cos = torch.nan_to_num(cos, nan=0.0)
        if w[0].numel() == 1:  # a group of one entry: its gradient is always radial
            cos = torch.zeros_like(cos)
        results[name] = (change, float(cos.max()), int(cos.argmax()))
    return results


__all__ = ["find_scale_invariant", "param_groups", "check_invariance", "unit_normalize_",
           "rescale_rows_", "NormStats", "InvarianceReport", "GroupCheck"]
