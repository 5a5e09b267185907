"""Train one model on one dataset with `forwardinf.training` and record test accuracy + wall time.

    python benchmarks/train_baselines.py --dataset fashion-mnist --model cnn --epochs 3 --lr 0.02

Appends one JSON line per run to benchmarks/results/training_baselines.jsonl. Runs single-threaded
(the machine's 2 cores are shared), so times are under CPU contention and only indicative.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from forwardinf.data.loaders import load_dataset, subset
from forwardinf.models import build_model
from forwardinf.training import accuracy, train_classifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "training_baselines.jsonl"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset(a.dataset, a.data_root)
    if a.n_train:
        data = subset(data, n_train=a.n_train, seed=a.seed)
    kw = {"width": a.width} if a.width else {}
    model = build_model(a.model, data.input_shape, data.n_classes, seed=a.seed, **kw)
    t = time.perf_counter()
    train_classifier(model, data.train(), epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                     optimizer=a.optimizer, weight_decay=a.weight_decay, schedule=a.schedule,
                     seed=a.seed, progress=True)
    seconds = time.perf_counter() - t
    row = {"dataset": a.dataset, "n_train": len(data.y_train), "n_test": len(data.y_test),
           "model": a.model, "width": a.width, "params": sum(q.numel() for q in model.parameters()),
           "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "optimizer": a.optimizer,
           "weight_decay": a.weight_decay, "schedule": a.schedule, "seed": a.seed, "threads": a.threads,
           "train_seconds": round(seconds, 1), "train_acc": round(accuracy(model, data.train()), 4),
           "test_acc": round(accuracy(model, data.test()), 4),
           "command": "python " + " ".join(sys.argv)}
    print(json.dumps(row))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
