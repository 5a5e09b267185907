"""Shapley values and HyDRA beside Forward-INF on digits, and the survey's complexity table measured.

    # leakage + mislabel detection on all of digits (1,347 training points)
    python benchmarks/survey_table.py detect
    # a 200-point subset, with TMC-Shapley (last-layer retraining) and HyDRA's Hessian form included
    python benchmarks/survey_table.py detect --n-train 200 --n-queries 20 --tmc --permutations 20 --hessian
    # the survey's Table 1 (full and incremental time) measured on one setting
    python benchmarks/survey_table.py complexity

``detect`` uses the library's own experiment pieces (``leaked_queries``/``detection`` of the leakage
experiment, ``flip_labels``/``detection_metrics``/``rank_scores`` of the mislabel experiment), so its
numbers compare with ``forwardinf leakage`` / ``forwardinf mislabel``. Each model is trained once
with ``train_classifier`` under a :class:`TrajectoryRecorder` (HyDRA needs the trajectory):

- leakage: the leakage experiment's digits recipe (MLP 64-128-10, SGD lr 0.05, momentum 0.9, batch
  64, 30 epochs); training points copied as queries; T-1/T-5/T-10 = the copy ranks first / in the
  top 5 / top 10 (ties count against).
- mislabel: 20% of the labels flipped, the same MLP trained 100 epochs (the mislabel experiment's
  digits recipe, so the noisy labels are fitted); points inspected by decreasing self-influence
  (Forward-INF: lowest support first, as ``forwardinf mislabel`` does).

``complexity`` times every estimator on the leakage setting: *full* = ``fit`` + the first query,
*incremental* = each further query (mean over 10 asked together). Retraining-based methods (LOO,
Downsampling) are projected from one measured training of the same recipe.

All runs are single-threaded on a shared 2-core machine, under heavy contention from other jobs:
seconds are indicative and comparable only within one output file. Writes
``benchmarks/results/shapley_hydra_<setting>.md`` and ``survey_complexity_<setting>.md``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import forwardinf as fi
from forwardinf.baselines.hydra import HyDRA, TrajectoryRecorder
from forwardinf.baselines.shapley import KNNShapley, LastLayerTrainer, TMCShapley
from forwardinf.data.loaders import load_digits, subset
from forwardinf.experiments.report import markdown_table
from forwardinf.experiments.leakage import detection, leaked_queries
from forwardinf.data.labels import flip_labels
from forwardinf.experiments.mislabel import detection_metrics, rank_scores
from forwardinf.models import build_model
from forwardinf.training import accuracy, train_classifier

RESULTS = Path(__file__).parent / "results"
def contention() -> str:
    """The machine's state, measured now (1-minute load average)."""
    return (f"Single-threaded on a shared {os.cpu_count()}-core machine under contention from other jobs (load average "
            f"{os.getloadavg()[0]:.1f} when this file was written): seconds are indicative and comparable only within "
            "this file.")


def train_recorded(split: Any, y: torch.Tensor, epochs: int, seed: int) -> tuple[torch.nn.Module, TrajectoryRecorder, float]:
    """The MLP trained by ``train_classifier`` (SGD lr 0.05, momentum 0.9, batch 64), every step recorded."""
    model = build_model("mlp", split.input_shape, split.n_classes, seed=seed)
    rec = TrajectoryRecorder(model)
    start = time.perf_counter()
    with rec.recording((split.x_train, y)) as watched:
        train_classifier(model, watched, epochs=epochs, lr=0.05, batch_size=64, seed=seed)
    return model.eval(), rec, time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def timed_cpu(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``: on a contended machine the CPU time
    is the steadier measure of the work done (single-threaded here)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


# ------------------------------------------------------------------------------------ detect
def leakage(split: Any, args: argparse.Namespace) -> tuple[str, dict]:
    model, rec, train_s = train_recorded(split, split.y_train, 30, args.seed)
    train = split.train()
    n_q = min(args.n_queries, len(split.y_train))
    idx, xq, yq = leaked_queries(split, n_q, args.seed, near=False)
    task = fi.ClassificationTask()
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "forward-inf": lambda: fi.ForwardINF(model, task).fit(train).influence((xq, yq)),
        "knn-shapley (K=10, penultimate)": lambda: KNNShapley(model, task, k=10).fit(train).influence((xq, yq)),
        "knn-shapley (K=1, penultimate)": lambda: KNNShapley(model, task, k=1).fit(train).influence((xq, yq)),
        "knn-banzhaf (K=10, penultimate)": lambda: KNNShapley(model, task, k=10, weighting="banzhaf").fit(train).influence((xq, yq)),
        "hydra (fast, all layers)": lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec)).fit(train).influence((xq, yq)),
        "hydra (fast, last layer)": lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), params="last").fit(train).influence((xq, yq)),
    }
    if args.hessian:
        methods["hydra (Hessian, last layer)"] = lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), params="last",
                                                               hessian=True).fit(train).influence((xq, yq))
    tmc = TMCShapley(LastLayerTrainer(model), task, permutations=args.permutations, truncation=0.05, seed=args.seed)
    if args.tmc:
        methods[f"tmc-shapley (last layer, {args.permutations} perms, trunc 0.05)"] = lambda: tmc.fit(train).influence((xq, yq))
    rows, out = [], {}
    for name, fn in methods.items():
        scores, seconds = timed(fn)
        m = detection(scores.double(), idx)
        out[name] = {**m, "seconds": seconds}
        rows.append([name, round(seconds, 2), m["top1"], m["top5"], m["top10"], round(m["mean_rank"], 1)])
        print(f"  leakage {name:40s} {seconds:8.2f}s  T-1 {m['top1']:.3f}  T-5 {m['top5']:.3f}  T-10 {m['top10']:.3f}", flush=True)
    text = (f"## Leakage detection\n\nMLP trained 30 epochs ({len(rec)} recorded SGD steps, {train_s:.1f}s; test "
            f"accuracy {accuracy(model, split.test()):.3f}); {n_q} training points copied as queries.\n\n"
            + markdown_table(["method", "seconds", "T-1", "T-5", "T-10", "mean rank"], rows) + "\n"
            + _tmc_note(tmc))
    return text, out


def mislabel(split: Any, args: argparse.Namespace) -> tuple[str, dict]:
    noisy, flipped = flip_labels(split.y_train, 0.2, split.n_classes, seed=args.seed)
    model, rec, train_s = train_recorded(split, noisy, 100, args.seed)
    train = (split.x_train, noisy)
    task = fi.ClassificationTask()
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "forward-inf-margin (support order)": lambda: rank_scores("forward-inf-margin", model, train, [], args.seed),
        "loss": lambda: rank_scores("loss", model, train, [], args.seed),
        "random": lambda: rank_scores("random", model, train, [], args.seed),
        "knn-shapley self (K=10, penultimate)": lambda: KNNShapley(model, task, k=10).fit(train).self_influence(),
        "knn-shapley self (K=10, inputs)": lambda: KNNShapley(model, task, k=10, embedding="inputs").fit(train).self_influence(),
        "hydra self (fast, all layers)": lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec)).fit(train).self_influence(),
        "hydra self (fast, last layer)": lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), params="last").fit(train).self_influence(),
    }
    if args.hessian:
        methods["hydra self (Hessian, last layer)"] = lambda: HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), params="last",
                                                                    hessian=True).fit(train).self_influence()
    tmc = TMCShapley(LastLayerTrainer(model), task, permutations=args.permutations, seed=args.seed)
    if args.tmc:
        methods[f"tmc-shapley self (last layer, {args.permutations} perms)"] = lambda: tmc.fit(train).self_influence()
    rows, out = [], {}
    for name, fn in methods.items():
        scores, seconds = timed(fn)
        m = detection_metrics(scores, flipped)
        out[name] = {**m, "seconds": seconds}
        rows.append([name, round(seconds, 2), m["found_at_15pct"], m["auc"], m["inspect_for_80pct"]])
        print(f"  mislabel {name:40s} {seconds:8.2f}s  found@15% {m['found_at_15pct']:.3f}  AUC {m['auc']:.3f}", flush=True)
    text = (f"## Mislabel detection\n\n{int(flipped.sum())} of {len(noisy)} labels flipped; MLP trained 100 epochs on "
            f"the noisy labels ({len(rec)} recorded steps, {train_s:.1f}s), fitting {accuracy(model, train):.3f} of "
            f"them; clean test accuracy {accuracy(model, split.test()):.3f}. found@15% is at most 0.75 "
            "(20% flipped).\n\n"
            + markdown_table(["method", "seconds", "found@15%", "AUC", "inspected for 80%"], rows) + "\n"
            + _tmc_note(tmc))
    return text, out


def _tmc_note(tmc: TMCShapley) -> str:
    d = getattr(tmc, "diagnostics_", None)
    if d is None:
        return ""
    return (f"\nTMC-Shapley diagnostics: {d['permutations']} permutations, {d['trainings']} head fits, relative "
            f"standard error {d['relative_stderr']:.3f}, split R-hat max {d['rhat_max']:.3f} / mean "
            f"{d['rhat_mean']:.3f} (4 chains), mean truncation point {d['mean_truncated_at']:.2f} of the "
            "permutation.\n")


def detect(args: argparse.Namespace, split: Any, tag: str) -> None:
    command = " ".join(["python benchmarks/survey_table.py detect",
                        *( [f"--n-train {args.n_train}"] if args.n_train else []),
                        f"--n-queries {args.n_queries}",
                        *(["--tmc", f"--permutations {args.permutations}"] if args.tmc else []),
                        *(["--hessian"] if args.hessian else []),
                        f"--parts {args.parts}"])
    md = [f"# Shapley values and HyDRA on digits ({len(split.y_train)} training points)", "",
          f"Command: `{command}`", "", contention(), ""]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if "leakage" in parts:
        md.append(leakage(split, args)[0])
    if "mislabel" in parts:
        md.append(mislabel(split, args)[0])
    path = RESULTS / f"shapley_hydra_{tag}.md"
    path.write_text("\n".join(md))
    print(f"wrote {path}")


# -------------------------------------------------------------------------------- complexity
SURVEY = {  # survey Table 1: (full, incremental, storage)
    "LOO": ("O(nT)", "O(n)", "O(np)"),
    "Downsampling": ("O(KT)", "O(K)", "O(Kp)"),
    "Shapley": ("O(2^n T)", "O(2^n)", "O(2^n p)"),
    "Inf. func.": ("O(np)", "O(np)", "0"),
    "Rep. pt.": ("O(n)", "O(n)", "0"),
    "TracIn": ("O(npT)", "O(npT)", "O(pT)"),
    "HyDRA": ("O(npT)", "O(np)", "O(pT + np)"),
    "Forward-INF": ("O(n) fwd + K bwd", "O(n) fwd + K bwd", "0"),
}


def complexity(args: argparse.Namespace, split: Any, tag: str) -> None:
    from forwardinf.baselines.methods import make_estimator

    model, rec, train_s = train_recorded(split, split.y_train, 30, args.seed)
    train = split.train()
    n, p, steps = len(split.y_train), sum(q.numel() for q in model.parameters()), len(rec)
    idx, xq, yq = leaked_queries(split, 11, args.seed, near=False)
    first, rest = (xq[:1], yq[:1]), (xq[1:], yq[1:])
    task = fi.ClassificationTask()
    # Five checkpoints at every 6th epoch: the states before steps T/5, 2T/5, ... and the final model.
    cuts = [round(steps * c / 5) for c in range(1, 5)]
    checkpoints = [rec.steps_[c].state for c in cuts] + [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    lrs = [0.05] * 5
    rows = []
    measured: dict[str, dict] = {}

    def measure(label: str, family: str, make: Callable[[], Any], note: str = "") -> None:
        est = make()
        _, fit_s, fit_c = timed_cpu(lambda: est.fit(train))
        _, q1, q1_c = timed_cpu(lambda: est.influence(first))
        _, q10, q10_c = timed_cpu(lambda: est.influence(rest))
        full, inc, full_c, inc_c = fit_s + q1, q10 / 10, fit_c + q1_c, q10_c / 10
        if isinstance(est, TMCShapley):
            d = est.diagnostics_
            note = (f"{note} Last call: {d['permutations']} permutations, {d['trainings']} head fits, truncated at "
                    f"{d['mean_truncated_at']:.2f} of the permutation on average.").strip()
        theory = SURVEY[family]
        measured[label] = {"full_s": full, "incremental_s": inc, "full_cpu_s": full_c, "incremental_cpu_s": inc_c}
        rows.append([family, label, theory[0], theory[1], round(full, 3), round(full_c, 3), round(inc, 4),
                     round(inc_c, 4), theory[2], note])
        print(f"  {label:34s} full {full:9.3f}s ({full_c:.3f} CPU)  incremental {inc:9.4f}s/query "
              f"({inc_c:.4f} CPU)", flush=True)

    # The registry's names and defaults: the estimators `forwardinf leakage --methods ...` runs.
    measure("forward-inf", "Forward-INF", lambda: make_estimator("forward-inf", model, task))
    measure("if-100 (LiSSA depth 100)", "Inf. func.", lambda: make_estimator("if-100", model, task))
    measure("if-cg (≤100 CG iterations)", "Inf. func.", lambda: make_estimator("if-cg", model, task))
    measure("representer", "Rep. pt.", lambda: make_estimator("representer", model, task))
    measure("tracin-5 (5 checkpoints)", "TracIn", lambda: make_estimator("tracin-5", model, task, run=fi.TrainingRun(checkpoints=checkpoints, lrs=lrs)))
    measure("hydra (fast, all layers)", "HyDRA", lambda: make_estimator("hydra", model, task, run=fi.TrainingRun(trajectory=rec)),
            f"{steps} steps; hypergradients n x p = {n * p * 4 / 2**20:.0f} MB")
    measure("hydra-last (fast, last layer)", "HyDRA", lambda: make_estimator("hydra-last", model, task, run=fi.TrainingRun(trajectory=rec)))
    measure("knn-shapley (K=10, penultimate)", "Shapley", lambda: make_estimator("knn-shapley", model, task),
            "exact for the KNN surrogate: O(n log n) per query")
    measure(f"tmc-shapley (last layer, {args.permutations} perms, trunc 0.05)", "Shapley",
            lambda: make_estimator("tmc-shapley", model, task, permutations=args.permutations),
            "TMC is O(P n T): P permutations of up to n trainings (here T = one L-BFGS head fit). "
            "Queries asked together share the trainings; a later query reruns them.")

    # Retraining ground truth: one measured training of the same recipe, times the count needed
    # (wall and CPU seconds projected alike).
    fresh = build_model("mlp", split.input_shape, split.n_classes, seed=args.seed + 1)
    _, t_train, c_train = timed_cpu(lambda: train_classifier(fresh, train, epochs=30, lr=0.05, batch_size=64,
                                                             seed=args.seed))
    with torch.no_grad():
        _, t_fwd, c_fwd = timed_cpu(lambda: [fresh(xq[:1]) for _ in range(100)])
    t_fwd, c_fwd = t_fwd / 100, c_fwd / 100
    head = LastLayerTrainer(model)
    _, t_head, c_head = timed_cpu(lambda: [head(train, 0) for _ in range(3)])
    t_head, c_head = t_head / 3, c_head / 3
    perms, k = 100, 100
    projections: dict[str, float] = {}

    def projected(family: str, label: str, count: int, wall: float, cpu: float, inc: tuple | None, note: str) -> None:
        theory = SURVEY[family]
        inc_w, inc_c = (round(inc[0], 4), round(inc[1], 4)) if inc else ("-", "-")
        rows.append([family, label, theory[0], theory[1], round(count * wall, 1), round(count * cpu, 1), inc_w, inc_c,
                     theory[2], note])
        projections[label] = count * cpu

    projected("Shapley", f"tmc-shapley, last layer, P={perms}, no truncation (projected)", perms * (n - 1), t_head, c_head,
              (perms * (n - 1) * t_fwd, perms * (n - 1) * c_fwd),
              f"{perms} x {n - 1} head fits x {t_head:.3f}s ({c_head:.3f} CPU s) measured (full-data fit); a new query "
              "re-evaluates the same trainings if their models are kept")
    projected("Shapley", "tmc-shapley, whole MLP, P=100 (projected)", perms * (n - 1), t_train, c_train, None,
              f"{perms} x {n - 1} trainings x {t_train:.2f}s ({c_train:.2f} CPU s) measured")
    projected("LOO", "leave-one-out (projected)", n + 1, t_train, c_train, ((n + 1) * t_fwd, (n + 1) * c_fwd),
              f"{n + 1} trainings x {t_train:.2f}s ({c_train:.2f} CPU s) measured; stored models: "
              f"{(n + 1) * p * 4 / 2**20:.0f} MB")
    projected("Downsampling", f"Downsampling K={k} (projected)", k, t_train, c_train, (k * t_fwd, k * c_fwd),
              f"{k} trainings x {t_train:.2f}s ({c_train:.2f} CPU s) measured")
    table = markdown_table(["survey family", "estimator (this run)", "survey full", "survey incremental",
                            "full s (fit + 1st query)", "full CPU s", "incremental s/query", "incremental CPU s/query",
                            "survey storage", "note"], rows)
    fi_full, fi_inc = measured["forward-inf"]["full_cpu_s"], measured["forward-inf"]["incremental_cpu_s"]
    ratios = markdown_table(["estimator", "full CPU / Forward-INF's", "incremental CPU / Forward-INF's"],
                            [[k, round(v["full_cpu_s"] / fi_full, 2), round(v["incremental_cpu_s"] / max(fi_inc, 1e-9), 2)]
                             for k, v in measured.items() if k != "forward-inf"]
                            + [[k, round(v / fi_full, 1), "-"] for k, v in projections.items()])
    command = f"python benchmarks/survey_table.py complexity --permutations {args.permutations}"
    md = [f"# The survey's complexity table, measured ({tag}: n = {n}, p = {p}, T = {steps})", "",
          f"Command: `{command}`", "",
          "Setting: digits, MLP 64-128-10 trained with `train_classifier` (SGD lr 0.05, momentum 0.9, batch 64, "
          f"30 epochs = {steps} steps, {train_s:.1f}s with the trajectory recorded); queries are copies of training "
          "points. *Full* = `fit` + the first query; *incremental* = each further query (10 asked together, "
          "divided by 10). Survey columns are Table 1 of Hammoudeh & Lowd (n training points, p parameters, "
          "T iterations, K models). Estimators are built by the method registry with its defaults "
          "(`make_estimator(name, ...)`, what `forwardinf leakage --methods NAME` runs). Wall seconds and CPU "
          "seconds (`time.process_time`, one thread) of the same call.", "", contention(), "", table, "",
          "## Cost relative to Forward-INF (CPU seconds, same run)", "", ratios, ""]
    path = RESULTS / f"survey_complexity_{tag}.md"
    path.write_text("\n".join(md))
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("detect", "complexity"))
    p.add_argument("--n-train", type=int, default=None, help="class-balanced digits subset (default: all 1,347)")
    p.add_argument("--n-queries", type=int, default=50)
    p.add_argument("--tmc", action="store_true", help="detect: include TMC-Shapley (last-layer retraining)")
    p.add_argument("--permutations", type=int, default=20, help="TMC-Shapley permutations")
    p.add_argument("--hessian", action="store_true", help="detect: include HyDRA's Hessian form on the last layer")
    p.add_argument("--parts", default="leakage,mislabel")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    split = load_digits()
    if args.n_train:
        split = subset(split, n_train=args.n_train, seed=args.seed)
    tag = f"digits{args.n_train or ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (detect if args.what == "detect" else complexity)(args, split, tag)


if __name__ == "__main__":
    main()
