"""Nearest-neighbour references for leakage / near-duplicate detection (no attribution theory).

``NearestNeighbour(embedding="inputs")`` scores each training point by its similarity to the query
in pixel space, ``embedding="penultimate"`` in the model's feature space (the input of its last
layer). They answer "which training image looks most like this query?", the question a
deduplication tool asks; an attribution method that finds leaked copies should beat the pixel
reference and is measured against the feature one. Embeddings come from
:meth:`KNNShapley.embed <forwardinf.baselines.shapley.KNNShapley.embed>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from forwardinf.data.inputs import DataLike
from forwardinf.estimators.base import Capabilities, Estimator, EstimatorConfig, check_choice, check_positive
from forwardinf.tasks.base import Task

EMBEDDINGS = ("inputs", "penultimate")
METRICS = ("euclidean", "cosine")


@dataclass(frozen=True, kw_only=True)
class NearestNeighbourConfig(EstimatorConfig):
    """Every knob of :class:`NearestNeighbour` (see its docstring)."""

    embedding: str = "inputs"
    metric: str | None = None
    batch_size: int = 512


class NearestNeighbour(Estimator):
    """Similarity of each training point to each query: ``[n_query, n_train]``, higher = nearer.

    Args (keyword):
        embedding: ``"inputs"`` (flattened pixels) or ``"penultimate"`` (the model's features).
        metric: ``"euclidean"`` (score = minus the distance) or ``"cosine"`` (cosine similarity);
            None: euclidean for inputs, cosine for features.
        batch_size: examples per embedding batch.

    ``joint=True`` scores the query set as a whole by its mean similarity.
    """

    Config = NearestNeighbourConfig
    fit_fields = ("embedding", "metric")
    capabilities = Capabilities(shardable=True)  # a point's similarity ignores the other points

    def __init__(self, model: nn.Module | None = None, task: Task | None = None, *,
                 config: NearestNeighbourConfig | None = None, **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`NearestNeighbourConfig`), or ``config=``."""
        super().__init__(model, task, config, **knobs)  # type: ignore[arg-type]

    def fit(self, train: DataLike) -> "NearestNeighbour":
        """Embed the training set: ``features_ [n, d]`` (float64)."""
        from forwardinf.baselines.shapley import KNNShapley

        self._check_params()
        self.metric_ = self.metric or ("euclidean" if self.embedding == "inputs" else "cosine")
        self._embedder = KNNShapley(self.model, self.task, embedding=self.embedding, batch_size=self.batch_size)
        self.train_ = self._dataset(train, "train")
        self.features_ = self._embedder.embed(self.train_, "train")[0]
        self.fitted_config_ = self.config
        return self

    def _check_params(self) -> None:
        name = type(self).__name__
        check_choice(name, "embedding", self.embedding, EMBEDDINGS)
        if self.metric is not None:
            check_choice(name, "metric", self.metric, METRICS)
        check_positive(name, "batch_size", self.batch_size, integer=True)

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        self._check_fitted()
        q = self._embedder.embed(self._dataset(queries, "queries"), "queries")[0]
        if self.metric_ == "cosine":
            unit = lambda f: f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
            scores = unit(q) @ unit(self.features_).T
        else:
            scores = -torch.cdist(q, self.features_)
        scores = scores.float()
        return scores.mean(0) if joint else scores

    def self_influence(self) -> Tensor:
        raise NotImplementedError("NearestNeighbour: every point is its own nearest neighbour; no self-influence")
