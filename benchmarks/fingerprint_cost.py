"""Cost of the weights fingerprint that ``influence`` / ``top_k`` / ``self_influence`` check
(:mod:`forwardinf.estimators.validation`), next to one no-grad forward batch of the same model.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fingerprint_cost.py

Writes benchmarks/results/fingerprint_cost.{md,json}. CPU seconds (process time), best of 5.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from forwardinf.estimators.validation import weights_fingerprint
from forwardinf.experiments.report import markdown_table
from forwardinf.models import build_model

OUT = Path(__file__).resolve().parent / "results"


def best_cpu(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, shape in [("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))]:
        model = build_model(name, shape, 10, seed=0).eval()
        n = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
        x = torch.randn(64, *shape)
        with torch.no_grad():
            forward = best_cpu(lambda: model(x))
        check = best_cpu(lambda: weights_fingerprint(model))
        rows.append({"model": name, "values": n, "fingerprint_cpu_s": check, "ns_per_value": 1e9 * check / n,
                     "forward_batch64_cpu_s": forward})
    OUT.mkdir(exist_ok=True)
    (OUT / "fingerprint_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Cost of the weights fingerprint (one check per influence / top_k / self_influence call)", "",
             "`OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fingerprint_cost.py` "
             "(one thread, CPU seconds, best of 5)", "",
             markdown_table(["model", "parameters + buffers", "fingerprint (s)", "ns per value",
                             "one no-grad forward of 64 (s)"],
                            [[r["model"], f"{r['values']:,}", f"{r['fingerprint_cpu_s']:.4f}", f"{r['ns_per_value']:.2f}",
                              f"{r['forward_batch64_cpu_s']:.4f}"] for r in rows])]
    (OUT / "fingerprint_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
