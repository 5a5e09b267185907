"""Forward-INF: unlearn the queries on a functional copy, then score the training set by forward passes."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from forwardinf.core.autobatch import DEFAULT_BUDGET, auto_batch_size
from forwardinf.core.curvature import FISHERS, SCOPES, gauss_newton_product, kfac, layer_of, precondition, refine
from forwardinf.core.directions import gaussian, gaussian_pieces
from forwardinf.core.embedding_grad import query_grads
from forwardinf.core.grad_norms import squared_grad_norms
from forwardinf.core.params import Params, bind, buffers_of, flat_norm, mode, select_params, stack
from forwardinf.core.sweep import sweep
from forwardinf.core.tangent import directional_sweep
from forwardinf.core.update import OPTIMIZERS, Update, UpdateRule
from forwardinf.data.checks import check_batch, check_finite_values
from forwardinf.data.inputs import DataLike, batch_len, batches, gather, repeat, subset, take, to_device, unsqueeze
from forwardinf.estimators.base import (Capabilities, Estimator, EstimatorConfig, check_choice, check_indices,
                                        check_positive, check_range)
from forwardinf.estimators.validation import DivergedError, check_scores
from forwardinf.estimators.shortlist import shortlist_top_k
from forwardinf.memory import trim_heap
from forwardinf.tasks.base import Task



@dataclass(frozen=True)
class ScoreKind:
    """What a ``score`` setting means. ``measure``: the task's value compared on the training
    points (``"loss"``, or ``"score_loss"``, the non-saturating margin); ``objective``: what the
    update ascends on the queries (the mean ``"score_loss"``, which does not underflow once
    fitted, or the task's ``"query_loss"``); ``finish``: how the change ``Δm [Q, n]`` becomes the
    score (``"signed"``: the change, ``"magnitude"``: its absolute value, ``"per_unit"``: per unit
    step along ``d₀``, ``"cosine"``: the gradients' cosine, from the sensitivities cached in fit)."""

    measure: str
    objective: str
    finish: str


SCORE_KINDS: dict[str, ScoreKind] = {
    "cosine": ScoreKind("score_loss", "score_loss", "cosine"),
    "margin": ScoreKind("score_loss", "score_loss", "signed"),
    "loss": ScoreKind("loss", "query_loss", "signed"),
    "abs": ScoreKind("loss", "query_loss", "magnitude"),
    "influence": ScoreKind("loss", "score_loss", "per_unit"),
}
SCORES = tuple(SCORE_KINDS)
DIFFERENCES = ("auto", "tangent", "finite")
SENSITIVITIES = ("exact", "directions")

PRESETS: dict[str, dict[str, Any]] = {
    # What the library recommends: one normalised ascent step, change of the non-saturating
    # margin divided by each training point's sensitivity (estimated once, in fit).
    "default": dict(steps=1, lr=1e-3, optimizer="nsgd", score="cosine"),
    # The paper's recipe (section 3): one Adam ascent step, lr 5e-3, raw change of the loss.
    "paper": dict(steps=1, lr=5e-3, optimizer="adam", score="loss"),
    # The authors' leakage notebook: as "paper", but the update runs in train mode on the query
    # duplicated into a batch of two, fitted queries are perturbed first, and |change| is ranked.
    "authors": dict(steps=1, lr=5e-3, optimizer="adam", score="abs", train_mode=True, query_repeat=2,
                    fitted_fallback=True),
    # Table 7 / group influence: plain SGD ascent with weight decay, two iterations.
    "group": dict(steps=2, lr=0.01, optimizer="sgd", weight_decay=1e-3, score="loss"),
    # Counterfactual fidelity ("what would change if these points were removed"): one small
    # K-FAC-preconditioned ascent step on the query's margin, then each training loss's change
    # per unit step: to first order the influence function g_iᵀ (G + λI)⁻¹ g_q, with the
    # training set seen by one batched backward pass (the factors) and forward passes only.
    # damping: 0.5 x the mean eigenvalue of the whole K-FAC curvature, one global value (chosen on
    # two digits seeds held apart from the LDS evaluation: benchmarks/results/lds_tuning.md, lds.md).
    "counterfactual": dict(steps=1, lr=1e-4, optimizer="kfac", score="influence", damping=0.5, fisher="empirical"),
}


@dataclass(frozen=True, kw_only=True)
class ForwardINFConfig(EstimatorConfig):
    """Every knob of :class:`ForwardINF` (see its docstring); ``ForwardINFConfig.preset("paper")``
    is a named recipe of :data:`PRESETS`. Frozen: ``cfg.replace(lr=...)`` gives another one."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    steps: int = 1
    lr: float = 1e-3
    optimizer: str = "nsgd"
    direction: str = "ascent"
    score: str = "cosine"
    params: str | Iterable[str] | None = None
    train_mode: bool = False
    query_repeat: int = 1
    fitted_fallback: bool = False
    momentum: float = 0.0
    weight_decay: float = 0.0
    sensitivity: str = "exact"
    n_directions: int = 16
    difference: str = "auto"
    damping: float = 0.5
    damping_scope: str = "global"
    fisher: str = "empirical"
    eigencorrect: bool = False
    refine: int = 0
    batch_size: int | str = "auto"
    query_chunk: int | str = "auto"
    seed: int = 0
    progress: bool = False


class ForwardINF(Estimator):
    """Forward-INF (Mirrored Influence Hypothesis) training-data attribution.

    For each query ``q`` a functional copy of the parameters ``θ`` is updated ``steps`` times on
    ``q`` (gradient ascent by default: unlearning), giving ``θ_q``; each training point ``z_i`` then
    scores ``m(θ_q, z_i) - m(θ, z_i)`` where ``m`` is the task's loss (``score="loss"``, the paper)
    or its non-saturating relative ``task.score_loss`` (``"margin"``, ``"cosine"``). ``m(θ, z_i)``
    is computed once in :meth:`fit`. Backward passes touch only the queries.

    ``score="influence"`` ascends the query's margin and returns each training *loss* change per
    unit step, ``Δℓ_i ||d₀|| / ||θ_q - θ||`` (``d₀``: the first update direction before step-size
    scaling). With ``optimizer="kfac"`` (``d₀ = (G + λI)⁻¹ ∇m_q``, ``G`` the K-FAC curvature of the
    mean training loss from :mod:`forwardinf.core.curvature`) this is, to first order in ``lr``,
    the influence function ``∇ℓ_iᵀ (G + λI)⁻¹ ∇m_q``: the score that predicts retraining (preset
    ``"counterfactual"``).

    ``score="cosine"`` (default) divides each change by ``||θ_q - θ||`` and by the training point's
    sensitivity ``s_i = ||∇m(θ, z_i)||``, computed once in ``fit`` (``sensitivity``). For a small
    step this is the cosine between the query's and the training point's gradients, so an exact
    duplicate scores 1 and high-loss "hub" points no longer dominate every ranking. Per query,
    the training set still sees forward passes only.

    Args (all keyword):
        steps: K, number of update steps on the queries.
        lr: step size; for ``optimizer="nsgd"`` relative to ``||θ||`` (1e-3 moves θ by 0.1%).
        optimizer: ``"nsgd"`` (normalised gradient), ``"sgd"``, ``"adam"``, or ``"kfac"``
            (normalised K-FAC-preconditioned gradient; Linear and Conv2d parameters only).
        direction: ``"ascent"`` (unlearn the queries, the paper's default) or ``"descent"``.
        score: ``"cosine"``, ``"margin"``, ``"loss"`` (signed change), ``"abs"`` (its magnitude),
            ``"influence"`` (loss change per unit step, see above).
        params: None for all trainable parameters, or name patterns (``"fc.*"``, ``"layer4"``).
        train_mode: run the update in train mode (BatchNorm batch statistics; running statistics
            drift as in the authors' code). Default False: eval mode, statistics frozen.
        query_repeat: each query is repeated this many times in its update batch.
        fitted_fallback: the authors' trick: a query with loss < 0.01 is perturbed by Gaussian
            noise of growing L2 radius (from 3.0, x1.1) until its loss is above 0.01.
        momentum, weight_decay: for ``"sgd"``/``"nsgd"`` (weight decay also for Adam).
        damping: for ``"kfac"``: ``λ`` as a multiple of the mean eigenvalue of the whole
            block-diagonal curvature (scale-free; :mod:`forwardinf.core.curvature`); > 0.
        damping_scope: for ``"kfac"``: whose mean eigenvalue ``damping`` multiplies: ``"global"``
            (all layers, default), ``"type"`` (the layers of the same type: convolutions, linear),
            ``"layer"`` (each layer's own).
        fisher: for ``"kfac"``: ``"empirical"`` (the given targets; any task) or ``"sampled"``
            (targets drawn from the model's softmax; classification). The factors are ``curvature_``.
        eigencorrect: for ``"kfac"``: EK-FAC (George et al. 2018): one more batched sweep replaces
            the Kronecker eigenvalues by the mean squared example gradient in their eigenbasis.
        refine: for ``"kfac"``: iterations of preconditioned conjugate gradients on the exact
            Gauss-Newton system ``(G + λI) d = ∇m_q`` (K-FAC as preconditioner and first guess;
            :func:`~forwardinf.core.curvature.refine`), each one more sweep over the training set
            with a backward pass shared by the chunk's queries. 0 (default): K-FAC alone.
        sensitivity: how ``fit`` gets each training point's ``||∇m(θ, z_i)||`` (``score="cosine"``
            and :meth:`self_influence`). ``"exact"`` (default): its gradient's norm, from one
            forward and backward pass per batch of training points, in closed form for linear
            layers and embeddings and from materialized per-example gradients for the rest
            (:mod:`~forwardinf.core.grad_norms`); measured 2-7 inference sweeps on transformers
            (5 on a 135M language model) and 3 on CNNs, once. ``"directions"``: estimated from
            forward-mode derivatives along ``n_directions`` random Gaussian directions, forward
            passes only, about ``2 * n_directions`` sweeps (one per direction when a copy of the
            parameters exceeds the budget), with a relative error of about ``1/sqrt(n_directions)``
            on the part of the gradient orthogonal to the update.
        n_directions: the random directions of ``sensitivity="directions"`` (and of shortlists with
            ``source="directions"``).
        difference: how each training point's change ``m(θ_q, z_i) - m(θ, z_i)`` is computed.
            ``"finite"``: as that difference of two float32 sweeps (the paper's); a small step
            changes a well-fitted point's loss by less than float32 resolves, so many scores are
            exactly 0 or multiples of a few quanta. ``"tangent"``: the exact first-order change
            ``∇m(θ, z_i)·(θ_q - θ)``, a forward-mode directional derivative (``torch.func.jvp``;
            still forward passes only, one per batch shared by the chunk's queries), with no
            cancellation. ``"auto"`` (default): ``"tangent"`` for a single straight step
            (``steps=1``, ``"sgd"``/``"nsgd"``/``"kfac"``, eval mode), where first order is what the
            score stands for (the counterfactual score *is* the first-order influence); else
            ``"finite"`` (Adam's and multi-step updates move far enough to differ from first order).
        batch_size: training examples per forward batch, or ``"auto"`` (default): the largest batch
            up to 512 whose activations, times the models in flight at once (the forward-mode
            tangents of the cosine score; the stacked query models off CPU), fit 256 MiB. The
            batch used is ``batch_size_``.
        query_chunk: queries updated and scored at once, or ``"auto"`` (default): as many as keep
            their parameter copies (one each for forward-mode scores: ``θ_q - θ``; about three
            otherwise) within 256 MiB, 1 to 16;
            a full 135M-parameter model takes one at a time.
        seed: seeds the random directions and the fallback noise.
        progress: show progress bars.
    """

    Config = ForwardINFConfig
    _shortlist_top_k = shortlist_top_k  # top_k(..., shortlist=K): forwardinf.estimators.shortlist

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: ForwardINFConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`ForwardINFConfig`), or ``config=`` (keywords override it)."""
        super().__init__(model, task, config, **knobs)

    @classmethod
    def preset(cls, name: str, model: nn.Module, task: Task | None = None, **overrides: Any) -> "ForwardINF":
        """A named recipe: ``"default"``, ``"paper"``, ``"authors"``, ``"group"`` or ``"counterfactual"`` (``PRESETS``)."""
        return cls(model, task, config=cls.Config.preset(name), **overrides)

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return forward_inf_capabilities(self.optimizer)

    # -- fit --------------------------------------------------------------------------------
    def fit(self, train: DataLike, *, lazy: bool = False) -> "ForwardINF":
        """Cache ``m(θ, z_i)`` (and sensitivities for ``score="cosine"``) for every training point.

        The base's template (check, load, :meth:`_fit`). ``lazy``: leave the cache to first use
        instead; a shortlist (``top_k(..., shortlist=K)``) then computes the sensitivities of its
        candidates only (:mod:`forwardinf.estimators.shortlist`).
        """
        self._lazy_fit = lazy
        return super().fit(train)

    def _load_train(self, train: DataLike) -> Any:
        return self._dataset(train, "train")  # each batch is checked by the base sweep that reads it

    def _fit(self, train: Any) -> None:
        self._cache_: dict[tuple, Any] = {}
        self.batch_size_ = self._resolve_batch_size()
        self._prepare(self._lazy_fit)

    def _fit_like(self, other: Estimator) -> "ForwardINF":
        """Fitted on ``other``'s training set, sharing its cache (entries are keyed by what they depend on)."""
        if not isinstance(other, ForwardINF) or other.model is not self.model or other.task is not self.task:
            return self.fit(other.train_)
        self._check_params()
        self.train_, self._cache_ = other.train_, other._cache_
        self.batch_size_ = self._resolve_batch_size()
        if self.batch_size == "auto" == other.batch_size:  # the fitted batch if it fits this configuration's budget
            self.batch_size_ = min(self.batch_size_, other.batch_size_)
        return self._prepare()

    def _prepare(self, lazy: bool = False) -> "ForwardINF":
        if not lazy:
            if not (self.kind_.finish == "cosine" and self.tangent_ and self.sensitivity == "exact"):
                self._base(self.kind_.measure)  # (forward-mode changes subtract no base value; the norms' sweep checks the data)
            if self.kind_.finish == "cosine":
                self._base("sensitivity")
        self.curvature_ = self._curvature() if self.optimizer == "kfac" else None
        return self

    def _curvature(self) -> list:
        """K-FAC blocks of the mean training loss (one batched forward + backward sweep, cached)."""
        def compute() -> list:
            with mode(self.model, False):
                return kfac(self.model, self.task.loss, select_params(self.model, self.params), self.train_,
                            self.batch_size_, self._device(), fisher=self.fisher, correct=self.eigencorrect,
                            seed=self.seed, progress=self.progress)

        return self._cached(("kfac", _key(self.params), self.fisher, self.eigencorrect, self.seed), compute)

    @property
    def base_losses_(self) -> Tensor:
        """``[n_train]`` losses of the unchanged model, ``m(θ, z_i)``."""
        self._check_fitted()
        return self._base("loss")

    def _cached(self, key: tuple, compute: Any) -> Any:
        """``compute()`` once per ``key`` and batch size (sweeps in other batches may differ in the last bit)."""
        key = (*key, self.batch_size_)
        if key not in self._cache_:
            self._cache_[key] = compute()
        return self._cache_[key]

    def _base(self, kind: str) -> Tensor:
        """Cached values of the unchanged model on the training set: ``[n_train]`` for ``"loss"`` /
        ``"score_loss"``, ``[n_train, n_directions]`` for ``"directional"``, and for
        ``"sensitivity"`` whichever of the squared gradient norms ``[n_train]`` or the directional
        derivatives ``sensitivity`` asks for (:meth:`_sensitivity`)."""
        if kind == "directional":
            return self._cached(self._directional_key(), self._directional)
        if kind == "sensitivity":
            return self._cached(self._sensitivity_key(), self._sensitivity)
        return self._cached((kind,), lambda: self._sweep_base(kind))

    def _sensitivity_key(self) -> tuple:
        """Cache key of :meth:`_sensitivity`'s values (``_cached`` adds the batch size)."""
        if self.sensitivity == "exact":
            return ("squared norm", _key(self.params))
        return self._directional_key()

    def _sensitivity(self, data: Any = None) -> Tensor:
        """What the cosine score divides by, for every training point (``data``'s when given):
        ``[n]`` squared norms ``||∇m(θ, z_i)||²`` (``sensitivity="exact"``) or ``[n, n_directions]``
        directional derivatives (``"directions"``, :meth:`_directional`)."""
        if self.sensitivity == "directions":
            return self._directional(data)
        params, buffers = select_params(self.model, self.params), buffers_of(self.model)

        def objective(p: Params, example: Any) -> Tensor:
            return self.task.score_loss(bind(self.model, p, buffers), unsqueeze(example)).sum()

        plan = self._cached(("norm plan", _key(self.params)), dict)  # kept: the closed form is checked once

        def norms(batch: Any) -> Tensor:
            self._validate(batch, "train")  # every batch: a bad label may hide anywhere (a forward of one example)
            return squared_grad_norms(objective, params, batch, self.model, DEFAULT_BUDGET, plan)

        with mode(self.model, False):
            out = sweep(norms, self.train_ if data is None else data, self.batch_size_, self._device(),
                        self.progress, desc="gradient norms")
        check_finite_values(out, "train", "gradient norm")  # or NaN cosine scores for that point
        return out

    def _large(self) -> bool:
        """Whether one copy of the selected parameters exceeds the memory budget (a 135M model):
        then the heap is trimmed around each query's update and scoring (:func:`~forwardinf.memory.trim_heap`)."""
        return self._params_bytes() > DEFAULT_BUDGET

    def _params_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in select_params(self.model, self.params).values())

    def _squared_norms(self) -> Tensor:
        """``[n_train]``: ``||∇m(θ, z_i)||²``, exact or estimated as ``sensitivity`` says."""
        values = self._base("sensitivity")
        return values if values.ndim == 1 else values.pow(2).mean(1)

    def _directional_key(self) -> tuple:
        """Cache key of the ``[n_train, n_directions]`` derivatives (``_cached`` adds the batch size)."""
        return ("directional", _key(self.params), self.seed, self.n_directions)

    def _sweep_base(self, kind: str) -> Tensor:
        fn = getattr(self.task, kind)

        def checked(batch: Any) -> Tensor:
            self._validate(batch, "train")  # every batch: a bad label may hide anywhere
            return fn(self.model, batch)

        with mode(self.model, False):
            values = sweep(checked, self.train_, self.batch_size_, self._device(), self.progress, desc=f"base {kind}")
        check_finite_values(values, "train", kind)
        return values

    def _directional(self, data: Any = None) -> Tensor:
        """``[n_train, n_directions]``: ``∇m(θ, z_i)·v_j`` for fixed Gaussian directions ``v_j``
        (of ``data``'s points instead of the training set's when given: a query's gradient sketch).

        Forward-mode derivatives (``jvp``), so the training set still sees forward passes only.
        """
        params = select_params(self.model, self.params)
        n_chunks = math.ceil(self.n_directions / self._direction_chunk())
        columns = []
        with mode(self.model, False):
            for chunk in range(n_chunks):
                columns.append(directional_sweep(self.task.score_loss, self.model, params, buffers_of(self.model),
                                                 self._directions(params, chunk), self.train_ if data is None else data, self.batch_size_,
                                                 self._device(), self.progress, desc=f"directions {chunk + 1}/{n_chunks}"))
        out = torch.cat(columns, 0).T.contiguous()
        check_finite_values(out, "train", "directional derivative")  # or NaN cosine scores for that point
        return out

    def _directions(self, params: Params, chunk: int) -> Params:
        """Directions ``8 chunk ..`` of the fixed Gaussian sequence: ``{name: [m, *shape]}``."""
        return dict(self._iter_directions(params, chunk))

    def _iter_directions(self, params: Params, chunk: int) -> Iterator[tuple[str, Tensor]]:
        """The same directions, ``(name, [m, *shape])`` one parameter tensor at a time."""
        drawn = ((k, v) for k, _, _, v in self._draws(params, chunk, whole=True))
        if not self._keeps_directions(params, chunk):
            yield from drawn  # a large model: drawn again at each use, one parameter tensor at a time
            return
        # small enough to keep: drawn once, not again for every query's cosine (_score per query)
        yield from self._cached(("directions", _key(self.params), self.seed, self._direction_chunk(), chunk),
                                lambda: list(drawn))

    def _in_chunk(self, chunk: int) -> int:
        """``m``, the number of directions in chunk ``chunk``."""
        return min(self._direction_chunk(), self.n_directions - chunk * self._direction_chunk())

    def _keeps_directions(self, params: Params, chunk: int) -> bool:
        """Whether chunk ``chunk``'s directions are small enough to cache (all m of them, whole)."""
        size = sum(p.numel() * p.element_size() for p in params.values())
        return self._in_chunk(chunk) * size <= _PIECEWISE_BYTES

    def _direction_pieces(self, params: Params, chunk: int) -> Iterator[tuple[str, slice, int, Tensor]]:
        """``(name, directions, start, values [d, k])``: entries ``start .. start + k`` of those
        directions of the chunk, flattened; a large tensor (see :meth:`_draws`) in pieces."""
        if self._keeps_directions(params, chunk):
            return ((k, slice(None), 0, v.flatten(1)) for k, v in self._iter_directions(params, chunk))
        return ((k, rows, start, v.flatten(1)) for k, rows, start, v in self._draws(params, chunk, whole=False))

    def _draws(self, params: Params, chunk: int, whole: bool) -> Iterator[tuple[str, slice, int, Tensor]]:
        """Directions ``8 chunk ..`` of the fixed Gaussian sequence, ``(name, directions, start,
        values)`` per parameter tensor, ``values [m, *shape]``. One whose ``m`` directions' values
        exceed :data:`_PIECEWISE_BYTES` is drawn in pieces (:mod:`~forwardinf.core.directions`: the same
        numbers): assembled when ``whole`` (the fit's tangents), else yielded one piece at a time as
        ``values [1, k]`` (the cosine's projections: no ``[m, *shape]`` tensor for a large embedding)."""
        m = self._in_chunk(chunk)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + chunk)
        for k, p in params.items():
            if m * p.numel() * 4 <= _PIECEWISE_BYTES:  # one draw, as ever
                yield k, slice(None), 0, torch.randn((m, *p.shape), generator=gen).to(p.device, p.dtype)
            elif whole:
                yield k, slice(None), 0, gaussian(gen, m, tuple(p.shape)).to(p.device, p.dtype)
            else:
                for j, start, values in gaussian_pieces(gen, m, tuple(p.shape)):
                    yield k, slice(j, j + 1), start, values.to(p.device, p.dtype)[None]

    def _cosine(self, delta: Tensor, moved: Params, sensitivity: Tensor) -> Tensor:
        """``[Q, n]`` cosine between each ``∇m(θ, z_i)`` and each update ``moved[q] = θ_q - θ``.

        ``delta [Q, n]``: the change of ``m`` per point; ``sensitivity``: the points' cached
        ``[n]`` squared gradient norms, or ``[n, M]`` forward-mode derivatives along the fixed
        directions (:meth:`_sensitivity`).

        ``a = Δm / ||θ_q - θ||`` is the gradient's component along the update (from the sweep), and
        the cosine is ``a / max(||∇m_i||, |a|)`` (``|a|`` exceeds the norm only by float rounding,
        or by the higher orders of a finite step). From directions, only the orthogonal rest
        ``||∇m_i||² - a²`` is estimated, with each direction projected off the update first: a
        duplicate of the query has no orthogonal rest and scores 1 whatever the estimator's noise.
        """
        norm = flat_norm(moved, stacked=True).double().cpu().clamp_min(1e-30)  # [Q]
        out = torch.empty(delta.shape, dtype=torch.float32)
        if sensitivity.ndim == 1:
            for s in range(0, delta.shape[1], _COSINE_BLOCK):  # [Q, block] float64 temporaries, not [Q, N]
                a = delta[:, s:s + _COSINE_BLOCK].double() / norm[:, None]
                squared = sensitivity[None, s:s + _COSINE_BLOCK].double()
                out[:, s:s + _COSINE_BLOCK] = a / torch.maximum(squared, a.pow(2)).sqrt().clamp_min(1e-30)
            return out
        params = select_params(self.model, self.params)
        b = torch.zeros(delta.shape[0], 0, dtype=torch.float64)
        device = next(iter(moved.values())).device
        for chunk in range(math.ceil(self.n_directions / self._direction_chunk())):
            # float32 dot products (~1e-5 relative error), float64 after: float64 copies of the
            # [Q, ...] updates would cost twice the parameters' memory per query. The directions
            # come one parameter tensor at a time (m x the whole model would not fit a large one),
            # a large tensor in pieces.
            dots = torch.zeros(delta.shape[0], self._in_chunk(chunk), dtype=torch.float64, device=device)
            for k, rows, start, v in self._direction_pieces(params, chunk):
                dots[:, rows] += (moved[k].flatten(1)[:, start:start + v.shape[1]] @ v.T).double()
            b = torch.cat([b, dots.cpu() / norm[:, None]], 1)  # [Q, M]: v_j · unit update
        m, b2 = sensitivity.shape[1], b.pow(2).sum(1, keepdim=True)
        for s in range(0, delta.shape[1], _COSINE_BLOCK):
            j = sensitivity[s:s + _COSINE_BLOCK].double()  # [block, M]
            a = delta[:, s:s + _COSINE_BLOCK].double() / norm[:, None]
            perp = (j.pow(2).sum(1)[None, :] - 2 * a * (b @ j.T) + a.pow(2) * b2) / m
            out[:, s:s + _COSINE_BLOCK] = a / (a.pow(2) + perp.clamp_min(0)).sqrt().clamp_min(1e-30)
        return out

    # -- influence --------------------------------------------------------------------------
    def influence(self, queries: DataLike, joint: bool = False, indices: Any = None) -> Tensor:
        """Scores ``[n_query, n]`` (one update per query) or ``[n]`` (``joint``: one update on all).

        ``indices``: training positions ``[n]`` to score (default: all ``n_train``). Only those
        points are swept; their base values come from the fit, so a large pool is fitted once
        and each query scores its own candidates (e.g. a retrieval shortlist).
        """
        self._check_fitted()
        rows_of = check_indices(type(self).__name__, indices, len(self.train_))
        qset = self._queries(queries)
        with self._divergence_named():
            if joint:
                return self._score(self._update_joint(qset), rows_of)[0]
            return torch.cat([block for _, _, block in self._blocks(qset, rows_of)], 0)

    def _queries(self, queries: DataLike) -> Any:
        qset = self._dataset(queries, "queries")
        batch = gather(qset, range(len(qset)))
        self._validate(batch, "queries")
        with mode(self.model, False):  # one forward sweep of the queries: a bad one is refused as such, not as lr's
            losses = sweep(partial(self.task.loss, self.model), qset, self.batch_size_, self._device(), False)
        check_finite_values(losses, "queries", "loss")
        return qset

    def _updates(self, qset: Any) -> Iterator[tuple[int, Update]]:
        """``(first query, update)`` for each chunk of ``query_chunk`` queries."""
        chunk = self._query_chunk()
        for start in range(0, len(qset), chunk):
            idx = range(start, min(start + chunk, len(qset)))
            if self._large():
                trim_heap()  # the last chunk's update and scoring freed hundreds of MB in glibc's heap
            yield start, self._update_each(gather(qset, idx), len(idx))

    def _score_blocks(self, queries: DataLike, chunk: int) -> Iterator[tuple[int, int, Tensor]]:
        """``top_k``'s blocks: :meth:`influence`'s own code path (:meth:`_blocks`), the training
        set in chunks of about ``chunk`` points."""
        self._check_fitted()
        qset = self._queries(queries)
        with self._divergence_named():
            yield from self._blocks(qset, None, chunk)

    def _blocks(self, qset: Any, rows: Tensor | None, chunk: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(first query, first training position, scores [q, b])``: one update per chunk of
        queries (:meth:`_updates`), scored (:meth:`_score`) on ``rows`` (None: every training
        point) at once, or, with ``chunk``, on the training set in chunks that start on batch
        boundaries: the very batches of a whole sweep, so every score is bit-identical to it.

        The one path of both :meth:`influence` and :meth:`top_k`: a subclass changes how queries
        become updates (``_queries``, ``_updates``, ``_update_joint``) or how an update is scored
        (``_score``), never one of the two entry points alone."""
        n = len(self.train_)
        step = None if chunk is None else math.ceil(chunk / self.batch_size_) * self.batch_size_
        for q0, update in self._updates(qset):
            for start in (0,) if step is None else range(0, n, step):
                block = self._score(update, rows if step is None else torch.arange(start, min(start + step, n)))
                check_scores(type(self).__name__, block)  # what top_k streams is checked as influence is
                yield q0, start, block
            del update  # else this chunk's update stays alive while the next one is computed

    @contextlib.contextmanager
    def _divergence_named(self) -> Iterator[None]:
        """A diverging update (non-finite parameters, gradients or losses) raised as
        :class:`DivergedError` naming the settings that caused it."""
        try:
            yield
        except DivergedError:
            raise
        except FloatingPointError as e:
            raise DivergedError(f"{type(self).__name__}: the query update diverged with lr={self.lr!r} "
                                f"(optimizer={self.optimizer!r}, steps={self.steps}): {e}. Lower lr (or steps)") from e

    def self_influence(self) -> Tensor:
        """``[n_train]``: higher = more self-influential (more suspicious, e.g. mislabeled), every score.

        ``||∇ℓ(θ, z_i)||² = (dℓ/dm)² ||∇m(θ, z_i)||²`` from the gradient norms that ``fit`` caches
        for ``score="cosine"`` (computed once on first call for the other scores; estimated from
        forward-mode derivatives with ``sensitivity="directions"``), with ``dℓ/dm = 1 - e^{-ℓ}``
        when the loss is the softplus of the margin, as for cross-entropy. This is TracIn's
        self-influence, and it has the same orientation whatever the score. The paper's self
        mode (D_tst = D_trn: one joint update on the whole training set, then each point's change)
        is ``influence(train, joint=True)``; its sign depends on the score and the model (low =
        little support from the rest of the data, for ``margin`` on digits), so it is not used here.
        """
        self._check_fitted()
        return self._self_sensitivity()

    def _self_sensitivity(self) -> Tensor:
        margin, loss = self._base("score_loss"), self._base("loss")
        slope = torch.ones_like(loss)
        if torch.allclose(torch.nn.functional.softplus(margin), loss, rtol=1e-4, atol=1e-6):
            slope = -torch.expm1(-loss)  # dℓ/dm = sigmoid(m) = 1 - e^{-ℓ} for ℓ = softplus(m)
        return slope.pow(2) * self._squared_norms()

    # -- the update -------------------------------------------------------------------------
    def _objective(self, model: Any, batch: Any) -> Tensor:
        if self.kind_.objective == "score_loss":
            # Same direction as the loss for one example, but no float32 underflow when fitted.
            return self.task.score_loss(model, batch).mean()
        return self.task.query_loss(model, batch)

    @property
    def kind_(self) -> ScoreKind:
        """What ``score`` means (:data:`SCORE_KINDS`)."""
        return SCORE_KINDS[self.score]

    def _rule(self) -> UpdateRule:
        pre = None
        if self.optimizer == "kfac":
            factors = self._curvature()
            pre = lambda g, stacked: precondition(factors, g, self.damping, stacked, self.damping_scope)  # noqa: E731
            if self.refine:
                pre = self._refined(factors)
        return UpdateRule(self.optimizer, self.lr, self.direction == "ascent", self.momentum, self.weight_decay,
                          precondition=pre, track=self.tangent_)

    def _refined(self, factors: list) -> Any:
        """``(grads, stacked) -> (G + λI)⁻¹ grads`` by ``refine`` CG iterations on the Gauss-Newton matrix."""
        params = {k: v.detach() for k, v in select_params(self.model, self.params).items()}

        def product(v: Params) -> Params:
            with mode(self.model, False):
                return gauss_newton_product(self.model, self.task.loss, params, self.train_, self.batch_size_,
                                            self._device(), v)

        def pre(g: Params, stacked: bool) -> Params:
            out = refine(factors, g if stacked else {k: v[None] for k, v in g.items()}, self.damping, self.refine, product)
            return out if stacked else {k: v[0] for k, v in out.items()}

        return pre

    @property
    def tangent_(self) -> bool:
        """Whether the changes are forward-mode derivatives (``difference``, ``"auto"`` resolved)."""
        if self.difference == "auto":
            return (self.steps == 1 and self.optimizer in ("sgd", "nsgd", "kfac") and not self.train_mode)
        return self.difference == "tangent"

    def _update_each(self, batch: Any, n: int) -> Update:
        """The :class:`~forwardinf.core.update.Update` of each of ``n`` queries, all at once."""
        device = self._device()
        batch = to_device(batch, device)
        params = select_params(self.model, self.params)
        buffers = buffers_of(self.model)
        if self.train_mode or self.fitted_fallback:
            return self._update_each_looped(batch, n, params, buffers)

        def objective(p: Params, example: Any) -> Tensor:
            return self._objective(bind(self.model, p, buffers), repeat(unsqueeze(example), self.query_repeat))

        rule, state = self._rule(), stack(params, n)
        # no_grad outside the transform: grad still differentiates the query objective, but no graph
        # to the model's unselected (requires_grad) parameters is kept, nor reaches the scores
        with torch.no_grad(), mode(self.model, False):
            for step in range(self.steps):
                grads = query_grads(objective, state, batch, self.model)  # vmap(grad(objective)), tied tables lean
                if self.tangent_ and step == self.steps - 1:
                    # the scores differentiate along θ_q - θ: θ_q itself is never formed, and the
                    # last step is computed in the gradients' memory (one parameter copy per query)
                    rule.delta(state, grads, stacked=True)
                    state = None
                else:
                    state = rule.step(state, grads, stacked=True)
        return Update(state, buffers, False, rule.state["direction_norm"], rule.state.get("displacement"))

    def _update_each_looped(self, batch: Any, n: int, params: Params, buffers: Params) -> Update:
        """One query at a time: train-mode BatchNorm mutates its own copy of the running statistics."""
        out_params, out_buffers, norms, moves = [], [], [], []
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        for i in range(n):
            example = repeat(unsqueeze(take(batch, i)), self.query_repeat)
            if self.fitted_fallback:
                example = self._perturb_if_fitted(example, params, buffers, gen)
            bufs = {k: b.clone() for k, b in buffers.items()}
            rule, p = self._rule(), params
            with torch.no_grad(), mode(self.model, self.train_mode):  # no_grad: as in _update_each
                for _ in range(self.steps):
                    # buffers are an argument, not a capture: train-mode BatchNorm updates them in place
                    g = grad(lambda q, b: self._objective(bind(self.model, q, b), example))(p, bufs)
                    p = rule.step(p, g, stacked=False)
            out_params.append(p)
            out_buffers.append(bufs)
            norms.append(rule.state["direction_norm"])
            moves.append(rule.state.get("displacement"))
        stacked = {k: torch.stack([p[k] for p in out_params]) for k in params}
        stacked_bufs = {k: torch.stack([b[k] for b in out_buffers]) for k in buffers}
        moved = {k: torch.stack([m[k] for m in moves]) for k in params} if self.tangent_ else None
        return Update(stacked, stacked_bufs, True, torch.stack(norms), moved)

    def _perturb_if_fitted(self, example: Any, params: Params, buffers: Params, gen: torch.Generator) -> Any:
        if not isinstance(example, (tuple, list)) or not torch.is_tensor(example[0]) or not example[0].is_floating_point():
            raise ValueError("fitted_fallback adds noise to the float inputs of (inputs, targets) batches; these "
                             "batches are not that (token ids, dict batches): leave fitted_fallback off")
        inputs, rest = example[0], tuple(example[1:])
        radius = 3.0
        with torch.no_grad(), mode(self.model, False):
            model = bind(self.model, params, buffers)
            candidate = example
            for _ in range(100):
                if self.task.query_loss(model, candidate) >= 0.01:
                    return candidate
                noise = torch.randn(inputs.shape, generator=gen).to(inputs)
                noise = noise * radius / noise.flatten(1).norm(dim=1).view(-1, *[1] * (inputs.ndim - 1))
                candidate = (inputs + noise, *rest)
                radius *= 1.1
        return candidate

    def _update_joint(self, qset: Any) -> Update:
        """One update on the whole query set (gradient of the mean objective, accumulated in batches)."""
        device = self._device()
        params = select_params(self.model, self.params)
        buffers = buffers_of(self.model)
        if self.train_mode:  # train-mode BatchNorm updates running statistics in place: use copies
            buffers = {k: b.clone() for k, b in buffers.items()}
        rule, p, n = self._rule(), params, len(qset)
        with torch.no_grad(), mode(self.model, self.train_mode):  # no_grad: as in _update_each
            for _ in range(self.steps):
                total = {k: torch.zeros_like(v) for k, v in params.items()}
                for _, b in batches(qset, self.batch_size_):
                    b = to_device(repeat(b, self.query_repeat) if self.query_repeat > 1 else b, device)
                    weight = batch_len(b) / (n * self.query_repeat)
                    g = grad(lambda q, bufs, data: self._objective(bind(self.model, q, bufs), data))(p, buffers, b)
                    total = {k: total[k] + weight * g[k] for k in total}
                p = rule.step(p, total, stacked=False)
        norm = rule.state["direction_norm"].reshape(1)
        moved = {k: v.unsqueeze(0) for k, v in rule.state["displacement"].items()} if self.tangent_ else None
        if self.train_mode:
            return Update({k: v.unsqueeze(0) for k, v in p.items()}, {k: b.unsqueeze(0) for k, b in buffers.items()},
                          True, norm, moved)
        return Update({k: v.unsqueeze(0) for k, v in p.items()}, buffers, False, norm, moved)

    # -- scoring ----------------------------------------------------------------------------
    def _score(self, update: Update, rows: Tensor | None = None) -> Tensor:
        """``[Q, n]`` scores of ``Q`` queries' updates against the cached base values.

        With ``update.moved`` (forward-mode scores, ``tangent_``) each change is the derivative
        along ``θ_q - θ``; else the difference of ``m`` at ``update.params`` and the cached
        ``m(θ, z_i)``. ``rows``: the training positions ``[n]`` to score (None: all of them).
        """
        params, buffers, stacked_buffers, moved = update.params, update.buffers, update.stacked_buffers, update.moved
        kind, score = self.kind_.measure, self.kind_
        fn = getattr(self.task, kind)
        base = select_params(self.model, self.params)
        for k, v in (params if moved is None else moved).items():
            if not _all_finite(v):
                raise FloatingPointError(f"non-finite parameter {k} after the update")

        def per_model(p: Params, b: Params, batch: Any) -> Tensor:
            return fn(bind(self.model, p, b), batch)

        def batch_scores(batch: Any) -> Tensor:
            if self._device().type == "cpu":
                # One updated model after another: on CPU, vmap's batched (grouped) convolutions
                # measured 1.6-2.5x slower per model than plain ones (SmallCNN, benchmarks/cost.md).
                n = next(iter(params.values())).shape[0]
                return torch.stack([per_model({k: v[q] for k, v in params.items()},
                                              {k: v[q] for k, v in buffers.items()} if stacked_buffers else buffers,
                                              batch) for q in range(n)])  # [Q, B]
            in_dims = (0, 0 if stacked_buffers else None, None)
            return vmap(per_model, in_dims=in_dims)(params, buffers, batch)  # [Q, B]

        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        with mode(self.model, False):
            train = self.train_ if rows is None else subset(self.train_, rows)
            if moved is not None:  # the exact first-order change, ∇m(θ, z_i)·(θ_q - θ)
                delta = directional_sweep(_tangent_measure(self.task, kind), self.model, base, buffers_of(self.model), moved, train,
                                          self.batch_size_, self._device(), self.progress, desc="score (tangent)",
                                          trim=self._large())
            else:
                delta = sweep(batch_scores, train, self.batch_size_, self._device(), self.progress, desc="score")
        if not torch.isfinite(delta).all():
            raise FloatingPointError("non-finite loss on the training set after the update (diverging update: lower lr or steps)")
        if moved is None:
            delta = delta - pick(self._base(kind))
        move = (lambda: moved) if moved is not None else (lambda: {k: params[k] - base[k] for k in params})
        sign = 1.0 if self.direction == "ascent" else -1.0
        if score.finish == "magnitude":
            return delta.abs()
        if score.finish == "per_unit":  # Δℓ per unit step along d₀: θ moved by ||θ_q - θ|| / ||d₀|| units
            step = flat_norm(move(), stacked=True).double().cpu()
            per_unit = update.direction_norm.double().cpu() / step.clamp_min(1e-30)
            return (sign * delta.double() * per_unit[:, None]).float()
        if score.finish == "cosine":
            return sign * self._cosine(delta, move(), pick(self._base("sensitivity")))
        return sign * delta

    # -- tuning -----------------------------------------------------------------------------
    def tune(self, queries: DataLike, targets: Tensor | Iterable[int], *, lrs: Iterable[float] | None = None,
             steps: Iterable[int] | None = None, scores: Iterable[str] | None = None) -> ForwardINFConfig:
        """The configuration (``lr``, ``steps`` and ``score`` picked from a grid) under which each
        query's known proponent ranks first; this estimator is left as it is.

        ``targets [n_query]``: the training index that should rank first for each query (e.g. the
        training point the query duplicates, as in the paper's 20% tuning split). Ties are broken by
        mean rank. The grid's results are in ``tune_results_``. Use the result with
        ``est.with_config(cfg)`` (reuses the cached base values) or ``ForwardINF(model, task, config=cfg)``.
        """
        self._check_fitted()
        targets = torch.as_tensor(list(targets) if not torch.is_tensor(targets) else targets, dtype=torch.long)
        qset = self._dataset(queries, "queries")
        if len(targets) != len(qset):
            raise ValueError(f"tune: {len(targets)} targets for {len(qset)} queries")
        if (targets < 0).any() or (targets >= len(self.train_)).any():
            raise ValueError(f"tune: targets must be training indices in [0, {len(self.train_)})")
        lrs = list(lrs) if lrs is not None else _lr_grid(self.optimizer, self.lr)
        steps = list(steps) if steps is not None else sorted({1, 3, self.steps})
        scores = list(scores) if scores is not None else list(SCORES)
        results = []
        for sc in scores:
            for k in steps:
                for lr in lrs:
                    trial = self.with_config(self.config.replace(lr=lr, steps=k, score=sc))
                    try:
                        s = trial.influence(qset)
                    except FloatingPointError:
                        continue
                    target_scores = s.gather(1, targets[:, None])
                    ranks = (s >= target_scores).sum(1)  # ties count against it (metrics.target_ranks)
                    results.append({"score": sc, "steps": k, "lr": lr,
                                    "top1": float((ranks == 1).float().mean()), "mean_rank": float(ranks.float().mean())})
        if not results:
            raise FloatingPointError("tune: every setting diverged; try smaller learning rates")
        best = max(results, key=lambda r: (r["top1"], -r["mean_rank"]))
        self.tune_results_ = results
        return self.config.replace(lr=best["lr"], steps=best["steps"], score=best["score"])

    # -- checks -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        check_values(type(self).__name__, self.config)
        chosen = select_params(self.model, self.params)  # raises if the patterns match nothing
        if self.optimizer == "kfac":
            layer_of(self.model, chosen)  # raises for parameters K-FAC does not cover

    def _resolve_batch_size(self) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        probe = gather(self.train_, range(min(8, len(self.train_))))
        self._validate(probe, "train")  # bad labels or shapes get their clear error before the probe runs
        probe = to_device(probe, self._device())
        n_models = 1
        if self.kind_.finish == "cosine" and self.sensitivity == "directions":
            n_models = 2 * min(self._direction_chunk(), self.n_directions)  # primal + tangents
        if self.tangent_:  # the score's forward-mode sweep: one primal, query_chunk tangents
            n_models = max(n_models, 1 + self._query_chunk())
        if self._device().type != "cpu":  # scored under vmap, all query_chunk models at once
            n_models = max(n_models, self._query_chunk())
        with mode(self.model, False):
            return auto_batch_size(self.model, self.task, probe, n_models=n_models, max_batch=512, name="train")

    def _direction_chunk(self) -> int:
        """Directions per forward-mode sweep: 8, fewer when 8 copies of the selected parameters (the
        tangents) would exceed the memory budget (one at a time for a full 135M-parameter model)."""
        return int(max(1, min(_DIRECTION_CHUNK, DEFAULT_BUDGET // max(self._params_bytes(), 1))))

    def _query_chunk(self) -> int:
        """``query_chunk``, resolved: for ``"auto"`` the queries whose updates fit the budget. Each
        query holds one copy of the selected parameters when the scores are forward-mode derivatives
        (``θ_q - θ``, computed in its gradient's memory), else about three (its gradient, ``θ_q``
        and the temporaries of a multi-step or Adam update)."""
        if self.query_chunk != "auto":
            return self.query_chunk
        copies = 1 if self.tangent_ else 3
        return int(max(1, min(16, DEFAULT_BUDGET // max(copies * self._params_bytes(), 1))))

    def _validate(self, batch: Any, name: str) -> None:
        check_batch(self.model, self.task, batch, name)


_DIRECTION_CHUNK = 8
# a chunk's directions up to this size are cached whole; a tensor whose m directions exceed it is
# drawn in pieces (forwardinf.core.directions) wherever it need not exist whole
_PIECEWISE_BYTES = DEFAULT_BUDGET // 4
MAX_DIRECTIONS = 1024  # n_directions above this is refused: cost grows linearly, accuracy as 1/sqrt


def check_values(name: str, c: ForwardINFConfig) -> None:
    """``ValueError`` naming the first setting of ``c`` out of its range (the model is not needed)."""
    check_positive(name, "steps", c.steps, integer=True)
    check_positive(name, "lr", c.lr)
    check_choice(name, "optimizer", c.optimizer, OPTIMIZERS)
    check_choice(name, "direction", c.direction, ("ascent", "descent"))
    check_choice(name, "score", c.score, SCORES)
    check_choice(name, "difference", c.difference, DIFFERENCES)
    check_choice(name, "sensitivity", c.sensitivity, SENSITIVITIES)
    if c.difference == "tangent" and c.train_mode:
        raise ValueError(f"{name}: difference='tangent' differentiates along the parameters alone, but "
                         "train_mode=True also moves BatchNorm's running statistics; use difference='finite'")
    if c.optimizer == "kfac":
        check_choice(name, "fisher", c.fisher, FISHERS)
        check_choice(name, "damping_scope", c.damping_scope, SCOPES)
        if c.refine and c.damping_scope != "global":
            raise ValueError(f"{name}: refine solves (G + λI) d = g with one λ; it needs damping_scope='global'")
        if (not isinstance(c.damping, (int, float)) or isinstance(c.damping, bool)
                or not math.isfinite(c.damping) or c.damping <= 0):
            raise ValueError(f"{name}: damping={c.damping!r}; expected a finite number > 0 (relative to the "
                             "mean curvature eigenvalue; 0.5 is the counterfactual preset's)")
    check_positive(name, "query_repeat", c.query_repeat, integer=True)
    check_range(name, "n_directions", c.n_directions, 1, MAX_DIRECTIONS, integer=True,
                why=f" (fit takes 2 forward sweeps per direction; {MAX_DIRECTIONS} estimate each sensitivity to ~2%)")
    if not isinstance(c.momentum, (int, float)) or isinstance(c.momentum, bool) or not 0 <= c.momentum < 1:
        raise ValueError(f"{name}: invalid momentum={c.momentum!r}; expected a number in [0, 1)")
    check_range(name, "weight_decay", c.weight_decay, 0, math.inf)
    if c.batch_size != "auto":
        check_positive(name, "batch_size", c.batch_size, integer=True)
    if c.query_chunk != "auto":
        check_positive(name, "query_chunk", c.query_chunk, integer=True)
    for flag in ("train_mode", "fitted_fallback", "progress"):
        if not isinstance(getattr(c, flag), bool):
            raise ValueError(f"{name}: invalid {flag}={getattr(c, flag)!r}; expected True or False")
    if not isinstance(c.seed, int) or isinstance(c.seed, bool):
        raise ValueError(f"{name}: invalid seed={c.seed!r}; expected an integer")


def forward_inf_capabilities(optimizer: str) -> Capabilities:
    """Forward-INF's capabilities; K-FAC factors come from the whole training set, so a copy
    fitted on a slice would score it differently: not shardable."""
    return Capabilities(indices=True, shardable=optimizer != "kfac",
                        self_influence="||∇ℓ(z_i)||² (exact, or from forward-mode derivatives along random "
                                       "directions with sensitivity='directions'), every score; higher = more suspicious (the paper's joint self mode: "
                                       "influence(train, joint=True))")


def _key(params: Any) -> Any:
    """``params`` (None, a pattern or patterns) as a hashable cache-key part."""
    return params if params is None or isinstance(params, str) else tuple(params)


def _tangent_measure(task: Task, kind: str) -> Any:
    """``task``'s measure ``kind`` in the form to differentiate. A classifier's cross-entropy is
    ``softplus(score_loss)``, the same function; but ``F.cross_entropy``'s derivative carries
    ``p_y - 1``, which float32 rounds to 0 once ``p_y > 1 - 6e-8`` (a well-fitted point), while
    softplus's is ``sigmoid(score_loss)``, accurate down to ~1e-38. Only for the task's own loss."""
    from forwardinf.tasks.classification import ClassificationTask

    if kind == "loss" and getattr(type(task), "loss", None) is ClassificationTask.loss:
        return lambda model, batch: torch.nn.functional.softplus(task.score_loss(model, batch))
    return getattr(task, kind)


_COSINE_BLOCK = 8192  # training points per block of the cosine's float64 arithmetic


def _all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` in pieces of 2**20 values: on the whole tensor it briefly takes
    ~1.5x the tensor's size (an absolute-value copy and two masks: +170 MB for a 135M model's embedding)."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(2**20))


def _lr_grid(optimizer: str, lr: float) -> list[float]:
    return [lr * f for f in (0.1, 0.3, 1.0, 3.0, 10.0)]
