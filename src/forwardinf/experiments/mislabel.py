"""Mislabeled data detection: flip labels, train, and rank training points for inspection.

Flips exactly ``--fraction`` of the training labels to random *other* classes, trains a classifier
on the noisy labels (saving ``--checkpoints`` snapshots along the way), then ranks every training
point by each method and inspects them in that order. Paper: section 4.4, Figure 5 (CIFAR-10,
2,000 points, 20% flipped, ResNet-18 trained 100 epochs, i.e. until the noisy labels are fitted).

Forward-INF runs in self mode (D_tst = D_trn): one joint ascent update on the whole training set,
then every point's loss change. Its score is the training set's influence on each point, i.e. how
much the *rest of the data supports* it; a randomly relabeled point has no support, so Forward-INF
inspects the **lowest** scores first ("support" order). The default, ``forward-inf-margin``, uses
the non-saturating margin score (``score="margin"``; this experiment's ``forward-inf`` before the
method registry, ``forwardinf.baselines.methods``); the raw cross-entropy change
(``forward-inf-loss``, the paper's score) mixes that signal with each point's own gradient norm and
ranks far worse (see the sweep, ``--sweep``). The ``abs`` score is ranked by magnitude (the authors'
``|change|``) and ``forward-inf-paper`` literally as the paper says (self-influence sorted in
descending order). ``forward-inf-margin-cp`` averages the standardised support over the saved
training checkpoints, as TracIn-CP does with gradients. Influence functions and TracIn rank by
their self-influence ``g_i^T H^-1 g_i`` / ``sum_c eta_c ||g_i(c)||^2`` (descending); ``hydra`` by
how much removing a point would raise its own loss (over the recorded training trajectory),
``knn-shapley`` / ``tmc-shapley`` by each point's Shapley value in the game of its own loss
(descending: a point only it supports); ``loss`` by the final training loss (descending);
``random`` is a seeded shuffle.

Metrics per method: ``found_at_15pct`` (fraction of flipped points among the first 15% inspected;
at most ``0.15 / fraction``, e.g. 0.75 with 20% flipped), ``auc`` (ROC AUC of the ranking: the
probability that a flipped point is inspected before a clean one), ``found_at_nflip`` (inspecting
as many points as were flipped), ``inspect_for_80pct`` (fraction of the data inspected to find
80% of the flipped points) and ``seconds`` (excluding training the model).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import forwardinf as fi
from forwardinf.baselines.methods import FORWARD_INF, forward_inf_names, make_estimator
from forwardinf.data.labels import flip_labels
from forwardinf.data.loaders import load_dataset, subset
from forwardinf.experiments.common import seed_everything, timer, warm_up
from forwardinf.experiments.report import markdown_table, pyplot, results_object, write_outputs
from forwardinf.experiments.setup import add_option_argument, method_options
from forwardinf.io import write_json
from forwardinf.metrics import detection_curve, found_at, roc_auc
from forwardinf.models import build_model
from forwardinf.training import accuracy
from forwardinf.workloads.classifier import NOISY_RECIPES, cached_training, train_noisy

# Forward-INF variants come from the registry (baselines.methods.FORWARD_INF: one definition per
# name); what is this experiment's is the inspection order of each variant's self-influence:
#   support   = lowest score first (least supported by the rest of the training data; the default)
#   magnitude = largest |score| first;  descending = highest score first (the paper's wording)
# The default is the margin score (forward-inf-margin, labelled "forward-inf" here before the
# registry): it ranks like the library's default "cosine" score here (see the sweep in
# benchmarks/results/mislabel.md) without cosine's extra forward-mode sweeps in fit.
FI_VARIANTS = forward_inf_names(checkpoints=True)
ORDERS = {"forward-inf-abs": "magnitude", "forward-inf-authors": "magnitude", "forward-inf-paper": "descending"}
BASELINES = ("if-exact", "if-100", "if-1000", "if-cg", "tracin-1", "tracin-3", "tracin-5", "tracin-last",
             "knn-shapley", "tmc-shapley", "hydra", "hydra-last", "loss", "random")
DEFAULT_METHODS = "forward-inf-margin,forward-inf-margin-cp,forward-inf-paper,if-exact,tracin-1,tracin-5,loss,random"

# The sweep behind the default (--sweep): every score x update rule, both orders, final model.
SWEEP_RULES = (("nsgd", 1e-4), ("nsgd", 1e-3), ("nsgd", 1e-2), ("adam", 5e-3), ("adam", 5e-2), ("sgd", 0.1))
SWEEP_SCORES = ("loss", "abs", "margin", "cosine")


# ----------------------------------------------------------------------------------- metrics
def detection_metrics(order_scores: Any, flipped: Any, inspect: float = 0.15) -> dict[str, float]:
    """Metrics of inspecting points by decreasing ``order_scores`` ``[N]`` for the positives ``flipped``.

    ``found_at_15pct`` (for ``inspect=0.15``), ``auc`` (ROC AUC), ``found_at_nflip`` (after as many
    points as there are positives) and ``inspect_for_80pct`` (smallest fraction inspected that
    finds 80% of them, expected over random tie-breaks). Ties are broken at random in expectation.
    """
    flipped = np.asarray(torch.as_tensor(flipped).bool().cpu().numpy())
    s = torch.as_tensor(order_scores).double().cpu().numpy()
    n, n_pos = len(flipped), int(flipped.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(f"need flipped and clean points, got {n_pos} flipped of {n}")
    inspected, found = detection_curve(s, flipped)
    reach = np.flatnonzero(found >= 0.8 - 1e-12)
    return {
        f"found_at_{round(inspect * 100)}pct": found_at(s, flipped, inspect),
        "auc": roc_auc(s, flipped),
        "found_at_nflip": found_at(s, flipped, n_pos / n),
        "inspect_for_80pct": float(inspected[reach[0]]),
    }


def oracle_found_at(fraction_flipped: float, inspect: float) -> float:
    """The best possible ``found_at``: a perfect ranking finds ``min(1, inspect / fraction)``."""
    return min(1.0, inspect / fraction_flipped) if fraction_flipped > 0 else 1.0


# ---------------------------------------------------------------------------------- training
# ---------------------------------------------------------------------------------- methods
def _forward_inf(name: str, model: nn.Module, train: tuple[Tensor, Tensor], kw: dict, progress: bool) -> Tensor:
    """The paper's self mode ``[N]`` (one joint update on the whole training set) of registry variant
    ``name`` with keywords ``kw`` overriding its own; its orientation is the variant's ``ORDERS``."""
    est = make_estimator(name, model, fi.ClassificationTask(), progress=progress, **kw)
    return est.fit(train).influence(train, joint=True)


def _oriented(scores: Tensor, order: str) -> Tensor:
    """Scores whose descending order is the inspection order."""
    if order == "support":
        return -scores
    if order == "magnitude":
        return scores.abs()
    return scores


def _standardise(s: Tensor) -> Tensor:
    s = s.double()
    return (s - s.mean()) / s.std().clamp_min(1e-30)


def rank_scores(name: str, model: nn.Module, train: tuple[Tensor, Tensor], checkpoints: list[dict],
                seed: int, progress: bool = False, trajectory: Any = None, options: dict | None = None) -> Tensor:
    """``[N]`` scores of method ``name`` whose **descending** order is the order of inspection;
    ``options``: keywords for its estimator (``--option``)."""
    options = options or {}
    if name in FI_VARIANTS:
        order = ORDERS.get(name, "support")
        if "checkpoints" in FORWARD_INF[name].needs:  # the self-influence averaged over the run's checkpoints
            per = []
            for state in checkpoints:
                snapshot = copy.deepcopy(model)
                snapshot.load_state_dict(state)
                per.append(_standardise(_oriented(_forward_inf(name, snapshot.eval(), train, options, progress),
                                                  order)))
            return torch.stack(per).mean(0)
        return _oriented(_forward_inf(name, model, train, options, progress), order)
    if options and name in ("loss", "random"):
        raise ValueError(f"{name} takes no --option keywords, got {sorted(options)}")
    if name == "loss":
        with torch.no_grad():
            return F.cross_entropy(model(train[0]), train[1], reduction="none")
    if name == "random":
        return torch.rand(len(train[1]), generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
    if name in BASELINES:
        run = fi.TrainingRun(model=model, checkpoints=checkpoints or (), trajectory=trajectory)
        est = make_estimator(name, model, fi.ClassificationTask(), run=run, **options)
        return est.fit(train).self_influence()
    raise ValueError(f"unknown method {name!r}; choose from {', '.join([*FI_VARIANTS, *BASELINES])}")


def sweep(model: nn.Module, train: tuple[Tensor, Tensor], flipped: Tensor) -> list[dict]:
    """Every Forward-INF score x update rule on the final model, in both orders."""
    rows = []
    for score in SWEEP_SCORES:
        for optimizer, lr in SWEEP_RULES:
            try:
                with timer() as t:
                    s = _forward_inf("forward-inf", model, train, {"score": score, "optimizer": optimizer, "lr": lr},
                                     False)
            except FloatingPointError:
                rows.append({"score": score, "optimizer": optimizer, "lr": lr, "diverged": True})
                continue
            orders = ("magnitude",) if score == "abs" else ("support", "descending")
            for order in orders:
                m = detection_metrics(_oriented(s, order), flipped)
                rows.append({"score": score, "optimizer": optimizer, "lr": lr, "order": order, **m,
                             "seconds": t["seconds"]})
    return rows


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fraction", type=float, default=0.2, help="fraction of training labels flipped (default: 0.2)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from: {', '.join([*FI_VARIANTS, *BASELINES])} (default: %(default)s)")
    add_option_argument(p)
    p.add_argument("--n-train", type=int, default=None, help="class-balanced training subset (default: per dataset)")
    p.add_argument("--model", default=None, help="mlp, cnn or resnet18 (default: per dataset)")
    p.add_argument("--width", type=int, default=None, help="cnn channels / resnet base width")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: per dataset)")
    p.add_argument("--checkpoints", type=int, default=5, help="training snapshots for TracIn / forward-inf-*-cp (default: 5)")
    p.add_argument("--sweep", action="store_true", help="also sweep Forward-INF's score and update rule (sweep.json)")


def _recipe(args: argparse.Namespace, name: str) -> dict:
    recipe = dict(NOISY_RECIPES.get(name, NOISY_RECIPES["fashion-mnist"]))
    for key, value in (("n_train", args.n_train), ("model", args.model), ("width", args.width),
                       ("epochs", args.epochs), ("lr", args.train_lr)):
        if value is not None:
            recipe[key] = value
    if recipe["model"] == "mlp":
        recipe.pop("width", None)
    return recipe


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    progress = not getattr(args, "quiet", False) and sys.stderr.isatty()
    split = load_dataset(args.dataset or "digits", args.data_root)
    recipe = _recipe(args, split.name)
    if recipe["n_train"]:
        split = subset(split, n_train=recipe["n_train"], seed=args.seed)
    if args.checkpoints < 1:
        raise ValueError(f"--checkpoints must be >= 1, got {args.checkpoints}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in FI_VARIANTS and m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join([*FI_VARIANTS, *BASELINES])}")
    options = method_options(args, methods)
    noisy, flipped = flip_labels(split.y_train, args.fraction, split.n_classes, seed=args.seed)
    if not 0 < int(flipped.sum()) < len(flipped):
        raise ValueError(f"--fraction {args.fraction} flips {int(flipped.sum())} of {len(flipped)} labels; need some of each")
    train = (split.x_train, noisy)
    config = {"dataset": split.name, **recipe, "n_train": len(noisy), "fraction": args.fraction,
              "n_flipped": int(flipped.sum()), "checkpoints": args.checkpoints, "seed": args.seed}
    kw = {"width": recipe["width"]} if recipe.get("width") else {}
    from forwardinf.baselines.methods import METHODS as REGISTERED, requirements

    record = any(m in REGISTERED and "trajectory" in requirements(m) for m in methods)
    model, checkpoints, train_seconds, trajectory = cached_training(
        Path(args.out) / "cache", config,
        lambda rec: train_noisy(split, noisy, recipe, args.seed, args.checkpoints, progress, record=rec),
        lambda: build_model(recipe["model"], split.input_shape, split.n_classes, **kw), trajectory=record)
    test_acc = accuracy(model, split.test())
    fit_noisy = accuracy(model, train)
    fit_flipped = accuracy(model, (split.x_train[flipped], noisy[flipped]))
    print(f"mislabel: {split.name}, {len(noisy)} training points, {int(flipped.sum())} flipped; model "
          f"{recipe['model']} ({train_seconds:.1f}s): clean test accuracy {test_acc:.3f}, fits {fit_noisy:.3f} of "
          f"the noisy training labels ({fit_flipped:.3f} of the flipped ones)")

    warm_up(model, train)
    results, curves = {}, {}
    oracle = oracle_found_at(float(flipped.float().mean()), 0.15)
    for name in methods:
        with timer() as t:
            try:
                scores = rank_scores(name, model, train, checkpoints, args.seed, progress, trajectory=trajectory,
                                     options=options.get(name))
            except TypeError as e:  # an unknown --option keyword
                raise ValueError(f"{name}: {e}; check its --option keywords") from e
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{name}: non-finite scores")
        m = detection_metrics(scores, flipped)
        m["seconds"] = t["seconds"]
        m["cpu_seconds"] = t["cpu_seconds"]
        results[name] = m
        curves[name] = detection_curve(scores.double().numpy(), flipped.numpy())
        print(f"  {name:20s} {t['seconds']:8.2f}s  found@15% {m['found_at_15pct']:.3f} (max {oracle:.2f})  "
              f"AUC {m['auc']:.3f}  80% after {m['inspect_for_80pct']:.1%}", flush=True)

    rows = [[n, round(r["seconds"], 2), r["found_at_15pct"], round(r["found_at_15pct"] / oracle, 3), r["auc"],
             r["found_at_nflip"], r["inspect_for_80pct"]] for n, r in results.items()]
    table = markdown_table(["method", "seconds", "found@15%", "found@15% / max", "AUC", "found@n_flipped",
                            "inspected for 80%"], rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _curve_figure(out / "detection_curve.png", curves, float(flipped.float().mean()), split.name)
    report = [f"# Mislabeled data detection ({split.name})", "",
              f"{len(noisy)} training points, {int(flipped.sum())} labels flipped ({args.fraction:.0%}) to random "
              f"other classes. Model `{recipe['model']}` trained {recipe['epochs']} epochs on the noisy labels "
              f"({train_seconds:.1f}s): clean test accuracy {test_acc:.3f}; it fits {fit_noisy:.3f} of the noisy "
              f"training labels and {fit_flipped:.3f} of the flipped ones.",
              f"A perfect ranking finds {oracle:.3f} of the flipped points in the first 15% inspected.", "",
              table, "", "![detection curve](detection_curve.png)"]
    if args.sweep:
        rows_sweep = sweep(model, train, flipped)
        write_json(out / "sweep.json", rows_sweep)
        ok = [r for r in rows_sweep if not r.get("diverged")]
        report += ["", "## Forward-INF sweep (final model)", "",
                   markdown_table(["score", "optimizer", "lr", "order", "found@15%", "AUC", "seconds"],
                                  [[r["score"], r["optimizer"], r["lr"], r["order"], r["found_at_15pct"], r["auc"],
                                    round(r["seconds"], 2)] for r in ok])]
    config.update({"options": options, "model_test_accuracy": test_acc, "fits_noisy_labels": fit_noisy,
                   "fits_flipped": fit_flipped, "train_seconds": train_seconds, "methods": methods,
                   "oracle_found_at_15pct": oracle})
    res = results_object("mislabel", split.name, config, results)
    write_outputs(out, res, "\n".join(report))
    print(f"wrote {out}/results.json, report.md, detection_curve.png")
    return res


def _curve_figure(path: Path, curves: dict, fraction: float, dataset: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    xs = np.linspace(0, 1, 201)
    ax.plot(xs, np.minimum(1, xs / fraction), color="0.6", ls=":", label="perfect")
    # tab10 and tab20's dark half without the greys: grey is reserved for "random".
    colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    colors += [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i % 2 and i not in (15,)]
    for j, (name, (inspected, found)) in enumerate(curves.items()):
        style = "-" if name.startswith("forward-inf") else "--"
        color = "0.45" if name == "random" else colors[j % len(colors)]
        ax.plot(inspected, found, style, color=color, lw=1.6 if j == 0 else 1.1, label=name)
    ax.axvline(0.15, color="0.75", lw=0.8)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(f"Mislabel detection, {dataset} ({fraction:.0%} flipped)", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
