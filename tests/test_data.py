import gzip
import pickle

import numpy as np
import pytest
import torch

from psiopt.experiments import data
from psiopt.experiments.data import DataError, augment_batch, batches, load_dataset


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big")
                                                         for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def make_idx_dir(root, n_train=30, n_test=12, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader(tmp_path, name, compress):
    make_idx_dir(tmp_path, compress=compress)
    ds = load_dataset(name, tmp_path)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_y.dtype == torch.long and ds.num_classes == 10
    assert abs(ds.train_x.mean().item()) < 1e-5 and abs(ds.train_x.std().item() - 1) < 1e-3
    raw = data.read_idx(tmp_path / f"train-labels-idx1-ubyte{'.gz' if compress else ''}")
    assert torch.equal(ds.train_y, torch.tensor(raw).long())


def test_malformed_idx_names_the_file(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((30, 28, 28)), False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="header says"):
        load_dataset("mnist", tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
    assert not data.is_available("fashion-mnist", tmp_path)


@pytest.mark.skipif(not data.FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))


def write_cifar(root, hundred):
    rng = np.random.default_rng(0)
    key = b"fine_labels" if hundred else b"labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 key: list(rng.integers(0, 100 if hundred else 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loader(tmp_path, hundred):
    write_cifar(tmp_path, hundred)
    ds = load_dataset("cifar100" if hundred else "cifar10", tmp_path)
    assert ds.train_x.shape == ((4 if hundred else 20), 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.num_classes == (100 if hundred else 10) and ds.augment


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path, False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 not found"):
        load_dataset("cifar10", tmp_path)


def test_svhn_loader(tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8),
                 "y": np.array([[10], [1], [2], [3], [10], [9]])})
    ds = load_dataset("svhn", tmp_path)
    assert ds.train_x.shape == (6, 3, 32, 32)
    assert ds.train_y.tolist() == [0, 1, 2, 3, 0, 9]


def test_generated_sets_and_subset():
    ds = load_dataset("synthetic", subset=300)
    assert ds.train_x.shape == (300, 1, 16, 16) and ds.test_x.shape == (100, 1, 16, 16)
    toy = load_dataset("toy-regression")
    assert toy.task == "regression" and toy.train_x.shape == (1000, 10) and toy.train_y.shape == (1000, 1)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_augmentation_crops_and_flips():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    outs = [augment_batch(x.repeat(50, 1, 1, 1), gen, pad=2) for _ in range(2)]
    out = outs[0]
    assert out.shape == (100, 3, 6, 6)
    padded = torch.nn.functional.pad(x.repeat(50, 1, 1, 1), (2, 2, 2, 2))
    for i in range(100):
        candidates = [padded[i, :, a:a + 6, b:b + 6] for a in range(5) for b in range(5)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not torch.equal(outs[0], outs[1])
    again = augment_batch(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(again, outs[0])


def test_batches_cover_each_sample_once():
    x = torch.arange(10.0)[:, None]
    seen = torch.cat([xb for xb, _ in batches(x, x, 3, torch.Generator().manual_seed(1))])
    assert sorted(seen.flatten().tolist()) == list(range(10))
