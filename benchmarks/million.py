"""One million training points scored into a score store, with memory that does not grow with N.

    python benchmarks/million.py                       # N = 65,536 / 262,144 / 1,000,000
    python benchmarks/million.py --sizes 1000000 --queries 8

Synthetic inputs (the measurement is of memory and time, not of attribution quality): example
``i`` is ``sin(i * a + b)`` for fixed random vectors ``a, b`` (1x8x8), label ``i mod 10``, generated
on access by a map-style Dataset, so the data never sit in memory. The model is an MLP
(64-128-10). Each size runs in its own process through ``score_to_store`` (shards of
``--shard-size``, the default Forward-INF recipe); the peak resident memory (VmHWM) of that
process is reported. Memory per process is O(shard_size + n_queries * shard_size), not O(N).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from forwardinf.memory import status_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


class Synthetic(Dataset):
    """``n`` examples ``(sin(i * a + b) [1, 8, 8], i mod 10)``, made on access."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.a = torch.rand(1, 8, 8, generator=g, dtype=torch.float64) * 1e-3
        self.b = torch.rand(1, 8, 8, generator=g, dtype=torch.float64) * 6.28

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sin(i * self.a + self.b).float(), torch.tensor(i % 10)


def child(args) -> dict:
    import forwardinf as fi
    from forwardinf.distributed import score_to_store
    from forwardinf.models import MLP

    torch.set_num_threads(1)
    model = MLP((1, 8, 8), 10, hidden=(128,))
    train = Synthetic(args.child)
    queries = Synthetic(args.queries, seed=1)
    est = fi.ForwardINF(model, fi.ClassificationTask(), batch_size=1024, query_chunk=args.queries)
    store = Path(args.store)
    shutil.rmtree(store, ignore_errors=True)
    before = status_mb("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    run = score_to_store(est, train, queries, store, shard_size=args.shard_size, query_block=args.queries, k=10)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    disk = sum(p.stat().st_size for p in (store / "blocks").iterdir()) / 2**20
    out = {"n_train": args.child, "n_queries": args.queries, "shards": run.store.n_shards, "seconds": wall,
           "cpu_seconds": cpu, "rss_before_mb": before, "peak_mb": status_mb("VmHWM"), "store_mb": disk,
           "top1_index_of_query0": int(run.indices[0, 0])}
    shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="65536,262144,1000000")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument("--store", default="/tmp/forwardinf-million-store")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.json).write_text(json.dumps(child(args)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        tmp = Path(args.store + f"-{n}.json")
        print(f"[{time.strftime('%H:%M:%S')}] N = {n:,} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", str(n), "--json", str(tmp), "--queries", str(args.queries),
                        "--shard-size", str(args.shard_size), "--store", args.store], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(tmp.read_text()))
        print(f"    {rows[-1]}", flush=True)
    table = ["| N training points | shards | wall s | CPU s | CPU µs / point / query | RSS before MB | peak RSS MB | "
             "store on disk MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['n_train']:,} | {r['shards']} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                     f"{1e6 * r['cpu_seconds'] / (r['n_train'] * r['n_queries']):.1f} | {r['rss_before_mb']:.0f} | "
                     f"{r['peak_mb']:.0f} | {r['store_mb']:.0f} |")
    text = "\n".join([
        "# One million training points: memory does not grow with N",
        "",
        f"Forward-INF (default recipe: 1 normalised ascent step, cosine score with 16 forward-mode directions) "
        f"scoring {args.queries} queries against N synthetic training points made on access (1x8x8, MLP 64-128-10), "
        f"through `score_to_store` with shards of {args.shard_size:,}: per shard, fit (base values + directional "
        "derivatives) and one block of scores written to disk; then the streaming top-10 merge. One process, one "
        "thread, on a 2-core machine shared with other jobs (wall seconds inflated; CPU seconds are the process's).",
        "",
        *table,
        "",
        "The time includes fingerprinting the data for the manifest (one pass) and the top-k merge. The store grows "
        "with N on disk (N x queries float32); resident memory stays at the shard's working set.",
        "",
        f"Command: `python benchmarks/million.py --sizes {args.sizes} --queries {args.queries} "
        f"--shard-size {args.shard_size}`",
    ]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "million.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
