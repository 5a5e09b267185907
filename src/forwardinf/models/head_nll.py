"""Token NLL under a *frozen* output layer, with a forward-mode derivative that costs a dot product.

A language model's output layer is its largest matmul: SmolLM2's tied head maps 576 features to
49,152 words at every answer position. Differentiating the NLL through it along a tangent ``dh``
of the features (the tangent sweeps of Forward-INF's exact first-order scores carry one tangent
per query) repeats that matmul and a softmax over the vocabulary per tangent. When the head's
weight ``W`` is frozen the derivative has a closed form,

    d NLL = (softmax(W h) - onehot(y))ᵀ W dh = r · dh,   r = softmax(W h)ᵀ W - W_y   [H],

so ``r`` is computed once with the primal (one more matmul) and every tangent costs ``H``
multiply-adds. The backward pass uses the same ``r`` (``grad_h = g r``), which is what autograd
computes anyway. Values are those of ``log_softmax(F.linear(h, W))`` exactly (the same ops).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from forwardinf.tasks.language_model import IGNORE  # positions that are not answer tokens


class _FrozenHeadNLL(torch.autograd.Function):
    """``(nll [..., A], r [..., A, H]) = f(h [..., A, H], weight [V, H], ids [..., A])``; ``r`` = d nll / d h."""

    generate_vmap_rule = True  # forward, backward and jvp are plain tensor code: functorch batches them

    @staticmethod
    def forward(h: Tensor, weight: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(F.linear(h, weight).float(), dim=-1)  # [..., A, V]
        is_t = ids != IGNORE
        safe = torch.where(is_t, ids, 0)
        nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * is_t
        r = (logp.exp() @ weight.float() - weight.float()[safe]) * is_t.unsqueeze(-1)  # softmax·W - W_y
        return nll, r.to(h.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor, grad_r: Tensor) -> tuple[Tensor, None, None]:
        (r,) = ctx.saved_tensors
        return grad_nll.unsqueeze(-1).to(r.dtype) * r, None, None

    @staticmethod
    def jvp(ctx: Any, dh: Tensor, dweight: Tensor | None, dids: Tensor | None) -> tuple[Tensor, None]:
        (r,) = ctx.saved_tensors
        return (dh * r).sum(-1).float(), None  # r is not differentiable


def frozen_head_nll(h: Tensor, weight: Tensor, ids: Tensor) -> Tensor:
    """``[..., A]`` NLL of ``ids [..., A]`` (``IGNORE``: 0) under logits ``F.linear(h, weight)``, float32.

    ``h [..., A, H]``; ``weight [V, H]`` must not require grad (it is treated as a constant: no
    gradient or tangent flows to it). Derivatives with respect to ``h`` in both modes: backward
    (``grad``, ``vmap(grad)``) and forward (``jvp``, ``vmap`` over tangents).
    """
    if weight.requires_grad:
        raise ValueError("frozen_head_nll: the output layer's weight requires grad; it must be frozen "
                         "(use log_softmax(F.linear(h, weight)) to differentiate through it)")
    return _FrozenHeadNLL.apply(h, weight, ids)[0]
