"""Dataset loaders: sklearn digits (embedded), MNIST / Fashion-MNIST IDX files, CIFAR-10.

Every loader returns a :class:`DataSplit` of float32 NCHW inputs and int64 labels, normalised with
statistics of the *training* split only (so the test split never leaks into preprocessing):

- digits: pixels / 16 -> [0, 1], then one scalar mean/std (grey images).
- MNIST / Fashion-MNIST: pixels / 255 -> [0, 1], then one scalar mean/std.
- CIFAR-10: pixels / 255 -> [0, 1], then per-channel mean/std.

The statistics are kept on the split (``mean``/``std``, one entry per channel) so figures can map
inputs back to [0, 1] with :meth:`DataSplit.denormalize`.

Where the files are found. A ``root`` (``--data-root``) names the dataset's own file or folder. Without
one, a loader looks in :func:`data_dirs`, in order: every folder in ``$FORWARDINF_DATA`` (several
separated by ``os.pathsep``), then the user cache folder ``$XDG_CACHE_HOME/forwardinf`` (default
``~/.cache/forwardinf``). In each it expects ``cifar10-12k.npz`` or ``cifar-10-batches-py/`` for
CIFAR-10, ``fashion-mnist/`` and ``mnist/`` (the four IDX files) for the others; Fashion-MNIST and
MNIST last fall back to the Debian package folders ``/usr/share/datasets/<name>``
(``apt-get install -y dataset-fashion-mnist``). Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
# Debian ships no MNIST package; this is only where we look when no root is given.
MNIST_DIR = "/usr/share/datasets/mnist"
CIFAR10_NPZ = "cifar10-12k.npz"
CIFAR10_PYTHON = "cifar-10-batches-py"
DATA_ENV = "FORWARDINF_DATA"

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]

@dataclass
class DataSplit:
    """A train/test split of an image classification dataset.

    ``x_train`` [N, C, H, W] float32 (normalised, see module doc), ``y_train`` [N] int64,
    ``x_test`` [M, C, H, W], ``y_test`` [M]; ``classes`` names in label order.
    ``mean``/``std`` ([C] each) undo the normalisation: ``x * std + mean`` is in [0, 1].
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def train(self) -> tuple[Tensor, Tensor]:
        """``(x_train [N, C, H, W], y_train [N])``."""
        return self.x_train, self.y_train

    def test(self) -> tuple[Tensor, Tensor]:
        """``(x_test [M, C, H, W], y_test [M])``."""
        return self.x_test, self.y_test

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalised inputs ``[..., C, H, W]`` back to pixel intensities in [0, 1]."""
        c = x.shape[-3]
        mean = torch.as_tensor(self.mean, dtype=x.dtype).reshape(-1, 1, 1).expand(c, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).reshape(-1, 1, 1).expand(c, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def __repr__(self) -> str:
        return (f"DataSplit(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, n_classes={self.n_classes})")


def _make_split(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                classes: list[str], name: str, scale: float, per_channel: bool) -> DataSplit:
    """uint8/float NHWC or NCHW arrays already in NCHW -> standardised DataSplit (train stats only)."""
    xtr = torch.from_numpy(np.ascontiguousarray(x_train)).to(torch.float32) / scale
    xte = torch.from_numpy(np.ascontiguousarray(x_test)).to(torch.float32) / scale
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    # float64 accumulation: a float32 sum over 10^7-10^8 pixels loses digits.
    mean = xtr.double().mean(dim=dims)
    std = xtr.double().std(dim=dims)
    if per_channel:
        m, s = mean.float().reshape(1, -1, 1, 1), std.float().reshape(1, -1, 1, 1)
        mean_t, std_t = tuple(mean.tolist()), tuple(std.tolist())
    else:
        m, s = mean.float(), std.float()
        mean_t, std_t = (float(mean),), (float(std),)
    return DataSplit(
        x_train=((xtr - m) / s).contiguous(),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64).copy()),
        x_test=((xte - m) / s).contiguous(),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64).copy()),
        classes=list(classes), name=name, mean=mean_t, std=std_t,
    )


# --------------------------------------------------------------------------------------- digits
def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplit:
    """scikit-learn's 1,797 handwritten 8x8 digits: ``[N, 1, 8, 8]``, 10 classes.

    Deterministic stratified split (default 75/25, ``seed`` 0): 1,347 train / 450 test.
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    d = _sk_digits()
    x = d.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                      random_state=seed, stratify=y)
    # Sorted indices keep the original (sklearn) order inside each split: reproducible positions.
    idx_tr, idx_te = np.sort(idx_tr), np.sort(idx_te)
    return _make_split(x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], DIGIT_CLASSES, "digits",
                       scale=16.0, per_channel=False)


# ------------------------------------------------------------------------------------------ IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into an array of its declared dtype and shape.

    Format: 2 zero bytes, a dtype code, the number of dims ``d``, then ``d`` big-endian uint32
    sizes, then the data in row-major order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()} (first two bytes must be 0)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, stem: str) -> Path:
    # Distributions name the files "train-images-idx3-ubyte" or "train-images.idx3-ubyte".
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root / stem}(.gz) not found")


def data_dirs() -> list[Path]:
    """The folders searched when no root is given: ``$FORWARDINF_DATA`` then the user cache folder."""
    env = [Path(p).expanduser() for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "forwardinf"
    return env + [cache]


def _idx_candidates(kind: str) -> list[Path]:
    return [d / kind for d in data_dirs()] + [Path(FASHION_MNIST_DIR if kind == "fashion-mnist" else MNIST_DIR)]


def load_idx(root: str | os.PathLike | None = None, kind: str = "fashion-mnist") -> DataSplit:
    """MNIST or Fashion-MNIST from the four IDX files in ``root``: ``[N, 1, 28, 28]``, 10 classes.

    ``root`` None -> the first folder ``<d>/<kind>`` holding them, ``d`` in :func:`data_dirs`, else
    ``/usr/share/datasets/<kind>`` (for Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist``).
    Full sizes: 60,000 train / 10,000 test.
    """
    if kind not in ("fashion-mnist", "mnist"):
        raise ValueError(f"kind must be 'fashion-mnist' or 'mnist', got {kind!r}")
    if root is None:
        candidates = _idx_candidates(kind)
        root = next((c for c in candidates if any(c.glob("train-images*"))), candidates[-1])
    root = Path(root)
    files = {}
    for key, stem in (("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
                      ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte")):
        try:
            files[key] = _find_idx(root, stem)
        except FileNotFoundError:
            hint = (f"install it with `{FASHION_MNIST_APT}` (puts the files in {FASHION_MNIST_DIR})"
                    if kind == "fashion-mnist" else "put the four MNIST IDX files in a folder")
            hint += (f", pass that folder as root (--data-root) or name its parent in ${DATA_ENV}; searched "
                     + ", ".join(str(c) for c in _idx_candidates(kind)))
            raise FileNotFoundError(f"{kind}: {root / stem}(.gz) not found; {hint}") from None
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise ValueError(f"{kind} {split}: expected images [N, H, W] and labels [N], "
                             f"got {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{kind} {split}: {len(x)} images but {len(y)} labels")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{kind} {split}: labels outside 0..9")
    classes = FASHION_CLASSES if kind == "fashion-mnist" else DIGIT_CLASSES
    return _make_split(arrays["x_train"][:, None], arrays["y_train"], arrays["x_test"][:, None],
                       arrays["y_test"], classes, kind, scale=255.0, per_channel=False)


# -------------------------------------------------------------------------------------- CIFAR-10
def _cifar_candidates() -> list[Path]:
    return [d / name for d in data_dirs() for name in (CIFAR10_NPZ, CIFAR10_PYTHON)]


def _load_cifar_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as d:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        classes = [str(c) for c in d["classes"]] if "classes" in d.files else [str(i) for i in range(10)]
        out = [d[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    for k, x in zip(("x_train", "x_test"), (out[0], out[2])):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{path}: {k} must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
    return out[0], out[1], out[2], out[3], classes


def _unpickle(path: Path) -> dict:
    # The original release is a set of Python pickles; only load files you trust.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _load_cifar_python(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        p = root / name
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10: {p} not found (expected the python release "
                                    "cifar-10-batches-py with data_batch_1..5 and test_batch)")
        d = _unpickle(p)
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise ValueError(f"{p}: expected data [N, 3072] and N labels, got {data.shape}, {labels.shape}")
        # Rows are channel-major 3x32x32 already (NCHW), unlike the npz subset.
        return data.reshape(-1, 3, 32, 32), labels

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = batch("test_batch")
    meta = root / "batches.meta"
    classes = ([c.decode() for c in _unpickle(meta)[b"label_names"]] if meta.is_file()
               else [str(i) for i in range(10)])
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            x_te, y_te, classes)


def load_cifar10(root: str | os.PathLike | None = None) -> DataSplit:
    """CIFAR-10 as ``[N, 3, 32, 32]`` with per-channel standardisation.

    ``root``: the shared ``.npz`` subset (uint8 HWC, 10,000 train / 2,000 test), a folder holding
    it, or the original python release (``cifar-10-batches-py`` or its parent). None -> the first
    ``<d>/cifar10-12k.npz`` or ``<d>/cifar-10-batches-py`` that exists, ``d`` in :func:`data_dirs`
    (``$FORWARDINF_DATA``, then ``~/.cache/forwardinf``).
    """
    if root is None:
        found = [p for p in _cifar_candidates() if p.exists()]
        if not found:
            raise FileNotFoundError("CIFAR-10: no root given and none of "
                                    + ", ".join(str(p) for p in _cifar_candidates())
                                    + f" exists; pass root= (--data-root) pointing at the .npz or the "
                                    f"{CIFAR10_PYTHON} folder, or set ${DATA_ENV} to the folder holding it")
        path = found[0]
    else:
        path = Path(root)
    if path.is_dir():
        if (path / CIFAR10_PYTHON).is_dir():
            path = path / CIFAR10_PYTHON
        elif (path / CIFAR10_NPZ).is_file():
            path = path / CIFAR10_NPZ
    if path.is_file():
        x_tr, y_tr, x_te, y_te, classes = _load_cifar_npz(path)
        x_tr, x_te = x_tr.transpose(0, 3, 1, 2), x_te.transpose(0, 3, 1, 2)
    elif path.is_dir():
        x_tr, y_tr, x_te, y_te, classes = _load_cifar_python(path)
    else:
        raise FileNotFoundError(f"CIFAR-10: {path} not found (give the .npz subset or the "
                                "cifar-10-batches-py folder)")
    for name, y in (("train", y_tr), ("test", y_te)):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"CIFAR-10 {name}: labels outside 0..{len(classes) - 1}")
    return _make_split(x_tr, y_tr, x_te, y_te, classes, "cifar10", scale=255.0, per_channel=True)


# -------------------------------------------------------------------------------------- registry
LOADERS: dict[str, Callable[[str | os.PathLike | None], DataSplit]] = {
    "digits": lambda root=None: load_digits(),
    "fashion-mnist": lambda root=None: load_idx(root, kind="fashion-mnist"),
    "mnist": lambda root=None: load_idx(root, kind="mnist"),
    "cifar10": lambda root=None: load_cifar10(root),
}


def load_dataset(name: str = "digits", root: str | os.PathLike | None = None) -> DataSplit:
    """Load a dataset by name: ``digits`` (embedded default), ``fashion-mnist``, ``mnist``, ``cifar10``."""
    key = name.lower().replace("_", "-")
    key = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[key](root)


# ---------------------------------------------------------------------------------------- subset
def balanced_indices(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` positions of ``y`` [N], as equal per class as possible, seeded; sorted ascending.

    Classes are dealt round-robin (each in its own seeded random order), so a class with too few
    examples gives all it has and the others fill the remainder.
    """
    if n > len(y):
        raise ValueError(f"asked for {n} examples but only {len(y)} are available")
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    yp = y[perm]
    # rank of each (shuffled) example within its class: 0 for the first of each class, 1 ...
    order = torch.argsort(yp, stable=True)
    ys = yp[order]
    starts = torch.searchsorted(ys, ys, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(ys)) - starts
    # deal by rank; ties (same rank, different classes) broken by a class order that is also seeded
    class_key = torch.randperm(int(y.max()) + 1 if len(y) else 1, generator=g)[yp]
    key = rank * (int(class_key.max()) + 1 if len(y) else 1) + class_key
    chosen = perm[torch.argsort(key, stable=True)[:n]]
    return torch.sort(chosen).values


def subset(split: DataSplit, n_train: int | None = None, n_test: int | None = None,
           seed: int = 0) -> DataSplit:
    """A class-balanced, seeded subsample of ``split`` (None keeps that side whole).

    Normalisation is left as in ``split`` (stats of the full training set).
    """
    out = split
    if n_train is not None:
        i = balanced_indices(split.y_train, n_train, seed)
        out = replace(out, x_train=split.x_train[i], y_train=split.y_train[i])
    if n_test is not None:
        i = balanced_indices(split.y_test, n_test, seed + 1)
        out = replace(out, x_test=split.x_test[i], y_test=split.y_test[i])
    return out
