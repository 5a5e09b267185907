"""The input checks, run before any expensive work: one batch against a model and task
(:func:`check_batch`), a whole dataset batch by batch (:func:`check_data`, what every estimator's
``fit`` and ``influence`` run through :meth:`forwardinf.estimators.base.Estimator._load`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from forwardinf.core.params import device_of, mode
from forwardinf.data.inputs import as_dataset, batches, check_finite, to_device

if TYPE_CHECKING:
    from forwardinf.tasks.base import Task


def check_batch(model: nn.Module, task: "Task", batch: Any, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` (the user's argument, e.g. ``"train"``) if ``task``
    cannot score ``batch`` with ``model``: non-finite inputs, what ``task.validate`` refuses
    (labels out of range, 2-D labels, ...), or a model that cannot run on the inputs (feature
    count, dtype). ``validate`` runs one example through the model in eval mode (so BatchNorm's
    running statistics stay as they are); every mode flag is restored after."""
    check_finite(batch, name)
    with mode(model, False):
        try:
            task.validate(model, to_device(batch, device_of(model)))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        except KeyError as e:  # a dict batch without a field the task reads
            raise ValueError(f"{name}: each example needs the field {e} (the task reads it)") from e
        except (RuntimeError, IndexError, TypeError) as e:  # e.g. a shape or dtype mismatch inside the model
            raise ValueError(f"{name}: the model cannot run on these inputs: {e}{_dtype_hint(model, batch)}") from e


def feature_shapes(batch: Any) -> list[tuple[int, ...]]:
    """Per-example shapes of the floating-point tensors (features) of a batch.

    Integer tensors (labels, token ids, masks) are left out: sequences may be padded to a
    different length in the queries than in the training data.
    """
    leaves = [batch] if torch.is_tensor(batch) else list(batch.values() if isinstance(batch, dict) else batch)
    return [tuple(t.shape[1:]) for t in leaves if torch.is_tensor(t) and t.is_floating_point()]


def check_data(data: Any, name: str, model: nn.Module | None, task: "Task | None",
               shapes: list[tuple[int, ...]] | None = None, batch_size: int = 1024) -> list[tuple[int, ...]]:
    """Refuse bad data with a ``ValueError`` naming it; return the per-example feature shapes.

    Every batch: finite inputs, the same per-example shapes throughout (and as ``shapes``, the
    training data's, when given), and, with a ``model`` and ``task``, ``task.validate`` in eval
    mode (labels in range, the model runs on the inputs).
    """
    dataset = as_dataset(data, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    seen = None
    for start, batch in batches(dataset, batch_size):
        here = feature_shapes(batch)
        if seen is None:
            seen = here
            if shapes is not None and here != shapes:
                raise ValueError(f"{name}: per-example shapes {here} do not match the training data's {shapes}")
        elif here != seen:
            raise ValueError(f"{name}: examples from {start} on have shapes {here}, earlier ones {seen}")
        if model is not None and task is not None:
            check_batch(model, task, batch, name)
        else:
            check_finite(batch, name)
    return seen or []


def check_finite_values(values: Tensor, name: str, what: str) -> None:
    """``values [n, ...]`` computed per example of ``name`` must be finite: a finite input too large
    for the model's precision overflows inside it, and its NaN would end up in the scores."""
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.reshape(len(values), -1).any(1).nonzero()[0])
        raise ValueError(f"{name}: non-finite {what} on example {i} with the unchanged model (an input too large "
                         "for the model's precision?)")


def _dtype_hint(model: nn.Module, batch: Any) -> str:
    """A hint when the inputs' dtype differs from the parameters' (NumPy's float64 or int64 into a float32 model)."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch.get("inputs") if isinstance(batch, dict) else batch
    param = next(model.parameters(), None)
    dtype = getattr(inputs, "dtype", None)
    if dtype is None or param is None or not param.is_floating_point() or dtype == param.dtype:
        return ""
    return f" (inputs are {dtype}, the model's parameters {param.dtype}: convert the inputs, e.g. x.to({param.dtype}))"
