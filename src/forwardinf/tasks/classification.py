"""Classification: cross-entropy on ``(inputs, targets)`` batches."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from forwardinf.tasks.base import Task


def _split(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)``: the model's input (a tensor, or a dict of keyword arguments) and ``[B]`` labels."""
    if isinstance(batch, Mapping):
        label = next((k for k in ("labels", "label") if k in batch), None)
        if label is not None and "inputs" not in batch:  # a Hugging Face batch: everything else is model(**inputs)
            return {k: v for k, v in batch.items() if k != label}, batch[label]
        missing = [k for k in ("inputs", "targets") if k not in batch]
        if missing:
            raise ValueError(f"a dict batch holds 'inputs' and 'targets', or Hugging Face keyword inputs and 'labels' "
                             f"(e.g. input_ids, attention_mask, labels); got keys {sorted(batch)}")
        return batch["inputs"], batch["targets"]
    inputs, targets = batch[0], batch[1]
    return inputs, targets


def _call(model: Callable[..., Any], inputs: Any) -> Tensor:
    """The logits of ``model`` on ``inputs``: ``model(**inputs)`` for a dict of keyword inputs."""
    return _logits(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


def _first(inputs: Any, n: int) -> Any:
    """The first ``n`` examples of a tensor or of every tensor in a dict."""
    if isinstance(inputs, Mapping):
        return {k: v[:n] if torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs[:n] if torch.is_tensor(inputs) else inputs


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

    Batches are ``(inputs, targets)`` tuples (extra elements are ignored), dicts with
    ``"inputs"`` and ``"targets"``, or Hugging Face batches: a dict with ``"labels"`` whose other
    entries are the model's keyword inputs (``"label"``, a ``datasets`` column name, works too), ``{input_ids, attention_mask[, token_type_ids], labels}``
    for a sequence classifier or ``{pixel_values, labels}`` for an image classifier, called as
    ``model(**inputs)``. Targets are class indices ``[B]``. The model may return logits, a tuple
    (logits first) or a dict / ``ModelOutput`` with ``"logits"`` (transformers' ``.logits``).
    Attention masks pass unchanged: the estimators' calls make transformers' mask handling
    vmap-safe (:mod:`forwardinf.core.attention`).
    """

    def loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        inputs, targets = _split(batch)
        return F.cross_entropy(_call(model, inputs), targets, reduction="none")

    def score_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """Negative log-odds of the true class, ``-(z_y - logsumexp_{j != y} z_j)``, ``[B]``.

        Cross-entropy is ``softplus`` of this, so both have parallel gradients, but this
        one does not flatten out (nor round to zero in float32) once ``p_y`` nears 1.
        """
        inputs, targets = _split(batch)
        logits = _call(model, inputs)
        true = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        is_true = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)  # vmap-safe one-hot
        others = logits.masked_fill(is_true, float("-inf"))
        return torch.logsumexp(others, dim=-1) - true

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        inputs, targets = _split(batch)
        if not torch.is_tensor(targets) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"targets must be an integer tensor of class indices, got {getattr(targets, 'dtype', type(targets))}")
        leaves = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
        if any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in leaves):
            raise ValueError("inputs contain NaN or inf")
        if targets.ndim != 1:
            raise ValueError(f"targets must be class indices [B], got shape {tuple(targets.shape)}")
        for t in leaves:
            if torch.is_tensor(t) and t.ndim and t.shape[0] != targets.shape[0]:
                raise ValueError(f"{t.shape[0]} inputs but {targets.shape[0]} targets")
        if not isinstance(batch, Mapping) and torch.is_tensor(inputs):
            _check_no_padding(model, inputs)
        # One example shows whether the model runs and how many classes it has; the rest of
        # the batch shares its shape. (A full forward here would double the cost of a sweep.)
        n = 1 if any(torch.is_tensor(t) and t.ndim for t in leaves) else targets.shape[0]
        with torch.no_grad():
            logits = _call(model, _first(inputs, 1))
        if logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"model output has shape {tuple(logits.shape)}; expected logits [B={n}, C]")
        n_classes = logits.shape[-1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= n_classes):
            bad = targets[(targets < 0) | (targets >= n_classes)][0].item()
            hint = (" (one output: for a binary classifier with a single logit, write a Task whose loss is "
                    "binary_cross_entropy_with_logits)") if n_classes == 1 else ""
            raise ValueError(f"label {bad} is out of range for a model with {n_classes} classes{hint}")


def _check_no_padding(model: Any, inputs: Tensor) -> None:
    """Token ids in a tuple batch carry no attention mask: refuse them if they hold padding."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and not inputs.is_floating_point() and inputs.ndim == 2 and (inputs == pad).any():
        raise ValueError(f"the token ids hold the padding id {pad}, but an (input_ids, labels) tuple carries no "
                         "attention_mask, so padding would be attended to: pass dict batches "
                         "{'input_ids', 'attention_mask', 'labels'}")
