"""CPU seconds of head-grad's candidate stage alone (query factors, FAISS pool, re-rank) at 60k x 1,000.

    OMP_NUM_THREADS=1 python benchmarks/head_grad_candidates.py     # after the many_queries.py head-grad run

Loads the index and factors that ``many_queries.py --methods forward-inf-shortlist-head-grad``
built in ``/tmp/many2/b`` and times each stage of ``Retriever.candidates`` for the 1,000 queries;
writes ``rerank-candidates-60000.json`` there (copied to results/head_grad_candidates.json; quoted in
results/many_queries.md).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import forwardinf as fi  # noqa: E402
import many_queries as mq  # noqa: E402
from forwardinf.estimators.shortlist import Retriever  # noqa: E402

torch.set_num_threads(1)
args = argparse.Namespace(data_root=None, cache="/tmp/many2/b", n_train=60000, queries=[10, 100, 1000])
model, train, (xq, yq), kinds, _ = mq.problem(args)
est = fi.ForwardINF(model).fit(train, lazy=True)
t0 = time.process_time()
r = Retriever(est, "/tmp/many2/b/index-forward-inf-shortlist-head-grad-60000", source="head-grad")
t1 = time.process_time()
out = {"load_cpu": t1 - t0}
for k in (100, 200):
    t0 = time.process_time()
    qf = r._head_factors(est._dataset((xq, yq), "queries"), "queries")
    t1 = time.process_time()
    pools = r.index.search(r._unit(r.head.features(qf)), r.pool_size(k))
    t2 = time.process_time()
    c = r._rerank(qf, k)
    t3 = time.process_time()
    out[k] = {"query_factors": t1 - t0, "faiss_pool_search": t2 - t1, "pool_and_rerank": t3 - t2,
              "unique_candidates": {q: int(c[:q].unique().numel()) for q in (10, 100, 1000)}}
    print(k, out[k], flush=True)
json.dump(out, open("/tmp/many2/b/rerank-candidates-60000.json", "w"), indent=1)
