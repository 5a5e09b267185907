"""Memorization: does Forward-INF find the training point a test prediction depends on?

Ground truth is Feldman & Zhang's subsampling estimator (:class:`forwardinf.baselines.retraining.Downsampling`
with ``metric="accuracy"``): ``--n-models`` K models, each trained on a random ``--subset-fraction``
of the training set, give for every (training point i, test point z)

    infl(i, z) = P[model correct on z | i in its subset] - P[correct on z | i not in it]

and each training point's memorization ``mem(i) = infl(i, z_i)``. Per test point its most
influential training point is the ground-truth top. Forward-INF (one update per query, on the
model trained on all the data) retrieves its own top training point for every test point. Paper:
section 4.3, Figure 4 (high-influence pairs, influence > 0.4).

Reported: top-1 agreement, the ground-truth point's rank under each method (ties in the
method's scores count against it), the ground-truth influence of each method's pick, all over every test point and
restricted to high-influence pairs; the split-half agreement of the ground truth itself (its two
halves of K/2 models each) as the ceiling its noise allows; wall times of the ground truth
(K trainings + evaluation) and of each method, and their ratio.

The paper's recipe (``forward-inf-paper``: raw loss change after one Adam ascent step) is listed
first by default: a memorized training point is an atypical, high-gradient one, which the raw loss
change ranks first and the library's normalised default score (``"cosine"``) divides away; see
``benchmarks/results/memorization.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import forwardinf as fi
from forwardinf.baselines.methods import METHODS
from forwardinf.baselines.retraining import Downsampling
from forwardinf.data.loaders import subset
from forwardinf.experiments.common import seed_everything, timer, warm_up
from forwardinf.experiments.report import markdown_table, results_object, save_query_grid, write_outputs, write_query_html
from forwardinf.experiments.checks import cap_workers
from forwardinf.experiments.setup import (FORWARD_INF_VARIANTS, add_model_arguments, check_methods, make_method,
                                          method_options, parse_methods, prepare_classifier, run_safely)
from forwardinf.hashing import json_hash
from forwardinf.io import atomic_write_text
from forwardinf.metrics import target_ranks
from forwardinf.workloads.trainers import SubsetTrainer

HIGH_INFLUENCE = 0.4  # the paper's threshold for a high-influence pair


# ---------------------------------------------------------------------------------- metrics
def all_ranks(scores: Tensor) -> Tensor:
    """``[Q, N]`` 1-based rank (descending) of every entry in its row, ties counted against the
    method as in :func:`forwardinf.metrics.target_ranks`: an entry's rank is the number of entries
    scoring at least as high."""
    s = scores.double()
    out = torch.empty_like(s)
    for q in range(s.shape[0]):
        vals = torch.sort(s[q]).values
        out[q] = (len(vals) - torch.searchsorted(vals, s[q], right=False)).double()
    return out


def nan_argmax(values: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``(argmax [Q], max [Q])`` ignoring NaN (points in every subset or in none)."""
    v = torch.nan_to_num(values.double(), nan=-float("inf"))
    best, idx = v.max(1)
    return idx, best


def top_sets(values: Tensor) -> Tensor:
    """``[Q, N]`` bool: the entries equal to their row's maximum (NaN ignored); a tie gives several."""
    v = torch.nan_to_num(values.double(), nan=-float("inf"))
    return v == v.max(1, keepdim=True).values


def agreement(scores: Tensor, gt: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Compare ``scores [Q, N]`` (a method) with ground-truth influence ``gt [Q, N]`` on the rows in ``mask``.

    ``top1``: the method's top point is the ground-truth top; ``mean_rank`` / ``median_rank``: the
    ground-truth top's rank under the method; ``top5`` / ``top10``: it is among the first 5 / 10;
    ``gt_influence_of_pick``: mean ground-truth influence of the method's top point. Ties in the
    method's scores count against it (:func:`forwardinf.metrics.target_ranks`); tied ground-truth
    tops (e.g. a test point every model gets right has influence 0 everywhere) count in expectation:
    each is equally likely to be "the" top, and a tied method top picks each of its points alike.
    """
    if scores.shape != gt.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    if mask is None:
        mask = torch.ones(scores.shape[0], dtype=torch.bool)
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    s, g = scores[mask].double(), gt[mask].double()
    tops = top_sets(g).double()  # [n, N]
    weight = tops / tops.sum(1, keepdim=True)  # uniform over each row's tied tops
    ranks = all_ranks(s)
    method_tops = top_sets(s).double()
    method_weight = method_tops / method_tops.sum(1, keepdim=True)
    top1 = (weight * (ranks <= 1)).sum(1)  # P(the method ranks a random gt top first, alone)
    rank = (weight * ranks).sum(1)
    picked = (method_weight * torch.nan_to_num(g)).sum(1)
    return {"n": n, "top1": float(top1.mean()), "top5": float((weight * (ranks <= 5)).sum(1).mean()),
            "top10": float((weight * (ranks <= 10)).sum(1).mean()), "mean_rank": float(rank.mean()),
            "median_rank": float(rank.median()), "gt_influence_of_pick": float(picked.mean())}


def fz_influence(correct: Tensor, masks: Tensor) -> Tensor:
    """Feldman-Zhang influence ``[Q, N]`` from ``correct [K, Q]`` (0/1) and subset ``masks [K, N]`` (bool).

    ``mean_{k: i in S_k} correct[k, q] - mean_{k: i not in S_k} correct[k, q]``; NaN where a point
    is in every subset or in none.
    """
    inside = masks.double()
    outside = 1.0 - inside
    mean_in = (correct.double().T @ inside) / inside.sum(0)
    mean_out = (correct.double().T @ outside) / outside.sum(0)
    bad = (inside.sum(0) == 0) | (outside.sum(0) == 0)
    return (mean_in - mean_out).masked_fill(bad, float("nan"))


def split_half(correct: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Ground truth from the first and the second half of the K models: two ``[Q, N]``."""
    k = correct.shape[0] // 2
    return fz_influence(correct[:k], masks[:k]), fz_influence(correct[k:2 * k], masks[k:2 * k])


@torch.no_grad()
def correctness(models: list[nn.Module], x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
    """``[K, Q]`` 1.0 where model k classifies query q correctly."""
    rows = []
    for m in models:
        m.eval()
        preds = torch.cat([m(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        rows.append((preds == y).double())
    return torch.stack(rows)


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--n-models", type=int, default=100, help="K, models trained on random subsets (default: 100)")
    p.add_argument("--subset-fraction", type=float, default=0.7,
                   help="fraction of the training set each model sees (default: 0.7, as Feldman & Zhang)")
    p.add_argument("--n-test", type=int, default=None, help="class-balanced test points used as queries (default: all)")
    p.add_argument("--methods", default="forward-inf-paper,forward-inf,tracin-5",
                   help="comma-separated registry names (forwardinf.baselines.methods): "
                        + ", ".join([*FORWARD_INF_VARIANTS, *METHODS[1:]]) + " (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes for the K trainings (default: 1)")
    p.add_argument("--pairs", type=int, default=8, help="(test, ground-truth top, method top) rows in the figure")


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    progress = not getattr(args, "quiet", False) and sys.stderr.isatty()
    if args.n_models < 2:
        raise ValueError(f"--n-models must be >= 2, got {args.n_models}")
    if not 0 < args.subset_fraction < 1:
        raise ValueError(f"--subset-fraction must be in (0, 1), got {args.subset_fraction}")
    # Every name and --option value checked before the K trainings, not after.
    methods = parse_methods(args.methods)
    options = method_options(args, methods)
    check_methods(methods, options)
    args.workers, note = cap_workers(args.workers)
    if note:
        print(f"memorization: {note}", flush=True)
    prepared = prepare_classifier(args, progress=progress)
    split, model = prepared.split, prepared.model
    if args.n_test:
        split = subset(split, n_test=args.n_test, seed=args.seed)
    train, test = split.train(), split.test()
    cfg = prepared.config
    trainer = SubsetTrainer(cfg["model"], tuple(split.input_shape), split.n_classes,
                            {"width": cfg["width"]} if cfg.get("width") else {},
                            {k: cfg[k] for k in ("epochs", "lr", "batch_size", "optimizer", "weight_decay")})
    print(f"memorization: {split.name}, {len(train[1])} training points, {len(test[1])} test queries, "
          f"model {prepared.model_name} (test accuracy {prepared.accuracy:.3f}); ground truth from "
          f"{args.n_models} models on {args.subset_fraction:.0%} subsets", flush=True)

    # Ground truth: K subset trainings (cached per training under --out/cache), then evaluation.
    gt_est = Downsampling(trainer, fi.ClassificationTask(), n_models=args.n_models, fraction=args.subset_fraction,
                          metric="accuracy", seed=args.seed, workers=args.workers,
                          cache_dir=Path(args.out) / "cache" / "downsampling", progress=progress)
    with timer() as t_gt:
        gt_est.fit(train)
        gt = gt_est.influence(test)  # [Q, N]
        mem = gt_est.self_influence()  # [N]
    # Trainings found in the cache take no time; report the run that actually trained them.
    t_gt["seconds"], gt_cached = _ground_truth_seconds(Path(args.out) / "cache", {**cfg, "n_models": args.n_models,
                                                       "fraction": args.subset_fraction, "n_test": len(test[1])},
                                                       t_gt["seconds"])
    gt_top, gt_val = nan_argmax(gt)
    high = gt_val > HIGH_INFLUENCE
    defined = gt_val > 0  # some training point helps: rows of all-zero influence have no top
    half_a, half_b = split_half(correctness(gt_est.models_, *test), gt_est.masks_)
    ceiling = {"all": _half_agreement(half_a, half_b, defined), "high": _half_agreement(half_a, half_b, high)}
    print(f"  ground truth {t_gt['seconds']:8.1f}s  {int(high.sum())} of {len(high)} test points have a training "
          f"point with influence > {HIGH_INFLUENCE}; split-half top-1 agreement {_fmt(ceiling['all'])} (all), "
          f"{_fmt(ceiling['high'])} (high)", flush=True)

    warm_up(model, train)
    results: dict[str, dict] = {}
    best_scores: dict[str, Tensor] = {}
    for name in methods:
        def work() -> tuple[Tensor, dict]:
            est = make_method(name, model, prepared, progress, options.get(name))
            with timer() as t:
                scores = est.fit(train).influence(test)
            return scores, t

        done, error = run_safely(name, work)
        if error is not None:  # a failing method is a row: the others' results are kept
            results[name] = error
            continue
        scores, t = done
        best_scores[name] = scores
        r = {"seconds": t["seconds"], "all": agreement(scores, gt, defined), "high": agreement(scores, gt, high),
             "speedup_vs_ground_truth": t_gt["seconds"] / max(t["seconds"], 1e-9)}
        r["top1"], r["top1_high"] = r["all"]["top1"], r["high"].get("top1")
        results[name] = r
        print(f"  {name:20s} {t['seconds']:8.2f}s  top-1 {r['top1']:.3f} (high {_fmt(r['top1_high'])})  "
              f"median rank {r['all']['median_rank']:.0f} (high {_fmt(r['high'].get('median_rank'))})  "
              f"x{r['speedup_vs_ground_truth']:.0f} faster", flush=True)
    results["ground-truth"] = {"seconds": t_gt["seconds"], "seconds_from_cache_record": gt_cached,
                               "n_models": args.n_models, "n_high": int(high.sum()), "n_defined": int(defined.sum()),
                               "split_half_top1": ceiling["all"], "split_half_top1_high": ceiling["high"],
                               "mean_top_influence": float(gt_val.mean()),
                               "mean_memorization_of_top": float(torch.nan_to_num(mem[gt_top[defined]]).mean()) if defined.any() else None,
                               "mean_memorization_of_top_high": float(torch.nan_to_num(mem[gt_top[high]]).mean())
                               if high.any() else None}

    rows = [[n, round(r["seconds"], 2), round(r["speedup_vs_ground_truth"], 1), r["all"]["top1"], r["all"]["median_rank"],
             r["all"]["gt_influence_of_pick"], r["high"].get("top1", "-"), r["high"].get("median_rank", "-"),
             r["high"].get("gt_influence_of_pick", "-")] if "error" not in r else [n, "-", "-", r["error"]] + ["-"] * 5
            for n, r in results.items() if n != "ground-truth"]
    table = markdown_table(["method", "seconds", "GT time / method time", "top-1 (GT>0)", "median rank (GT>0)",
                            "GT infl. of pick (GT>0)", f"top-1 (infl>{HIGH_INFLUENCE})", "median rank (high)",
                            "GT infl. of pick (high)"], rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, split, gt, gt_top, gt_val, best_scores, args.pairs) if best_scores else []
    g = results["ground-truth"]
    report = [f"# Memorization and influence ({split.name})", "", prepared.describe(), "",
              f"Ground truth: Feldman-Zhang estimator from {args.n_models} models on random "
              f"{args.subset_fraction:.0%} subsets ({t_gt['seconds']:.1f}s"
              + (", recorded when its models were trained" if gt_cached else "") + f"). {g['n_defined']} of {len(high)} "
              f"test points have a training point with positive influence (GT>0; the others, classified correctly by "
              f"every model, have no top), {g['n_high']} one with influence > {HIGH_INFLUENCE}; mean memorization of the ground-truth top "
              f"points {_fmt(g['mean_memorization_of_top'])} (all), {_fmt(g['mean_memorization_of_top_high'])} (high). "
              f"The ground truth agrees with itself (top-1 of two halves of the models) on {_fmt(ceiling['all'])} of "
              f"the GT>0 test points and {_fmt(ceiling['high'])} of the high-influence ones: the ceiling its noise allows.", "",
              table, "", f"The {args.pairs} most influential pairs (rank = the ground-truth top's rank under each method):", "",
              _pairs_table(gt_top, gt_val, mem, best_scores, args.pairs), ""] + [f"![{f}]({f})" for f in figures]
    config = {**cfg, "n_test": len(test[1]), "n_models": args.n_models, "subset_fraction": args.subset_fraction,
              "methods": methods, "options": options, "high_influence": HIGH_INFLUENCE, "seed": args.seed}
    res = results_object("memorization", split.name, config, results)
    write_outputs(out, res, "\n".join(report))
    print(f"wrote {out}/results.json, report.md, " + ", ".join(figures))
    return res


def _pairs_table(gt_top: Tensor, gt_val: Tensor, mem: Tensor, scores: dict[str, Tensor], n: int) -> str:
    order = torch.argsort(gt_val, descending=True)[:n]
    ranks = {name: target_ranks(s[order], gt_top[order]) for name, s in scores.items()}
    rows = [[int(q), int(gt_top[q]), float(gt_val[q]), float(mem[gt_top[q]])]
            + [float(ranks[name][j]) for name in scores] for j, q in enumerate(order)]
    return markdown_table(["test point", "GT top", "GT influence", "memorization of GT top"]
                          + [f"rank ({name})" for name in scores], rows)


def _ground_truth_seconds(cache: Path, key_config: dict, measured: float) -> tuple[float, bool]:
    """``(seconds, from_record)``: the recorded wall time of the run that trained these models, if longer."""
    import json

    path = cache / f"ground-truth-seconds-{json_hash(key_config)}.json"
    recorded = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    if measured >= recorded:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"seconds": measured}) + "\n")
        return measured, False
    return float(recorded), True


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.3g}"


def _half_agreement(a: Tensor, b: Tensor, mask: Tensor) -> float | None:
    """Expected top-1 agreement of the two halves (ties broken at random on both sides)."""
    if not mask.any():
        return None
    ta, tb = top_sets(a[mask]).double(), top_sets(b[mask]).double()
    return float(((ta * tb).sum(1) / (ta.sum(1) * tb.sum(1))).mean())


def _figures(out: Path, split: Any, gt: Tensor, gt_top: Tensor, gt_val: Tensor, scores: dict[str, Tensor],
             n_pairs: int) -> list[str]:
    """Figure 4-style rows (test point, ground-truth top, each method's top) and an HTML page of the top-k."""
    order = torch.argsort(gt_val, descending=True)[:n_pairs]  # the most influential pairs first
    picks = [s.argmax(1) for s in scores.values()]
    idx = torch.stack([gt_top[order]] + [p[order] for p in picks], 1)
    vals = torch.stack([gt_val[order]] + [torch.nan_to_num(gt.gather(1, p[:, None])[:, 0])[order] for p in picks], 1)
    xq, yq = split.x_test[order], split.y_test[order]
    save_query_grid(out / "pairs.png", xq, split.x_train, idx, vals, query_labels=yq, train_labels=split.y_train,
                    denormalize=split.denormalize, class_names=split.classes, highlight=gt_top[order],
                    max_queries=n_pairs,
                    title="columns: test point | ground-truth top | top of " + " | ".join(scores)
                          + "\nnumbers: ground-truth influence; green: the ground-truth top")
    first, s = next(iter(scores.items()))
    top = s[order].topk(min(5, s.shape[1]), dim=1)
    bot = s[order].topk(min(3, s.shape[1]), dim=1, largest=False)
    write_query_html(out, "queries", xq, split.x_train, top.indices, top.values, query_labels=yq,
                     train_labels=split.y_train, bottom_indices=bot.indices, bottom_scores=bot.values,
                     denormalize=split.denormalize, class_names=split.classes, highlight=gt_top[order],
                     max_queries=n_pairs, title=f"Memorization: {first} top-5 proponents and 3 opponents "
                                                f"(green = Feldman-Zhang ground-truth top)")
    return ["pairs.png", "queries.html"]
