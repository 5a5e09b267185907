"""The best Forward-INF row against every peer's best, on several seeds of one LDS setup (issue 26).

    # per seed S (each part may run in its own process; --score-only skips the ground truth)
    python benchmarks/lds_peers.py --seeds S --runs 'runs/fm500-s{seed}' --score-only --ensemble 3 \
        --dampings 1e-4 1e-3 1e-2 1e-1 --parts ekfac -- --dataset fashion-mnist --n-train 500 --model flatcnn \
        --subsets 48 --n-queries 100
    # the report (every part cached)
    python benchmarks/lds_peers.py --seeds 0 1 --runs 'runs/fm500-s{seed}' --ensemble 3 \
        --dampings 1e-4 1e-3 1e-2 1e-1 --parts tail -- --dataset fashion-mnist --n-train 500 --model flatcnn \
        --subsets 48 --n-queries 100

For each seed, ``--runs`` (with ``{seed}``) is the folder of a ``forwardinf lds`` run made with the
lds options after ``--`` plus ``--seed SEED``: its ground truth is reused (``--seed`` draws the
training subset, the model's initialisation, the queries and the retraining subsets). Every
method scores the seed's 100 queries here, one thread, fit + scores timed in CPU seconds of
this process, scores cached under ``RUN/peers`` (delete the folder after changing a method):

| row | what |
|---|---|
| ``forward-inf-counterfactual-tail`` | the counterfactual preset, ``split="auto"`` (the tail variants' default) |
| ``kronfluence-ekfac@d...`` | kronfluence EK-FAC, one factor fit, scored at each ``--dampings`` value (a grid other than the default is cached apart, and its rows join the default's) |
| ``trak@l...`` / ``trak-ens{K}@l...`` | traker TRAK (512 dims) on the model alone / on the model and ``K - 1`` more models trained from scratch with the same recipe and data (other seeds): TRAK's ensemble; one featurization, each ``--lambdas`` ridge |
| ``captum-tracincp`` | captum TracInCP over the 5 checkpoints saved along training |
| ``forward-inf-counterfactual-tail@fc2`` / ``@conv2`` | the tail at the other splits, read from ``RUN/layouts.pt`` when benchmarks/lds_layouts.py scored them (its ``auto`` row then serves as the tail row: ``--parts`` may omit ``tail``) |
| ``whole-*`` (``--parts whole``) | the counterfactual preset on the whole network (K-FAC, EK-FAC, per-layer-type damping), first ``--whole-queries`` queries |

A peer's *best* setting is the one with the highest LDS on the held-out subsets of the seed
(chosen on the very evaluation: in the peer's favour, as our own tail's split rule was not). The
paired differences (bootstrap over queries) are per seed and pooled over the seeds' queries.
CPU seconds of the ensemble exclude training its extra models (given separately).
Writes benchmarks/results/<--name>.md and .json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import forwardinf as fi
from forwardinf import metrics as M
from forwardinf.baselines.peers import TRAK, CaptumTracInCP, KronfluenceEKFAC
from forwardinf.cli import build_parser
from forwardinf.experiments import lds
from forwardinf.experiments.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
TAIL = "forward-inf-counterfactual-tail"
DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1]  # EK-FAC's default grid
ENSEMBLE_SEED = 100_000  # extra TRAK models: seed + ENSEMBLE_SEED + j (retraining seeds are seed + 1 + k)


FAMILIES = {"trak-ens": "TRAK ensemble", "trak@": "TRAK (1 model)", "kronfluence": "EK-FAC", "captum": "TracInCP"}


def family(name: str) -> str:
    return next((f for prefix, f in FAMILIES.items() if name.startswith(prefix)), "Forward-INF")


def lds_args(options: list[str], run: Path, seed: int):
    return lds.apply_defaults(build_parser().parse_args(["lds", *options, "--seed", str(seed), "--out", str(run)]))


def timed(fn):
    torch.set_num_threads(1)
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def trak_refinalized(est: TRAK, lam: float) -> None:
    """Re-solve traker's ridge with ``lam`` on the stored features (traker finalizes once per model id)."""
    t = est.traker_
    t.score_computer.lambda_reg = lam
    for info in t.saver.model_ids.values():
        info["is_finalized"] = 0
    t.finalize_features()


def score_tail(problem, args) -> dict[str, dict]:
    model, train = problem.prepared.model.eval(), problem.prepared.split.train()
    cfg = fi.ForwardINFConfig.preset("counterfactual")
    s, cpu = timed(lambda: fi.TailForwardINF(model, split="auto", config=cfg).fit(train).influence(problem.queries))
    return {TAIL: {"scores": s, "cpu_seconds": cpu}}


def score_ekfac(problem, args) -> dict[str, dict]:
    """One EK-FAC factor fit, scored at every damping (CPU s of a row: the fit + its scoring)."""
    model, train = problem.prepared.model.eval(), problem.prepared.split.train()
    fitted, fit_cpu = timed(lambda: KronfluenceEKFAC(model, damping=args.dampings[0]).fit(train))
    out = {}
    for d in args.dampings:
        ek = fitted.with_config(fitted.config.replace(damping=d))  # shares the fitted factors
        s, cpu = timed(lambda: ek.influence(problem.queries))
        out[f"kronfluence-ekfac@d{d:g}"] = {"scores": s, "cpu_seconds": fit_cpu + cpu}
    return out


def score_trak(problem, args, states: list[dict], name: str) -> dict[str, dict]:
    """traker over ``states`` (one featurization), scored at every ridge ``lambdas``."""
    model, train = problem.prepared.model.eval(), problem.prepared.split.train()
    est, fit_cpu = timed(lambda: TRAK(model, checkpoints=states, lambda_reg=args.lambdas[0]).fit(train))
    out = {}
    for i, lam in enumerate(args.lambdas):
        def score() -> torch.Tensor:
            if i:  # the first lambda was solved by fit
                trak_refinalized(est, lam)
            return est.influence(problem.queries)
        s, cpu = timed(score)
        out[f"{name}@l{lam:g}"] = {"scores": s, "cpu_seconds": fit_cpu + cpu}
    return out


def score_ensemble(problem, args) -> dict[str, dict]:
    """TRAK over the model and ``ensemble - 1`` more trained from scratch (their training CPU s apart)."""
    prepared, seed = problem.prepared, problem.prepared.config["seed"]
    trainer, train = lds.trainer_of(prepared), prepared.split.train()
    extra, extra_cpu = timed(lambda: [trainer(train, seed + ENSEMBLE_SEED + j).state_dict()
                                      for j in range(1, args.ensemble)])
    out = score_trak(problem, args, [prepared.model.state_dict(), *extra], f"trak-ens{args.ensemble}")
    return {**out, "_ensemble_training_cpu": extra_cpu}


def score_tracin(problem, args) -> dict[str, dict]:
    model, train = problem.prepared.model.eval(), problem.prepared.split.train()
    # imported here: the 500-point reports are rebuilt on the source their ground truth is keyed to, older than it
    from forwardinf.baselines.run import TrainingRun

    run = TrainingRun(checkpoints=problem.prepared.checkpoints)
    s, cpu = timed(lambda: CaptumTracInCP(model, run=run).fit(train).influence(problem.queries))
    return {"captum-tracincp": {"scores": s, "cpu_seconds": cpu}}


WHOLE = {"whole-kfac": {}, "whole-ekfac": {"eigencorrect": True}, "whole-kfac-type": {"damping_scope": "type"},
         "whole-ekfac-type": {"eigencorrect": True, "damping_scope": "type"}}


def score_whole(problem, args) -> dict[str, dict]:
    """The counterfactual preset on the whole network, K-FAC / EK-FAC x one global damping / one per layer type."""
    model, train = problem.prepared.model.eval(), problem.prepared.split.train()
    q = tuple(t[:args.whole_queries] for t in problem.queries)
    out = {}
    for name, kw in WHOLE.items():
        c = dataclasses.replace(fi.ForwardINFConfig.preset("counterfactual"), **kw)
        s, cpu = timed(lambda: fi.ForwardINF(model, config=c).fit(train).influence(q))
        out[name] = {"scores": s, "cpu_seconds": cpu}
    return out


# lds_layouts.py's FlatCNN rows (RUN/layouts.pt), when present: the tail (instead of --parts tail) and its other splits
LAYOUT_ROWS = {"FlatCNN/auto": TAIL, "FlatCNN/fc2": f"{TAIL}@fc2", "FlatCNN/conv2": f"{TAIL}@conv2"}

PARTS = {"tail": score_tail, "ekfac": score_ekfac, "trak": lambda p, a: score_trak(p, a, [p.prepared.model.state_dict()], "trak"),
         "ensemble": score_ensemble, "tracin": score_tracin, "whole": score_whole}


def part_file(part: str, args) -> str:
    """A part's cache file; an EK-FAC grid other than the default gets its own (its rows join the others)."""
    if part == "whole":
        return f"whole{args.whole_queries}.pt"
    if part == "ekfac" and args.dampings != DAMPINGS:
        return "ekfac@" + "_".join(f"{d:g}" for d in args.dampings) + ".pt"
    return f"{part}.pt"


def seed_results(seed: int, args, options: list[str]) -> dict:
    run = Path(args.runs.format(seed=seed))
    largs = lds_args(options, run, seed)
    problem = lds.load_problem(largs)
    folder = run / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    for part in args.parts:  # each part cached in its own file: parts can run in parallel processes
        path = folder / part_file(part, args)
        if not path.is_file():
            torch.save(PARTS[part](problem, args), path)
    if args.score_only:
        return {}
    done = {}
    for path in sorted(folder.glob("*.pt")):
        if not path.stem.startswith("whole") or path.stem == f"whole{args.whole_queries}":
            done.update(torch.load(path, weights_only=True))
    if (run / "layouts.pt").is_file():  # the tail at every split, scored by benchmarks/lds_layouts.py
        for key, (s, cpu, _) in torch.load(run / "layouts.pt", weights_only=True).items():
            if key in LAYOUT_ROWS:
                done.setdefault(LAYOUT_ROWS[key], {"scores": s, "cpu_seconds": cpu})
    masks, outputs = lds.ground_truth(largs, problem, False)
    targets = lds.signed_targets(outputs)
    fit = lds.n_fit(largs.subsets, largs.holdout)
    rows = {}
    for name, r in done.items():
        if name.startswith("_"):
            continue
        q = len(r["scores"])
        m, pq = lds.evaluate(r["scores"], masks, {t: y[:, :q] for t, y in targets.items()}, fit, largs.bootstrap, seed)
        rows[name] = {"metrics": m, "per_query": pq, "cpu_seconds": r["cpu_seconds"], "queries": q}
    return {"seed": seed, "largs": largs, "problem": problem, "rows": rows, "fit": fit,
            "ensemble_training_cpu": done.get("_ensemble_training_cpu", float("nan"))}


def diff(a: list[np.ndarray], b: list[np.ndarray]) -> str:
    n = [min(len(x), len(y)) for x, y in zip(a, b)]
    d = np.concatenate([x[:k] - y[:k] for x, y, k in zip(a, b, n)])
    lo, hi = M.bootstrap_interval(d, 2000)
    return f"{np.nanmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--runs", required=True, help="run folder per seed, with {seed}")
    p.add_argument("--ensemble", type=int, default=5, help="TRAK ensemble size (the model + K-1 more)")
    p.add_argument("--dampings", type=float, nargs="+", default=DAMPINGS,
                   help="EK-FAC's grid (another grid than the default is cached apart and adds its rows)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 100.0])
    p.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=["tail", "ekfac", "trak", "ensemble", "tracin"],
                   help="what to score if not cached under RUN/peers (each part its own file)")
    p.add_argument("--whole-queries", type=int, default=30)
    p.add_argument("--score-only", action="store_true", help="cache the scores, no ground truth or report")
    p.add_argument("--name", default="lds_peers")
    args, rest = p.parse_known_args()
    options = [a for a in rest if a != "--"]
    per_seed = [seed_results(s, args, options) for s in args.seeds]
    if args.score_only:
        return
    lines, summary = [], {}
    for res in per_seed:
        rows = res["rows"]
        table = []
        for name, r in rows.items():
            m = r["metrics"]
            table.append([family(name), f"`{name}`", f"{m['lds_margin_heldout']:+.3f}",
                          f"{m['lds_margin']:+.3f} [{m['lds_margin_ci'][0]:+.3f}, {m['lds_margin_ci'][1]:+.3f}]",
                          f"{r['cpu_seconds']:.1f}", str(r["queries"])])
        c = res["problem"].prepared
        lines += [f"### seed {res['seed']}", "",
                  f"Model test accuracy {c.accuracy:.3f}; {res['largs'].subsets} subsets x "
                  f"{res['largs'].seeds_per_subset} run(s); held-out = the last {res['largs'].subsets - res['fit']}. "
                  f"The TRAK ensemble's {args.ensemble - 1} extra models cost {res['ensemble_training_cpu']:.0f} CPU s "
                  "to train (not in its row).", "",
                  markdown_table(["family", "row", "LDS margin, held-out", "LDS margin, all [95%]", "CPU s", "queries"],
                                 table), ""]
    # each peer family's best setting per seed (held-out LDS of that seed), then paired differences
    families = sorted(set.intersection(*({family(n) for n in r["rows"] if not n.startswith("whole")} for r in per_seed))
                      - {"Forward-INF"})  # the peers scored on every seed
    def best_of(fam: str) -> list[str]:  # per seed, the family's row with the highest held-out LDS
        return [max((n for n in res["rows"] if family(n) == fam and not n.startswith("whole")),
                    key=lambda n: res["rows"][n]["metrics"]["lds_margin_heldout"]) for res in per_seed]

    ours = {"auto": [TAIL] * len(per_seed), "best": best_of("Forward-INF")}  # fixed in advance / chosen as the peers'
    diffs = []
    for fam in families:
        best = best_of(fam)
        for which, mine in ours.items():
            if which == "best" and mine == ours["auto"]:
                continue  # the same rows
            cols = []
            for key in ("lds_margin_heldout", "lds_margin"):
                a = [res["rows"][n]["per_query"][key] for res, n in zip(per_seed, mine)]
                b = [res["rows"][n]["per_query"][key] for res, n in zip(per_seed, best)]
                cols.append([diff([x], [y]) for x, y in zip(a, b)] + [diff(a, b)])
            diffs.append([fam, ", ".join(f"`{n}`" for n in best), ", ".join(f"`{n}`" for n in mine),
                          *[c for col in cols for c in col]])
            summary[f"{fam} ({which})"] = {"best": best, "ours": mine, "heldout": cols[0], "all": cols[1]}
    seeds = [f"seed {r['seed']}" for r in per_seed]
    head = ["peer", "its best row (per seed)", "Forward-INF row (per seed)"] + [f"held-out, {s}" for s in seeds] + ["held-out, pooled"] + \
        [f"all, {s}" for s in seeds] + ["all, pooled"]
    whole = []  # the whole-network rows, where every seed has them
    for a, b in (("whole-ekfac", "whole-kfac"), ("whole-kfac-type", "whole-kfac"), ("whole-ekfac-type", "whole-ekfac"),
                 (TAIL, "whole-kfac"), (TAIL, "whole-ekfac"), (TAIL, "whole-ekfac-type")):
        if all(a in r["rows"] and b in r["rows"] for r in per_seed):
            cols = [diff([r["rows"][a]["per_query"][k] for r in per_seed], [r["rows"][b]["per_query"][k] for r in per_seed])
                    for k in ("lds_margin_heldout", "lds_margin")]
            whole.append([f"`{a}` - `{b}`", *cols])
    largs = per_seed[0]["largs"]
    text = "\n".join([
        "# Fashion-MNIST: the best Forward-INF row against every peer's best, on several seeds", "",
        f"{largs.dataset}, {largs.n_train:,} training points, `--model {largs.model}`; per seed: ground truth "
        f"{largs.subsets} subsets x {largs.seeds_per_subset} run(s), {largs.n_queries} queries. LDS of the margin; "
        "CPU s: fit + scores, one thread (machine shared). Forward-INF's row is fixed in advance (the "
        "counterfactual preset, `split=\"auto\"`); each peer's setting is the best on the held-out subsets of that "
        "seed. The script's docstring lists the rows.", "",
        *lines,
        "### Paired differences: the Forward-INF row - the peer's best", "",
        "Bootstrap over queries (pooled: both seeds' queries together). The Forward-INF row is the tail "
        "(`split=\"auto\"`, fixed in advance) and, where lds_layouts.py scored other splits and one of them is "
        "higher on a seed's held-out subsets, also that best row (chosen as the peers' settings are).", "",
        markdown_table(head, diffs), "",
        *(["### The whole network (first %d queries of each seed), pooled over seeds" % args.whole_queries, "",
           markdown_table(["difference", "held-out", "all"], whole), ""] if whole else []),
        "Command:", "", "```", "python " + " ".join(sys.argv), "```", ""])
    print(text)
    (RESULTS / f"{args.name}.md").write_text(text)
    dump = {"seeds": args.seeds, "summary": summary, "rows": {
        str(r["seed"]): {n: {"metrics": v["metrics"], "cpu_seconds": v["cpu_seconds"], "queries": v["queries"]}
                         for n, v in r["rows"].items()} for r in per_seed}}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(dump, indent=1) + "\n")


if __name__ == "__main__":
    main()
