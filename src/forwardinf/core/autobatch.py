"""Automatic batch size: as many examples per forward batch as fit a memory budget.

Scoring ``m`` updated models at once (stacked parameters + vmap) multiplies the activation
memory of a batch by ``m``; so does taking ``m`` forward-mode derivatives at once. The batch is
sized so that ``m * batch * bytes_per_example`` stays within the budget: peak memory stays that
of an ordinary inference batch however many queries share a sweep.

Callers check the probe batch first (:func:`forwardinf.data.checks.check_batch`, a layer above);
if the probe still fails (a wrong feature count, labels out of range, inputs of another dtype),
its error is a ``ValueError`` naming the argument the batch came from, not the traceback of the
probe's forward pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from forwardinf.core.params import device_of
from forwardinf.data.inputs import batch_len, to_device

if TYPE_CHECKING:  # core imports nothing above it at run time
    from forwardinf.tasks.base import Task

DEFAULT_BUDGET = 256 * 2**20  # bytes of activations per forward batch


def activation_bytes(model: nn.Module, task: "Task", batch: Any, name: str = "batch") -> float:
    """Bytes of intermediate outputs per example when ``task`` scores ``batch`` with ``model``.

    The sum of every submodule's output (forward hooks) plus the inputs: an upper bound on what
    a no-grad forward keeps alive at once. Modules that hide their submodules (TorchScript)
    only count their own output. A batch the task cannot score raises ``ValueError`` naming ``name``.
    """
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else [output]:
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    leaves = [batch] if torch.is_tensor(batch) else (list(batch.values()) if isinstance(batch, dict) else list(batch))
    total += sum(t.numel() * t.element_size() for t in leaves if torch.is_tensor(t))
    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            task.loss(model, to_device(batch, device_of(model)))
    except (RuntimeError, IndexError, KeyError, TypeError) as e:  # e.g. a shape, dtype or label the model rejects
        raise ValueError(f"{name}: the model and task cannot score these examples (batch-size probe): {e}") from e
    finally:
        for h in handles:
            h.remove()
    return total / max(batch_len(batch), 1)


def auto_batch_size(model: nn.Module, task: "Task", batch: Any, *, n_models: int = 1,
                    budget_bytes: int = DEFAULT_BUDGET, max_batch: int = 1024, name: str = "batch") -> int:
    """Largest batch (1..``max_batch``) with ``n_models * batch * activation_bytes <= budget``.

    ``batch``: a few examples to probe with; ``name``: the argument they come from (e.g. ``"train"``),
    named by the ``ValueError`` if the probe cannot run on them.
    """
    if n_models < 1 or budget_bytes <= 0:
        raise ValueError(f"auto_batch_size: need n_models >= 1 and budget_bytes > 0, got {n_models}, {budget_bytes}")
    per_example = activation_bytes(model, task, batch, name)
    return int(max(1, min(max_batch, budget_bytes // max(n_models * per_example, 1))))
