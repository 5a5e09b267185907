"""Thousands of queries: a retrieval index shortlists candidates, Forward-INF scores only those.

A full Forward-INF query is one forward sweep over the training set. With a shortlist, each query
first fetches its ``K`` nearest training points from a FAISS index (:class:`ShortlistIndex`)
built once over the training set, and only those are scored, through the ``indices=`` path: the
queries of one update chunk (``query_chunk``) score the union of their shortlists in one sweep
(``union=True``, the default off the CPU), or each query's updated model its own ``K`` candidates
(the default on the CPU, where the updated models run one after another anyway).

What the index holds (``source``; ``"auto"``, the default: ``"head-grad"`` for a classifier
(``ClassificationTask``) whose last two ``nn.Linear`` run on ``[B, D]`` inputs (tried on one
training point), else ``"features"`` when the model has an ``nn.Linear``, else ``"directions"``):

- ``"head-grad"``: the ``"features"`` index fetches a pool of ``P`` candidates (``pool``; default
  ``max(10 K, 2000)``), re-ranked exactly by the cosine of each point's loss gradient over the
  head, the last two ``nn.Linear`` (weights and biases), to the ``K`` best. No per-example
  gradient is formed: a linear layer's is the outer product ``δ x^T``, so the inner products
  factorise, ``Σ_layers (δ_i·δ_q)(x_i·x_q + 1)`` (:mod:`forwardinf.estimators.head_grad`), and each
  training point's factors ``[x, δ]`` of both layers (SmallCNN on Fashion-MNIST: 3,402 floats,
  0.8 GB at 60,000 points; its gradient would be 402,826) are stored beside the index
  (``factors/``, :class:`~forwardinf.storage.factors.FactorStore`), built in the same sweep as the
  features (a forward and a backward to the first head layer's output per point), resumable and
  under the index's manifest. Queries: the same factors with their own labels. On Fashion-MNIST at
  10,000 points (33 test images) it recalled 0.855 / 0.930 / 0.985 of the full sweep's top 10 at
  K = 100 / 200 / 500, against 0.673 / 0.809 / 0.945 for the features alone; at 60,000 points the
  pool of 2,000 kept 0.98 of the exact head-gradient top 100 over the whole set, and the recall
  of the full sweep's top 10 (10 test images) was 0.53 / 0.64 / 0.91 at K = 100 / 200 / 1,000
  (features: 0.37 / 0.54 at K = 100 / 200): the K needed grows with N
  (benchmarks/results/many_queries.md). Re-ranking costs ``P x F`` multiply-adds per query.

- ``"features"``: the input of the module named ``layer`` (default: the last ``nn.Linear``, so
  the penultimate features), one forward sweep over the training set. On Fashion-MNIST
  (SmallCNN, 2,000 training points, 12 test queries) the full sweep's top 10 were all among the
  200 nearest by features, 0.93 of them by gradient sketch (benchmarks/results/many_queries.md).
- ``"directions"``: each training point's gradient sketch ``[∇m(θ, z_i)·v_j]_j``
  along the ``n_directions`` random directions that the default cosine score already caches in
  ``fit`` (no extra sweep); a query's sketch costs ``n_directions`` forward-mode derivatives. The
  inner product of unit sketches estimates the gradient cosine that the score ranks by; any model.
- ``"last-grad"``: each point's gradient of its own loss (the task's ``score_loss``, parallel to
  the cross-entropy's) wrt the weight and bias of the last ``nn.Linear`` (or ``layer``): the
  outer product ``e [h, 1]^T`` of the error ``e [C]`` and the layer's input ``h [D]``,
  ``C * (D + 1)`` numbers per point (1,290 for SmallCNN on 10 classes), unit length; one forward
  and a backward to the layer's output per point. Queries are embedded the same way with their
  own labels. Classifiers only (``ClassificationTask``, the layer called once on ``[B, D]``).
  Not the default: on Fashion-MNIST at 10,000 points (33 test images) it recalled 0.721 of the
  full sweep's top 10 at K=100 against 0.673 for features, but 0.812 vs 0.809 at K=200 and 0.952
  vs 0.945 at K=500 -- a gain at the smallest K only; ``"head-grad"`` (both head layers) recalls
  far more.

Sensitivities on demand: the default cosine score divides each change by the training point's
sensitivity, its gradient norm (a forward and backward pass per point, most of ``fit``; with
``sensitivity="directions"``, ``n_directions`` forward-mode derivatives per point). After
``fit(train, lazy=True)`` the retriever computes them only for the candidates some shortlist
needs, once each, and keeps them for later queries (on SmallCNN at 2,000 points the directions'
fit was 88% of a 1,000-query shortlist run's cost; benchmarks/results/many_queries.md).

``K`` equal to the training-set size gives exactly the full sweep's answer (also after a lazy fit). :meth:`Retriever.recall`
measures, on a sample of queries, how much of the full sweep's top-k the shortlist kept.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from forwardinf.core.params import mode
from forwardinf.core.sweep import sweep
from forwardinf.data.checks import check_batch
from forwardinf.data.inputs import DataLike, gather, subset
from forwardinf.estimators.base import TRAIN_CHUNK, Estimator, check_choice, check_positive
from forwardinf.estimators.head_grad import Head, head_factors
from forwardinf.storage.factors import FactorStore
from forwardinf.storage.index import ShortlistIndex
from forwardinf.storage.manifest import config_of, fingerprint_data, fingerprint_module, make_manifest
from forwardinf.storage.topk import RunningTopK, TopK, concat_topk

SOURCES = ("auto", "features", "directions", "last-grad", "head-grad")
POOL_MIN, POOL_PER_K = 2000, 10  # head-grad's default pool: max(POOL_PER_K * K, POOL_MIN) candidates


@dataclass(frozen=True)
class Recall:
    """How much of the full sweep's top-``k`` a shortlist of ``shortlist`` candidates kept.

    ``per_query [n]``: ``|top-k(shortlist) ∩ top-k(full)| / k`` for each sampled query (positions
    ``queries`` in the query set); ``mean``: their average.
    """

    k: int
    shortlist: int
    queries: Tensor
    per_query: Tensor

    @property
    def mean(self) -> float:
        return float(self.per_query.float().mean())


class Retriever:
    """A shortlist index over a fitted Forward-INF estimator's training set, and top-k through it.

    Args:
        estimator: a fitted :class:`~forwardinf.ForwardINF` or :class:`~forwardinf.TailForwardINF`.
        path: folder of the index on disk (e.g. beside the score store); None keeps it in memory.
            A folder made from another model, training set or configuration is refused
            (``StoreMismatchError``) unless ``overwrite``; an interrupted build resumes.
        source: ``"auto"``, ``"features"``, ``"directions"``, ``"last-grad"`` or ``"head-grad"``
            (module docstring).
        layer: for ``"features"``: the module whose input is the vector; for ``"last-grad"``: the
            ``nn.Linear`` whose weight gradient is the vector; for ``"head-grad"``: the head's last
            ``nn.Linear`` (its input makes the pool's index; the head is it and the one before).
            Default: the last ``nn.Linear``.
        pool: for ``"head-grad"``: candidates fetched from the features index and re-ranked by
            the head gradient (at least ``K``); default (None) ``max(10 * K, 2000)``.
        factory: FAISS ``index_factory`` string (``"Flat"``: exact inner product; ``"HNSW32"``...).
        shard_size: training points per vector file (the unit of resuming).

    The estimator's ``top_k(queries, k, shortlist=K)`` uses the retriever made last for its fit
    (or makes an in-memory one).
    """

    def __init__(self, estimator: Estimator, path: Any = None, *, source: str = "auto",
                 layer: str | None = None, factory: str = "Flat", shard_size: int = 65536,
                 overwrite: bool = False, pool: int | None = None) -> None:
        check_choice("Retriever", "source", source, SOURCES)
        # duck-typed (this module sits below forward_inf.py and tail.py, which import it)
        if not (hasattr(estimator, "_directional") or hasattr(estimator, "_tail")):
            raise TypeError(f"Retriever: shortlists need a ForwardINF or TailForwardINF, got {type(estimator).__name__}")
        estimator._check_fitted()
        if pool is not None:
            check_positive("Retriever", "pool", pool, integer=True)
        if source == "auto":
            source = _auto_source(estimator, layer)
        if source in ("last-grad", "head-grad"):
            _check_classifier(estimator, layer, source)
        self.estimator, self.source, self.train, self.pool = estimator, source, estimator.train_, pool
        self.layer = _last_linear(estimator.model) if source != "directions" and layer is None else layer
        forward = self._forward()
        train = estimator.train_
        config = {"source": source, "layer": self.layer, "estimator": config_of(estimator)}
        if source == "head-grad":
            self.head = Head.of(estimator.model, self.layer)
            config["head"] = list(self.head.layers)
        manifest = make_manifest(model=fingerprint_module(estimator.model), train=fingerprint_data(train),
                                 queries="-", n_train=len(train), n_query=1, shard_size=shard_size,
                                 query_block=1, config=config)
        if source == "directions":
            sketch = forward._base("directional")
            self.normalize = forward.score == "cosine"  # the cosine score divides by each point's norm
            vectors = lambda a, b: self._unit(sketch[a:b]) if self.normalize else sketch[a:b]  # noqa: E731
        elif source == "last-grad":
            self.normalize = True
            vectors = lambda a, b: self._unit(self._last_grad(subset(train, torch.arange(a, b))))  # noqa: E731
        elif source == "head-grad":  # the pool's features are the head's last input: one sweep makes both
            self.normalize = True
            self.factors = FactorStore(lambda a, b: self._head_factors(subset(train, torch.arange(a, b))), len(train),
                                       shard_size, None if path is None else Path(path) / "factors")
            vectors = lambda a, b: self._unit(np.array(  # noqa: E731
                self.factors.shard(a // shard_size)[:, self.head.feature_columns]))
        else:
            self.normalize = True
            vectors = lambda a, b: self._unit(self._features(subset(train, torch.arange(a, b))))  # noqa: E731
        self._sensitivities: dict[tuple, tuple[Tensor, Tensor]] = {}  # key -> ([n, M] values, [n] computed)
        self.index = ShortlistIndex.build(vectors, manifest, path=path, shard_size=shard_size, factory=factory,
                                          overwrite=overwrite)
        if source == "head-grad":
            self.factors.complete()  # a folder whose index was complete: its factor shards (kept, or computed)
        estimator.retriever_ = self

    @classmethod
    def of(cls, estimator: Estimator) -> "Retriever":
        """The retriever attached to ``estimator``'s current fit, or a new in-memory one."""
        estimator._check_fitted()
        found = estimator.__dict__.get("retriever_")
        if isinstance(found, Retriever) and found.estimator is estimator and found.train is estimator.train_:
            return found
        return cls(estimator)

    def _forward(self) -> Any:
        """The ForwardINF that scores (a tail estimator's tail)."""
        est = self.estimator
        return est._tail() if hasattr(est, "_tail") else est

    def _forward_queries(self, queries: DataLike) -> Any:
        """Queries as the scoring ForwardINF takes them (a tail estimator's: the prefix's features)."""
        est = self.estimator
        return est.features(queries, "queries") if hasattr(est, "_tail") else queries

    @staticmethod
    def _unit(v: Tensor) -> Tensor:
        v = torch.as_tensor(v).float()
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def _features(self, data: Any, name: str = "train") -> Tensor:
        """``[n, D]``: the input of module ``layer`` for each point of ``data`` (flattened). Every
        batch is checked (a lazy fit has not seen the training set: a bad label is refused here)."""
        model = self.estimator.model
        module = dict(model.named_modules()).get(self.layer)
        if module is None:
            raise ValueError(f"Retriever: the model has no module named {self.layer!r}")
        seen: list[Tensor] = []
        hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().flatten(1)))
        task, batch_size = self.estimator.task, self._forward().batch_size_

        def run(batch: Any) -> Tensor:
            check_batch(model, task, batch, name)
            seen.clear()
            task.loss(model, batch)
            return seen[0].T  # [D, B]: the sweep concatenates along the last dimension

        try:
            with mode(model, False):
                return sweep(run, data, batch_size, self.estimator._device()).T.contiguous()
        finally:
            hook.remove()

    def _last_grad(self, data: Any, name: str = "train") -> Tensor:
        """``[n, C * (D + 1)]`` (``C * D`` without bias): each point's gradient of the task's
        ``score_loss`` wrt the weight (and bias) of the ``nn.Linear`` named ``layer``, flattened:
        the outer product ``e h^T`` of the error ``e = d score_loss / d output [C]`` and the input
        ``h [D]`` (``[h, 1]`` with a bias). ``score_loss``'s gradient is parallel to the
        cross-entropy's (``p - onehot(y)`` up to a positive factor per point) but does not round to
        zero once ``p_y`` nears 1; unit vectors of either are the same. ``e`` is taken by autograd
        at the module's output, so whatever follows the layer (here: nothing) is accounted for."""
        model = self.estimator.model
        module = dict(model.named_modules()).get(self.layer)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"Retriever: source='last-grad' needs an nn.Linear, the model's {self.layer!r} is "
                             f"{type(module).__name__ if module is not None else 'missing'}")
        seen: list[tuple[Tensor, Tensor]] = []

        def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
            leaf = out.detach().requires_grad_(True)  # the error is the gradient wrt this leaf
            seen.append((args[0].detach(), leaf))
            return leaf * 1.0  # not the leaf itself: an in-place op after the layer stays legal

        handle = module.register_forward_hook(hook)
        task, batch_size = self.estimator.task, self._forward().batch_size_

        def run(batch: Any) -> Tensor:
            check_batch(model, task, batch, name)
            seen.clear()
            with torch.enable_grad():
                margin = task.score_loss(model, batch)
                if len(seen) != 1 or seen[0][0].ndim != 2:
                    raise ValueError(f"Retriever: source='last-grad' needs {self.layer!r} called once per batch on "
                                     f"[B, D] inputs (got {len(seen)} calls"
                                     + (f", input {tuple(seen[0][0].shape)})" if seen else ")"))
                h, leaf = seen[0]
                (e,) = torch.autograd.grad(margin.sum(), leaf)  # [B, C]: one point's loss, one row
            if module.bias is not None:
                h = torch.cat([h, h.new_ones(len(h), 1)], 1)
            return (e.detach()[:, :, None] * h[:, None, :]).flatten(1).T  # [C * D', B]

        try:
            with mode(model, False):
                return sweep(run, data, batch_size, self.estimator._device()).T.contiguous()
        finally:
            handle.remove()

    def _head_factors(self, data: Any, name: str = "train") -> Tensor:
        """``[n, F]``: each point's head-gradient factors (:func:`~forwardinf.estimators.head_grad.head_factors`)."""
        return head_factors(self.estimator, self.head, data, self._forward().batch_size_, name)

    def embed(self, queries: DataLike) -> Tensor:
        """``[n_query, d]`` query vectors in the index's space (unit length)."""
        if self.source == "head-grad":  # the pool's index: the head's last input
            return self._unit(self.head.features(self._head_factors(self.estimator._dataset(queries, "queries"),
                                                                    "queries")))
        if self.source == "features":
            return self._unit(self._features(self.estimator._dataset(queries, "queries"), "queries"))
        if self.source == "last-grad":  # each query's own label: the gradient of its own loss
            return self._unit(self._last_grad(self.estimator._dataset(queries, "queries"), "queries"))
        forward = self._forward()
        return self._unit(forward._directional(forward._queries(self._forward_queries(queries))))

    def candidates(self, queries: DataLike, shortlist: int) -> Tensor:
        """``[n_query, K]`` training positions nearest to each query in the index, best first."""
        check_positive("Retriever", "shortlist", shortlist, integer=True)
        n = len(self.estimator.train_)
        q = len(self.estimator._dataset(queries, "queries"))
        if shortlist >= n:  # the whole training set, whatever the index would return
            return torch.arange(n).expand(q, n)
        if self.source == "head-grad":
            return self._rerank(self._head_factors(self.estimator._dataset(queries, "queries"), "queries"), shortlist)
        return self.index.search(self.embed(queries), shortlist)

    def pool_size(self, shortlist: int) -> int:
        """Candidates that ``"head-grad"`` fetches from the features index to keep ``shortlist`` of them."""
        pool = max(POOL_PER_K * shortlist, POOL_MIN) if self.pool is None else self.pool
        return min(max(pool, shortlist), len(self.estimator.train_))

    def _rerank(self, qf: Tensor, shortlist: int) -> Tensor:
        """``[Q, K]``: of each query's pool (the features index's nearest), the ``K`` training points
        whose head gradient has the largest cosine with the query's (factors ``qf [Q, F]``), best first."""
        pools = self.index.search(self._unit(self.head.features(qf)), self.pool_size(shortlist))
        out = torch.full((len(qf), shortlist), -1, dtype=torch.long)
        for q, rows in enumerate(pools):
            rows = rows[rows >= 0]  # approximate indexes may return -1 for missing neighbours
            cos = self.head.cosine(qf[q:q + 1], self.factors.rows(rows))[0]
            best = rows[cos.sort(descending=True, stable=True).indices[:shortlist]]
            out[q, :len(best)] = best
        return out

    def top_k(self, queries: DataLike, k: int = 10, shortlist: int = 100, *, union: bool | None = None) -> TopK:
        """As ``estimator.top_k(queries, k)``, scoring only each query's shortlist of ``K`` candidates.

        ``shortlist``: candidates per query (``K >= k``). ``union``: the queries of a chunk
        (``query_chunk``) score the union of their shortlists in one sweep, and each query's top-k
        is taken over that union; False: each query's updated model scores its own ``K``
        candidates only. Default (None): union off the CPU (the updated models run at once under
        ``vmap``, so one sweep of the union costs about one model's), own candidates on the CPU
        (the models run one after another, so a union of ``Q`` disjoint shortlists would cost
        ``Q * Q * K`` forwards instead of ``Q * K``). With ``K >= n_train`` the default equals the
        full sweep exactly (the union is the training set, scored in the same batches); a query
        scored alone (``union=False``) can differ in the last bit (its update's dot products run
        as a matrix-vector product).
        """
        name = type(self.estimator).__name__
        check_positive(name, "k", k, integer=True)
        if shortlist < k:
            raise ValueError(f"{name}: shortlist={shortlist!r} must be at least k={k}")
        forward = self._forward()
        cands = self.candidates(queries, shortlist)
        if union is None:  # K >= n_train: every shortlist is the training set, and their union costs one
            union = forward._device().type != "cpu" or shortlist >= len(forward.train_)
        qset = forward._queries(self._forward_queries(queries))
        parts = []
        for q0, update in forward._updates(qset):
            q1 = min(q0 + forward._query_chunk(), len(qset))
            if union:
                parts.append(self._best(forward, update, cands[q0:q1], k))
            else:
                pool = cands[q0:q1].unique()
                self._fill(forward, pool[pool >= 0])  # the chunk's new sensitivities in full batches, not per query
                parts += [self._best(forward, update.take(q, q + 1), cands[q0 + q:q0 + q + 1], k)
                          for q in range(q1 - q0)]
            del update  # else this chunk's update stays alive while the next one is computed (as in _blocks)
        return concat_topk(parts)

    def _best(self, forward: Any, update: Any, cands: Tensor, k: int) -> TopK:
        """Top-k of ``update``'s queries over the union of ``cands [q, K]`` (training positions)."""
        rows = torch.unique(cands)  # sorted: ties go to the lower training index, as in the full sweep
        rows = rows[rows >= 0]  # approximate indexes may return -1 for missing neighbours
        if len(rows) < k:
            raise ValueError(f"the index returned {len(rows)} candidates, fewer than k={k}: raise shortlist "
                             "or use an exact factory ('Flat')")
        # Chunks start on batch boundaries, as the full sweep's do (bit-identical at K = n_train).
        step = math.ceil(TRAIN_CHUNK / forward.batch_size_) * forward.batch_size_
        running = RunningTopK(cands.shape[0], k)
        for s in range(0, len(rows), step):
            with self._sensitive(forward, rows[s:s + step]):
                running.update(forward._score(update, rows[s:s + step]), s)
        top = running.result()
        return TopK(rows[top.indices], top.scores, rows[top.opponents], top.opponent_scores)

    @contextlib.contextmanager
    def _sensitive(self, forward: Any, rows: Tensor) -> Any:
        """Within: the cosine score's sensitivities of training positions ``rows [r]`` are at hand,
        even when the fit left them to first use (``fit(train, lazy=True)``).

        Those of rows not seen before are computed (``forward._sensitivity`` on them alone) and
        kept; the ``[n_train, ...]`` table, filled only on the rows computed so far, stands in the
        estimator's cache while ``_score`` reads its ``rows`` and is taken out after, so a full
        sweep never sees the rows not computed. A sweep's chunk starts on a batch boundary, so
        with every row at once (K = n_train) the batches, and the values, are the eager fit's.
        """
        key = self._fill(forward, rows)
        if key is None:
            yield
            return
        forward._cache_[key] = self._sensitivities[key][0]
        try:
            yield
        finally:
            del forward._cache_[key]

    def _fill(self, forward: Any, rows: Tensor) -> tuple | None:
        """Compute the sensitivities of the training positions ``rows [r]`` (sorted) not computed yet;
        their cache key, or None when the estimator needs none or holds them all (an eager fit)."""
        key = (*forward._sensitivity_key(), forward.batch_size_)  # as ForwardINF._cached keys it
        if forward.score != "cosine" or key in forward._cache_:
            return None
        kept = self._sensitivities.get(key)
        missing = rows if kept is None else rows[~kept[1][rows]]
        if len(missing):
            new = forward._sensitivity(subset(forward.train_, missing))  # [r'] or [r', M]
            if kept is None:
                n = len(forward.train_)
                kept = self._sensitivities[key] = (new.new_zeros(n, *new.shape[1:]), torch.zeros(n, dtype=torch.bool))
            kept[0][missing], kept[1][missing] = new, True
        return key

    @property
    def sensitivities_computed_(self) -> int:
        """Training points whose sensitivities the shortlists computed on demand (0 after an eager fit)."""
        return max((int(done.sum()) for _, done in self._sensitivities.values()), default=0)

    def recall(self, queries: DataLike, k: int = 10, shortlist: int = 100, *, sample: int | None = 8,
               seed: int = 0, union: bool | None = None) -> Recall:
        """On ``sample`` random queries (all if None), the fraction of the full sweep's top-``k``
        that the shortlist's top-``k`` kept. Costs one full sweep per sampled query. Also ``recall_``."""
        qset = self.estimator._dataset(queries, "queries")
        n = len(qset)
        if sample is not None:
            check_positive("Retriever", "sample", sample, integer=True)
        pick = torch.arange(n) if sample is None or sample >= n else \
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].sort().values
        chosen = gather(qset, pick.tolist())
        full = self.estimator.top_k(chosen, k).indices
        short = self.top_k(chosen, k, shortlist, union=union).indices
        kept = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / full.shape[1] for a, b in zip(full, short)])
        self.recall_ = Recall(k=k, shortlist=shortlist, queries=pick, per_query=kept)
        return self.recall_

    def __repr__(self) -> str:
        return f"Retriever(source={self.source!r}, index={self.index!r})"


def _linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _is_classifier(estimator: Any) -> bool:
    from forwardinf.tasks.classification import ClassificationTask

    return isinstance(estimator.task, ClassificationTask)


def _check_classifier(estimator: Any, layer: str | None, source: str) -> None:
    if not _is_classifier(estimator):
        raise ValueError(f"Retriever: source={source!r} needs a ClassificationTask (softmax cross-entropy on "
                         f"logits [B, C]), got {type(estimator.task).__name__}; use source='features' or 'directions'")
    if layer is None and not _linears(estimator.model):
        raise ValueError(f"Retriever: source={source!r} needs an nn.Linear (the model has none)")


def _auto_source(estimator: Any, layer: str | None) -> str:
    """``"head-grad"`` for a classifier whose head takes ``[B, D]`` inputs (tried on one training
    point), else ``"features"`` when there is a layer to read, else ``"directions"``."""
    if _is_classifier(estimator) and _linears(estimator.model):
        try:
            head = Head.of(estimator.model, layer)
            head_factors(estimator, head, subset(estimator.train_, torch.zeros(1, dtype=torch.long)), 1)
            return "head-grad"
        except ValueError:
            pass  # e.g. a sequence head, or layer= not an nn.Linear: the features need neither
    return "features" if layer is not None or _linears(estimator.model) else "directions"


def _last_linear(model: nn.Module) -> str:
    names = _linears(model)
    if not names:
        raise ValueError("Retriever: source='features' needs layer= (the model has no nn.Linear)")
    return names[-1]



def shortlist_top_k(estimator: Estimator, queries: DataLike, k: int, shortlist: int) -> TopK:
    """``estimator.top_k(queries, k, shortlist=K)`` of ForwardINF / TailForwardINF."""
    return Retriever.of(estimator).top_k(queries, k, shortlist)
