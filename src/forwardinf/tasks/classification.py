"""Classification: cross-entropy on ``(inputs, targets)`` batches."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from forwardinf.tasks.base import Task


def _split(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        return batch["inputs"], batch["targets"]
    inputs, targets = batch[0], batch[1]
    return inputs, targets


def _logits(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output["logits"]`` (a dict or a
    Hugging Face ``ModelOutput``), or the first element of a tuple."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise ValueError(f"model output is a {type(output).__name__}; expected logits [B, C], a tuple whose first "
                     "element they are, or a dict / ModelOutput with 'logits'")


class ClassificationTask(Task):
    """Per-example cross-entropy of a classifier ``model(inputs) -> logits [B, C]``.

    Batches are ``(inputs, targets)`` tuples (extra elements are ignored) or dicts with
    ``"inputs"`` and ``"targets"``; targets are class indices ``[B]``. The model may also
    return a tuple (logits first) or a dict / ``ModelOutput`` with ``"logits"``.
    """

    def loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        inputs, targets = _split(batch)
        return F.cross_entropy(_logits(model(inputs)), targets, reduction="none")

    def score_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """Negative log-odds of the true class, ``-(z_y - logsumexp_{j != y} z_j)``, ``[B]``.

        Cross-entropy is ``softplus`` of this, so both have parallel gradients, but this
        one does not flatten out (nor round to zero in float32) once ``p_y`` nears 1.
        """
        inputs, targets = _split(batch)
        logits = _logits(model(inputs))
        true = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        is_true = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)  # vmap-safe one-hot
        others = logits.masked_fill(is_true, float("-inf"))
        return torch.logsumexp(others, dim=-1) - true

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        inputs, targets = _split(batch)
        if not torch.is_tensor(targets) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"targets must be an integer tensor of class indices, got {getattr(targets, 'dtype', type(targets))}")
        if torch.is_tensor(inputs) and inputs.is_floating_point() and not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or inf")
        if targets.ndim != 1:
            raise ValueError(f"targets must be class indices [B], got shape {tuple(targets.shape)}")
        if torch.is_tensor(inputs):
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
            # One example shows whether the model runs and how many classes it has; the rest of
            # the batch shares its shape. (A full forward here would double the cost of a sweep.)
            inputs = inputs[:1]
        with torch.no_grad():
            logits = _logits(model(inputs))
        n = inputs.shape[0] if torch.is_tensor(inputs) else targets.shape[0]
        if logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"model output has shape {tuple(logits.shape)}; expected logits [B={n}, C]")
        n_classes = logits.shape[-1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= n_classes):
            bad = targets[(targets < 0) | (targets >= n_classes)][0].item()
            hint = (" (one output: for a binary classifier with a single logit, write a Task whose loss is "
                    "binary_cross_entropy_with_logits)") if n_classes == 1 else ""
            raise ValueError(f"label {bad} is out of range for a model with {n_classes} classes{hint}")
