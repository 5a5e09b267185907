"""``split="auto"``: where :class:`~forwardinf.estimators.tail.TailForwardINF` cuts a model it
was not written for.

The rule: **the tail is the layers after the model's last feature-extracting call.** The forward
is traced with ``torch.fx``; a *feature-extracting* call is a convolution, a pooling, an
attention, a recurrent or an embedding layer, as a module (``nn.Conv2d``, ``nn.MaxPool2d``,
``nn.AdaptiveAvgPool2d``, ``nn.MultiheadAttention``, ``nn.LSTM``, ``nn.Embedding``, ...) or as a
function (``F.conv2d``, ``F.max_pool2d``, ...): the layers that build features from spatial or
sequence positions. The tail starts at the first module holding parameters that the forward
calls after the last of them: a CNN's dense head (``fc1`` of a flat ``conv1, conv2, fc1, fc2``
model, ``classifier.0`` of the library's SmallCNN, ResNet's ``fc``). A model with no such call
(an MLP) has no frozen feature extractor: its tail is the whole model, from its first layer.

Why there: the counterfactual score's K-FAC curvature is exact in form for dense layers and an
approximation for convolutions (their patches are correlated across positions, and one global
damping spans layers whose curvature differs by orders of magnitude); on the Fashion-MNIST CNN
the dense head predicts retraining better than the whole network: by +0.063 LDS over whole-network
K-FAC and +0.029 [+0.002, +0.056] over whole-network EK-FAC (two seeds, 500 points; per-layer-type
damping changed the whole network by < 0.003), at a fraction of the cost
(benchmarks/results/lds.md, "Issue 26, continued"). Against the last layer alone the dense head
depends on the training-set size: behind it by 0.025 on 500 points (two seeds pooled), ahead by
0.025 on 1,000 and by 0.084 [0.064, 0.105] on 2,000 (two seeds pooled; +0.046 over the tail from
``conv2``); benchmarks/results/lds.md, "Issue 26 on its own setup". No simpler rule was best on
every size measured. A cached prefix also makes each query cost the head's forward only.

With ``kfac=True`` (the counterfactual preset) the tail must hold only layers K-FAC covers
(``Linear``, ``Conv2d``): the start moves later past any other layer with parameters (a
``LayerNorm`` in the head). A start that :func:`~forwardinf.estimators.tail.split_model` refuses (tied weights across the cut,
a tail reading a non-tensor) is skipped for the next one. A model ``torch.fx`` cannot trace
falls back to its last top-level submodule with parameters (the registry's former default).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

# Layers that build features over positions: the tail begins after the last of them.
EXTRACTOR_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
    nn.MultiheadAttention, nn.RNNBase, nn.Embedding, nn.EmbeddingBag,
)
EXTRACTOR_FUNCTIONS: tuple[Callable, ...] = (
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.scaled_dot_product_attention, F.embedding,
)


def _kfac_covered(module: nn.Module) -> bool:
    """What :func:`forwardinf.core.curvature.layer_of` accepts."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                              and not isinstance(module.padding, str))


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def candidates(model: nn.Module, kfac: bool = False) -> list[str]:
    """Module names where the tail may start, best first (the rule of this module's docstring).

    Raises ``ValueError`` if ``model`` cannot be traced by ``torch.fx``.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any tracing failure is the user's model
        raise ValueError(f"split='auto' traces the forward with torch.fx, which failed: {e}") from e
    modules = dict(model.named_modules())
    calls: list[tuple[str, nn.Module]] = []  # parametrized module calls after the last extractor
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        extractor = ((module is not None and isinstance(module, EXTRACTOR_MODULES))
                     or (node.op == "call_function" and node.target in EXTRACTOR_FUNCTIONS))
        if extractor:
            calls = []
        elif module is not None and _has_own_parameters(module):
            calls.append((str(node.target), module))
    if kfac:  # the tail may hold only K-FAC layers: start after the last other one
        last_other = max((i for i, (_, m) in enumerate(calls) if not _kfac_covered(m)), default=-1)
        calls = calls[last_other + 1:]
    names = list(dict.fromkeys(name for name, _ in calls))
    return names


def last_parametrized_child(model: nn.Module) -> str:
    """The last top-level submodule holding parameters (an MLP's last layer, ResNet's ``fc``)."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    if not names:
        raise ValueError("tail mode: the model has no submodule with parameters; pass split=NAME")
    return names[-1]


def auto_split(model: nn.Module, example: Tensor, cut: Callable, kfac: bool = False) -> tuple[str, Any]:
    """``(name, cut(model, name, example))`` for the first of :func:`candidates` that ``cut``
    accepts (``cut``: :func:`~forwardinf.estimators.tail.split_model`, passed in by the tail
    estimator so that this module does not import it; ``example``: a batch of inputs).

    Falls back to :func:`last_parametrized_child` when the forward cannot be traced or no
    candidate remains; raises ``ValueError`` (naming the candidates tried) if that fails too.
    """
    try:
        names = candidates(model, kfac)
    except ValueError:
        names = []
    errors = []
    for name in [*names, *([] if names else [last_parametrized_child(model)])]:
        try:
            return name, cut(model, name, example)
        except ValueError as e:
            errors.append(f"{name}: {e}")
    raise ValueError("split='auto' found no place to cut the model; pass split=NAME. Tried: " + "; ".join(errors))
