"""Guards against silently wrong answers: a fingerprint of the model's weights taken at ``fit``,
and the error of a diverging update.

The fingerprint lets ``influence`` / ``top_k`` / ``self_influence`` refuse a model whose
parameters or buffers changed since ``fit`` (the cached base losses, gradients or features would
belong to other weights). It is computed from the tensors' contents, so it catches every edit:
through the parameter (``p.add_``, an optimizer step, ``load_state_dict``), through ``p.data``
(which bypasses PyTorch's version counter), or a tensor replaced by another.

Cost: one read of every parameter and buffer per check, 1.3 ns per value on one CPU thread for
large tensors (36 ms for 28 M float32 values), up to ~5 ns with many small ones: 0.6 ms for the
small CNN (0.45 M values), 3.6 ms for the CIFAR ResNet-18 (0.7 M), against 35 and 75 ms for one
no-grad forward batch of 64 (benchmarks/results/fingerprint_cost.md). Temporaries of at most
4 MiB; nothing is kept but one 64-bit number per tensor.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer view
_CHUNK = 2**18  # elements per block of the checksum: int64 temporaries of 2 MiB
_WEIGHTS = torch.arange(_CHUNK, dtype=torch.int64) * 2 + 1  # odd: invertible modulo 2^64


class DivergedError(FloatingPointError, ValueError):
    """The query update diverged (non-finite parameters or losses): lower ``lr`` or ``steps``.

    Both a ``FloatingPointError`` (what the update raised before) and a ``ValueError`` (a bad
    setting): a diverging ``lr`` is refused, never turned into NaN scores."""


def checksum(t: Tensor) -> int:
    """A 64-bit checksum of ``t``'s bits: ``Σ_b (b+1) Σ_j (2j+1) w_bj mod 2^64`` over its integer
    words ``w`` in blocks ``b`` of 262,144. Position-weighted, so a permutation of the values
    changes it as a value change does; exact integer arithmetic (wrapping modulo 2^64), so the
    result does not depend on the number of threads or summation order."""
    words = t.detach().reshape(-1)
    words = words.view(_WORDS[words.element_size()]) if words.dtype != torch.bool else words.to(torch.int8)
    weights = _WEIGHTS.to(words.device)
    total = 0
    for b, block in enumerate(words.split(_CHUNK)):
        total += (b + 1) * int((block.to(torch.int64) * weights[:block.numel()]).sum())
    return total % 2**64


def weights_fingerprint(module: nn.Module) -> dict[str, tuple[Any, ...]]:
    """``{name: (shape, dtype, device, checksum)}`` for every parameter and buffer of ``module``."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: (tuple(t.shape), t.dtype, t.device, checksum(t)) for name, t in tensors}


def changed_weights(before: dict[str, tuple[Any, ...]], module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that differ from the fingerprint ``before``
    (added, removed or edited)."""
    now = weights_fingerprint(module)
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def check_scores(owner: str, scores: Any) -> None:
    """Scores ``[n_query, n]`` (or ``[n]``) must be finite: a NaN would rank silently (first or
    last, depending on the sort). Raise ``ValueError`` naming the query and training point."""
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        return
    bad = ~torch.isfinite(scores)
    if bad.any():
        where = [int(i) for i in bad.nonzero()[0]]
        at = f"query {where[0]}, training point {where[1]}" if len(where) == 2 else f"training point {where[0]}"
        raise ValueError(f"{owner}: non-finite score ({at}): check those queries and train examples (inputs too "
                         "large for the model's precision?) and the settings")


def finite_scores(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (``influence`` / ``self_influence``) with its result checked by :func:`check_scores`."""
    @functools.wraps(method)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        scores = method(self, *args, **kwargs)
        if self.finite_scores:
            check_scores(type(self).__name__, scores)
        return scores

    checked.__wrapped_scores__ = True  # type: ignore[attr-defined]
    return checked
