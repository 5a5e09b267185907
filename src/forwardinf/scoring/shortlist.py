"""``forwardinf score --shortlist K``: a retrieval index beside the score store, Forward-INF on each
query's ``K`` candidates, and the recall of the full sweep's top-k on a sample of queries.

No score store is written in this mode (the matrix is never computed): the index folder
(``OUT/index``, or beside ``--store``) holds the training vectors and the FAISS index, resumable
and refused when the model or the data changed (:mod:`forwardinf.storage.index`). Its source is
``Retriever``'s ``"auto"``: for a classifier the head-gradient re-ranker (``"head-grad"``, with its
per-point factors in ``index/factors/``), else the penultimate features.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from forwardinf.estimators.forward_inf import ForwardINF
from forwardinf.estimators.shortlist import Retriever


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--shortlist", type=int, default=None, metavar="K",
                   help="score only the K training points nearest to each query in a retrieval index (FAISS, "
                        "saved beside the store); default: the full sweep")
    g.add_argument("--recall-sample", type=int, default=4, metavar="N",
                   help="with --shortlist: on N sampled queries, how much of the full sweep's top-k the "
                        "shortlist kept (N full sweeps; 0 skips it; default 4)")


def score_shortlist(estimator: Any, train: Any, queries: Any, args: argparse.Namespace, ctx: Any,
                    store_path: Path) -> tuple[SimpleNamespace, dict]:
    """``(result with indices/scores [Q, k], method entry of results.json)`` of the shortlist run."""
    if ctx.world_size > 1:
        raise ValueError("--shortlist runs in one process (the index covers the whole training set); "
                         "drop torchrun or --shortlist")
    if args.shortlist < args.k:
        raise ValueError(f"--shortlist {args.shortlist} must be at least --k {args.k}")
    if args.recall_sample < 0:
        raise ValueError(f"--recall-sample must be >= 0, got {args.recall_sample}")
    # a lazy fit: the cosine score's sensitivities only for the candidates (a ForwardINF's fit option)
    estimator.fit(train, lazy=True) if isinstance(estimator, ForwardINF) else estimator.fit(train)
    index_path = store_path.parent / "index" if args.store else Path(args.out) / "index"
    retriever = Retriever(estimator, index_path, overwrite=args.overwrite)
    top = retriever.top_k(queries, args.k, shortlist=args.shortlist)
    method = {"shortlist": args.shortlist, "index": str(index_path), "index_source": retriever.source,
              "index_layer": retriever.layer}
    if retriever.source == "head-grad":  # the features' pool that the head gradient re-ranked
        method["index_pool"] = retriever.pool_size(args.shortlist)
    if args.recall_sample:
        recall = retriever.recall(queries, args.k, args.shortlist, sample=args.recall_sample, seed=args.seed)
        method.update(recall=recall.mean, recall_queries=recall.queries.tolist(),
                      recall_per_query=recall.per_query.tolist())
    return SimpleNamespace(indices=top.indices, scores=top.scores), method


def summary(method: dict, k: int) -> str:
    """One line for the report: the index and the measured recall."""
    line = f"shortlist: {method['shortlist']} candidates per query from `{method['index']}` ({method['index_source']})"
    if "recall" in method:
        line += (f"; recall of the full sweep's top-{k} on {len(method['recall_queries'])} sampled queries: "
                 f"{method['recall']:.3f}")
    return line + "\n\n"
