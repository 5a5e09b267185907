"""Peak memory of plain inference with the pretrained LM, the reference for the trace run's peak.

Loads the model exactly as ``forwardinf trace --model MODEL`` does, then runs the full model
(no grad, every position's logits, as a user's inference sweep) over the longest abstracts in
batches of ``--batch-size``; prints the process's max RSS. Compare with ``config.peak_rss_mb`` of
the trace run's results.json.

    OMP_NUM_THREADS=1 python benchmarks/trace_pretrained_memory.py --model smollm2
"""
import argparse
import json
import time

import torch

from forwardinf.data.facts import build_geo_facts
from forwardinf.experiments.trace_pretrained import encode_sentences, peak_rss_mb
from forwardinf.models.pretrained import load_pretrained

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--batches", type=int, default=3)
p.add_argument("--n-cities", type=int, default=300)
a = p.parse_args()
torch.set_num_threads(1)
model, tok = load_pretrained(a.model)
rss_loaded = peak_rss_mb()
data = encode_sentences(tok, build_geo_facts(n_cities=a.n_cities).abstracts)
order = torch.argsort(data["attention_mask"].sum(1), descending=True)
c = time.process_time()
with torch.no_grad():
    for s in range(0, a.batches * a.batch_size, a.batch_size):
        rows = order[s:s + a.batch_size]
        model(input_ids=data["input_ids"][rows], attention_mask=data["attention_mask"][rows])
print(json.dumps({"model": a.model, "peak_rss_mb_after_load": rss_loaded, "peak_rss_mb_inference": peak_rss_mb(),
                  "cpu_seconds": time.process_time() - c, "batch_size": a.batch_size, "width": int(data["attention_mask"].sum(1).max())}))
