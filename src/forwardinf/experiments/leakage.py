"""Data leakage detection: copy training points into the query set and find them again.

Trains (or loads) a classifier, copies ``--n-queries`` training points into the query set
(exact duplicates, or near-duplicates with ``--near KIND``: shifted, mirrored, cropped+resized,
JPEG re-encoded, colour-jittered, see :mod:`forwardinf.data.augment`), and asks every method for
the most influential training points of each query. A method detects a leak when the copied point
ranks first (T-1), or among the first 5 / 10 (T-5, T-10). Paper: section 4.2, Table 2.

``--near`` takes a comma-separated list of kinds (``exact`` included, ``all`` = every kind): each
method is fitted once and queried once per kind on the same training points, so the rows of one
run share a model and a fit; ``query_cost_vs_exact`` is a query call's CPU time over plain
``forward-inf``'s on exact copies. CIFAR-10 models train with crop+flip augmentation
(``--train-augment auto``), as real CIFAR models do.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import forwardinf as fi
from forwardinf.baselines.methods import METHODS, PEER_METHODS, REFERENCE_METHODS
from forwardinf.data.augment import ALL_KINDS, KINDS
from forwardinf.experiments.common import seed_everything, timer, warm_up
from forwardinf.experiments.report import (can_plot, markdown_table, results_object, save_query_grid, write_outputs,
                                           write_query_html)
from forwardinf.experiments.setup import (FORWARD_INF_VARIANTS, IMAGE_VARIANTS, add_model_arguments, check_methods,
                                          make_method, method_options, parse_methods, prepare_classifier,
                                          run_safely)
from forwardinf.metrics import target_ranks
from forwardinf.training import AUGMENTATIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--n-queries", type=int, default=50, help="training points copied into the query set (default: 50)")
    p.add_argument("--methods", default="forward-inf,forward-inf-paper",
                   help="comma-separated registry names (forwardinf.baselines.methods): "
                        + ", ".join([*FORWARD_INF_VARIANTS, *IMAGE_VARIANTS, *REFERENCE_METHODS, *METHODS[1:],
                                     *PEER_METHODS]) + "; NAME@LABEL runs NAME again under LABEL (default: %(default)s)")
    p.add_argument("--near", nargs="?", const="mix", default=None, metavar="KIND[,KIND...]",
                   help="queries are near-duplicates instead of exact copies: " + ", ".join(ALL_KINDS)
                        + " (forwardinf.data.augment; 'all' = each in turn; --near alone = mix)")
    p.add_argument("--train-augment", default="auto", choices=("auto", "none") + AUGMENTATIONS,
                   help="training augmentation: auto (default) = crop+flip on cifar10 (as real CIFAR models "
                        "train), none elsewhere")
    p.add_argument("--tune", action="store_true",
                   help="tune lr, steps and score of Forward-INF on 20%% of the queries (the paper's split); report the rest")
    p.add_argument("--k", type=int, default=5, help="training images shown per query in the figure (default: 5)")


def leaked_queries(split: Any, n: int, seed: int, near: str | bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [n], inputs [n, ...], targets [n])``: copies of ``n`` random training points.

    ``near``: None / False / ``"exact"`` for exact copies, else the near-duplicate kind
    (:data:`forwardinf.data.augment.ALL_KINDS`; True = ``"mix"``, which uses flips only where
    :func:`~forwardinf.data.augment.flip_is_sensible`). The same ``n`` points for every kind.
    """
    if not 0 < n <= len(split.y_train):
        raise ValueError(f"--n-queries must be in 1..{len(split.y_train)}, got {n}")
    g = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(split.y_train), generator=g)[:n]
    x = split.x_train[idx].clone()
    kind = "mix" if near is True else near
    if kind and kind != "exact":
        from forwardinf.data.augment import flip_is_sensible, near_duplicates

        x = near_duplicates(x, kind=kind, seed=seed, allow_flip=flip_is_sensible(split.name))
    return idx, x, split.y_train[idx].clone()


def near_kinds(near: str | None) -> list[str]:
    """The query kinds of ``--near``: ``["exact"]`` without it; ``all`` = exact and every kind."""
    if not near:
        return ["exact"]
    kinds = [k.strip() for k in near.split(",") if k.strip()]
    if kinds == ["all"]:
        return ["exact", *KINDS, "mix"]
    bad = [k for k in kinds if k not in ALL_KINDS and k != "exact"]
    if bad or not kinds:
        raise ValueError(f"--near: unknown kind(s) {bad}; choose from exact, {', '.join(ALL_KINDS)} or all")
    return kinds


def detection(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """T-1/T-5/T-10 and mean rank of ``targets [Q]`` in ``scores [Q, N]`` (ties count against the
    method: :func:`forwardinf.metrics.target_ranks`)."""
    ranks = target_ranks(scores, targets)
    return {"top1": float((ranks <= 1).mean()), "top5": float((ranks <= 5).mean()),
            "top10": float((ranks <= 10).mean()), "mean_rank": float(ranks.mean())}


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    kinds = near_kinds(args.near)
    # Every name and --option value checked before the model is trained.
    methods = parse_methods(args.methods)
    options = method_options(args, methods)
    check_methods(methods, options)
    progress = not args.quiet and sys.stderr.isatty()
    prepared = prepare_classifier(args, progress=progress)
    split, model = prepared.split, prepared.model
    queries = {kind: leaked_queries(split, args.n_queries, args.seed, kind) for kind in kinds}
    idx = queries[kinds[0]][0]
    n_tune = max(1, len(idx) // 5) if args.tune else 0
    eval_idx = idx[n_tune:]
    train = split.train()
    print(f"leakage: {split.name}, {len(split.y_train)} training points, model {prepared.model_name} "
          f"(test accuracy {prepared.accuracy:.3f}), {len(eval_idx)} leaked queries"
          + (f" (+{n_tune} for tuning)" if n_tune else "") + f", kinds: {', '.join(kinds)}")

    warm_up(model, train)
    results, rows, best = {}, [], {}
    for name in methods:
        def fit() -> tuple[Any, dict | None, dict]:
            est = make_method(name, model, prepared, progress, options.get(name))
            with timer() as t_fit:
                est.fit(train)
                tuned = None
                if n_tune and isinstance(est, fi.ForwardINF):
                    _, xq, yq = queries[kinds[0]]
                    est = est.with_config(est.tune((xq[:n_tune], yq[:n_tune]), idx[:n_tune]))
                    tuned = {"lr": est.lr, "steps": est.steps, "score": est.score}
            return est, tuned, t_fit

        def score(est: Any, xq: torch.Tensor, yq: torch.Tensor) -> tuple[torch.Tensor, dict]:
            with timer() as t:
                scores = est.influence((xq[n_tune:], yq[n_tune:]))
            return scores, t

        fitted, error = run_safely(name, fit)
        if error is not None:  # a failing method is a row: the others' results are kept
            results[name] = error
            rows.append([name, "-", "-", "-", "-", "-", "-", error["error"]])
            continue
        est, tuned, t_fit = fitted
        per_kind = {}
        for kind in kinds:
            _, xq, yq = queries[kind]
            scored, error = run_safely(name, lambda: score(est, xq, yq))
            if error is not None:
                per_kind[kind] = error
                rows.append([name, kind, round(t_fit["cpu_seconds"], 2), "-", "-", "-", "-", error["error"]])
                continue
            scores, t = scored
            metrics = detection(scores, eval_idx)
            metrics.update(query_seconds=t["seconds"], query_cpu_seconds=t["cpu_seconds"],
                           seconds_per_query=t["seconds"] / len(eval_idx))
            per_kind[kind] = metrics
            best.setdefault(name, scores)
            rows.append([name, kind, round(t_fit["cpu_seconds"], 2), round(t["cpu_seconds"], 2), metrics["top1"],
                         metrics["top5"], metrics["top10"], round(metrics["mean_rank"], 1)])
            print(f"  {name:22s} {kind:10s} fit {t_fit['seconds']:7.2f}s query {t['seconds']:7.2f}s  "
                  f"T-1 {metrics['top1']:.3f}  T-5 {metrics['top5']:.3f}  T-10 {metrics['top10']:.3f}", flush=True)
        first = per_kind[kinds[0]]
        if "error" in first:
            results[name] = {**first, **({"kinds": per_kind} if len(kinds) > 1 else {})}
            continue
        # Top level: the first kind's metrics, timed as fit + its queries (the single-kind schema).
        results[name] = {**first, "seconds": t_fit["seconds"] + first["query_seconds"],
                         "cpu_seconds": t_fit["cpu_seconds"] + first["query_cpu_seconds"],
                         "fit_seconds": t_fit["seconds"], "fit_cpu_seconds": t_fit["cpu_seconds"]}
        if len(kinds) > 1:
            results[name]["kinds"] = per_kind
        if tuned:
            results[name]["tuned"] = tuned
    _cost_ratios(results, kinds)

    table = markdown_table(["method", "kind", "fit CPU s", "query CPU s", "T-1", "T-5", "T-10", "mean rank"], rows)
    print(table)
    config = {**prepared.config, "n_queries": len(eval_idx), "n_tune": n_tune, "near": kinds, "options": options,
              "methods": methods, "seed": args.seed}
    out = write_outputs(args.out, results_object("leakage", split.name, config, results),
                        f"# Leakage detection ({split.name})\n\n{prepared.describe()}\n\n{table}\n")
    _, xq, yq = queries[kinds[0]]
    shown = next((m for m in methods if m in best), None)
    if shown is not None:
        _figure(out, split, xq[n_tune:], yq[n_tune:], best[shown], eval_idx, shown, args.k)
    print(f"wrote {out}/results.json, report.md, queries.png, queries.html")
    return results_object("leakage", split.name, config, results)


def _cost_ratios(results: dict, kinds: list[str]) -> None:
    """``query_cost_vs_exact``: each query call's CPU seconds over plain ``forward-inf`` on exact
    copies (when both ran), the measure of an invariant method's extra cost."""
    ref = results.get("forward-inf", {})
    ref = ref.get("kinds", {}).get("exact", ref if kinds == ["exact"] else None) if ref else None
    if not ref or not ref.get("query_cpu_seconds"):
        return
    for entry in results.values():
        for metrics in (entry.get("kinds") or {kinds[0]: entry}).values():
            if "query_cpu_seconds" in metrics:  # not a failed method's row
                metrics["query_cost_vs_exact"] = metrics["query_cpu_seconds"] / ref["query_cpu_seconds"]


def _figure(out: Any, split: Any, xq: torch.Tensor, yq: torch.Tensor, scores: torch.Tensor,
            truth: torch.Tensor, method: str, k: int) -> None:
    """``queries.png`` (top-k per query) and ``queries.html`` (top-k proponents and opponents)."""
    if not can_plot():  # matplotlib missing: the numbers are still written
        return
    k = min(k, scores.shape[1])
    top, bottom = scores.topk(k, dim=1), scores.topk(k, dim=1, largest=False)
    common = dict(query_labels=yq, train_labels=split.y_train, denormalize=split.denormalize,
                  class_names=split.classes, highlight=truth)
    save_query_grid(out / "queries.png", xq, split.x_train, top.indices, top.values, **common)
    write_query_html(out, "queries", xq, split.x_train, top.indices, top.values, bottom_indices=bottom.indices,
                     bottom_scores=bottom.values, title=f"Leakage ({split.name}): {method}", **common)
