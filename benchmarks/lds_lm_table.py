"""The LDS table of a `forwardinf lds --dataset lm-facts` folder, without loading the model.

Reads the cached retrainings (``--out/ground_truth``) and every method's cached scores
(``--out/methods``, written by any number of `lds --dataset lm-facts --methods X` processes on the
same folder), and takes each method's LDS against the first M subsets, with the paired per-query
difference to kronfluence EK-FAC (`forwardinf.experiments.lds_lm.table_rows`).

    python benchmarks/lds_lm_table.py runs/lds-lm --subsets 40 --json runs/lds-lm/table.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from forwardinf import metrics
from forwardinf.experiments import lds_lm
from forwardinf.experiments.report import markdown_table, results_object
from forwardinf.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the --out folder of the lds --dataset lm-facts runs")
    p.add_argument("--subsets", type=int, default=None, help="M (default: every subset cached from 0 on)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", default=None, help="write the results object here")
    a = p.parse_args()
    folder = Path(a.out)
    key = json.loads((folder / "ground_truth" / "manifest.json").read_text())
    m = a.subsets
    if m is None:
        m = 0
        while (folder / "ground_truth" / f"subset{m:04d}.npy").exists():
            m += 1
    outputs = np.stack([np.load(folder / "ground_truth" / f"subset{k:04d}.npy") for k in range(m)])  # [M, Q]
    masks = metrics.random_subsets(key["n_train"], m, key["alpha"], seed=key["seed"])
    results = lds_lm.lds_results(lds_lm.cached_methods(folder / "methods", key), masks, outputs, a.bootstrap, key["seed"])
    rows = lds_lm.table_rows(results, a.bootstrap, key["seed"])
    print(f"{key['n_train']} abstracts, {key['n_queries']} queries, {m} subsets of {key['alpha']:g}\n")
    print(markdown_table(["method", "LDS [95% CI]", f"minus {lds_lm.REFERENCE} (paired) [95% CI]", "CPU s", "peak MB",
                          "note"], rows))
    if a.json:
        config = {**key, "subsets": m, "bootstrap": a.bootstrap, "reference": lds_lm.REFERENCE,
                  "output_std_over_subsets": float(outputs.std(0).mean())}
        write_json(a.json, results_object("lds", "lm-facts", config, results))


if __name__ == "__main__":
    main()
