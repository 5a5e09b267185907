"""Forward-mode derivatives through linear layers whose weights are not differentiated.

PyTorch's forward-mode formula for a matmul is ``dx·Wᵀ + x·dWᵀ``. When ``W`` carries no
tangent (a frozen layer: a language model's output head tied to a frozen embedding in tail
mode, a LoRA model's base weights) the missing ``dW`` becomes a zero tensor that is
materialized (a copy of ``W``'s size), multiplied by ``x`` and added: on SmolLM2-135M's tail
that was a 113 MB copy, a primal-sized matmul and a ``[B, T, 49152]`` addition per batch, about
a quarter of the tail's cosine fit. :func:`frozen_linear` routes such calls of
``torch.nn.functional.linear`` (what ``nn.Linear`` calls) to a function whose tangent is
``dx·Wᵀ`` alone: the same numbers, without the zero term.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # carries a transform's tangent or batch dim


class _LinearWithFrozenWeight(torch.autograd.Function):
    """``F.linear(x, w, b)`` whose forward-mode tangent is ``F.linear(dx, w)`` (``w``, ``b`` constant)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.w = inputs[1]

    @staticmethod
    def jvp(ctx: Any, dx: Tensor, _dw: Any, _db: Any) -> Tensor:  # type: ignore[override]
        return F.linear(dx, ctx.w)

    @staticmethod
    def backward(ctx: Any, _grad: Tensor) -> Any:  # type: ignore[override]
        raise RuntimeError("frozen_linear is for forward-mode derivatives only")


class _Route(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _wrapped(x) and not _wrapped(w) and (b is None or not _wrapped(b)):
                return _LinearWithFrozenWeight.apply(x, w, b)
        return func(*args, **kwargs)


@contextlib.contextmanager
def frozen_linear() -> Iterator[None]:
    """Within: linear layers with a constant weight take the lean tangent (forward mode, no gradient)."""
    with _Route():
        yield
