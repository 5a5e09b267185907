"""Turn what users pass as data (Dataset, DataLoader, tuple of tensors) into ordered batches."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

DataLike = Any  # Dataset | DataLoader | tuple[Tensor, ...]


def as_dataset(data: DataLike, name: str = "data") -> Dataset:
    """The map-style dataset behind ``data``; positions in it are the indices we report.

    NumPy arrays in a tuple or dict are taken as tensors of the same dtype (no copy)."""
    if data is None or isinstance(data, (str, bytes)):  # a str has __getitem__ and __len__, but is no dataset
        raise TypeError(f"{name} must be a Dataset, a DataLoader, a tuple of tensors or arrays (inputs, targets) or "
                        f"a dict of tensors, got {type(data).__name__}" + (" (load the file first)" if data else ""))
    if isinstance(data, (tuple, list)) and data and any(isinstance(t, np.ndarray) for t in data):
        data = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in data)
    elif isinstance(data, Mapping) and any(isinstance(t, np.ndarray) for t in data.values()):
        data = {k: torch.from_numpy(t) if isinstance(t, np.ndarray) else t for k, t in data.items()}
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(f"{name} is a shuffled DataLoader; pass shuffle=False (indices must be positions)")
        data = data.dataset
    elif isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        data = TensorDataset(*_same_length(data, name))
    elif isinstance(data, Mapping) and data and all(torch.is_tensor(t) for t in data.values()):
        _same_length(data.values(), name)
        data = TensorDict(data)
    elif isinstance(data, (tuple, list, Mapping)):
        raise ValueError(f"{name} must be a Dataset, a DataLoader, a tuple of tensors or arrays (inputs, targets) "
                         "or a dict of tensors")
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{name} must be a map-style Dataset with __len__, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    return data


def _same_length(tensors: Any, name: str) -> Any:
    sizes = {len(t) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"{name}: tensors have different lengths {sorted(sizes)}")
    return tensors


class TensorDict(Dataset):
    """A dict of tensors ``{key: [N, ...]}`` (e.g. tokenizer output) as a dataset of dicts."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) > 1:
            raise ValueError(f"{type(self).__name__}: tensors have different lengths {sorted(sizes)}")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch) if not hasattr(batch, "_fields") else type(batch)(*(to_device(v, device) for v in batch))
    return batch


def gather(dataset: Dataset, indices: Sequence[int]) -> Any:
    """The examples at ``indices`` collated into one batch (fast path for TensorDataset)."""
    if isinstance(dataset, (TensorDataset, TensorDict)):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if isinstance(dataset, TensorDict):
            return {k: t[idx] for k, t in dataset.tensors.items()}
        return tuple(t[idx] for t in dataset.tensors)
    return default_collate([dataset[int(i)] for i in indices])


def subset(dataset: Dataset, indices: Tensor) -> Dataset:
    """The examples at ``indices`` (``[n]`` long) as a dataset, in that order."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    if isinstance(dataset, TensorDict):
        return TensorDict({k: t[indices] for k, t in dataset.tensors.items()})
    return Subset(dataset, indices.tolist())


def batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(start, batch)`` over ``dataset`` in order."""
    n = len(dataset)
    if isinstance(dataset, TensorDataset):
        for start in range(0, n, batch_size):
            yield start, tuple(t[start:start + batch_size] for t in dataset.tensors)
        return
    if isinstance(dataset, TensorDict):
        for start in range(0, n, batch_size):
            yield start, {k: t[start:start + batch_size] for k, t in dataset.tensors.items()}
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    start = 0
    for batch in loader:
        yield start, batch
        start += batch_len(batch)


def batch_len(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    return batch_len(batch[0])


def unsqueeze(batch: Any) -> Any:
    """Give every tensor a leading batch dim of 1 (used inside vmap over examples)."""
    if torch.is_tensor(batch):
        return batch.unsqueeze(0)
    if isinstance(batch, dict):
        return {k: unsqueeze(v) for k, v in batch.items()}
    return type(batch)(unsqueeze(v) for v in batch)


def repeat(batch: Any, n: int) -> Any:
    """Each tensor repeated ``n`` times along the batch dim."""
    if torch.is_tensor(batch):
        return batch.repeat_interleave(n, dim=0)
    if isinstance(batch, dict):
        return {k: repeat(v, n) for k, v in batch.items()}
    return type(batch)(repeat(v, n) for v in batch)


def check_finite(batch: Any, name: str) -> None:
    leaves = [batch] if torch.is_tensor(batch) else (batch.values() if isinstance(batch, dict) else batch)
    for t in leaves:
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf values")
