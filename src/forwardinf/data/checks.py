"""One check of a batch against a model and task, run before any expensive work on it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from forwardinf.core.params import device_of, mode
from forwardinf.data.inputs import check_finite, to_device

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
