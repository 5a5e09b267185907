"""Tables of near-duplicate leakage runs (``forwardinf leakage --near KIND,...``), merged per dataset.

    .venv/bin/python benchmarks/leakage_near_table.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results/leakage-near]

Each RUN_DIR holds the ``results.json`` of one ``forwardinf leakage`` run (its command in
``RUN_DIR.cmd`` beside it, if present). Runs of the same dataset and model are merged (a method x
kind measured twice keeps the later run). Writes ``OUT.json`` (the merged results) and ``OUT-tables.md``
(T-1 / T-5 / T-10 per kind and method, query CPU seconds, and the query cost per query relative
to plain ``forward-inf``'s on exact copies).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch

from forwardinf.experiments.report import markdown_table


_LINE = re.compile(r"^  (\S+)\s+(\S+)\s+fit\s+([\d.]+)s query\s+([\d.]+)s\s+T-1 ([\d.]+)\s+T-5 ([\d.]+)\s+T-10 ([\d.]+)")


def from_log(run_dir: str) -> dict:
    """The rows a run printed before it was stopped (``RUN_DIR.log``: wall seconds only, no CPU
    seconds or mean rank), shaped like its results.json; the rest of the config comes from a
    finished run of the same dataset and model."""
    lines = Path(str(run_dir).rstrip("/") + ".log").read_text().splitlines()
    methods: dict = {}
    for line in lines:
        m = _LINE.match(line)
        if m:
            name, kind, _, query, t1, t5, t10 = m.groups()
            methods.setdefault(name, {"fit_cpu_seconds": None, "kinds": {}})["kinds"][kind] = {
                "top1": float(t1), "top5": float(t5), "top10": float(t10), "mean_rank": None,
                "query_cpu_seconds": None, "query_seconds": float(query)}
    head = lines[0]  # "leakage: DATASET, N training points, model M (...), Q leaked queries, kinds: A, B"
    n_queries = int(head.split(" leaked queries")[0].split()[-1])
    return {"dataset": head.split(",")[0].split()[-1], "stopped": True,
            "config": {"n_queries": n_queries, "near": head.split("kinds: ")[1].split(", ")}, "methods": methods}


def merge(run_dirs: list[str]) -> dict:
    runs = [(d, json.loads((Path(d) / "results.json").read_text()) if (Path(d) / "results.json").exists()
             else from_log(d)) for d in run_dirs]
    finished = {r["dataset"]: r["config"] for _, r in runs if not r.get("stopped")}
    merged: dict = {}
    for d, res in runs:
        if res.get("stopped"):
            res["config"] = {**finished[res["dataset"]], **res["config"]}
        cfg = res["config"]
        key = f"{res['dataset']} / {cfg['model']}" + (f" width {cfg['width']}" if cfg.get("width") else "")
        entry = merged.setdefault(key, {"dataset": res["dataset"], "config": {k: v for k, v in cfg.items() if k not in ("near", "methods")},
                                        "commands": [], "methods": {}})
        cmd = Path(str(d).rstrip("/") + ".cmd")
        entry["commands"].append((cmd.read_text().strip() if cmd.exists() else f"(results in {d})")
                                 + ("  # stopped early: rows from its log" if res.get("stopped") else ""))
        for name, row in res["methods"].items():
            kinds = row.get("kinds") or {cfg["near"][0]: row}
            dest = entry["methods"].setdefault(name, {})
            for kind, m in kinds.items():
                dest[kind] = {**{k: m.get(k) for k in ("top1", "top5", "top10", "mean_rank", "query_cpu_seconds", "query_seconds")},
                              "fit_cpu_seconds": row.get("fit_cpu_seconds"), "n_queries": cfg["n_queries"], "run": str(d)}
    for entry in merged.values():  # cost relative to plain forward-inf on exact copies, per dataset
        ref = entry["methods"].get("forward-inf", {}).get("exact")
        for rows in entry["methods"].values():
            for m in rows.values():
                m["query_cost_vs_exact"] = ((m["query_cpu_seconds"] / m["n_queries"])
                                            / (ref["query_cpu_seconds"] / ref["n_queries"])
                                            if ref and ref["query_cpu_seconds"] and m["query_cpu_seconds"] else None)
    return merged


def _round(v: float | None, digits: int = 1) -> float | str:
    return "-" if v is None else round(v, digits)


def tables(merged: dict) -> str:
    parts = []
    for key, entry in merged.items():
        methods = list(entry["methods"])
        kinds: list[str] = []
        for rows in entry["methods"].values():
            kinds += [k for k in rows if k not in kinds]
        cfg = entry["config"]
        counts = sorted({m["n_queries"] for rows in entry["methods"].values() for m in rows.values()})
        parts.append(f"## {key}\n\n{cfg['n_train']} training points, {' or '.join(map(str, counts))} leaked queries "
                     "(per kind: see `n` in the CPU table), "
                     f"{cfg['epochs']} epochs, training augmentation: {cfg.get('augment', 'none')}, seed {cfg['seed']}.\n\n"
                     "Commands:\n```\n" + "\n".join(entry["commands"]) + "\n```\n")
        for metric, label in (("top1", "T-1"), ("top5", "T-5"), ("top10", "T-10")):
            rows = [[k, *[entry["methods"][m].get(k, {}).get(metric, "") for m in methods]] for k in kinds]
            parts.append(f"{label}:\n\n" + markdown_table(["kind", *methods], rows) + "\n")
        rows = [[m, k, r[k]["n_queries"], _round(r[k]["fit_cpu_seconds"]), _round(r[k]["query_cpu_seconds"]),
                 _round(r[k]["query_cpu_seconds"] and r[k]["query_cpu_seconds"] / r[k]["n_queries"], 2),
                 _round(r[k]["query_seconds"]),
                 round(r[k]["query_cost_vs_exact"], 2) if r[k]["query_cost_vs_exact"] else ""]
                for m, r in entry["methods"].items() for k in r]
        parts.append("CPU seconds (fit once per run; query = all queries of one kind; cost = query CPU s over "
                     "forward-inf's on exact copies):\n\n" + markdown_table(["method", "kind", "n", "fit CPU s", "query CPU s", "per query", "query wall s", "x FI exact"], rows) + "\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/leakage-near")
    args = ap.parse_args()
    merged = merge(args.runs)
    Path(args.out + ".json").write_text(json.dumps(merged, indent=1))
    head = (f"Machine: {platform.platform()}, torch {torch.__version__}, one torch thread per run; CPU seconds are "
            "`time.process_time` (wall seconds, in the json, are inflated by other jobs on the shared 2-core machine).\n\n")
    Path(args.out + "-tables.md").write_text(head + tables(merged))
    print(f"wrote {args.out}.json and {args.out}-tables.md")


if __name__ == "__main__":
    main()
