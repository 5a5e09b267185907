"""LDS and paired differences of the scores a ``forwardinf lds`` run cached under ``RUN/methods``,
without recomputing any (a method whose code changed since would be recomputed by ``forwardinf lds``).

    python benchmarks/lds_cached.py --run runs/lds-fm-flat --pairs A:B,C:D -- LDS OPTIONS...

Methods scored on the first n queries are compared with others on those n queries.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from forwardinf import metrics as M
from forwardinf.cli import build_parser
from forwardinf.experiments import lds


def load_run(run: Path, lds_options: list[str]) -> tuple:
    """``(lds args, problem, masks [M, N], signed targets, subsets fitted)`` of the run in ``run``
    made with ``lds_options`` (its ground truth from the cache; a missing model is trained)."""
    largs = lds.apply_defaults(build_parser().parse_args(["lds", *[a for a in lds_options if a != "--"], "--out", str(run)]))
    problem = lds.load_problem(largs)
    masks, outputs = lds.ground_truth(largs, problem, False)
    return largs, problem, masks, lds.signed_targets(outputs), lds.n_fit(largs.subsets, largs.holdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--pairs", default="")
    args, rest = p.parse_known_args()
    largs, problem, masks, targets, fit = load_run(args.run, rest)
    per_query, rows = {}, []
    for f in sorted((args.run / "methods").glob("*.pt")):
        saved = torch.load(f, weights_only=True)
        if ".tmp" in f.stem or "result" not in saved:  # a method still running
            continue
        res = saved["result"]
        if "scores" not in res:
            continue
        s = res["scores"]
        m, pq = lds.evaluate(s, masks, {t: y[:, :len(s)] for t, y in targets.items()}, fit, largs.bootstrap, largs.seed)
        per_query[f.stem] = pq
        rows.append(f"| {f.stem} | {m['lds_margin_heldout']:+.3f} | {m['lds_margin']:+.3f} [{m['lds_margin_ci'][0]:+.3f}, "
                    f"{m['lds_margin_ci'][1]:+.3f}] | {res['cpu_seconds']:.1f} | {len(s)} |")
    print("| method | LDS margin, held-out | LDS margin, all | CPU s | queries |\n|---|---|---|---|---|")
    print("\n".join(rows))
    for pair in filter(None, args.pairs.split(",")):
        a, b = pair.split(":")
        parts = []
        for key in ("lds_margin_heldout", "lds_margin"):
            x, y = per_query[a][key], per_query[b][key]
            n = min(len(x), len(y))
            d = x[:n] - y[:n]
            lo, hi = M.bootstrap_interval(d, 2000)
            parts.append(f"{key.replace('lds_margin', 'margin')} {np.nanmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}] on {n} queries")
        print(f"- `{a}` - `{b}`: " + "; ".join(parts))


if __name__ == "__main__":
    main()
