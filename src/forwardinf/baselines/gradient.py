"""The shared plumbing of the gradient-based baselines (influence functions, TracIn, HyDRA,
representer points): parameter selection, functional losses, cached training gradients.

:class:`GradientConfig` holds the knobs they all have; the input checks are the estimator base's
(:meth:`forwardinf.estimators.base.Estimator._load`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from forwardinf.core import gradients as G
from forwardinf.core.params import Params, mode, select_params
from forwardinf.data.checks import check_batch, check_finite_values
from forwardinf.data.inputs import DataLike
from forwardinf.estimators.base import Estimator, EstimatorConfig, check_positive

__all__ = ["GradientConfig", "GradientEstimator", "blocked_dot"]


@dataclass(frozen=True, kw_only=True)
class GradientConfig(EstimatorConfig):
    """The knobs every gradient-based baseline has (see :class:`~forwardinf.baselines.influence_function.InfluenceFunction`)."""

    params: str | Iterable[str] | None = None
    batch_size: int = 64
    cache_mb: float = 512.0
    progress: bool = False


class GradientEstimator(Estimator):
    """Shared plumbing: parameter subset, functional loss, input checks, training gradients.

    Gradients are always taken with the model in eval mode (dropout off, BatchNorm running
    statistics), on a functional view: the user's model is never written to. Subclasses have
    ``params``, ``batch_size``, ``cache_mb`` and ``progress`` knobs (:class:`GradientConfig`).
    """

    # -- parameter subset -----------------------------------------------------------------
    def _patterns(self) -> str | list[str] | None:
        """``params`` with the ``"last"`` alias resolved to the last layer's name."""
        if self.params == "last":
            return [G.last_layer(self.model)]
        return self.params  # type: ignore[return-value]

    def _select(self, state: dict[str, Tensor] | None = None) -> Params:
        """The selected parameters (from ``state`` when given, e.g. a checkpoint)."""
        chosen = select_params(self.model, self._patterns())
        if state is None:
            return chosen
        missing = [k for k in chosen if k not in state]
        if missing:
            raise ValueError(f"checkpoint lacks parameters {missing[:5]}")
        for k, v in chosen.items():
            if state[k].shape != v.shape:
                raise ValueError(f"checkpoint parameter {k} has shape {tuple(state[k].shape)}, model has {tuple(v.shape)}")
        return {k: state[k].detach() for k in chosen}

    def _loss_fn(self, state: dict[str, Tensor] | None = None) -> G.LossFn:
        return G.functional_loss(self.model, self.task.loss, state)

    # -- inputs -----------------------------------------------------------------------------
    def _load_queries(self, queries: DataLike) -> Any:
        """The queries as a dataset, checked by the base's input check against the training data
        (shapes, labels, inputs the model runs on)."""
        return self._load(queries, "queries", self.model)

    def _validate(self, batch: Any, name: str) -> None:
        check_batch(self.model, self.task, batch, name)

    def _check_common(self) -> None:
        name = type(self).__name__
        check_positive(name, "batch_size", self.batch_size, integer=True)
        check_positive(name, "cache_mb", self.cache_mb)
        select_params(self.model, self._patterns())  # raises if the patterns match nothing

    # -- gradients --------------------------------------------------------------------------
    def _grads(self, dataset: Any, loss_fn: G.LossFn, params: Params, desc: str) -> Tensor:
        """``[n, D]`` per-example gradients of ``dataset`` (eval mode); ``desc`` names them ("query
        gradients", "train gradients"). A non-finite one (an input too large for the model's
        precision) is refused: its NaN would end up in the scores."""
        with mode(self.model, False):
            out = G.grad_matrix(loss_fn, params, dataset, self.batch_size, self._device(), self.progress, desc)
        check_finite_values(out, "queries" if desc.startswith("query") else "train", "gradient")
        return out

    def _train_grad_blocks(self, key: Any, loss_fn: G.LossFn, params: Params) -> Iterable[tuple[int, Tensor]]:
        """``(start, G [b, D])`` over the training set; kept in memory while all cached gradients fit in ``cache_mb``."""
        cache = self._grad_cache_
        if key in cache:
            yield 0, cache[key]
            return
        n, d = len(self.train_), G.dim(params)
        size = n * d * next(iter(params.values())).element_size()
        used = sum(t.numel() * t.element_size() for t in cache.values())
        if used + size <= self.cache_mb * 2**20:  # the budget covers every cached matrix together
            cache[key] = self._grads(self.train_, loss_fn, params, "train gradients")
            yield 0, cache[key]
            return
        with mode(self.model, False):
            yield from G.iter_grads(loss_fn, params, self.train_, self.batch_size, self._device(),
                                    self.progress, "train gradients")

    def _dot_train(self, vectors: Tensor, key: Any, loss_fn: G.LossFn, params: Params) -> Tensor:
        """``[K, n_train]``: ``vectors [K, D]`` dotted with every training gradient."""
        out = torch.empty(vectors.shape[0], len(self.train_), dtype=vectors.dtype)
        for start, g in self._train_grad_blocks(key, loss_fn, params):  # start: a multiple of batch_size
            out[:, start:start + g.shape[0]] = blocked_dot(vectors, g, self.batch_size).cpu()
        return out

    def _row_block(self) -> int:
        return self.batch_size


def blocked_dot(vectors: Tensor, g: Tensor, rows: int) -> Tensor:
    """``[K, n]``: ``vectors [K, D] @ g[n, D].T``, one product per ``rows`` rows of ``g``. A block's
    result depends only on the block (a matrix product's last bits depend on its shape), so any
    slice of the training set that starts and ends on block boundaries scores bit-identically."""
    return torch.cat([vectors @ g[s:s + rows].T for s in range(0, g.shape[0], rows)], 1)
