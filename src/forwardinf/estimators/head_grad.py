"""The loss gradient of a classifier's head, factorised: similarities without per-example gradients.

The head is the last two ``nn.Linear`` layers of the model (the last one alone if it has one).
For a linear layer ``out = W x + b`` on ``[B, D]`` inputs, one point's gradient of its loss is the
outer product ``δ x^T`` (weight) and ``δ`` (bias), with ``δ = d loss / d out [C]``. So for two
points ``i``, ``j``::

    <g_i, g_j> = Σ_layers (δ_i · δ_j) (x_i · x_j + 1)        (+ 1: the bias; 0 without one)
    ||g_i||²   = Σ_layers |δ_i|² (|x_i|² + 1)

Each point's **factors** are ``[x, δ]`` of every head layer concatenated, ``Σ (D + C)`` numbers
(SmallCNN on Fashion-MNIST: 3,136 + 128 + 128 + 10 = 3,402) instead of the ``Σ C (D + 1)`` of the
gradient itself (402,826). The loss is the task's ``score_loss`` (the margin of a
``ClassificationTask``): its gradient wrt the logits is the cross-entropy's divided by
``1 - p_y`` (a positive factor per point), and ``δ`` of the earlier layer is linear in it, so
the head gradients' cosines are the cross-entropy's.

Inputs with a sequence dimension (``[B, T, D]``: the gradient sums ``δ_t x_t^T`` over positions and
no longer factorises into one outer product) are refused, as is a layer called more than once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from forwardinf.core.params import mode
from forwardinf.core.sweep import sweep
from forwardinf.data.checks import check_batch


@dataclass(frozen=True)
class Head:
    """The head layers (module names, earliest first), their input / output sizes and biases."""

    layers: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]  # (D, C) of each layer
    bias: tuple[bool, ...]

    @classmethod
    def of(cls, model: nn.Module, last: str | None = None) -> "Head":
        """The ``nn.Linear`` named ``last`` (default: the model's last one) and the one before it."""
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError("Retriever: source='head-grad' needs an nn.Linear (the model has none)")
        if last is None:
            last = names[-1]
        if last not in names:
            raise ValueError(f"Retriever: source='head-grad' needs layer= naming an nn.Linear; {last!r} is not one "
                             f"(the model's: {names})")
        layers = tuple(names[max(names.index(last) - 1, 0):names.index(last) + 1])
        mods = dict(model.named_modules())
        return cls(layers, tuple((mods[n].in_features, mods[n].out_features) for n in layers),
                   tuple(mods[n].bias is not None for n in layers))

    @property
    def width(self) -> int:
        """``F``: factors per point."""
        return sum(d + c for d, c in self.sizes)

    def split(self, f: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(x [n, D], δ [n, C]) per layer]`` of factors ``f [n, F]``."""
        out, at = [], 0
        for d, c in self.sizes:
            out.append((f[:, at:at + d], f[:, at + d:at + d + c]))
            at += d + c
        return out

    @property
    def feature_columns(self) -> slice:
        """Where the last layer's input (the penultimate features) sits in the factors."""
        at = sum(d + c for d, c in self.sizes[:-1])
        return slice(at, at + self.sizes[-1][0])

    def features(self, f: Tensor) -> Tensor:
        """``[n, D]``: the last layer's input of factors ``f [n, F]``."""
        return f[:, self.feature_columns]

    def gram(self, fq: Tensor, ft: Tensor) -> Tensor:
        """``[Q, P]``: ``<g_q, g_t>`` of the head gradients, from factors ``fq [Q, F]`` and ``ft [P, F]``."""
        total = fq.new_zeros(len(fq), len(ft))
        for (xq, dq), (xt, dt), b in zip(self.split(fq), self.split(ft), self.bias):
            total += (dq @ dt.T) * (xq @ xt.T + float(b))
        return total

    def sq_norms(self, f: Tensor) -> Tensor:
        """``[n]``: ``||g||²`` of each point's head gradient."""
        return sum(d.square().sum(1) * (x.square().sum(1) + float(b)) for (x, d), b in zip(self.split(f), self.bias))

    def cosine(self, fq: Tensor, ft: Tensor) -> Tensor:
        """``[Q, P]``: cosine of the head gradients (0 for a zero gradient)."""
        norms = self.sq_norms(fq).sqrt()[:, None] * self.sq_norms(ft).sqrt()[None]
        return self.gram(fq, ft) / norms.clamp_min(1e-30)


def head_factors(estimator: Any, head: Head, data: Any, batch_size: int, name: str = "train") -> Tensor:
    """``[n, F]``: each point's factors ``[x, δ]`` of every head layer, ``δ`` the gradient of its own
    ``score_loss`` at the layer's output (autograd, so whatever follows the layer counts). One
    forward and a backward to the first head layer's output per batch; the model is left as it was
    (no ``.grad`` is written, hooks are removed)."""
    model, task = estimator.model, estimator.task
    modules = dict(model.named_modules())
    seen: list[list[tuple[Tensor, Tensor]]] = [[] for _ in head.layers]

    def hook_of(i: int):
        def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
            # frozen parameters: a leaf of its own, so the error still reaches this output
            at = out if out.requires_grad else out.detach().requires_grad_(True)
            seen[i].append((args[0].detach(), at))
            return at * 1.0  # a new tensor: an in-place op after the layer cannot change `at`
        return hook

    def run(batch: Any) -> Tensor:
        check_batch(model, task, batch, name)
        for s in seen:
            s.clear()
        with torch.enable_grad():
            margin = task.score_loss(model, batch)
            for layer, s in zip(head.layers, seen):
                if len(s) != 1 or s[0][0].ndim != 2:
                    raise ValueError(f"Retriever: source='head-grad' needs {layer!r} called once per batch on [B, D] "
                                     f"inputs (got {len(s)} calls" + (f", input {tuple(s[0][0].shape)}" if s else "")
                                     + "); sequence inputs are not supported: use source='features'")
            deltas = torch.autograd.grad(margin.sum(), [s[0][1] for s in seen], allow_unused=True)
        parts = []
        for (x, out), d in zip((s[0] for s in seen), deltas):
            parts += [x, torch.zeros_like(out) if d is None else d]  # None: the loss does not depend on it
        return torch.cat(parts, 1).detach().T  # [F, B]: the sweep concatenates along the last dimension

    handles = [modules[n].register_forward_hook(hook_of(i)) for i, n in enumerate(head.layers)]
    try:
        with mode(model, False):
            return sweep(run, data, batch_size, estimator._device()).T.contiguous()
    finally:
        for h in handles:
            h.remove()
