"""Shared experiment set-up: a dataset, and a classifier trained on it (or loaded from cache)."""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forwardinf.data.loaders import DataSplit, load_dataset, subset
from forwardinf.models import build_model
from forwardinf.training import accuracy, load_checkpoint, save_checkpoint, train_classifier

# Per dataset: the model and training recipe that give a good classifier quickly on 2 CPU cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(model="mlp", epochs=30, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "fashion-mnist": dict(model="cnn", epochs=3, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "mnist": dict(model="cnn", epochs=2, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "cifar10": dict(model="cnn", epochs=15, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=5e-4),
}
N_CHECKPOINTS = 5


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="mlp, cnn or resnet18 (default: per dataset)")
    p.add_argument("--width", type=int, default=None, help="model width (cnn channels / resnet base width)")
    p.add_argument("--n-train", type=int, default=None, help="class-balanced training subset size (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: per dataset)")
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint to load instead of training (saved state dict; weights_only)")


@dataclass
class Prepared:
    split: DataSplit
    model: torch.nn.Module
    model_name: str
    accuracy: float
    checkpoints: list = field(default_factory=list)  # state dicts along training, for TracIn
    config: dict = field(default_factory=dict)
    train_seconds: float = 0.0

    def describe(self) -> str:
        return (f"Model `{self.model_name}` trained on {len(self.split.y_train)} points "
                f"({self.config.get('epochs')} epochs, {self.train_seconds:.1f}s), test accuracy {self.accuracy:.3f}.")


def prepare_classifier(args: argparse.Namespace, progress: bool = False) -> Prepared:
    """Load ``args.dataset`` (digits by default), then train a classifier or load it from ``--out`` cache."""
    import time

    name = args.dataset or "digits"
    split = load_dataset(name, args.data_root)
    if args.n_train:
        split = subset(split, n_train=args.n_train, seed=args.seed)
    recipe = dict(DEFAULTS.get(split.name, DEFAULTS["digits"]))
    for key, value in (("model", args.model), ("epochs", args.epochs), ("lr", args.train_lr)):
        if value is not None:
            recipe[key] = value
    model_kw = {"width": args.width} if args.width else {}
    model_name = recipe.pop("model")
    config = {"dataset": split.name, "model": model_name, **model_kw, **recipe, "n_train": len(split.y_train),
              "seed": args.seed}
    model = build_model(model_name, split.input_shape, split.n_classes, seed=args.seed, **model_kw)

    start = time.perf_counter()
    checkpoints: list = []
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model)
    else:
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(args.out) / "cache" / f"model-{key}.pt"
        if cache.exists():
            meta = load_checkpoint(cache, model)
            checkpoints = [_load_state(cache.parent / f) for f in meta.get("checkpoints", [])]
        else:
            checkpoints = _train_with_checkpoints(model, split, recipe, args.seed, progress)
            cache.parent.mkdir(parents=True, exist_ok=True)
            names = []
            for i, state in enumerate(checkpoints):
                names.append(f"model-{key}-ckpt{i}.pt")
                torch.save(state, cache.parent / names[-1])
            save_checkpoint(model, cache, checkpoints=names, config=json.dumps(config, sort_keys=True))
    model.eval()
    seconds = time.perf_counter() - start
    acc = accuracy(model, split.test())
    return Prepared(split, model, model_name, acc, checkpoints, config, seconds)


def _train_with_checkpoints(model: torch.nn.Module, split: DataSplit, recipe: dict, seed: int, progress: bool) -> list:
    """Train in ``N_CHECKPOINTS`` stages, keeping a copy of the weights after each (TracIn uses them)."""
    epochs = recipe["epochs"]
    stages = [e for e in torch.linspace(0, epochs, N_CHECKPOINTS + 1).round().int().tolist()[1:]]
    done, checkpoints = 0, []
    kw = {k: recipe[k] for k in ("lr", "batch_size", "optimizer", "weight_decay")}
    for stage, until in enumerate(stages):
        if until > done:
            train_classifier(model, split.train(), epochs=until - done, seed=seed + stage, progress=progress, **kw)
            done = until
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return checkpoints


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
