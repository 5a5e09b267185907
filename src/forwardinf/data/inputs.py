"""Turn what users pass as data (Dataset, DataLoader, tuple of tensors) into ordered batches."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate, default_convert

DataLike = Any  # Dataset | DataLoader | tuple[Tensor, ...] | dict | list[dict] | datasets.Dataset


def as_dataset(data: DataLike, name: str = "data") -> Dataset:
    """The map-style dataset behind ``data``; positions in it are the indices we report.

    ``data``: a map-style ``Dataset``, a list of per-example dicts, a Hugging Face
    ``datasets.Dataset`` (its tensor columns, in torch format), a tuple or dict of tensors (NumPy
    arrays are taken as tensors of the same dtype, no copy), or a ``DataLoader`` whose
    ``collate_fn`` batches the examples (e.g. ``DataCollatorWithPadding``) and whose sampler's
    order (and drops, ``drop_last``) define the positions; a sampler that draws another order on
    every pass is refused."""
    if data is None or isinstance(data, (str, bytes)):  # a str has __getitem__ and __len__, but is no dataset
        raise TypeError(f"{name} must be a Dataset, a DataLoader, a tuple of tensors or arrays (inputs, targets) or "
                        f"a dict of tensors, got {type(data).__name__}" + (" (load the file first)" if data else ""))
    if isinstance(data, (tuple, list)) and data and any(isinstance(t, np.ndarray) for t in data):
        data = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in data)
    elif isinstance(data, Mapping) and any(isinstance(t, np.ndarray) for t in data.values()):
        data = {k: torch.from_numpy(t) if isinstance(t, np.ndarray) else t for k, t in data.items()}
    if isinstance(data, DataLoader):
        data = _from_loader(data, name)
    elif _is_hf_dataset(data):
        data = _torch_columns(data, name)
    elif isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        data = TensorDataset(*_same_length(data, name))
    elif isinstance(data, Mapping) and data and all(torch.is_tensor(t) for t in data.values()):
        _same_length(data.values(), name)
        data = TensorDict(data)
    elif isinstance(data, list) and data and all(isinstance(x, Mapping) for x in data):
        pass  # per-example dicts: a list is a map-style dataset
    elif isinstance(data, (tuple, list, Mapping)):
        raise ValueError(f"{name} must be a Dataset, a DataLoader, a tuple of tensors or arrays (inputs, targets), "
                         "a dict of tensors, a list of per-example dicts or a Hugging Face datasets.Dataset")
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ValueError(f"{name} must be a map-style Dataset with __len__, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    return data


class Collated(Dataset):
    """``dataset`` whose examples are batched by ``collate_fn`` (a DataLoader's) instead of ``default_collate``."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


def _from_loader(loader: DataLoader, name: str) -> Any:
    """The dataset a DataLoader yields: its examples in the sampler's order, batched by its collate_fn."""
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"{name}: a DataLoader over an IterableDataset has no positions; pass a map-style dataset")
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(f"{name} is a shuffled DataLoader; pass shuffle=False (indices must be positions)")
    def order() -> list[int]:
        if loader.batch_sampler is not None:
            return [int(i) for b in loader.batch_sampler for i in b]
        return [int(i) for i in loader.sampler]

    first = order()
    if first != order():
        raise ValueError(f"{name}: the DataLoader's sampler ({type(loader.sampler).__name__}) draws a different "
                         "order on every pass, so training positions would mean nothing; pass shuffle=False, or "
                         "a dataset of the points in one fixed order")
    dataset: Any = loader.dataset
    if first != list(range(len(dataset))):  # reordered or dropped points: positions are the sampler's order
        dataset = Subset(dataset, first)
    if loader.collate_fn not in (default_collate, default_convert):
        dataset = Collated(dataset, loader.collate_fn)
    return dataset


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "with_format")


def _torch_columns(data: Any, name: str) -> Any:
    """A Hugging Face ``datasets.Dataset`` in torch format, restricted to its tensor columns
    (text and other columns a model cannot take are left out)."""
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    row = data.with_format("torch")[0]
    columns = [k for k, v in row.items() if torch.is_tensor(v)]
    if not columns:
        raise ValueError(f"{name}: the datasets.Dataset has no numeric column (tokenize it first); columns: {list(row)}")
    return data.with_format("torch", columns=columns)


def collate(dataset: Any, examples: list[Any]) -> Any:
    """``examples`` batched as ``dataset`` says (a DataLoader's collate_fn) or by ``default_collate``."""
    fn = dataset.collate_fn if isinstance(dataset, Collated) else default_collate
    try:
        out = fn(examples)
    except RuntimeError as e:
        if fn is default_collate and "equal size" in str(e):
            raise ValueError("examples have different lengths and cannot be stacked: pass a DataLoader with a padding "
                             "collate_fn (e.g. transformers.DataCollatorWithPadding(tokenizer)), or pad them "
                             f"first ({e})") from e
        raise
    # a collator's BatchEncoding (a UserDict) as a plain dict, which the rest of the library handles
    return dict(out) if isinstance(out, Mapping) and not isinstance(out, dict) else out


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
    return collate(dataset, [dataset[int(i)] for i in indices])


def subset(dataset: Dataset, indices: Tensor) -> Dataset:
    """The examples at ``indices`` (``[n]`` long) as a dataset, in that order."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    if isinstance(dataset, TensorDict):
        return TensorDict({k: t[indices] for k, t in dataset.tensors.items()})
    if isinstance(dataset, Collated):
        return Collated(Subset(dataset.dataset, indices.tolist()), dataset.collate_fn)
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
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=lambda ex: collate(dataset, ex))
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


def take(batch: Any, index: int | slice) -> Any:
    """``t[index]`` of every tensor of a batch: one example (an int) or a batch of some (a slice)."""
    if torch.is_tensor(batch):
        return batch[index]
    if isinstance(batch, dict):
        return {k: take(v, index) for k, v in batch.items()}
    return type(batch)(take(v, index) for v in batch)


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
