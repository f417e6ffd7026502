"""How a traced forward pass transforms when one parameter is rescaled or shifted (SPEC §1).

Discovery (:mod:`psiopt.optim.discovery`) records the aten operations of one forward pass
(:func:`record`: a ``TorchDispatchMode``, so views, permutes, decomposed norms, ``F.normalize``,
attention and parametrizations all appear as the ops they really are) and asks, for one parameter
at a time, whether a candidate transformation of it leaves every output unchanged.

Every tensor ``v`` of the pass is given an abstract value ``v ↦ exp(κF) ⊙ v + O``:

* ``F``: integer *labels* in float64, broadcastable to ``v`` (size-1 dimensions where the factor
  is constant).  A rescaled parameter starts with one random integer label per group; products
  add labels, ``sqrt`` halves them, so equality and constancy of factors are tested exactly.
* ``O``: an additive offset (a float64 tensor, or ``None``), computed from the pass's own values.
  A shifted parameter starts with a random offset; a rescaled tensor added to an unscaled one
  carries the unscaled part as an offset ``(1 − exp(κF)) ⊙ b``.

A tensor nobody transforms has no entry (the identity).  Each op has a rule: views and other
shape ops move ``F`` and ``O`` with the data; products add labels where the contracted dimension
carries one factor; sums and means need a factor constant along the reduced dimensions; a
normalisation (BatchNorm, LayerNorm, GroupNorm, and their decompositions: mean, var, rsqrt,
vector norms) removes a factor and an offset that are constant along what it reduces; softmax
removes an offset constant along its dimension; positively homogeneous maps (ReLU, abs, max
pooling) keep ``F``.  Adding a small constant (``eps`` ≤ :data:`EPS_MAX`, or ``clamp_min(eps)``)
to a rescaled *statistic* (a variance, a norm, a mean or sum of squares) is read as the
normalisation's ``eps``: invariance is claimed *up to eps*, as for every normalisation layer.  An
op without a rule that reads a transformed tensor makes the candidate fail, as does a transformed
model output, buffer or parameter: a miss is possible, a false claim is not (for the ops covered;
``docs/discovery.md`` lists what the dispatcher cannot see).  Parameters and floating inputs that
are constant or hold an exact zero are replaced by perturbed copies (each entry moved by a few
per cent), so that offsets cancel only where they do structurally, not because a weight happens
to be zero (a zero-initialised gain).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

#: labels are integers in [2**40, 2**41) (exact in float64, so are sums of a few of them); the
#: concrete factor of label L is exp(KAPPA * L), in (e, e²)
LABELS = (2 ** 40, 2 ** 41)
KAPPA = 2.0 ** -40
#: a constant at most this large added to a rescaled tensor is read as a normalisation's eps
EPS_MAX = 1e-3
#: relative tolerance of "this offset is constant along these dimensions"
TOL = 1e-9


@dataclass(eq=False)
class Expr:
    """``fn(*args)``, a tensor computed from recorded tensors (``fn`` ``None``: the leaf tensor
    ``args[0]``).  It is the *centre* ``c`` of an offset ``O = (1 − exp(κF)) ⊙ c``: the point the
    tensor is rescaled around (a bias added after a rescaled product, ``W β + b`` after a
    rescaled norm gain and a linear map).  A BatchNorm's running mean follows a rescaling as
    ``s (mean − c) + c``, with ``c`` evaluated again from the model's current tensors
    (:meth:`Trace.bind`).  The functions hold no tensor: ``copy.deepcopy`` of a bound
    expression follows the copied model."""

    fn: object
    args: tuple

    def value(self, leaf=lambda t: t) -> Tensor:
        """The tensor, each leaf ``t`` read as ``leaf(t)``."""
        if self.fn is None:
            return leaf(self.args[0])
        return self.fn(*(a.value(leaf) for a in self.args))

    def mapped(self, leaf) -> Expr:
        """The same expression with each leaf tensor ``t`` replaced by ``leaf(t)``."""
        if self.fn is None:
            return Expr(None, (leaf(self.args[0]),))
        return Expr(self.fn, tuple(a.mapped(leaf) for a in self.args))


def _leaf(t) -> Expr | None:
    return Expr(None, (t,)) if isinstance(t, Tensor) else None


def _apply(fn, *args) -> Expr | None:
    """``fn(*args)``, or ``None`` (no centre) when an argument has none."""
    return None if any(a is None for a in args) else Expr(fn, args)


def _op_name(func) -> str:
    """``"aten::view.default"``: how an :class:`Expr` names an op (an ``OpOverload`` does not
    pickle; ``torch.save`` of an optimizer holds the expressions of its running statistics)."""
    return f"{func._schema.name}.{func._overloadname}"


def _op(name: str):
    namespace, _, rest = name.partition("::")
    packet, _, overload = rest.rpartition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload)


def _invoke(name: str, template: dict, names: tuple, pos: int, *tensors) -> Tensor:
    """Output ``pos`` of the aten op called ``name`` on ``template``'s arguments and ``tensors``
    (named ``names``)."""
    out = Op(_op(name), {**template, **dict(zip(names, tensors))}, [], []).call({})
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)][pos]


@dataclass(eq=False)
class Value:
    """``v ↦ exp(κF) ⊙ v + O``; ``bias``: an :class:`Expr` ``c`` with ``O == (1 − exp(κF)) ⊙ c``
    (or ``None``: unknown)."""

    F: Tensor
    O: Tensor | None = None
    bias: Expr | None = None
    #: a statistic (a variance, a norm, a mean or sum of squares, or a positive power of one):
    #: where a normalisation adds its eps
    stat: bool = False
    #: an even power (a square): a mean or sum of it is a statistic
    even: bool = False
    #: how far the offset is known to be the same for any input (a shift of parameters, carried
    #: by ops that read no input; see :func:`_offset_fixed`): :data:`ANY_INPUT` nowhere,
    #: :data:`EVERY_SAMPLE`, or :data:`EVERYWHERE` (every sample and position: a bias reshaped to
    #: broadcast)
    fixed: int = 0


ANY_INPUT, EVERY_SAMPLE, EVERYWHERE = 0, 1, 2


class Broken:
    """A tensor that no longer transforms in a way the analysis can describe."""


BROKEN = Broken()


class Failed(Exception):
    """The candidate transformation changes the outputs (or cannot be shown not to)."""


@dataclass
class Op:
    func: object
    args: dict  # argument name -> value, in schema order
    outs: list  # the returned tensors (flattened)
    writes: list  # names of arguments the op writes
    versions: dict = field(default_factory=dict)  # id -> version when the op read (or made) it

    @property
    def name(self) -> str:
        return self.func.overloadpacket.__name__

    def call(self, replace: dict, func=None):
        """Call ``func`` (default: this op) with this op's arguments, some replaced."""
        args = {**self.args, **replace}
        pos, kw, gap = [], {}, False
        for a in self.func._schema.arguments:
            if a.name not in args:
                gap = True
            elif a.kwarg_only or gap:
                kw[a.name] = args[a.name]
            else:
                pos.append(args[a.name])
        return (func or self.func)(*pos, **kw)


_PAUSED = [0]


@contextlib.contextmanager
def unrecorded():
    """Ops run inside are not recorded (nor substituted) by an active :func:`record`."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


class _Recorder(TorchDispatchMode):
    def __init__(self, substitute: dict[int, Tensor]):
        super().__init__()
        self.ops: list[Op] = []
        self.substitute = substitute

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _PAUSED[0]:
            return func(*args, **(kwargs or {}))
        sub = self.substitute
        swap = lambda a: sub.get(id(a), a) if isinstance(a, Tensor) else a  # noqa: E731
        # (inside lists too: a parameter read by torch.cat/stack among others was invisible,
        # e.g. Swin-V2's qkv bias cat((q_bias, zeros_like(v_bias), v_bias)): v_bias "cancelled")
        args, kwargs = tree_map(swap, (tuple(args), dict(kwargs or {})))
        read = [t for t in tree_flatten([args, kwargs])[0] if isinstance(t, Tensor)]
        versions = {id(t): t._version for t in read}
        out = func(*args, **kwargs)
        schema = func._schema.arguments
        named = {a.name: v for a, v in zip(schema, args)}
        named.update(kwargs)
        writes = [a.name for a in schema if a.alias_info is not None and a.alias_info.is_write]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        for t in outs:
            versions.setdefault(id(t), t._version)
        self.ops.append(Op(func, named, outs, writes, versions))
        return out


#: for :meth:`Trace.split_after`: ops that only move entries, ops that map or combine, ops that split
_SHAPE_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
              "squeeze", "clone", "alias", "detach", "flatten", "unflatten", "contiguous"}
#: shape ops that move no dimension: a dimension added or dropped, a copy, a broadcast
_IN_PLACE_OF_DIMS = frozenset(("unsqueeze", "squeeze", "clone", "alias", "detach", "contiguous", "expand"))
_MIXING = {"addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "add",
           "mul", "sub", "div"}
#: products (see Propagation.step): the arguments each multiplies (not the term addmm/baddbmm
#: add, nor a conv's bias)
_FACTORS = {"mm": ("self", "mat2"), "bmm": ("self", "mat2"), "mv": ("self", "vec"),
            "dot": ("self", "tensor"), "vdot": ("self", "other"), "addmm": ("mat1", "mat2"),
            "baddbmm": ("batch1", "batch2"), "convolution": ("input", "weight"),
            "_convolution": ("input", "weight")}
_SPLITS = {"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "unbind", "slice",
           "select", "narrow", "chunk", "unsafe_chunk"}


@dataclass(eq=False)
class Trace:
    """The aten ops of one forward pass, with what the propagation needs to know about tensors:
    ``first[id]`` (the first op reading a tensor), ``dies[i]`` (tensors last read by op ``i``,
    outputs and ``keep`` excluded) and ``storage[id]`` (tensors sharing its storage)."""

    ops: list[Op]
    first: dict[int, int]
    dies: dict[int, list[int]]
    storage: dict[int, list[int]]
    bn_calls: dict[int, int]  # id(running_mean) -> batch-norm ops that read it
    last: dict[int, int]  # id -> the last op that reads or writes a tensor
    originals: dict[int, Tensor] = field(default_factory=dict)  # recorded tensor -> the model's
    outputs: set[int] = field(default_factory=set)  # ids of the tensors the pass returned
    masks: set[int] = field(default_factory=set)  # ids of masks (see :func:`_masks`)
    random: set[int] = field(default_factory=set)  # ids of tensors that depend on a random draw
    #: whether Python read a value that depends on a random draw (``if torch.rand([]) < p``:
    #: LayerDrop), so that another draw may take other ops
    branches_on_random: bool = False
    #: ids of running statistics that something besides a batch-norm op reads (an op, or the
    #: caller: returned): they cannot follow a rescaling unseen
    stats_read: set[int] = field(default_factory=set)
    training: bool = True  # recorded in train mode
    _producers: dict | None = field(default=None, repr=False)
    #: ids of the tensors ``nn.InstanceNorm`` modules were called on (see :func:`_instance_view`)
    instance_inputs: set[int] = field(default_factory=set)
    _input_free: dict = field(default_factory=dict, repr=False)

    def input_free(self, t: Tensor) -> bool:
        """Whether ``t`` is computed from the model's tensors alone (:meth:`bind`): the same for
        any input (a parameter, ``weight.t()``)."""
        if id(t) not in self._input_free:
            self._input_free[id(t)] = self.bind(_leaf(t)) is not None
        return self._input_free[id(t)]

    def producer(self, t: Tensor) -> Op | None:
        """The recorded op that made ``t`` (``None``: an input, a parameter, a constant)."""
        if self._producers is None:
            self._producers = {id(o): op for op in self.ops for o in op.outs}
        return self._producers.get(id(t))

    def pin(self, tensors) -> None:
        """Tensors whose values matter after the pass (never dropped as dead)."""
        ids = {id(t) for t in tensors}
        self.dies = {i: [k for k in dead if k not in ids] for i, dead in self.dies.items()}

    def split_after(self, ids) -> bool:
        """Whether a tensor made from the tensors ``ids`` (a parameter) by shape ops, at most one
        op that maps or combines it (a linear map, a sum, a product) and shape ops again is
        split, sliced or indexed (``unbind``, ``split``, ``slice``, ``select``: a fused
        projection's blocks), the only way a part of the parameter can be invariant on its own
        (discovery tries parts only then; a cheap necessary condition, not a proof)."""
        reached = {k: 0 for k in ids if k in self.first}
        if not reached:
            return False
        for op in self.ops[min(self.first[k] for k in reached):]:
            depths = [reached[id(t)] for t in op.args.values() if isinstance(t, Tensor) and id(t) in reached]
            if not depths:
                continue
            if op.name in _SPLITS:
                return True
            depth = min(depths) + (op.name in _MIXING)
            if op.name in _SHAPE_OPS or (op.name in _MIXING and depth <= 1):
                for t in op.outs:
                    reached.setdefault(id(t), depth)
        return False

    def bind(self, expr: Expr, usable=lambda t: True) -> Expr | None:
        """``expr`` as a function of the model's own tensors (:attr:`originals` that are
        ``usable``): each other leaf is replaced by the recorded ops that made it, down to the
        model's tensors.  ``None`` when a leaf depends on anything else (the input, a random
        op, an op that writes) or when replaying those ops does not give the leaf's value (it
        was written in place after it was made)."""
        memo: dict[int, Expr | None] = {}  # each recorded tensor replayed once (a residual
        #                                    network's shared ancestry: exponential otherwise)

        def replayed(e: Expr, depth: int) -> Expr | None:
            if e.fn is not None:
                args = []
                for a in e.args:  # (the first that cannot be replayed ends it)
                    args.append(replayed(a, depth))
                    if args[-1] is None:
                        return None
                return Expr(e.fn, tuple(args))
            t = e.args[0]
            if id(t) not in memo:
                memo[id(t)] = leaf(t, depth)
            return memo[id(t)]

        def leaf(t: Tensor, depth: int) -> Expr | None:
            if id(t) in self.originals:
                return _leaf(t) if usable(self.originals[id(t)]) else None
            op = self.producer(t)
            if op is None or depth > 64 or op.writes or \
                    torch.Tag.nondeterministic_seeded in op.func.tags or any(
                        isinstance(a, Tensor) for v in op.args.values() if isinstance(v, (list, tuple))
                        for a in v):
                return None
            names = tuple(k for k, v in op.args.items() if isinstance(v, Tensor))
            template = {k: v for k, v in op.args.items() if k not in names}
            pos = next(i for i, o in enumerate(op.outs) if o is t)
            return replayed(Expr(functools.partial(_invoke, _op_name(op.func), template, names, pos),
                                 tuple(_leaf(op.args[k]) for k in names)), depth + 1)

        out = replayed(expr, 0)
        if out is None:
            return None
        value, recorded = out.value(Tensor.detach), expr.value(Tensor.detach)
        if value.shape != recorded.shape or not torch.allclose(value, recorded, rtol=1e-5, atol=0):
            return None
        return out.mapped(lambda t: self.originals[id(t)])


def record(call, substitute: dict[int, Tensor], keep=()) -> Trace:
    """Run ``call()`` and record its aten ops; a tensor whose ``id`` is a key of ``substitute``
    is replaced by the value wherever an op reads it.  ``keep``: tensors whose values matter after
    the pass (buffers, parameters), never dropped as dead."""
    with torch.no_grad(), _Recorder(substitute) as rec:
        out = call()
    first, last, by_storage, seen = {}, {}, {}, {}
    for i, op in enumerate(rec.ops):
        for t in tree_flatten(list(op.args.values()))[0] + op.outs:
            if not isinstance(t, Tensor):
                continue
            if id(t) not in seen:
                seen[id(t)] = t
                if t.numel() and t.layout == torch.strided:
                    by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(id(t))
            last[id(t)] = i
        for t in tree_flatten(list(op.args.values()))[0]:
            if isinstance(t, Tensor):
                first.setdefault(id(t), i)
    # what matters after the pass: the outputs, wherever they sit in the returned object, ``keep``,
    # and every first result of an op that no later op reads (a tensor stored on a module, or
    # returned inside a container the pytree cannot open)
    pinned = {id(t) for t in tensors_in(out)} | {id(t) for t in keep}
    pinned |= {id(op.outs[0]) for i, op in enumerate(rec.ops) if op.outs and last[id(op.outs[0])] == i}
    calls: dict[int, int] = {}
    for op in rec.ops:
        mean = op.args.get("running_mean")
        if isinstance(mean, Tensor):
            calls[id(mean)] = calls.get(id(mean), 0) + 1
    dies: dict[int, list[int]] = {}
    for k, i in last.items():
        if k not in pinned:
            dies.setdefault(i, []).append(k)
    storage = {k: ids for ids in by_storage.values() if len(ids) > 1 for k in ids}
    outputs = {id(t) for t in tensors_in(out)}
    masks, random = _masks(rec.ops)
    branches = any(op.name in _TO_PYTHON and any(id(t) in random for t in op.args.values()
                                                 if isinstance(t, Tensor)) for op in rec.ops)
    return Trace(rec.ops, first, dies, storage, calls, last, outputs=outputs, masks=masks,
                 random=random, branches_on_random=branches,
                 stats_read=_stats_read(rec.ops, outputs, storage))


#: ops that hand a tensor's value to Python (``.item()``, ``if t:``)
_TO_PYTHON = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


def _stats_read(ops: list[Op], outputs: set[int], storage: dict[int, list[int]]) -> set[int]:
    """The ids of the running statistics of the pass's batch-norm ops that another op reads, or
    that the pass returns, themselves or a tensor over their storage (``bn.running_var`` added
    to an output, or a view of it: it changes when the statistics follow a rescaling, which the
    batch-norm rule alone does not see)."""
    names = ("running_mean", "running_var")
    stats = {id(op.args[k]) for op in ops for k in names if isinstance(op.args.get(k), Tensor)}
    alias = {k: s for s in stats for k in storage.get(s, [s])}  # tensor -> the statistic it views
    read = {id(t) for op in ops for k, a in op.args.items() if k not in names
            for t in tree_flatten(a)[0] if isinstance(t, Tensor) and id(t) in alias}
    return {alias[k] for k in read | (alias.keys() & outputs)}


def _draws(op: Op) -> bool:
    """Whether ``op`` draws at random: torch tags it ``nondeterministic_seeded``, and, for dropout
    and attention (tagged whatever their probability), it drops with a probability above 0."""
    if torch.Tag.nondeterministic_seeded not in op.func.tags:
        return False
    if any(a.name == "dropout_p" for a in op.func._schema.arguments):  # attention's kernels
        return float(op.args.get("dropout_p", 0.0)) > 0
    if op.name == "native_dropout":
        return bool(op.args.get("train", True)) and float(op.args["p"]) > 0
    return True


def _masks(ops: list[Op]) -> tuple[set[int], set[int]]:
    """The ids of the masks of a pass: its boolean and integer tensors (inputs, comparisons,
    lengths, an ``arange``), its random draws (ops torch tags ``nondeterministic_seeded``:
    ``bernoulli_``, ``rand_like``; a draw written into a view marks every tensor over that
    storage) and the float tensors made of them alone (a cast, a view, ``mask / keep``, a copy,
    ``F.dropout(torch.ones(...))``: constants the pass makes count as masks).
    Their values are the example's (an input without padding gives a mask of ones; a random
    draw is one draw of many), not perturbed (see :func:`_binary`).  Also returns what depends
    on a random draw in any way (random routing indices, a value Python branches on: see
    :func:`_shape`, ``Trace.branches_on_random``)."""
    masks: set[int] = set()
    random: set[int] = set()
    drawn: set = set()  # storages a random draw was written into

    def where(t):
        return (t.device, t.untyped_storage().data_ptr()) if t.layout == torch.strided else None

    for op in ops:
        ins = [t for t in tree_flatten(list(op.args.values()))[0] if isinstance(t, Tensor)]
        masks.update(id(t) for t in ins if not (t.is_floating_point() or t.is_complex())
                     or where(t) in drawn)
        written = [op.args[k] for k in op.writes if isinstance(op.args.get(k), Tensor)]
        read = [t for t in ins if op.name != "copy_" or all(t is not w for w in written)]
        if op.name.rstrip("_") in _VALUE_FREE:  # (its first argument gives a shape only)
            read = [t for k, t in op.args.items() if k != next(iter(op.args)) and isinstance(t, Tensor)]
        # (a constant the pass makes, ``torch.ones``, is made of masks: of nothing)
        made_of_masks = all(id(t) in masks for t in read)
        draw = _draws(op)
        for t in op.outs + (written if draw or made_of_masks else []):
            if made_of_masks or draw or not (t.is_floating_point() or t.is_complex()):
                masks.add(id(t))
            if draw and where(t) is not None:
                drawn.add(where(t))
        if draw or any(id(t) in random or where(t) in drawn for t in ins):
            random.update(id(t) for t in op.outs + written)
    return masks, random


def tensors_in(obj, kinds=Tensor) -> list:
    """Every tensor (every object of ``kinds``, not opened) in a returned object: containers
    (dicts, lists, tuples, sets) at any depth, and the attributes of dataclasses, namespaces and
    other objects up to five objects deep (an object reached again nearer the top is opened again
    there)."""
    found, nearest, stack = [], {}, [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, kinds):
            found.append(x)
            continue
        if x is None or isinstance(x, (str, bytes, int, float, bool)) or nearest.get(id(x), 99) <= depth:
            continue
        nearest[id(x)] = depth
        if isinstance(x, dict):
            items = list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = list(x)
        elif depth >= 5:
            continue
        else:
            try:
                items = list(vars(x).values())
            except TypeError:  # (no __dict__)
                items = [getattr(x, k, None) for k in getattr(x, "__slots__", ())]
            depth += 1
        stack.extend((item, depth) for item in items)
    return found


def perturbed(t: Tensor, gen: torch.Generator) -> Tensor:
    """``t`` itself where its values are already generic; else (a constant tensor, one with an
    exact zero: zero or one initialisations, identity matrices; or, up to 2¹⁶ entries, one with
    a repeated value: a bias constant within each head) a copy with every entry moved by about
    5 % of the tensor's RMS and of itself."""
    x = t.detach()
    if not x.is_floating_point() or x.numel() == 0:
        return x
    if x.numel() > 1 and bool((x.amin() != x.amax()) & (x != 0).all()) and not (
            x.numel() <= 1 << 16 and torch.unique(x).numel() < x.numel()):
        return x
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    rms = x.float().square().mean().sqrt()
    rms = torch.where(torch.isfinite(rms) & (rms > 0), rms, torch.ones_like(rms)).to(x.dtype)
    return x * (1 + 0.05 * noise) + 0.05 * rms * noise.roll(1)


# -- helpers on labels and offsets ------------------------------------------------------------

def _aligned(F: Tensor, ndim: int) -> Tensor:
    return F.reshape((1,) * (ndim - F.dim()) + tuple(F.shape)) if F.dim() < ndim else F


def _zero(F: Tensor) -> bool:
    return not bool(F.any())


def _dims(dims, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % ndim for d in dims}) if ndim else []


def _const(F: Tensor, dims) -> Tensor | None:
    """``F`` narrowed to size 1 along ``dims`` if it is constant there, else ``None``."""
    for d in dims:
        if F.dim() > d and F.shape[d] > 1:
            first = F.narrow(d, 0, 1)
            if F.stride(d) and not torch.equal(F, first.expand_as(F)):
                return None
            F = first
    return F


def _const_offset(O: Tensor, dims) -> Tensor | None:
    """``O`` narrowed along ``dims`` if constant there up to rounding, else ``None``.  Rounding is
    judged in each slice along a dimension against that slice's own magnitude (a sample of
    offsets near 1e10 beside one near 1 must not hide the other's variation), floored at 1e-6
    of the whole offset's (rounding noise of a slice that should hold zeros)."""
    scale = float(O.abs().max()) if O.numel() else 0.0
    if not math.isfinite(scale):
        return None
    for d in dims:
        if O.dim() > d and O.shape[d] > 1:
            first = O.narrow(d, 0, 1)
            local = O.abs().amax(d, keepdim=True).clamp_min(1e-6 * scale)
            if bool(((O - first).abs() > TOL * local).any()):
                return None
            O = first
    return O


def compact(t: Tensor) -> Tensor:
    """``t`` narrowed to size 1 along every dimension where it is constant (exactly)."""
    for d in range(t.dim()):
        if t.shape[d] > 1:
            first = t.narrow(d, 0, 1)
            if t.stride(d) == 0 or torch.equal(t, first.expand_as(t)):
                t = first
    return t


def _squeeze(t: Tensor, dims, keepdim: bool) -> Tensor:
    return t if keepdim else t.reshape([s for i, s in enumerate(t.shape) if i not in dims])


def _factor(F: Tensor) -> Tensor:
    return torch.exp(KAPPA * F)


#: the versions of the tensors the op being propagated read or made (see :func:`_d`)
_VERSIONS: list[dict] = [{}]


def _d(t) -> Tensor:
    """The value a tensor had when the op being propagated read it, in float64 (a tensor written
    in place since then no longer has it: the candidate fails)."""
    if not isinstance(t, Tensor):
        return torch.tensor(float(t), dtype=torch.float64)
    if _VERSIONS[0].get(id(t), t._version) != t._version:
        raise Failed("a value the pass overwrote in place later")
    return t.detach().double()


def _add_offsets(*offsets) -> Tensor | None:
    present = [o for o in offsets if o is not None]
    if not present:
        return None
    total = present[0]
    for o in present[1:]:
        total = total + o
    return total


def _identity(ndim: int, device) -> Value:
    return Value(torch.zeros((1,) * ndim, dtype=torch.float64, device=device))


# -- propagation -------------------------------------------------------------------------------

class Propagation:
    """Propagates one transformation through a recorded pass (see the module docstring).

    ``links`` collects, for every BatchNorm with running statistics that cancels the
    transformation, ``(running_mean, per-channel labels, per-channel bias or None)``: what its
    statistics must follow for the eval-mode network to stay unchanged.
    """

    def __init__(self, trace: Trace, follow_stats: bool = True):
        self.follow_stats = follow_stats
        self.trace = trace
        self.ops, self.storage = trace.ops, trace.storage
        self.dies, self.last = trace.dies, trace.last
        self.env: dict[int, Value | Broken] = {}
        self.links: list[tuple[Tensor, Tensor, Tensor | None]] = []
        #: transformed tensors detached (``detach``, ``.data``): no op may read them (see
        #: :meth:`step`)
        self.untracked: set[int] = set()
        #: whether an op other than a shape op (a view, a part, a stack, an index) read a
        #: transformed tensor and made an untransformed floating output (a normalisation, a
        #: softmax, a difference that cancels): a candidate that none removes (a part of an
        #: MoE's experts the example routes no token to; rows a projection computes that a slice
        #: to the example's length drops) is shown nothing by the pass
        self.removed = False

    def get(self, t) -> Value | Broken | None:
        return self.env.get(id(t)) if isinstance(t, Tensor) else None

    def run(self, start: int, seeds: dict[int, Value]) -> dict[int, Value | Broken]:
        """Propagate ``seeds`` from op ``start``; the values still alive at the end (outputs,
        buffers, parameters) are returned."""
        self.env.update(seeds)
        done = max(self.last.get(k, start) for k in seeds)  # the seeds' last use
        for i in range(start, len(self.ops)):
            if i > done and self.env.keys() <= seeds.keys():
                break  # nothing but the seeds themselves is transformed any more
            self.step(self.ops[i])
            for dead in self.dies.get(i, ()):
                self.env.pop(dead, None)
        return self.env

    def step(self, op: Op) -> None:
        tensors = [v for v in tree_flatten(list(op.args.values()))[0] if isinstance(v, Tensor)]
        values = [self.get(t) for t in tensors]
        if all(v is None for v in values):
            for t in op.outs:  # an op of untouched tensors (or one that overwrites a tensor)
                self._set(t, None)
            return
        if any(v is BROKEN for v in values):
            raise Failed(f"{op.func} reads a tensor the analysis cannot describe")
        if op.name in _FACTORS and any(v is not None and v.O is not None for v in values) and any(
                isinstance(t, Tensor) and self.get(t) is None and id(t) in self.trace.masks
                for t in map(op.args.get, _FACTORS[op.name])):
            for t in op.outs:  # an offset through a product with a mask (see _binary): one draw's
                self._set(t, BROKEN)
            return
        if any(v is not None and id(t) in self.untracked for t, v in zip(tensors, values)):
            # its output may be invariant, but not its gradient, which is not that of the
            # invariant function (W / W.norm(1).detach(): rows whose gradient is not
            # orthogonal to them)
            raise Failed(f"{op.func} reads a transformed tensor that was detached")
        name = op.name.rstrip("_") if _in_place(op) else op.name
        rule = _RULES.get(name) or _RULES.get(op.name)
        if rule is None:
            first = next(iter(op.args), None)
            rest = [v for k, v in op.args.items() if k != first]
            if name not in _VALUE_FREE or any(
                    self.get(t) is not None for t in tree_flatten(rest)[0] if isinstance(t, Tensor)):
                raise Failed(f"no rule for {op.func}")
            results = [None] * len(op.outs)  # only the shape of its first argument is read
        else:
            _VERSIONS[0] = op.versions
            try:
                results = rule(self, op)
            except (RuntimeError, ValueError, IndexError, TypeError, KeyError, StopIteration) as e:
                raise Failed(f"{op.func}: {e}") from None  # a shape the rule does not handle
        for t, v in zip(op.outs, results):
            self._set(t, v)
            if op.name == "detach" and self.get(t) is not None:
                self.untracked.add(id(t))
        for t in op.outs[len(results):]:
            self._set(t, BROKEN)
        if rule not in (None, _shape, _passthrough) and any(
                t.is_floating_point() and self.get(t) is None for t in op.outs):
            self.removed = True  # (a view, a copy, a part, a stack or an index removes nothing)
        self._written(op)

    def _set(self, t: Tensor, v) -> None:
        if isinstance(v, Value) and (v.O is None or _zero(v.O)) and _zero(v.F):
            v = None  # back to the identity (the rows outside a part, split off: q beside k)
        if v is None:
            self.env.pop(id(t), None)
        else:
            self.env[id(t)] = v

    def _written(self, op: Op) -> None:
        """An in-place write reaches every other view of the same storage: those views are lost
        (a write the rule did not describe loses the written tensor too)."""
        outs = {id(t) for t in op.outs}
        for name in op.writes:
            if name in ("running_mean", "running_var"):
                continue  # the batch-norm rule records what its statistics must follow
            t = op.args.get(name)
            if not isinstance(t, Tensor):
                continue
            if id(t) not in outs:
                self.env[id(t)] = BROKEN
            for other in self.storage.get(id(t), ()):
                if other != id(t):
                    self.env[other] = BROKEN

    # the value of an argument as (concrete float64 tensor, Value) with F aligned to its ndim
    def value(self, t) -> Value:
        v = self.get(t)
        ndim = t.dim() if isinstance(t, Tensor) else 0
        device = t.device if isinstance(t, Tensor) else None
        if v is None:
            return _identity(ndim, device)
        return Value(_aligned(v.F, ndim), None if v.O is None else _aligned(v.O, ndim), v.bias, v.stat,
                     v.even, v.fixed)


# -- rules -------------------------------------------------------------------------------------

def _add(a, va: Value, b, vb: Value, alpha: float = 1.0, concrete=None, exprs=None,
         p: Propagation | None = None) -> Value | None:
    """``a + alpha·b`` (``concrete``: callables giving a, b as float64 when an offset needs them;
    ``exprs``: :class:`Expr` of a, b where they are not the tensors themselves; ``p``: the
    propagation, to refuse degenerate example data, :func:`_degenerate_data`)."""
    fa, fb = _zero(va.F), _zero(vb.F)
    exprs = exprs or {}
    get_a = (concrete or {}).get("a", lambda: _d(a))
    get_b = (concrete or {}).get("b", lambda: _d(b))
    Ob = None if vb.O is None else vb.O * alpha
    fixed = _least_fixed(va, vb)
    if fa and fb:
        O = _add_offsets(va.O, Ob)
        return None if O is None else Value(va.F if va.F.dim() >= vb.F.dim() else vb.F, O, fixed=fixed)
    if not isinstance(b, Tensor) and not fa and va.stat and abs(alpha * b) <= EPS_MAX:
        return va  # a normalisation's eps, added to a statistic
    if torch.equal(*torch.broadcast_tensors(va.F, vb.F)):
        F = torch.broadcast_tensors(va.F, vb.F)[0]
        return Value(F, _add_offsets(va.O, Ob), fixed=fixed)
    if fb:  # b unscaled: (s a + Oa) + α(b + Ob) = s(a + αb) + Oa + αOb + (1 − s)αb
        if p is not None and _degenerate_data(p, b):
            return BROKEN  # (its offset (1 − s)αb would look constant where b repeats a value)
        rest = (1 - _factor(va.F)) * (alpha * get_b())
        centre = _apply(functools.partial(_scaled, alpha), exprs.get("b", _leaf(b))) \
            if alpha in (1, -1) else None  # (another alpha: a number, see _times)
        return Value(va.F, _add_offsets(va.O, Ob, rest), _centre(va, vb, centre))
    if fa:
        if p is not None and _degenerate_data(p, a):
            return BROKEN
        rest = (1 - _factor(vb.F)) * get_a()
        return Value(vb.F, _add_offsets(va.O, Ob, rest), _centre(vb, va, exprs.get("a", _leaf(a))))
    return BROKEN


def _scaled(alpha: float, t: Tensor) -> Tensor:
    return t if alpha == 1 else alpha * t


def _centre(scaled: Value, unscaled: Value, added: Expr | None) -> Expr | None:
    """The centre of ``scaled + added`` (``added`` unscaled, without an offset of its own):
    ``added``, plus the centre of ``scaled``'s offset if it has one."""
    if unscaled.O is not None:
        return None
    if scaled.O is None:
        return added
    return _apply(torch.add, scaled.bias, added)


def _mul(a, va: Value, b, vb: Value) -> Value | Broken:
    if va.O is None and vb.O is None:
        return Value(_sum_aligned(va.F, vb.F))
    if _zero(vb.F) and vb.O is None:
        return Value(va.F, va.O * _d(b), _times(va.bias, b, torch.mul))
    if _zero(va.F) and va.O is None:
        return Value(vb.F, vb.O * _d(a), _times(vb.bias, a, torch.mul))
    return BROKEN


def _degenerate_data(p: Propagation, t) -> bool:
    """Whether ``t`` is an untransformed float tensor computed from the input whose example
    values are degenerate: all zeros, or one value repeated along a dimension of several
    entries (not a broadcast: a 1×1 map upsampled, the rows one index picks for every sample).
    An offset that meets it (times it, or as what a rescaled tensor is added to) may vanish or
    look constant there only on this example (a model's own tensors are read through
    perturbed copies instead)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or p.get(t) is not None or \
            p.trace.input_free(t):
        return False
    return t.numel() == 0 or not bool(t.any()) or _repeats(t)


def _structurally_zero(trace: Trace, centre: Expr | None) -> bool:
    """Is ``centre`` zero whatever the model's tensors are (``b − b``, not a buffer that happens
    to hold zeros now)?  Bound to the model's tensors (:meth:`Trace.bind`) and evaluated twice
    with random values in their place."""
    bound = None if centre is None else trace.bind(centre)
    if bound is None:
        return False
    gen = torch.Generator().manual_seed(2)

    def random(t: Tensor, drawn: dict) -> Tensor:
        if id(t) not in drawn:
            drawn[id(t)] = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
        return drawn[id(t)]

    return not any(bool(bound.value(functools.partial(random, drawn={})).any()) for _ in range(2))


def _times(centre: Expr | None, b, op) -> Expr | None:
    """The centre of an offset multiplied (``op``: ``torch.mul``/``torch.div``) by an untouched
    tensor ``b``.  A Python number has none: it may have been read from the data or from a
    setting that changes later (``x * float(x.mean())``), which a centre cannot follow."""
    return _apply(op, centre, _leaf(b)) if isinstance(b, Tensor) else None


def _sum_aligned(Fa: Tensor, Fb: Tensor) -> Tensor:
    n = max(Fa.dim(), Fb.dim())
    return _aligned(Fa, n) + _aligned(Fb, n)


def _binary(p: Propagation, op: Op, x, y, kind: str):
    a, b = op.args[x], op.args.get(y, op.args.get("other"))
    va, vb = p.value(a), p.value(b)
    if kind in ("add", "sub", "rsub"):
        alpha = op.args.get("alpha", 1) * (1 if kind == "add" else -1)
        r = _add(b, vb, a, va, alpha, p=p) if kind == "rsub" else _add(a, va, b, vb, alpha, p=p)
        if isinstance(r, Value) and r.O is not None and not bool(r.O.any()) and \
                _structurally_zero(p.trace, r.bias):
            r = Value(r.F)  # z − b after z = W x + b: the offset cancels whatever b is
    elif kind == "mul":
        if any(v.O is not None and isinstance(t, Tensor) and id(t) in p.trace.masks
               for v, t in ((va, b), (vb, a))):
            # an offset times a mask: the mask is the example's (all ones without padding: the
            # offset looked constant, and was not once a sequence was padded; a drop-path draw
            # that kept every sample, and not the next one)
            return [BROKEN]
        if any(v.O is not None and _degenerate_data(p, t) for v, t in ((va, b), (vb, a))):
            # an offset times degenerate example data (0 everywhere: h − h.mean(1) over one
            # token, then a linear map without bias; or one value repeated along positions)
            return [BROKEN]
        r = _mul(a, va, b, vb)
        if a is b and isinstance(r, Value):
            r.even = True  # x * x
    else:  # div
        if op.args.get("rounding_mode") is not None:
            raise Failed(f"{op.func} rounds")
        if va.O is not None and _degenerate_data(p, b):
            r = BROKEN  # an offset over degenerate example data (see mul)
        elif vb.O is None and _zero(vb.F):
            r = Value(va.F, None if va.O is None else va.O / _d(b), _times(va.bias, b, torch.div))
        elif va.O is None and vb.O is None:
            r = Value(_sum_aligned(va.F, -vb.F))
        else:
            r = BROKEN
    if r is not None and r is not BROKEN:
        r.F = _aligned(r.F, op.outs[0].dim())
    return [r]


def _unary_power(k: float):
    def rule(p: Propagation, op: Op):
        v = p.value(op.args["self"])
        if v.O is not None:
            return [BROKEN]
        even = float(k).is_integer() and int(k) % 2 == 0 and k > 0
        return [Value(v.F * k, stat=v.stat and k > 0, even=even)]
    return rule


def _pow(p: Propagation, op: Op):
    k = op.args["exponent"]
    if isinstance(k, Tensor):
        raise Failed("a tensor exponent")
    return _unary_power(float(k))(p, op)


def _homogeneous(p: Propagation, op: Op):
    """relu, leaky_relu, abs: ``f(s x) = s f(x)`` for ``s > 0`` (no offset)."""
    v = p.value(op.args["self"])
    return [BROKEN if v.O is not None else Value(v.F)]


def _clamp_min(p: Propagation, op: Op):
    low = op.args.get("min")
    high = op.args.get("max")
    v = p.value(op.args["self"])
    small = low is not None and not isinstance(low, Tensor) and 0 <= low <= EPS_MAX
    if not small or high is not None or v.O is not None or (low > 0 and not v.stat):
        raise Failed(f"{op.func} of a transformed tensor")
    return [Value(v.F, stat=v.stat)]  # clamp_min(norm, eps): F.normalize's eps; (x, 0): a ReLU


def _shape(p: Propagation, op: Op):
    """Views, copies, indexing, concatenation: the same op applied to F and O.  Not in place
    (``unsqueeze_``: the recorded tensor has the shape after the op), nor with indices drawn at
    random (a random routing or top-k: the recorded draw reads rows the next one does not)."""
    first = next(iter(op.args))
    src = op.args[first]
    many = isinstance(src, (list, tuple))
    srcs = list(src) if many else [src]
    rest = [v for k, v in op.args.items() if k != first]
    if any(isinstance(p.get(t), Value) or id(t) in p.trace.random
           for t in tree_flatten(rest)[0] if isinstance(t, Tensor)) or \
            any(name != first for name in op.writes) or _in_place(op):
        return [BROKEN] * len(op.outs)  # transformed or random indices or fill values, out=
    has_offset = any(isinstance(p.get(t), Value) and p.get(t).O is not None for t in srcs)
    if op.name == "constant_pad_nd" and not any(op.args["pad"]) and has_offset:
        # a padding of nothing: its amount is computed from the input's size (TF's "same"
        # padding, a U-Net's skip), and an offset would meet zeros on another input
        return [BROKEN] * len(op.outs)
    if op.name == "cat" and has_offset and any(isinstance(t, Tensor) and t.numel() == 0 for t in srcs):
        return [BROKEN] * len(op.outs)  # a padding by an empty piece (as by nothing, above)
    if _degenerate_indices(p, rest) and any(_varies(p.get(t)) for t in srcs):
        return [BROKEN] * len(op.outs)

    def full(t, part):
        if not isinstance(t, Tensor):
            return t
        v = p.value(t)
        if part == "F":
            return v.F.expand(t.shape)
        if v.O is None:
            return torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        return v.O.expand(t.shape)

    def apply(part):
        arg = [full(t, part) for t in srcs] if many else full(src, part)
        fn = torch.ops.aten.reshape.default if op.name in ("view", "_unsafe_view") else None
        if fn is not None:
            res = fn(arg, op.args["size"])
        else:  # padding: the padded entries are 0 in F and O (not scaled, no offset)
            res = op.call({first: arg, **({"value": 0} if op.name == "constant_pad_nd" else {})})
        return [r for r in tree_flatten(res)[0] if isinstance(r, Tensor)]

    Fs = [compact(F) for F in apply("F")]
    Os = [compact(O) for O in apply("O")] if has_offset else [None] * len(Fs)
    centres = [None] * len(Fs)
    if has_offset and not many and not any(isinstance(t, Tensor) for t in tree_flatten(rest)[0]):
        template = {k: v for k, v in op.args.items() if k != first}
        if op.name == "constant_pad_nd":
            template["value"] = 0
        centres = [_apply(functools.partial(_shaped, _op_name(op.func), template, first, tuple(src.shape), i),
                          p.get(src).bias) for i in range(len(Fs))]
    fixed = _least_fixed(*(p.get(t) for t in srcs if isinstance(p.get(t), Value)))
    if any(isinstance(t, Tensor) for t in tree_flatten(rest)[0]):
        fixed = ANY_INPUT  # indices, read from the input perhaps
    elif op.name not in _IN_PLACE_OF_DIMS:  # a rearrangement may move channels into positions,
        fixed = min(fixed, EVERY_SAMPLE)  # a part or a padding make them differ (not per sample)
    return [Value(F, O, c, fixed=fixed) for F, O, c in zip(Fs, Os, centres)]


def _shaped(name: str, template: dict, first: str, shape: tuple, pos: int, c: Tensor) -> Tensor:
    """Output ``pos`` of the shape op called ``name`` applied to the centre ``c`` spread to
    ``shape``."""
    c = _aligned(c, len(shape)).expand(shape)
    if name.partition("::")[2].rpartition(".")[0] in ("view", "_unsafe_view"):
        return c.reshape(template["size"])
    return _invoke(name, template, (first,), pos, c)


def _passthrough(p: Propagation, op: Op):
    """Copies and aliases; a cast must keep a floating dtype (rounding to integers is not
    homogeneous)."""
    dtype = op.args.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        return [BROKEN] * len(op.outs)
    v = p.get(op.args["self"])
    return [v] + [None] * (len(op.outs) - 1)


def _reduce(p: Propagation, op: Op):
    """sum, mean: the factor must be constant along the reduced dimensions."""
    x = op.args["self"]
    dims = _dims(op.args.get("dim"), x.dim())
    keep = bool(op.args.get("keepdim", False))
    v = p.value(x)
    F = _const(v.F, dims)
    if F is None:
        return [BROKEN]
    O = None
    if v.O is not None:
        if _hidden_offset(p, v, x, dims):
            return [BROKEN]  # (x − x.mean(0) is 0 on a batch of one, whatever the offset)
        O = op.func.overloadpacket(v.O.expand(x.shape), dims, keep)
    return [Value(_squeeze(F, dims, keep), O, stat=v.even and O is None, fixed=v.fixed)]


def _spread(p: Propagation, op: Op, power: float, centred: bool):
    """var, std (``centred``: an offset constant along the reduced dimensions cancels) and
    vector norms: the factor must be constant there and comes out raised to ``power``."""
    x = op.args["self"]
    dims = _dims(op.args.get("dim"), x.dim())
    order = op.args.get("ord", op.args.get("p", 2))
    if not centred and (order is None or isinstance(order, Tensor) or float(order) <= 0):
        return [BROKEN]
    keep = bool(op.args.get("keepdim", False))
    v = p.value(x)
    F = _const(v.F, dims)
    if F is None:
        return [BROKEN]
    if _single(x, dims) or v.O is not None and (not centred or not _cancelled(p, v, x, dims, dims)
                                                or _one_value(x, dims)):
        return [BROKEN]  # (over one element: a norm of positions from a one-token example)
    return [Value(_squeeze(F, dims, keep) * power, stat=True)]


def _var(p, op):
    return _spread(p, op, 2.0, True)


def _std(p, op):
    return _spread(p, op, 1.0, True)


def _vector_norm(p, op):
    return _spread(p, op, 1.0, False)


def _amax(p, op):
    x = op.args["self"]
    dims = _dims(op.args.get("dim"), x.dim())
    v = p.value(x)
    F = _const(v.F, dims)
    if F is None or v.O is not None:
        return [BROKEN]
    return [Value(_squeeze(F, dims, bool(op.args.get("keepdim", False))))]


def _large(eps) -> bool:
    """A normalisation layer's ``eps`` beyond :data:`EPS_MAX`: its rows are not read as
    invariant (up to eps), as a hand-written norm's added constant is not (``LayerNorm(eps=1)``
    was claimed, its output 0.1-0.3 off at a scale of 2)."""
    return eps is not None and float(eps) > EPS_MAX


def _single(x: Tensor, dims) -> bool:
    """Whether ``x`` has one element along ``dims`` (or none): there, any offset or factor is
    "constant" and cancels, only because the example has one token, one position of a 1×1
    feature map... which another input need not have (a learned pooling query over one token
    was claimed "cancelled"); a rule that removes what is constant along ``dims`` claims
    nothing then."""
    return math.prod(x.shape[d] for d in dims) <= 1


def _one_value(x: Tensor, dims) -> bool:
    """Whether ``x`` shows one value along ``dims``: :func:`_single`, or one value repeated
    (:func:`_uniform`: the tokens of an upsampled 1×1 map).  An offset computed from it looks
    constant there on this example only.  (Factors are labels, compared exactly whatever the
    values: an input that repeats one value hides no factor.)"""
    return _single(x, dims) or all(_uniform(x, d) for d in dims)


def _softmax(p: Propagation, op: Op):
    x = op.args["self"]
    d = op.args["dim"] % x.dim()
    v = p.value(x)
    if not _zero(v.F) or v.O is None or _const_offset(v.O, [d]) is None or _one_value(x, [d]):
        return [BROKEN]
    return [None]  # softmax(x + c) = softmax(x) for c constant along dim


def _matmul_offset(a, va, b, vb, mul, broadcasts=False) -> Tensor | None:
    """The offset of ``mul(a', b')`` for ``a' = sa·a + Oa``, ``b' = sb·b + Ob``.  ``broadcasts``:
    ``mul`` broadcasts (matmul), so offsets stay compact but along the contracted dimension."""
    sa, sb = _factor(va.F), _factor(vb.F)

    def full(O, t, dim):
        if not broadcasts:
            return O.expand(t.shape)
        O = compact(O)
        shape = list(O.shape)
        shape[dim] = t.shape[dim]
        return O.expand(shape)

    Oa = None if va.O is None else full(va.O, a, a.dim() - 1)
    Ob = None if vb.O is None else full(vb.O, b, b.dim() - 2 if b.dim() > 1 else 0)
    terms = []
    if Ob is not None:
        terms.append(mul(_d(a) * sa, Ob))
    if Oa is not None:
        terms.append(mul(Oa, _d(b) * sb))
    if Oa is not None and Ob is not None:
        terms.append(mul(Oa, Ob))
    return _add_offsets(*terms)


def _matmul_centre(a, va: Value, b, vb: Value, mul, broadcasts=False) -> Expr | None:
    """The centre of ``mul(a', b')``'s offset when one operand is untouched: ``mul(c, b)`` or
    ``mul(a, c)`` (``c`` spread as :func:`_matmul_offset` spreads the offset)."""
    untouched = lambda v: v.O is None and _zero(v.F)  # noqa: E731
    if va.O is not None and untouched(vb):
        dim = a.dim() - 1 if broadcasts else None
        return _apply(functools.partial(_spread_centre, mul, tuple(a.shape), dim, 0), va.bias, _leaf(b))
    if vb.O is not None and untouched(va):
        dim = (b.dim() - 2 if b.dim() > 1 else 0) if broadcasts else None
        return _apply(functools.partial(_spread_centre, mul, tuple(b.shape), dim, 1), _leaf(a), vb.bias)
    return None


def _spread_centre(mul, shape: tuple, dim: int | None, side: int, a: Tensor, b: Tensor) -> Tensor:
    """``mul(a, b)`` with the centre (operand ``side``) expanded to the operand's ``shape``
    (along ``dim`` only, when ``mul`` broadcasts)."""
    ab = [a, b]
    c = _aligned(ab[side], len(shape))
    if dim is None:
        c = c.expand(shape)
    else:
        full = list(c.shape)
        full[dim] = shape[dim]
        c = c.expand(full)
    ab[side] = c
    return mul(*ab)


def _reshaped(shape, t: Tensor) -> Tensor:
    return t.reshape(shape)


def _product(second: str):
    """mm, bmm, mv, dot (``second``: the name of the right operand): each operand's factor must
    be constant along the contracted dimension; the labels add."""
    def rule(p: Propagation, op: Op):
        a, b = op.args["self"], op.args[second]
        va, vb = p.value(a), p.value(b)
        Fa, Fb = _const(va.F, [a.dim() - 1]), _const(vb.F, [max(b.dim() - 2, 0)])
        if Fa is None or Fb is None or (va.O is not None and _degenerate_data(p, b)) or \
                (vb.O is not None and _degenerate_data(p, a)):
            return [BROKEN]  # (an offset times degenerate example data: see _binary)
        F = Fa + Fb if b.dim() > 1 else Fa.squeeze(-1) + Fb.squeeze(-1)
        return [Value(F, _matmul_offset(a, va, b, vb, torch.matmul, broadcasts=True),
                      _matmul_centre(a, va, b, vb, torch.matmul, broadcasts=True),
                      fixed=_fixed_product(p, a, va, b, vb, EVERY_SAMPLE))]  # (it may contract positions)
    return rule


_mm = _product("mat2")


def _addmm(p: Propagation, op: Op):
    bias, out = op.args["self"], op.outs[0]
    beta, alpha = op.args.get("beta", 1), op.args.get("alpha", 1)
    prod = _mm(p, Op(op.func, {"self": op.args["mat1"], "mat2": op.args["mat2"]}, op.outs, []))[0]
    if prod is BROKEN:
        return [BROKEN]
    if alpha != 1 and prod.O is not None:
        prod.O = prod.O * alpha
    vbias = p.value(bias)
    if beta != 1:
        vbias = Value(vbias.F, None if vbias.O is None else vbias.O * beta, fixed=vbias.fixed)
    concrete = {"a": lambda: _d(out) - beta * _d(bias), "b": lambda: beta * _d(bias)}
    exprs = {"b": _leaf(bias) if beta == 1 else None}
    return [_add(None, prod, bias, vbias, 1.0, concrete, exprs)]


def _baddbmm(p: Propagation, op: Op):
    return _addmm(p, Op(op.func, {"self": op.args["self"], "mat1": op.args["batch1"],
                                  "mat2": op.args["batch2"], "beta": op.args.get("beta", 1),
                                  "alpha": op.args.get("alpha", 1)}, op.outs, []))


def _conv(p: Propagation, op: Op):
    x, w, bias = op.args["input"], op.args["weight"], op.args.get("bias")
    out = op.outs[0]
    transposed, groups = bool(op.args["transposed"]), int(op.args["groups"])
    vx, vw = p.value(x), p.value(w)
    nd = x.dim()
    space = list(range(2, nd))
    Fx = _const(vx.F, space)
    if Fx is None:
        return [BROKEN]
    cin = x.shape[1]
    if Fx.shape[1] > 1:  # one factor per group of input channels
        if transposed:
            return [BROKEN]
        blocks = Fx.expand(Fx.shape[0], cin, *Fx.shape[2:]).unflatten(1, (groups, cin // groups))
        blocks = _const(blocks, [2])
        if blocks is None:
            return [BROKEN]
        Fx = blocks.flatten(1, 2).repeat_interleave(out.shape[1] // groups, dim=1)
    if transposed:
        Fw = _const(vw.F, [0, *range(2, w.dim())])
        if Fw is not None and Fw.shape[1] > 1 and groups != 1:
            Fw = None
        Fw = None if Fw is None else Fw.reshape(1, -1, *[1] * (nd - 2))
    else:
        Fw = _const(vw.F, list(range(1, w.dim())))
        Fw = None if Fw is None else Fw.reshape(1, -1, *[1] * (nd - 2))
    if Fw is None:
        return [BROKEN]
    F = Fx + Fw
    params = tuple(op.args[k] for k in ("stride", "padding", "dilation", "transposed", "output_padding",
                                        "groups"))
    conv = functools.partial(_convolution, params)
    prod = Value(F, _matmul_offset(x, vx, w, vw, conv), _matmul_centre(x, vx, w, vw, conv),
                 fixed=_fixed_product(p, x, vx, w, vw, EVERY_SAMPLE))
    if bias is None:
        return [prod]
    vb = p.value(bias)
    shape = (1, -1) + (1,) * (nd - 2)
    vb = Value(vb.F.expand(bias.shape).reshape(shape),
               None if vb.O is None else vb.O.expand(bias.shape).reshape(shape), fixed=vb.fixed)
    concrete = {"a": lambda: _d(out) - _d(bias).reshape(shape), "b": lambda: _d(bias).reshape(shape)}
    exprs = {"b": _apply(functools.partial(_reshaped, shape), _leaf(bias))}
    return [_add(None, prod, bias, vb, 1.0, concrete, exprs)]


def _convolution(params: tuple, a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.aten.convolution(a, b, None, *params)


def _affine(p: Propagation, xhat, ndim: int, weight, bias, shape) -> Value | None:
    """``xhat · weight + bias`` for an untouched ``xhat`` (a callable giving it in float64)."""
    r = None
    if weight is not None and bias is not None and isinstance(p.get(weight), Value) and \
            isinstance(p.get(bias), Value):
        return BROKEN  # one tensor as gain and bias (or both transformed): not described
    if weight is not None:
        vw = p.get(weight)
        if isinstance(vw, Value):
            vw = p.value(weight)
            O = None
            if vw.O is not None:
                xh = xhat()
                if not bool(xh.any()) or _repeats(xh):
                    return BROKEN  # a gain's shift times x̂ = 0, or x̂ repeating one value: the
                    #                example's input is constant or repeats along a dimension
                O = vw.O.expand(weight.shape).reshape(shape) * xh
            r = Value(_aligned(vw.F.expand(weight.shape).reshape(shape), ndim), O)
    if bias is not None and r is not None:  # a rescaled gain: the bias is an offset
        unscaled = {"b": lambda: _d(bias).reshape(shape)}
        exprs = {"b": _apply(functools.partial(_reshaped, tuple(shape)), _leaf(bias))}
        return _add(None, r, bias, _identity(ndim, bias.device), 1.0, unscaled, exprs)
    if bias is not None and isinstance(p.get(bias), Value):
        vb = p.value(bias)
        vb = Value(_aligned(vb.F.expand(bias.shape).reshape(shape), ndim),
                   None if vb.O is None else vb.O.expand(bias.shape).reshape(shape), fixed=vb.fixed)
        va = r or _identity(ndim, bias.device)
        scaled = lambda: xhat() * (_d(weight).reshape(shape) if weight is not None else 1)  # noqa: E731
        r = _add(None, va, bias, vb, 1.0, {"a": scaled, "b": lambda: _d(bias).reshape(shape)})
    return r


def _cancelled(p: Propagation, v: Value, x: Tensor, dims, unseen=(), samples=()) -> bool:
    """Whether ``v``'s factor and offset are constant along ``dims`` (of the example's ``x``).
    ``unseen``: the dimensions among them whose size is the input's, not the model's (a batch,
    positions): where the example has one entry there, or one value repeated
    (:func:`_uniform`), it shows nothing, and the offset must be the same for any input
    (:func:`_offset_fixed`; ``samples``: those that are the batch)."""
    if _const(v.F, dims) is None:
        return False
    if v.O is None:
        return True
    if _const_offset(v.O, dims) is None:
        return False
    ones = [d for d in unseen if _uniform(x, d)]
    return not ones or _offset_fixed(p, v, all(d in samples for d in ones))


def _offset_fixed(p: Propagation, v: Value, samples_only: bool) -> bool:
    """Whether ``v``'s offset is the same for any input: its centre is a function of the model's
    tensors alone (:meth:`Trace.bind`), so the same for every sample, and, along positions
    (not ``samples_only``), computed without the example's shape (:func:`_shape_free`: a bias
    reshaped to broadcast is constant on any feature map; a bias through a zero-padded
    convolution of a 1×1 map is not, on a larger one).  From a batch-1 example an offset
    computed from the sample itself looked constant over the batch, and BatchNorm was read
    as removing it."""
    if v.fixed >= (EVERY_SAMPLE if samples_only else EVERYWHERE):
        return True  # a shift of parameters
    bound = None if v.bias is None else p.trace.bind(v.bias)
    return bound is not None and (samples_only or _shape_free(bound))


def _hidden_offset(p: Propagation, v: Value, x: Tensor, dims) -> bool:
    """Whether ``v`` has an offset that a reduction of ``x`` over ``dims`` cannot be shown to
    treat alike on any input: the example has one entry along one of them (or one value
    repeated, :func:`_uniform`), and the offset is not the same everywhere
    (:func:`_offset_fixed`)."""
    return v.O is not None and any(_uniform(x, d) for d in dims) and not _offset_fixed(p, v, False)


def _uniform(x: Tensor, d: int) -> bool:
    """Whether the example's ``x`` shows one value along dimension ``d``: no entry or one, or
    one repeated up to the rounding offsets are judged by (:func:`_const_offset`: a 1×1 map
    upsampled, bicubic included; a batch of one sample repeated), where anything computed from
    it looks constant there."""
    if x.shape[d] <= 1:
        return True
    if not (x.is_floating_point() or x.is_complex()):
        return bool((x == x.narrow(d, 0, 1)).all())
    x = x.detach()
    scale = float(x.abs().max())
    if not math.isfinite(scale):
        return False
    local = x.abs().amax(d, keepdim=True).clamp_min(1e-6 * scale).to(torch.float64)
    if bool(((x.narrow(d, 1, 1).double() - x.narrow(d, 0, 1).double()).abs() > TOL * local).any()):
        return False  # (the first two entries differ, as _const_offset judges: the common case,
        #              decided without _const_offset's pass over every entry: measured, ResNet-50's
        #              discovery 2.8 s with it, 4.0 s without)
    return _const_offset(x.to(torch.float64), [d]) is not None


def _repeats(t: Tensor) -> bool:
    """Whether the example's ``t`` repeats one value along some dimension of several entries
    (:func:`_uniform`) that is not a broadcast (stride 0: the same on any input)."""
    return any(t.shape[d] > 1 and t.stride(d) != 0 and _uniform(t, d) for d in range(t.dim()))


def _untouched_model_tensor(p: Propagation, t) -> bool:
    """Whether ``t`` is not transformed and computed from the model's tensors alone (a
    parameter, a buffer, ``weight.t()``: :meth:`Trace.input_free`)."""
    return isinstance(t, Tensor) and p.get(t) is None and p.trace.input_free(t)


def _least_fixed(*values: Value) -> int:
    """The :attr:`Value.fixed` level of a sum of ``values``' offsets: the least of theirs."""
    return min((v.fixed for v in values if v.O is not None), default=ANY_INPUT)


def _fixed_product(p: Propagation, a, va: Value, b, vb: Value, most: int) -> int:
    """The :attr:`Value.fixed` level of the offset of a product (a linear map, a convolution)
    of ``a`` and ``b``: the transformed operand's where the other is an untouched tensor of the
    model, at most ``most`` (:data:`EVERY_SAMPLE` where positions are mixed); else none."""
    if va.O is not None and vb.O is None and _untouched_model_tensor(p, b):
        return min(va.fixed, most)
    if vb.O is not None and va.O is None and _untouched_model_tensor(p, a):
        return min(vb.fixed, most)
    return ANY_INPUT


#: the ops a centre may be replayed or reshaped with (:meth:`Trace.bind`, :func:`_shaped`) and
#: still not vary along positions where the example has one: entry-wise arithmetic, transposes
#: and :data:`_IN_PLACE_OF_DIMS` (not a view or reshape to sizes read from the example, which
#: can move channels into positions; not a padded convolution or a padding)
_SHAPE_FREE_OPS = frozenset(("add", "sub", "mul", "div", "neg", "_to_copy", "lift_fresh", "permute",
                             "transpose", "t")) | _IN_PLACE_OF_DIMS


def _shape_free(e: Expr) -> bool:
    """Whether the centre ``e`` is computed without the example's shape: leaves, arithmetic,
    a bias reshaped to broadcast, and the ops of :data:`_SHAPE_FREE_OPS` (not a linear map:
    the dimension it contracts may be positions)."""
    if e.fn is None:
        return True
    fn = e.fn.func if isinstance(e.fn, functools.partial) else e.fn
    if fn in (_invoke, _shaped):  # a recorded op (its name "aten::view.default")
        ok = e.fn.args[0].partition("::")[2].rpartition(".")[0] in _SHAPE_FREE_OPS
    else:
        ok = fn in (_reshaped, _scaled, torch.add, torch.sub, torch.mul, torch.div)
    return ok and all(_shape_free(a) for a in e.args)


def _normalised_away(p: Propagation, v: Value, x: Tensor, dims, reduced: int, eps, unseen=()) -> bool:
    """Whether a normalisation over ``dims`` (``reduced`` elements each) removes ``v``'s factor
    and offset: both constant there (:func:`_cancelled`), over more than one element
    (:func:`_single`), with an ``eps`` that is not large (:func:`_large`)."""
    return _cancelled(p, v, x, dims, unseen) and reduced > 1 and not _large(eps) and \
        not (v.O is not None and _one_value(x, dims))


def _layer_norm(p: Propagation, op: Op):
    x, shape = op.args["input"], list(op.args["normalized_shape"])
    dims = list(range(x.dim() - len(shape), x.dim()))
    touched = isinstance(p.get(x), Value)
    eps = op.args["eps"]
    if touched and not _normalised_away(p, p.value(x), x, dims, math.prod(x.shape[d] for d in dims),
                                        eps, unseen=dims):  # (normalized_shape may be the input's)
        return [BROKEN]
    xhat = lambda: torch.nn.functional.layer_norm(_d(x), shape, eps=eps)  # noqa: E731
    r = _affine(p, xhat, x.dim(), op.args.get("weight"), op.args.get("bias"), shape)
    extra = [BROKEN if touched else None] * 2
    return [r] + extra


def _rms_norm(p: Propagation, op: Op):
    """``aten._fused_rms_norm`` (RMSNorm on CUDA, one op; on the CPU it is recorded as its pieces,
    ``pow``, ``mean``, ``add``, ``rsqrt``, ``mul``): ``x / √(mean(x²) + eps) · weight``, and
    ``rstd``.  A rescaling of ``x`` constant over the normalised dimensions cancels (eps aside,
    as LayerNorm's); an offset does not (no mean is subtracted)."""
    x, shape = op.args["input"], list(op.args["normalized_shape"])
    dims = list(range(x.dim() - len(shape), x.dim()))
    touched = isinstance(p.get(x), Value)
    eps = op.args.get("eps")
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # (the op's default: x's dtype's)
    if touched and (p.value(x).O is not None or _const(p.value(x).F, dims) is None
                    or _single(x, dims) or _large(eps)):
        return [BROKEN]
    xhat = lambda: torch.nn.functional.rms_norm(_d(x), shape, eps=eps)  # noqa: E731
    r = _affine(p, xhat, x.dim(), op.args.get("weight"), None, shape)
    return [r, BROKEN if touched else None]


def _batch_norm(p: Propagation, op: Op):
    x = op.args["input"]
    training = bool(op.args.get("training", "no_training" not in op.name))
    mean, var = op.args.get("running_mean"), op.args.get("running_var")
    eps = op.args.get("eps", op.args.get("epsilon"))
    dims = [0, *range(2, x.dim())]
    touched = isinstance(p.get(x), Value)
    if touched:
        v = p.value(x)
        folded = _instance_view(p, x)  # (InstanceNorm: the batch folded into the channels)
        if not _cancelled(p, v, x, dims, unseen=dims[1:] if folded else dims,
                          samples=() if folded else (0,)) or _large(eps):
            return [BROKEN]
        if p.trace.training and not training:
            return [BROKEN]  # frozen in the mode the model trains in: its statistics are fixed
        if {id(mean), id(var)} & p.trace.stats_read:
            return [BROKEN]  # statistics that must follow, read by the pass itself (or returned)
        if mean is not None and p.follow_stats:
            F = _const(v.F, dims).reshape(-1).expand(x.shape[1])
            centre = None if v.O is None else _channel_centre(v, F, dims, x.dim())
            if v.O is not None and centre is None:
                return [BROKEN]  # an offset the running statistics cannot follow
            p.links.append((mean, F, centre))
        elif not training:
            return [BROKEN]
    shape = (-1,) + (1,) * (x.dim() - 2)

    def xhat():
        if training:
            return torch.nn.functional.batch_norm(_d(x), None, None, training=True, eps=eps)
        return (_d(x) - _d(mean).reshape(shape)) / (_d(var).reshape(shape) + eps).sqrt()

    r = _affine(p, xhat, x.dim(), op.args.get("weight"), op.args.get("bias"), shape)
    if r is not None and r is not BROKEN:
        r.F = _aligned(r.F, x.dim())
    return [r] + [BROKEN if touched else None] * (len(op.outs) - 1)


def _instance_view(p: Propagation, x: Tensor) -> bool:
    """Whether ``x``, the input of a batch norm, is InstanceNorm's ``y.view(1, N·C, …)`` of the
    input ``y`` of an ``nn.InstanceNorm`` module (:attr:`Trace.instance_inputs`; its copy where
    it was not contiguous): dimension 0 is then one entry whatever the batch, not a batch of one.
    (``F.instance_norm`` called directly is read as a batch norm of one sample, which claims
    less; shapes alone do not tell it from heads folded into the batch.)"""
    op = p.trace.producer(x)
    if op is None or op.name not in ("view", "_unsafe_view", "reshape") or x.shape[0] != 1:
        return False
    y = op.args.get("self")
    made = p.trace.producer(y) if isinstance(y, Tensor) else None
    if made is not None and made.name in ("clone", "contiguous"):
        y = next(iter(made.args.values()))
    return isinstance(y, Tensor) and id(y) in p.trace.instance_inputs


def _channel_centre(v: Value, F: Tensor, dims: list[int], ndim: int) -> Expr | None:
    """The per-channel centre of ``v``'s offset (constant along ``dims``), checked against the
    offset itself: ``O == (1 − exp(κF)) ⊙ c`` with ``c`` computed by the expression from the
    recorded tensors; ``None`` when there is none or it does not match."""
    centre = _apply(functools.partial(_per_channel, ndim, tuple(dims)), v.bias)
    if centre is None:
        return None
    O = _const_offset(v.O, dims).reshape(-1)
    c = centre.value(lambda t: t.detach().double())
    if c.numel() not in (1, F.numel()):
        return None
    error = float(((1 - _factor(F)) * c - O).abs().max())
    return centre if error <= TOL * float(O.abs().max()) else None


def _per_channel(ndim: int, dims: tuple, c: Tensor) -> Tensor:
    """``c`` (broadcastable to a tensor of ``ndim`` dimensions, constant along ``dims``) as one
    value per channel, or a single one."""
    c = _aligned(c, ndim)
    for d in dims:
        if c.shape[d] > 1:
            c = c.narrow(d, 0, 1)
    return c.reshape(-1)


def _group_norm(p: Propagation, op: Op):
    x, G = op.args["input"], int(op.args["group"])
    touched = isinstance(p.get(x), Value)
    if touched:
        v = p.value(x)
        n, c = x.shape[0], x.shape[1]

        def blocks(t):
            return t.expand(x.shape).reshape(n, G, c // G, -1)
        b = Value(blocks(v.F), None if v.O is None else blocks(v.O), v.bias, fixed=v.fixed)
        if not _normalised_away(p, b, x.reshape(n, G, c // G, -1), [2, 3],
                                x.numel() // (n * G), op.args["eps"], unseen=[3]):
            return [BROKEN]
    shape = (-1,) + (1,) * (x.dim() - 2)
    eps = op.args["eps"]
    xhat = lambda: torch.nn.functional.group_norm(_d(x), G, eps=eps)  # noqa: E731
    r = _affine(p, xhat, x.dim(), op.args.get("weight"), op.args.get("bias"), shape)
    return [r] + [BROKEN if touched else None] * 2


def _dropout(p: Propagation, op: Op):
    """A factor passes (the mask multiplies entries); an offset only where no entry is dropped
    (``p = 0``, or eval mode): times the recorded mask it is one draw's, and a later norm that
    removed it there (no entry dropped in that draw) need not remove it in the next."""
    v = p.value(op.args["input"])
    if v.O is not None and op.args.get("train", True) and float(op.args["p"]) > 0:
        return [BROKEN, None]
    return [Value(v.F, v.O, fixed=v.fixed), None]


def _spatial(op: Op, x: Tensor) -> list[int]:
    """The dimensions a pooling or upsampling op works on: the last 1, 2 or 3 (``…1d/2d/3d``),
    batched or not."""
    k = next(int(c) for c in "123" if f"{c}d" in op.name)
    return list(range(x.dim() - k, x.dim()))


def _pool_max(p: Propagation, op: Op):
    x = op.args["self"]
    v = p.value(x)
    F = _const(v.F, _spatial(op, x))
    if F is None or v.O is not None or op.writes:
        return [BROKEN] * len(op.outs)
    return [Value(F)] + [None] * (len(op.outs) - 1)


def _pool_linear(p: Propagation, op: Op):
    x = op.args.get("self", op.args.get("input"))
    v = p.value(x)
    F = _const(v.F, _spatial(op, x))
    if F is None or op.writes:
        return [BROKEN] * len(op.outs)
    if "pool" in op.name and v.O is not None and any(x.shape[d] == 1 for d in _spatial(op, x)) \
            or _hidden_offset(p, v, x, _spatial(op, x)):
        return [BROKEN] * len(op.outs)  # (a window over a 1×1 map is the map: y − pool(y) is 0,
        # and on a larger one a padded window's borders see fewer entries)
    O = None if v.O is None else op.call({next(iter(op.args)): v.O.expand(x.shape)})
    return [Value(F, O, fixed=min(v.fixed, EVERY_SAMPLE))]  # (padding, borders: positions mixed)


def _attention(p: Propagation, op: Op):
    q, k, v = op.args["query"], op.args["key"], op.args["value"]
    mask = op.args.get("attn_mask", op.args.get("attn_bias"))
    if isinstance(p.get(mask), Value) or isinstance(p.get(q), Value):
        return [BROKEN]
    if isinstance(p.get(k), Value):
        vk = p.value(k)  # an offset of the keys constant along them adds the same q·b to every score
        if not _zero(vk.F) or vk.O is None or _const_offset(vk.O, [k.dim() - 2]) is None \
                or _single(k, [k.dim() - 2]):
            return [BROKEN]
    vv = p.value(v)
    F = _const(vv.F, [v.dim() - 2])
    O = None
    if vv.O is not None:  # each row of weights sums to 1: not with dropout, nor with a mask
        O = _const_offset(vv.O, [v.dim() - 2])  # (a fully masked row is all zeros)
        if O is None or float(op.args.get("dropout_p", 0.0)) or mask is not None:
            F = None
    if F is None or F.shape[-3] > 1 and v.shape[-3] != op.outs[0].shape[-3]:
        return [BROKEN]  # (grouped-query attention: one value head serves several)
    r = None if _zero(F) and O is None else Value(F, O)
    return [r] + [BROKEN] * (len(op.outs) - 1)


def _weight_norm(p: Propagation, op: Op):
    """``v · g / ‖v‖`` with norms over every dimension but ``dim`` (``torch._weight_norm``)."""
    v, g, dim = op.args["v"], op.args["g"], op.args.get("dim", 0)
    vv, vg = p.value(v), p.value(g)
    others = [d for d in range(v.dim()) if d != dim % v.dim()]
    if vv.O is not None or _const(vv.F, others) is None:
        return [BROKEN]
    O = None
    if vg.O is not None:
        O = vg.O * (_d(op.outs[0]) / _d(g))
    return [Value(_aligned(vg.F, v.dim()), O), BROKEN]


def _copy(p: Propagation, op: Op):
    """``dst.copy_(src)``: ``dst`` takes ``src``'s value (not into an integer tensor).  Not an
    offset copied over the whole of a tensor (not a view of one): ``buf = h.new_zeros(…, H +
    ph, W + pw); buf[:, :, :H, :W] = h`` pads to a window's multiple, by nothing on the
    example (the whole buffer written), by zeros on other sizes."""
    v = p.get(op.args["src"])
    if v is not None and not op.args["self"].is_floating_point():
        return [BROKEN]
    dst = op.args["self"]
    if isinstance(v, Value) and v.O is not None and not dst._is_view():
        return [BROKEN]  # (however the buffer was made: zeros, new_empty().zero_(), .to(), a clone)
    return [v]


def _in_place(op: Op) -> bool:
    return op.name.endswith("_") and not op.name.startswith("_")


def _degenerate_indices(p: Propagation, args) -> bool:
    """Whether ``args`` hold an integer index tensor made from the input whose entries repeat
    one row along a dimension of several entries, or everywhere (token ids of zeros, a common
    placeholder; each sample's one id): the positions then read one row's factor and offset,
    which look constant to a later normalisation over them; another input reads different
    rows.  (Indices made without the input, ``arange(T).repeat(B, 1)``, repeat on any input.)"""
    return any(isinstance(t, Tensor) and not t.is_floating_point() and t.dtype != torch.bool
               and t.numel() > 1 and not p.trace.input_free(t)
               and (bool((t == t.flatten()[0]).all()) or _repeats(t))
               for t in tree_flatten(args)[0])


def _varies(v) -> bool:
    """Whether ``v`` (a :class:`Value`) may differ from row to row: an offset, or factor labels
    that are not all one (a tensor rescaled as a whole reads the same through any index)."""
    return isinstance(v, Value) and (v.O is not None or not bool((v.F == v.F.flatten()[0]).all()))


def _embedding(p: Propagation, op: Op):
    w, idx = op.args["weight"], op.args["indices"]
    if isinstance(p.get(idx), Value) or id(idx) in p.trace.random or \
            (_degenerate_indices(p, [idx]) and _varies(p.get(w))):
        return [BROKEN]
    v = p.value(w)
    F = torch.nn.functional.embedding(idx, v.F.expand(w.shape))
    O = None if v.O is None else torch.nn.functional.embedding(idx, v.O.expand(w.shape))
    return [Value(F, O)]


_RULES = {
    "add": lambda p, op: _binary(p, op, "self", "other", "add"),
    "sub": lambda p, op: _binary(p, op, "self", "other", "sub"),
    "rsub": lambda p, op: _binary(p, op, "self", "other", "rsub"),
    "mul": lambda p, op: _binary(p, op, "self", "other", "mul"),
    "div": lambda p, op: _binary(p, op, "self", "other", "div"),
    "neg": lambda p, op: [Value(p.value(op.args["self"]).F, None if p.value(op.args["self"]).O is None
                                else -p.value(op.args["self"]).O, fixed=p.value(op.args["self"]).fixed)],
    "sqrt": _unary_power(0.5), "rsqrt": _unary_power(-0.5), "reciprocal": _unary_power(-1.0),
    "square": _unary_power(2.0), "pow": _pow,
    "relu": _homogeneous, "abs": _homogeneous, "leaky_relu": _homogeneous,
    "clamp_min": _clamp_min, "clamp": _clamp_min,
    "sum": _reduce, "mean": _reduce,
    "var": _var, "std": _std, "linalg_vector_norm": _vector_norm, "norm": _vector_norm,
    "amax": _amax, "amin": _amax,
    "_softmax": _softmax, "softmax": _softmax, "_safe_softmax": _softmax, "_log_softmax": _softmax,
    "log_softmax": _softmax,
    "mm": _mm, "bmm": _mm, "mv": _product("vec"), "dot": _product("tensor"),
    "vdot": _product("other"), "addmm": _addmm, "baddbmm": _baddbmm,
    "convolution": _conv,
    "native_layer_norm": _layer_norm, "_fused_rms_norm": _rms_norm,
    "native_batch_norm": _batch_norm, "_native_batch_norm_legit": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm, "cudnn_batch_norm": _batch_norm,
    "miopen_batch_norm": _batch_norm,
    "native_group_norm": _group_norm,
    "native_dropout": _dropout,
    "max_pool2d_with_indices": _pool_max, "max_pool3d_with_indices": _pool_max,
    "adaptive_max_pool2d": _pool_max, "max_pool1d": _pool_max, "max_pool2d": _pool_max,
    "avg_pool2d": _pool_linear, "avg_pool1d": _pool_linear, "avg_pool3d": _pool_linear,
    "_adaptive_avg_pool2d": _pool_linear, "adaptive_avg_pool2d": _pool_linear,
    "upsample_nearest2d": _pool_linear, "upsample_bilinear2d": _pool_linear,
    "_scaled_dot_product_flash_attention_for_cpu": _attention,
    "_scaled_dot_product_flash_attention": _attention,
    "_scaled_dot_product_efficient_attention": _attention,
    "_scaled_dot_product_cudnn_attention": _attention,
    "_weight_norm_interface": _weight_norm,
    "copy": _copy, "detach": _passthrough, "alias": _passthrough, "lift_fresh": _passthrough,
    "_to_copy": _passthrough, "clone": _passthrough, "contiguous": _passthrough,
    "embedding": _embedding,
}
for _name in ("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze",
              "squeeze", "select", "slice", "narrow", "flatten", "unflatten", "movedim", "split",
              "split_with_sizes", "chunk", "unbind", "index_select", "repeat", "roll", "flip",
              "cat", "stack", "constant_pad_nd", "index", "unfold", "pixel_shuffle",
              "pixel_unshuffle", "channel_shuffle", "expand_copy", "view_copy", "permute_copy",
              "tensor_split", "gather", "diagonal"):
    _RULES[_name] = _shape

#: ops whose outputs do not depend on the values of their first argument (the others must be
#: untouched)
_VALUE_FREE = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
               "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "fill", "zero",
               "empty_strided", "_efficientzerotensor", "uniform", "exponential", "random"}
