"""CPU seconds per query of Forward-INF and TracIn (single, no gradient cache) against the batch size.

The set-up of ``forwardinf trace``: both fitted once on the pool of all abstracts (shortest first),
each query scoring its 200 candidates with ``influence(query, indices=...)``; 30 queries after one
warm-up. Needs the model of an earlier run in ``runs/trace/model``::

    OMP_NUM_THREADS=1 python benchmarks/results/trace_batch_sizes.py [--model runs/trace/model] [--lr 1e-4]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import forwardinf as fi
from forwardinf.baselines.tracin import TracIn
from forwardinf.data.facts import build_geo_facts, select_queries
from forwardinf.experiments import trace as T
from forwardinf.models.language import load_language_model, output_layer_name
from forwardinf.tasks.language_model import DictDataset, LanguageModelTask


def per_query(est, queries, positions) -> float:
    """Mean CPU seconds of ``influence(query, indices=...)`` (after one warm-up call)."""
    est.influence(queries[0], indices=positions[0])
    out = []
    for q, i in zip(queries, positions):
        c = time.process_time()
        est.influence(q, indices=i)
        out.append(time.process_time() - c)
    return statistics.mean(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/trace/model")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    args = p.parse_args()
    facts = build_geo_facts(n_cities=300, seed=0)
    rng = random.Random(0)
    qs = select_queries(facts, args.queries, rng)
    cands = [facts.candidates(q, 200, rng)[0] for q in qs]
    model, tok = load_language_model(args.model)
    task = LanguageModelTask.for_model(model)
    pool, position = T.build_pool(T.encode_records(tok, facts.abstracts, task.kind))
    queries = [DictDataset(T.encode_records(tok, [q], task.kind)) for q in qs]
    positions = [position[torch.as_tensor(c)].sort().values for c in cands]
    layer = [output_layer_name(model)]
    print("| batch | Forward-INF | TracIn (single) | ratio |\n|---|---|---|---|")
    for bs in args.batch_sizes:
        f = per_query(fi.ForwardINF(model, task, lr=args.lr, score="loss", params=layer, batch_size=bs).fit(pool),
                      queries, positions)
        t = per_query(TracIn(model, task, params=layer, normalize=True, batch_size=bs).fit(pool), queries, positions)
        print(f"| {bs} | {f:.3f} | {t:.3f} | {t / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
