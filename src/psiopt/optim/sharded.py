"""Parameters sharded by FSDP2 (``fully_shard``): DTensors sharded on dimension 0.

Each rank updates its own shard with the same vectorized rules as one process, on views of the
local tensors.  A group lies whole on one rank only for ``"channel"`` rows (output channels are
dimension 0, the sharded one); ``"tensor"``, ``"groups:G"`` and ``"@1"`` groups can span ranks.
Their per-group reductions (norms, inner products) are taken per local row, summed into one
vector over every spanning group of the layout and summed across ranks with one ``all_reduce``
per reduction: no parameter is gathered.  For such groupings the local view has one row per
local channel (per output channel for ``"@1"``), each carrying its group's scalars.

Optimizer state is kept as DTensors with the parameter's mesh (buffers sharded like the
parameter, per-row scalars sharded or replicated), so ``torch.distributed.checkpoint`` saves and
loads it like torch.optim's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .geometry import CANCELLED, RowLayout, norm, parse_grouping, rows, split_part

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_sharded(t) -> bool:
    """True for a DTensor (a parameter of a model wrapped with FSDP2's ``fully_shard``)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(ts) -> bool:
    """Whether any of ``ts`` is a DTensor (:func:`is_sharded`), from their set of types (an
    FSDP2 parameter's type is DTensor; ``isinstance`` per tensor took 5x as long)."""
    return DTensor is not None and any(issubclass(c, DTensor) for c in {type(t) for t in ts})


class ShardedRows:
    """How the local shard of one DTensor parameter splits into (parts of) groups.

    :meth:`view` maps any local tensor of the parameter's local shape (the parameter, its
    gradient, a buffer) to the rows the rules work on; ``index`` gives the global group of each
    local row (``None`` when the local rows are whole groups), ``groups`` the number of global
    groups, ``group_size`` the entries of one, ``sharded_dim`` the dimension of the view split
    between ranks (``None`` for a replicated parameter), ``global_view`` the shape of the whole
    view and ``first`` the global index (along ``sharded_dim``) of its first local row.

    A grouping of part of a tensor (``"groups:4[0:32]"``) on a sharded parameter: the local rows
    of the part are those of ``[a, b)`` on this rank, ``[lo, hi)`` of the local shard (none on
    a rank that holds no row of the part: an empty view, whose partial sums are zero and which
    joins every collective as the other ranks do); the view is the grouping's view of the whole
    local shard narrowed to them, and :meth:`rest` gives the local rows outside the part.  State
    made for the view is stored padded to the whole local shard (:meth:`wrap`, :meth:`local`):
    the part's rows are spread unevenly over the ranks, and a DTensor sharded like the parameter
    is what ``torch.distributed.checkpoint`` saves and reshards.
    """

    def __init__(self, p, grouping: str):
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
            raise ValueError(
                f"psiopt supports DTensor parameters sharded on dimension 0 of a 1-D mesh (FSDP2's "
                f"fully_shard) or replicated; got placements {placements} on a {mesh.ndim}-D mesh")
        self.mesh, self.grouping = mesh, grouping
        kind, blocks, dim = parse_grouping(grouping)
        self.kind = kind
        shard = placements[0] == Shard(0)
        span = split_part(grouping)[1]
        offset = _offset(p) if shard else 0  # global index of the local shard's first row
        rows_here = p.to_local().shape[0] if p.dim() else 0
        self._rows_here = rows_here  # the view's rows (on sharded_dim) of the whole local shard
        self.window = self._part = None  # [lo, hi): the local rows of a part (window: if sharded)
        if span is not None:
            lo, hi = (min(max(e - offset, 0), rows_here) for e in span) if shard else span
            self.window, self._part = ((lo, hi) if shard else None), (lo, hi)
        self.index, self.groups = None, None
        if kind == CANCELLED:  # never updated: only its rest (:meth:`rest`)
            return
        whole_rows = not shard or (kind == "channel" and dim == 0)
        if not shard:  # whole on every rank (a part included)
            self._inner, self.sharded_dim = (lambda t: rows(t, grouping)), None
        elif kind == "tensor":
            self._inner, self.sharded_dim = (lambda t: t.unsqueeze(0)), 1
        elif dim == 1:  # ConvTranspose: output channels on dimension 1, inputs sharded
            self._inner, self.sharded_dim = (lambda t: rows(t, "channel@1")), 1
        else:  # output channels (of groups) on the sharded dimension: one view row per channel
            self._inner, self.sharded_dim = (lambda t: t if t.dim() > 1 else t.unsqueeze(1)), 0
        stored = self._inner(torch.empty(p.shape, device="meta"))
        self.stored_view = tuple(stored.shape)  # global shape of state stored like a buffer
        self.global_view = tuple(stored.narrow(self.sharded_dim, span[0], span[1] - span[0]).shape
                                 if self.window else stored.shape)
        self.first = 0
        if self.sharded_dim == 0:
            self.first = offset + self.window[0] - span[0] if self.window else offset
        if whole_rows:
            self.group_size = math.prod(self.global_view[1:])
            return
        self.groups = 1 if kind == "tensor" else blocks if kind == "groups" else p.shape[dim]
        per = 1 if kind == "tensor" else self.global_view[0] // self.groups
        local = self.view(p.to_local())
        self.index = torch.arange(self.first, self.first + local.shape[0], device=local.device) // per
        self.group_size = math.prod(self.global_view) // self.groups

    def view(self, local: Tensor) -> Tensor:
        """The rows the rules work on of a tensor of the parameter's local shape."""
        v = self._inner(local)
        return v if self.window is None else self._narrow(v)

    def _narrow(self, t: Tensor) -> Tensor:
        lo, hi = self.window
        return t.narrow(self.sharded_dim, lo, hi - lo)

    def rest(self, local: Tensor) -> list[Tensor]:
        """The local rows outside the part (views, the empty ones left out) of a tensor of the
        parameter's local shape; ``[]`` for a grouping of the whole tensor."""
        if self._part is None:
            return []
        lo, hi = self._part
        return [v for v in (local[:lo], local[hi:]) if v.shape[0]]

    def local(self, state: Tensor) -> Tensor:
        """The local tensor of a state DTensor made by :meth:`wrap`, as the view's rows."""
        t = state.to_local()
        if self.window is None or not isinstance(state.placements[0], Shard):
            return t
        return self._narrow(t)

    def wrap(self, local: Tensor, like: Tensor) -> Tensor:
        """``local`` (a state tensor made for the local view ``like``: a buffer of its shape, or
        one scalar per row) as a DTensor on the parameter's mesh; 0-d tensors stay as they are.
        For a part, a sharded one is padded with zeros to the whole local shard."""
        if local.dim() == 0:
            return local
        full = local.shape == like.shape
        if self.sharded_dim is None or (not full and self.sharded_dim != 0):
            return DTensor.from_local(local, self.mesh, [Replicate()], run_check=False)
        if self.window is not None:
            size = list(local.shape)
            size[self.sharded_dim] = self._rows_here  # the view's rows of the whole local shard
            padded = local.new_zeros(size)
            self._narrow(padded).copy_(local)
            local = padded
        shape = torch.Size(self.stored_view if full else (self.stored_view[0], *local.shape[1:]))
        return DTensor.from_local(local, self.mesh, [Shard(self.sharded_dim)], run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())


def _offset(p) -> int:
    """First global index along dimension 0 of this rank's shard of ``p``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0]


class ShardedLayout(RowLayout):
    """:class:`RowLayout` of local views whose groups may span ranks: per-group reductions are
    completed with one ``all_reduce`` over every spanning group of the layout."""

    def __init__(self, views: list[Tensor], shards: list[ShardedRows]):
        super().__init__(views)
        self.shards = shards
        self.group_sizes = [s.group_size for s in shards]
        self.group = shards[0].mesh.get_group()
        starts = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        positions, index, base = [], [], 0
        for s, start, size in zip(shards, starts, self.sizes):
            if s.index is not None:
                positions.append(torch.arange(start, start + size, device=self.device))
                index.append(s.index + base)
                base += s.groups
        self.spanning = base
        self._fuse = bool(base)  # one collective per step (see RowLayout.fuse_reductions)
        if base:
            self.positions, self.index = torch.cat(positions), torch.cat(index)

    def single(self, index: int, view: Tensor) -> ShardedLayout:
        return ShardedLayout([view], [self.shards[index]])

    def _complete(self, flat: Tensor) -> Tensor:
        """Sum the partial per-row sums of spanning groups (``flat``: one row per reduction)
        across local rows and ranks, in place: one ``all_reduce`` whatever the number of rows."""
        if self.spanning:
            total = flat.new_zeros(flat.shape[0], self.spanning)
            total.index_add_(1, self.index, flat[:, self.positions])
            dist.all_reduce(total, group=self.group)
            flat[:, self.positions] = total[:, self.index]
        return flat

    def norms(self, xs: list[Tensor]) -> Tensor:
        return self.sums([(xs, xs)])[0].sqrt_()

    def dots(self, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        return self.sums([(xs, ys)])[0]

    def sums(self, pairs: list[tuple[list[Tensor], list[Tensor]]], apart: bool = False,
             dtype: torch.dtype | None = None) -> Tensor:
        flat = super().sums(pairs, apart, dtype)  # a list of flats under torch.compile
        return self._complete(flat if isinstance(flat, Tensor) else torch.stack(flat))

    def rows_and_size(self, index: int) -> tuple[int, int]:
        shard = self.shards[index]
        return (shard.groups or shard.global_view[0]), shard.group_size

    def orthogonality_residual(self, index: int, y: Tensor) -> Tensor | None:
        """``(YYᵀ − I)Y`` for the local rows ``y`` of sharded view ``index`` (Cho & Lee's
        penalty couples the rows of a tensor, so this needs its own collective, one per tensor):

        * every row split between ranks (``"@1"``): ``(ΣY_lY_lᵀ − I)Y_l``, an R×R all_reduce;
        * whole rows on each rank (``"channel"``) with fewer columns than rows:
          ``Y_l(ΣY_lᵀY_l) − Y_l``, a d×d all_reduce;
        * otherwise (more columns than rows, or ``"groups:G"`` rows made of channels on several
          ranks) the rows are summed into a zero-padded copy of the whole weight (one
          parameter-sized all_reduce), the only case where a weight is assembled.
        """
        shard = self.shards[index]
        if shard.sharded_dim is None:
            return super().orthogonality_residual(index, y)
        if shard.kind == "tensor" or (shard.groups or shard.global_view[0]) == 1:  # one row
            return None
        if shard.sharded_dim == 1:
            yg = y.reshape(shard.groups, -1)
            outer = yg @ yg.T
            dist.all_reduce(outer, group=self.group)
            return torch.addmm(yg, outer, yg, beta=-1.0).reshape(y.shape)
        if shard.index is None and y.shape[1] <= shard.global_view[0]:
            inner = y.T @ y
            dist.all_reduce(inner, group=self.group)
            return torch.addmm(y, y, inner, beta=-1.0)
        rows_, cols = shard.global_view[0], y.shape[1]
        slots = torch.arange(shard.first, shard.first + y.shape[0], device=y.device)
        whole = y.new_zeros(rows_, cols).index_copy_(0, slots, y)
        dist.all_reduce(whole, group=self.group)
        if shard.index is not None:  # groups of channels: one row per group
            whole = whole.reshape(shard.groups, -1)
        out = torch.addmm(whole, whole @ whole.T, whole, beta=-1.0)
        return out.reshape(rows_, cols).index_select(0, slots)


def stats_over_split_rows(shard: ShardedRows | None, stats) -> str | None:
    """The type of the first norm layer in ``stats`` (:class:`~psiopt.optim.discovery.NormStats`
    of one parameter) whose running statistics are fed by rows that ``shard`` splits between
    FSDP2 ranks, or ``None``.  Such statistics cannot follow a rescaling of the rows: each rank
    holds the factors of its own rows only (one row per rank passed for "one factor for all";
    a group index picked other ranks' rows), so a rule that rescales rows outside its update
    refuses them when it is built.  A ``"tensor"`` group has one factor, the same on every
    rank: it can follow."""
    if shard is None or shard.sharded_dim is None or shard.mesh.size() == 1 \
            or shard.kind == "tensor":
        return None
    return next((type(st.norm).__name__ for st in stats
                 if getattr(st.norm, "running_mean", None) is not None), None)


def grouped_norms(p: Tensor, grouping: str) -> tuple[Tensor, Tensor]:
    """``(view, norms)``: the grouped view of ``p`` (of its local shard for a DTensor) and the
    per-group norms (keepdim), complete across ranks."""
    if not is_sharded(p):
        view = rows(p, grouping)
        return view, norm(view)
    shard = ShardedRows(p, grouping)
    view = shard.view(p.to_local())
    layout = ShardedLayout([view], [shard])
    return view, layout.norms([view]).view(layout.shapes[0])
