"""Verify the Mirrored Influence Hypothesis against retraining (paper section 2.1, appendices B, E.1).

Two settings, both with real retraining ground truth:

convex (point-to-point, near-noiseless)
    L2-regularised multinomial logistic regression solved exactly (L-BFGS, then Newton to a
    gradient of 1e-12; warm-started retrainings). The paper's setup (appendix B: L2 0.001,
    scikit-learn inputs): --pixels unit --l2 1e-3. For the validation points with the highest loss:
    train-to-test influence by exact leave-one-out (N retrainings, shared by all queries) and
    test-to-train influence by adding each query and retraining; Pearson and Spearman over the
    training points per query, averaged. Extra columns: the influence-function estimate (closed
    form, exact Hessian) and Forward-INF on the same queries.

noisy (group-to-group)
    The paper's CNN without BatchNorm trained by SGD (lr 0.01, momentum 0.9, weight decay 1e-3,
    batch 64); 30 training groups with mislabel ratios linspace(0, 1, 30); a clean class-balanced
    validation set D_tst. Train-to-test: remove a group and retrain; test-to-train: add D_tst and
    retrain; each loss averaged over R training runs. By default (--pairing crn) the trainings of one
    run share common random numbers: the same initialisation and minibatch schedule over the slots
    of all examples, absent examples' slots skipped, so SGD noise cancels in the paired differences.
    The report gives each side's run-to-run agreement, the Spearman-Brown reliability of the R-run
    means, the correlation ceiling they imply and the R it would need. Forward-INF in joint mode (SGD ascent on
    D_tst, lr 0.01, weight decay 1e-3, 2 steps: Table 7) on each run's model, against test-to-train.

Retrainings run in --workers processes, show progress, and are cached under <out>/cache so an
interrupted run resumes. Scores follow the library's orientation (higher = proponent), i.e. the
paper's Inf(->) and Inf(<-) negated; correlations are unaffected and the plots use the paper's signs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from forwardinf import metrics as M
from forwardinf.baselines.methods import make_estimator
from forwardinf.baselines.retraining import LossProbe, concat, group_mean, run_trainings
from forwardinf.data.loaders import DataSplit, balanced_indices, load_dataset
from forwardinf.workloads import convex as cvx
from forwardinf.workloads.trainers import CNNTrainer, PairedCNNTrainer
from forwardinf.experiments.checks import UsageError, refuse_renamed
from forwardinf.experiments.common import seed_everything, timer
from forwardinf.experiments.report import markdown_table, pyplot, results_object, write_outputs
from forwardinf.experiments.setup import add_option_argument, method_options
from forwardinf.tasks.classification import ClassificationTask

SETTINGS = ("convex", "noisy", "both")

# The paper's numbers (Table 1; Table 7 at 500 validation points) for the report.
PAPER = {
    "mnist": {"convex": (0.9975, 0.9027), "noisy": (0.9640, 0.9907), "forward_inf": 0.9951},
    "fashion-mnist": {"convex": (0.9939, 0.7274), "noisy": (0.9752, 0.9915), "forward_inf": 0.9942},
    "cifar10": {"convex": (0.9673, 0.8069), "noisy": (0.8551, 0.8848), "forward_inf": 0.9862},
}
# The paper's subset sizes (appendix B and the authors' code).
CONVEX_N_TRAIN = 4900
NOISY_N_TRAIN = {"cifar10": 900}  # else 1,050
NOISY_EPOCHS = {"cifar10": 20}  # else 10
# Above this many parameters the exact Hessian (P x P, float64) no longer fits comfortably:
# 2x2-average-pool the images first (CIFAR-10: 3,072 -> 768 features).
MAX_CONVEX_PARAMS = 10_000
# Forward-INF per setting (registry names; --option NAME.KEY=VALUE overrides their keywords).
CONVEX_FI, NOISY_FI = "forward-inf-convex", "forward-inf-group"
FI_NAMES = {"convex": CONVEX_FI, "noisy": NOISY_FI}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", choices=SETTINGS, default="both", help="which study to run (default: both)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training set size (default: convex 4,900 or all of digits; noisy 1,050, CIFAR-10 900)")
    p.add_argument("--val-size", type=int, default=500,
                   help="validation set: noisy D_tst (Table 4 varies it); convex: where the queries come from")
    p.add_argument("--workers", type=int, default=1, help="parallel training processes (default: 1)")
    p.add_argument("--cache-dir", default=None, help="retraining cache (default: <out>/cache)")
    g = p.add_argument_group("convex setting")
    g.add_argument("--n-queries", type=int, default=10, help="highest-loss validation points used (default: 10)")
    g.add_argument("--l2", type=float, default=1e-3,
                   help="L2 strength on the mean loss (default: 1e-3, the paper's stated value)")
    g.add_argument("--sklearn-c", type=float, default=None,
                   help="set the L2 strength as scikit-learn's C instead: l2 = 1 / (C * n_train) "
                        "(sklearn minimises C * sum of losses + ||w||^2 / 2)")
    g.add_argument("--pixels", choices=("standardized", "unit"), default="unit",
                   help="logistic-regression pixel scale: the loader's mean/std standardisation, or "
                        "the raw intensities in [0, 1] (the usual scikit-learn input and the paper's; default: unit)")
    g.add_argument("--loo-points", type=int, default=None,
                   help="leave out only this many random training points (default: all, the paper); the "
                        "correlations are then over those points, the model is still trained on all")
    g.add_argument("--features", choices=("auto", "pixels", "pool2"), default="auto",
                   help="logistic-regression inputs; auto pools 2x2 when the model would exceed 10k parameters")
    g = p.add_argument_group("noisy setting")
    g.add_argument("--groups", type=int, default=30, help="training groups (default: 30)")
    g.add_argument("--mislabel-ratio", type=float, default=0.5,
                   help="overall mislabel ratio (Table 5); groups get linspace(0, 2r, G) (r <= 0.5) or "
                        "linspace(2r - 1, 1, G) (default: 0.5 = linspace(0, 1, 30))")
    g.add_argument("--pairing", choices=("crn", "independent"), default="crn",
                   help="crn (default): common random numbers, every training of one run shares the "
                        "initialisation and the minibatch schedule, removed or absent examples' slots are "
                        "skipped, so SGD noise cancels in the paired differences; independent: each "
                        "training shuffles its own subset (the paper's recipe)")
    g.add_argument("--runs", type=int, default=5, help="training runs every loss is averaged over (default: 5)")
    g.add_argument("--epochs", type=int, default=None, help="SGD epochs (default: 10; CIFAR-10 20)")
    g.add_argument("--train-lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    g.add_argument("--train-momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--train-weight-decay", type=float, default=1e-3, help="SGD weight decay (default: 1e-3)")
    g.add_argument("--train-batch-size", type=int, default=64, help="SGD batch size (default: 64)")
    g.add_argument("--width", type=int, default=32, help="CNN width: conv(w)-conv(2w)-fc(4w) (default: 32)")
    add_option_argument(p, f"{CONVEX_FI} (convex; default: one SGD step, lr 1e-3) or {NOISY_FI} (noisy; default: "
                           f"the 'group' preset, 2 SGD steps, lr 0.01, weight decay 1e-3, Table 7), e.g. {NOISY_FI}.lr=0.02")
    refuse_renamed(p, {"--lr": "--train-lr", "--momentum": "--train-momentum", "--weight-decay": "--train-weight-decay",
                       "--batch-size": "--train-batch-size", "--convex-fi-lr": f"--option {CONVEX_FI}.lr=VALUE",
                       **{f"--fi-{k}": f"--option {NOISY_FI}.{k.replace('-', '_')}=VALUE"
                          for k in ("steps", "lr", "weight-decay")}})


# ------------------------------------------------------------------------------------ data
def _check_args(args: argparse.Namespace) -> None:
    for name in ("val_size", "workers", "n_queries", "groups", "runs", "train_batch_size", "width"):
        v = getattr(args, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    for name in ("l2", "train_lr", "sklearn_c"):
        if name == "sklearn_c" and args.sklearn_c is None:
            continue
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.mislabel_ratio <= 1.0:
        raise ValueError(f"--mislabel-ratio must be in [0, 1], got {args.mislabel_ratio}")
    if args.loo_points is not None and args.loo_points < 3:
        raise ValueError(f"--loo-points must be at least 3 (a correlation needs points), got {args.loo_points}")
    if args.n_train is not None and args.n_train < 2:
        raise ValueError(f"--n-train must be at least 2, got {args.n_train}")
    for name, kw in fi_options(args).items():  # the --option keywords, on a stand-in model before any training
        try:
            make_estimator(name, nn.Linear(2, 2), ClassificationTask(), **kw)._check_params()
        except (ValueError, TypeError) as e:
            raise UsageError(f"--option {name}: {e}") from None
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}")


def split_train_val(split: DataSplit, n_train: int, n_val: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Class-balanced training indices (into the train split) and a clean balanced validation set.

    The validation set comes from the test split; when that is too small (digits: 450), the
    training points not used for training top it up. Returns ``(train_idx, x_val, y_val)``.
    """
    n_avail = len(split.y_train)
    if n_train > n_avail:
        raise ValueError(f"--n-train {n_train} exceeds the {n_avail} training examples of {split.name}")
    train_idx = balanced_indices(split.y_train, n_train, seed)
    if n_val <= len(split.y_test):
        vi = balanced_indices(split.y_test, n_val, seed + 1)
        return train_idx, split.x_test[vi], split.y_test[vi]
    unused = torch.ones(n_avail, dtype=torch.bool)
    unused[train_idx] = False
    x_pool = torch.cat([split.x_test, split.x_train[unused]])
    y_pool = torch.cat([split.y_test, split.y_train[unused]])
    if n_val > len(y_pool):
        raise ValueError(f"--val-size {n_val} exceeds the {len(y_pool)} examples left for validation in {split.name}")
    vi = balanced_indices(y_pool, n_val, seed + 1)
    return train_idx, x_pool[vi], y_pool[vi]


def group_ratios(n_groups: int, overall: float) -> np.ndarray:
    """Per-group mislabel ratios ``[G]`` spread linearly with mean ``overall`` (0.5 -> linspace(0, 1, G))."""
    if overall <= 0.5:
        return np.linspace(0.0, 2 * overall, n_groups)
    return np.linspace(2 * overall - 1, 1.0, n_groups)


def make_groups(y: Tensor, n_groups: int, overall: float, n_classes: int, seed: int) -> tuple[Tensor, list[np.ndarray], np.ndarray, Tensor]:
    """Random equal groups; flip ``round(ratio_g * |g|)`` labels of group ``g`` to another class.

    Returns ``(noisy_y [N], members, ratios [G], flipped [N] bool)``.
    """
    n = len(y)
    if n_groups > n:
        raise ValueError(f"--groups {n_groups} exceeds the {n} training points")
    rng = np.random.default_rng(seed)
    members = [np.sort(m) for m in np.array_split(rng.permutation(n), n_groups)]
    ratios = group_ratios(n_groups, overall)
    noisy = y.clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    for m, r in zip(members, ratios):
        k = int(round(r * len(m)))
        chosen = rng.choice(m, k, replace=False)
        shift = torch.from_numpy(rng.integers(1, n_classes, size=k))
        noisy[chosen] = (y[chosen] + shift) % n_classes  # always a different class
        flipped[chosen] = True
    return noisy, members, ratios, flipped


# ----------------------------------------------------------------------------- convex study
def _convex_features(x: Tensor, mode: str, n_classes: int) -> tuple[Tensor, str]:
    if mode == "auto":
        mode = "pixels" if (x[0].numel() + 1) * n_classes <= MAX_CONVEX_PARAMS else "pool2"
    if mode == "pool2":
        x = F.avg_pool2d(x, 2)
    return x.flatten(1), mode


def run_convex(split: DataSplit, args: argparse.Namespace, cache: Path, progress: bool) -> dict:
    """Exact leave-one-out vs add-the-query retraining on the highest-loss validation points."""
    n_train = args.n_train or min(CONVEX_N_TRAIN, len(split.y_train))
    train_idx, x_val, y_val = split_train_val(split, n_train, min(args.val_size, len(split.y_test)), args.seed)
    c = split.n_classes
    x_train = split.x_train[train_idx]
    if args.pixels == "unit":
        x_train, x_val = split.denormalize(x_train), split.denormalize(x_val)
    xt, features = _convex_features(x_train, args.features, c)
    xv, _ = _convex_features(x_val, features, c)
    yt = split.y_train[train_idx]
    train = TensorDataset(xt.double(), yt)
    n = len(yt)
    l2 = args.l2 if args.sklearn_c is None else 1.0 / (args.sklearn_c * n)

    with timer(children=True) as t_fit:
        model, h_inv = cvx.solve_reference(train, c, n, l2)
    val_losses = LossProbe((xv.double(), y_val))(model)
    nq = min(args.n_queries, len(y_val))
    q = torch.topk(val_losses, nq).indices
    queries = TensorDataset(xv[q].double(), y_val[q])
    acc = float((model(xv).argmax(1) == y_val).double().mean())
    train_fn = cvx.NewtonLogistic(train, model.state_dict(), h_inv, n_ref=n, l2=l2)
    everyone = np.arange(n)
    # The points whose leave-one-out is computed (all by default). A uniform random subset keeps
    # the problem (model, conditioning) the paper's and estimates the same correlations.
    k = n if args.loo_points is None else min(args.loo_points, n)
    points = everyone if k == n else np.sort(np.random.default_rng(args.seed).choice(n, k, replace=False))

    with timer(children=True) as t_loo:
        jobs = [(everyone, 0)] + [(np.delete(everyone, i), 0) for i in points]
        res = run_trainings(train_fn, train, jobs, LossProbe(queries), workers=args.workers, cache_dir=cache,
                            progress=progress, desc="convex leave-one-out")
        loo = torch.stack(res[1:]).T - res[0][:, None]  # [Q, K]: L(θ_{-i}, q) - L(θ, q)
    with timer(children=True) as t_add:
        pool = concat(train, queries)
        jobs = [(everyone, 0)] + [(np.append(everyone, n + j), 0) for j in range(nq)]
        res = run_trainings(train_fn, pool, jobs, LossProbe(train), workers=args.workers, cache_dir=cache,
                            progress=progress, desc="convex add-the-query")
        t2t = (res[0] - torch.stack(res[1:]))[:, points]  # [Q, K]: L(θ, z_i) - L(θ_{+q}, z_i)
    with timer(children=True) as t_if:
        if_scores = cvx.influence_scores(model, train, queries, n, l2, h_inv)[:, points]
    with timer(children=True) as t_fi:
        fi_scores = _forward_inf(CONVEX_FI, model, train, queries, joint=False, progress=progress,
                                 **fi_options(args)[CONVEX_FI])[:, points]
    dot = cvx.gradient_dot(model, train, queries)[:, points]

    def corr(a: Tensor, b: Tensor) -> dict:
        p, s = M.rowwise_correlation(a, b, "pearson"), M.rowwise_correlation(a, b, "spearman")
        return {"pearson": float(np.nanmean(p)), "spearman": float(np.nanmean(s)),
                "pearson_per_query": p.tolist(), "spearman_per_query": s.tolist()}

    hyp = corr(loo, t2t)
    methods = {
        "convex/retraining": {**hyp, "seconds": t_loo["seconds"] + t_add["seconds"],
                              "cpu_seconds": t_loo["cpu_seconds"] + t_add["cpu_seconds"],
                              "compares": "leave-one-out (train->test) vs add-the-query (test->train)",
                              "trainings": k + nq + 2},
        "convex/influence-function": {**corr(if_scores, loo), "seconds": t_if["seconds"],
                                      "cpu_seconds": t_if["cpu_seconds"],
                                      "compares": "influence function vs leave-one-out",
                                      "vs_test_to_train": corr(if_scores, t2t)["pearson"]},
        f"convex/{CONVEX_FI}": {**corr(fi_scores, t2t), "seconds": t_fi["seconds"], "cpu_seconds": t_fi["cpu_seconds"],
                               "compares": "Forward-INF vs add-the-query (test->train)",
                               "vs_leave_one_out": corr(fi_scores, loo)["pearson"],
                               # one plain SGD step is, to first order, the gradient dot product
                               # (TracIn-like, no inverse Hessian): these two show why it trails the IF
                               "vs_gradient_dot": corr(fi_scores, dot)["pearson"],
                               "gradient_dot_vs_test_to_train": corr(dot, t2t)["pearson"]},
    }
    info = {"n_train": n, "loo_points": k, "n_queries": nq, "val_size": len(y_val), "features": features,
            "n_params": int((xt.shape[1] + 1) * c), "l2": l2, "pixels": args.pixels, "val_accuracy": acc,
            "query_losses": val_losses[q].tolist(), "fit_seconds": t_fit["seconds"],
            "fit_cpu_seconds": t_fit["cpu_seconds"],
            "max_grad": cvx.max_gradient(model, train, n, l2)}
    arrays = {"loo": loo, "t2t": t2t, "if": if_scores, "fi": fi_scores, "points": torch.from_numpy(points)}
    return {"methods": methods, "info": info, "arrays": arrays}


def fi_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--option`` keywords per Forward-INF of this study (``{CONVEX_FI: {...}, NOISY_FI: {...}}``)."""
    return {CONVEX_FI: {}, NOISY_FI: {}, **method_options(args, [CONVEX_FI, NOISY_FI])}


def _forward_inf(name: str, model: nn.Module, train: Any, queries: Any, *, joint: bool, progress: bool,
                 **overrides: Any) -> Tensor:
    """``name``'s scores (a registry variant: ``forward-inf-convex`` / ``forward-inf-group``), float64."""
    est = make_estimator(name, model, ClassificationTask(), progress=progress, **overrides)
    return est.fit(train).influence(queries, joint=joint).double()


# ------------------------------------------------------------------------------ noisy study
def run_noisy(split: DataSplit, args: argparse.Namespace, cache: Path, progress: bool) -> dict:
    """Remove-a-group vs add-the-validation-set retraining, averaged over ``--runs`` trainings.

    With ``--pairing crn`` the pool handed to the trainer carries each example's slot ``[n + nv]``
    (:class:`PairedCNNTrainer`); the loss probes use the plain pool.
    """
    n_train = args.n_train or NOISY_N_TRAIN.get(split.name, 1050)
    train_idx, x_val, y_val = split_train_val(split, n_train, args.val_size, args.seed)
    c = split.n_classes
    x, y_clean = split.x_train[train_idx], split.y_train[train_idx]
    y, members, ratios, flipped = make_groups(y_clean, args.groups, args.mislabel_ratio, c, args.seed)
    train, val = TensorDataset(x, y), TensorDataset(x_val, y_val)
    n, nv, runs = len(y), len(y_val), list(range(args.seed, args.seed + args.runs))
    epochs = args.epochs or NOISY_EPOCHS.get(split.name, 10)
    recipe = (tuple(split.input_shape), c, epochs, args.train_lr, args.train_momentum, args.train_weight_decay,
              args.train_batch_size, args.width)
    pool = concat(train, val)
    everyone = np.arange(n)
    probe = LossProbe(pool)
    if args.pairing == "crn":
        train_fn: CNNTrainer = PairedCNNTrainer(*recipe, pool_size=n + nv,
                                                steps_per_epoch=-(-n // args.train_batch_size))
        train_pool = TensorDataset(*pool.tensors, torch.arange(n + nv))  # + each example's slot
    else:
        train_fn, train_pool = CNNTrainer(*recipe), pool

    with timer(children=True) as t_ret:
        base_models = run_trainings(train_fn, train_pool, [(everyone, r) for r in runs], None, workers=args.workers,
                                    cache_dir=cache, progress=progress, desc="noisy base models")
        base = torch.stack([probe(m) for m in base_models]).double()  # [R, n + nv]
        # Run-major order: an interrupted run leaves whole runs finished, so a rerun with fewer
        # --runs finds all of its trainings in the cache (the cache key ignores the order).
        g = len(members)
        jobs = [job for r in runs
                for job in [(np.setdiff1d(everyone, m), r) for m in members] + [(np.arange(n + nv), r)]]
        res = run_trainings(train_fn, train_pool, jobs, probe, workers=args.workers, cache_dir=cache,
                            progress=progress, desc="noisy retraining")
        res = torch.stack(res).double().view(len(runs), g + 1, -1)  # [R, G + 1, n + nv]
        left_out = res[:, :g].transpose(0, 1)  # [G, R, n + nv]
        added = res[:, g]  # [R, n + nv]
        # train -> test (proponent-oriented): L(A(D \ D_g), D_tst) - L(A(D), D_tst), mean over runs
        per_run_ttt = (left_out[:, :, n:].mean(-1) - base[None, :, n:].mean(-1)).T  # [R, G]
        train_to_test = per_run_ttt.mean(0)  # [G]
        # test -> train (proponent-oriented): L(A(D), D_g) - L(A(D ∪ D_tst), D_g)
        per_run_t2t = group_mean(base[:, :n] - added[:, :n], members)  # [R, G]
        test_to_train = per_run_t2t.mean(0)  # [G]
    with timer(children=True) as t_fi:
        fi_runs = [_forward_inf(NOISY_FI, m, train, val, joint=True, progress=progress, **fi_options(args)[NOISY_FI])
                   for m in base_models]
        forward_inf = group_mean(torch.stack(fi_runs).mean(0), members)  # [G]

    def corr(a: Tensor, b: Tensor) -> dict:
        return {"pearson": M.pearson(a, b), "spearman": M.spearman(a, b)}

    accs = [float((m(x_val).argmax(1) == y_val).double().mean()) for m in base_models]
    methods = {
        "noisy/retraining": {**corr(train_to_test, test_to_train), "seconds": t_ret["seconds"],
                             "cpu_seconds": t_ret["cpu_seconds"],
                             "compares": "remove group (train->test) vs add D_tst (test->train)",
                             "trainings": len(runs) * (len(members) + 2)},
        f"noisy/{NOISY_FI}": {**corr(forward_inf, test_to_train), "seconds": t_fi["seconds"] / len(runs),
                              "cpu_seconds": t_fi["cpu_seconds"] / len(runs),
                              "compares": "Forward-INF (joint, per run, averaged) vs add D_tst (test->train)",
                              "vs_train_to_test": corr(forward_inf, train_to_test)},
    }
    info = {**_run_agreement(per_run_ttt, per_run_t2t), "pairing": args.pairing, "n_train": n, "val_size": nv, "groups": len(members), "group_size": int(len(members[0])),
            "mislabel_ratio": float(flipped.double().mean()), "runs": len(runs), "epochs": epochs,
            "val_accuracy_per_run": accs, "ratios": ratios.tolist()}
    arrays = {"train_to_test": train_to_test, "test_to_train": test_to_train, "forward_inf": forward_inf,
              "ratios": torch.from_numpy(ratios)}
    return {"methods": methods, "info": info, "arrays": arrays}


def spearman_brown(r: float, runs: int) -> float:
    """Reliability of the mean of ``runs`` runs whose single runs agree at correlation ``r``."""
    return runs * r / (1 + (runs - 1) * r) if r > 0 else 0.0


def runs_needed(r_x: float, r_y: float, target: float, limit: int = 10_000) -> int | None:
    """Fewest runs ``R`` whose ceiling ``sqrt(rel_x(R) rel_y(R))`` reaches ``target`` (None: not by ``limit``).

    The ceiling is what two perfectly related quantities, each measured as a mean of ``R`` noisy
    runs, can show as their correlation (Spearman-Brown, attenuation by unreliability).
    """
    for runs in range(1, limit + 1):
        if np.sqrt(spearman_brown(r_x, runs) * spearman_brown(r_y, runs)) >= target:
            return runs
    return None


def _run_agreement(train_to_test: Tensor, test_to_train: Tensor, target: float = 0.8) -> dict:
    """How reproducible each side is across training runs: mean Spearman between runs ``[R, G]``.

    Low agreement means a side is dominated by the randomness of SGD (initialisation, order), and
    averaging ``R`` runs cannot make it correlate with anything better than it correlates with itself:
    also returns the reliability of the ``R``-run means, the correlation ceiling they imply and the
    runs the ceiling would need to reach ``target``.
    """
    out: dict = {}
    r = train_to_test.shape[0]
    for name, v in (("train_to_test", train_to_test), ("test_to_train", test_to_train)):
        pairs = [M.spearman(v[a], v[b]) for a in range(r) for b in range(a + 1, r)]
        out[f"{name}_run_agreement"] = float(np.mean(pairs)) if pairs else float("nan")
        out[f"{name}_reliability"] = spearman_brown(out[f"{name}_run_agreement"], r) if pairs else float("nan")
    if r > 1:
        out["correlation_ceiling"] = float(np.sqrt(out["train_to_test_reliability"] * out["test_to_train_reliability"]))
        out[f"runs_for_ceiling_{target}"] = runs_needed(out["train_to_test_run_agreement"],
                                                        out["test_to_train_run_agreement"], target)
    return out


# ---------------------------------------------------------------------------------- plots
def _plot_convex(arrays: dict, path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    q = arrays["loo"].shape[0]
    colors = plt.cm.tab10(np.arange(q) % 10)
    # the paper's signs: Inf(->) = L(A(D)) - L(A(D \ z_i)), Inf(<-) = L(A(D ∪ q)) - L(A(D))
    for j in range(q):
        axes[0].scatter(-arrays["loo"][j], -arrays["t2t"][j], s=4, color=colors[j], alpha=0.6)
        axes[1].scatter(-arrays["t2t"][j], -arrays["fi"][j], s=4, color=colors[j], alpha=0.6)
    axes[0].set_xlabel("train→test  Inf(z_i → z_tst)  (leave-one-out)")
    axes[0].set_ylabel("test→train  Inf(z_i ← z_tst)  (add z_tst)")
    axes[0].set_title("Mirrored influence, convex")
    axes[1].set_xlabel("test→train  Inf(z_i ← z_tst)")
    axes[1].set_ylabel("−Forward-INF score")
    axes[1].set_title("Forward-INF vs retraining")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_noisy(arrays: dict, path: Path, title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    r = arrays["ratios"].numpy()
    sc = axes[0].scatter(-arrays["train_to_test"], -arrays["test_to_train"], c=r, cmap="viridis", s=30)
    axes[0].set_xlabel("train→test  Inf(D_i → D_tst)  (remove group)")
    axes[0].set_ylabel("test→train  Inf(D_i ← D_tst)  (add D_tst)")
    axes[0].set_title("Mirrored influence, noisy groups")
    axes[1].scatter(-arrays["test_to_train"], -arrays["forward_inf"], c=r, cmap="viridis", s=30)
    axes[1].set_xlabel("test→train  Inf(D_i ← D_tst)")
    axes[1].set_ylabel("−Forward-INF score (joint)")
    axes[1].set_title("Forward-INF vs retraining (Table 7)")
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    fig.colorbar(sc, ax=axes, label="group mislabel ratio", shrink=0.85)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict:
    _check_args(args)
    seed_everything(args.seed)
    progress = not args.quiet
    split = load_dataset(args.dataset or "digits", args.data_root)
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    settings = ("convex", "noisy") if args.setting == "both" else (args.setting,)
    methods: dict[str, dict] = {}
    details: dict[str, dict] = {}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for setting in settings:
        with timer(children=True) as t:
            result = (run_convex if setting == "convex" else run_noisy)(split, args, cache, progress)
        methods.update(result["methods"])
        details[setting] = {**result["info"], "wall_seconds": t["seconds"], "cpu_seconds": t["cpu_seconds"]}
        plot = _plot_convex if setting == "convex" else _plot_noisy
        plot(result["arrays"], out / f"hypothesis_{setting}.png", f"{split.name}, {setting} setting")
        torch.save({k: v.cpu() for k, v in result["arrays"].items()}, out / f"hypothesis_{setting}_scores.pt")
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    config["details"] = details
    config["wall_seconds"] = time.perf_counter() - start
    results = results_object("hypothesis", split.name, config, methods)
    report = _report(split.name, methods, details, args)
    write_outputs(out, results, report)
    if not args.quiet:
        print(report)
    return results


def _report(dataset: str, methods: dict, details: dict, args: argparse.Namespace) -> str:
    paper = PAPER.get(dataset)
    rows = []

    def add(setting: str, key: str, ref_pair: tuple | None, fi_ref: float | None) -> None:
        hyp = methods.get(f"{setting}/retraining")
        if hyp is None:
            return
        label = {"convex": "Near-noiseless (point-to-point)", "noisy": "Noisy (group-to-group)"}[setting]
        extra_if = methods.get(f"{setting}/influence-function")
        fi = methods[f"{setting}/{FI_NAMES[setting]}"]
        for i, metric in enumerate(("pearson", "spearman")):
            rows.append([label if i == 0 else "", metric.capitalize(), hyp[metric],
                         extra_if[metric] if extra_if else "-", fi[metric],
                         ref_pair[i] if ref_pair else "-",
                         (fi_ref if (fi_ref is not None and metric == "pearson" and setting == "noisy") else "-")])

    add("convex", "convex", paper["convex"] if paper else None, None)
    add("noisy", "noisy", paper["noisy"] if paper else None, paper["forward_inf"] if paper else None)
    header = ["Setting", "Metric", "train→test vs test→train (retraining)", "IF vs leave-one-out",
              "Forward-INF vs test→train", f"paper: hypothesis ({dataset})", "paper: Forward-INF (Table 7)"]
    lines = [f"# Mirrored Influence Hypothesis: {dataset}", "",
             "Table 1 layout. Correlations over training points (convex; averaged over the queries) or over "
             "groups (noisy).", "", markdown_table(header, rows), ""]
    for setting, info in details.items():
        lines.append(f"**{setting}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()
                                                   if not isinstance(v, list)))
        lines.append("")
    secs = [[name, m.get("seconds", float("nan")), m.get("cpu_seconds", float("nan")), m.get("trainings", "-")]
            for name, m in methods.items()]
    lines += [markdown_table(["method", "wall seconds", "CPU seconds", "trainings"], secs), "",
              "Seconds of a rerun that found its trainings in the cache measure only the loading."]
    if paper is None:
        lines.append(f"The paper reports no numbers for {dataset}.")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
