"""Collect `forwardinf hypothesis` runs into the paper's Table 1 layout (+ Table 7) beside the paper.

    python benchmarks/hypothesis_table.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

Each RUN_DIR holds the ``results.json`` of one ``forwardinf hypothesis`` run (one dataset, one or
both settings). Prints a markdown table: per dataset and setting, our correlations next to the
paper's, with wall and CPU seconds of the retraining. ``--json`` also writes the collected numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from forwardinf.experiments.report import markdown_table
from forwardinf.experiments.hypothesis import FI_NAMES, PAPER

# Table 7 Spearman at 500 validation points (PAPER holds its Pearson).
PAPER_FI_SPEARMAN = {"mnist": 0.9942, "fashion-mnist": 0.9920, "cifar10": 0.9832}


def _fi(methods: dict, setting: str) -> dict:
    """Forward-INF's entry: its registry name, or ``forward-inf`` in runs recorded before the registry."""
    return methods.get(f"{setting}/{FI_NAMES[setting]}") or methods[f"{setting}/forward-inf"]


def collect(dirs: list[Path]) -> list[dict]:
    rows = []
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        ds, m, details = res["dataset"], res["methods"], res["config"]["details"]
        for setting in ("convex", "noisy"):
            if f"{setting}/retraining" not in m:
                continue
            info = details[setting]
            rows.append({
                "dataset": ds, "setting": setting, "run_dir": str(d),
                "hypothesis": {k: m[f"{setting}/retraining"][k] for k in ("pearson", "spearman")},
                "forward_inf": {k: _fi(m, setting)[k] for k in ("pearson", "spearman")},
                "influence_function": ({k: m["convex/influence-function"][k] for k in ("pearson", "spearman")}
                                       if setting == "convex" else None),
                "retraining_wall_seconds": m[f"{setting}/retraining"]["seconds"],
                "retraining_cpu_seconds": m[f"{setting}/retraining"].get("cpu_seconds"),
                "trainings": m[f"{setting}/retraining"]["trainings"],
                "info": {k: v for k, v in info.items() if not isinstance(v, list)},
            })
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        paper = PAPER.get(r["dataset"], {})
        ref = paper.get(r["setting"], (None, None))
        for i, metric in enumerate(("pearson", "spearman")):
            fi_ref = None
            if r["setting"] == "noisy" and r["dataset"] in PAPER:
                fi_ref = paper["forward_inf"] if metric == "pearson" else PAPER_FI_SPEARMAN[r["dataset"]]
            out.append([
                r["dataset"] if i == 0 else "", r["setting"] if i == 0 else "", metric.capitalize(),
                r["hypothesis"][metric], "-" if ref[i] is None else ref[i],
                r["forward_inf"][metric], "-" if fi_ref is None else fi_ref,
                r["influence_function"][metric] if r["influence_function"] else "-",
                f"{r['retraining_wall_seconds']:.0f} / {r['retraining_cpu_seconds'] or float('nan'):.0f}" if i == 0 else "",
            ])
    header = ["dataset", "setting", "metric", "ours: train→test vs test→train", "paper (Table 1)",
              "ours: Forward-INF vs test→train", "paper (Table 7, 500 val.)", "ours: IF vs leave-one-out",
              "retraining wall / CPU s"]
    return markdown_table(header, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = collect(args.dirs)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
