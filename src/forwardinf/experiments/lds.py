"""Counterfactual fidelity: each method's linear datamodeling score (LDS) against retraining.

Ground truth: M random subsets of a fraction alpha of the training set (``metrics.random_subsets``,
seeded), a model retrained from scratch on each with the attributed model's own recipe (seeded;
``--seeds-per-subset`` runs averaged), and two measured outputs on held-out queries: the
correct-class margin (TRAK's output: logit of the true class minus logsumexp of the others) and
the cross-entropy loss. A method's prediction for subset S is the sum of its scores over S; LDS
is the Spearman correlation across subsets between prediction and measured output, per query,
averaged over queries (Park et al. 2023).

Sign: ``lds_margin`` correlates with the margin, ``lds_loss`` with *minus* the loss, so a method
whose high scores mark proponents (the library's contract) has positive LDS on both.
Intervals: 95% percentile bootstrap over the queries (subsets and seeds held fixed).
Upper reference: a ridge datamodel on the subset indicators, fitted on the first subsets (its
penalty by 5-fold cross-validation on them) and evaluated on the last ``--holdout`` fraction; every
method is reported on those held-out subsets (comparable to it) and on all M subsets.

Retraining is cached under ``--out/ground_truth`` (one file per model, written atomically): a
killed run rerun continues where it stopped with identical numbers, and ``--subsets`` or
``--seeds-per-subset`` may grow between runs (only the new models are trained). A folder made
with another configuration (data, recipe, alpha, seed, queries) is refused. Each method runs in
its own process (``--in-process`` to run them here): CPU seconds (one thread) and peak memory
are its own; its scores are cached under ``--out/methods`` and reused while its key is unchanged:
the model, data, queries, its options and settings, and the source of the modules it runs
(:func:`method_key`; editing another method's code or the report recomputes nothing). A method
too slow for every query can score the first n only (``--option NAME.queries=n``; its row says so). Paper context: TRAK (Park et al. 2023); dattri and Kronfluence report it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import resource
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from forwardinf import metrics as M
from forwardinf.baselines.peers import INSTALL
from forwardinf.baselines.retraining import load_cached, run_trainings
from forwardinf.core.params import mode
from forwardinf.data.loaders import balanced_indices
from forwardinf.experiments.common import seed_everything, timer, warm_up
from forwardinf.experiments.report import markdown_table, results_object, write_outputs
from forwardinf.hashing import fingerprint, fingerprint_data, imported_names, json_hash, sha256_hex, state_fingerprint
from forwardinf.io import atomic_path, atomic_save, write_json
from forwardinf.memory import reset_peak, status_mb
from forwardinf.experiments.checks import cap_workers, check_label
from forwardinf.experiments.setup import (FORWARD_INF_VARIANTS, Prepared, add_model_arguments, check_methods,
                                          make_method, method_options, parse_methods, prepare_classifier)
from forwardinf.tasks.classification import ClassificationTask
from forwardinf.workloads.trainers import SubsetTrainer

# Per dataset: subsets, held-out queries, training-set size and epochs (None = setup.DEFAULTS).
# Fashion-MNIST/MNIST: a 2,000-point class-balanced training set (a 15-epoch SmallCNN on 1,000
# points costs ~8 CPU s); CIFAR-10 the same on its CNN. Fewer subsets than digits: each costs more.
LDS_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(subsets=100, n_queries=200, n_train=None, epochs=None),
    "fashion-mnist": dict(subsets=50, n_queries=200, n_train=2000, epochs=15),
    "mnist": dict(subsets=50, n_queries=200, n_train=2000, epochs=10),
    "cifar10": dict(subsets=50, n_queries=100, n_train=2000, epochs=30),
}
LIBRARY_METHODS = ("if-exact", "if-cg", "if-100", "if-1000", "tracin-1", "tracin-5", "tracin-last",
                   "representer", "grad-dot", "grad-cos")
PEER_METHODS = ("trak", "dattri-trak", "kronfluence-ekfac", "captum-tracincp")
TARGETS = ("margin", "loss")
logger = logging.getLogger(__name__)
SEED_STRIDE = 1_000_003  # seed of run r on subset k: seed + 1 + k + SEED_STRIDE * r (stable as M and R grow)
FORMAT = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--subsets", type=int, default=None,
                   help="M, random training subsets retrained on (default: digits 100, else 50)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset size as a fraction of the training set (default: 0.5)")
    p.add_argument("--seeds-per-subset", type=int, default=1, help="training runs per subset, outputs averaged (default: 1)")
    p.add_argument("--n-queries", type=int, default=None,
                   help="held-out test points whose outputs are measured (default: 200, CIFAR-10 100)")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods; 'all' stands for " + ", ".join(all_methods()) +
                   " (and dattri-if-lissa, dattri-if-cg, if-10000, tracin-3, hydra, ...)")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of the subsets held out from the datamodel fit (default: 0.25)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the queries (default: 1000)")
    p.add_argument("--workers", type=int, default=1, help="parallel retraining processes (default: 1)")
    p.add_argument("--in-process", action="store_true",
                   help="run the methods in this process (peak memory is then a per-method RSS delta)")
    p.add_argument("--recompute", action="store_true", help="recompute every method's scores (ignore --out/methods)")
    p.add_argument("--memory-limit-gb", type=float, default=8.0,
                   help="address-space limit of each method's process (default: 8)")


def all_methods() -> list[str]:
    """What ``--methods all`` runs: every Forward-INF variant, the library's baselines, the peers."""
    return [*FORWARD_INF_VARIANTS, *LIBRARY_METHODS, *PEER_METHODS]


# ------------------------------------------------------------------------------- ground truth
class OutputProbe:
    """``probe(model) -> {"margin": [Q], "loss": [Q], "cpu_seconds": float}`` on fixed queries.

    margin = ``z_y - logsumexp_{j != y} z_j`` (minus :meth:`ClassificationTask.score_loss`),
    loss = cross-entropy, both float64; ``cpu_seconds`` = the model's training cost, if recorded.
    """

    def __init__(self, queries: tuple[Tensor, Tensor]) -> None:
        self.x, self.y = queries

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        task = ClassificationTask()
        margin, loss = [], []
        with torch.no_grad(), mode(model, False):
            for a in range(0, len(self.y), 1024):
                batch = (self.x[a:a + 1024], self.y[a:a + 1024])
                margin.append(-task.score_loss(model, batch).double())
                loss.append(task.loss(model, batch).double())
        return {"margin": torch.cat(margin), "loss": torch.cat(loss),
                "cpu_seconds": float(getattr(model, "fit_cpu_seconds_", float("nan")))}


def subset_seed(seed: int, k: int, r: int) -> int:
    return seed + 1 + k + SEED_STRIDE * r


def retrain_outputs(train_fn: Callable, pool: Any, probe: Callable, masks: np.ndarray, seeds_per_subset: int,
                    seed: int, *, cache_dir: str | os.PathLike | None, workers: int = 1,
                    progress: bool = False, config: Any = None) -> dict[str, np.ndarray]:
    """Retrain on every subset (rows of ``masks [M, N]``), ``seeds_per_subset`` runs each, and probe.

    ``probe(model)`` returns a dict of ``[Q]`` tensors (or scalars); the result holds each key as
    float64 ``[M, R, Q]`` (or ``[M, R]``). Runs are cached in ``cache_dir`` by
    :func:`forwardinf.baselines.retraining.run_trainings` (resumable, content-addressed; ``config``
    identifies ``train_fn`` in the key, as there).
    """
    m, r = masks.shape[0], seeds_per_subset
    jobs = [(np.flatnonzero(masks[k]), subset_seed(seed, k, j)) for k in range(m) for j in range(r)]
    res = run_trainings(train_fn, pool, jobs, probe, workers=workers, cache_dir=cache_dir, progress=progress,
                        desc="retraining", config=config)
    return {key: np.asarray([[np.asarray(res[k * r + j][key], dtype=np.float64) for j in range(r)] for k in range(m)])
            for key in res[0]}


def check_manifest(folder: Path, manifest: dict) -> None:
    """Write ``folder/manifest.json``, or refuse if the folder was made with another configuration."""
    path = folder / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)]
        if diff:
            what = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
            raise ValueError(f"{folder} holds the retrainings of a different configuration ({what}); "
                             f"use another --out or delete {folder}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest, sort_keys=True)


# ------------------------------------------------------------------------------------ problem
@dataclass
class Problem:
    prepared: Prepared
    queries: tuple[Tensor, Tensor]  # held-out test points [Q, ...], [Q]
    query_index: Tensor  # their positions in the test split


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the dataset's LDS defaults into ``args`` (a copy) and check the options."""
    args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    key = (args.dataset or "digits").lower().replace("_", "-")
    key = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    d = LDS_DEFAULTS.get(key, LDS_DEFAULTS["fashion-mnist"])
    for name in ("subsets", "n_queries", "n_train", "epochs"):
        if getattr(args, name) is None:
            setattr(args, name, d[name])
    if args.checkpoint:
        raise ValueError("lds retrains the model's recipe from scratch on every subset, so the attributed model "
                         "must come from the same recipe: --checkpoint is not supported (use --epochs/--train-lr)")
    for name in ("subsets", "seeds_per_subset", "n_queries", "bootstrap", "workers"):
        v = getattr(args, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if args.subsets < 8:
        raise ValueError(f"--subsets must be at least 8 (LDS is a correlation across subsets), got {args.subsets}")
    if not 0.0 < args.alpha < 1.0:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    held = args.subsets - n_fit(args.subsets, args.holdout) if 0.0 < args.holdout < 1.0 else 0
    if held < 2 or args.subsets - held < 5:
        raise ValueError(f"--holdout {args.holdout} of {args.subsets} subsets must hold out >= 2 and leave >= 5 "
                         "for the datamodel's 5-fold fit")
    return args


def load_problem(args: argparse.Namespace, progress: bool = False) -> Problem:
    """The attributed model (trained, or loaded from ``--out/cache``) and the held-out queries."""
    prepared = prepare_classifier(args, progress=progress)
    split = prepared.split
    if args.n_queries > len(split.y_test):
        raise ValueError(f"--n-queries {args.n_queries} exceeds the {len(split.y_test)} test points of {split.name}")
    idx = balanced_indices(split.y_test, args.n_queries, args.seed + 1)
    return Problem(prepared, (split.x_test[idx].contiguous(), split.y_test[idx].contiguous()), idx)


def trainer_of(prepared: Prepared) -> SubsetTrainer:
    c = prepared.config
    return SubsetTrainer(c["model"], tuple(prepared.split.input_shape), prepared.split.n_classes,
                         {"width": c["width"]} if "width" in c else {},
                         {k: c[k] for k in ("epochs", "lr", "batch_size", "optimizer", "weight_decay")})


def ground_truth(args: argparse.Namespace, problem: Problem, progress: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(masks [M, N], {"margin" | "loss": [M, R, Q], "cpu_seconds": [M, R]})``, cached under --out."""
    prepared = problem.prepared
    train = prepared.split.train()
    trainer = trainer_of(prepared)
    folder = Path(args.out) / "ground_truth"
    check_manifest(folder, {
        "format": FORMAT, "dataset": prepared.split.name, "model": trainer.model, "model_kw": trainer.model_kw,
        "recipe": trainer.recipe, "train": fingerprint_data(train), "queries": fingerprint_data(problem.queries),
        "alpha": args.alpha, "seed": args.seed})
    masks = M.random_subsets(len(train[1]), args.subsets, args.alpha, seed=args.seed)
    out = retrain_outputs(trainer, train, OutputProbe(problem.queries), masks, args.seeds_per_subset, args.seed,
                          cache_dir=folder, workers=args.workers, progress=progress, config=trainer_key(trainer))
    return masks, out


def trainer_key(trainer: SubsetTrainer, root: Path | None = None) -> dict[str, str]:
    """What identifies the retraining recipe in the ground-truth cache key: the trainer's settings
    and the source of its module and every forwardinf module that imports (:func:`method_sources`
    under ``root``, default the installed package): editing the training code retrains rather than
    reusing models of the old code."""
    root = root or _ROOT
    return {"trainer": fingerprint(trainer),
            "code": code_fingerprint(method_sources([type(trainer).__module__], root), root)}


# ------------------------------------------------------------------------------------ methods
def split_queries_option(options: dict | None) -> tuple[dict, int | None]:
    """``(the estimator's options, n)``: the lds-level option ``NAME.queries=n`` scores only the
    first ``n`` held-out queries (for a method too slow for all of them; its LDS is then on those)."""
    options = dict(options or {})
    n = options.pop("queries", None)
    if n is not None and (not isinstance(n, int) or n < 2):
        raise ValueError(f"option queries={n!r}: expected an integer >= 2 (the first n held-out queries)")
    return options, n


def measure_method(name: str, args: argparse.Namespace, options: dict | None) -> dict:
    """Fit ``name`` on the training set and score every query (or the first ``queries`` of them,
    see :func:`split_queries_option`), in this process, on one thread.

    Returns ``{"scores": [Q, N], "seconds", "cpu_seconds", "peak_mb", "extra_mb"}`` or
    ``{"error": ...}``. ``peak_mb``: the process's peak RSS during fit + influence (VmHWM after
    resetting it; includes torch, the data and the model), ``extra_mb``: that peak minus the RSS
    just before the method started. Setup and an untimed warm-up are not billed.
    """
    torch.set_num_threads(1)
    options, n_queries = split_queries_option(options)
    problem = load_problem(args)
    model, train = problem.prepared.model, problem.prepared.split.train()
    queries = tuple(t[:n_queries] for t in problem.queries)
    try:
        est = make_method(name, model, problem.prepared, False, options)
    except ImportError as e:
        return {"error": _missing(e)}
    warm_up(model, train)
    before = state_fingerprint(model)
    reset_peak()  # if not permitted, the peak includes the set-up
    rss = status_mb("VmRSS")
    try:
        with timer() as t:
            scores = est.fit(train).influence(queries)
    except ImportError as e:
        return {"error": _missing(e)}
    except Exception as e:  # noqa: BLE001 - a method failing is a result too
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    peak = status_mb("VmHWM")
    if state_fingerprint(model) != before:
        return {"error": f"{name} changed the model"}
    scores = scores.detach().float().cpu()
    want = (len(queries[1]), len(train[1]))
    if tuple(scores.shape) != want:
        return {"error": f"scores of shape {tuple(scores.shape)}, expected {want}"}
    return {"scores": scores, "seconds": t["seconds"], "cpu_seconds": t["cpu_seconds"], "peak_mb": peak,
            "extra_mb": peak - rss}


def _missing(e: ImportError) -> str:
    pkg = (e.name or "").split(".")[0]
    return f"not installed ({INSTALL.get(pkg, 'pip install ' + pkg)})"


def _child(name: str, args: argparse.Namespace, options: dict | None, path: str, limit_gb: float) -> None:
    limit = int(limit_gb * 2**30)  # a runaway method fails with MemoryError instead of waking the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure_method(name, args, options)
    except MemoryError:
        result = {"error": f"out of memory at the {limit_gb:g} GB limit (--memory-limit-gb)"}
    torch.save(result, path)


def run_method(name: str, args: argparse.Namespace, options: dict | None, folder: Path, key: str) -> dict:
    """``measure_method`` in a fresh process (or here with ``--in-process``), cached in ``folder``."""
    for part in name.split("@", 1):  # a safe name (checked up front too): the file stays inside --out
        check_label(part, name)
    path = folder / f"{name}.pt"
    # Tensors and plain values only (weights_only): a file planted in a run folder cannot run code.
    # An unreadable file is recomputed (load_cached logs a warning naming it).
    saved = None if args.recompute else load_cached(path)
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("result"), dict)):
        logger.warning("cache file %s does not hold a method's result; computing it again", path)
        saved = None
    # an out-of-memory result stands only for the limit it hit
    if saved is not None and saved.get("key") == key \
            and saved.get("memory_limit_gb", args.memory_limit_gb) == args.memory_limit_gb:
        return {**saved["result"], "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.tmp{os.getpid()}.pt"
    if args.in_process:
        result = measure_method(name, args, options)
    else:
        proc = multiprocessing.get_context("spawn").Process(
            target=_child, args=(name, args, options, str(tmp), args.memory_limit_gb))
        proc.start()
        proc.join()
        if not tmp.is_file():
            return {"error": f"its process ended with code {proc.exitcode} (negative: killed by signal)"}
        result = torch.load(tmp, weights_only=True)
        tmp.unlink()
    if "error" in result and "can't allocate memory" in result["error"]:  # torch's allocator, not MemoryError
        result = {"error": f"out of memory at the {args.memory_limit_gb:g} GB limit (--memory-limit-gb)"}
    if "error" not in result or result["error"].startswith(("not installed", "out of memory")):
        atomic_save({"key": key, "result": result, "memory_limit_gb": args.memory_limit_gb}, path)
    return result


# What a method's cached scores depend on, besides the model, data, queries and its options (all in
# its key): the source of the modules it runs and the peers' versions. Bump MEASURE when
# measure_method changes how scores are produced (its own file is not hashed, so that editing the
# report does not recompute every method).
MEASURE = 1
ALWAYS_HASHED = ("tasks",)  # every method runs on the task's losses (reached through the task object, not an import)
PEER_PACKAGES = ("torch", "traker", "dattri", "kronfluence", "captum")
_ROOT = Path(__file__).resolve().parents[1]  # src/forwardinf


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of ``forwardinf.a.b`` under ``root`` (a package's ``__init__.py``), or None."""
    path = root.joinpath(*module.split(".")[1:])
    for f in (path / "__init__.py", path.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _imports(module: str, root: Path) -> set[str]:
    """The forwardinf modules ``module``'s source imports, anywhere in it (function-level included)."""
    f = _module_file(module, root)
    package = module if f.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for base, names in imported_names(f.read_text(), package):
        # `from pkg import sub` names a submodule when it is one, else something pkg defines
        out |= {f"{base}.{a}" if _module_file(f"{base}.{a}", root) else base for a in names} if names else {base}
    # the top-level package only re-exports (importing it would make every method depend on every file)
    return {m for m in out if m.startswith("forwardinf.") and _module_file(m, root)}


def method_sources(modules: list[str], root: Path = _ROOT) -> list[Path]:
    """The source files of ``modules``, of ``ALWAYS_HASHED``'s packages, and of every forwardinf
    module they import, transitively (a static walk of the imports), sorted."""
    todo = [*modules, *(f"forwardinf.{p}.{f.stem}" for p in ALWAYS_HASHED for f in sorted((root / p).glob("*.py")))]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen or not m.startswith("forwardinf.") or _module_file(m, root) is None:
            continue
        seen.add(m)
        todo += sorted(_imports(m, root))
    return sorted({_module_file(m, root) for m in seen})


def code_fingerprint(files: list[Path], root: Path = _ROOT) -> str:
    """SHA-256 of ``files`` (paths relative to ``root`` and contents) and the peers' versions:
    a method's cached scores are reused only while both are unchanged."""
    parts: list[str | bytes] = [f"measure={MEASURE}"]
    for f in files:
        parts += [str(f.relative_to(root)), f.read_bytes()]
    for pkg in PEER_PACKAGES:
        try:
            parts.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{pkg}=-")
    return sha256_hex(*parts, length=16)


def method_key(name: str, options: dict | None, prepared: Prepared, base: dict) -> str:
    """The cache key of ``name``'s scores: ``base`` (model, data, queries), the method's name and
    options, its estimator's stored settings (a preset's expansion included) and the fingerprint
    of the sources it runs (:func:`method_sources` of its estimator's and the model's modules)."""
    modules = [type(prepared.model).__module__]
    settings: Any = None
    try:
        est = make_method(name, prepared.model, prepared, False, split_queries_option(options)[0])
    except ImportError:  # a missing peer: keyed by its name (its error is cached as such)
        modules.append("forwardinf.baselines.peers")
    else:
        modules.append(type(est).__module__)
        settings = fingerprint({k: v for k, v in vars(est).items() if k not in ("model", "progress")})
        settings = [type(est).__qualname__, settings]
    return json_hash({**base, "method": name, "options": options or {}, "estimator": settings,
                      "code": code_fingerprint(method_sources(modules))})


# --------------------------------------------------------------------------------- evaluation
def signed_targets(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"margin": [M, Q], "loss": [M, Q]}`` averaged over seeds, oriented so that support raises
    them: the margin as is, the loss negated."""
    return {t: (1.0 if t == "margin" else -1.0) * outputs[t].mean(1) for t in TARGETS}


def n_fit(m: int, holdout: float) -> int:
    """Subsets the datamodel is fitted on (the first ones); the rest are held out."""
    return m - int(round(holdout * m))


def evaluate(scores: Any, masks: np.ndarray, targets: dict[str, np.ndarray], fit: int, n_boot: int,
             seed: int) -> tuple[dict, dict]:
    """LDS of ``scores [Q, N]`` on all subsets and on the held-out ones (``masks[fit:]``).

    Returns ``(metrics, per_query)``: ``lds_<target>``, ``lds_<target>_ci``, ``lds_<target>_heldout``,
    ``lds_<target>_heldout_ci``; ``per_query`` holds the ``[Q]`` arrays behind them.
    """
    metrics, per_query = {}, {}
    for t, y in targets.items():
        for suffix, rows in (("", slice(None)), ("_heldout", slice(fit, None))):
            v = M.lds_per_query(scores, masks[rows], y[rows])
            per_query[f"lds_{t}{suffix}"] = v
            metrics[f"lds_{t}{suffix}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            metrics[f"lds_{t}{suffix}_ci"] = list(M.bootstrap_interval(v, n_boot, seed=seed))
    return metrics, per_query


def datamodel_reference(masks: np.ndarray, targets: dict[str, np.ndarray], fit: int, n_boot: int,
                        seed: int) -> tuple[dict, dict]:
    """The ridge datamodel fitted on ``masks[:fit]`` per target, its LDS on the held-out subsets."""
    metrics, per_query = {}, {}
    for t, y in targets.items():
        dm = M.fit_datamodel(masks[:fit], y[:fit], seed=seed)
        v = M.lds_per_query(dm.weights, masks[fit:], y[fit:])
        per_query[f"lds_{t}_heldout"] = v
        metrics[f"lds_{t}_heldout"] = float(np.nanmean(v))
        metrics[f"lds_{t}_heldout_ci"] = list(M.bootstrap_interval(v, n_boot, seed=seed))
        metrics[f"ridge_alpha_{t}"] = dm.alpha
    return metrics, per_query


def seed_agreement(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """With >= 2 runs per subset: mean over queries of the Spearman correlation across subsets
    between run 0's and run 1's output (how reproducible one retraining is)."""
    if outputs["margin"].shape[1] < 2:
        return {}
    out = {}
    for t in TARGETS:
        a, b = outputs[t][:, 0], outputs[t][:, 1]
        rho = np.array([M.spearman(a[:, q], b[:, q]) for q in range(a.shape[1])])
        out[f"seed_agreement_{t}"] = float(np.nanmean(rho))
    return out


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict:
    if (args.dataset or "").lower() == "lm-facts":  # a language model (issue 23): its own setup and retraining
        from forwardinf.experiments import lds_lm

        return lds_lm.run(args)
    args = apply_defaults(args)
    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    # Every name, label and --option value checked before the model is trained.
    methods = parse_methods(args.methods, {"all": all_methods()})
    options = method_options(args, methods)
    for name in methods:
        split_queries_option(options.get(name))
    check_methods(methods, options)
    args.workers, note = cap_workers(args.workers)
    if note:
        print(f"lds: {note}", flush=True)
    problem = load_problem(args, progress)
    prepared = problem.prepared
    split = prepared.split
    n, q = len(split.y_train), len(problem.query_index)
    print(f"lds: {split.name}, {n} training points, model {prepared.model_name} (test accuracy "
          f"{prepared.accuracy:.3f}), {q} held-out queries, {args.subsets} subsets of {args.alpha:g} x "
          f"{args.seeds_per_subset} run(s)", flush=True)

    with timer() as t_gt:
        masks, outputs = ground_truth(args, problem, progress)
    gt_cpu = float(np.nansum(outputs["cpu_seconds"]))
    targets = signed_targets(outputs)
    fit = n_fit(args.subsets, args.holdout)
    truth = {"models": int(outputs["cpu_seconds"].size), "cpu_seconds": gt_cpu,
             "cpu_seconds_per_model": gt_cpu / outputs["cpu_seconds"].size, "wall_seconds_this_run": t_gt["seconds"],
             **seed_agreement(outputs)}
    print(f"  ground truth: {truth['models']} models, {gt_cpu:.0f} CPU s of training "
          f"({truth['cpu_seconds_per_model']:.2f} per model)", flush=True)

    results: dict[str, dict] = {}
    per_query: dict[str, np.ndarray] = {}
    dm, dm_q = datamodel_reference(masks, targets, fit, args.bootstrap, args.seed)
    results["datamodel"] = {"seconds": 0.0, **dm, "note": f"ridge on {fit} subsets (upper reference)"}
    per_query.update({f"datamodel/{k}": v for k, v in dm_q.items()})
    key_base = {"model": state_fingerprint(prepared.model), "config": prepared.config,
                "queries": problem.query_index.tolist()}
    for name in methods:
        key = method_key(name, options.get(name), prepared, key_base)
        res = run_method(name, args, options.get(name), Path(args.out) / "methods", key)
        if "error" in res:
            results[name] = {"error": res["error"]}
            print(f"  {name:24s} {res['error']}", flush=True)
            continue
        scored = len(res["scores"])  # all the queries, or the first `queries` of them
        m, pq = evaluate(res["scores"], masks, {t: y[:, :scored] for t, y in targets.items()}, fit, args.bootstrap,
                         args.seed)
        results[name] = {k: res[k] for k in ("seconds", "cpu_seconds", "peak_mb", "extra_mb")} | m
        if scored < q:
            results[name].update(n_queries=scored, note=f"on the first {scored} of the {q} queries")
        per_query.update({f"{name}/{k}": v for k, v in pq.items()})
        print(f"  {name:24s} LDS margin {m['lds_margin']:+.3f}  loss {m['lds_loss']:+.3f}  (held-out "
              f"{m['lds_margin_heldout']:+.3f} / {m['lds_loss_heldout']:+.3f})  {res['cpu_seconds']:8.1f} CPU s  "
              f"peak {res['peak_mb']:.0f} MB" + ("  [cached]" if res.get("cached") else ""), flush=True)

    config = {**prepared.config, "subsets": args.subsets, "alpha": args.alpha, "seeds_per_subset": args.seeds_per_subset,
              "n_queries": q, "holdout_subsets": args.subsets - fit, "bootstrap": args.bootstrap, "methods": methods,
              "options": options, "ground_truth": truth, "test_accuracy": prepared.accuracy,
              "isolation": "in-process" if args.in_process else "one process per method"}
    if Path(sys.argv[0]).name in ("forwardinf", "cli.py"):  # the command line, when run from one
        config["command"] = " ".join(["forwardinf", *sys.argv[1:]])
    out = Path(args.out)
    report = _report(split.name, prepared, config, results)
    print(report)
    results_obj = results_object("lds", split.name, config, results)
    write_outputs(out, results_obj, report)
    with atomic_path(out / "lds_per_query.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **per_query)
    _figure(out / "lds.png", results, split.name)
    print(f"wrote {out}/results.json, report.md, lds_per_query.npz, lds.png")
    return results_obj


# --------------------------------------------------------------------------------------- report
def _fmt(r: dict, key: str) -> str:
    if key not in r or not math.isfinite(r[key]):
        return "-"
    lo, hi = r[key + "_ci"]
    return f"{r[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def table(results: dict[str, dict]) -> str:
    """The markdown table of a ``results.json``'s methods, best all-subsets margin LDS first."""
    def order(item: tuple[str, dict]) -> tuple:
        name, r = item
        return (name != "datamodel", "error" in r, -r.get("lds_margin", -9.0))

    rows = []
    for name, r in sorted(results.items(), key=order):
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        cost = [f"{r['cpu_seconds']:.1f}", f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}", f"{r['extra_mb']:.0f}"] \
            if "cpu_seconds" in r else ["-"] * 4
        rows.append([name, _fmt(r, "lds_margin_heldout"), _fmt(r, "lds_loss_heldout"), _fmt(r, "lds_margin"),
                     _fmt(r, "lds_loss"), *cost, r.get("note", "")])
    return markdown_table(["method", "LDS margin, held-out", "LDS loss, held-out", "LDS margin, all",
                           "LDS loss, all", "CPU s", "wall s", "peak MB", "extra MB", "note"], rows)


def _report(name: str, prepared: Prepared, config: dict, results: dict) -> str:
    gt = config["ground_truth"]
    agree = "".join(f"; two runs of one subset agree at Spearman {gt[f'seed_agreement_{t}']:.3f} ({t})"
                    for t in TARGETS if f"seed_agreement_{t}" in gt)
    return "\n".join([
        f"# Linear datamodeling score ({name})", "",
        prepared.describe(), "",
        f"Ground truth: {config['subsets']} random subsets of {config['alpha']:g} of the training set, "
        f"{config['seeds_per_subset']} training run(s) each from scratch with the same recipe ({gt['models']} "
        f"models, {gt['cpu_seconds']:.0f} CPU s of training, {gt['cpu_seconds_per_model']:.2f} per model{agree}); "
        f"outputs measured on {config['n_queries']} held-out test points. LDS = Spearman across subsets between "
        "the summed scores and the margin (or minus the loss), mean over queries, [95% bootstrap over queries]. "
        f"*held-out*: the last {config['holdout_subsets']} subsets, on which the ridge datamodel (fitted on the "
        "others) is evaluated; *all*: every subset. CPU s: the method's fit + scores, one thread "
        f"({config['isolation']}); peak MB: the process's peak RSS during it; extra MB: peak minus the RSS "
        "before it.", "",
        table(results), ""])


def _figure(path: Path, results: dict, name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(k, r) for k, r in results.items() if "lds_margin_heldout" in r]
    rows.sort(key=lambda kr: kr[1]["lds_margin_heldout"])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    y = np.arange(len(rows))
    for off, t, color in ((-0.18, "margin", "#2c5aa0"), (0.18, "loss", "#c0392b")):
        v = np.array([r[f"lds_{t}_heldout"] for _, r in rows])
        ci = np.array([r[f"lds_{t}_heldout_ci"] for _, r in rows])
        ax.barh(y + off, v, height=0.35, color=color, label=f"LDS ({t})",
                xerr=np.abs(ci.T - v[None]), error_kw={"lw": 0.8})
    ax.set_yticks(y, [k for k, _ in rows], fontsize=7)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("LDS on the held-out subsets (95% bootstrap over queries)")
    ax.set_title(f"Counterfactual fidelity ({name})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
