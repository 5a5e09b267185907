"""Candidate recall of gradient-type similarities that are not index sources (yet), next to them.

    python benchmarks/head_grad_recall.py --cache /tmp/many2/b

The 10,000-point many-query problem of many_queries.py, against the top 10s of its cached full
Forward-INF sweep (``many-10000-forward-inf.json`` in ``--cache``; no sweep here). For the 33 test
images among the queries, the fraction of the full sweep's top 10 among the K most similar
training points, by exact (factorised) similarities of SmallCNN's head: features; the last
layer's gradient (``source="last-grad"``); the first head layer's gradient (``classifier.0``:
error at its output x its input, 128 x 3,137); both layers' (the gradient of the whole head);
and random sketches of the first layer's part, ``(P a) x (Q d)``, concatenated with the exact
last-layer part -- what an index over both layers would have to store.
Last, re-ranking: the features' or last-grad's top K' re-ranked by the exact head gradient.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import many_queries as mq  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--cache", default="/tmp/many2/b")
p.add_argument("--data-root", default=None)
cli = p.parse_args()
torch.set_num_threads(1)
args = argparse.Namespace(data_root=cli.data_root, cache=cli.cache, n_train=10000, queries=[10, 100, 1000])
model, (x, y), (xq, yq), kinds, _ = mq.problem(args)
runs = json.loads(open(Path(cli.cache) / "many-10000-forward-inf.json").read())["runs"][""]
top10 = runs[max(runs, key=int)]["top10"]
tests = [i for i, t in enumerate(top10) if t and kinds[i] == "test"]
full = torch.tensor([top10[i] for i in tests])
m = model.classifier
def parts(xx, yy):
    out = []
    for s in range(0, len(yy), 500):
        xb, yb = xx[s:s+500], yy[s:s+500]
        with torch.no_grad():
            a1 = model.features(xb)
        o1 = m[0](a1).detach().requires_grad_(True)
        h = torch.relu(o1)
        o2 = m[2](h)
        logits = o2
        true = logits.gather(1, yb[:, None]).squeeze(1)
        others = logits.masked_fill(torch.nn.functional.one_hot(yb, 10).bool(), float("-inf"))
        marg = torch.logsumexp(others, 1) - true
        e, d1 = torch.autograd.grad(marg.sum(), [o2, o1])
        out.append((a1, d1, h.detach(), e))
    return [torch.cat(z) for z in zip(*out)]
A1, D1, H, E = parts(x, y)
qA1, qD1, qH, qE = parts(xq[tests], yq[tests])
def cos(Sq, st, sq):  # Sq [q, n], self norms squared
    return Sq / (sq[:, None].sqrt() * st[None].sqrt()).clamp_min(1e-30)
one = lambda Z: (Z * Z).sum(1)
last = (qE @ E.T) * (qH @ H.T + 1); last_s = one(E) * (one(H) + 1); last_q = one(qE) * (one(qH) + 1)
pen = (qD1 @ D1.T) * (qA1 @ A1.T + 1); pen_s = one(D1) * (one(A1) + 1); pen_q = one(qD1) * (one(qA1) + 1)
feat = cos(qH @ H.T, one(H), one(qH))
variants = {
  "features": feat,
  "last-grad": cos(last, last_s, last_q),
  "last-grad nobias": cos((qE @ E.T) * (qH @ H.T), one(E) * one(H), one(qE) * one(qH)),
  "error only": cos(qE @ E.T, one(E), one(qE)),
  "pen-grad": cos(pen, pen_s, pen_q),
  "last2-grad": cos(last + pen, last_s + pen_s, last_q + pen_q),
  "last2 unit-sum": cos(last, last_s, last_q) + cos(pen, pen_s, pen_q),
  "feat+lastgrad": feat + cos(last, last_s, last_q),
}


def recall(S: torch.Tensor) -> list[float]:
    """Share of each test image's full-sweep top 10 among the top K of the similarities ``S`` [Q, N], K = 100, 200, 500."""
    return [sum(len(set(f.tolist()) & set(c.tolist())) / 10 for f, c in zip(full, S.topk(K, dim=1).indices)) / len(tests)
            for K in (100, 200, 500)]


print(f"{len(tests)} test images; recall at K = 100, 200, 500")
for name, S in variants.items():
    row = recall(S)
    print(f"{name:20s}", " ".join(f"{r:.3f}" for r in row), flush=True)
print("sketches: [last-grad, (P a1) x (Q d1)] concatenated, Gaussian P, Q / sqrt(k)")
A1b, qA1b = torch.cat([A1, torch.ones(len(A1), 1)], 1), torch.cat([qA1, torch.ones(len(qA1), 1)], 1)
Lv = (E[:, :, None] * torch.cat([H, torch.ones(len(H), 1)], 1)[:, None]).flatten(1)
qLv = (qE[:, :, None] * torch.cat([qH, torch.ones(len(qH), 1)], 1)[:, None]).flatten(1)
for k1, k2 in ((16, 128), (32, 32), (64, 16), (32, 128)):
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        P = torch.randn(A1b.shape[1], k1, generator=g) / k1 ** 0.5
        Q = torch.eye(128) if k2 == 128 else torch.randn(128, k2, generator=g) / k2 ** 0.5
        sk = lambda a, d: ((a @ P)[:, :, None] * (d @ Q)[:, None]).flatten(1)
        T = torch.cat([Lv, sk(A1b, D1)], 1); qT = torch.cat([qLv, sk(qA1b, qD1)], 1)
        T, qT = T / T.norm(dim=1, keepdim=True), qT / qT.norm(dim=1, keepdim=True)
        S = qT @ T.T
        row = recall(S)
        print(f"k1={k1} k2={k2} dim={T.shape[1]} seed={seed}", " ".join(f"{r:.3f}" for r in row), flush=True)
print("re-ranking: the features' or last-grad's top K' re-ranked by the exact head gradient (both layers)")
head = variants["last2-grad"]
for first in ("features", "last-grad"):
    for pool in (1000, 2000):
        keep = variants[first].topk(pool, dim=1).indices
        S = torch.full_like(head, float("-inf")).scatter_(1, keep, head.gather(1, keep))
        row = recall(S)
        print(f"{first} top {pool} -> head", " ".join(f"{r:.3f}" for r in row), flush=True)
