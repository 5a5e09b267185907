"""The contract every estimator follows: ``fit`` / ``influence`` / ``top_k`` / ``self_influence``."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from forwardinf.core.params import device_of
from forwardinf.data.inputs import DataLike, as_dataset
from forwardinf.storage.topk import TopK
from forwardinf.tasks.base import Task
from forwardinf.tasks.classification import ClassificationTask


class NotFittedError(RuntimeError):
    """Raised when an estimator is used before ``fit``."""


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """The one error message for a bad parameter."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected one of {allowed}")


def check_positive(owner: str, name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected {kind}")


class Estimator:
    """Base class: scores are ``[n_query, n_train]``, higher = more influential (proponent).

    Subclasses store their keyword arguments in ``__init__``, do the work in ``fit`` (learned
    state ends in ``_``), and implement :meth:`influence`.
    """

    def __init__(self, model: nn.Module, task: Task | None = None) -> None:
        self.model = model
        self.task = task if task is not None else ClassificationTask()

    # -- contract -------------------------------------------------------------------
    def fit(self, train: DataLike) -> "Estimator":
        raise NotImplementedError

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` scores, or ``[n_train]`` for the query set as a whole (``joint``)."""
        raise NotImplementedError

    def self_influence(self) -> Tensor:
        """``[n_train]`` influence of each training point on itself."""
        raise NotImplementedError(f"{type(self).__name__} has no self-influence")

    def top_k(self, queries: DataLike, k: int = 10) -> TopK:
        """The ``k`` highest-scoring training points per query, best first; equal scores in
        training-index order (a stable sort: ``torch.topk`` leaves the order of ties unspecified)."""
        check_positive(type(self).__name__, "k", k, integer=True)
        scores = self.influence(queries)
        k = min(k, scores.shape[-1])
        values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        return TopK(indices[..., :k], values[..., :k])

    # -- helpers for subclasses -----------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "train_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(train) before influence()")

    def _device(self) -> torch.device:
        return device_of(self.model)

    def _dataset(self, data: DataLike, name: str) -> Any:
        return as_dataset(data, name)

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if not k.endswith("_") and not k.startswith("_") and k not in ("model", "task")]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"


def check_indices(owner: str, indices: Any, n: int) -> Tensor | None:
    """``indices`` (training positions) as a checked ``[k]`` long tensor; None means all ``n``."""
    if indices is None:
        return None
    idx = torch.as_tensor(indices)
    if idx.ndim != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{owner}: indices must be a non-empty 1-D sequence of integer training positions, "
                         f"got shape {tuple(idx.shape)} of {idx.dtype}")
    idx = idx.long()
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"{owner}: indices must lie in [0, {n}) (the fitted training set), "
                         f"got {int(idx.min())}..{int(idx.max())}")
    return idx
