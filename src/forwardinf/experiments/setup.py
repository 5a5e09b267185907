"""Shared experiment set-up: a dataset, and a classifier trained on it (or loaded from cache).

Training keeps what the baselines need, cached beside the model under ``--out/cache``:
``N_CHECKPOINTS`` snapshots (TracIn) and, when a requested method needs it (HyDRA, see
``registry.requirements``), the recorded SGD trajectory (:class:`TrajectoryRecorder`). A model
loaded with ``--checkpoint`` comes with its trajectory from ``--trajectory`` (a file written by
``TrajectoryRecorder.save`` during the user's own training).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forwardinf.baselines.registry import FORWARD_INF, forward_inf_names, make_estimator
from forwardinf.data.loaders import DataSplit, load_dataset, subset
from forwardinf.hashing import json_hash
from forwardinf.models import build_model
from forwardinf.training import accuracy, load_checkpoint, save_checkpoint, train_classifier

# Per dataset: the model and training recipe that give a good classifier quickly on 2 CPU cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(model="mlp", epochs=30, lr=0.05, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "fashion-mnist": dict(model="cnn", epochs=3, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "mnist": dict(model="cnn", epochs=2, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=0.0),
    "cifar10": dict(model="cnn", epochs=15, lr=0.01, batch_size=64, optimizer="sgd", weight_decay=5e-4),
}
# Training augmentation under ``--train-augment auto``: what real models of the dataset train with.
AUTO_AUGMENT = {"cifar10": "crop+flip"}
N_CHECKPOINTS = 5
# The registry's Forward-INF variants for classifiers (baselines.registry.FORWARD_INF, one definition
# per name): every one of FORWARD_INF_VARIANTS runs on any classifier (lds's 'all' runs them all);
# IMAGE_VARIANTS need images (forward-inf-invariant). Values: each variant's estimator keywords.
FORWARD_INF_VARIANTS: dict[str, dict[str, Any]] = {n: dict(FORWARD_INF[n].kw) for n in forward_inf_names()}
IMAGE_VARIANTS: dict[str, dict[str, Any]] = {n: dict(FORWARD_INF[n].kw) for n in forward_inf_names("image")}
TRAJECTORY_MB = 1024  # parameter snapshots beyond this are thinned (TrajectoryRecorder's ``every``)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="mlp, cnn or resnet18 (default: per dataset)")
    p.add_argument("--width", type=int, default=None, help="model width (cnn channels / resnet base width)")
    p.add_argument("--n-train", type=int, default=None, help="class-balanced training subset size (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: per dataset)")
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint to load instead of training (saved state dict; weights_only)")
    p.add_argument("--trajectory", default=None,
                   help="with --checkpoint: the model's recorded SGD training (TrajectoryRecorder.save), for HyDRA")
    add_option_argument(p)


def add_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a keyword for one method's estimator, e.g. forward-inf.lr=0.01 or if-100.damping=0.01 "
                        "(values are Python literals, else strings); repeatable")


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` values as ``{method: {key: value}}``, each METHOD among ``methods``."""
    out: dict[str, dict[str, Any]] = {}
    for item in getattr(args, "option", None) or []:
        left, eq, text = item.partition("=")
        name, dot, key = left.rpartition(".")  # the key has no dot; a NAME@LABEL may
        if not (dot and eq and key.strip()):
            raise ValueError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. forward-inf.lr=0.01")
        if name not in methods:
            raise ValueError(f"--option {item!r}: {name!r} is not one of --methods ({', '.join(methods)})")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: adam, cosine
        out.setdefault(name, {})[key.strip().replace("-", "_")] = value
    return out


def make_method(name: str, model: torch.nn.Module, prepared: "Prepared", progress: bool = False,
                options: dict[str, Any] | None = None) -> Any:
    """A fresh estimator for ``--methods`` entry ``name`` (a registry name, ``baselines.registry``),
    with its ``--option`` keywords. ``NAME@LABEL`` is method ``NAME`` under another label, so that
    one method can run with several ``--option`` settings (``trak@reg``, ``--option trak@reg.lambda_reg=100``)."""
    import forwardinf as fi

    name = name.split("@", 1)[0]
    kw = dict(options or {})
    variant = FORWARD_INF.get(name)
    if variant is not None:
        kw.setdefault("progress", progress)
        if variant.estimator == "invariant" and prepared.split is not None:
            from forwardinf.data.augment import flip_is_sensible

            if not flip_is_sensible(prepared.split.name):
                kw.setdefault("flip", False)
    try:
        return make_estimator(name, model, fi.ClassificationTask(), checkpoints=prepared.checkpoints,
                              trajectory=prepared.trajectory, **kw)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}; check its --option keywords") from e


@dataclass
class Prepared:
    split: DataSplit
    model: torch.nn.Module
    model_name: str
    accuracy: float
    checkpoints: list = field(default_factory=list)  # state dicts along training, for TracIn
    config: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    trajectory: Any = None  # TrajectoryRecorder of the training run, for HyDRA (when a method needs it)

    def describe(self) -> str:
        return (f"Model `{self.model_name}` trained on {len(self.split.y_train)} points "
                f"({self.config.get('epochs')} epochs, {self.train_seconds:.1f}s), test accuracy {self.accuracy:.3f}.")


def needs_trajectory(args: argparse.Namespace) -> bool:
    """Whether a method in ``args.methods`` (comma-separated) needs the recorded trajectory."""
    from forwardinf.baselines.registry import METHODS, requirements

    names = [m.strip().lower().split("@", 1)[0] for m in str(getattr(args, "methods", "") or "").split(",")]
    return any(m in METHODS and "trajectory" in requirements(m) for m in names)


def prepare_classifier(args: argparse.Namespace, progress: bool = False) -> Prepared:
    """Load ``args.dataset`` (digits by default), then train a classifier or load it from ``--out`` cache.

    Records the training trajectory too when :func:`needs_trajectory`; a cached model without one
    is trained again with the recorder on (training is deterministic: the same model results).
    """
    import time

    name = args.dataset or "digits"
    split = load_dataset(name, args.data_root)
    if args.n_train:
        split = subset(split, n_train=args.n_train, seed=args.seed)
    recipe = dict(DEFAULTS.get(split.name, DEFAULTS["digits"]))
    augment = getattr(args, "train_augment", None)  # --train-augment: auto, none or a kind
    if augment in ("auto", "none"):
        augment = AUTO_AUGMENT.get(split.name) if augment == "auto" else None
    for key, value in (("model", args.model), ("epochs", args.epochs), ("lr", args.train_lr), ("augment", augment)):
        if value is not None:  # (an unset augment stays out of the config: cache keys unchanged)
            recipe[key] = value
    model_kw = {"width": args.width} if args.width else {}
    model_name = recipe.pop("model")
    config = {"dataset": split.name, "model": model_name, **model_kw, **recipe, "n_train": len(split.y_train),
              "seed": args.seed}
    model = build_model(model_name, split.input_shape, split.n_classes, seed=args.seed, **model_kw)

    start = time.perf_counter()
    checkpoints: list = []
    trajectory = None
    want_trajectory = needs_trajectory(args)
    if getattr(args, "trajectory", None) and not args.checkpoint:
        raise ValueError("--trajectory goes with --checkpoint (the model it recorded); without one the "
                         "model is trained here and its trajectory recorded")
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model)
        if getattr(args, "trajectory", None):
            from forwardinf.baselines.hydra import TrajectoryRecorder

            trajectory = TrajectoryRecorder.load(args.trajectory, model)
        elif want_trajectory:
            raise ValueError("HyDRA needs the model's training trajectory: pass --trajectory FILE "
                             "(TrajectoryRecorder.save of the run that produced --checkpoint)")
    else:
        key = json_hash(config)
        cache = Path(args.out) / "cache" / f"model-{key}.pt"
        traj_file = cache.parent / f"model-{key}-trajectory.pt"
        if cache.exists() and (traj_file.exists() or not want_trajectory):
            meta = load_checkpoint(cache, model)
            checkpoints = [_load_state(cache.parent / f) for f in meta.get("checkpoints", [])]
            if want_trajectory:
                from forwardinf.baselines.hydra import TrajectoryRecorder

                trajectory = TrajectoryRecorder.load(traj_file, model)
        else:
            checkpoints, trajectory = _train_with_checkpoints(model, split, recipe, args.seed, progress,
                                                              record=want_trajectory)
            cache.parent.mkdir(parents=True, exist_ok=True)
            names = []
            for i, state in enumerate(checkpoints):
                names.append(f"model-{key}-ckpt{i}.pt")
                torch.save(state, cache.parent / names[-1])
            if trajectory is not None:
                trajectory.save(traj_file)
            save_checkpoint(model, cache, checkpoints=names, config=json.dumps(config, sort_keys=True))
    model.eval()
    seconds = time.perf_counter() - start
    acc = accuracy(model, split.test())
    return Prepared(split, model, model_name, acc, checkpoints, config, seconds, trajectory)


def _train_with_checkpoints(model: torch.nn.Module, split: DataSplit, recipe: dict, seed: int, progress: bool,
                            record: bool = False) -> tuple[list, Any]:
    """Train in ``N_CHECKPOINTS`` stages, keeping a copy of the weights after each (TracIn uses them).

    With ``record``, every SGD step is recorded for HyDRA; returns ``(checkpoints, recorder or None)``.
    """
    epochs = recipe["epochs"]
    stages = [e for e in torch.linspace(0, epochs, N_CHECKPOINTS + 1).round().int().tolist()[1:]]
    done, checkpoints = 0, []
    kw = {k: recipe[k] for k in ("lr", "batch_size", "optimizer", "weight_decay", "augment") if k in recipe}
    recorder, train = None, split.train()
    context: Any = contextlib.nullcontext(train)
    if record:
        recorder = trajectory_recorder(model, len(split.y_train), epochs, recipe["batch_size"])
        context = recorder.recording(train)
    with context as data:
        for stage, until in enumerate(stages):
            if until > done:
                train_classifier(model, data, epochs=until - done, seed=seed + stage, progress=progress, **kw)
                done = until
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return checkpoints, recorder


def trajectory_recorder(model: torch.nn.Module, n: int, epochs: int, batch_size: int,
                        budget_mb: float = TRAJECTORY_MB) -> Any:
    """A :class:`TrajectoryRecorder` for ``epochs`` of SGD on ``n`` points, snapshotting the
    parameters every step, or every ``k``-th step if all snapshots would exceed ``budget_mb``."""
    from forwardinf.baselines.hydra import TrajectoryRecorder

    steps = epochs * -(-n // batch_size)
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    every = max(1, -(-steps * size // int(budget_mb * 2**20)))
    if every > 1:
        print(f"trajectory: {steps} steps x {size / 2**20:.1f} MB; parameters snapshotted every {every} steps "
              f"(HyDRA reuses a snapshot for the steps in between)", flush=True)
    return TrajectoryRecorder(model, every=every)


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
