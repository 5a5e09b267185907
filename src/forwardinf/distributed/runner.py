"""Fill a score store block by block, on one process or across torchrun ranks, then merge.

The work unit is a training shard: a rank prepares the shard once (for Forward-INF: fits the
estimator on it, caching ``m(θ, z_i)`` and the directional derivatives of just those points), then
writes one block per query block. Shards are dealt round robin to ranks; blocks already on disk
are skipped, which is what makes a killed run resumable. After a barrier, rank 0 streams the
blocks into the final top-k.

Only estimators whose score for a training point does not depend on the rest of the training
set can be sharded this way: those that declare ``capabilities.shardable`` (Forward-INF and its
tail-only mode without K-FAC, TracIn). Influence functions, whose Hessian is fitted on the whole
training set, cannot: :func:`score_to_store` refuses them when there is more than one shard.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from forwardinf.data.inputs import DataLike, as_dataset
from forwardinf.distributed.context import DistContext, init_distributed
from forwardinf.distributed.sharding import shard_dataset, shards_of_rank
from forwardinf.storage.manifest import config_of, fingerprint_data, fingerprint_module, make_manifest
from forwardinf.storage.store import ScoreStore

logger = logging.getLogger(__name__)


class BlockScorer(Protocol):
    """What the runner needs: per-shard preparation, then one ``[Qb, Ns]`` block per query block."""

    def prepare_shard(self, start: int, stop: int) -> Any: ...

    def score_block(self, state: Any, q_start: int, q_stop: int) -> Tensor | np.ndarray: ...


class EstimatorBlocks:
    """A :class:`BlockScorer` from any estimator following the ``fit``/``influence`` contract.

    Each shard gets a shallow copy of ``estimator`` fitted on that shard only; each query block
    is scored with ``influence`` on those queries. The template itself is never fitted.
    """

    def __init__(self, estimator: Any, train: Dataset, queries: Dataset) -> None:
        self.estimator = estimator
        self.train = train
        self.queries = queries

    def prepare_shard(self, start: int, stop: int) -> Any:
        return copy.copy(self.estimator).fit(shard_dataset(self.train, start, stop))

    def score_block(self, state: Any, q_start: int, q_stop: int) -> Tensor:
        return state.influence(shard_dataset(self.queries, q_start, q_stop))


@dataclass
class FillStats:
    """What one rank did: blocks ``written`` now, blocks ``reused`` from an earlier run, ``seconds``."""

    written: int = 0
    reused: int = 0
    seconds: float = 0.0
    shards: list[int] = field(default_factory=list)


def fill_store(store: ScoreStore, scorer: BlockScorer, *, rank: int = 0, world_size: int = 1,
               progress: bool = False, on_block: Callable[[int, int], None] | None = None) -> FillStats:
    """Compute every missing block of this rank's shards (shard-major, so each shard is prepared once).

    ``on_block(qb, s)`` is called after each block is safely on disk.
    """
    stats = FillStats(shards=shards_of_rank(store.n_shards, rank, world_size))
    start = time.perf_counter()
    todo = store.missing(stats.shards)
    stats.reused = len(stats.shards) * store.n_query_blocks - len(todo)
    logger.info("rank %d: %d blocks of %s already on disk, %d to compute", rank, stats.reused, store.path, len(todo))
    with tqdm(total=len(todo), desc=f"blocks (rank {rank})", unit="block", disable=not progress) as bar:
        for s in stats.shards:
            blocks = [qb for qb, shard in todo if shard == s]
            if not blocks:
                continue
            state = scorer.prepare_shard(*store.shard_range(s))
            for qb in blocks:
                store.write(qb, s, scorer.score_block(state, *store.query_range(qb)))
                stats.written += 1
                bar.update(1)
                if on_block is not None:
                    on_block(qb, s)
            del state
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class ScoreRun:
    """Result of :func:`score_to_store`: the ``store``; ``indices``/``scores`` ``[n_query, k]`` of
    the merged top-k on rank 0 (None on the other ranks); this rank's :class:`FillStats`."""

    store: ScoreStore
    indices: Tensor | None
    scores: Tensor | None
    stats: FillStats
    rank: int = 0
    world_size: int = 1


def check_shardable(estimator: Any, n_train: int, shard_size: int) -> None:
    """Refuse an estimator that does not declare ``capabilities.shardable`` when ``n_train``
    points make more than one shard (a copy fitted on a shard would score it differently)."""
    if n_train <= shard_size or getattr(getattr(estimator, "capabilities", None), "shardable", False):
        return
    raise ValueError(f"{type(estimator).__name__} cannot be sharded: its scores of a training point depend on the "
                     f"rest of the training set (it does not declare capabilities.shardable), so fitting it on "
                     f"shards of {shard_size} of the {n_train} training points would change them; use a "
                     f"shard size of at least {n_train} (one shard) or a shardable estimator")


def store_manifest(estimator: Any, train: Dataset, queries: Dataset, *, shard_size: int,
                   query_block: int, extra_config: dict | None = None) -> dict:
    """The manifest a store of ``estimator``'s scores on ``train`` x ``queries`` must carry."""
    config = {**config_of(estimator), **(extra_config or {})}
    return make_manifest(model=fingerprint_module(estimator.model), train=fingerprint_data(train),
                         queries=fingerprint_data(queries), n_train=len(train), n_query=len(queries),
                         shard_size=shard_size, query_block=query_block, config=config)


def score_to_store(estimator: Any, train: DataLike, queries: DataLike, path: str | os.PathLike, *,
                   shard_size: int = 65536, query_block: int = 64, k: int = 10, overwrite: bool = False,
                   ctx: DistContext | None = None, scorer: BlockScorer | None = None,
                   extra_config: dict | None = None, progress: bool = False,
                   on_block: Callable[[int, int], None] | None = None) -> ScoreRun:
    """Score ``queries`` against ``train`` with ``estimator`` into the store at ``path``; merge the top-k.

    Works the same on one process and under ``torchrun`` (every rank calls it with the same
    arguments; shards are dealt round robin; rank 0 creates the store and merges). Blocks
    already in a matching store are reused, so calling it again after a crash finishes the job;
    a store made from another model, data or configuration raises ``StoreMismatchError``.

    Args:
        estimator: an unfitted template (e.g. ``fi.ForwardINF(model, task, ...)``); each shard is
            scored by a copy fitted on that shard only.
        shard_size: training examples per shard (memory per rank grows with it, not with N).
        query_block: queries per block (scored in one pass over a shard).
        k: size of the merged top-k.
        ctx: the distributed context (default: :func:`init_distributed` from the environment).
        scorer: a custom :class:`BlockScorer` (default :class:`EstimatorBlocks`).
        extra_config: more configuration to record (and check) in the manifest.
    """
    for name, v in (("shard_size", shard_size), ("query_block", query_block), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"score_to_store: invalid {name}={v!r}; expected a positive integer")
    train_ds, query_ds = as_dataset(train, "train"), as_dataset(queries, "queries")
    if scorer is None:
        check_shardable(estimator, len(train_ds), shard_size)
    ctx = ctx or init_distributed()
    scorer = scorer or EstimatorBlocks(estimator, train_ds, query_ds)

    store: ScoreStore | None = None
    error: BaseException | None = None
    try:
        # Every rank fingerprints what it was given, so a rank with other data or weights is caught.
        manifest = store_manifest(estimator, train_ds, query_ds, shard_size=shard_size, query_block=query_block,
                                  extra_config=extra_config)
        if ctx.is_main:
            store = ScoreStore.create(path, manifest, overwrite=overwrite)
    except Exception as e:  # noqa: BLE001 - reported to every rank by agree()
        error = e
    ctx.agree(error)
    if not ctx.is_main:
        try:
            store = ScoreStore.open(path, manifest)
        except Exception as e:  # noqa: BLE001
            error = e
    ctx.agree(error)
    assert store is not None

    stats = FillStats()
    try:
        stats = fill_store(store, scorer, rank=ctx.rank, world_size=ctx.world_size,
                           progress=progress, on_block=on_block)
    except Exception as e:  # noqa: BLE001
        error = e
    ctx.agree(error)

    indices = scores = None
    if ctx.is_main:
        try:
            indices, scores = store.top_k(k)
            store.remove_stale_temporaries()  # every block is whole: a killed writer's leftovers go
        except Exception as e:  # noqa: BLE001
            error = e
    ctx.agree(error)
    return ScoreRun(store, indices, scores, stats, ctx.rank, ctx.world_size)
