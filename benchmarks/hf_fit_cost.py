"""The cosine fit on transformers at default settings, in inference sweeps: ``sensitivity="exact"``
(the default: per-example gradient norms) against ``"directions"`` (16 forward-mode directions).

Models from configs (default sdpa attention, nothing downloaded), a little larger than the test
matrix's: hidden 128, 4 layers, vocabulary 2,000; 512 training rows of 32 tokens (a third
right-padded) or 32x32 images; 4 queries that copy training rows. One inference sweep = the
task's loss over the training set without gradient at the automatic batch size for one model
(the cheapest sweep the library would run). CPU seconds of one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hf_fit_cost.py

Writes benchmarks/results/hf_fit_cost.md and .json.
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
from forwardinf.data.inputs import gather
from forwardinf.experiments.common import timer
from forwardinf.models.pretrained import require

V, H, LAYERS, T = 2000, 128, 4, 32


def _tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (n, T), generator=g)
    attn = torch.ones_like(ids)
    attn[: n // 3, T // 2:] = 0
    return ids.masked_fill(attn == 0, 0), attn


def models(n: int) -> dict:
    """name -> (model, task, training data)."""
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    ids, attn = _tokens(n, g)
    causal = {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}
    classes = {"input_ids": ids, "attention_mask": attn, "labels": torch.arange(n) % 3}
    seq2seq = {"input_ids": ids, "attention_mask": attn, "labels": torch.randint(3, V, (n, 8), generator=g)}
    images = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "labels": torch.arange(n) % 10}
    common = dict(vocab_size=V, pad_token_id=0)
    built = {
        "llama (causal LM)": (tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, **common)), causal),
        "gpt2 (causal LM)": (tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=H, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common)), causal),
        "bert (classifier)": (tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3, **common)), classes),
        "distilbert (classifier)": (tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=H, hidden_dim=2 * H, n_layers=LAYERS, n_heads=4, max_position_embeddings=64, num_labels=3,
            **common)), classes),
        "bart (seq2seq)": (tf.BartForConditionalGeneration(tf.BartConfig(
            d_model=H, encoder_layers=LAYERS // 2, decoder_layers=LAYERS // 2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=2 * H, decoder_ffn_dim=2 * H, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, **common)), seq2seq),
        "vit (classifier)": (tf.ViTForImageClassification(tf.ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=H, num_hidden_layers=LAYERS,
            num_attention_heads=4, intermediate_size=2 * H, num_labels=10)), images),
    }
    out = {}
    for name, (model, data) in built.items():
        task = fi.ClassificationTask() if "classifier" in name else fi.LanguageModelTask.for_model(model)
        out[name] = (model.eval(), task, data)
    return out


def run(model: torch.nn.Module, task: fi.Task, data: dict, sensitivity: str, n_queries: int) -> dict:
    est = fi.ForwardINF(model, task, sensitivity=sensitivity)
    with timer() as fit:
        est.fit(data)
    queries = {k: v[:n_queries] for k, v in data.items()}
    with timer() as infl:
        scores = est.influence(queries)
    own = scores[torch.arange(n_queries), torch.arange(n_queries)]
    return {"fit_cpu_seconds": fit["cpu_seconds"], "influence_cpu_seconds": infl["cpu_seconds"],
            "own_rank": (scores >= own[:, None]).sum(1).tolist(), "batch_size": est.batch_size_}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--n-queries", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    require("transformers")
    torch.set_num_threads(1)
    rows = []
    for name, (model, task, data) in models(args.n_train).items():
        dataset = fi.ForwardINF(model, task)._dataset(data, "train")
        batch = auto_batch_size(model, task, gather(dataset, range(8)), n_models=1, max_batch=512)
        with torch.no_grad(), timer() as t:
            sweep(lambda b: task.loss(model, b), dataset, batch, torch.device("cpu"))
        row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
               "inference_batch": batch, "inference_cpu_seconds": t["cpu_seconds"]}
        for sensitivity in ("exact", "directions"):
            r = run(model, task, data, sensitivity, args.n_queries)
            r["fit_sweeps"] = r["fit_cpu_seconds"] / t["cpu_seconds"]
            r["per_query_sweeps"] = r["influence_cpu_seconds"] / t["cpu_seconds"] / args.n_queries
            row[sensitivity] = r
        rows.append(row)
        print(name, {k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if "sweeps" in a or a == "own_rank"})
                     for k, v in row.items()}, flush=True)
    cmd = "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hf_fit_cost.json"), "w") as f:
        json.dump({"command": cmd, "n_train": args.n_train, "n_queries": args.n_queries, "rows": rows}, f, indent=2)
    lines = ["# The cosine fit on transformers, in inference sweeps", "", f"`{cmd}`", "",
             f"{args.n_train} training rows, {args.n_queries} queries (copies of training rows 0..{args.n_queries - 1}), "
             "default settings (sdpa attention, dict batches with padding). One inference sweep: the loss without "
             "gradient at the automatic batch for one model. Fit: everything `ForwardINF(model, task).fit(train)` "
             "does (batch probe, input checks, base values, sensitivities). Bar: the fit <= 10 sweeps.", "",
             "| model | parameters | inference sweep (CPU s, batch) | fit, exact (sweeps) | fit, directions (sweeps) "
             "| per query, exact | per query, directions | own ranks, exact | own ranks, directions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, d = r["exact"], r["directions"]
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['inference_cpu_seconds']:.2f} ({r['inference_batch']}) | "
                     f"**{e['fit_sweeps']:.1f}** | {d['fit_sweeps']:.1f} | {e['per_query_sweeps']:.2f} | "
                     f"{d['per_query_sweeps']:.2f} | {e['own_rank']} | {d['own_rank']} |")
    with open(os.path.join(args.out, "hf_fit_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
