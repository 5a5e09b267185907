"""Retraining ground truth: leave-one-out, leave-group-out, test-to-train, Downsampling (Feldman-Zhang).

Everything here retrains the user's model with the user's own recipe, a **training function**
(``TrainingRun(train_fn=...)``, :mod:`forwardinf.baselines.run`; the estimators take the run, or
the function alone)::

    def train_fn(data: torch.utils.data.Dataset, seed: int) -> torch.nn.Module: ...

- ``data`` holds the chosen training examples in order (a ``TensorDataset`` of the gathered
  tensors when the training set is one, else a ``torch.utils.data.Subset``);
  ``forwardinf.data.inputs.gather(data, range(len(data)))`` turns it into one batch.
- ``seed`` must fix every source of randomness (initialisation, shuffling): the same
  ``(data, seed)`` must give the same model, or caching and resuming make no sense.
- With ``workers > 1`` it runs in spawned worker processes, so it must be picklable: a
  module-level function, a ``functools.partial`` of one, or an instance of a module-level class
  (a lambda or a closure is not).

Trainings run in ``workers`` processes (``spawn`` context; ``workers=1`` runs them in this
process) with a progress bar, and each finished one is saved in ``cache_dir`` (one file per
training, named by a hash of the training function's configuration, the training set, the chosen
subset, the seed and the probe), so an interrupted run resumes where it stopped. Only point
``cache_dir`` at folders you trust when ``probe`` is None: the files are then pickled models.
With a probe (the experiments' case) they hold tensors and plain values, read with
``torch.load(weights_only=True)``, which runs no code.

Orientation: all estimators follow the library's "higher = more influential (proponent)" rule.
The paper's train-to-test influence ``Inf(D_i -> D_tst) = L(A(D), D_tst) - L(A(D \\ D_i), D_tst)``
is therefore returned negated by :class:`LeaveOneOut` (removing a proponent *raises* the query's
loss), and the test-to-train influence ``Inf(D_i <- D_tst) = L(A(D ∪ D_tst), D_i) - L(A(D), D_i)``
negated by :class:`TestToTrain`. Correlations between the two are unchanged.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from forwardinf.baselines.run import TrainFn, TrainingRun, legacy_run, training_function
from forwardinf.core.params import device_of, mode
from forwardinf.data.inputs import DataLike, as_dataset, batches, to_device
from forwardinf.estimators.base import Capabilities, Estimator, EstimatorConfig, check_choice, check_positive
from forwardinf.hashing import fingerprint, sha256_hex
from forwardinf.io import atomic_save
from forwardinf.tasks.base import Task

__all__ = [
    "TrainFn",
    "LossProbe",
    "AccuracyProbe",
    "fingerprint",
    "run_trainings",
    "process_map",
    "load_cached",
    "subset_of",
    "concat",
    "group_members",
    "group_mean",
    "LeaveOneOut",
    "LeaveGroupOut",
    "TestToTrain",
    "Downsampling",
    "RetrainingConfig",
    "LeaveOneOutConfig",
    "TestToTrainConfig",
    "DownsamplingConfig",
]

logger = logging.getLogger(__name__)

Job = tuple[Sequence[int], int]  # (positions in the pool, seed)

_CACHE_VERSION = "forwardinf-retraining-v1"


# ------------------------------------------------------------------------------------ probes
class LossProbe:
    """Per-example loss of a trained model on a fixed dataset: ``probe(model) -> Tensor [n]``.

    Keeps the model's floating dtype (a float64 model gives float64 losses: leave-one-out
    differences are tiny). Runs in eval mode and restores the model's mode.
    """

    def __init__(self, data: DataLike, task: Task | None = None, batch_size: int = 1024) -> None:
        from forwardinf.tasks.classification import ClassificationTask

        self.data = as_dataset(data, "probe data")
        self.task = task if task is not None else ClassificationTask()
        self.batch_size = batch_size

    def __call__(self, model: nn.Module) -> Tensor:
        device = device_of(model)
        out = []
        with torch.no_grad(), mode(model, False):
            for _, batch in batches(self.data, self.batch_size):
                out.append(self.task.loss(model, to_device(batch, device)).detach().cpu())
        return torch.cat(out)


class AccuracyProbe(LossProbe):
    """Per-example correctness (1.0 / 0.0) of a classifier on ``(inputs, targets)`` batches: ``[n]``."""

    def __call__(self, model: nn.Module) -> Tensor:
        device = device_of(model)
        out = []
        with torch.no_grad(), mode(model, False):
            for _, batch in batches(self.data, self.batch_size):
                batch = to_device(batch, device)
                inputs, targets = (batch["inputs"], batch["targets"]) if isinstance(batch, dict) else (batch[0], batch[1])
                out.append((model(inputs).argmax(-1) == targets).double().cpu())
        return torch.cat(out)


# ------------------------------------------------------------------------------- datasets
def subset_of(pool: Dataset, indices: Sequence[int]) -> Dataset:
    """The examples of ``pool`` at ``indices`` (in that order) as a dataset."""
    idx = np.asarray(indices, dtype=np.int64)
    if isinstance(pool, TensorDataset):
        t = torch.from_numpy(idx)
        return TensorDataset(*(x[t] for x in pool.tensors))
    return Subset(pool, idx.tolist())


def concat(first: Dataset, second: Dataset) -> Dataset:
    """``first`` followed by ``second`` (a ``TensorDataset`` when both are)."""
    if isinstance(first, TensorDataset) and isinstance(second, TensorDataset):
        if len(first.tensors) != len(second.tensors):
            raise ValueError("cannot concatenate datasets with different numbers of fields "
                             f"({len(first.tensors)} vs {len(second.tensors)})")
        parts = []
        for a, b in zip(first.tensors, second.tensors):
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(f"training and added examples differ in shape: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
            parts.append(torch.cat([a, b.to(a.dtype)]))
        return TensorDataset(*parts)
    return ConcatDataset([first, second])


def group_members(groups: Any, n: int) -> tuple[list[Any], list[np.ndarray]]:
    """``(ids, members)`` from a label per training point ``[n]`` or a list of index collections."""
    if hasattr(groups, "detach"):
        groups = groups.detach().cpu().numpy()
    arr = np.asarray(groups, dtype=object) if not isinstance(groups, np.ndarray) else groups
    if arr.ndim == 1 and len(arr) == n and not any(isinstance(g, (list, tuple, np.ndarray, set)) for g in arr):
        labels = np.asarray(groups)
        ids = sorted(set(labels.tolist()), key=lambda v: (str(type(v)), v))
        return ids, [np.flatnonzero(labels == g) for g in ids]
    members = [np.asarray(sorted(set(np.asarray(g, dtype=np.int64).tolist())), dtype=np.int64) for g in groups]
    for j, m in enumerate(members):
        if m.size == 0:
            raise ValueError(f"group {j} is empty")
        if m.min() < 0 or m.max() >= n:
            raise ValueError(f"group {j} holds index {int(m.max())} out of range for {n} training points")
    return list(range(len(members))), members


def group_mean(scores: Tensor, members: Sequence[np.ndarray]) -> Tensor:
    """Mean of ``scores [..., N]`` over each group's members -> ``[..., G]``."""
    return torch.stack([scores[..., torch.as_tensor(m)].mean(-1) for m in members], -1)


# ------------------------------------------------------------------------------ the engine
_WORKER: dict[str, Any] = {}


def _init_worker(fn: Callable[..., Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["fn"] = fn


def _call_worker(*args: Any) -> Any:
    return _WORKER["fn"](*args)


def process_map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int = 1) -> Iterator[tuple[int, Any]]:
    """``(i, fn(*jobs[i]))`` in the order they finish.

    ``workers == 1`` (or a single job) runs them here, one at a time. Otherwise in ``workers``
    spawned processes that each receive ``fn`` once (its data are pickled per worker, not per job)
    and share the CPU's threads. Closing the generator early (``break``) cancels the jobs not started.
    """
    if workers == 1 or len(jobs) <= 1:
        for i, args in enumerate(jobs):
            yield i, fn(*args)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(fn, threads))
    finished = False
    try:
        futures = {ex.submit(_call_worker, *args): i for i, args in enumerate(jobs)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
        finished = True
    finally:
        ex.shutdown(wait=finished, cancel_futures=not finished)


def load_cached(path: Path, *, weights_only: bool = True) -> Any:
    """The result saved at ``path``; None when there is none or it cannot be read (logged: the caller
    computes it again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=weights_only)
    except Exception as e:  # a damaged file
        logger.warning("unreadable cache file %s (%s); computing it again", path, e)
        return None


def _train_one(train_fn: TrainFn, pool: Dataset, probe: Any, indices: np.ndarray, seed: int) -> Any:
    model = train_fn(subset_of(pool, indices), int(seed))
    if not isinstance(model, nn.Module):
        raise TypeError(f"train_fn must return an nn.Module, got {type(model).__name__}")
    return probe(model) if probe is not None else model


def run_trainings(
    train_fn: TrainFn,
    pool: DataLike,
    jobs: Sequence[Job],
    probe: Callable[[nn.Module], Any] | None = None,
    *,
    workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    config: Any = None,
    progress: bool = False,
    desc: str = "retraining",
) -> list[Any]:
    """Train one model per job, in parallel and resumably; return ``probe(model)`` (or the model) per job.

    Args:
        train_fn: the training function (see the module docstring).
        pool: the examples jobs pick from (Dataset, DataLoader or tuple of tensors).
        jobs: ``(indices, seed)`` pairs: train on ``pool[indices]`` with ``seed``.
        probe: what to keep of each trained model, e.g. :class:`LossProbe`; None keeps the model.
            Keeping only a small probe result is what makes thousands of retrainings cheap to store.
        workers: worker processes (spawned); 1 trains in this process. Spawned workers re-import
            the main script, so a script calling this with ``workers > 1`` must guard its entry
            point with ``if __name__ == "__main__":`` (the ``forwardinf`` command does).
        cache_dir: folder for one file per finished training; None disables caching.
        config: what identifies ``train_fn``'s recipe in the cache key (default: ``train_fn``'s own
            content, see :func:`fingerprint`). Pass it when ``train_fn`` holds state that does not
            affect training.
        progress: show a progress bar.

    Returns a list aligned with ``jobs``.
    """
    check_positive("run_trainings", "workers", workers, integer=True)
    if not callable(train_fn):
        raise ValueError(f"train_fn must be callable as train_fn(data, seed) -> nn.Module, got {type(train_fn).__name__}")
    pool = as_dataset(pool, "training pool")
    n = len(pool)
    norm_jobs: list[tuple[np.ndarray, int]] = []
    for j, (indices, seed) in enumerate(jobs):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError(f"job {j} trains on an empty subset")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"job {j} picks index {int(idx.max())} out of range for a pool of {n}")
        norm_jobs.append((idx, int(seed)))

    results: list[Any] = [None] * len(norm_jobs)
    paths: list[Path | None] = [None] * len(norm_jobs)
    todo = list(range(len(norm_jobs)))
    if cache_dir is not None:
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        base = (_CACHE_VERSION + fingerprint(config if config is not None else train_fn)
                + fingerprint(pool) + fingerprint(probe))
        todo = []
        for j, (idx, seed) in enumerate(norm_jobs):
            paths[j] = cache / f"{sha256_hex(base, idx.tobytes(), f';seed={seed}', length=32)}.pt"
            # Probe results are tensors and plain values: loaded weights-only (a planted file runs no code).
            results[j] = load_cached(paths[j], weights_only=probe is not None)
            if results[j] is None:
                todo.append(j)
        logger.info("%s: %d of %d trainings found in %s", desc, len(norm_jobs) - len(todo), len(norm_jobs), cache)

    with tqdm(total=len(norm_jobs), initial=len(norm_jobs) - len(todo), desc=desc, disable=not progress,
              unit="model", leave=False) as bar:
        train_one = functools.partial(_train_one, train_fn, pool, probe)
        for i, result in process_map(train_one, [norm_jobs[j] for j in todo], workers):
            j = todo[i]
            results[j] = result
            if paths[j] is not None:
                atomic_save(result, paths[j])
            bar.update(1)
    return results


# --------------------------------------------------------------------------- the estimators
@dataclass(frozen=True, kw_only=True)
class RetrainingConfig(EstimatorConfig):
    """The knobs every retraining estimator has; ``run`` is its training run (``run.train_fn``)."""

    run: TrainingRun | None = None
    workers: int = 1
    cache_dir: str | os.PathLike | None = None
    batch_size: int = 1024
    progress: bool = False


@dataclass(frozen=True, kw_only=True)
class LeaveOneOutConfig(RetrainingConfig):
    """Every knob of :class:`LeaveOneOut` and :class:`LeaveGroupOut` (see their docstrings)."""

    groups: Any = None
    seeds: int | Sequence[int] = 1


@dataclass(frozen=True, kw_only=True)
class TestToTrainConfig(RetrainingConfig):
    """Every knob of :class:`TestToTrain` (see its docstring)."""

    __test__ = False  # not a pytest class despite the name

    seeds: int | Sequence[int] = 1


@dataclass(frozen=True, kw_only=True)
class DownsamplingConfig(RetrainingConfig):
    """Every knob of :class:`Downsampling` (see its docstring)."""

    n_models: int = 100
    fraction: float = 0.5
    metric: str = "loss"
    seed: int = 0


def retraining_run(owner: str, run: Any, config: Any, knobs: dict[str, Any]) -> Any:
    """The estimator configuration of a retraining estimator built as ``Cls(run, task, config=...,
    **knobs)``; ``run`` (a :class:`TrainingRun`, or a bare training function for
    ``TrainingRun(train_fn=...)``) goes into ``knobs``. The old ``train_fn=`` keyword and the old
    ``config=`` (the recipe's identity in cache keys, now ``TrainingRun.recipe``) still work, with a
    ``DeprecationWarning``."""
    if config is not None and not isinstance(config, EstimatorConfig):
        if isinstance(run, TrainingRun):
            raise TypeError(f"{owner}: config= is the estimator's configuration; name the training recipe with "
                            "TrainingRun(recipe=...)")
        knobs["run"] = legacy_run(owner, None, {"train_fn": knobs.pop("train_fn", run), "config": config})
        return None
    if "train_fn" in knobs:
        run = legacy_run(owner, run, {"train_fn": knobs.pop("train_fn")})
    if run is not None:
        knobs["run"] = run if isinstance(run, TrainingRun) else TrainingRun(train_fn=run)
    return config


class _Retraining(Estimator):
    """Shared plumbing: a training run's ``train_fn`` instead of a trained model."""

    Config: ClassVar[type[EstimatorConfig]] = RetrainingConfig

    def __init__(self, run: TrainingRun | TrainFn | None = None, task: Task | None = None, *,
                 config: EstimatorConfig | None = None, **knobs: Any) -> None:
        """``run``: the :class:`TrainingRun` (``run.train_fn`` retrains, ``run.recipe`` names it
        in cache keys) or a bare training function; every knob a keyword, or ``config=``."""
        config = retraining_run(type(self).__name__, run, config, knobs)
        super().__init__(None, task, config, **knobs)  # type: ignore[arg-type]

    def _check_params(self) -> None:
        name = type(self).__name__
        self._train_fn()
        check_positive(name, "workers", self.workers, integer=True)
        check_positive(name, "batch_size", self.batch_size, integer=True)
        if hasattr(self.config, "seeds"):
            self._seeds()

    def _train_fn(self) -> TrainFn:
        return training_function(type(self).__name__, self.run)

    def _seeds(self) -> list[int]:
        """``seeds`` as a list: ``0..R-1`` for a count, else the distinct integers given."""
        name = type(self).__name__
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            check_positive(name, "seeds", self.seeds, integer=True)
            return list(range(self.seeds))
        try:
            seeds = [int(s) for s in self.seeds]
        except (TypeError, ValueError):
            seeds = []
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"{name}: invalid seeds={self.seeds!r}; expected a positive count or distinct integers")
        return seeds

    def _run(self, pool: Dataset, jobs: Sequence[Job], probe: Any = None, desc: str = "retraining") -> list[Any]:
        return run_trainings(self._train_fn(), pool, jobs, probe, workers=self.workers, cache_dir=self.cache_dir,
                             config=self.run.recipe, progress=self.progress, desc=desc)

    def _losses(self, models: Sequence[nn.Module], data: Dataset) -> Tensor:
        """``[len(models), n]`` per-example losses."""
        probe = LossProbe(data, self.task, self.batch_size)
        return torch.stack([probe(m) for m in models]).double()


class LeaveOneOut(_Retraining):
    """Exact leave-one-out (or leave-group-out) influence by retraining.

    ``fit(train)`` trains ``A(D)`` and ``A(D \\ D_i)`` for every source ``D_i`` (a point, or a group
    with ``groups=``), once per seed, and keeps the models. ``influence(queries)`` then scores

        score[q, i] = mean_seeds L(A(D \\ D_i), q) - L(A(D), q)        ``[n_query, n_sources]``

    higher = removing ``D_i`` hurts ``q`` more = more influential (the paper's ``Inf(D_i -> q)``
    negated). Costs ``(n_sources + 1) * n_seeds`` trainings; for thousands of sources prefer
    :func:`run_trainings` with a :class:`LossProbe` so that only losses are kept.

    Args (``run``, ``task`` positional; the rest keywords, the fields of :class:`LeaveOneOutConfig`):
        run: the :class:`~forwardinf.baselines.run.TrainingRun` whose ``train_fn(data, seed) ->
            nn.Module`` retrains (module docstring), or that function alone.
        task: per-example loss (default: classification cross-entropy).
        groups: None (every training point is a source) or a group label per training point
            ``[n_train]`` or a list of index collections; sources are then the groups, in sorted
            label order (``group_ids_``), and scores are ``[n_query, n_groups]``.
        seeds: number of training runs averaged (seeds ``0..R-1``) or the seeds themselves.

    ``workers``, ``cache_dir`` (with ``run.recipe``) and ``progress``: see :func:`run_trainings`.
    """

    Config = LeaveOneOutConfig
    capabilities = Capabilities(self_influence="how much leaving D_i out raises its own mean loss: the diagonal "
                                               "of influence(train)")

    def _fit(self, train: Dataset) -> None:
        """Train the full model and every leave-out model (per seed)."""
        seeds = self._seeds()
        n = len(train)
        if self.groups is None:
            ids, members = list(range(n)), [np.array([i]) for i in range(n)]
        else:
            ids, members = group_members(self.groups, n)
        everyone = np.arange(n)
        jobs: list[Job] = []
        for m in members:
            keep = np.setdiff1d(everyone, m)
            if keep.size == 0:
                raise ValueError("a source covers the whole training set; nothing would be left to train on")
            jobs += [(keep, s) for s in seeds]
        # the full models first: they check the labels before the n leave-out trainings run
        self.base_models_ = self._run(train, [(everyone, s) for s in seeds], None, desc=type(self).__name__)
        self._load(train, "train", self.base_models_[0])
        models = self._run(train, jobs, None, desc=type(self).__name__)
        r = len(seeds)
        self.seeds_ = seeds
        self.group_ids_ = ids
        self.members_ = members
        self.left_out_models_ = [models[k * r: (k + 1) * r] for k in range(len(members))]

    def _deltas(self, data: Dataset) -> Tensor:
        """``[n_sources, n]``: mean over seeds of L(A(D \\ D_i), x) - L(A(D), x)."""
        base = self._losses(self.base_models_, data).mean(0)
        out = torch.stack([self._losses(ms, data).mean(0) for ms in self.left_out_models_])
        return out - base

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_sources]``, or ``[n_sources]`` for the mean loss over the queries (``joint``)."""
        self._check_fitted()
        deltas = self._deltas(self._load(queries, "queries", self.base_models_[0]))  # [S, Q]
        return deltas.mean(1) if joint else deltas.T.contiguous()

    def self_influence(self) -> Tensor:
        """``[n_sources]``: how much leaving ``D_i`` out raises its own (mean) loss."""
        self._check_fitted()
        base = self._losses(self.base_models_, self.train_).mean(0)
        out = []
        for m, ms in zip(self.members_, self.left_out_models_):
            own = subset_of(self.train_, m)
            out.append((self._losses(ms, own).mean(0) - base[torch.as_tensor(m)]).mean())
        return torch.stack(out)


class LeaveGroupOut(LeaveOneOut):
    """:class:`LeaveOneOut` over groups of training points; ``groups`` is required.

    Scores are ``[n_query, n_groups]`` (columns in ``group_ids_`` order); ``top_k`` returns group
    positions in that order.
    """

    def _check_params(self) -> None:
        super()._check_params()
        if self.groups is None:
            raise ValueError("LeaveGroupOut: groups is required (a label per training point or index lists)")


class TestToTrain(_Retraining):
    """Exact test-to-train influence: add the queries to the training set and retrain.

        score[q, i] = mean_seeds L(A(D), z_i) - L(A(D ∪ {q}), z_i)      ``[n_query, n_train]``

    higher = learning ``q`` lowers ``z_i``'s loss more (the paper's ``Inf(z_i <- q)`` negated;
    by the Mirrored Influence Hypothesis it ranks like :class:`LeaveOneOut`). ``joint=True``
    adds all queries at once (one retraining per seed) and returns ``[n_train]``. ``fit`` trains
    ``A(D)`` per seed and caches its training losses; each query costs one training per seed.
    The added examples must have the training examples' structure.
    """

    __test__ = False  # not a pytest class despite the name
    Config = TestToTrainConfig

    def _fit(self, train: Dataset) -> None:
        seeds = self._seeds()
        everyone = np.arange(len(train))
        probe = LossProbe(train, self.task, self.batch_size)
        base = self._run(train, [(everyone, s) for s in seeds], probe, desc="TestToTrain base")
        self.seeds_ = seeds
        self.base_losses_ = torch.stack(base).double().mean(0)  # [n_train]

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` (one retraining per query and seed) or ``[n_train]`` (``joint``)."""
        self._check_fitted()
        qset = self._load(queries, "queries")  # shapes and values (no trained model is kept to check labels)
        n, nq = len(self.train_), len(qset)
        pool = concat(self.train_, qset)
        everyone = np.arange(n)
        additions = [np.arange(n, n + nq)] if joint else [np.array([n + j]) for j in range(nq)]
        jobs = [(np.concatenate([everyone, a]), s) for a in additions for s in self.seeds_]
        probe = LossProbe(self.train_, self.task, self.batch_size)
        res = self._run(pool, jobs, probe, desc="TestToTrain")
        r = len(self.seeds_)
        added = torch.stack(res).double().view(len(additions), r, n).mean(1)  # [A, n]
        scores = self.base_losses_ - added
        return scores[0] if joint else scores


class Downsampling(_Retraining):
    """Downsampling / Feldman-Zhang: ``K`` models on random subsets of a fraction ``p`` of the data.

    With ``m_k(z)`` the metric of model ``k`` on ``z`` and ``S_k`` its training subset,

        infl(i, z) = mean_{k: i ∉ S_k} m_k(z) - mean_{k: i ∈ S_k} m_k(z)     for ``metric="loss"``
        infl(i, z) = mean_{k: i ∈ S_k} m_k(z) - mean_{k: i ∉ S_k} m_k(z)     for ``metric="accuracy"``

    (higher = including ``i`` helps ``z``). ``self_influence()`` evaluates it at ``z = z_i``: with
    ``metric="accuracy"`` that is Feldman's memorization estimate. Points that are in every subset
    or in none get NaN (raise ``n_models``). ``masks_`` ``[K, n_train]`` and :meth:`losses` feed
    :func:`forwardinf.metrics.lds` (pass ``-losses``).

    Args (``run`` as in :class:`LeaveOneOut`; the rest keywords, the fields of :class:`DownsamplingConfig`):
        n_models: K. fraction: p, the subset size as a fraction of the training set.
        metric: ``"loss"`` or ``"accuracy"`` (classification). seed: draws the subsets; model ``k``
            trains with seed ``seed + k``.
    """

    capabilities = Capabilities(self_influence="the in-vs-out contrast at z_i itself (Feldman's memorization with "
                                               "metric='accuracy'): the diagonal of influence(train)")
    finite_scores = False  # NaN marks points in every subset or in none (documented, and warned about in fit)

    Config = DownsamplingConfig

    def _check_params(self) -> None:
        super()._check_params()
        name = type(self).__name__
        check_positive(name, "n_models", self.n_models, integer=True)
        check_choice(name, "metric", self.metric, ("loss", "accuracy"))
        if not isinstance(self.fraction, (int, float)) or not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(f"{name}: invalid fraction={self.fraction!r}; expected a number in (0, 1)")

    def _fit(self, train: Dataset) -> None:
        from forwardinf.metrics import random_subsets

        name = type(self).__name__
        n = len(train)
        masks = random_subsets(n, self.n_models, float(self.fraction), seed=self.seed)
        jobs = [(np.flatnonzero(m), self.seed + k) for k, m in enumerate(masks)]
        self.models_ = self._run(train, jobs, None, desc=name)
        self._load(train, "train", self.models_[0])
        self.masks_ = torch.from_numpy(masks)
        counts = self.masks_.sum(0)
        if bool(((counts == 0) | (counts == self.n_models)).any()):
            warnings.warn(f"{name}: some training points are in every subset or in none; their influence is NaN "
                          "(use more models)", stacklevel=3)

    def _metric(self, data: Dataset) -> Tensor:
        """``[K, n]`` metric of every model on ``data``."""
        if self.metric == "loss":
            return self._losses(self.models_, data)
        probe = AccuracyProbe(data, self.task, self.batch_size)
        return torch.stack([probe(m) for m in self.models_]).double()

    def losses(self, queries: DataLike) -> Tensor:
        """``[K, n_query]`` loss of each subset model on each query."""
        self._check_fitted()
        return self._losses(self.models_, self._load(queries, "queries", self.models_[0]))

    def _contrast(self, values: Tensor) -> Tensor:
        """``values [K, Q]`` -> ``[Q, n_train]`` mean(in) - mean(out), oriented so higher = helps."""
        inside = self.masks_.double()  # [K, N]
        outside = 1.0 - inside
        n_in, n_out = inside.sum(0), outside.sum(0)
        mean_in = (values.T @ inside) / n_in  # [Q, N]; 0/0 -> NaN, masked below anyway
        mean_out = (values.T @ outside) / n_out
        diff = mean_out - mean_in if self.metric == "loss" else mean_in - mean_out
        bad = (n_in == 0) | (n_out == 0)
        return diff.masked_fill(bad, float("nan"))

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]``, or ``[n_train]`` for the mean metric over the queries (``joint``)."""
        self._check_fitted()
        values = self._metric(self._load(queries, "queries", self.models_[0]))
        if joint:
            values = values.mean(1, keepdim=True)
        scores = self._contrast(values)
        return scores[0] if joint else scores

    def self_influence(self) -> Tensor:
        """``[n_train]``: each point's influence on itself (memorization with ``metric="accuracy"``)."""
        self._check_fitted()
        return self._own(self._metric(self.train_), self.metric)

    def memorization(self) -> Tensor:
        """``[n_train]`` Feldman-Zhang memorization: P(correct on z_i | i in S) - P(correct on z_i | i not in S).

        Always measured with accuracy (classification ``(inputs, targets)`` data), whatever ``metric``.
        """
        self._check_fitted()
        probe = AccuracyProbe(self.train_, self.task, self.batch_size)
        return self._own(torch.stack([probe(m) for m in self.models_]).double(), "accuracy")

    def _own(self, values: Tensor, metric: str) -> Tensor:
        """``values [K, N]`` on the training points themselves -> ``[N]`` in-vs-out contrast."""
        inside = self.masks_.double()
        outside = 1.0 - inside
        own_in = (values * inside).sum(0) / inside.sum(0)
        own_out = (values * outside).sum(0) / outside.sum(0)
        diff = own_out - own_in if metric == "loss" else own_in - own_out
        counts = self.masks_.sum(0)
        return diff.masked_fill((counts == 0) | (counts == self.n_models), float("nan"))
