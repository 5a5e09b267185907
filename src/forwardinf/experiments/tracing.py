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


FI = "forward-inf-trace"  # the registry's name (baselines/methods.py); lr and parameters are tuned per run


# Forward-INF's settings in trace (--option forward-inf.KEY=VALUE): lr and params are lists of
# candidates tried on the tuning queries; any other key is a keyword of the registry's variant.
FI_DEFAULTS: dict[str, Any] = {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "params": ["all", "output"],
                               "optimizer": "nsgd", "steps": 1, "score": "loss"}


def forward_inf_options(args: Any) -> None:
    """Read ``--option forward-inf.KEY=VALUE`` (or ``forward-inf-trace.KEY``) into ``args``:
    ``fi_lr`` and ``fi_params`` (candidate lists), ``fi_optimizer``, ``fi_steps``, ``fi_score`` and
    ``fi_extra`` (the other keywords), over :data:`FI_DEFAULTS`. Refuses a bad value up front."""
    from forwardinf.experiments.setup import method_options

    given = method_options(args, ["forward-inf", FI])
    kw = {**FI_DEFAULTS, **given.get("forward-inf", {}), **given.get(FI, {})}
    for key in ("lr", "params"):  # one value: a list of one candidate
        kw[key] = list(kw[key]) if isinstance(kw[key], (list, tuple)) else [kw[key]]
    if not kw["lr"] or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in kw["lr"]):
        raise ValueError(f"--option forward-inf.lr={kw['lr']!r}: expected positive numbers (candidates)")
    if not kw["params"] or not all(isinstance(v, str) for v in kw["params"]):
        raise ValueError(f"--option forward-inf.params={kw['params']!r}: expected 'all', 'output' or name patterns")
    args.fi_lr, args.fi_params = [float(v) for v in kw.pop("lr")], kw.pop("params")
    args.fi_optimizer, args.fi_steps, args.fi_score = kw.pop("optimizer"), kw.pop("steps"), kw.pop("score")
    args.fi_extra = kw
    from torch import nn

    from forwardinf.baselines.methods import make_estimator
    from forwardinf.tasks import ClassificationTask

    try:  # the other settings on a stand-in model, before any training (the estimator's own checks)
        make_estimator(FI, nn.Linear(2, 2), ClassificationTask(), lr=args.fi_lr[0], optimizer=args.fi_optimizer,
                       steps=args.fi_steps, score=args.fi_score, **kw)._check_params()
    except (ValueError, TypeError) as e:
        raise ValueError(f"--option forward-inf: {e}") from None


def forward_inf_estimator(model: Any, task: Any, lr: float, params: Any, args: Any) -> Any:
    """The registry's ``forward-inf-trace`` (unfitted) with this run's lr and parameters and the
    settings :func:`forward_inf_options` read."""
    from forwardinf.baselines.methods import make_estimator

    return make_estimator(FI, model, task, lr=lr, params=params, batch_size=args.batch_size,
                          optimizer=args.fi_optimizer, steps=args.fi_steps, score=args.fi_score,
                          **getattr(args, "fi_extra", {}))


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


# -- lexical references and fusion (issue 23: the task must not reward string matching) --------------
def string_match_scores(records: list[dict], query: dict, cands: list[int]) -> torch.Tensor:
    """``[len(cands)]`` 1.0 where the candidate's filled-in sentence contains both the query's subject
    and answer (``sub_surface``/``obj_surface``, case-insensitive substrings), else 0.0. Ties count
    against the method in every rank metric, so proponents tied with such distractors rank after them."""
    from forwardinf.data.facts import fill

    sub, obj = query["sub_surface"].lower(), query["obj_surface"].lower()
    texts = [fill(records[i]["inputs_pretokenized"], records[i]["targets_pretokenized"]).lower() for i in cands]
    return torch.tensor([float(sub in t and obj in t) for t in texts])


def answer_match_scores(records: list[dict], query: dict, cands: list[int]) -> torch.Tensor:
    """``[len(cands)]`` 1.0 where the candidate's masked entity (its training target) is the query's
    answer, else 0.0: the lexical reference for methods whose signal is the target token."""
    from forwardinf.data.facts import split_cloze

    obj = query["obj_surface"].lower()
    return torch.tensor([float(split_cloze(records[i]["inputs_pretokenized"], records[i]["targets_pretokenized"])[1]
                               .lower() == obj) for i in cands])


def random_scores(n: int, rng: np.random.Generator) -> torch.Tensor:
    """``[n]`` a uniformly random ranking (the chance reference)."""
    return torch.as_tensor(rng.permutation(n), dtype=torch.float32)


def rrf(*scores: torch.Tensor, k: float = 60.0) -> torch.Tensor:
    """Reciprocal rank fusion (Cormack et al. 2009), a fusion with no tuned weight:
    ``sum_m 1 / (k + rank_m)`` over the methods' ``[N]`` scores (rank 1 = highest; tied scores share
    their average rank)."""
    from forwardinf.metrics import rankdata

    out = torch.zeros(len(scores[0]), dtype=torch.float64)
    for s in scores:
        out += 1.0 / (k + torch.as_tensor(rankdata(-s.double().numpy())))
    return out


def reciprocal_ranks(scores: list[torch.Tensor], relevant: list[list[int]]) -> np.ndarray:
    """``[Q]`` 1 / rank of each query's first proponent (ties against the method)."""
    return np.array([metrics.mrr(s[None], [r]) for s, r in zip(scores, relevant)])


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over queries (paired per-query values) with its 95% percentile bootstrap
    interval over the queries."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = metrics.bootstrap_interval(d, n_boot=n_boot, seed=seed)
    return {"mean": float(d.mean()), "low": lo, "high": hi}
