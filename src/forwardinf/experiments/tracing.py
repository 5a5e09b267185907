"""Pieces both fact-tracing pipelines share (the toy LM in ``trace`` and the pretrained LM in
``trace_pretrained``): Forward-INF's registry variant, the candidate pool, per-method clocks, and the
ranking metrics, and the report."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forwardinf import metrics


FI = "forward-inf-trace"  # the registry's name (baselines/registry.py); lr and parameters are tuned per run


def forward_inf_estimator(model: Any, task: Any, lr: float, params: Any, args: Any) -> Any:
    """The registry's ``forward-inf-trace`` (unfitted) with this run's lr and parameters; the
    ``--fi-optimizer/--fi-steps/--fi-score`` flags override the registry's keywords."""
    from forwardinf.baselines.registry import make_estimator

    return make_estimator(FI, model, task, lr=lr, params=params, batch_size=args.batch_size,
                          optimizer=args.fi_optimizer, steps=args.fi_steps, score=args.fi_score)


def build_pool(data: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """Every abstract once, shortest first: ``(DictDataset, position [n_abstracts])``.

    Both methods fit once on this pool and score a query's candidates by their positions in it.
    Length order makes each batch of neighbouring positions short, so the task's padding trim
    (:meth:`LanguageModelTask.trim`) cuts most of the padding; every method gains alike.
    """
    from forwardinf.tasks.language_model import DictDataset

    order = torch.argsort(data["attention_mask"].sum(1), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return DictDataset({k: v[order] for k, v in data.items()}), position


def bm25_texts(records: list[dict]) -> list[list[str]]:
    """FTRACE records' filled-in sentences as BM25 tokens (:func:`forwardinf.baselines.bm25.tokenize`)."""
    from forwardinf.baselines.bm25 import tokenize
    from forwardinf.data.facts import fill

    return [tokenize(fill(r["inputs_pretokenized"], r["targets_pretokenized"])) for r in records]


@dataclass
class Timed:
    """Scores and clocks of one method over a query list. CPU seconds (``time.process_time``)
    beside wall seconds: on a shared machine wall time also counts other processes' turns."""

    scores: list[torch.Tensor]
    cpu: list[float]
    wall: list[float]
    setup_cpu: float = 0.0
    setup_wall: float = 0.0



def evaluate(scores: list[torch.Tensor], relevant: list[list[int]], k: int) -> dict[str, float]:
    """MRR and precision (``k`` = 0: number of proponents) averaged over queries."""
    mrr = [metrics.mrr(s[None], [r]) for s, r in zip(scores, relevant)]
    prec = [metrics.precision_at_k(s[None], [r], k=k or len(r)) for s, r in zip(scores, relevant)]
    return {"mrr": float(np.mean(mrr)), "precision": float(np.mean(prec))}


def within_budget(scores: list[torch.Tensor], seconds: list[float], budget: float) -> list[torch.Tensor]:
    """What a method ranks when it must answer within ``budget`` seconds per query.

    It reaches the first ``ceil(n * budget / seconds)`` candidates (the candidate order is a
    fixed random shuffle); the others tie at the bottom (the metrics break ties at random, in
    expectation).
    """
    out = []
    for s, t in zip(scores, seconds):
        n = len(s)
        reached = n if t <= budget else int(math.floor(n * budget / t))
        capped = s.clone()
        if reached < n:
            low = (s[:reached].min() if reached else torch.tensor(0.0)) - 1.0
            capped[reached:] = low
        out.append(capped)
    return out


def write_report(out: Any, dataset: str, config: dict, methods: dict, head: list[str],
                 tables: dict[str, str]) -> dict:
    """Write ``results.json`` and ``report.md`` (``head`` lines, then one section per query variant's
    table) into ``out``, print the tables, and return the results object."""
    from forwardinf.experiments.report import results_object, write_outputs

    obj = results_object("trace", dataset, config, methods)
    report = list(head)
    for variant, table in tables.items():
        report += [f"## {variant} queries", "", table, ""]
    path = write_outputs(out, obj, "\n".join(report))
    for variant, table in tables.items():
        print(f"\n{variant} queries\n{table}")
    print(f"wrote {path}/results.json, report.md")
    return obj
