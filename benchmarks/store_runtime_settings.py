"""How much do a score store's runtime settings (batch size, queries per sweep) move the scores?

The store's manifest leaves them out of its configuration check (storage/manifest.py RUNTIME), so a
run killed for lack of memory resumes with a smaller --batch-size. This measures the largest
difference between stores made with different settings, relative to (1 + max |score|), against
RUNTIME_TOLERANCE. Model: the CNN of `forwardinf score`'s demo (digits, width 16, 10 epochs);
every score variant.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_runtime_settings.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import forwardinf as fi
from forwardinf.data.loaders import load_digits
from forwardinf.experiments.report import markdown_table
from forwardinf.estimators.forward_inf import SCORES
from forwardinf.models import build_model
from forwardinf.storage.manifest import RUNTIME_TOLERANCE
from forwardinf.training import train_classifier

SETTINGS = [dict(batch_size=1024, query_chunk=16), dict(batch_size=64, query_chunk=16),
            dict(batch_size=7, query_chunk=16), dict(batch_size=64, query_chunk=1), dict(batch_size=7, query_chunk=3)]


def main() -> None:
    torch.set_num_threads(1)
    start = time.process_time()
    d = load_digits()
    model = train_classifier(build_model("cnn", d.input_shape, d.n_classes, seed=0, width=16), d.train(),
                             epochs=10, lr=0.05, seed=0).eval()
    train, queries = d.train(), (d.x_test[:16], d.y_test[:16])
    rows = []
    for score in SCORES:
        ref = None
        for s in SETTINGS:
            scores = fi.ForwardINF(model, fi.ClassificationTask(), score=score, **s).fit(train).influence(queries)
            if ref is None:
                ref = scores
                continue
            rel = float((scores - ref).abs().max() / (1 + ref.abs().max()))
            rows.append({"score": score, **s, "max_abs_diff": float((scores - ref).abs().max()),
                         "max_abs_score": float(ref.abs().max()), "relative": rel,
                         "top10_equal": bool(torch.equal(scores.topk(10).indices, ref.topk(10).indices))})
    worst = max(r["relative"] for r in rows)
    out = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/store_runtime_settings.py",
           "reference": SETTINGS[0], "n_train": len(train[1]), "n_query": 16, "tolerance": RUNTIME_TOLERANCE,
           "worst_relative": worst, "cpu_seconds": time.process_time() - start, "rows": rows}
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "store_runtime_settings.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Score store: runtime settings vs scores", "", f"Command: `{out['command']}`", "",
             f"CNN (digits, width 16), {len(train[1])} training points x 16 test queries; reference: batch 1024, "
             f"16 queries per sweep. Relative = max |difference| / (1 + max |score|); the store's tolerance "
             f"is {RUNTIME_TOLERANCE:g}. Worst: {worst:.2e}. CPU {out['cpu_seconds']:.0f} s.", "",
             markdown_table(["score", "batch", "query chunk", "max abs diff", "max abs score", "relative", "top-10 equal"],
                            [[r["score"], r["batch_size"], r["query_chunk"], f"{r['max_abs_diff']:.2e}",
                              f"{r['max_abs_score']:.3g}", f"{r['relative']:.2e}", r["top10_equal"]] for r in rows])]
    (res / "store_runtime_settings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if worst <= RUNTIME_TOLERANCE else 1)


if __name__ == "__main__":
    main()
