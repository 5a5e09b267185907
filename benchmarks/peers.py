"""Forward-INF beside the peer libraries, on the same model, data and leaked queries, in one run.

    pip install captum dattri && pip install --no-deps kronfluence   # the peers (never another torch)
    python benchmarks/peers.py --n-train 500 --n-queries 16

The model is the SmallCNN of benchmarks/cost.py (trained on all 60,000 Fashion-MNIST images,
cached). The training set is a seeded random subset of ``--n-train`` of those images, sized so
that every peer finishes on a shared 2-core CPU; the queries are exact copies of ``--n-queries``
of them (leakage: a method finds a leak when the copied image ranks first, T-1). Every method
scores the whole subset for every query with all of the model's parameters, and ranks by its
library's "most helpful / proponent" score. Seconds are wall and CPU time of the method alone
(setup + scoring; the model is trained once, outside). Missing peers are reported, not faked.

| name | what |
|---|---|
| forward-inf | ``fi.ForwardINF`` defaults |
| forward-inf-tail | ``fi.TailForwardINF(split="classifier")`` |
| captum-tracincp | captum ``TracInCP``, the final model as its one checkpoint |
| dattri-if-cg | dattri ``IFAttributorCG`` (conjugate gradient, 10 iterations, damping 1e-3) |
| dattri-if-lissa | dattri ``IFAttributorLiSSA`` (depth 100, batch 32, damping 1e-3, scaling 50) |
| dattri-trak | dattri ``TRAKAttributor`` (one checkpoint, projection to 512 dims, the margin as output function) |
| kronfluence-ekfac | kronfluence EK-FAC factors + pairwise scores |

The peers run through ``forwardinf.baselines.peers``, the adapters ``forwardinf lds`` uses too.
(peers.md's dattri-trak row predates them: it used the loss as TRAK's output function.)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from forwardinf.memory import status_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("forward-inf", "forward-inf-tail", "captum-tracincp", "dattri-trak", "kronfluence-ekfac", "dattri-if-lissa",
           "dattri-if-cg")


def problem(args):
    from forwardinf.data.loaders import load_idx
    from forwardinf.models import SmallCNN
    from forwardinf.training import train_or_load

    from cost import seeded  # the very same SmallCNN checkpoint as benchmarks/cost.py
    data = load_idx(args.data_root)
    model = train_or_load(lambda: seeded(SmallCNN, data), (data.x_train, data.y_train),
                          Path(args.cache) / "smallcnn-fmnist.pt", epochs=args.epochs, lr=0.02, seed=0).eval()
    g = torch.Generator().manual_seed(args.seed)
    subset = torch.randperm(len(data.y_train), generator=g)[:args.n_train].sort().values
    x, y = data.x_train[subset].contiguous(), data.y_train[subset].contiguous()
    leaked = torch.randperm(args.n_train, generator=g)[:args.n_queries]
    return model, (x, y), (x[leaked].clone(), y[leaked].clone()), leaked


# ------------------------------------------------------------------------------------- methods
def forward_inf(model, train, queries, tail=False):
    import forwardinf as fi
    from forwardinf.estimators.tail import TailForwardINF

    if tail:
        est = TailForwardINF(model, fi.ClassificationTask(), split="classifier", batch_size=256)
    else:
        est = fi.ForwardINF(model, fi.ClassificationTask(), batch_size=32, query_chunk=16)
    return est.fit(train).influence(queries)


# The peers through forwardinf.baselines.peers (the adapters `forwardinf lds` uses too), with the
# settings of this benchmark: the final model as captum's one checkpoint, dattri's TRAK at 512
# dimensions, kronfluence measuring the loss (this is a leakage benchmark, not an LDS one).
PEER_OPTIONS = {
    "captum-tracincp": {},
    "dattri-if-cg": {"solver": "cg"},
    "dattri-if-lissa": {"solver": "lissa"},
    "dattri-trak": {"proj_dim": 512},
    "kronfluence-ekfac": {"measurement": "loss"},
}


def peer(name, model, train, queries):
    from forwardinf.baselines.methods import PEERS

    return PEERS[name](model, **PEER_OPTIONS[name]).fit(train).influence(queries)


SETTINGS = {
    "forward-inf": "defaults: 1 nsgd ascent step, cosine score, 16 directions",
    "forward-inf-tail": "split=classifier (2 linear layers updated)",
    "captum-tracincp": "final model as the one checkpoint, all layers",
    "dattri-if-cg": "CG, 10 iterations, damping 1e-3",
    "dattri-if-lissa": "LiSSA depth 100, batch 32, damping 1e-3, scaling 50",
    "dattri-trak": "1 checkpoint, projection to 512 dims",
    "kronfluence-ekfac": "EK-FAC factors on the subset, pairwise scores",
}

RUNNERS = {
    "forward-inf": forward_inf,
    "forward-inf-tail": lambda *a: forward_inf(*a, tail=True),
    **{name: (lambda *a, name=name: peer(name, *a)) for name in PEER_OPTIONS},
}


def measure(name: str, args) -> dict:
    """Run one method on the shared problem (in this process) and return its metrics."""
    import resource

    from forwardinf.baselines.peers import INSTALL
    from forwardinf.metrics import topk_detection_rate

    # A peer that runs away with memory fails here with MemoryError instead of waking the
    # machine's OOM killer (dattri's CG reached 13 GB on this problem before this limit).
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    model, train, queries, leaked = problem(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        scores = RUNNERS[name](model, train, queries).detach().float().cpu()
    except ImportError as e:
        hint = INSTALL.get((e.name or "").split(".")[0], f"pip install {e.name}")
        return {"error": f"skipped: {e.name} is not installed ({hint})"}
    except Exception as e:  # noqa: BLE001 - a peer failing is a result too
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert scores.shape == (args.n_queries, args.n_train), (name, scores.shape)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), f"{name} changed the model"
    peak = status_mb("VmHWM")
    return {"seconds": wall, "cpu_seconds": cpu, "peak_mb": peak, "top1": topk_detection_rate(scores, leaked, 1),
            "top5": topk_detection_rate(scores, leaked, 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-queries", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-gb", type=float, default=8.0, help="address-space limit of each method's process")
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache", default="/tmp/forwardinf-bench")
    p.add_argument("--tag", default="")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.child:
        Path(args.json).write_text(json.dumps(measure(args.child, args)))
        return
    problem(args)  # trains and caches the model once, before the methods start
    results: dict = {}
    # Each method in its own process, one after another: its own peak memory, and a peer that
    # crashes or is killed becomes a row of the table instead of ending the run.
    for name in [m for m in args.methods.split(",") if m]:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--child", name, "--json", str(out)] + [
                a for k, v in vars(args).items() if k not in ("child", "json", "methods", "tag") and v is not None
                for a in (f"--{k.replace('_', '-')}", str(v))]
            done = subprocess.run(cmd)
            results[name] = json.loads(out.read_text()) if out.is_file() else {
                "error": f"the process ended with code {done.returncode} (negative: killed by signal)"}
        print(f"    {results[name]}", flush=True)
        write(results, args)  # after every method: a run stopped midway keeps what it measured


def write(results: dict, args) -> None:
    """Write ``peers<tag>.md`` and ``.json`` with every method measured so far."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | - | - | - | - | - | {r['error']} |")
        else:
            rows.append(f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mb']:.0f} | {r['top1']:.3f} | "
                        f"{r['top5']:.3f} | "
                        f"{SETTINGS.get(name, '')} |")
    text = "\n".join([
        "# Forward-INF vs peer libraries: seconds and leakage detection on the same model, data, queries",
        "",
        f"SmallCNN (455k parameters) trained on Fashion-MNIST (60k); a random subset of {args.n_train:,} training "
        f"images is the training set to score; {args.n_queries} queries are exact copies of some of them. All "
        "parameters, every query against every training image. One thread; the 2-core machine was shared with "
        "other jobs, so wall seconds are inflated (CPU seconds are the method's own). Each method runs in its own "
        "process; *peak MB* is that process's VmHWM, including the ~850 MB of Fashion-MNIST + torch every process "
        "loads. A peer that is not installed, fails or runs out of memory (limit "
        f"{args.memory_limit_gb:g} GB) appears as a row with the reason.",
        "",
        "| method | wall s | CPU s | peak MB | T-1 | T-5 | settings / note |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The paper's Table 2 (leakage, CIFAR-10 ResNet-18, 500 leaked of 50,000, their own IF/TracIn code): "
        "Forward-INF 0.3 min / T-1 100%; IF (LiSSA) 100 / 1000 / 10000 recursions 10 / 15 / 72 min, T-1 30% / 45% / "
        "0%; TracIn 1 / 5 checkpoints 12 / 60 min, T-1 2% / 6%. A different model, data and scale: the pattern "
        "(one forward-only method, fast and exact on duplicates, against gradient methods that are slower and "
        "miss most copies) is what carries over, not the numbers.",
        "",
        f"Versions: torch {version('torch')}, captum {version('captum')}, dattri {version('dattri')}, "
        f"kronfluence {version('kronfluence')}.",
        "",
        f"Command: `python benchmarks/peers.py --n-train {args.n_train} --n-queries {args.n_queries} "
        f"--methods {','.join(results)}`",
    ]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"peers{args.tag}.md").write_text(text)
    (RESULTS / f"peers{args.tag}.json").write_text(json.dumps({"command": " ".join(sys.argv), "config": {
        "n_train": args.n_train, "n_queries": args.n_queries, "seed": args.seed}, "methods": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
