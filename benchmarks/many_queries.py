"""Many queries: Forward-INF full, tail and shortlist next to gradient-store methods (issue 27).

    OMP_NUM_THREADS=1 python benchmarks/many_queries.py --n-train 6000            # every method
    python benchmarks/many_queries.py --n-train 6000 --methods forward-inf-shortlist   # some (merged)
    python benchmarks/many_queries.py --report-only --n-train 6000                 # rewrite the tables

Setup: Fashion-MNIST, the SmallCNN of benchmarks/cost.py (trained on all 60,000 images, 2 epochs,
cached), attributed against the first ``--n-train`` training images. Queries: up to 1,000, a
fixed interleaving of exact copies of training points (leaked), near copies (the copy shifted by
up to 2 px, ``forwardinf.data.augment``) and test images; the first 10 / 100 / 1,000 are used, so
each query set contains the smaller ones.

Each method runs in its own single-threaded process: fit once, then ``top_k(queries, 10)`` for
every query count it is given. Cost: CPU seconds (``time.process_time``) of fit, index and queries
(end-to-end for Q queries = fit + index + the Q-query call), and the process's peak memory
(VmHWM after data and model are loaded, so the ~0.5 GB of data and torch count for every method).
Quality: leakage T-1 on the exact and near copies (their training point ranks first), and on test
images the overlap of the top 10 with the full Forward-INF sweep's (on the test images among the
queries the full sweep was run on).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("forward-inf", "forward-inf-tail", "forward-inf-shortlist", "grad-cos", "tracin-last", "trak",
           "kronfluence-ekfac")
KINDS = ("copy", "near", "test")


# ------------------------------------------------------------------------------------ problem
def problem(args):
    """``model, train (x, y), queries (x, y), kinds [Q], targets [Q]`` (target -1 for test images)."""
    from forwardinf.data.augment import near_duplicates
    from forwardinf.data.loaders import load_idx
    from forwardinf.models import SmallCNN
    from forwardinf.training import train_or_load

    data = load_idx(args.data_root)

    def build():
        torch.manual_seed(0)  # the very model of benchmarks/cost.py
        return SmallCNN(data.input_shape, data.n_classes)

    model = train_or_load(build, (data.x_train, data.y_train), Path(args.cache) / "smallcnn-fmnist.pt",
                          epochs=2, lr=0.02, seed=0).eval()
    x, y = data.x_train[:args.n_train], data.y_train[:args.n_train]
    n_q = max(args.queries)
    g = torch.Generator().manual_seed(1)
    sources = torch.randperm(len(y), generator=g)[:n_q]
    tests = torch.randperm(len(data.y_test), generator=g)[:n_q]
    kinds = [KINDS[i % 3] for i in range(n_q)]
    near = near_duplicates(x[sources], kind="shift", seed=2)
    xq = torch.stack([x[sources[i]] if k == "copy" else near[i] if k == "near" else data.x_test[tests[i]]
                      for i, k in enumerate(kinds)])
    yq = torch.stack([data.y_test[tests[i]] if k == "test" else y[sources[i]] for i, k in enumerate(kinds)])
    targets = torch.tensor([-1 if k == "test" else int(sources[i]) for i, k in enumerate(kinds)])
    return model, (x, y), (xq, yq), kinds, targets


# -------------------------------------------------------------------------------------- child
def child(args) -> dict:
    import forwardinf as fi
    from forwardinf.baselines.registry import make_estimator
    from forwardinf.estimators.shortlist import Retriever
    from forwardinf.experiments.common import timer, warm_up
    from forwardinf.memory import reset_peak, status_mb

    torch.set_num_threads(1)
    model, train, (xq, yq), _, _ = problem(args)
    method = args.child
    out = {"method": method, "n_train": len(train[1]), "threads": torch.get_num_threads()}
    warm_up(model, train)
    reset_peak()
    if method == "forward-inf-tail":
        est = fi.TailForwardINF(model, split="classifier")
    elif method.startswith("forward-inf"):
        est = fi.ForwardINF(model)
    else:
        est = make_estimator(method, model)
    with timer() as t:
        est.fit(train)
    out["fit_cpu"], out["fit_wall"] = t["cpu_seconds"], t["seconds"]
    sizes = [q for q in args.queries if q <= args.max_queries]
    runs = {}
    # grad-cos / TracIn hold [chunk, 455k] training gradients at once: 512 keeps that under 1 GB
    options = {"chunk": 512} if method in ("grad-cos", "tracin-last") else {}
    if method != "forward-inf-shortlist":
        for q in sizes:
            with timer() as t:
                top = est.top_k((xq[:q], yq[:q]), 10, **options)
            runs.setdefault("", {})[str(q)] = {"cpu": t["cpu_seconds"], "wall": t["seconds"], "top10": top.indices.tolist()}
            print(f"[{time.strftime('%H:%M:%S')}] {method} Q={q}: {t['cpu_seconds']:.1f} CPU s", flush=True)
    if method in ("forward-inf-shortlist", "forward-inf-tail"):  # the shortlist on the full / tail estimator
        with timer() as t:
            retriever = Retriever(est, Path(args.cache) / f"index-{method}-{len(train[1])}", source=args.source)
        out["index_cpu"], out["index_wall"] = t["cpu_seconds"], t["seconds"]
        for k in args.shortlist:
            for q in sizes:
                with timer() as t:
                    top = retriever.top_k((xq[:q], yq[:q]), 10, shortlist=k)
                runs.setdefault(f"shortlist K={k}", {})[str(q)] = {"cpu": t["cpu_seconds"], "wall": t["seconds"],
                                                                   "top10": top.indices.tolist()}
                print(f"[{time.strftime('%H:%M:%S')}] {method} K={k} Q={q}: {t['cpu_seconds']:.1f} CPU s", flush=True)
    out["runs"] = runs
    out["peak_mb"] = status_mb("VmHWM")
    out["load_average"] = os.getloadavg()[0]
    return out


def run_child(method: str, args) -> None:
    path = result_path(args, method)
    cmd = [sys.executable, __file__, "--child", method, "--json", str(path), "--n-train", str(args.n_train),
           "--queries", *map(str, args.queries), "--shortlist", *map(str, args.shortlist), "--source", args.source,
           "--max-queries", str(args.limits.get(method, max(args.queries))), "--cache", args.cache]
    cmd += ["--data-root", args.data_root] if args.data_root else []
    print(f"[{time.strftime('%H:%M:%S')}] {method} ...", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)


def result_path(args, method: str) -> Path:
    return Path(args.cache) / f"many-{args.n_train}-{method}.json"


# ------------------------------------------------------------------------------------- report
def quality(top10: list, kinds: list, targets: torch.Tensor, reference: dict | None) -> dict:
    """T-1 on exact / near copies, and top-10 overlap with the full sweep on test images."""
    out = {}
    for kind in ("copy", "near"):
        hits = [top10[i][0] == int(targets[i]) for i in range(len(top10)) if kinds[i] == kind]
        out[f"t1_{kind}"] = (sum(hits) / len(hits), len(hits)) if hits else None
    if reference is not None:
        both = [i for i in range(min(len(top10), len(reference))) if kinds[i] == "test"]
        if both:
            out["overlap_test"] = (sum(len(set(top10[i]) & set(reference[i])) / 10 for i in both) / len(both), len(both))
    return out


def fit_line(points: dict) -> tuple[float, float]:
    """``cpu = a + b Q`` through the two largest measured query counts ``{Q: cpu}`` (the smallest call
    carries one-time costs); a single count gives the line through the origin."""
    qs = sorted(points)
    if len(qs) == 1:
        return 0.0, points[qs[0]] / qs[0]
    (q0, q1) = qs[-2:]
    b = (points[q1] - points[q0]) / (q1 - q0)
    return points[q1] - b * q1, b


def report(args) -> None:
    _, _, _, kinds, targets = problem(args)
    found = {m: json.loads(result_path(args, m).read_text()) for m in METHODS if result_path(args, m).is_file()}
    full = found.get("forward-inf", {}).get("runs", {}).get("", {})
    reference = full[max(full, key=int)]["top10"] if full else None
    rows, table = [], []
    for method, r in found.items():
        for label, runs in r["runs"].items():
            index = r.get("index_cpu") if label else None
            fixed = r["fit_cpu"] + (index or 0.0)
            a, b = fit_line({int(q): v["cpu"] for q, v in runs.items()})
            row = {"method": method + (f" {label}" if label else ""), "n_train": r["n_train"], "fit_cpu": r["fit_cpu"],
                   "index_cpu": index, "peak_mb": r["peak_mb"], "per_query_cpu": b,
                   "queries": {q: {"cpu": v["cpu"], "end_to_end": fixed + v["cpu"]} for q, v in runs.items()}}
            for q in map(str, args.queries):
                if q not in runs:  # not measured: the line through the measured query counts
                    row["queries"][q] = {"cpu": a + b * int(q), "end_to_end": fixed + a + b * int(q), "extrapolated": True}
            biggest = max(runs, key=int)
            row["quality_at"] = int(biggest)
            row.update(quality(runs[biggest]["top10"], kinds, targets, reference))
            rows.append(row)
            table.append(row)
    write(args, rows)


def _cell(v: dict) -> str:
    s = f"{v['end_to_end']:,.0f}"
    return f"*{s}*" if v.get("extrapolated") else s


def _frac(v) -> str:
    return "-" if not v else f"{v[0]:.3f} ({v[1]})"


def write(args, rows: list) -> None:
    qs = list(map(str, args.queries))
    head = ("| method | fit CPU s | index CPU s | per query CPU s | " + " | ".join(f"end-to-end Q={q}" for q in qs)
            + " | peak MB | T-1 copies | T-1 near | top-10 overlap (test) | quality at Q |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        idx = "-" if r["index_cpu"] is None else f"{r['index_cpu']:.1f}"
        lines.append(f"| {r['method']} | {r['fit_cpu']:,.0f} | {idx} | {r['per_query_cpu']:.3f} | "
                     + " | ".join(_cell(r["queries"][q]) for q in qs)
                     + f" | {r['peak_mb']:,.0f} | {_frac(r.get('t1_copy'))} | {_frac(r.get('t1_near'))} | "
                     f"{_frac(r.get('overlap_test'))} | {r['quality_at']} |")
    out = {"n_train": args.n_train, "queries": args.queries, "shortlist": args.shortlist, "source": args.source,
           "command": " ".join(["python", "benchmarks/many_queries.py", *sys.argv[1:]]), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many_queries.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "many_queries_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def lds_part(args) -> dict:
    """LDS of Forward-INF (default and counterfactual) in full and through shortlists, on the
    ``forwardinf lds`` Fashion-MNIST setup (ground truth retrained and cached under ``--cache``).
    A shortlist scores only its K candidates: every other training point gets score 0."""
    import numpy as np

    import forwardinf as fi
    from forwardinf.cli import build_parser
    from forwardinf.experiments import lds

    torch.set_num_threads(1)
    ns = build_parser().parse_args(["lds", "--dataset", "fashion-mnist", "--n-train", str(args.lds_n_train),
                                    "--subsets", str(args.lds_subsets), "--n-queries", str(args.lds_queries),
                                    "--out", str(Path(args.cache) / f"lds-{args.lds_n_train}"), "--quiet"])
    ns = lds.apply_defaults(ns)
    problem = lds.load_problem(ns)
    masks, outputs = lds.ground_truth(ns, problem, False)
    targets, fit = lds.signed_targets(outputs), lds.n_fit(ns.subsets, ns.holdout)
    model, train = problem.prepared.model, problem.prepared.split.train()
    out = {"n_train": len(train[1]), "subsets": ns.subsets, "n_queries": len(problem.queries[1]),
           "epochs": ns.epochs, "retraining_cpu": float(np.nansum(outputs["cpu_seconds"])), "rows": {}}
    for name, est in (("forward-inf", fi.ForwardINF(model)),
                      ("forward-inf-counterfactual", fi.ForwardINF.preset("counterfactual", model))):
        est.fit(train)
        variants = {"full": est.influence(problem.queries)}
        for k in args.lds_shortlist:
            top = est.top_k(problem.queries, k=k, shortlist=k)  # every candidate's score
            variants[f"shortlist K={k}"] = torch.zeros(len(problem.queries[1]), len(train[1])).scatter_(
                1, top.indices, top.scores)
        for label, scores in variants.items():
            metrics, _ = lds.evaluate(scores.numpy(), masks, targets, fit, 1000, 0)
            out["rows"][f"{name} {label}"] = {m: metrics[m] for m in ("lds_margin", "lds_margin_ci", "lds_margin_heldout")}
            print(f"{name} {label}: LDS margin {metrics['lds_margin']:+.3f}", flush=True)
    (Path(args.cache) / f"many-lds-{args.lds_n_train}.json").write_text(json.dumps(out, indent=1))
    return out


def recall_part(args) -> dict:
    """Candidate recall of each index source: the fraction of the full sweep's top 10 among the
    ``K`` nearest training points, on the test images among the queries."""
    import forwardinf as fi
    from forwardinf.estimators.shortlist import Retriever

    torch.set_num_threads(1)
    model, train, (xq, yq), kinds, _ = problem(args)
    tests = [i for i, k in enumerate(kinds) if k == "test"][:args.recall_queries]
    queries = (xq[tests], yq[tests])
    est = fi.ForwardINF(model).fit(train)
    full = est.top_k(queries, 10).indices
    n = len(train[1])
    out = {"n_train": n, "n_queries": len(tests), "rows": {}}
    for source in ("features", "directions"):
        retriever = Retriever(est, source=source)
        for k in (n // 100, n // 30, n // 10, n // 4):
            cands = retriever.candidates(queries, k)
            kept = sum(len(set(f.tolist()) & set(c.tolist())) / 10 for f, c in zip(full, cands)) / len(tests)
            out["rows"][f"{source} K={k}"] = kept
            print(f"{source} K={k}: {kept:.3f}", flush=True)
    (Path(args.cache) / f"many-recall-{n}.json").write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--queries", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--shortlist", type=int, nargs="+", default=[200], help="candidates per query (K), one or more")
    p.add_argument("--source", default="features", choices=("auto", "features", "directions"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--limit", action="append", default=[], metavar="METHOD=Q",
                   help="largest query count a method runs (the rest is extrapolated), e.g. forward-inf=100")
    p.add_argument("--max-queries", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--recall", action="store_true", help="only the candidate recall of each index source")
    p.add_argument("--recall-queries", type=int, default=12)
    p.add_argument("--lds", action="store_true", help="only the LDS part (forwardinf lds setup, ground truth cached)")
    p.add_argument("--lds-n-train", type=int, default=2000)
    p.add_argument("--lds-subsets", type=int, default=50)
    p.add_argument("--lds-queries", type=int, default=200)
    p.add_argument("--lds-shortlist", type=int, nargs="+", default=[100, 400])
    p.add_argument("--cache", default="/tmp/forwardinf-bench")
    p.add_argument("--data-root", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.limits = {k: int(v) for k, v in (s.split("=") for s in args.limit)}
    if args.child:
        Path(args.json).write_text(json.dumps(child(args)))
        return
    if args.lds or args.recall:
        lds_part(args) if args.lds else recall_part(args)
        return
    if not args.report_only:
        for method in args.methods.split(","):
            run_child(method, args)
    report(args)


if __name__ == "__main__":
    main()
