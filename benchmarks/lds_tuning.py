"""The counterfactual score's damping rule, decided on digits seeds held apart from the LDS evaluation.

    python benchmarks/lds_tuning.py --seeds 1 2     # -> benchmarks/results/lds_tuning.md, .json

Per seed: ``forwardinf lds --seed S`` ground truth (another model, other subsets and queries than
the evaluation's seed 0; 300 subsets x 2 runs, cached under runs/lds-digits-tuneS), then the
margin LDS on all subsets of the counterfactual score with per-layer and global damping at several
values, and of kronfluence's EK-FAC (damping 1e-4) at several label seeds. In-process, one thread.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

import forwardinf.estimators.forward_inf as forward_inf
from forwardinf import metrics as M
from forwardinf.cli import build_parser
from forwardinf.core import curvature
from forwardinf.experiments import lds
from forwardinf.experiments.report import markdown_table
from forwardinf.experiments.setup import make_method

RESULTS = Path(__file__).resolve().parent / "results"
DAMPINGS = (0.25, 0.5, 1.0)
KRONFLUENCE_SEEDS = (0, 1, 2)


def lds_of(name: str, options: dict, problem: lds.Problem, masks: np.ndarray, target: np.ndarray,
           scope: str = "global") -> tuple[float, float]:
    """``(margin LDS on all subsets, CPU s)`` of one method; ``scope``: the K-FAC damping rule."""
    # ForwardINF calls curvature.precondition by the name it imported: route the scope through it
    forward_inf.precondition = functools.partial(curvature.precondition, scope=scope)
    try:
        cpu = time.process_time()
        est = make_method(name, problem.prepared.model, problem.prepared, False, options)
        scores = est.fit(problem.prepared.split.train()).influence(problem.queries)
        cpu = time.process_time() - cpu
    finally:
        forward_inf.precondition = curvature.precondition
    return float(np.nanmean(M.lds_per_query(scores.double().numpy(), masks, target))), cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--subsets", type=int, default=300)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows, data = [], []
    for seed in args.seeds:
        if seed == 0:
            raise SystemExit("seed 0 is the evaluation's (benchmarks/results/lds.md): tune on other seeds")
        a = lds.apply_defaults(build_parser().parse_args([
            "lds", "--out", str(args.runs_dir / f"lds-digits-tune{seed}"), "--seed", str(seed), "--subsets",
            str(args.subsets), "--seeds-per-subset", "2", "--quiet"]))
        problem = lds.load_problem(a)
        masks, outputs = lds.ground_truth(a, problem, False)
        target = lds.signed_targets(outputs)["margin"]
        res = {}
        for scope in ("layer", "global"):
            for d in DAMPINGS:
                res[f"counterfactual {scope} {d:g}"] = lds_of("forward-inf-counterfactual", {"damping": d}, problem,
                                                              masks, target, scope)
        for s in KRONFLUENCE_SEEDS:
            try:
                res[f"kronfluence-ekfac 1e-4 seed {s}"] = lds_of("kronfluence-ekfac", {"damping": 1e-4, "seed": s},
                                                                  problem, masks, target)
            except ImportError:
                pass
        for k, (v, cpu) in res.items():
            print(f"seed {seed}  {k:34s} LDS {v:+.3f}  {cpu:5.1f} CPU s", flush=True)
        rows.append([f"digits seed {seed}", *[f"{res[f'counterfactual layer {d:g}'][0]:+.3f}" for d in DAMPINGS],
                     *[f"{res[f'counterfactual global {d:g}'][0]:+.3f}" for d in DAMPINGS],
                     " / ".join(f"{v:+.3f}" for k, (v, _) in res.items() if k.startswith("kronfluence"))])
        data.append({"seed": seed, "subsets": args.subsets, "runs_per_subset": 2, "lds_margin_all": res})
    head = ["setup", *[f"per-layer {d:g}" for d in DAMPINGS], *[f"global {d:g}" for d in DAMPINGS],
            "EK-FAC 1e-4, label seeds " + " / ".join(map(str, KRONFLUENCE_SEEDS))]
    text = "\n".join([
        "# Counterfactual score: per-layer vs global K-FAC damping (tuning seeds, not the evaluation)", "",
        f"`python benchmarks/lds_tuning.py --seeds {' '.join(map(str, args.seeds))}`: digits MLP, `forwardinf lds "
        f"--seed S` ground truth ({args.subsets} subsets x 2 runs), margin LDS on all subsets, mean over the 200 "
        "queries. Counterfactual score = `ForwardINF.preset(\"counterfactual\")` with the damping rule and value "
        "shown.", "", markdown_table(head, rows), ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lds_tuning.md").write_text(text)
    (RESULTS / "lds_tuning.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
