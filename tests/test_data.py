"""Dataset loaders: digits, IDX (MNIST / Fashion-MNIST), CIFAR-10 npz and python release, subset."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from forwardinf.data.loaders import (CIFAR10_NPZ, DATA_ENV, MNIST_DIR, DataSplit, data_dirs, load_cifar10, load_dataset,
                                     load_digits, load_idx, read_idx, subset)

# The CIFAR-10 subset wherever the loaders look for it (set $FORWARDINF_DATA to its folder to run the test).
SHARED_CIFAR = next((d / CIFAR10_NPZ for d in data_dirs() if (d / CIFAR10_NPZ).is_file()), None)
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_digits_shapes_normalisation_and_split():
    d = load_digits()
    assert isinstance(d, DataSplit) and d.name == "digits"
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.input_shape == (1, 8, 8) and d.n_classes == 10
    # standardised with train statistics
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-5
    raw = d.denormalize(d.x_train)
    assert float(raw.min()) == 0.0 and float(raw.max()) == pytest.approx(1.0, abs=1e-5)
    # raw pixels are multiples of 1/16
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4)
    # stratified: every class's share of train and test differs by under 1.5 points
    ptr = torch.bincount(d.y_train, minlength=10) / len(d.y_train)
    pte = torch.bincount(d.y_test, minlength=10) / len(d.y_test)
    assert float((ptr - pte).abs().max()) < 0.015
    x, y = d.train()
    assert x is d.x_train and y is d.y_train
    # deterministic; train + test is the whole dataset
    d2 = load_digits()
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.y_test, d2.y_test)
    assert len(d.y_train) + len(d.y_test) == 1797


def _write_mnist_dir(root: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for name, a in arrays.items():
        p = root / (name + (".gz" if gz else ""))
        header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
        with (gzip.open(p, "wb") if gz else open(p, "wb")) as f:
            f.write(header + a.tobytes())
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_on_written_files(tmp_path, gz):
    arrays = _write_mnist_dir(tmp_path, 30, 12, gz)
    d = load_idx(tmp_path, kind="mnist")
    assert d.name == "mnist" and d.classes == [str(i) for i in range(10)]
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (12, 1, 28, 28)
    assert torch.equal(d.y_train, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    # exact pixels back after undoing the normalisation
    back = (d.denormalize(d.x_test)[:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(back, arrays["t10k-images-idx3-ubyte"])
    assert abs(float(d.x_train.mean())) < 1e-5


def test_read_idx_other_dtypes_and_validation(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    p = tmp_path / "a.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 3]) + struct.pack(">3I", 2, 3, 4) + a.astype(">i4").tobytes())
    out = read_idx(p)
    assert out.shape == (2, 3, 4) and np.array_equal(out, a)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(bytes([1, 0, 0x08, 1]) + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="need 5 data bytes"):
        read_idx(short)
    code = tmp_path / "code.idx"
    code.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"a")
    with pytest.raises(ValueError, match="data type"):
        read_idx(code)


def test_idx_missing_and_inconsistent(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_idx(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_idx(tmp_path, kind="mnist")
    arrays = _write_mnist_dir(tmp_path, 10, 5, gz=False)
    lab = arrays["train-labels-idx1-ubyte"][:9]
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 9) + lab.tobytes())
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        load_idx(tmp_path, kind="mnist")
    with pytest.raises(ValueError, match="kind"):
        load_idx(tmp_path, kind="emnist")


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist():
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    # the official splits are exactly balanced
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert d.mean[0] == pytest.approx(0.2860, abs=1e-3) and d.std[0] == pytest.approx(0.3530, abs=1e-3)


@pytest.mark.skipif(SHARED_CIFAR is None, reason=f"CIFAR-10 subset absent (set ${DATA_ENV} to the folder "
                                                  f"holding {CIFAR10_NPZ})")
def test_cifar_npz_subset():
    d = load_cifar10(SHARED_CIFAR)
    assert d.x_train.shape == (10000, 3, 32, 32) and d.x_test.shape == (2000, 3, 32, 32)
    assert d.classes[:2] == ["airplane", "automobile"] and d.n_classes == 10
    m = d.x_train.double().mean(dim=(0, 2, 3))
    s = d.x_train.double().std(dim=(0, 2, 3))
    assert torch.allclose(m, torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(s, torch.ones(3, dtype=torch.float64), atol=1e-4)
    # CIFAR-10's known channel means (R > G > B)
    assert d.mean[0] == pytest.approx(0.49, abs=0.01) and d.mean[2] == pytest.approx(0.45, abs=0.01)
    raw = np.load(SHARED_CIFAR)["x_train"][7]
    back = (d.denormalize(d.x_train[7]) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, raw)
    # the default root finds the same file
    assert torch.equal(load_dataset("cifar10").y_train, d.y_train)


def _write_cifar_python(root: Path) -> list:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = []
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        parts.append((data, labels))
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return parts


def test_cifar_python_release(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    parts = _write_cifar_python(root)
    for r in (root, tmp_path):  # the folder itself or its parent
        d = load_cifar10(r)
        assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
        assert d.classes[3] == "cat"
        assert d.y_train.tolist() == sum((p[1] for p in parts[:5]), [])
        # rows are channel-major: first 1024 values are the red plane of image 0
        back = (d.denormalize(d.x_train[0]) * 255).round().to(torch.uint8).reshape(-1).numpy()
        assert np.array_equal(back, parts[0][0][0])
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(root)


def test_default_search_env_then_user_cache(tmp_path, monkeypatch):
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    monkeypatch.setenv(DATA_ENV, f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert data_dirs() == [a, b, cache / "forwardinf"]
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        load_dataset("cifar10")
    _write_cifar_python(cache / "forwardinf" / "cifar-10-batches-py")
    assert load_dataset("cifar10").x_train.shape == (20, 3, 32, 32)  # found in the user cache
    (b / "mnist").mkdir(parents=True)
    arrays = _write_mnist_dir(b / "mnist", 7, 3, gz=True)
    d = load_dataset("mnist")  # the second $FORWARDINF_DATA folder
    assert torch.equal(d.y_train, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    monkeypatch.setenv(DATA_ENV, "")
    if not Path(MNIST_DIR).exists():
        with pytest.raises(FileNotFoundError, match=DATA_ENV):
            load_dataset("mnist")  # nothing in the user cache nor in the Debian folder


def test_registry_and_errors(tmp_path):
    assert load_dataset().name == "digits"
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "missing.npz")


def test_subset_balanced_seeded():
    d = load_digits()
    s = subset(d, n_train=200, n_test=50, seed=3)
    assert torch.bincount(s.y_train, minlength=10).tolist() == [20] * 10
    assert torch.bincount(s.y_test, minlength=10).tolist() == [5] * 10
    s2 = subset(d, n_train=200, n_test=50, seed=3)
    assert torch.equal(s.x_train, s2.x_train) and torch.equal(s.y_test, s2.y_test)
    s3 = subset(d, n_train=200, seed=4)
    assert not torch.equal(s.x_train, s3.x_train)
    assert torch.equal(s3.x_test, d.x_test)  # None keeps the test side whole
    # uneven counts: 23 -> each class gets 2 or 3
    counts = torch.bincount(subset(d, n_train=23).y_train, minlength=10)
    assert int(counts.sum()) == 23 and set(counts.tolist()) <= {2, 3}
    # a short class gives all it has, others fill in
    keep = torch.cat([torch.nonzero(d.y_train == 0)[:3, 0], torch.nonzero(d.y_train != 0)[:, 0]])
    from dataclasses import replace
    skew = replace(d, x_train=d.x_train[keep], y_train=d.y_train[keep])
    c = torch.bincount(subset(skew, n_train=100).y_train, minlength=10)
    assert c[0] == 3 and int(c.sum()) == 100 and int(c[1:].max() - c[1:].min()) <= 1
    with pytest.raises(ValueError, match="only 1347"):
        subset(d, n_train=5000)
