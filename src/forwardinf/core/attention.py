"""Attention that forward-mode derivatives and ``vmap`` can go through, for models as users build them.

Two things in a default Hugging Face model stop the estimators' function transforms:

- ``torch.nn.functional.scaled_dot_product_attention`` (transformers' default ``"sdpa"``
  attention) dispatches on CPU to a fused flash kernel that has no forward-mode derivative (the
  cosine score's ``jvp`` in ``fit`` fails) and, on CUDA, to flash / memory-efficient kernels
  without batching rules for every case. The *math* backend is plain matmul + softmax, which
  every transform supports, and it equals eager attention up to float rounding.
- transformers' mask helpers read the 2-D padding mask's values (``padding_mask.all()``) to
  decide whether the mask can be dropped; under ``vmap`` the values are not concrete and Python
  cannot branch on them. Telling transformers that such a tensor is being *traced* makes it take
  the branch it takes under ``torch.compile``: always build the full mask (the same result).

:func:`functional_attention` does both for the duration of a call. The library enters it around
every functional call of the model (:func:`forwardinf.core.params.bind`) and every sweep, so base
values and updated values use the same kernel. Nothing outside those calls changes.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_depth = 0  # nesting of functional_attention (the transformers patch is applied at the outermost level)


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``): tensor values may not be concrete."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@contextlib.contextmanager
def functional_attention() -> Iterator[None]:
    """Math SDPA backend, and transformers' masks built without reading values under a transform."""
    global _depth
    masking = sys.modules.get("transformers.masking_utils")  # never import transformers ourselves
    original = getattr(masking, "is_tracing", None)
    patch = masking is not None and original is not None and _depth == 0
    if patch:
        def is_tracing(tensor: Any = None) -> bool:
            return original(tensor) or (tensor is not None and in_transform())

        masking.is_tracing = is_tracing
    _depth += 1
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _depth -= 1
        if patch:
            masking.is_tracing = original
