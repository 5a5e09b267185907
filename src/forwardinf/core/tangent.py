"""Forward-mode directional derivatives of a per-example measure over a dataset.

``∇_θ m(θ, z_i) · t`` for every example ``z_i`` and several tangents ``t`` at once: one forward
pass per batch carries the primal (shared by all tangents: ``vmap`` batches only the tangent
computation) and ``Q`` tangent streams. No backward pass, no per-example gradient; and no
difference of two float32 values, so nothing cancels: the derivative keeps float32's relative
precision however small the step it stands for.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from forwardinf.core.frozen_linear import frozen_linear
from forwardinf.core.params import Params, bind
from forwardinf.core.sweep import sweep

Measure = Callable[[Any, Any], Tensor]  # (model, batch) -> [B]


def directional_sweep(measure: Measure, model: nn.Module, params: Params, buffers: Params, tangents: Params,
                      dataset: Any, batch_size: int, device: torch.device, progress: bool = False,
                      desc: str = "tangents", trim: bool = False) -> Tensor:
    """``[Q, n]``: ``∇_θ measure(θ, z_i) · t_q`` at ``θ = params``.

    ``tangents``: ``{name: [Q, *shape]}`` over the same names as ``params`` (the parameters
    differentiated; the model's other parameters and ``buffers`` stay fixed). Runs under
    ``torch.no_grad`` (forward mode needs no graph); the model is never written to.
    """
    def per_batch(batch: Any) -> Tensor:
        f = lambda p: measure(bind(model, p, buffers), batch)  # noqa: E731
        with frozen_linear():  # layers outside params: no zero tangent materialized for their weights
            return vmap(lambda t: jvp(f, (params,), (t,))[1])(tangents)  # [Q, B]

    return sweep(per_batch, dataset, batch_size, device, progress, desc=desc, trim=trim)

