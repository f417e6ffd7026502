"""Training loop with diagnostics, run directories and exact resume.

A run directory holds ``config.json`` (every setting, the hyperparameters the optimizer actually
uses, the environment), ``metrics.jsonl`` (one JSON object per epoch, appended) and
``checkpoint.pt`` (written atomically after an epoch's record, at the last epoch and at most every
``CHECKPOINT_SECONDS`` otherwise: model, optimizer, scheduler, RNG state and epoch, with a sha256
of those bytes and the run's settings, both checked when it is loaded; a resumed run drops the
records beyond the checkpoint and redoes those epochs, identically, and a run without a checkpoint
starts over).  The last epoch of
each session is also evaluated with the BatchNorm statistics recomputed on the training set.
Shuffling and augmentation draw from a generator seeded by ``(seed, epoch)``, so a resumed run gives
exactly the metrics of an uninterrupted one.  A run directory is only ever continued with the
settings it was created with (more epochs and another thread count aside); anything else raises
:class:`RunError` naming the differing keys, before any file is touched.

With ``nproc`` > 1 (under ``torchrun``, or spawned by :func:`train_spawned`) training is
data-parallel (DDP): every rank draws the same global batch and keeps every ``nproc``-th sample of
it (DistributedSampler's split), the loss is weighted so that DDP's average is the gradient of the
global batch, sums are reduced over ranks, and rank 0 alone logs and writes the run directory (and
reads it, broadcasting a checkpoint to the others): the metrics are those of one process with the
same global batch.  BatchNorm normalises each rank's part of the batch unless ``sync_bn``
(:class:`psiopt.parallel.SyncBatchNorm`: the global batch's statistics).

``device`` (``cpu``, ``cuda``, ``cuda:N``) is where the model, the optimizer's state and, when it
fits (:func:`~psiopt.experiments.data.hold_on`), the dataset live: batches are then drawn and
augmented there by a generator of that device (on the CPU exactly as before the option existed);
a resumed run holds it where the session that started it did (``data_device``), whatever the
device's free memory is then.
With ``nproc`` > 1 on CUDA, rank ``r`` uses ``cuda:r`` (``LOCAL_RANK`` under torchrun) and the
processes talk over NCCL (gloo on the CPU).  ``amp="bf16"`` runs the forward passes and the loss
under ``torch.autocast`` with bfloat16; parameters, gradients and the optimizer stay float32.  A
device that is not there, or an ``amp`` other than ``none``/``bf16``, is refused by
:meth:`RunConfig.validate` before anything runs.  ``config.json`` records the device each session
ran on, its GPU model and where the data was held.  The device type and ``amp`` are bound to the
checkpoint (another device type draws other random batches and rounds otherwise: not the run that
was started); the GPU index may change (``cuda:0`` → ``cuda:1``): on a GPU of the same model the
run should continue bit for bit (the same kernels and random streams; not yet run on a GPU), and
each session's GPU is recorded under ``resumed``.

``channels_last``: the model is converted with ``model.to(memory_format=torch.channels_last)``
(its 4-D convolution weights; other parameters are left as they are) and every input batch
(training, evaluation, the BatchNorm recomputation) is made channels_last before the forward
pass: the layout cuDNN's convolutions prefer on tensor-core GPUs, above all under ``amp="bf16"``.
Off by default, so nothing changes unless asked; a model without a 4-D weight, or a dataset whose
inputs are not 4-D images, is refused (the memory format would change nothing).  psiopt's
optimizers step channels_last weights through views of their rows, as contiguous ones
(``tests/test_channels_last.py``); the fused per-row kernels take contiguous rows only, so
such weights take the vectorized path.  Bound to the checkpoint like ``amp``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..norms import EpsMonitor, exact_norms_
from ..optim.diagnostics import StepProbe, summarize
from ..optim.discovery import find_scale_invariant, param_groups, rescale_rows_
from ..optim.geometry import CANCELLED, is_invariant, rows, split_part
from ..optim.registry import create_optimizer, settings
from ..parallel import convert_sync_batchnorm
from . import wrapped
from .data import DataError, batches, fits_on, hold_on, load_dataset
from .models import create_model, glorot_

INITS = ("default", "glorot", "unbalanced")
#: a checkpoint is written at the last epoch and after an epoch that ends this long after the last one
CHECKPOINT_SECONDS = 30.0
#: settings a run directory may be continued with when they differ
RESUMABLE = ("epochs", "threads")
#: how long a rank waits for the others before the run fails with an error
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
#: the largest seed (torch's generators take 64-bit seeds; an epoch's shuffling seed is
#: ``seed * 100_003 + epoch``)
MAX_SEED = 2**32 - 1
#: settings the dataset fixes, which a model option may not set
DATA_FIXED = ("in_channels", "num_classes", "image_size")
#: mixed precision: none, or the forward passes under ``torch.autocast`` with bfloat16 (float16
#: would need a gradient scaler, which the harness does not have)
AMP = ("none", "bf16")


class RunError(ValueError):
    """A run cannot go ahead as asked (bad setting, run directory mismatch, unreadable file)."""


@dataclass
class RunConfig:
    """Every setting of one training run (what ``psiopt train`` takes)."""

    dataset: str = "synthetic"
    model: str = "mlp-bn"
    optimizer: str = "sgd"
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    subset: int | None = None
    validation: int | None = None  # evaluate on the last N training samples, held out, not the test set
    hyper: dict = field(default_factory=dict)  # optimizer keywords (lr, invariant_lr, ...)
    milestones: list = field(default_factory=list)  # epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    init: str = "default"
    model_kwargs: dict = field(default_factory=dict)
    grouping: str | None = None  # "tensor": one group per invariant weight (Arora's PSGD)
    data_dir: str | None = None
    threads: int = 1  # one thread: the default that gives honest timings on a shared machine
    nproc: int = 1  # data-parallel processes; the batch size is the global one
    sync_bn: bool = False  # BatchNorm statistics of the global batch when nproc > 1
    #: normalisation layers with eps·‖w‖² (Arora eq. 8): exactly invariant in their weights
    exact_norms: bool = False
    device: str = "cpu"  # cpu, cuda or cuda:N; with nproc > 1 on CUDA, rank r uses cuda:r
    amp: str = "none"  # "bf16": forward passes under torch.autocast(bfloat16), float32 parameters
    #: the model's 4-D (conv) weights and the input batches in torch.channels_last memory format
    channels_last: bool = False

    def validate(self) -> None:
        """Raise :class:`RunError` naming the first setting that is not valid."""
        least = {"epochs": 0, "batch_size": 1, "threads": 1, "subset": 2, "validation": 1,
                 "nproc": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is None and name in ("subset", "validation"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RunError(f"invalid {name}: {value!r} (must be an integer of at least {low})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed <= MAX_SEED:
            raise RunError(f"invalid seed: {self.seed!r} (must be an integer from 0 to {MAX_SEED})")
        if self.batch_size % self.nproc:
            raise RunError(f"batch size {self.batch_size} does not split over {self.nproc} "
                           "processes (it is the global batch: use a multiple of --nproc)")
        if self.grouping not in (None, "tensor", "channel"):
            raise RunError(f"invalid grouping {self.grouping!r}: tensor or channel (or none: "
                           "as discovered)")
        if self.init not in INITS:
            raise RunError(f"unknown init {self.init!r}; choose from {', '.join(INITS)}")
        if self.exact_norms and self.sync_bn:
            raise RunError("exact_norms and sync_bn cannot be combined (the synchronised "
                           "BatchNorm has no exact variant): choose one")
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise RunError(f"invalid gamma: {self.gamma!r} (must be positive)")
        if any(not isinstance(m, int) or m < 1 for m in self.milestones) or \
                list(self.milestones) != sorted(set(self.milestones)):
            raise RunError(f"invalid milestones: {self.milestones!r} (increasing epochs >= 1)")
        try:
            if wrapped.is_wrapped(self.optimizer):  # <inner>+<policy>, muon
                wrapped.settings(self.optimizer, **self.hyper)
            else:
                settings(self.optimizer, **self.hyper)
        except ValueError as e:
            raise RunError(str(e)) from None
        if self.amp not in AMP:
            raise RunError(f"invalid amp {self.amp!r}: none, or bf16 (bfloat16 autocast, float32 "
                           "parameters)")
        if not isinstance(self.channels_last, bool):
            raise RunError(f"invalid channels_last: {self.channels_last!r} (true or false)")
        check_device(self.device, self.nproc, self.amp)

    def resolved(self) -> dict:
        """Every hyperparameter the optimizer uses, per side (paper defaults merged in); for an
        ``<inner>+<policy>`` name also the inner rule, the policy and ``project``
        (:func:`psiopt.experiments.wrapped.settings`)."""
        if wrapped.is_wrapped(self.optimizer):
            return wrapped.settings(self.optimizer, **self.hyper)
        invariant, other = settings(self.optimizer, **self.hyper)
        return {"invariant": invariant, "other": other}


def check_device(device: str, nproc: int = 1, amp: str = "none") -> None:
    """Raise :class:`RunError` unless ``device`` (``cpu``, ``cuda``, ``cuda:N``) is on this machine,
    with a GPU per process when ``nproc`` > 1 (``LOCAL_WORLD_SIZE`` of them under torchrun) and,
    for ``amp="bf16"`` on CUDA, bfloat16 support."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise RunError(f"invalid device {device!r}: cpu, cuda or cuda:N")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise RunError(f"device {device!r} is not available: {why} (torch {torch.__version__}); "
                       "use --device cpu")
    count = torch.cuda.device_count()
    if nproc > 1:
        if device != "cuda":
            raise RunError(f"device {device!r} with nproc {nproc}: give --device cuda (rank r "
                           "uses cuda:r)")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
        if local > count:
            raise RunError(f"nproc {nproc} needs one GPU per process ({local} on this machine), "
                           f"but {count} CUDA device(s) are here")
    elif int(device.partition(":")[2] or 0) >= count:
        raise RunError(f"device {device!r} is not available: {count} CUDA device(s) here "
                       f"(cuda:0 to cuda:{count - 1})")
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise RunError(f"amp bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
                       "use --amp none")


def run_device(config: RunConfig) -> torch.device:
    """The device this process trains on: ``config.device`` with its index (the current CUDA
    device for ``cuda``); with ``nproc`` > 1 on CUDA, ``cuda:LOCAL_RANK`` (the rank when spawned)."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return device
    if config.nproc > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", _world()[0])))
    return torch.device("cuda", torch.cuda.current_device() if device.index is None
                        else device.index)


def autocast(amp: str, device: torch.device):
    """The context of the forward passes: ``torch.autocast`` with bfloat16 for ``amp="bf16"``,
    nothing for ``"none"``."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_inputs(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch as the model takes it: in ``torch.channels_last`` memory format with
    ``channels_last`` (a copy unless it is already), else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check_channels_last(model: nn.Module, example: torch.Tensor, config: RunConfig) -> None:
    """Raise :class:`RunError` where ``channels_last`` makes no sense: a model without a 4-D
    (convolution) weight, or inputs that are not 4-D images (nothing would change)."""
    if not config.channels_last:
        return
    if not any(p.dim() == 4 for p in model.parameters()):
        raise RunError(f"--channels-last: model {config.model} has no 4-D (convolution) weight, "
                       "so the memory format would change nothing; leave the flag out")
    if example.dim() != 4:
        raise RunError(f"--channels-last: the inputs of {config.dataset} are not images "
                       f"(shape {tuple(example.shape[1:])}, not channels × height × width); "
                       "leave the flag out")


def _source_commit() -> tuple[str | None, bool | None]:
    """``(commit, uncommitted changes?)`` of the source tree as this process imported it (read
    once, at import: a commit made while a long ``compare`` runs does not describe the code that
    runs, which Python loaded at the start); ``(None, None)`` outside a git checkout."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


_SOURCE = _source_commit()


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, machine and threads; with ``device``, the device this process trains on and,
    on CUDA, its GPU model and CUDA version."""
    commit, dirty = _SOURCE
    env = {"psiopt": __version__, "git_commit": commit, "git_dirty": dirty,
           "torch": torch.__version__, "python": sys.version.split()[0],
           "machine": platform.platform(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads()}
    if device is not None:
        device = torch.device(device)
        env["device"] = str(device)
        if device.type == "cuda":
            env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def initialise(model: nn.Module, how: str, groups: list[dict]) -> None:
    """``glorot``: Glorot-uniform weights (Arora App. D); ``unbalanced``: Yi Fig. 1, the first
    half of the rows of every invariant weight ×1e4, the second half ×1e-4."""
    if how == "glorot":
        glorot_(model)
    elif how == "unbalanced":  # an equivalent network: running statistics follow the rows
        for group in groups:
            if not is_invariant(group.get("grouping")):
                continue
            links = group.get("norm_stats") or [()] * len(group["params"])
            for p, stats in zip(group["params"], links):
                v = rows(p, group["grouping"])
                factors = torch.full((v.shape[0],) + (1,) * (v.dim() - 1), 1e-4,
                                     dtype=v.dtype, device=v.device)
                factors[: max(v.shape[0] // 2, 1)] = 1e4
                rescale_rows_(v, factors, stats)


def _loss(out, y, regression: bool):
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model, x, y, regression: bool, batch_size: int = 1024,
             shard: tuple[int, int] = (0, 1), amp: str = "none",
             channels_last: bool = False) -> tuple[float, float | None]:
    """Mean loss and accuracy of ``model`` in eval mode, on the model's device (``amp``: the
    forward passes' autocast, see :func:`autocast`; ``channels_last``: the batches in that
    memory format, see :func:`as_inputs`); with ``shard=(rank, world)`` each rank
    takes every ``world``-th sample of each batch and the sums are reduced over ranks."""
    rank, world = shard
    device = _device_of(model)
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for xb, yb in batches(x, y, batch_size):
        xb, yb = as_inputs(xb[rank::world].to(device), channels_last), yb[rank::world].to(device)
        if not len(xb):
            continue
        with autocast(amp, device):
            out = model(xb)
            batch_loss = _loss(out, yb, regression)
        loss += batch_loss * len(xb)
        if not regression:
            correct += (out.argmax(1) == yb).sum()
    model.train()
    if world > 1:
        loss, correct = _all_reduced(loss, correct)
    return loss.item() / len(x), None if regression else correct.item() / len(x)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group (``(0, 1)`` without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduced(*values: torch.Tensor) -> list[torch.Tensor]:
    """Scalars summed over ranks (one collective)."""
    total = torch.stack([v.double() for v in values])
    dist.all_reduce(total)
    return list(total)


def _fits_everywhere(data, device: torch.device) -> bool:
    """Whether ``data`` fits on ``device`` (:func:`~psiopt.experiments.data.fits_on`) on every
    rank of a multi-process run: decided together (one collective), since ranks whose data
    lived on different devices would draw their batches with different generators (other
    batches: samples skipped or repeated, silently), e.g. GPUs with different free memory."""
    fits = fits_on(data, device)
    if device.type == "cpu" or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return fits
    flag = torch.full((), float(fits), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _held_as_recorded(recorded: dict | None, ckpt: dict | None) -> bool | None:
    """Whether a run continued from a checkpoint holds its dataset on its device: as the
    session that started it did (``data_device`` in its ``config.json``), since data held
    elsewhere is drawn by another generator (other batches after the resume, silently: not the
    run that was started), whatever the device's free memory is now; ``None`` for a new run
    (decided by :func:`_fits_everywhere`)."""
    if recorded is None or ckpt is None or "data_device" not in recorded:
        return None
    return recorded["data_device"] != "cpu"


def _on_rank0(fn, world: int):
    """``fn()`` run on rank 0 and its result, or its exception, broadcast to every rank."""
    if world == 1:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # every rank raises it, rather than waiting for rank 0
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch",
                disable=not sys.stderr.isatty() if enabled is None else not enabled)


def first_line(error: BaseException, default: str = "") -> str:
    """The first line of an exception's message (``default`` when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, when ``error`` is a failed write: an ``OSError`` (disk full,
    permission), or the ``RuntimeError`` that ``torch.save``'s zip writer raises in its place
    (``[enforce fail at inline_container.cc …] PytorchStreamWriter failed writing file …`` on a
    full disk); ``None`` for any other error."""
    if isinstance(error, OSError):
        return str(error.strerror or error)
    text = str(error)
    if isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text
                                            or "inline_container" in text):
        return f"torch.save: {first_line(error).strip()}; is the disk full?"
    return None


class _Writing:
    """Context: a failed write (:func:`write_failure`: disk full, permission) raised inside
    becomes a :class:`RunError` naming ``path``; the files written before are left as they were
    and ``cleanup`` (a temporary file) is removed."""

    def __init__(self, path: Path, cleanup: Path | None = None):
        self.path, self.cleanup = path, cleanup

    def __enter__(self):
        return self.path

    def __exit__(self, kind, error, tb):
        why = None if error is None else write_failure(error)
        if why is None:
            return
        if self.cleanup is not None:
            try:
                self.cleanup.unlink(missing_ok=True)
            except OSError:
                pass
        raise RunError(f"{self.path}: cannot be written ({why}); the run directory is as it "
                       "was before this write (--resume continues)") from None


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _Writing(path, cleanup=tmp):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _Writing(path, cleanup=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    _atomic_write(path, "".join(json.dumps(m) + "\n" for m in metrics))


def build(config: RunConfig, device: torch.device | None = None, held: bool | None = None):
    """Dataset, model, optimizer and scheduler for ``config`` (seeded), on ``device`` (default:
    :func:`run_device`).  The model is built and prepared (``init``, ``exact_norms``, ``sync_bn``)
    on the CPU, so that it starts from the same weights on every device, and moved there before
    the optimizer is made (which links the device's BatchNorm buffers); the dataset is held there
    when it fits (:func:`~psiopt.experiments.data.hold_on`), or as ``held`` says (a resumed run:
    where the session that started it held it, see :func:`_held_as_recorded`)."""
    config.validate()
    device = run_device(config) if device is None else torch.device(device)
    torch.manual_seed(config.seed)
    try:
        data = load_dataset(config.dataset, config.data_dir, config.subset, seed=config.seed,
                            validation=config.validation)
    except ValueError as e:  # e.g. a validation split larger than the training set
        raise RunError(str(e)) from None
    example = data.train_x[:16]  # on the CPU, as the model until it is prepared
    try:
        data = hold_on(data, device, _fits_everywhere(data, device) if held is None else held)
    except torch.OutOfMemoryError:
        why = (", where the session that started the run held it (config.json's data_device; "
               "held elsewhere its batches would differ): free the GPU's memory, or start a new "
               "run directory" if held else "")
        raise RunError(f"{config.dataset} ({data.nbytes / 2**20:.0f} MiB) does not fit in "
                       f"{device}'s free memory{why}") from None
    fixed = sorted(set(config.model_kwargs) & set(DATA_FIXED))
    if fixed:
        raise RunError(f"model option(s) {fixed} are set by the dataset ({config.dataset}: "
                       f"{data.in_channels} channel(s), {data.num_classes or 1} output(s), size "
                       f"{data.image_size}); leave them out of --model-kwarg")
    try:
        model = create_model(config.model, in_channels=data.in_channels,
                             num_classes=data.num_classes or 1, image_size=data.image_size,
                             **config.model_kwargs)
    except (ValueError, TypeError) as e:  # an unknown model option, or a value of the wrong type
        raise RunError(f"model {config.model} with options {config.model_kwargs}: {e}") from None
    _check_inputs(model, example, config)
    check_channels_last(model, example, config)
    if config.init == "glorot":
        initialise(model, "glorot", [])
    elif config.init == "unbalanced":  # before the optimizer: sphere methods normalise rows there
        initialise(model, "unbalanced", param_groups(model, example))
    if config.exact_norms and not exact_norms_(model, example):
        raise RunError(f"--exact-norms: no normalisation layer of {config.model} is fed by one "
                       "invariant weight, so none can be made exact; leave the flag out")
    if config.sync_bn:
        model = convert_sync_batchnorm(model)
    model.to(device)  # before discovery: the optimizer links the buffers of the device's model
    example = example.to(device)
    if config.channels_last:  # (the parameters stay the same objects: their data is converted)
        model.to(memory_format=torch.channels_last)
        example = as_inputs(example, True)
    mapping = None
    if config.grouping:  # every invariant weight grouped as asked
        mapping = regrouped(find_scale_invariant(model, example), config.grouping)
    try:
        if wrapped.is_wrapped(config.optimizer):  # a torch.optim rule (+ a NormPolicy); the
            # scheduler drives the inner rule
            optimizer, scheduled = wrapped.create(config.optimizer, model, example,
                                                  mapping=mapping, **config.hyper)
        else:
            optimizer = scheduled = create_optimizer(model, config.optimizer, example,
                                                     mapping=mapping, **config.hyper)
    except ValueError as e:  # a setting the rule cannot honour (validated before any change)
        where = f" on {config.model}" if wrapped.is_wrapped(config.optimizer) else ""
        raise RunError(f"{config.optimizer}{where}: {first_line(e)}") from None
    scheduler = torch.optim.lr_scheduler.MultiStepLR(scheduled, list(config.milestones),
                                                     config.gamma)
    return data, model, optimizer, scheduler


def regrouped(found: dict[str, str], grouping: str) -> dict[str, str]:
    """``--grouping``: every invariant weight of discovery's ``found`` as ``"tensor"`` (one group:
    coarser than any grouping that holds, so it holds too; of a part, the part as one group), or
    as ``"channel"``, which only a weight found ``"channel"`` keeps (a finer grouping than the
    one that holds would be a false claim: ``RunError``)."""
    out = {}
    for name, found_as in found.items():
        body, span = split_part(found_as)
        if not is_invariant(found_as) or body == grouping:
            out[name] = found_as
        elif grouping == "tensor":
            out[name] = "tensor" + ("" if span is None else f"[{span[0]}:{span[1]}]")
        else:
            raise RunError(f"--grouping {grouping}: {name} is invariant only as {found_as!r} (a "
                           "finer grouping would change the network); use --grouping tensor or none")
    return out


def _check_inputs(model: nn.Module, example: torch.Tensor, config: RunConfig) -> None:
    """Raise :class:`RunError` unless ``model`` takes the dataset's inputs: one forward pass of a
    copy in eval mode (the model, its statistics and the RNG are left alone)."""
    probe = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            out = probe(example[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = first_line(e, type(e).__name__)
        options = f" with options {config.model_kwargs}" if config.model_kwargs else ""
        raise RunError(f"model {config.model}{options} does not take the inputs of "
                       f"{config.dataset} (shape {tuple(example.shape[1:])}): {first}; choose a "
                       f"model for these inputs{' or other --model-kwarg' if options else ''}"
                       ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise RunError(f"model {config.model} gives outputs of shape "
                       f"{getattr(out, 'shape', type(out).__name__)} on {config.dataset}, not "
                       "(batch, outputs); choose a model for these inputs")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot be read ({e}); move the run directory away") from None


#: keys every ``config.json`` psiopt writes holds
RECORD_KEYS = ("dataset", "model", "optimizer", "seed", "epochs", "environment")


def read_run_config(path: str | Path) -> dict:
    """The record of a run's ``config.json``; :class:`RunError` naming the file when it cannot be
    read or is not a psiopt run record (not a JSON object, a key missing, ``resumed`` not a
    list)."""
    path = Path(path)
    record = _read_json(path)
    missing = [k for k in RECORD_KEYS if k not in record] if isinstance(record, dict) else None
    if missing is None or missing or not isinstance(record.get("resumed", []), list) or \
            not isinstance(record["epochs"], int):
        what = (f"{type(record).__name__}, not a JSON object" if missing is None else
                f"missing {', '.join(missing)}" if missing else "malformed 'epochs' or 'resumed'")
        raise RunError(f"{path}: not a psiopt run record ({what}); move the run directory away "
                       "or choose another --out")
    return record


def run_identity(record: dict) -> dict:
    """The settings of a run that must not change when it is continued (JSON-normalised)."""
    defaults = asdict(RunConfig())  # a key added since the run was made: its default
    keys = [f.name for f in fields(RunConfig) if f.name not in RESUMABLE]
    identity = json.loads(json.dumps({k: record.get(k, defaults[k]) for k in keys}))
    if isinstance(identity["device"], str):  # the type: a run may go on on another GPU index
        identity["device"] = identity["device"].partition(":")[0]
    return identity


def setting_changes(old: dict, new: dict) -> list[str]:
    """``"key (old → new)"`` for every setting of ``new`` that ``old`` records otherwise."""
    return [f"{k} ({old.get(k)!r} → {new[k]!r})" for k in new if old.get(k) != new[k]]


def check_run_dir(config: RunConfig, out_dir: str | Path, resume: bool) -> dict | None:
    """Raise :class:`RunError` unless ``out_dir`` may be used for ``config``; return the
    directory's recorded config when the run is to be continued, else ``None``."""
    out = Path(out_dir)
    above = next((p for p in (out, *out.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise RunError(f"{out}: {above} is a file, not a directory; choose another --out")
    path = out / "config.json"
    if not path.exists():
        if (out / "metrics.jsonl").exists() or (out / "checkpoint.pt").exists():
            raise RunError(f"{out} holds run files but no config.json; choose another --out")
        return None
    recorded = read_run_config(path)
    if not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose "
                       "another --out")
    old, new = run_identity(recorded), run_identity(asdict(config))
    differ = setting_changes(old, new)
    if differ:
        raise RunError(f"{out} was created with other settings: {', '.join(differ)}; a run is "
                       "only continued with its own settings (choose another --out)")
    return recorded  # without a checkpoint.pt, the run starts over (see _previous)


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng", "epoch"}
#: what ``checkpoint.pt`` holds: the state (:data:`CHECKPOINT_KEYS`) serialised to bytes, and
#: beside it the epoch, the run's settings and a sha256 of all three
CHECKPOINT_FORMAT = "psiopt-checkpoint-2"
_WRAPPER_KEYS = {"format", "epoch", "settings", "sha256", "state"}


def _digest(state: bytes | memoryview, epoch: int, settings: dict) -> str:
    """sha256 of a checkpoint's state bytes, its epoch and its run's settings."""
    h = hashlib.sha256(json.dumps({"epoch": epoch, "settings": settings}, sort_keys=True).encode())
    h.update(state)
    return h.hexdigest()


def _checkpoint(state: dict, config: RunConfig) -> dict:
    """The object written as ``checkpoint.pt``: ``state`` serialised in memory, bound to the run's
    settings (:func:`_identity`) and checksummed, so that a corrupt file or another run's
    checkpoint is refused when loaded."""
    buffer = io.BytesIO()
    torch.serialization.save(state, buffer)  # in memory; the file itself is written by torch.save
    settings = run_identity(asdict(config))
    return {"format": CHECKPOINT_FORMAT, "epoch": state["epoch"], "settings": settings,
            "sha256": _digest(buffer.getbuffer(), state["epoch"], settings),
            "state": torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)}


def read_checkpoint(path: str | Path, config: RunConfig | None = None) -> dict:
    """The state a ``checkpoint.pt`` holds (``model``, ``optimizer``, ``scheduler``, ``rng``,
    ``epoch``); :class:`RunError` naming the file when it cannot be loaded, is not a psiopt
    checkpoint or fails its checksum, or (given ``config``) was written by a run with other
    settings.  The checksum is verified before the state is unpickled."""
    path = Path(path)
    def refused(why: str, what: str = "move the run directory away or choose another --out"):
        return RunError(f"{path}: {why}; {what}")

    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a checkpoint: say which file
        first = first_line(e)
        raise refused(f"cannot be loaded ({type(e).__name__}: {first})") from None
    if isinstance(ckpt, dict) and CHECKPOINT_KEYS <= ckpt.keys():
        raise refused("written without a checksum by an earlier psiopt, so it cannot be verified",
                      "move checkpoint.pt away to start the run over, or choose another --out")
    if not isinstance(ckpt, dict) or not _WRAPPER_KEYS <= ckpt.keys() or \
            ckpt["format"] != CHECKPOINT_FORMAT or not isinstance(ckpt["state"], torch.Tensor):
        raise refused(f"not a psiopt checkpoint (expected the keys "
                      f"{', '.join(sorted(_WRAPPER_KEYS))}, format {CHECKPOINT_FORMAT})",
                      "choose another --out")
    data = ckpt["state"].numpy().tobytes()
    if ckpt["sha256"] != _digest(data, ckpt["epoch"], ckpt["settings"]):
        raise refused("corrupt: its sha256 does not match what was written")
    theirs = run_identity(ckpt["settings"])  # a setting added since it was written: its default
    mine = run_identity(asdict(config)) if config is not None else theirs
    differ = setting_changes(theirs, mine)
    if differ:
        raise refused(f"does not fit this run: it was written by a run with other settings: "
                      f"{', '.join(differ)}", "move checkpoint.pt away to start the run over, "
                      "or choose another --out")
    try:
        # on the CPU: the run's load_state_dict calls put each tensor on its parameter's device
        state = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as e:
        raise refused(f"cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys() or \
            state["epoch"] != ckpt["epoch"]:
        raise refused("not a psiopt checkpoint (its state lacks a key or disagrees on the epoch)")
    return state


def _restore(ckpt: dict, path: Path, model, optimizer, scheduler) -> None:
    """Load a checkpoint into the run's objects; another run's checkpoint is named, not a
    traceback."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], _device_of(model))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = first_line(e, type(e).__name__)
        raise RunError(f"{path}: does not fit this run ({first}); choose another --out") from None


def _previous(config: RunConfig, out: Path, resume: bool) -> tuple:
    """``(recorded config, checkpoint, metrics up to it)`` of the run directory to continue,
    ``(None, None, [])`` for a new run; :class:`RunError` when it may not be used."""
    recorded = check_run_dir(config, out, resume)
    path = out / "checkpoint.pt"
    if recorded is None or not path.exists():
        # no checkpoint (killed, or a full disk, before the first): runs are seeded, so the run
        # starts over and its records, if any, are redone
        return recorded, None, []
    ckpt = read_checkpoint(path, config)
    start = ckpt["epoch"]
    metrics = ckpt["metrics"] if "metrics" in ckpt else read_metrics(out, limit=start)
    if len(metrics) != start:
        raise RunError(f"{out / 'metrics.jsonl'} holds {len(metrics)} records but the "
                       f"checkpoint is at epoch {start}; choose another --out")
    if start > config.epochs:
        raise RunError(f"{out} has already trained {start} epochs; --epochs {config.epochs} "
                       "would not describe it")
    return recorded, ckpt, metrics


def train(config: RunConfig, out_dir: str | Path, resume: bool = False,
          progress: bool | None = None, log=print,
          checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[dict]:
    """Train per ``config``, writing the run directory ``out_dir``; return the metrics.  A
    checkpoint is written at the last epoch and after an epoch ending ``checkpoint_seconds`` or
    more after the last one (0: every epoch).  With ``config.nproc`` > 1, call it on every rank of
    an initialised default process group."""
    config.validate()
    out = Path(out_dir)
    rank, world = _world()
    if world != config.nproc:
        raise RunError(f"nproc is {config.nproc} but {world} process(es) run; under torchrun "
                       "nproc is the number of processes")
    device = run_device(config)
    if device.type == "cuda":  # this rank's GPU, before any collective (NCCL uses it)
        torch.cuda.set_device(device)
    recorded, ckpt, metrics = _on_rank0(lambda: _previous(config, out, resume), world)
    if rank:
        log, progress = (lambda *_: None), False
    if recorded is not None and ckpt is None:
        log(f"{out}: no checkpoint.pt, so the run starts over from epoch 0 (it is seeded: any "
            "records it has are redone)")
    torch.set_num_threads(config.threads)
    held = _held_as_recorded(recorded, ckpt)
    data, model, optimizer, scheduler = build(config, device, held)
    if data.device != device:
        why = ("the session that started the run held it there" if held is not None else
               f"it does not fit in a quarter of {device}'s free memory")
        log(f"psiopt: {config.dataset} ({data.nbytes / 2**20:.0f} MiB) stays on the host, as "
            f"{why}, and each batch is copied")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    devices = [environment(device)]
    if world > 1:  # each rank's device and GPU, as it sees them
        devices = [None] * world
        dist.all_gather_object(devices, environment(device))
    start = 0
    if ckpt is not None:
        _restore(ckpt, out / "checkpoint.pt", model, optimizer, scheduler)
        start = ckpt["epoch"]
        if start >= config.epochs == recorded["epochs"]:
            return metrics  # a finished run, asked for again: every file stays as it is
    if rank == 0:
        groups = wrapped.describe(optimizer) if wrapped.is_wrapped(config.optimizer) else None
        _write_config(config, out, recorded, start, data, devices, groups)
        _write_metrics(out / "metrics.jsonl", metrics)
    probe = StepProbe(optimizer)
    with EpsMonitor(model, active=False) as eps:
        metrics = _epochs(config, out, data, model, net, optimizer, scheduler, probe, eps, metrics,
                          start, progress, log, checkpoint_seconds)
    return metrics


def _epochs(config, out, data, model, net, optimizer, scheduler, probe, eps, metrics, start,
            progress, log, checkpoint_seconds) -> list[dict]:
    """Epochs ``start`` to the last: train, evaluate, write the record and the checkpoint."""
    rank, world = _world()
    regression = data.task == "regression"
    split = "val" if config.validation else "test"  # metrics say which set they were measured on
    saved_at, warned = time.perf_counter(), False
    for epoch in range(start, config.epochs):
        if metrics and metrics[-1].get("diverged"):
            break
        started = time.perf_counter()
        try:
            record = _epoch(config, data, net, optimizer, probe, epoch, progress, (rank, world), eps)
        except FloatingPointError as e:  # raised by psiopt optimizers on a non-finite gradient
            record = {"train_loss": None, "train_acc": None, "error": str(e)}
        lrs = _group_lrs(optimizer)  # the rates this epoch used
        scheduler.step()
        seconds = time.perf_counter() - started
        if world > 1:  # BatchNorm statistics of rank 0 (equal on every rank with sync_bn)
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        diverged = record["train_loss"] is None or not math.isfinite(record["train_loss"])
        if diverged:
            record.update({"train_loss": None, f"{split}_loss": None, f"{split}_acc": None,
                           "diverged": True})
        else:
            record[f"{split}_loss"], record[f"{split}_acc"] = evaluate(
                model, data.test_x, data.test_y, regression, shard=(rank, world), amp=config.amp,
                channels_last=config.channels_last)
            if epoch + 1 == config.epochs:
                record.update(_recomputed_bn(model, data, regression, split, (rank, world),
                                             config.amp, config.channels_last))
        record = _finite({"epoch": epoch + 1, **record, "seconds": seconds, "lr": lrs,
                          "threads": torch.get_num_threads(), "nproc": world})
        metrics.append(record)
        if not warned and len(metrics) > 1 and all(m.get("eps_below") for m in metrics[-2:]):
            warned = True
            log(f"psiopt: warning: {record['eps_below']} of {record['eps_groups']} normalisation "
                "groups have had an input variance below their eps for two epochs: their rows "
                "are not scale-invariant, and an optimizer that keeps row norms (PSI) keeps them "
                "there; --exact-norms (eps·‖w‖²) or a smaller eps makes them invariant")
        last = epoch + 1 == config.epochs or diverged
        if rank == 0:
            with _Writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")  # first the record, then the checkpoint
            if last or time.perf_counter() - saved_at >= checkpoint_seconds:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                         "epoch": epoch + 1}
                if _device_of(model).type == "cuda":
                    state["cuda_rng"] = torch.cuda.get_rng_state(_device_of(model))
                _atomic_save(_checkpoint(state, config), out / "checkpoint.pt")
                saved_at = time.perf_counter()
        _log_epoch(log, config, record, epoch, split, regression)
    return metrics


def _write_config(config: RunConfig, out: Path, recorded: dict | None, start: int,
                  data=None, devices: list[dict] | None = None,
                  groups: list[dict] | None = None) -> None:
    """``config.json``: the settings, the hyperparameters used, the numbers of training and test
    (or validation) samples used, where the data was held, and the environment of the first
    session (later sessions listed under ``resumed``) with the device (and GPU) it ran on;
    ``devices``: each rank's :func:`environment`, listed under ``ranks`` when there are several;
    ``groups``: the optimizer's groups as built (``optimizer_groups``: an ``<inner>+<policy>`` run)."""
    with _Writing(out):
        out.mkdir(parents=True, exist_ok=True)
    devices = devices or [environment(run_device(config))]
    env = devices[0] if len(devices) == 1 else {
        **devices[0], "ranks": [{k: d[k] for k in ("device", "gpu") if k in d} for d in devices]}
    record = {**asdict(config), "optimizer_settings": config.resolved(), "environment": env}
    if groups is not None:
        record["optimizer_groups"] = groups
    if data is not None:
        record["samples"] = {"train": len(data.train_x), data.split: len(data.test_x)}
        record["data_device"] = str(data.device)  # held there, or on the host (cpu)
    if recorded is not None:
        record["environment"] = recorded["environment"]
        record["resumed"] = [*recorded.get("resumed", []),
                             {"at_epoch": start, "threads": config.threads, "environment": env}]
    _atomic_write(out / "config.json", json.dumps(record, indent=2))


def _log_epoch(log, config: RunConfig, record: dict, epoch: int, split: str,
               regression: bool) -> None:
    head = f"[{config.optimizer} seed {config.seed}] epoch {epoch + 1}/{config.epochs}:"
    if record.get("diverged"):
        log(f"{head} diverged (non-finite loss or gradient); training of this run stops")
        return
    shown = {k: "non-finite" if record[k] is None else f"{record[k]:.4f}"
             for k in ("train_loss", f"{split}_loss", f"{split}_acc") if k in record}
    acc = "" if regression else f" {split} acc {shown[f'{split}_acc']}"
    log(f"{head} train loss {shown['train_loss']} {split} loss {shown[f'{split}_loss']}{acc} "
        f"({record['seconds']:.1f} s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(config: RunConfig) -> str:
    """NCCL on CUDA (one GPU per rank), gloo on the CPU."""
    return "nccl" if torch.device(config.device).type == "cuda" else "gloo"


def train_spawned(config: RunConfig, out_dir: str | Path, resume: bool = False,
                  progress: bool | None = None,
                  checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[dict]:
    """:func:`train` with ``config.nproc`` processes spawned on this machine (gloo on the CPU,
    NCCL with rank ``r`` on ``cuda:r`` on CUDA)."""
    import torch.multiprocessing as mp

    config.validate()
    check_run_dir(config, Path(out_dir), resume)  # a user error before any process starts
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned, args=(config, str(out_dir), resume, progress, checkpoint_seconds,
                                 _free_port(), errors), nprocs=config.nproc)
    except mp.ProcessExitedException:
        if not errors.empty():
            raise RunError(errors.get()) from None
        raise
    return read_metrics(out_dir)


def close_process_group(together: bool = True) -> None:
    """Destroy the default process group once every rank is here and the DDP modules are freed.
    A gloo group whose last reference goes with a DDP reducer freed afterwards (a reference cycle
    collected later) is destroyed with the GIL held while its worker thread waits for the GIL: a
    deadlock, seen in the tests on a loaded machine.  ``together=False`` (a rank leaving on an
    error the others may not share): no barrier, which the others, in a collective of the run
    or not there at all, would never meet (NCCL would pair it with another collective)."""
    gc.collect()
    if together:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group(config: RunConfig, device, **init):
    """The default process group of a multi-process run, for the ``with`` block: made with
    :func:`process_group_backend` (under NCCL on ``device``, the rank's GPU, set first: NCCL's
    communicator is made there), ``init`` passed to ``init_process_group``; closed after
    (:func:`close_process_group`), with its barrier where the block ends or raises an error every
    rank meets alike (:class:`RunError`, :class:`DataError`), without it on another error."""
    backend = process_group_backend(config)
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT, **init)
    together = False
    try:
        yield
        together = True
    except (RunError, DataError):
        together = True
        raise
    finally:
        close_process_group(together)


def _spawned(rank: int, config: RunConfig, out: str, resume: bool, progress,
             checkpoint_seconds: float, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    try:
        with process_group(config, rank, rank=rank, world_size=config.nproc):
            train(config, out, resume, progress, checkpoint_seconds=checkpoint_seconds)
    except (RunError, DataError) as e:  # the same on every rank: said once, by the parent
        errors.put(str(e))
        sys.exit(2)


def _recomputed_bn(model: nn.Module, data, regression: bool, split: str = "test",
                   shard: tuple[int, int] = (0, 1), amp: str = "none",
                   channels_last: bool = False) -> dict:
    """Test (or validation) loss and accuracy with the BatchNorm statistics recomputed on the
    training set (``torch.optim.swa_utils.update_bn`` on a copy): how far the running averages
    lag behind the weights (batches channels_last with ``channels_last``).  Empty for a model
    without BatchNorm.  Sharded over ranks as :func:`evaluate`, with the statistics of each
    global batch (SyncBatchNorm)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    rank, world = shard
    copy_ = copy.deepcopy(model)
    if world > 1:
        copy_ = convert_sync_batchnorm(copy_)
    device = _device_of(model)
    parts = (as_inputs(xb[rank::world], channels_last)
             for xb, _ in batches(data.train_x, data.train_y, 1024, min_size=2 * world))
    with autocast(amp, device):
        torch.optim.swa_utils.update_bn(parts, copy_, device)
    loss, acc = evaluate(copy_, data.test_x, data.test_y, regression, shard=shard, amp=amp,
                         channels_last=channels_last)
    return {f"{split}_loss_bn_recomputed": loss, f"{split}_acc_bn_recomputed": acc}


def _finite(value):
    """``value`` with every non-finite float replaced by ``None`` (metrics.jsonl is strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _group_lrs(optimizer) -> dict:
    """``{grouping or "other": lr}`` of every trained group."""
    return {g.get("grouping") or "other": g["lr"] for g in optimizer.param_groups
            if g.get("grouping") != CANCELLED}


def _epoch(config, data, model, optimizer, probe, epoch, progress, shard=(0, 1), eps=None) -> dict:
    """One pass over the training set; returns the epoch's training metrics.  With
    ``shard=(rank, world)`` the rank trains on every ``world``-th sample of each global batch
    (``model`` is then a DDP module).  ``eps`` (an :class:`~psiopt.norms.EpsMonitor`) records
    the last batch: ``eps_below`` normalisation groups of ``eps_groups`` had an input variance
    under their eps."""
    rank, world = shard
    regression = data.task == "regression"
    device = _device_of(model)
    # on the device that holds the data: batches are drawn and augmented there
    gen = torch.Generator(data.device).manual_seed(config.seed * 100_003 + epoch)
    loss_sum, correct, grad_sq = (torch.zeros((), device=device) for _ in range(3))
    seen = 0
    n = len(data.train_x)
    least = 2 * world  # BatchNorm needs two samples (per rank): a smaller last batch is left out
    n_batches = n // config.batch_size + (n % config.batch_size >= least)
    layers: dict = {}
    started = time.perf_counter()
    bar = _progress(n_batches, f"{config.optimizer} epoch {epoch + 1}/{config.epochs}", progress)
    for i, (xb, yb) in enumerate(batches(data.train_x, data.train_y, config.batch_size, gen,
                                         augment=data.augment, min_size=least)):
        share = len(xb[rank::world]) * world / len(xb)  # DDP's mean is then the global batch's
        # a no-op for data held on the device; else this rank's part of the batch is copied
        xb, yb = xb[rank::world].to(device, non_blocking=True), yb[rank::world].to(device, non_blocking=True)
        xb = as_inputs(xb, config.channels_last)
        if eps is not None:
            eps.active = i == n_batches - 1
        with autocast(config.amp, device):
            out = model(xb)
            loss = _loss(out, yb, regression)
        optimizer.zero_grad(set_to_none=True)
        (loss * share if world > 1 else loss).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_sq += torch.stack(torch._foreach_norm(grads)).square().sum()
        last = i == n_batches - 1
        if last:
            probe.before()
        optimizer.step()
        if last:
            layers = probe.after()
        with torch.no_grad():
            loss_sum += loss.detach() * len(xb)
            if not regression:
                correct += (out.argmax(1) == yb).sum()
        seen += len(xb)
        if not bar.disable and (i % 20 == 0 or last):
            rate = seen / (time.perf_counter() - started)
            shown = {"loss": f"{loss.item():.3f}", "samples_per_s": f"{rate:.0f}"}
            if not regression:
                shown["acc"] = f"{correct.item() / seen:.3f}"
            bar.set_postfix(shown)
        bar.update()
    bar.close()
    if world > 1:
        loss_sum, correct, total = _all_reduced(loss_sum, correct,
                                                torch.tensor(seen, device=device))
        seen = int(total)
    below, groups = eps.below(1.0) if eps is not None else (0, 0)
    eps_record = {"eps_below": below, "eps_groups": groups} if groups else {}
    return {**eps_record, "train_loss": loss_sum.item() / seen,
            "train_acc": None if regression else correct.item() / seen,
            "train_samples": seen, "samples_per_s": seen / (time.perf_counter() - started),
            "grad_norm": (grad_sq.item() / n_batches) ** 0.5, **summarize(layers), "layers": layers}


def read_metrics(run_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The per-epoch records of a run directory (``[]`` when it has none yet); with ``limit``,
    the first ``limit`` lines only (those a checkpoint covers: a line written after it, possibly
    cut short, is not read)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines()[:limit], 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise RunError(f"{path}, line {number}: not a JSON record ({e})") from None
    return out


__all__ = ["RunConfig", "RunError", "train", "train_spawned", "build", "evaluate", "read_metrics",
           "check_run_dir", "read_run_config", "read_checkpoint", "check_device", "run_device"]
