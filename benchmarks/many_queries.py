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
METHODS = ("forward-inf", "forward-inf-tail", "forward-inf-shortlist", "forward-inf-shortlist-head-grad", "grad-cos",
           "tracin-last", "trak", "kronfluence-ekfac")
SHORTLIST = "forward-inf-shortlist"  # and SHORTLIST-<source>: the index source in the method's name
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
def child(args) -> None:
    import forwardinf as fi
    from forwardinf.baselines.methods import make_estimator
    from forwardinf.estimators.shortlist import Retriever
    from forwardinf.experiments.common import timer, warm_up
    from forwardinf.memory import reset_peak

    torch.set_num_threads(1)
    model, train, (xq, yq), kinds, _ = problem(args)
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
        # the shortlist's fit leaves the cosine's sensitivities to the candidates that need them
        est.fit(train, lazy=True) if method.startswith(SHORTLIST) else est.fit(train)
    out["fit_cpu"], out["fit_wall"] = t["cpu_seconds"], t["seconds"]
    sizes = [q for q in args.queries if q <= args.max_queries]
    runs = {}
    # grad-cos / TracIn hold [chunk, 455k] training gradients at once: 512 keeps that under 1 GB
    options = {"chunk": 512} if method in ("grad-cos", "tracin-last") else {}
    if method == "forward-inf" and args.tests_only:  # the reference sweep, on the test images alone
        pos = [i for i, k in enumerate(kinds[:max(sizes)]) if k == "test"]
        with timer() as t:
            top = est.top_k((xq[pos], yq[pos]), 10)
        top10 = [None] * max(sizes)
        for j, i in enumerate(pos):
            top10[i] = top.indices[j].tolist()
        runs[""] = {str(len(pos)): {"cpu": t["cpu_seconds"], "wall": t["seconds"], "top10": top10, "tests_only": True}}
        print(f"[{time.strftime('%H:%M:%S')}] {method} {len(pos)} test queries: {t['cpu_seconds']:.1f} CPU s", flush=True)
    elif not method.startswith(SHORTLIST):
        for q in sizes:
            with timer() as t:
                top = est.top_k((xq[:q], yq[:q]), 10, **options)
            runs.setdefault("", {})[str(q)] = {"cpu": t["cpu_seconds"], "wall": t["seconds"], "top10": top.indices.tolist()}
            save(args, out, runs)
            print(f"[{time.strftime('%H:%M:%S')}] {method} Q={q}: {t['cpu_seconds']:.1f} CPU s", flush=True)
    if method.startswith(SHORTLIST) or method == "forward-inf-tail":  # the shortlist on the full / tail estimator
        source = method[len(SHORTLIST) + 1:] if method.startswith(SHORTLIST + "-") else args.source
        with timer() as t:
            retriever = Retriever(est, Path(args.cache) / f"index-{method}-{len(train[1])}", source=source)
        out["index_cpu"], out["index_wall"], out["source"] = t["cpu_seconds"], t["seconds"], retriever.source
        for k in args.shortlist:
            for q in sizes:
                # each query count from cold: no sensitivity or random direction kept from the last call
                retriever._sensitivities.clear()
                for key in [key for key in getattr(est, "_cache_", {}) if key[0] == "directions"]:
                    del est._cache_[key]
                with timer() as t:
                    top = retriever.top_k((xq[:q], yq[:q]), 10, shortlist=k)
                runs.setdefault(f"shortlist K={k}", {})[str(q)] = {
                    "cpu": t["cpu_seconds"], "wall": t["seconds"], "top10": top.indices.tolist(),
                    "pool": retriever.pool_size(k) if retriever.source == "head-grad" else None,
                    "sensitivities_computed": retriever.sensitivities_computed_}
                save(args, out, runs)
                print(f"[{time.strftime('%H:%M:%S')}] {method} K={k} Q={q}: {t['cpu_seconds']:.1f} CPU s", flush=True)
    save(args, out, runs)


def save(args, out: dict, runs: dict) -> None:
    """The child's results so far (a run stopped later keeps every query count it measured)."""
    from forwardinf.memory import status_mb

    Path(args.json).write_text(json.dumps({**out, "runs": runs, "peak_mb": status_mb("VmHWM"),
                                           "load_average": os.getloadavg()[0]}))


def run_child(method: str, args) -> None:
    path = result_path(args, method)
    cmd = [sys.executable, __file__, "--child", method, "--json", str(path), "--n-train", str(args.n_train),
           "--queries", *map(str, args.queries), "--shortlist", *map(str, args.shortlist), "--source", args.source,
           "--max-queries", str(args.limits.get(method, max(args.queries))), "--cache", args.cache]
    cmd += ["--data-root", args.data_root] if args.data_root else []
    cmd += ["--tests-only"] if args.tests_only else []
    print(f"[{time.strftime('%H:%M:%S')}] {method} ...", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)


def result_path(args, method: str) -> Path:
    return Path(args.cache) / f"many-{args.n_train}-{method}.json"


# ------------------------------------------------------------------------------------- report
def quality(top10: list, kinds: list, targets: torch.Tensor, reference: list | None, own: list | None) -> dict:
    """T-1 on exact / near copies; top-10 overlap on test images with the full Forward-INF sweep
    (``reference``) and, for a shortlist, with the sweep of its own estimator over every point (``own``).
    A query a run did not score (None: the reference sweeps the test images only) is left out."""
    out = {}
    for kind in ("copy", "near"):
        hits = [top10[i][0] == int(targets[i]) for i in range(len(top10)) if kinds[i] == kind and top10[i]]
        out[f"t1_{kind}"] = (sum(hits) / len(hits), len(hits)) if hits else None
    for key, ref in (("overlap_test", reference), ("overlap_own", own)):
        both = [i for i in range(min(len(top10), len(ref or []))) if kinds[i] == "test" and top10[i] and ref[i]]
        if both:
            out[key] = (sum(len(set(top10[i]) & set(ref[i])) / 10 for i in both) / len(both), len(both))
    return out


def biggest(runs: dict) -> list:
    """The top 10 of the largest measured query count (the smaller query sets are its prefixes)."""
    return runs[max(runs, key=int)]["top10"]


SWEEPING = ("forward-inf", "forward-inf-tail")  # each query is a sweep over the training set
# top_k(chunk=512) calls influence once per 512 training points, and each call recomputes the
# queries' gradients (baselines/tracin.py): their query cost too is linear in the training set
PER_CHUNK = ("grad-cos", "tracin-last")


def predict(points: dict, q: int, sweeping: bool) -> tuple[float | None, str]:
    """``(CPU s of the Q-query call, how it was obtained)`` from the measured ``{Q: cpu}``: "measured";
    "line": the line through the two largest measured counts (the smallest call carries one-time
    costs), or for a sweep measured once, through the origin (each query is one sweep);
    "at least": a call measured once at fewer queries (its cost does not fall with more queries);
    None when nothing bounds it."""
    if q in points:
        return points[q], "measured"
    qs = sorted(points)
    if len(qs) >= 2:
        q0, q1 = qs[-2:]
        b = (points[q1] - points[q0]) / (q1 - q0)
        return points[q1] + b * (q - q1), "line"
    if sweeping:
        return points[qs[0]] * q / qs[0], "line"
    return (points[qs[0]], "at least") if q > qs[0] else (None, "")


def rows_of(args, n: int) -> list:
    """One row per method and shortlist size measured at ``n`` training points."""
    _, _, _, kinds, targets = problem(argparse.Namespace(**{**vars(args), "n_train": n}))
    paths = {m: Path(args.cache) / f"many-{n}-{m}.json" for m in METHODS}
    found = {m: json.loads(p.read_text()) for m, p in paths.items() if p.is_file()}
    sweeps = {m: biggest(r["runs"][""]) for m, r in found.items() if r["runs"].get("")}
    reference = sweeps.get("forward-inf")
    rows = []
    for method, r in found.items():
        for label, runs in r["runs"].items():
            index = r.get("index_cpu") if label else None
            fixed = r["fit_cpu"] + (index or 0.0)
            points = {int(q): v["cpu"] for q, v in runs.items()}
            name = method + (f" {label}" if label else "")
            if any(v.get("tests_only") for v in runs.values()):
                name += " (test images only; Q = their number)"
            row = {"method": name, "n_train": n, "fit_cpu": r["fit_cpu"],
                   "index_cpu": index, "peak_mb": r["peak_mb"], "queries": {}, "measured_queries": sorted(points),
                   "sensitivities_computed": {q: v["sensitivities_computed"] for q, v in runs.items()
                                              if "sensitivities_computed" in v}}
            for q in sorted({*args.queries, *points}):
                cpu, how = predict(points, q, method in SWEEPING and not label)
                if cpu is not None:
                    row["queries"][str(q)] = {"cpu": cpu, "end_to_end": fixed + cpu, "how": how}
            row.update(extrapolate(method, label, fixed, row["queries"].get("1000"), n))
            row["quality_at"] = max(points)
            row["top10"] = {q: v["top10"] for q, v in runs.items()}  # [Q][10] (None: a query not scored)
            own = sweeps.get("forward-inf" if method.startswith(SHORTLIST) else method) if label else None
            row.update(quality(biggest(runs), kinds, targets, reference, own))
            rows.append(row)
    return rows


def report(args) -> None:
    write(args, {n: rows_of(args, n) for n in args.n_train})


def extrapolate(method: str, label: str, fixed: float, at_1000: dict | None, n: int, n_to: int = 60000) -> dict:
    """End-to-end CPU seconds at ``n_to`` training points and 1,000 queries from the run at ``n``:
    measured (or bounded) when ``n = n_to``; else fixed costs (fit, index) grow linearly with ``n``,
    a query of the full or tail sweep too, and every other query cost is held as at ``n`` (a lower
    bound for the gradient-store peers, whose query cost also has a part linear in ``n``), except
    for ``PER_CHUNK`` methods, whose whole call is linear in ``n``."""
    if at_1000 is None:
        return {}
    if n == n_to:
        return {"e2e_60k_1000": at_1000["end_to_end"], "e2e_60k_how": at_1000["how"]}
    scale = n_to / n
    sweeps = (method in SWEEPING and not label) or method in PER_CHUNK
    how = "at least" if at_1000["how"] == "at least" else "extrapolated"
    return {"e2e_60k_1000": fixed * scale + at_1000["cpu"] * (scale if sweeps else 1.0), "e2e_60k_how": how}


MARK = {"measured": "{}", "line": "*{}*", "at least": ">= {}", "extrapolated": "*{}*"}


def _cell(v: dict | None) -> str:
    return "-" if v is None else MARK[v["how"]].format(f"{v['end_to_end']:,.0f}")


def _frac(v) -> str:
    return "-" if not v else f"{v[0]:.3f} ({v[1]})"


def table(rows: list, qs: list[str]) -> str:
    head = ("| method | fit CPU s | index CPU s | " + " | ".join(f"end-to-end Q={q}" for q in qs)
            + " | 60k x 1,000 | peak MB | T-1 copies | T-1 near | top-10 overlap with full Forward-INF (test) "
            "| sensitivities computed (of n) | quality at Q |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        idx = "-" if r["index_cpu"] is None else f"{r['index_cpu']:.1f}"
        e60 = "-" if "e2e_60k_1000" not in r else _cell({"end_to_end": r["e2e_60k_1000"], "how": r["e2e_60k_how"]})
        sens = r["sensitivities_computed"].get(str(r["quality_at"]))
        lines.append(f"| {r['method']} | {r['fit_cpu']:,.1f} | {idx} | "
                     + " | ".join(_cell(r["queries"].get(q)) for q in qs)
                     + f" | {e60} | {r['peak_mb']:,.0f} | {_frac(r.get('t1_copy'))} | {_frac(r.get('t1_near'))} | "
                     f"{_frac(r.get('overlap_test'))} | {'-' if sens is None else f'{sens:,}'} | {r['quality_at']} |")
    return "\n".join(lines) + "\n"


def write(args, tables: dict) -> None:
    qs = list(map(str, args.queries))
    out = {"queries": args.queries, "shortlist": args.shortlist, "source": args.source,
           "command": " ".join(["python", "benchmarks/many_queries.py", *sys.argv[1:]]),
           "tables": {str(n): rows for n, rows in tables.items()}}
    found = sorted(Path(args.cache).glob("many-lds-*.json"))
    if found:
        out["lds"] = json.loads(found[-1].read_text())
    out["recall"] = recalls(Path(args.cache))
    out["pool"] = [json.loads(p.read_text()) for p in sorted(Path(args.cache).glob("many-pool-*.json"))]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many_queries.json").write_text(json.dumps(out, indent=1) + "\n")
    md = RESULTS / "many_queries.md"
    notes = md.read_text().split(NOTES, 1)[1] if md.is_file() and NOTES in md.read_text() else "\n"
    text = ["# Many queries: Forward-INF full, tail and shortlist against gradient stores (issue 27)\n",
            "Fashion-MNIST, SmallCNN (455k parameters, trained on all 60,000 images, test accuracy 0.900), "
            "attributed against the first N training images; queries: exact copies, near copies (shifted up to "
            "2 px) and test images, interleaved; shortlist index source: `" + args.source + "` (`head-grad` in "
            "the rows that say so: the features index fetches a pool of max(10 K, 2,000) candidates, re-ranked to K "
            "by the cosine of the loss gradient of the last two linear layers), the shortlist's fit lazy (`fit(train, lazy=True)`: sensitivities of the candidates only). CPU seconds "
            "(`time.process_time`) of one single-threaded process per method, end-to-end = fit + index + the "
            "Q-query call. Plain numbers are measured; *italic* ones are on the line through the measured query "
            "counts or extrapolated in N; `>=` is a bound from a measured call with fewer queries (see below).\n",
            f"Tables written by `{out['command']}` (the measuring runs: *Commands* below).\n"]
    for n, rows in tables.items():
        text += [f"## N = {n:,} training points\n", table(rows, qs), crossovers(rows, n)]
    text += [*map(recall_table, out["recall"]), *map(pool_table, out["pool"]), lds_table(out.get("lds")), NOTES + notes]
    md.write_text("\n".join(text))
    print("\n".join(text[:-1]))


NOTES = "<!-- notes: kept when the tables are rewritten -->"


def crossovers(rows: list, n: int) -> str:
    """Query counts above which each shortlist row is cheaper end-to-end than each other method,
    on each method's line through its two largest measured query counts (rows with two or more)."""
    def line(r):
        pts = {int(q): v["end_to_end"] for q, v in r["queries"].items() if v["how"] == "measured"}
        if len(pts) < 2:
            return None
        q0, q1 = sorted(pts)[-2:]
        b = (pts[q1] - pts[q0]) / (q1 - q0)
        return pts[q1] - b * q1, b

    out = []
    for sl in (r for r in rows if "shortlist" in r["method"] and line(r)):
        f_sl, b_sl = line(sl)
        for r in rows:
            if "shortlist" in r["method"] or not line(r):
                continue
            f_o, b_o = line(r)
            gap, dq = f_sl - f_o, b_sl - b_o  # shortlist minus other
            if dq < 0:
                q = "at every Q" if gap <= 0 else f"above Q = {gap / -dq:,.0f}"
            else:
                q = "never" if gap >= 0 else f"below Q = {-gap / dq:,.0f}"
            out.append(f"| {sl['method']} | {r['method']} | {q} |")
    if not out:
        return ""
    return "\n".join([f"Crossovers at N = {n:,} (each line `fixed + per_query x Q` through the two largest "
                      "measured query counts):\n", "| shortlist | vs | shortlist cheaper |", "|---|---|---|", *out]) + "\n"


def _section(title: str, intro: str, header: str, rows: list[str]) -> str:
    """A markdown section: title, one paragraph, a table (``header`` with its ``|---|`` line, ``rows``)."""
    rule = "|" + "---|" * (header.count("|") - 1)
    return "\n".join([f"## {title}\n", intro + "\n", header, rule, *rows]) + "\n"


def recalls(cache: Path) -> list[dict]:
    """The candidate-recall files in ``cache`` (``many-recall-*.json``), merged per training-set
    size and query count, largest training set first; each keeps the commands that made it."""
    merged: dict[tuple, dict] = {}
    for path in sorted(cache.glob("many-recall-*.json")):
        rec = json.loads(path.read_text())
        into = merged.setdefault((rec["n_train"], rec["n_queries"]), {**rec, "rows": {}, "commands": []})
        into["rows"].update(rec["rows"])
        into["commands"].append(rec.get("command", "python benchmarks/many_queries.py --recall"))
    return [merged[key] for key in sorted(merged, reverse=True)]


def recall_table(rec: dict) -> str:
    commands = "; ".join(f"`{c}`" for c in rec["commands"])
    intro = (f"Fraction of the full sweep's top 10 among the K candidates of each source, {rec['n_queries']} test "
             f"images, {rec['n_train']:,} training images ({commands}). `head-grad`: the features index's pool "
             "(default max(10 K, 2,000)) re-ranked by the head gradient.")
    return _section(f"Candidate recall of each index source ({rec['n_train']:,} points)", intro,
                    "| source, K | recall |", [f"| {k} | {v:.3f} |" for k, v in rec["rows"].items()])


def pool_table(res: dict) -> str:
    intro = (f"`head-grad` re-ranks a pool of P features neighbours. Share of the exact head-gradient top K over all "
             f"{res['n_train']:,} training points that the re-ranked pool kept, {res['n_queries']} test images (no "
             f"Forward-INF sweep; `{res['command']}`; building the index and the factors: {res['index_cpu']:.1f} CPU s).")
    return _section(f"Head-gradient pool ({res['n_train']:,} points)", intro, "| K, pool | kept |",
                    [f"| {k} | {v:.3f} |" for k, v in res["rows"].items()])


def lds_table(res: dict | None) -> str:
    if not res:
        return ""
    intro = (f"`forwardinf lds` setup on Fashion-MNIST, reduced: {res['n_train']:,} training points, {res['subsets']} "
             f"subsets of half, one run each ({res['retraining_cpu']:.0f} CPU s of retraining), {res['n_queries']} held-out "
             f"queries, epochs {res['epochs']}; margin target, 95% bootstrap interval over queries. A shortlist scores "
             f"its K candidates; every other training point scores 0 "
             f"(`python benchmarks/many_queries.py --lds --lds-n-train {res['n_train']} --lds-subsets {res['subsets']} "
             f"--lds-queries {res['n_queries']}`).")
    rows = [f"| {k} | {v['lds_margin']:+.3f} | [{v['lds_margin_ci'][0]:+.3f}, {v['lds_margin_ci'][1]:+.3f}] | "
            f"{v['lds_margin_heldout']:+.3f} |" for k, v in res["rows"].items()]
    return _section("LDS of the shortlist variant", intro, "| method | LDS (all subsets) | 95% CI | held-out subsets |", rows)


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
    presets = {"forward-inf": "default", "forward-inf-counterfactual": "counterfactual"}
    for name in args.lds_methods.split(","):
        est = fi.ForwardINF.preset(presets[name], model)
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
    n = len(train[1])
    reference = Path(args.cache) / f"many-{n}-forward-inf.json"
    if args.recall_reference and reference.is_file():  # the full sweeps of the benchmark run, not again
        runs = json.loads(reference.read_text())["runs"][""]
        top10 = runs[max(runs, key=int)]["top10"]
        tests = [i for i, t in enumerate(top10) if t and kinds[i] == "test"]
        full = torch.tensor([top10[i] for i in tests])
        est, sources = fi.ForwardINF(model).fit(train, lazy=True), ("features", "last-grad")
    else:
        tests = [i for i, k in enumerate(kinds) if k == "test"][:args.recall_queries]
        est, sources = fi.ForwardINF(model).fit(train), ("features", "last-grad", "directions")
        full = est.top_k((xq[tests], yq[tests]), 10).indices
    sources = args.recall_sources.split(",") if args.recall_sources else sources
    queries = (xq[tests], yq[tests])
    out = {"n_train": n, "n_queries": len(tests), "rows": {}}
    for source in sources:
        retriever = Retriever(est, source=source)
        for k in args.recall_k or (n // 100, n // 30, n // 10, n // 4):
            for pool in (args.recall_pool or [None]) if source == "head-grad" else [None]:
                retriever.pool = pool
                cands = retriever.candidates(queries, k)
                kept = sum(len(set(f.tolist()) & set(c.tolist())) / 10 for f, c in zip(full, cands)) / len(tests)
                label = f"{source} K={k}" + (f" (pool {retriever.pool_size(k):,})" if source == "head-grad" else "")
                out["rows"][label] = kept
                print(f"{label}: {kept:.3f}", flush=True)
    out["command"] = " ".join(["python", "benchmarks/many_queries.py", *sys.argv[1:]])
    tag = "" if args.recall_sources is None else "-" + args.recall_sources.replace(",", "-")
    (Path(args.cache) / f"many-recall-{n}{tag}.json").write_text(json.dumps(out, indent=1))
    return out


def pool_part(args) -> dict:
    """What head-grad's pool costs in recall, with no full sweep: on the test images among the
    queries, the share of the exact head-gradient top K over the whole training set that the
    re-ranked pool of P (features index) keeps. Builds (or loads) the benchmark's head-grad index."""
    import forwardinf as fi
    from forwardinf.estimators.shortlist import Retriever
    from forwardinf.experiments.common import timer

    torch.set_num_threads(1)
    model, train, (xq, yq), kinds, _ = problem(args)
    n = len(train[1])
    est = fi.ForwardINF(model).fit(train, lazy=True)
    with timer() as t:
        retriever = Retriever(est, Path(args.cache) / f"index-{SHORTLIST}-head-grad-{n}", source="head-grad")
    tests = [i for i, k in enumerate(kinds) if k == "test"][:args.recall_queries]
    qf = retriever._head_factors(est._dataset((xq[tests], yq[tests]), "queries"), "queries")
    out = {"n_train": n, "n_queries": len(tests), "index_cpu": t["cpu_seconds"], "rows": {}}
    ks = args.recall_k or [100, 200]
    exact = []  # [Q, max K]: the head gradient's top over every training point
    for s in range(0, len(tests), 64):
        cos = torch.cat([retriever.head.cosine(qf[s:s + 64], retriever.factors.rows(torch.arange(a, min(a + 8192, n))))
                         for a in range(0, n, 8192)], 1)
        exact.append(cos.topk(max(ks), dim=1).indices)
    exact = torch.cat(exact)
    for k in ks:
        for pool in args.recall_pool or [None]:
            retriever.pool = pool
            got = retriever._rerank(qf, k)
            kept = sum(len(set(a[:k].tolist()) & set(b.tolist())) / k for a, b in zip(exact, got)) / len(tests)
            out["rows"][f"K={k} pool {retriever.pool_size(k):,}"] = kept
            print(f"K={k} pool {retriever.pool_size(k):,}: {kept:.3f}", flush=True)
    out["command"] = " ".join(["python", "benchmarks/many_queries.py", *sys.argv[1:]])
    (Path(args.cache) / f"many-pool-{n}.json").write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, nargs="+", default=[60000],
                   help="training points (several: --report-only writes a table for each)")
    p.add_argument("--queries", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--shortlist", type=int, nargs="+", default=[200], help="candidates per query (K), one or more")
    p.add_argument("--source", default="features", choices=("auto", "features", "directions", "last-grad", "head-grad"),
                   help="index source of the forward-inf-shortlist method (forward-inf-shortlist-head-grad: head-grad)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--limit", action="append", default=[], metavar="METHOD=Q",
                   help="largest query count a method runs (the rest is extrapolated), e.g. forward-inf=100")
    p.add_argument("--max-queries", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--tests-only", action="store_true",
                   help="forward-inf (the quality reference) sweeps only the test images among the queries")
    p.add_argument("--recall", action="store_true", help="only the candidate recall of each index source")
    p.add_argument("--recall-queries", type=int, default=12)
    p.add_argument("--pool-check", action="store_true",
                   help="head-grad: the share of the exact head-gradient top K that its pool keeps (no sweep)")
    p.add_argument("--recall-k", type=int, nargs="+", default=None, help="shortlist sizes (default: n/100 .. n/4)")
    p.add_argument("--recall-sources", default=None,
                   help="index sources, comma-separated (default: features,last-grad[,directions]); "
                        "the json is then named after them")
    p.add_argument("--recall-pool", type=int, nargs="+", default=None, help="head-grad pool sizes (default: the rule)")
    p.add_argument("--recall-reference", action="store_true",
                   help="features and last-grad only (no fit), against the top 10s of the forward-inf run in --cache (no sweep)")
    p.add_argument("--lds", action="store_true", help="only the LDS part (forwardinf lds setup, ground truth cached)")
    p.add_argument("--lds-n-train", type=int, default=2000)
    p.add_argument("--lds-subsets", type=int, default=50)
    p.add_argument("--lds-queries", type=int, default=200)
    p.add_argument("--lds-shortlist", type=int, nargs="+", default=[100, 400])
    p.add_argument("--lds-methods", default="forward-inf,forward-inf-counterfactual")
    p.add_argument("--cache", default="/tmp/forwardinf-bench")
    p.add_argument("--data-root", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.limits = {k: int(v) for k, v in (s.split("=") for s in args.limit)}
    if not args.report_only:  # measuring runs: one training-set size
        (args.n_train,) = args.n_train
    if args.child:
        child(args)
        return
    if args.lds or args.recall or args.pool_check:
        lds_part(args) if args.lds else recall_part(args) if args.recall else pool_part(args)
        return
    if not args.report_only:
        for method in args.methods.split(","):
            run_child(method, args)
        args.n_train = [args.n_train]
    report(args)


if __name__ == "__main__":
    main()
