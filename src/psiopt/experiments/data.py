"""Datasets, read from their standard files (nothing is downloaded), and fast batching.

Names: ``fashion-mnist``, ``mnist`` (IDX files, ``.gz`` or not), ``cifar10``, ``cifar100`` (the
python pickle batches), ``svhn`` (``train_32x32.mat``/``test_32x32.mat``, needs scipy),
``synthetic`` (generated images, for tests and when no dataset is installed) and
``toy-regression`` (Yi §6.1).  Every set is held in memory as normalised float32 tensors of shape
``(N, C, H, W)`` (``(N, F)`` for vectors); batches are drawn by indexing, and CIFAR/SVHN
augmentation (random crop with 4-pixel padding, horizontal flip) is done on whole batches, with
tensor operations on the device that holds the set (:func:`hold_on` moves a set that fits to a
GPU once, so that no batch is copied from the host).
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(Exception):
    """A dataset is missing or malformed; the message says where, what, and how to get it."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int  # 0 for regression
    augment: bool = False
    split: str = "test"  # what test_x/test_y are: the test set, or "validation" (held out)

    @property
    def task(self) -> str:
        return "regression" if self.num_classes == 0 else "classification"

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2] if self.train_x.dim() == 4 else 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.train_x, self.train_y, self.test_x, self.test_y))

    @property
    def device(self) -> torch.device:
        return self.train_x.device


#: a dataset is held on a GPU when it takes at most this fraction of the GPU's free memory
DEVICE_DATA_FRACTION = 0.25


def fits_on(data: Dataset, device: torch.device | str) -> bool:
    """Whether ``data`` takes at most :data:`DEVICE_DATA_FRACTION` of ``device``'s free memory
    (a CUDA device's; any other device: yes)."""
    device = torch.device(device)
    return device.type != "cuda" or \
        data.nbytes <= DEVICE_DATA_FRACTION * torch.cuda.mem_get_info(device)[0]


def hold_on(data: Dataset, device: torch.device | str, fits: bool | None = None) -> Dataset:
    """``data`` moved to ``device`` (one transfer; its batches are then drawn and augmented
    there) when it fits there (``fits``, default :func:`fits_on`: the processes of one run
    decide together, as their batches are drawn by the generator of the data's device); else
    ``data`` itself, held on the host (each batch is then copied to the device).  On the CPU,
    ``data`` itself."""
    device = torch.device(device)
    if device.type == "cpu" or data.device == device:
        return data
    if not (fits_on(data, device) if fits is None else fits):
        return data
    return dataclasses.replace(data, **{k: getattr(data, k).to(device)
                                        for k in ("train_x", "train_y", "test_x", "test_y")})


# -- file formats ---------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # missing, unreadable, truncated or corrupt .gz
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape}, but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(dirs: list[Path], stem: str, hint: str) -> Path:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    where = ", ".join(str(d) for d in dirs)
    raise DataError(f"{stem}[.gz] not found in {where}; {hint}")


#: the image size of the IDX datasets (MNIST, Fashion-MNIST)
IDX_IMAGE = (28, 28)


def _idx_dataset(name: str, dirs: list[Path], hint: str) -> tuple:
    paths = [_find(dirs, f"{split}-{kind}", hint)
             for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    parts = [read_idx(path) for path in paths]
    for path, array in zip(paths, parts):
        if array.ndim and not len(array):
            raise DataError(f"{path}: holds 0 samples, so there is nothing to train or test "
                            f"on; put the {name} files under --data-dir")
    for images, labels in (parts[:2], parts[2:]):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{name}: images {images.shape} and labels {labels.shape} do not match")
    for path, images in ((paths[0], parts[0]), (paths[2], parts[2])):
        if images.shape[1:] != IDX_IMAGE:
            raise DataError(f"{path}: images of {images.shape[1]}×{images.shape[2]} pixels, but "
                            f"{name} images are {IDX_IMAGE[0]}×{IDX_IMAGE[1]}: not a {name} file")
    return parts[0][:, None], parts[1], parts[2][:, None], parts[3]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: cannot read CIFAR pickle batch ({e})") from None


def _cifar(data_dir: Path | None, hundred: bool) -> tuple:
    folder, files = (("cifar-100-python", (["train"], ["test"])) if hundred else
                     ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)],
                                              ["test_batch"])))
    label_key = b"fine_labels" if hundred else b"labels"
    if data_dir is None:
        raise DataError(f"CIFAR needs --data-dir pointing to the directory holding {folder}/")
    base = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    out = []
    for names in files:
        batches = [_unpickle(base / n) if (base / n).is_file() else None for n in names]
        if None in batches:
            missing = names[batches.index(None)]
            raise DataError(f"{base / missing} not found: expected the python version of "
                            f"{folder} (the standard pickle batches) under --data-dir")
        try:
            x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            y = np.concatenate([np.asarray(b[label_key]) for b in batches])
            for name, batch in zip(names, batches):
                images, labels = len(batch[b"data"]), len(batch[label_key])
                if images != labels:
                    raise DataError(f"{base / name}: {images} images but {labels} labels: not a "
                                    f"{folder} batch")
        except (KeyError, ValueError, TypeError, IndexError) as e:  # e.g. a batch that is no dict
            raise DataError(f"{base}: malformed CIFAR batch ({e!r})") from None
        out += [x, y]
    return tuple(out)


def _svhn(data_dir: Path | None) -> tuple:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("SVHN needs scipy: pip install 'psiopt[svhn]'") from None
    if data_dir is None:
        raise DataError("SVHN needs --data-dir pointing to train_32x32.mat and test_32x32.mat")
    out = []
    for split in ("train", "test"):
        path = data_dir / f"{split}_32x32.mat"
        if not path.is_file():
            raise DataError(f"{path} not found: expected SVHN's cropped-digits .mat files")
        mat = loadmat(path)
        if "X" not in mat or "y" not in mat:
            raise DataError(f"{path}: expected variables 'X' (32x32x3xN) and 'y'")
        out += [mat["X"].transpose(3, 2, 0, 1), mat["y"].reshape(-1) % 10]
    return tuple(out)


def synthetic(n_train: int = 2048, n_test: int = 512, classes: int = 10, size: int = 16,
              seed: int = 0) -> tuple:
    """Noisy class templates as 1×size×size images: learnable, tiny, deterministic."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, size, size, generator=g)

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return templates[y] + 1.5 * torch.randn(n, 1, size, size, generator=g), y

    return (*draw(n_train), *draw(n_test))


def toy_regression(n: int = 1000, features: int = 10, seed: int = 0) -> tuple:
    """Yi §6.1: ``x ~ N(0, I)``, ``y = μᵀx + ε`` with ``ε ~ N(0, 1)`` (train and test sets)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(features, generator=g)

    def draw():
        x = torch.randn(n, features, generator=g)
        return x, (x @ mu + torch.randn(n, generator=g))[:, None]

    return (*draw(), *draw())


# -- registry -------------------------------------------------------------------------------------
def _idx_dirs(name: str, data_dir: Path | None) -> list[Path]:
    dirs = [data_dir, data_dir / name, data_dir / "MNIST" / "raw"] if data_dir else []
    return dirs + ([FASHION_DIR] if name == "fashion-mnist" else [])


_HINTS = {
    "fashion-mnist": "install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir",
    "mnist": "pass --data-dir pointing to the MNIST IDX files (train-images-idx3-ubyte[.gz] ...)",
}
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "synthetic", "toy-regression")


def _raw(name: str, data_dir: Path | None, seed: int) -> tuple:
    if name in ("fashion-mnist", "mnist"):
        return _idx_dataset(name, _idx_dirs(name, data_dir), _HINTS[name])
    if name in ("cifar10", "cifar100"):
        return _cifar(data_dir, name == "cifar100")
    if name == "svhn":
        return _svhn(data_dir)
    if name == "synthetic":
        return synthetic(seed=seed)
    return toy_regression(seed=seed)


def is_available(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``load_dataset(name, data_dir)`` would find its files (cheap: no full read)."""
    d = Path(data_dir) if data_dir else None
    if name in ("synthetic", "toy-regression"):
        return True
    if name in ("fashion-mnist", "mnist"):
        try:
            _find(_idx_dirs(name, d), "train-images-idx3-ubyte", "")
            return True
        except DataError:
            return False
    if d is None:
        return False
    names = {"cifar10": "cifar-10-batches-py/test_batch", "cifar100": "cifar-100-python/test",
             "svhn": "test_32x32.mat"}
    rel = names[name]
    return (d / rel).is_file() or (d / Path(rel).name).is_file()


def load_dataset(name: str, data_dir: str | Path | None = None, subset: int | None = None,
                 seed: int = 0, validation: int | None = None) -> Dataset:
    """Load a dataset by name, normalised per channel with training-set statistics.

    ``subset`` keeps the first ``subset`` training and ``max(subset // 5, 100)`` test samples.
    ``validation`` holds out the last ``validation`` training samples and returns them in place
    of the test set (``split="validation"``; the test set is not touched); ``subset`` then keeps
    the first ``subset`` of the remaining training samples.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    for what, n in (("subset", subset), ("validation", validation)):
        if n is not None and n <= 0:
            raise ValueError(f"invalid {what}: {n} (must be positive)")
    tx, ty, vx, vy = (torch.tensor(np.asarray(a)) if isinstance(a, np.ndarray) else a
                      for a in _raw(name, Path(data_dir) if data_dir else None, seed))
    if validation is not None:
        if validation > len(tx) - 2:
            raise ValueError(f"invalid validation: {validation} (the training set has {len(tx)} "
                             "samples; at least 2 must be left to train on)")
        tx, ty, vx, vy = tx[:-validation], ty[:-validation], tx[-validation:], ty[-validation:]
        if subset is not None:
            tx, ty = tx[:subset], ty[:subset]
    elif subset is not None:
        tx, ty, vx, vy = tx[:subset], ty[:subset], vx[:max(subset // 5, 100)], vy[:max(subset // 5, 100)]
    if len(tx) < 2 or not len(vx):
        raise DataError(f"{name}: {len(tx)} training and {len(vx)} "
                        f"{'validation' if validation else 'test'} samples; at least 2 and 1 are "
                        "needed (check the files under --data-dir)")
    tx, vx = tx.float(), vx.float()
    dims = [0] + list(range(2, tx.dim()))
    mean, std = tx.mean(dims, keepdim=True), tx.std(dims, keepdim=True).clamp_min(1e-6)
    regression = name == "toy-regression"
    classes = 0 if regression else {"cifar100": 100}.get(name, 10)
    for split, labels in (("training", ty), ("test", vy)):
        if not regression and len(labels) and not (0 <= int(labels.min()) and
                                                   int(labels.max()) < classes):
            raise DataError(f"{name}: {split} labels outside 0..{classes - 1} (found "
                            f"{int(labels.min())}..{int(labels.max())}): not a {name} file")
    return Dataset(name, (tx - mean) / std, ty if regression else ty.long(), (vx - mean) / std,
                   vy if regression else vy.long(), classes,
                   augment=name in ("cifar10", "cifar100", "svhn"),
                   split="test" if validation is None else "validation")


# -- batching -------------------------------------------------------------------------------------
def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, per sample; on
    ``x``'s device, with ``generator`` (a generator of that device)."""
    n, c, h, w = x.shape
    on = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=on)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=on)
    rows = (dy + torch.arange(h, device=on))[:, None, :, None]
    cols = (dx + torch.arange(w, device=on))[:, None, None, :]
    out = padded[torch.arange(n, device=on)[:, None, None, None],
                 torch.arange(c, device=on)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator, device=on) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None, augment: bool = False, min_size: int = 1):
    """Yield ``(x, y)`` mini-batches on ``x``'s device; shuffled (and augmented) when a generator
    (of that device) is given.  A last batch smaller than ``min_size`` is left out (training:
    BatchNorm needs two samples)."""
    n = len(x)
    order = torch.randperm(n, generator=generator, device=x.device) if generator is not None \
        else torch.arange(n, device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < min_size:
            return
        xb = x[idx]
        if augment and generator is not None:
            xb = augment_batch(xb, generator)
        yield xb, y[idx]
