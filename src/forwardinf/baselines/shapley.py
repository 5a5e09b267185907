"""Shapley-value data attribution (survey section 4.3): TMC data Shapley and exact KNN-Shapley.

A *game* gives every subset ``S`` of the training set a utility ``U(S)``; a *semivalue* of training
point ``i`` averages its marginal contributions ``U(S ∪ {i}) - U(S)`` over subsets ``S ∌ i``:

    φ_i = Σ_{j=0}^{n-1} q(j) · mean_{S ∌ i, |S| = j} [U(S ∪ {i}) - U(S)]

with a distribution ``q`` over the coalition size ``j`` (:func:`cardinality_weights`):

- ``"shapley"``: ``q(j) = 1/n`` (every size equally; the only one with efficiency,
  ``Σ_i φ_i = U(D) - U(∅)``);
- ``"beta"``: Beta(α, β)-Shapley of Kwon & Zou (2022), ``j ~ BetaBinomial(n-1, β, α)``; the
  default ``(α, β) = (16, 1)`` favours small coalitions, whose marginals are less noisy;
  ``(1, 1)`` is the Shapley value;
- ``"banzhaf"``: every subset equally, ``j ~ Binomial(n-1, 1/2)`` (Wang & Jia 2023).

Sign convention: the utility is "higher = better", so a **positive value = the point helps =
proponent**, as everywhere in the library. Two games:

- :class:`TMCShapley` (Ghorbani & Zou 2019): ``U_q(S) = -ℓ(q; A(S))`` (or the 0/1 accuracy on
  ``q``) for a model ``A(S)`` trained by the user's training function on ``S``; estimated by
  truncated Monte-Carlo over random permutations.
- :class:`KNNShapley` (Jia et al. 2019): ``U_q(S) = (1/K) Σ_{the K nearest neighbours of q in S}
  1[y_j = y_q]``, the K-nearest-neighbour classifier's likelihood of the query's label on some
  embedding; computed exactly in ``O(n log n)`` per query by a recursion.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from forwardinf.baselines.retraining import (AccuracyProbe, LossProbe, load_cached, process_map, retraining_run,
                                             subset_of)
from forwardinf.baselines.run import TrainFn, TrainingRun, training_function
from forwardinf.core.params import device_of, mode
from forwardinf.data.inputs import DataLike, as_dataset, batches, to_device
from forwardinf.tasks.classification import _call as classification_logits
from forwardinf.tasks.classification import _split as classification_split
from forwardinf.estimators.base import Capabilities, Estimator, EstimatorConfig, check_choice, check_positive
from forwardinf.hashing import fingerprint, sha256_hex
from forwardinf.io import atomic_save
from forwardinf.tasks.base import Task

__all__ = [
    "WEIGHTINGS",
    "cardinality_weights",
    "exact_semivalues",
    "knn_coefficients",
    "knn_values",
    "split_rhat",
    "KNNShapley",
    "LastLayerTrainer",
    "TMCShapley",
]

WEIGHTINGS = ("shapley", "beta", "banzhaf")
UTILITIES = ("loss", "accuracy")
EMBEDDINGS = ("penultimate", "logits", "inputs")
METRICS = ("euclidean", "cosine")
_CACHE_VERSION = "forwardinf-tmc-shapley-v1"


# ------------------------------------------------------------------------------ semivalues
def _check_weighting(owner: str, weighting: str, beta: Any) -> tuple[float, float]:
    check_choice(owner, "weighting", weighting, WEIGHTINGS)
    try:
        a, b = (float(v) for v in beta)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: invalid beta={beta!r}; expected a pair (alpha, beta) of positive numbers") from None
    if not (a > 0 and b > 0):
        raise ValueError(f"{owner}: invalid beta={beta!r}; expected a pair (alpha, beta) of positive numbers")
    return a, b


def _log_binom(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _log_beta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _log_subset_weights(n: int, weighting: str, beta: Sequence[float]) -> Tensor:
    """``log w(j)``, ``j = 0..n-1``: the weight of ONE subset of size ``j`` (``w(j) = q(j) / C(n-1, j)``)."""
    j = torch.arange(n, dtype=torch.float64)
    if weighting == "shapley":
        return -math.log(n) - _log_binom(torch.tensor(float(n - 1), dtype=torch.float64), j)
    if weighting == "banzhaf":
        return torch.full((n,), -(n - 1) * math.log(2.0), dtype=torch.float64)
    a, b = (torch.tensor(float(v), dtype=torch.float64) for v in beta)
    return _log_beta(j + b, (n - 1 - j) + a) - _log_beta(a, b)


def cardinality_weights(n: int, weighting: str = "shapley", beta: Sequence[float] = (16.0, 1.0)) -> Tensor:
    """``q [n]`` (float64, sums to 1): the weight of coalition size ``j = 0..n-1`` in the semivalue.

    ``"shapley"``: uniform; ``"banzhaf"``: ``Binomial(n-1, 1/2)``; ``"beta"``: ``BetaBinomial(n-1,
    β, α)`` for ``beta = (α, β)`` (Kwon & Zou's Beta(α, β)-Shapley; ``(1, 1)`` is Shapley).
    """
    check_positive("cardinality_weights", "n", n, integer=True)
    _check_weighting("cardinality_weights", weighting, beta)
    j = torch.arange(n, dtype=torch.float64)
    q = torch.exp(_log_subset_weights(n, weighting, beta) + _log_binom(torch.tensor(float(n - 1), dtype=torch.float64), j))
    return q / q.sum()  # exact up to round-off already; this removes the round-off


def exact_semivalues(utility: Callable[[tuple[int, ...]], Any], n: int, weighting: str = "shapley",
                     beta: Sequence[float] = (16.0, 1.0)) -> Tensor:
    """Semivalues by enumerating all ``2^n`` subsets: ``[n, *utility_shape]`` float64.

    ``utility(S)`` takes a sorted tuple of training positions (``()`` is the empty set) and returns
    a number or a tensor (e.g. one utility per query). Only for small ``n`` (``n <= 20``).
    """
    check_positive("exact_semivalues", "n", n, integer=True)
    if n > 20:
        raise ValueError(f"exact_semivalues: n={n} needs 2^{n} utilities; use TMCShapley for n > 20")
    _check_weighting("exact_semivalues", weighting, beta)
    w = torch.exp(_log_subset_weights(n, weighting, beta))
    table = {}
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            table[subset] = torch.as_tensor(utility(subset), dtype=torch.float64)
    values = torch.zeros((n, *next(iter(table.values())).shape), dtype=torch.float64)
    for subset, u in table.items():
        inside = set(subset)
        for i in range(n):
            if i not in inside:
                values[i] += w[len(subset)] * (table[tuple(sorted(inside | {i}))] - u)
    return values


def split_rhat(chain_means: Tensor, chain_vars: Tensor, counts: Tensor) -> Tensor:
    """Gelman-Rubin potential scale reduction from per-chain means/variances ``[C, ...]``.

    ``R̂ = sqrt(((L-1)/L · W + B/L) / W)`` with ``W`` the mean within-chain variance, ``B/L`` the
    variance of the chain means and ``L`` the shortest chain. ``R̂ → 1`` as the chains agree;
    entries with ``W = 0`` (a value that never varied) get 1.
    """
    length = counts.min().clamp_min(2).to(chain_means.dtype)
    within = chain_vars.mean(0)
    between = chain_means.var(0, unbiased=True)
    pooled = (length - 1) / length * within + between
    rhat = torch.sqrt(pooled / within)
    return torch.where(within > 0, rhat, torch.ones_like(rhat))


# ------------------------------------------------------------------------------ KNN-Shapley
def knn_coefficients(n: int, k: int, weighting: str = "shapley", beta: Sequence[float] = (16.0, 1.0)) -> tuple[Tensor, float]:
    """``(c [n-1], last)``, the query-independent factors of the KNN semivalue recursion.

    With training points sorted by distance to the query (rank ``1`` = nearest) and
    ``m_r = 1[y_(r) = y_q]``, the semivalue of the rank-``r`` point is

        s_n = m_n / K · last,        s_r = s_{r+1} + (m_r - m_{r+1}) / K · c_r,

    where ``c_r = Σ_{S ⊆ D \\ {(r), (r+1)}} (w(|S|) + w(|S|+1)) 1[|S ∩ {(1)..(r-1)}| < K]`` and
    ``last = Σ_{j<K} q(j)``: the two neighbours' marginals differ only when fewer than ``K``
    members of ``S`` are closer. For Shapley this is Jia et al.'s ``c_r = min(K, r) / r`` and
    ``last = min(K, n) / n``; for Banzhaf ``c_r = P(Binomial(r-1, 1/2) < K)``.
    """
    check_positive("knn_coefficients", "n", n, integer=True)
    check_positive("knn_coefficients", "k", k, integer=True)
    _check_weighting("knn_coefficients", weighting, beta)
    q = cardinality_weights(n, weighting, beta)
    last = float(q[:min(k, n)].sum())
    if n == 1:
        return torch.zeros(0, dtype=torch.float64), last
    r = torch.arange(1, n, dtype=torch.float64)  # ranks 1..n-1
    if weighting == "shapley":
        return torch.clamp(k / r, max=1.0), last
    logw = _log_subset_weights(n, weighting, beta)
    log_pair = torch.logaddexp(logw[:-1], logw[1:])  # log(w(j) + w(j+1)), j = 0..n-2
    far = (n - 1 - r)[:, None]  # points farther than rank r+1: [n-1, 1]
    rr = torch.arange(n - 1, dtype=torch.float64)[None, :]  # how many of S are farther: [1, n-1]
    valid = rr <= far
    log_far = torch.where(valid, _log_binom(far, torch.minimum(rr, far)), torch.full_like(rr * far, -math.inf))
    total = torch.full((n - 1,), -math.inf, dtype=torch.float64)
    for closer in range(min(k, n - 1)):  # |S ∩ closer points| = closer < K
        if closer > n - 2:
            break
        ok = (r - 1) >= closer  # rank r has r-1 closer points
        j = closer + rr  # |S|
        lp = torch.where(j <= n - 2, log_pair[torch.clamp(j, max=n - 2).long()], torch.full_like(j, -math.inf))
        inner = torch.logsumexp(log_far + lp, dim=1)  # [n-1]
        term = torch.where(ok, _log_binom(r - 1, torch.clamp(torch.tensor(float(closer), dtype=torch.float64), max=r - 1)) + inner,
                           torch.full_like(inner, -math.inf))
        total = torch.logaddexp(total, term)
    return torch.exp(total), last


def knn_values(matches: Tensor, k: int, coefficients: tuple[Tensor, float]) -> Tensor:
    """Semivalues in rank order from ``matches [Q, n]`` (``1[y_(r) = y_q]``, nearest first).

    ``coefficients`` from :func:`knn_coefficients`. Returns ``[Q, n]`` float64 in rank order.
    """
    c, last = coefficients
    m = matches.to(torch.float64)
    steps = (m[:, :-1] - m[:, 1:]) / k * c.to(m.device)  # s_r - s_{r+1}, r = 1..n-1
    tail = m[:, -1:] / k * last
    # s_r = s_n + Σ_{t >= r} steps_t: a reversed cumulative sum.
    suffix = torch.flip(torch.cumsum(torch.flip(steps, [1]), 1), [1])
    return torch.cat([suffix + tail, tail], 1)


@dataclass(frozen=True, kw_only=True)
class KNNShapleyConfig(EstimatorConfig):
    """Every knob of :class:`KNNShapley` (see its docstring)."""

    k: int = 10
    embedding: str | Callable[[Tensor], Tensor] = "penultimate"
    metric: str = "euclidean"
    weighting: str = "shapley"
    beta: Sequence[float] = (16.0, 1.0)
    batch_size: int = 512
    progress: bool = False


class KNNShapley(Estimator):
    """Exact KNN-Shapley (Jia et al. 2019) on embeddings: ``[n_query, n_train]`` values.

    For each query ``q`` (acting as the validation point) the game is the K-nearest-neighbour
    classifier's likelihood of ``q``'s label, ``U_q(S) = (1/K) Σ_{j ∈ KNN(q, S)} 1[y_j = y_q]``,
    on the chosen embedding (``U_q(∅) = 0``). Its semivalues are computed exactly by the
    recursion of :func:`knn_coefficients` after one sort per query, ``O(n log n)``; the Shapley
    values of a query sum to ``U_q(D)``. Positive = the point's label agrees with the query's and
    it is among its neighbours (proponent); negative = it pushes the query towards a wrong label.
    Points in an unbroken run of same-label neighbours share one value (the game cannot tell them
    apart), so exact duplicates are not ranked above their equally-labelled neighbours.

    Args (all keyword):
        k: neighbours ``K``.
        embedding: ``"penultimate"`` (the input of the model's last layer), ``"logits"`` (the
            model's output), ``"inputs"`` (flattened raw inputs; no model needed) or a callable
            ``inputs [B, ...] -> features [B, d]``.
        metric: ``"euclidean"`` or ``"cosine"`` distance.
        weighting: ``"shapley"``, ``"beta"`` or ``"banzhaf"`` (module docstring); exact for each.
        beta: ``(α, β)`` for ``weighting="beta"``.
        batch_size: examples per embedding batch and queries per distance block.
        progress: show a progress bar over query blocks.

    ``self_influence()`` ``[n]`` is each training point's value in its own game (``q = z_i``,
    with ``z_i`` itself as its nearest neighbour): ``≈ 1/n`` for a point whose neighbours share
    its label, ``≈ 1/K`` for one only it supports (e.g. mislabeled). Batches are
    ``(inputs, targets, ...)`` or dicts with ``"inputs"``/``"targets"`` (class indices).
    """

    # a value depends on the point's rank among all training points: not shardable
    capabilities = Capabilities(self_influence="the point's value in its own game (q = z_i): the diagonal of "
                                               "influence(train)")

    Config = KNNShapleyConfig
    fit_fields = ("k", "embedding", "weighting", "beta")

    def __init__(self, model: nn.Module | None = None, task: Task | None = None, *,
                 config: KNNShapleyConfig | None = None, **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`KNNShapleyConfig`), or ``config=``."""
        super().__init__(model, task, config, **knobs)  # type: ignore[arg-type]

    # -- fit --------------------------------------------------------------------------------
    def _load_train(self, train: DataLike) -> Any:
        for attr in ("features_", "labels_", "coefficients_", "shapes_"):  # a refit may change the embedding
            self.__dict__.pop(attr, None)
        return self._dataset(train, "train")  # checked by embed, batch by batch, as it embeds

    def _fit(self, train: Any) -> None:
        """Embed the training set (``features_ [n, d]``, ``labels_ [n]``) and precompute the recursion."""
        features, labels = self.embed(train, "train")
        self.coefficients_ = knn_coefficients(len(labels), self.k, self.weighting, self.beta)
        self.features_, self.labels_ = features, labels

    def embed(self, data: DataLike, name: str = "data") -> tuple[Tensor, Tensor]:
        """``(features [m, d], labels [m])`` of ``data`` on the chosen embedding (eval mode, no grad)."""
        uses_model = self.model is not None and not callable(self.embedding) and self.embedding != "inputs"
        dataset = self._load(data, name, self.model if uses_model else None)
        feats, labels = [], []
        device = self._device()
        for _, batch in batches(dataset, self.batch_size):
            inputs, targets = _inputs_targets(batch, name)
            if targets.numel() and int(targets.min()) < 0:
                raise ValueError(f"{name}: negative label {int(targets.min())}")
            feats.append(self._features(to_device(inputs, device)).detach().flatten(1).to("cpu", torch.float64))
            labels.append(torch.as_tensor(targets).to("cpu", torch.long))
        out, y = torch.cat(feats), torch.cat(labels)
        if not torch.isfinite(out).all():
            raise ValueError(f"{name}: the embedding contains NaN or inf")
        if hasattr(self, "features_") and out.shape[1] != self.features_.shape[1]:
            raise ValueError(f"{name}: embedding has {out.shape[1]} features, the training data's has {self.features_.shape[1]}")
        return out, y

    def _features(self, inputs: Tensor) -> Tensor:
        if callable(self.embedding):
            with torch.no_grad():
                return self.embedding(inputs)
        if self.embedding == "inputs":
            return _float_inputs(inputs)
        if self.model is None:
            raise ValueError(f"KNNShapley: embedding={self.embedding!r} needs a model; pass one or use embedding='inputs'")
        with torch.no_grad(), mode(self.model, False):
            if self.embedding == "logits":
                return classification_logits(self.model, inputs)
            from forwardinf.core.gradients import last_layer

            head = dict(self.model.named_modules())[last_layer(self.model)]
            seen: list[Tensor] = []
            handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            try:
                classification_logits(self.model, inputs)
            finally:
                handle.remove()
            if not seen:
                raise ValueError("KNNShapley: the model's last layer was not called; pass embedding= explicitly")
            return _per_example(seen[-1], inputs)

    # -- influence --------------------------------------------------------------------------
    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` exact values (float64), or ``[n_train]`` for the mean utility (``joint``)."""
        self._check_fitted()
        fq, yq = self.embed(queries, "queries")
        out = self._values(fq, yq, self_index=None)
        return out.mean(0) if joint else out

    def self_influence(self) -> Tensor:
        """``[n_train]``: each point's value in its own game, itself ranked nearest."""
        self._check_fitted()
        n = len(self.labels_)
        out = torch.empty(n, dtype=torch.float64)
        for start in range(0, n, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, n))
            vals = self._values(self.features_[idx], self.labels_[idx], self_index=idx)
            out[idx] = vals[torch.arange(len(idx)), idx]
        return out

    def _values(self, fq: Tensor, yq: Tensor, self_index: Tensor | None) -> Tensor:
        n = len(self.labels_)
        out = torch.empty(len(yq), n, dtype=torch.float64)
        starts = range(0, len(yq), self.batch_size)
        for start in tqdm(starts, desc="KNN-Shapley", disable=not self.progress, leave=False):
            sl = slice(start, start + self.batch_size)
            d = self._distances(fq[sl])
            if self_index is not None:
                # The query is the training point itself: it is its own nearest neighbour.
                d[torch.arange(d.shape[0]), self_index[sl]] = -math.inf
            # Stable sort: equal distances keep index order, so ties are resolved deterministically.
            order = torch.sort(d, dim=1, stable=True).indices
            matches = self.labels_[order] == yq[sl, None]
            vals = knn_values(matches, self.k, self.coefficients_)
            out[sl].scatter_(1, order, vals)
        return out

    def _distances(self, fq: Tensor) -> Tensor:
        ft = self.features_
        if self.metric == "cosine":
            a = fq / fq.norm(dim=1, keepdim=True).clamp_min(1e-12)
            b = ft / ft.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return 1.0 - a @ b.T
        return torch.cdist(fq, ft)

    def _check_params(self) -> None:
        name = type(self).__name__
        check_positive(name, "k", self.k, integer=True)
        check_positive(name, "batch_size", self.batch_size, integer=True)
        check_choice(name, "metric", self.metric, METRICS)
        if not callable(self.embedding):
            check_choice(name, "embedding", self.embedding, EMBEDDINGS)
        _check_weighting(name, self.weighting, self.beta)


def _inputs_targets(batch: Any, name: str) -> tuple[Any, Any]:
    """``(inputs, targets [B])``: a tensor, or a Hugging Face batch's keyword inputs (``model(**inputs)``)."""
    if isinstance(batch, dict):
        try:
            inputs, targets = classification_split(batch)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
    else:
        raise ValueError(f"{name}: KNN-Shapley needs labelled data: (inputs, targets) batches")
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.ndim != 1:
        hint = " (per-token labels: a language model; these methods need a classifier)" if t.ndim == 2 else ""
        raise ValueError(f"{name}: targets must be integer class indices [B], got {t.dtype} {tuple(t.shape)}{hint}")
    if torch.is_tensor(inputs) and inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return inputs, t


def _float_inputs(inputs: Any) -> Tensor:
    """The raw float inputs to compare (``embedding="inputs"``): the tensor, or a keyword batch's one
    float field (``pixel_values``); token ids are not a space to measure distances in."""
    if not isinstance(inputs, dict):
        return inputs
    floats = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()]
    if len(floats) != 1:
        raise ValueError(f"embedding='inputs' (pixel-nn) compares raw float inputs such as pixel_values; this batch's "
                         f"inputs ({', '.join(sorted(inputs))}) have {len(floats)} float fields (token ids are not "
                         "features): use embedding='penultimate' (feature-nn) or a callable")
    return inputs[floats[0]]


def _per_example(features: Tensor, inputs: Any) -> Tensor:
    """The last layer's input as one vector per example: a keyword (Hugging Face) model whose head
    runs on every token (``[B, T, H]``, pooled after it, as GPT-2's and Llama's sequence
    classifiers) has none, and is refused."""
    if isinstance(inputs, dict) and features.ndim > 2:
        raise ValueError(f"the model's last layer takes {tuple(features.shape)} (a head on every token, pooled after "
                         "it): no per-example feature vector; pass embedding= a callable returning [B, d]")
    return features


# ------------------------------------------------------------------------------ TMC-Shapley
class LastLayerTrainer:
    """A training function ``(data, seed) -> model`` that re-fits only the model's last layer.

    The features (the input of the last layer, an ``nn.Linear``) stay frozen; the head is fitted
    from zero by ``max_iter`` L-BFGS iterations towards the minimum of the strongly convex
    ``mean cross-entropy + l2 ||W||²`` on ``data`` (so the result depends only on the set, not on
    ``seed``). It makes Shapley values
    over the training set affordable for a trained network (a few milliseconds per training, the
    data-valuation-on-embeddings shortcut); the answer is about the head, not the whole network.
    Picklable (it holds a copy of the model), so it works with ``workers > 1``.

    Args: model (copied; it is not modified), l2, max_iter (L-BFGS iterations), batch_size.
    """

    def __init__(self, model: nn.Module, *, l2: float = 1e-3, max_iter: int = 20, batch_size: int = 1024) -> None:
        import copy

        from forwardinf.core.gradients import last_layer

        self.model = copy.deepcopy(model).eval()
        self.head = last_layer(self.model)
        if not isinstance(dict(self.model.named_modules())[self.head], nn.Linear):
            raise ValueError(f"LastLayerTrainer: the last layer {self.head!r} is not an nn.Linear")
        self.l2 = l2
        self.max_iter = max_iter
        self.batch_size = batch_size

    def features(self, data: Any) -> tuple[Tensor, Tensor]:
        """``(features [m, d], labels [m])`` of ``data`` through the frozen network."""
        head = dict(self.model.named_modules())[self.head]
        feats, labels = [], []
        seen: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            with torch.no_grad():
                for _, batch in batches(as_dataset(data, "data"), self.batch_size):
                    inputs, targets = _inputs_targets(batch, "data")
                    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= head.out_features):
                        raise ValueError(f"LastLayerTrainer: labels must lie in [0, {head.out_features}), got "
                                         f"[{int(targets.min())}, {int(targets.max())}]")
                    classification_logits(self.model, to_device(inputs, device_of(self.model)))
                    feats.append(_per_example(seen.pop(), inputs).flatten(1))
                    labels.append(targets.to(feats[-1].device))
        finally:
            handle.remove()
        return torch.cat(feats), torch.cat(labels)

    def __call__(self, data: Any, seed: int) -> nn.Module:
        import copy

        f, y = self.features(data)
        head = dict(self.model.named_modules())[self.head]
        w = torch.zeros(head.out_features, f.shape[1], dtype=f.dtype, device=f.device, requires_grad=True)
        b = torch.zeros(head.out_features, dtype=f.dtype, device=f.device, requires_grad=True)
        # A fixed iteration budget from a fixed start: the result is a deterministic function of
        # the set (20 iterations leave an objective gap of ~1e-3 on digits features).
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, history_size=10, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(f @ w.T + b, y) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        model = copy.deepcopy(self.model)
        new_head = dict(model.named_modules())[self.head]
        with torch.no_grad():
            new_head.weight.copy_(w.detach())
            if new_head.bias is not None:
                new_head.bias.copy_(b.detach())
        return model


class _Game:
    """Everything one permutation needs (picklable, shipped once to each worker process)."""

    def __init__(self, train_fn: TrainFn, pool: Any, probe: Any, sign: float, diag: bool, truncation: float,
                 u_full: Tensor, u_empty: Tensor, train_seed: int, seed: int) -> None:
        self.train_fn = train_fn
        self.pool = pool
        self.probe = probe
        self.sign = sign
        self.diag = diag
        self.truncation = truncation
        self.u_full = u_full
        self.u_empty = u_empty
        self.train_seed = train_seed
        self.seed = seed

    def utility(self, model: nn.Module) -> Tensor:
        if not isinstance(model, nn.Module):
            raise TypeError(f"train_fn must return an nn.Module, got {type(model).__name__}")
        return self.sign * self.probe(model).to(torch.float64)

    def order(self, k: int) -> np.ndarray:
        g = torch.Generator().manual_seed(int(sha256_hex(f"{self.seed}:{k}", length=15), 16))
        return torch.randperm(len(self.pool), generator=g).numpy()

    def permutation(self, k: int) -> dict[str, Any]:
        """Marginals of every point along permutation ``k``: ``{"marginals" [n, m], "positions" [n], "truncated_at"}``."""
        n = len(self.pool)
        order = self.order(k)
        width = 1 if self.diag else self.u_full.shape[0]
        marginals = torch.zeros(n, width, dtype=torch.float64)
        prev = self.u_empty
        full_mean = float(self.u_full.mean())
        span = abs(full_mean - float(self.u_empty.mean()))
        truncated_at = n
        for pos in range(n):
            if self.truncation > 0 and abs(full_mean - float(prev.mean())) <= self.truncation * span:
                truncated_at = pos  # the rest add (about) nothing: their marginals stay 0
                break
            if pos == n - 1:
                u = self.u_full  # the whole set: A(D) was trained once in fit
            else:
                # Sorted: U must depend on the set, not on the order its members were drawn in.
                u = self.utility(self.train_fn(subset_of(self.pool, np.sort(order[:pos + 1])), self.train_seed))
            i = int(order[pos])
            marginals[i] = (u[i] - prev[i]) if self.diag else (u - prev)
            prev = u
        positions = np.empty(n, dtype=np.int64)
        positions[order] = np.arange(n)
        return {"marginals": marginals, "positions": torch.from_numpy(positions), "truncated_at": truncated_at}


@dataclass(frozen=True, kw_only=True)
class TMCShapleyConfig(EstimatorConfig):
    """Every knob of :class:`TMCShapley` (see its docstring); ``run`` is its training run."""

    run: TrainingRun | None = None
    permutations: int = 100
    truncation: float = 0.0
    utility: str = "loss"
    empty: Any = "uniform"
    weighting: str = "shapley"
    beta: Sequence[float] = (16.0, 1.0)
    train_seed: int = 0
    seed: int = 0
    tolerance: float | None = None
    min_permutations: int = 8
    chains: int = 4
    workers: int = 1
    cache_dir: str | os.PathLike | None = None
    batch_size: int = 1024
    progress: bool = False


class TMCShapley(Estimator):
    """Truncated Monte-Carlo data Shapley (Ghorbani & Zou 2019) over a training function.

    The game of query ``q`` is ``U_q(S) = -ℓ(q; A(S))`` (``utility="loss"``, the survey's eq. 18)
    or ``1[A(S) classifies q correctly]`` (``"accuracy"``), where ``A(S) = train_fn(S, train_seed)``
    (``train_fn`` of the :class:`~forwardinf.baselines.run.TrainingRun` ``run``, or given alone)
    is trained on the members of ``S`` in training-set order (so ``U`` is a function of the set).
    ``U_q(∅)`` is ``empty``. Each permutation ``π`` of the training set trains the models on its
    prefixes and records every point's marginal ``U(π_{<r} ∪ {i}) - U(π_{<r})``; the value is the
    weighted mean over permutations (``n q(r) ×`` the marginal at position ``r``, see
    :func:`cardinality_weights`; 1 for Shapley). Positive = the point lowers the query's loss
    (proponent). With ``truncation = 0`` each permutation's Shapley marginals telescope, so the
    values sum exactly to ``U_q(D) - U_q(∅)`` (efficiency).

    Truncation: a permutation stops once the prefix model's mean utility over the queries is
    within ``truncation × |Ū(D) - Ū(∅)|`` of the full model's; the remaining points get marginal 0.

    Convergence: permutation ``k`` belongs to chain ``k mod chains``; ``diagnostics_`` holds the
    standard error of every value (``stderr_``), the split Gelman-Rubin ``R̂`` across the chains
    (max and mean over values), the relative standard error ``mean(stderr) / mean(|value|)`` and
    the truncation point. With ``tolerance`` set, sampling stops at the first permutation count
    ``>= min_permutations`` whose relative standard error is below it (deterministic, also with
    workers).

    Resumable and parallel: each finished permutation is saved in ``cache_dir`` (a hash of the
    training run's ``recipe``, the data, the probe, the seeds and the permutation number), so
    a rerun with more permutations only computes the new ones. ``workers > 1`` runs permutations in
    spawned processes; ``train_fn`` must then be picklable (see
    :mod:`forwardinf.baselines.retraining` for the training-function contract).

    Args (all keyword):
        permutations: maximum number of permutations ``P``.
        truncation: relative truncation tolerance (0 disables truncation).
        utility: ``"loss"`` or ``"accuracy"``.
        empty: utility of the empty set per query: ``"uniform"`` (classification: the uniform
            prediction, ``-log C`` for loss and ``1/C`` for accuracy), a number, or an
            ``nn.Module`` evaluated like the trained models (e.g. the untrained initial model).
        weighting, beta: the semivalue (module docstring).
        train_seed: seed passed to every training (``U`` must be deterministic).
        seed: draws the permutations.
        tolerance, min_permutations, chains: early stopping and diagnostics (above).
        workers, cache_dir, batch_size, progress: as in :func:`run_trainings` (``run.recipe`` is its ``config``).

    ``fit(train)`` trains ``A(D)`` once. ``influence(queries)`` runs the permutations with the
    queries as validation points, ``[n_query, n_train]`` (``joint=True``: the mean utility,
    ``[n_train]``). ``self_influence()`` is each point's value in the game of its own loss
    (``-ℓ(z_i; A(S))``), i.e. how much a model must learn it to fit it (large for mislabeled
    points); it never truncates (a point's own loss keeps changing when it comes late).
    """

    capabilities = Capabilities(self_influence="the point's value in the game of its own loss, never truncated "
                                               "(not the diagonal of influence(train))")

    Config = TMCShapleyConfig

    def __init__(self, run: TrainingRun | TrainFn | None = None, task: Task | None = None, *,
                 config: EstimatorConfig | None = None, **knobs: Any) -> None:
        """``run``: the :class:`TrainingRun` (or its training function alone); every knob a keyword
        (the fields of :class:`TMCShapleyConfig`), or ``config=``."""
        config = retraining_run(type(self).__name__, run, config, knobs)
        super().__init__(None, task, config, **knobs)  # type: ignore[arg-type]

    # -- fit --------------------------------------------------------------------------------
    def _fit(self, train: Any) -> None:
        """Train the full model ``A(D)`` (``full_model_``) once."""
        model = self._train_fn()(subset_of(train, np.arange(len(train))), int(self.train_seed))
        if not isinstance(model, nn.Module):
            raise ValueError(f"TMCShapley: train_fn must return an nn.Module, got {type(model).__name__}")
        self._load(train, "train", model)  # e.g. labels the model has no class for
        self.full_model_ = model

    def _train_fn(self) -> TrainFn:
        return training_function(type(self).__name__, self.run)

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` values (float64), or ``[n_train]`` for the mean utility (``joint``)."""
        self._check_fitted()
        qset = self._load(queries, "queries", self.full_model_)
        values = self._run(qset, diag=False)  # [n, Q]
        return values.mean(1) if joint else values.T.contiguous()

    def self_influence(self) -> Tensor:
        """``[n_train]``: each point's value for its own loss (no truncation)."""
        self._check_fitted()
        return self._run(self.train_, diag=True)[:, 0]

    # -- the sampler ------------------------------------------------------------------------
    def _probe(self, data: Any) -> Any:
        cls = LossProbe if self.utility == "loss" else AccuracyProbe
        return cls(data, self.task, self.batch_size)

    def _empty_utility(self, probe: Any, sign: float, m: int) -> Tensor:
        if isinstance(self.empty, nn.Module):
            return sign * probe(self.empty).to(torch.float64)
        if isinstance(self.empty, str):
            batch = next(batches(probe.data, 1))[1]
            inputs = _inputs_targets(batch, "probe")[0]
            with torch.no_grad(), mode(self.full_model_, False):
                out = classification_logits(self.full_model_, to_device(inputs, device_of(self.full_model_)))
            if not torch.is_tensor(out) or out.ndim != 2:
                raise ValueError("TMCShapley: empty='uniform' needs a classifier (logits [B, C]); pass empty=<number or module>")
            c = out.shape[1]
            value = -math.log(c) if self.utility == "loss" else 1.0 / c
            return torch.full((m,), value, dtype=torch.float64)
        return torch.full((m,), float(self.empty), dtype=torch.float64)

    def _run(self, probe_data: Any, diag: bool) -> Tensor:
        probe = self._probe(probe_data)
        sign = -1.0 if self.utility == "loss" else 1.0
        m = len(probe_data)
        u_full = sign * probe(self.full_model_).to(torch.float64)
        u_empty = self._empty_utility(probe, sign, m)
        truncation = 0.0 if diag else float(self.truncation)
        game = _Game(self._train_fn(), self.train_, probe, sign, diag, truncation, u_full, u_empty,
                     int(self.train_seed), int(self.seed))
        n, width = len(self.train_), (1 if diag else m)
        scale = n * cardinality_weights(n, self.weighting, self.beta)  # importance weight per position
        chains = self.chains
        sums = torch.zeros(chains, n, width, dtype=torch.float64)
        squares = torch.zeros_like(sums)
        counts = torch.zeros(chains, dtype=torch.float64)
        truncated: list[int] = []

        def add(k: int, result: dict[str, Any]) -> None:
            x = result["marginals"] * scale[result["positions"]][:, None]
            sums[k % chains] += x
            squares[k % chains] += x * x
            counts[k % chains] += 1
            truncated.append(int(result["truncated_at"]))

        def stats() -> dict[str, Any]:
            total = counts.sum()
            mean = sums.sum(0) / total
            var = (squares.sum(0) / total - mean**2).clamp_min(0) * total / max(total - 1, 1)
            stderr = torch.sqrt(var / total)
            scale_v = float(mean.abs().mean())
            rel = float(stderr.mean()) / scale_v if scale_v > 0 else (0.0 if float(stderr.max()) == 0 else math.inf)
            out = {"mean": mean, "stderr": stderr, "relative_stderr": rel}
            if bool((counts >= 2).all()):
                c = counts[:, None, None]
                cmeans = sums / c
                cvars = (squares / c - cmeans**2).clamp_min(0) * c / (c - 1)
                rhat = split_rhat(cmeans, cvars, counts)
                out["rhat_max"], out["rhat_mean"] = float(rhat.max()), float(rhat.mean())
            return out

        def converged() -> bool:
            total = int(counts.sum())
            return (self.tolerance is not None and total >= self.min_permutations
                    and stats()["relative_stderr"] <= float(self.tolerance))

        paths = self._cache_paths(probe, diag, truncation)
        done: dict[int, dict[str, Any]] = {}
        used = 0  # permutations 0..used-1 are in the estimate (in order: the result is deterministic)
        stopped = False

        def absorb() -> None:
            nonlocal used, stopped
            while not stopped and used in done and used < self.permutations:
                add(used, done.pop(used))
                used += 1
                stopped = converged()

        todo = []
        for k in range(self.permutations):
            cached = load_cached(paths[k]) if paths is not None else None
            if cached is not None:
                done[k] = cached
            else:
                todo.append(k)
        absorb()
        with tqdm(total=self.permutations, initial=used, desc="TMC-Shapley", unit="perm",
                  disable=not self.progress, leave=False) as bar:
            if not stopped:
                # leaving the loop once converged cancels the permutations not started
                for i, result in process_map(game.permutation, [(k,) for k in todo], self.workers):
                    k = todo[i]
                    if paths is not None:
                        atomic_save(result, paths[k])
                    done[k] = result
                    before = used
                    absorb()
                    bar.update(used - before)
                    if stopped:
                        break
        s = stats()
        self.values_ = s["mean"]
        self.stderr_ = s["stderr"]
        self.diagnostics_ = {
            "permutations": used,
            "relative_stderr": s["relative_stderr"],
            "rhat_max": s.get("rhat_max", float("nan")),
            "rhat_mean": s.get("rhat_mean", float("nan")),
            "converged": bool(stopped),
            "mean_truncated_at": float(np.mean(truncated)) / n if truncated else float("nan"),
            "trainings": int(sum(min(t, n - 1) for t in truncated)),
        }
        if self.tolerance is not None and not stopped:
            warnings.warn(f"TMCShapley: not converged after {used} permutations (relative standard error "
                          f"{s['relative_stderr']:.3g} > tolerance {self.tolerance}); raise permutations", stacklevel=3)
        return self.values_

    def _cache_paths(self, probe: Any, diag: bool, truncation: float) -> list[Path] | None:
        if self.cache_dir is None:
            return None
        cache = Path(self.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        recipe = self.run.recipe
        parts = (_CACHE_VERSION, fingerprint(recipe if recipe is not None else self._train_fn()),
                 fingerprint(self.train_), fingerprint(probe), self.utility, repr(diag), repr(truncation),
                 fingerprint(self.empty if isinstance(self.empty, nn.Module) else repr(self.empty)),
                 str(int(self.train_seed)), str(int(self.seed)))
        base = sha256_hex(*(part + ";" for part in parts), length=24)
        return [cache / f"tmc-{base}-{k}.pt" for k in range(self.permutations)]

    def _check_params(self) -> None:
        name = type(self).__name__
        self._train_fn()
        check_positive(name, "permutations", self.permutations, integer=True)
        check_positive(name, "chains", self.chains, integer=True)
        check_positive(name, "min_permutations", self.min_permutations, integer=True)
        check_positive(name, "workers", self.workers, integer=True)
        check_positive(name, "batch_size", self.batch_size, integer=True)
        check_choice(name, "utility", self.utility, UTILITIES)
        _check_weighting(name, self.weighting, self.beta)
        if not isinstance(self.truncation, (int, float)) or isinstance(self.truncation, bool) or not 0 <= self.truncation < 1:
            raise ValueError(f"{name}: invalid truncation={self.truncation!r}; expected a number in [0, 1)")
        if self.tolerance is not None:
            check_positive(name, "tolerance", self.tolerance)
        if not (isinstance(self.empty, (nn.Module, int, float)) and not isinstance(self.empty, bool)) and self.empty != "uniform":
            raise ValueError(f"{name}: invalid empty={self.empty!r}; expected 'uniform', a number or an nn.Module")
