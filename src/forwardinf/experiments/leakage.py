"""Data leakage detection: copy training points into the query set and find them again.

Trains (or loads) a classifier, copies ``--n-queries`` training points into the query set
(exact duplicates, or augmented copies with ``--near``), and asks every method for the most
influential training points of each query. A method detects a leak when the copied point ranks
first (T-1), or among the first 5 / 10 (T-5, T-10). Paper: section 4.2, Table 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import forwardinf as fi
from forwardinf.experiments.common import markdown_table, results_object, seed_everything, timer, warm_up, write_outputs
from forwardinf.experiments.setup import (FORWARD_INF_VARIANTS, add_model_arguments, make_method, method_options,
                                          prepare_classifier)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--n-queries", type=int, default=50, help="training points copied into the query set (default: 50)")
    p.add_argument("--methods", default="forward-inf,forward-inf-paper",
                   help="comma-separated methods: " + ", ".join(FORWARD_INF_VARIANTS)
                   + ", and the baselines (if-100, if-1000, if-10000, if-cg, tracin-1, tracin-3, tracin-5, "
                     "tracin-last, grad-cos, representer, knn-shapley, tmc-shapley, hydra, hydra-last, ...)")
    p.add_argument("--near", action="store_true", help="queries are augmented copies (shift, noise, ...) instead of exact ones")
    p.add_argument("--tune", action="store_true",
                   help="tune lr, steps and score of Forward-INF on 20%% of the queries (the paper's split); report the rest")
    p.add_argument("--k", type=int, default=5, help="training images shown per query in the figure (default: 5)")


def leaked_queries(split: Any, n: int, seed: int, near: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [n], inputs [n, ...], targets [n])``: copies of ``n`` random training points."""
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"--n-queries must be in 1..{len(split.y_train)}, got {n}")
    g = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(split.y_train), generator=g)[:n]
    x = split.x_train[idx].clone()
    if near:
        from forwardinf.data.augment import flip_is_sensible, near_duplicates

        x = near_duplicates(x, kind="mix", seed=seed, allow_flip=flip_is_sensible(split.name))
    return idx, x, split.y_train[idx].clone()


def detection(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """T-1/T-5/T-10 and mean rank of ``targets [Q]`` in ``scores [Q, N]`` (ties count against)."""
    target_scores = scores.gather(1, targets[:, None])
    ranks = (scores >= target_scores).sum(1)
    return {"top1": float((ranks <= 1).float().mean()), "top5": float((ranks <= 5).float().mean()),
            "top10": float((ranks <= 10).float().mean()), "mean_rank": float(ranks.float().mean())}


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    prepared = prepare_classifier(args, progress=progress)
    split, model = prepared.split, prepared.model
    idx, xq, yq = leaked_queries(split, args.n_queries, args.seed, args.near)
    n_tune = max(1, len(idx) // 5) if args.tune else 0
    eval_idx, xe, ye = idx[n_tune:], xq[n_tune:], yq[n_tune:]
    train = split.train()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = method_options(args, methods)
    print(f"leakage: {split.name}, {len(split.y_train)} training points, model {prepared.model_name} "
          f"(test accuracy {prepared.accuracy:.3f}), {len(eval_idx)} leaked queries"
          + (f" (+{n_tune} for tuning)" if n_tune else "") + (", near-duplicates" if args.near else ""))

    warm_up(model, train)
    results, rows, best = {}, [], {}
    for name in methods:
        est = make_method(name, model, prepared, progress, options.get(name))
        with timer() as t:
            est.fit(train)
            tuned = None
            if n_tune and isinstance(est, fi.ForwardINF):
                est.tune((xq[:n_tune], yq[:n_tune]), idx[:n_tune])
                tuned = {"lr": est.lr, "steps": est.steps, "score": est.score}
            scores = est.influence((xe, ye))
        metrics = detection(scores, eval_idx)
        metrics["seconds"] = t["seconds"]
        metrics["cpu_seconds"] = t["cpu_seconds"]
        metrics["seconds_per_query"] = t["seconds"] / len(eval_idx)
        if tuned:
            metrics["tuned"] = tuned
        results[name] = metrics
        rows.append([name, round(t["seconds"], 2), metrics["top1"], metrics["top5"], metrics["top10"], round(metrics["mean_rank"], 1)])
        best[name] = scores
        print(f"  {name:22s} {t['seconds']:8.2f}s  T-1 {metrics['top1']:.3f}  T-5 {metrics['top5']:.3f}  T-10 {metrics['top10']:.3f}")

    table = markdown_table(["method", "seconds", "T-1", "T-5", "T-10", "mean rank"], rows)
    print(table)
    config = {**prepared.config, "n_queries": len(eval_idx), "n_tune": n_tune, "near": args.near, "options": options,
              "methods": methods, "seed": args.seed}
    out = write_outputs(args.out, results_object("leakage", split.name, config, results),
                        f"# Leakage detection ({split.name})\n\n{prepared.describe()}\n\n{table}\n")
    _figure(out, split, xe, ye, best[methods[0]], eval_idx, methods[0], args.k)
    print(f"wrote {out}/results.json, report.md, queries.png, queries.html")
    return results_object("leakage", split.name, config, results)


def _figure(out: Any, split: Any, xq: torch.Tensor, yq: torch.Tensor, scores: torch.Tensor,
            truth: torch.Tensor, method: str, k: int) -> None:
    """``queries.png`` (top-k per query) and ``queries.html`` (top-k proponents and opponents)."""
    try:
        from forwardinf.experiments.report import save_query_grid, write_query_html
    except ImportError:  # matplotlib missing: the numbers are still written
        return
    k = min(k, scores.shape[1])
    top, bottom = scores.topk(k, dim=1), scores.topk(k, dim=1, largest=False)
    common = dict(query_labels=yq, train_labels=split.y_train, denormalize=split.denormalize,
                  class_names=split.classes, highlight=truth)
    save_query_grid(out / "queries.png", xq, split.x_train, top.indices, top.values, **common)
    write_query_html(out, "queries", xq, split.x_train, top.indices, top.values, bottom_indices=bottom.indices,
                     bottom_scores=bottom.values, title=f"Leakage ({split.name}): {method}", **common)
