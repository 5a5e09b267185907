"""Forward-INF on your own model and data: a score store on disk and a top-k table.

    forwardinf score --model mypkg.nets:build --train train.npz --queries queries/ --out runs/score
    torchrun --standalone --nproc-per-node 4 -m forwardinf.cli score ...   (ranks share the shards)

--model: ``module:callable`` (or ``file.py:callable``) returning an nn.Module; a ``torch.export``
program (``.pt2``, exported in eval mode); a TorchScript file; or a state-dict checkpoint with
--arch ``module:callable`` building the architecture (read with ``torch.load(weights_only=True)``,
never unpickling code).
--train / --queries: an image folder (one sub-folder per class; queries may be a flat folder,
then each is explained for the model's predicted class), an .npz file (arrays ``inputs`` and
``targets``, ``x`` and ``y``, or ``x_<split>``/``y_<split>`` picked with ``file.npz:<split>``), a
built-in dataset ``NAME:train|test`` (digits, fashion-mnist, mnist, cifar10), or
``module:callable`` returning a Dataset or ``(inputs, targets)`` tensors.
With neither --model nor --train it trains a small CNN on scikit-learn's digits and explains 16
test digits.

Writes into --out: ``store/`` (the score matrix as memory-mapped blocks with a manifest; an
interrupted run resumes from it, and a store made from another model, data or configuration is
refused), ``topk.csv`` (or ``.parquet``: query, rank, train_index, score), results.json and
report.md.
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import forwardinf as fi
from forwardinf.baselines.methods import METHODS
from forwardinf.core.params import device_of
from forwardinf.data.inputs import gather, to_device
from forwardinf.distributed import activation_bytes, auto_batch_size, init_distributed, score_to_store
from forwardinf.estimators.forward_inf import PRESETS, ForwardINFConfig, check_values
from forwardinf.estimators.tail import PRECISIONS, ReducedPrecisionTask, TailForwardINF, split_model
from forwardinf.experiments.checks import UsageError, refuse_renamed
from forwardinf.experiments.report import markdown_table, results_object, write_outputs
from forwardinf.experiments.setup import add_option_argument, method_options
from forwardinf.scoring import shortlist
from forwardinf.scoring.loaders import (ImageFolder, call_object, check_runs, first_n, label_by_prediction, load_data,
                                        load_model)
from forwardinf.storage import write_topk

# The one method `score` runs, named as in the method table (its `--option` prefix and results key).
METHOD = METHODS[0]


# Forward-INF settings that were flags of their own before --option (``--lr 0.01`` is now
# ``--option forward-inf.lr=0.01``): refused with the new spelling.
RENAMED = ("steps", "lr", "optimizer", "direction", "score", "params")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="module:callable, file.py:callable, a torch.export .pt2 file, a "
                   "TorchScript file, or a state-dict checkpoint (with --arch)")
    g.add_argument("--arch", default=None, help="module:callable building the architecture of a state-dict checkpoint")
    g.add_argument("--train", default=None, help="training data: image folder, .npz[:split], NAME:train|test, or module:callable")
    g.add_argument("--queries", default=None, help="query data (same forms as --train)")
    g.add_argument("--task", default=None, help="module:callable returning a forwardinf Task (default: classification)")
    g.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    g.add_argument("--n-queries", type=int, default=None, help="use only the first N queries")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean subtracted from image inputs")
    g.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std dividing image inputs")
    g.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize folder images")

    g = p.add_argument_group("Forward-INF")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named recipe (default: default)")
    add_option_argument(g, "here forward-inf's: any ForwardINFConfig field over --preset's, e.g. forward-inf.lr=0.01 "
                           "or \"forward-inf.params=['fc']\"")
    refuse_renamed(g, {f"--{k}": f"--option forward-inf.{k}=VALUE" for k in RENAMED})
    g.add_argument("--tail", default=None, metavar="MODULE",
                   help="tail-only mode: update only MODULE and what follows it; the frozen prefix runs once")
    g.add_argument("--tail-cache", default="auto", choices=("auto", "memory", "disk"),
                   help="keep the prefix's features per shard in memory, or in a temporary file read back a "
                        "batch at a time (resident memory of one batch); auto (default): memory up to "
                        "256 MiB per shard, disk above")
    g.add_argument("--precision", default="float32", choices=sorted(PRECISIONS),
                   help="forward sweeps in reduced precision (differences stay float32)")

    g = p.add_argument_group("scale")
    g.add_argument("--batch-size", default="auto", help="training examples per forward batch, or 'auto' (default)")
    g.add_argument("--memory-budget", type=float, default=256.0,
                   help="MiB of activations per forward batch for --batch-size auto (default: 256)")
    g.add_argument("--query-chunk", type=int, default=None,
                   help="queries updated and scored in one sweep (default: as many as fit the estimator's memory budget, at most 16)")
    g.add_argument("--query-block", type=int, default=64, help="queries per stored block (default: 64)")
    g.add_argument("--shard-size", type=int, default=65536, help="training examples per shard (default: 65536)")
    g.add_argument("--k", type=int, default=10, help="training points kept per query in the table (default: 10)")
    g.add_argument("--store", default=None, help="score store folder (default: OUT/store)")
    g.add_argument("--overwrite", action="store_true", help="delete a store made from anything else and start again")
    g.add_argument("--format", default="csv", choices=("csv", "parquet"), help="top-k table format")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--device", default="cpu", help="device (cpu, cuda, cuda:1); under torchrun+nccl each rank its own GPU")
    shortlist.add_arguments(p.add_argument_group("many queries"))



def _default_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from forwardinf.data.loaders import load_digits
    from forwardinf.models import build_model
    from forwardinf.training import train_or_load

    data = load_digits()
    # Seeded init: every torchrun rank must build the very same model.
    return train_or_load(lambda: build_model("cnn", data.input_shape, data.n_classes, seed=args.seed, width=16), data.train(),
                         Path(args.out) / "model.pt", epochs=10, lr=0.05, seed=args.seed).to(device)


# --------------------------------------------------------------------------------- estimator
def build_estimator(args: argparse.Namespace, model: nn.Module, task: fi.Task, train: Dataset) -> Any:
    """The estimator template described by the command line, with its batch size resolved."""
    overrides = forward_inf_options(args)
    if args.query_chunk is not None:  # else the estimator's "auto"
        overrides["query_chunk"] = args.query_chunk
    config = ForwardINFConfig.preset(args.preset, **overrides, seed=args.seed)
    if args.batch_size == "auto":
        probe = to_device(gather(train, range(min(8, len(train)))), device_of(model))
        # in flight at once: the stacked query models, or the vmapped directional tangents (+ primal)
        n_models = max(args.query_chunk or 16, 2 * min(8, config.n_directions) if config.score == "cosine" else 1)
        budget = int(args.memory_budget * 2**20)
        if args.tail:
            # The prefix runs one model; only the (smaller) tail runs n_models at once.
            split = split_model(model, args.tail, probe[0])
            tail_probe = (split.features(probe[0]).detach(), *probe[1:])
            per_example = max(activation_bytes(model, task, probe), n_models * activation_bytes(split.tail, task, tail_probe))
            batch_size = int(max(1, min(1024, budget // per_example)))
        else:
            batch_size = auto_batch_size(model, task, probe, n_models=n_models, budget_bytes=budget)
    else:
        try:
            batch_size = int(args.batch_size)
        except ValueError:
            raise ValueError(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}") from None
    config = config.replace(batch_size=batch_size)
    if args.tail:
        return TailForwardINF(model, task, config=config, split=args.tail, precision=args.precision, cache=args.tail_cache)
    if args.precision != "float32":
        task = ReducedPrecisionTask(task, args.precision)
    return fi.ForwardINF(model, task, config=config)


# ForwardINFConfig fields this command sets from flags of their own (an --option would be overridden).
OWN_FLAGS = {"batch_size": "--batch-size", "query_chunk": "--query-chunk", "seed": "--seed", "progress": "--quiet"}


def forward_inf_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--option forward-inf.KEY=VALUE`` as ``{KEY: VALUE}`` (the one method of this command)."""
    options = method_options(args, [METHOD]).get(METHOD, {})
    for key in set(options) & set(OWN_FLAGS):
        raise UsageError(f"--option forward-inf.{key}: give it as {OWN_FLAGS[key]}")
    return options


# -------------------------------------------------------------------------------------- run
def check_arguments(args: argparse.Namespace) -> None:
    """The numbers of the command line, refused before any work (a model trained, a store begun)."""
    for name in ("k", "shard_size", "query_block", "query_chunk", "threads", "n_train", "n_queries"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    v = args.memory_budget
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"--memory-budget must be a finite number > 0, got {v}")
    try:  # the --option settings, checked on the preset they change (the model is not needed)
        check_values(METHOD, ForwardINFConfig.preset(args.preset, **forward_inf_options(args)))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e) if str(e).startswith("--option") else f"--option: {e}") from None
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        raise UsageError(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}")
    for name in ("mean", "std"):
        v = getattr(args, name, None) or []
        if not all(math.isfinite(x) for x in v) or (name == "std" and any(x <= 0 for x in v)):
            raise UsageError(f"--{name} must be finite numbers" + (" > 0" if name == "std" else "") + f", got {v}")
    if args.image_size is not None and min(args.image_size) < 1:
        raise UsageError(f"--image-size must be two positive integers, got {args.image_size}")


def run(args: argparse.Namespace) -> dict:
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed()
    try:
        return _run(args, ctx)
    finally:
        ctx.close()


def _run(args: argparse.Namespace, ctx: Any) -> dict:
    device = ctx.device if ctx.backend == "nccl" else torch.device(args.device)
    out = Path(args.out)
    if args.model is None and args.train is None:
        model = _default_model(args, device)
        args.train, args.queries = "digits:train", args.queries or "digits:test"
        args.n_queries = args.n_queries or 16
        dataset_name = "digits"
    else:
        if args.model is None or args.train is None or args.queries is None:
            raise ValueError("give --model, --train and --queries (or none of them for the built-in demo)")
        model = load_model(args, device)
        dataset_name = args.train
    start = time.perf_counter()  # "seconds" excludes training the demo's model
    train = first_n(load_data(args.train, args, "--train"), args.n_train, "--n-train")
    queries = first_n(load_data(args.queries, args, "--queries"), args.n_queries, "--n-queries")
    query_names = queries.names() if isinstance(queries, ImageFolder) else None
    train_names = train.names() if isinstance(train, ImageFolder) else None
    if isinstance(train, ImageFolder) and not train.classes:
        raise ValueError(f"--train {args.train}: training images must sit in one sub-folder per class")
    queries = label_by_prediction(queries, model, device) if isinstance(queries, ImageFolder) else queries
    task = call_object(args.task, "--task") if args.task else fi.ClassificationTask()
    if not isinstance(task, fi.Task):
        raise ValueError(f"--task {args.task!r} returned {type(task).__name__}, not a forwardinf Task")

    for data, what in ((train, "--train"), (queries, "--queries")):
        check_runs(model, task, data, what, device)
    estimator = build_estimator(args, model, task, train)
    store_path = Path(args.store) if args.store else out / "store"
    progress = not args.quiet and ctx.is_main
    if args.shortlist:
        result, method = shortlist.score_shortlist(estimator, train, queries, args, ctx, store_path)
    else:
        new_store = not store_path.exists()
        try:
            result = score_to_store(estimator, train, queries, store_path, shard_size=args.shard_size,
                                    query_block=args.query_block, k=args.k, overwrite=args.overwrite, ctx=ctx,
                                    progress=progress)
        except Exception:
            # A run failing before its first block (a diverging update, a bad input) leaves --out as it found it.
            if new_store and ctx.is_main and store_path.is_dir() and not any((store_path / "blocks").glob("*.npy")):
                shutil.rmtree(store_path, ignore_errors=True)
            raise
        method = {"blocks": result.store.n_query_blocks * result.store.n_shards, "blocks_written_rank0": result.stats.written,
                  "blocks_reused_rank0": result.stats.reused, "store": str(store_path)}
    seconds = time.perf_counter() - start
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("quiet",)}
    config.update(world_size=ctx.world_size, batch_size_used=estimator.batch_size)
    method = {"seconds": seconds, "n_train": len(train), "n_query": len(queries), **method}
    results = results_object("score", dataset_name, config, {METHOD: method})
    if not ctx.is_main:
        return results
    table = out / f"topk.{args.format}"
    write_topk(table, result.indices, result.scores, fmt=args.format, query_ids=query_names, train_ids=train_names)
    method["topk"] = str(table)
    rows = []
    for q in range(min(len(queries), 10)):
        tops = ", ".join(f"{int(i)} ({float(s):.3g})" for i, s in zip(result.indices[q, :5], result.scores[q, :5]))
        rows.append([query_names[q] if query_names else q, tops])
    report = (f"# forwardinf score\n\n{len(queries)} queries x {len(train)} training examples, "
              f"{ctx.world_size} process(es), {seconds:.1f} s; store: `{method.get('store', '-')}`; table: `{table}`\n\n"
              + (shortlist.summary(method, args.k) if args.shortlist else "")
              + markdown_table(["query", "most influential training indices (score)"], rows) + "\n")
    results = results_object("score", dataset_name, config, {METHOD: method})
    write_outputs(out, results, report)
    if not args.quiet:
        print(report)
    return results
