"""Peak memory, CPU seconds and MRR of each phase of pretrained-LM fact tracing, float32 vs bfloat16.

One process, phases in the order ``forwardinf trace --model MODEL`` runs them. Before each phase
the garbage is collected and freed heap returned to the OS (``release_memory``), then the
kernel's high-water mark of the resident set is reset (``5 > /proc/self/clear_refs``); after
it ``VmHWM`` (``/proc/self/status``) is that phase's own peak (what stays resident from earlier
phases, the model above all, counts in every phase alike). Phases:

- ``load``: the model as the trace loads it (peak since process start);
- ``inference sweep``: the reference: the full model (no grad, every position's logits) over all
  training abstracts in length-sorted batches of ``--batch-size``, as a user's plain sweep;
- ``prefix cache``: the frozen prefix over all abstracts, states cached (float32, later bfloat16);
- ``fine-tune``: ``--epochs`` of the tail (AdamW);
- ``forward-inf fit`` (the base-loss sweep over the pool) and ``forward-inf queries`` (one update
  per query + forward passes over its candidates): the attribution sweep the 1.3x bar is about;
- ``tracin``: fit + the same queries;
- ``forward-inf`` again on a bfloat16 prefix cache with a float32 tail, and with the tail under
  bfloat16 autocast too. MRR and Spearman correlation with the float32 scores on the same queries.

    OMP_NUM_THREADS=1 python benchmarks/trace_pretrained_memory.py --model smollm2 --out runs/trace-memory.json
"""
import argparse
import json
import random
import time

import torch

from forwardinf.baselines.tracin import TracIn
from forwardinf.data.facts import build_geo_facts, select_queries
from forwardinf.estimators.forward_inf import ForwardINF
from forwardinf.experiments.trace_pretrained import encode_sentences, tail_batch
from forwardinf.experiments.tracing import build_pool, evaluate
from forwardinf.memory import reset_peak, status_mb
from forwardinf.models.language import train_language_model
from forwardinf.models.pretrained import TailLM, TailTask, load_pretrained, release_memory
from forwardinf.tasks.language_model import DictDataset

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--n-cities", type=int, default=300)
p.add_argument("--queries", type=int, default=60, help="queries scored per method (drawn as the trace draws its queries)")
p.add_argument("--candidates", type=int, default=20)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--fi-lr", type=float, default=1e-3, help="the lr the 200-query trace run tuned")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tracin-cache-mb", type=float, default=512.0, help="as the trace's --tracin-cache-mb")
p.add_argument("--out", default=None)
a = p.parse_args()
torch.set_num_threads(1)


phases: list[dict] = []


class Phase:
    def __init__(self, name: str, reset: bool = True) -> None:
        self.name, self.reset = name, reset

    def __enter__(self) -> "Phase":
        release_memory()
        self.start = status_mb("VmRSS")
        if self.reset:
            reset_peak()  # VmHWM := the current RSS
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        row = {"phase": self.name, "rss_start_mb": self.start, "peak_mb": status_mb("VmHWM"),
               "cpu_seconds": time.process_time() - self.cpu, "wall_seconds": time.perf_counter() - self.wall}
        phases.append(row)
        print(json.dumps(row), flush=True)


with Phase("load", reset=False):
    model, tok = load_pretrained(a.model)
    for q in model.parameters():
        q.requires_grad_(False)
facts = build_geo_facts(n_cities=a.n_cities)
data = encode_sentences(tok, facts.abstracts)
rng = random.Random(a.seed)  # the trace's own query and candidate draw (experiments/trace.py)
queries = select_queries(facts, a.queries, rng)
cands, relevant = [], []
for q in queries:
    c, props = facts.candidates(q, a.candidates, rng)
    cands.append(c)
    relevant.append([c.index(x) for x in props])

with Phase("inference sweep (full model, all logits)"), torch.no_grad():
    order = torch.argsort(data["attention_mask"].sum(1), stable=True)
    for s in range(0, len(order), a.batch_size):
        rows = order[s:s + a.batch_size]
        w = int(data["attention_mask"][rows].sum(1).max())
        model(input_ids=data["input_ids"][rows, :w], attention_mask=data["attention_mask"][rows, :w])

with Phase("prefix cache float32"):
    tb = tail_batch(model, data, 1, a.batch_size)
tail = TailLM(model, 1).freeze_head()
names = tail.trainable_names()
with Phase("fine-tune"):
    train_language_model(tail, TailTask(), DictDataset(tb), epochs=a.epochs, lr=5e-3, batch_size=32, seed=a.seed)


def score(est, cache_dtype):
    """Scores of every query's candidates (pool positions), CPU seconds per query."""
    out, secs = [], []
    for q, cs in zip(queries, cands):
        c = time.process_time()
        qb = DictDataset(tail_batch(model, encode_sentences(tok, [q]), 1, a.batch_size, dtype=cache_dtype))
        pos = position[torch.as_tensor(cs)]
        o = torch.argsort(pos)
        s = torch.empty(len(cs))
        s[o] = est.influence(qb, indices=pos[o])[0].detach().float()
        out.append(s)
        secs.append(time.process_time() - c)
    return out, sum(secs) / len(secs)


methods: dict[str, dict] = {}


def run(name, make, cache_dtype=None):
    with Phase(f"{name} fit"):
        est = make()
    with Phase(f"{name} queries"):
        s, per_q = score(est, cache_dtype)
    methods[name] = {"scores": s, "mrr": evaluate(s, relevant, 0)["mrr"], "cpu_seconds_per_query": per_q}
    print(f"  {name}: MRR {methods[name]['mrr']:.4f}, {per_q:.3f} CPU s/query", flush=True)
    del est


# the trace's Forward-INF settings: one nsgd ascent step, score = loss change
fi_kw = dict(steps=1, lr=a.fi_lr, optimizer="nsgd", score="loss", params=names, batch_size=a.batch_size)
pool, position = build_pool(tb)
del tb  # as the trace: one copy of the cache
run("forward-inf float32", lambda: ForwardINF(tail, TailTask(), **fi_kw).fit(pool))
run("tracin float32", lambda: TracIn(tail, TailTask(), params=names, batch_size=a.batch_size,
                                     cache_mb=a.tracin_cache_mb).fit(pool))
del pool
with Phase("prefix cache bfloat16"):
    tb = tail_batch(model, data, 1, a.batch_size, dtype=torch.bfloat16)
pool, position = build_pool(tb)
del tb
run("forward-inf bf16 cache", lambda: ForwardINF(tail, TailTask(), **fi_kw).fit(pool), torch.bfloat16)
run("forward-inf bf16 cache + bf16 tail", lambda: ForwardINF(tail, TailTask(dtype=torch.bfloat16), **fi_kw).fit(pool),
    torch.bfloat16)


def spearman(x, y):
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


ref = methods["forward-inf float32"]["scores"]
for m in methods.values():
    m["spearman_vs_fp32"] = sum(spearman(x, y) for x, y in zip(ref, m["scores"])) / len(ref)
    m["top1_agree_vs_fp32"] = sum(int(x.argmax() == y.argmax()) for x, y in zip(ref, m["scores"])) / len(ref)
    del m["scores"]
base = next(r["peak_mb"] for r in phases if r["phase"].startswith("inference"))
for r in phases:
    r["ratio_to_inference"] = r["peak_mb"] / base
res = {"model": a.model, "queries": a.queries, "candidates": a.candidates, "batch_size": a.batch_size, "fi_lr": a.fi_lr,
       "epochs": a.epochs, "threads": torch.get_num_threads(), "phases": phases, "methods": methods}
print(json.dumps(res, indent=1))
if a.out:
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
