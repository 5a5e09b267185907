"""Leakage T-1/T-5/T-10 of every Forward-INF variant on digits, Fashion-MNIST and the CIFAR-10 subset.

    .venv/bin/python benchmarks/leakage_variants.py [--only digits,fashion-mnist,cifar10]

Writes benchmarks/results/leakage_variants.md (and the raw results.json of each run under runs/).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from forwardinf.cli import main as cli

VARIANTS = "forward-inf,forward-inf-paper,forward-inf-authors,forward-inf-margin,forward-inf-loss,forward-inf-abs"
SETTINGS = {
    "digits": ["--dataset", "digits", "--n-queries", "50"],
    "fashion-mnist": ["--dataset", "fashion-mnist", "--n-train", "10000", "--epochs", "8", "--n-queries", "30"],
    "cifar10": ["--dataset", "cifar10", "--n-queries", "30"],
    "cifar10-resnet": ["--dataset", "cifar10", "--model", "resnet18", "--width", "16", "--epochs", "12",
                       "--train-lr", "0.05", "--n-queries", "30"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=VARIANTS)
    ap.add_argument("--data-root-cifar", default=None)
    ap.add_argument("--out", default="benchmarks/results/leakage_variants.md")
    args = ap.parse_args()
    sections = []
    for name in args.only.split(","):
        run_dir = Path("runs/bench-leakage") / name
        extra = ["--data-root", args.data_root_cifar] if name.startswith("cifar") and args.data_root_cifar else []
        cmd = ["leakage", *SETTINGS[name], *extra, "--methods", args.methods, "--out", str(run_dir), "--quiet"]
        start = time.perf_counter()
        cli(cmd)
        wall = time.perf_counter() - start
        res = json.loads((run_dir / "results.json").read_text())
        report = (run_dir / "report.md").read_text().split("\n", 2)[2]
        sections.append(f"## {name}\n\n`forwardinf {' '.join(cmd)}` (wall {wall:.0f}s)\n\n{report}\n"
                        f"Per query: " + ", ".join(f"{m} {v['seconds_per_query']:.3f}s" for m, v in res["methods"].items()) + "\n")
    header = (f"# Leakage detection: Forward-INF variants\n\nMachine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}. Seconds include fit (base losses and, "
              "for the default, the forward-mode directions) and exclude training the model. Timings were taken while "
              "other jobs shared the 2 cores: compare ratios, not absolutes.\n")
    Path(args.out).write_text(header + "\n" + "\n".join(sections))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
