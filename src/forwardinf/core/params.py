"""Parameters as dicts of tensors, and functional views of a module over them."""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from forwardinf.core.attention import functional_attention

Params = dict[str, Tensor]


def bind(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None) -> Callable[..., Any]:
    """A callable with ``module``'s signature that runs it on ``params`` (and ``buffers``).

    Parameters missing from ``params`` keep the module's own values; the module is not touched.
    """
    tensors = dict(params) if buffers is None else {**buffers, **params}

    def call(*args: Any, **kwargs: Any) -> Any:
        with functional_attention():  # kernels that jvp / vmap support (transformers' default sdpa)
            return functional_call(module, tensors, args, kwargs, strict=False)

    return call


def select_params(module: nn.Module, include: str | Iterable[str] | None = None) -> Params:
    """Detached copies-free views of the parameters an update may touch.

    ``include``: None for every parameter that requires grad, or glob patterns on parameter
    names (``"fc.*"``) or module names (``"layer4"`` selects ``layer4.*``); a tied parameter
    matches by any of its names and is returned under its first. ``ValueError`` if nothing is
    selected (no pattern matches, or the model has no trainable parameter at all).
    """
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("model: it has no trainable parameters (every parameter has requires_grad=False), so there "
                         "is nothing to update or differentiate; unfreeze the ones to attribute through")
    if include is None:
        chosen = named
    else:
        patterns = [include] if isinstance(include, str) else list(include)
        # a tied tensor (e.g. transformers' lm_head and input embedding) is one parameter, under its
        # first name; a pattern may name any of its aliases
        aliases: dict[int, list[str]] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        chosen = {
            n: p for n, p in named.items()
            if any(fnmatch.fnmatchcase(a, pat) or fnmatch.fnmatchcase(a, pat + ".*")
                   for pat in patterns for a in aliases.get(id(p), [n]))
        }
        if not chosen:
            raise ValueError(f"params={patterns!r} matches no trainable parameter; names look like {list(named)[:5]}")
    return {n: p.detach() for n, p in chosen.items()}


def buffers_of(module: nn.Module) -> Params:
    return {n: b.detach() for n, b in module.named_buffers()}


def stack(params: Mapping[str, Tensor], n: int) -> Params:
    """``n`` copies of each tensor along a new leading dim (an expand: no memory is copied)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


def flat_norm(tensors: Mapping[str, Tensor], stacked: bool = False) -> Tensor:
    """L2 norm over all tensors: a scalar, or ``[Q]`` per leading index when ``stacked``."""
    # vector_norm reduces without a squared copy of each tensor (a [Q, ...] temporary when stacked)
    if stacked:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1)
                                                     for t in tensors.values()]), dim=0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors.values()]))


def fingerprint(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Exact copies of every parameter and buffer, for checking a module is untouched."""
    return [(n, t.detach().clone()) for n, t in module.state_dict(keep_vars=True).items()]


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def mode(module: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Temporarily set train/eval on every submodule, restoring each one's own flag after."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.train(train)
        yield module
    finally:
        for m, flag in saved:
            m.training = flag
