"""The contract every estimator follows: ``fit`` / ``influence`` / ``top_k`` / ``self_influence``.

Also the frozen per-estimator configuration (:class:`EstimatorConfig`, kronfluence's pattern: every
constructor keyword in one dataclass with ``to_dict`` and named presets, checked when the
estimator is built and read-only on it) and what an estimator declares it can do
(:class:`Capabilities`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from forwardinf.core.params import device_of
from forwardinf.data.checks import check_data
from forwardinf.data.inputs import DataLike, as_dataset
from forwardinf.estimators.validation import changed_weights, finite_scores, weights_fingerprint
from forwardinf.storage.topk import RunningTopK, TopK, concat_topk
from forwardinf.tasks.base import Task
from forwardinf.tasks.classification import ClassificationTask

C = TypeVar("C", bound="EstimatorConfig")
E = TypeVar("E", bound="Estimator")
TRAIN_CHUNK = 8192  # training points scored at once by the streaming top_k


class NotFittedError(RuntimeError):
    """Raised when an estimator is used before ``fit``."""


class StaleFitError(NotFittedError):
    """Raised when the model's parameters or buffers changed since ``fit``: what ``fit`` cached
    (base losses, gradients, features) belongs to other weights. Call ``fit`` again."""


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """The one error message for a bad parameter."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected one of {allowed}")


def check_positive(owner: str, name: str, value: Any, integer: bool = False) -> None:
    """``value`` must be a finite number > 0 (an int if ``integer``)."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        kind = "a positive integer" if integer else "a finite positive number"
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected {kind}")


def check_range(owner: str, name: str, value: Any, low: float, high: float, integer: bool = False,
                why: str = "") -> None:
    """``value`` must be a finite number (an int if ``integer``) in ``[low, high]``; ``why`` ends the message."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected {kind} in [{low}, {high}]{why}")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What an estimator can do beyond ``fit`` / ``influence`` / ``top_k``.

    indices: ``influence(queries, indices=...)`` scores only those training positions (from the
        fit on the whole set); ``top_k`` then streams over training chunks.
    shardable: a training point's score does not depend on the rest of the training set, so a
        copy fitted on a slice scores that slice as the fit on the whole set would
        (:func:`forwardinf.distributed.score_to_store`, ``forwardinf score``).
    self_influence: what ``self_influence()`` means; None when the estimator has none.
    """

    indices: bool = False
    shardable: bool = False
    self_influence: str | None = None


@dataclass(frozen=True, kw_only=True)
class EstimatorConfig:
    """Base of the frozen configuration of an estimator: every constructor keyword, one field each.

    Values are stored as given and checked when an estimator is built with them (``ValueError``
    naming the field and what it accepts), and again by ``fit``. ``PRESETS`` maps a recipe's name
    to the fields it sets.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """``{field: value}`` for every field (values as given, not copied)."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def check_names(cls, owner: str, names: Iterable[str]) -> None:
        """Raise ``TypeError`` naming any of ``names`` that is not a field (and the fields)."""
        unknown = sorted(set(names) - set(cls.names()))
        if unknown:
            raise TypeError(f"{owner}: unexpected keyword(s) {unknown}; expected some of {cls.names()}")

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``; an unknown name raises ``TypeError`` naming the known ones."""
        self.check_names(type(self).__name__, changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls: type[C], name: str, **overrides: Any) -> C:
        """The named recipe (``PRESETS[name]``) with ``overrides``."""
        check_choice(cls.__name__, "preset", name, cls.PRESETS)
        return cls().replace(**{**cls.PRESETS[name], **overrides})

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults."""
        default = type(self)()
        return {k: v for k, v in self.to_dict().items() if not _same(v, getattr(default, k))}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (RuntimeError, TypeError, ValueError):  # tensors, arrays
        return a is b


class Estimator:
    """Base class: scores are ``[n_query, n_train]``, higher = more influential (proponent).

    Subclasses declare their settings as a ``Config`` (an :class:`EstimatorConfig`; every
    estimator of the library has one), do their work in ``_fit`` (learned state ends in ``_``;
    :meth:`fit` is the template that checks the settings and the training set first) and
    implement :meth:`influence`. Every knob is a keyword or ``config=`` (keywords override it);
    the configuration is checked on construction (``_check_params``) and read-only
    (``est.config``; its fields read as ``est.<name>``; assigning one raises
    ``AttributeError``): :meth:`with_config` gives an estimator with another one.
    ``capabilities`` says what else the estimator can do.

    Setting ``train_`` (what marks an estimator fitted) records a fingerprint of the model's
    parameters and buffers (:mod:`forwardinf.estimators.validation`); ``_check_fitted``, which
    ``influence`` / ``top_k`` / ``self_influence`` call first, raises :class:`StaleFitError` when
    they changed since.
    """

    Config: ClassVar[type[EstimatorConfig] | None] = None
    capabilities = Capabilities()
    # Configuration fields the fitted state depends on (with_config refits when one differs,
    # where the estimator reuses fits at all).
    fit_fields: ClassVar[tuple[str, ...]] = ()
    # influence / self_influence of every subclass refuse non-finite scores (ValueError naming the
    # query and training point) unless NaN is part of the estimator's documented answer.
    finite_scores: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("influence", "self_influence"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__wrapped_scores__", False):
                setattr(cls, name, finite_scores(method))

    def __init__(self, model: nn.Module, task: Task | None = None, config: EstimatorConfig | None = None,
                 **knobs: Any) -> None:
        self.model = model
        self.task = task if task is not None else ClassificationTask()
        cls = type(self)
        if cls.Config is None:
            if config is not None or knobs:
                raise TypeError(f"{cls.__name__} takes no configuration keywords, got {sorted(knobs) or 'config'}")
            return
        cls.Config.check_names(cls.__name__, knobs)
        if config is None:
            config = cls.Config()
        elif not isinstance(config, cls.Config):
            if not isinstance(config, EstimatorConfig) or not set(config.names()) <= set(cls.Config.names()):
                raise TypeError(f"{cls.__name__}: config must be a {cls.Config.__name__}, got {type(config).__name__}")
            config = cls.Config(**config.to_dict())  # e.g. a ForwardINFConfig for TailForwardINF
        object.__setattr__(self, "config", config.replace(**knobs) if knobs else config)
        self._check_params()  # every value checked now, not at fit or halfway through a run

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: the configuration's fields read as attributes.
        config = self.__dict__.get("config")
        if isinstance(config, EstimatorConfig) and name in config.names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # Settings are read-only: a setting changed after fit would silently mix with state fitted
        # under the old one (all-zero scores after est.lr = 0, an unchecked est.score = "bogus").
        cls = type(self)
        if cls.Config is not None and (name == "config" or name in cls.Config.names()):
            how = "config" if name == "config" else f"est.config.replace({name}=...)"
            raise AttributeError(f"{cls.__name__}: settings are read-only ({name}); est.with_config({how}) gives "
                                 "an estimator with the new setting, fitted like this one if it was fitted")
        object.__setattr__(self, name, value)
        if name == "train_" and isinstance(self.__dict__.get("model"), nn.Module):
            object.__setattr__(self, "weights_fingerprint_", weights_fingerprint(self.model))

    def with_config(self: E, config: EstimatorConfig) -> E:
        """A new estimator of this kind, on the same model and task, with ``config``.

        If this one is fitted, the new one is fitted on the same training set, reusing what this
        one cached that ``config`` does not change (e.g. Forward-INF's base losses); refused
        (:class:`StaleFitError`) if the model's weights changed since this one's fit.
        """
        new = type(self)(self.model, self.task, config=config)
        if not hasattr(self, "train_"):
            return new
        self._check_fitted()  # what new reuses must still match the model
        return new._fit_like(self)

    def _fit_like(self: E, other: "Estimator") -> E:
        """Fit on ``other``'s training set (subclasses reuse ``other``'s caches where they can)."""
        return self.fit(other.train_)

    # -- contract -------------------------------------------------------------------
    def fit(self: E, train: DataLike) -> E:
        """Fit on ``train`` (``n_train`` examples); returns self.

        The template every estimator follows: check the settings again (the model may have
        changed since construction), check and store the training set (:meth:`_load_train`, which
        marks the estimator fitted as ``train_``), then :meth:`_fit` does the estimator's own work
        and ``fitted_config_`` records the settings it was done under. A fit that fails leaves
        the estimator unfitted, never half-fitted on the new data.
        """
        self._check_params()
        self.__dict__.pop("train_", None)
        dataset = self._load_train(train)
        self.train_ = dataset
        try:
            self._fit(dataset)
        except BaseException:
            self.__dict__.pop("train_", None)
            raise
        self.fitted_config_ = self.__dict__.get("config")
        return self

    def _fit(self, train: Any) -> None:
        """The estimator's own fitting on the checked training dataset ``train`` (``self.train_``)."""
        raise NotImplementedError

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` scores, or ``[n_train]`` for the query set as a whole (``joint``)."""
        raise NotImplementedError

    def self_influence(self) -> Tensor:
        """``[n_train]`` influence of each training point on itself."""
        raise NotImplementedError(f"{type(self).__name__} has no self-influence")

    def top_k(self, queries: DataLike, k: int = 10, *, chunk: int | None = None, shortlist: int | None = None) -> TopK:
        """The ``k`` highest-scoring training points per query, best first (``indices``,
        ``scores`` ``[n_query, k]``), and the ``k`` lowest, lowest first (``opponents``,
        ``opponent_scores``); equal scores in training-index order, exactly as a stable sort of
        :meth:`influence` (``torch.topk`` leaves the order of ties unspecified).

        When the estimator scores slices (``capabilities.indices``) the training set is scored
        ``chunk`` points at a time (default 8192) into a running top-k: memory
        ``[n_query, chunk]``, never ``[n_query, n_train]``.

        ``shortlist=K`` (Forward-INF): score only the ``K`` training points nearest to each query
        in a retrieval index (:class:`forwardinf.estimators.shortlist.Retriever`: the last one made
        for this fit, else an in-memory one); ``K >= n_train`` equals the full sweep.
        """
        name = type(self).__name__
        if shortlist is not None:
            return self._shortlist_top_k(queries, k, shortlist)
        check_positive(name, "k", k, integer=True)
        if chunk is not None:
            check_positive(name, "chunk", chunk, integer=True)
        running: dict[int, RunningTopK] = {}
        for q0, start, block in self._score_blocks(queries, chunk or TRAIN_CHUNK):
            running.setdefault(q0, RunningTopK(block.shape[0], k)).update(block, start)
        return concat_topk([running[q0].result() for q0 in sorted(running)])

    def _shortlist_top_k(self, queries: DataLike, k: int, shortlist: int) -> TopK:
        raise TypeError(f"{type(self).__name__} has no shortlist path (ForwardINF and TailForwardINF have)")

    def _score_blocks(self, queries: DataLike, chunk: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(first query, first training position, scores [q, b])`` blocks covering the matrix."""
        if not self.capabilities.indices:
            yield 0, 0, self.influence(queries)
            return
        self._check_fitted()
        qset = self._dataset(queries, "queries")
        n, block = len(self.train_), self._row_block()
        step = math.ceil(chunk / block) * block  # chunks on block boundaries: bit-identical to a whole sweep
        for start in range(0, n, step):
            yield 0, start, self.influence(qset, indices=torch.arange(start, min(start + step, n)))

    def _row_block(self) -> int:
        """Training points an estimator scores together (its batch): ``top_k``'s chunks start on
        multiples of it, so their scores are those of ``influence`` to the bit."""
        return 1

    # -- helpers for subclasses -----------------------------------------------------
    def _check_params(self) -> Any:
        """Check every setting (and what it needs of the model); ``ValueError`` naming the bad one.

        Called on construction and again by ``fit`` (the model may have changed in between)."""

    def _check_fitted(self) -> None:
        """``NotFittedError`` before ``fit``; :class:`StaleFitError` if the model's parameters or
        buffers changed since (one checksum pass over them, see :mod:`~forwardinf.estimators.validation`)."""
        if not hasattr(self, "train_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(train) before influence()")
        before = self.__dict__.get("weights_fingerprint_")
        changed = changed_weights(before, self.model) if before is not None else []
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise StaleFitError(f"{type(self).__name__}: the model's weights changed since fit ({shown}), so what fit "
                                "computed from them is stale; call fit(train) again")

    def _device(self) -> torch.device:
        return device_of(self.model) if self.model is not None else torch.device("cpu")

    def _dataset(self, data: DataLike, name: str) -> Any:
        return as_dataset(data, name)

    # -- the input check -------------------------------------------------------------
    def _load_train(self, train: DataLike) -> Any:
        """``train`` as a dataset, checked by :meth:`_load` against the model (none for the
        retraining estimators: their models come later). Its per-example shapes become ``shapes_``,
        which the queries must match."""
        self.__dict__.pop("shapes_", None)
        return self._load(train, "train", self.model)

    def _load(self, data: DataLike, name: str, model: nn.Module | None = None) -> Any:
        """``data`` as a dataset, refused with a ``ValueError`` naming ``name`` and the problem
        (:func:`~forwardinf.data.checks.check_data`, batch by batch): empty, non-finite values,
        per-example shapes that change or differ from the training data's (``shapes_``) and, with a
        ``model``, what the task refuses (labels out of range) or inputs the model cannot run on.
        The one input check of the estimators (the Forward-INF ones run its batch check,
        :func:`~forwardinf.data.checks.check_batch`, on each batch as their sweeps read it); the
        first call records ``shapes_``."""
        dataset = as_dataset(data, name)
        batch_size = getattr(self, "batch_size", None)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            batch_size = 1024  # e.g. "auto": only how many examples each check looks at once
        shapes = check_data(dataset, name, model, self.task if model is not None else None,
                            self.__dict__.get("shapes_"), batch_size)
        self.__dict__.setdefault("shapes_", shapes)
        return dataset

    def __repr__(self) -> str:
        config = self.__dict__.get("config")
        if isinstance(config, EstimatorConfig):
            shown = config.changed()
        else:
            shown = {k: v for k, v in vars(self).items()
                     if not k.endswith("_") and not k.startswith("_") and k not in ("model", "task")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def check_indices(owner: str, indices: Any, n: int) -> Tensor | None:
    """``indices`` (training positions) as a checked ``[k]`` long tensor; None means all ``n``."""
    if indices is None:
        return None
    idx = torch.as_tensor(indices)
    if idx.ndim != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{owner}: indices must be a non-empty 1-D sequence of integer training positions, "
                         f"got shape {tuple(idx.shape)} of {idx.dtype}")
    idx = idx.long()
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"{owner}: indices must lie in [0, {n}) (the fitted training set), "
                         f"got {int(idx.min())}..{int(idx.max())}")
    return idx
