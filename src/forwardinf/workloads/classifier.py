"""Image classifiers for the experiments: per-dataset training recipes, and a classifier trained on
a dataset (or loaded from a cache or a user's checkpoint) with what the baselines need; the same
on noisy labels for the mislabel experiment (:data:`NOISY_RECIPES`, :func:`train_noisy`).

Training keeps what the baselines need, cached beside the model in ``cache_dir``:
``N_CHECKPOINTS`` snapshots (TracIn) and, when asked (HyDRA), the recorded SGD trajectory
(:class:`~forwardinf.baselines.hydra.TrajectoryRecorder`). A user's model loaded from
``checkpoint`` comes with its trajectory from ``trajectory`` (a file written by
``TrajectoryRecorder.save`` during the user's own training).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from forwardinf.data.loaders import DataSplit, load_dataset, subset
from forwardinf.hashing import json_hash
from forwardinf.io import atomic_save
from forwardinf.models import build_model
from forwardinf.training import accuracy, load_checkpoint, save_checkpoint, train_classifier

log = logging.getLogger(__name__)

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
# Per dataset: subset size and a recipe that fits the noisy training labels (as the paper's 100
# epochs do), sized for 2 CPU cores.
NOISY_RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(n_train=None, model="mlp", epochs=100, lr=0.05, batch_size=64, weight_decay=0.0),
    "fashion-mnist": dict(n_train=2000, model="cnn", width=16, epochs=40, lr=0.02, batch_size=64, weight_decay=0.0),
    "mnist": dict(n_train=2000, model="cnn", width=16, epochs=40, lr=0.02, batch_size=64, weight_decay=0.0),
    "cifar10": dict(n_train=2000, model="resnet18", width=16, epochs=40, lr=0.05, batch_size=64, weight_decay=5e-4),
}
TRAJECTORY_MB = 1024  # parameter snapshots beyond this are thinned (TrajectoryRecorder's ``every``)


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


def train_or_load(dataset: str | None = None, data_root: str | None = None, *, n_train: int | None = None,
                  model: str | None = None, width: int | None = None, epochs: int | None = None,
                  lr: float | None = None, augment: str | None = None, checkpoint: str | None = None,
                  trajectory: str | None = None, cache_dir: str | Path = "runs/cache", seed: int = 0,
                  record_trajectory: bool = False, progress: bool = False) -> Prepared:
    """Load ``dataset`` (digits by default), then train a classifier with the dataset's recipe
    (:data:`DEFAULTS`; ``model``, ``epochs``, ``lr`` override it) or load it from ``cache_dir``,
    or load a user's ``checkpoint`` (a saved state dict) instead of training.

    ``n_train``: a class-balanced subset; ``augment``: ``"auto"`` (:data:`AUTO_AUGMENT`),
    ``"none"`` or a kind of :data:`forwardinf.training.AUGMENTATIONS` (``None``: no augmentation,
    and none in the cache key). With ``record_trajectory`` the SGD trajectory is recorded too (for
    HyDRA); a cached model without one is trained again with the recorder on (training is
    deterministic: the same model results). A user's checkpoint brings its own ``trajectory`` file.
    """
    name = dataset or "digits"
    split = load_dataset(name, data_root)
    if n_train:
        split = subset(split, n_train=n_train, seed=seed)
    recipe = dict(DEFAULTS.get(split.name, DEFAULTS["digits"]))
    if augment in ("auto", "none"):
        augment = AUTO_AUGMENT.get(split.name) if augment == "auto" else None
    for key, value in (("model", model), ("epochs", epochs), ("lr", lr), ("augment", augment)):
        if value is not None:  # (an unset augment stays out of the config: cache keys unchanged)
            recipe[key] = value
    model_kw = {"width": width} if width else {}
    model_name = recipe.pop("model")
    config = {"dataset": split.name, "model": model_name, **model_kw, **recipe, "n_train": len(split.y_train),
              "seed": seed}
    net = build_model(model_name, split.input_shape, split.n_classes, seed=seed, **model_kw)

    start = time.perf_counter()
    checkpoints: list = []
    recorded = None
    if trajectory and not checkpoint:
        raise ValueError("--trajectory goes with --checkpoint (the model it recorded); without one the "
                         "model is trained here and its trajectory recorded")
    if checkpoint:
        load_checkpoint(checkpoint, net)
        if trajectory:
            from forwardinf.baselines.hydra import TrajectoryRecorder

            recorded = TrajectoryRecorder.load(trajectory, net)
        elif record_trajectory:
            raise ValueError("HyDRA needs the model's training trajectory: pass --trajectory FILE "
                             "(TrajectoryRecorder.save of the run that produced --checkpoint)")
    else:
        key = json_hash(config)
        cache = Path(cache_dir) / f"model-{key}.pt"
        traj_file = cache.parent / f"model-{key}-trajectory.pt"
        if cache.exists() and (traj_file.exists() or not record_trajectory):
            meta = load_checkpoint(cache, net)
            checkpoints = [_load_state(cache.parent / f) for f in meta.get("checkpoints", [])]
            if record_trajectory:
                from forwardinf.baselines.hydra import TrajectoryRecorder

                recorded = TrajectoryRecorder.load(traj_file, net)
        else:
            checkpoints, recorded = train_with_checkpoints(net, split.train(), recipe, seed, progress,
                                                           record=record_trajectory)
            cache.parent.mkdir(parents=True, exist_ok=True)
            names = []
            for i, state in enumerate(checkpoints):
                names.append(f"model-{key}-ckpt{i}.pt")
                torch.save(state, cache.parent / names[-1])
            if recorded is not None:
                recorded.save(traj_file)
            save_checkpoint(net, cache, checkpoints=names, config=json.dumps(config, sort_keys=True))
    net.eval()
    seconds = time.perf_counter() - start
    acc = accuracy(net, split.test())
    return Prepared(split, net, model_name, acc, checkpoints, config, seconds, recorded)


def train_with_checkpoints(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], recipe: dict,
                           seed: int, progress: bool = False, record: bool = False, *,
                           n_checkpoints: int = N_CHECKPOINTS, seeds: Sequence[int] | None = None) -> tuple[list, Any]:
    """Train ``model`` on ``train`` ``(x, y)`` in ``n_checkpoints`` stages of equal epochs (the last
    snapshot is the final model), keeping a copy of the weights after each (TracIn uses them).

    ``recipe``: ``epochs`` and the :func:`~forwardinf.training.train_classifier` keywords ``lr``,
    ``batch_size``, ``optimizer``, ``weight_decay``, ``augment`` (those present). Stage ``s`` trains
    with seed ``seeds[s]`` (default ``seed + s``). With ``record``, every SGD step is recorded for
    HyDRA. Returns ``(checkpoints, recorder or None)``.
    """
    epochs = recipe["epochs"]
    stages = np.linspace(0, epochs, n_checkpoints + 1).round().astype(int).tolist()[1:]
    seeds = list(seeds) if seeds is not None else [seed + s for s in range(n_checkpoints)]
    done, checkpoints = 0, []
    kw = {k: recipe[k] for k in ("lr", "batch_size", "optimizer", "weight_decay", "augment") if k in recipe}
    recorder = None
    context: Any = contextlib.nullcontext(train)
    if record:
        recorder = trajectory_recorder(model, len(train[1]), epochs, recipe["batch_size"])
        context = recorder.recording(train)
    with context as data:
        for stage, until in enumerate(stages):
            if until > done:
                train_classifier(model, data, epochs=until - done, seed=seeds[stage], progress=progress, **kw)
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
        log.info("trajectory: %d steps x %.1f MB; parameters snapshotted every %d steps (HyDRA reuses a "
                 "snapshot for the steps in between)", steps, size / 2**20, every)
    return TrajectoryRecorder(model, every=every)


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------- noisy labels (mislabel)
def train_noisy(split: DataSplit, noisy: Tensor, recipe: dict, seed: int, n_checkpoints: int,
                progress: bool = False, record: bool = False) -> tuple[nn.Module, list[dict], Any]:
    """Train ``recipe["model"]`` on ``(x_train, noisy)``; return it, ``n_checkpoints`` state dicts and
    the recorded SGD trajectory (a ``TrajectoryRecorder``, for HyDRA; None unless ``record``).

    Training runs in ``n_checkpoints`` equal stages (the last snapshot is the final model), each
    with its own seed, so TracIn and ``forward-inf-*-cp`` can use the trajectory.
    """
    kw = {"width": recipe["width"]} if recipe.get("width") else {}
    model = build_model(recipe["model"], split.input_shape, split.n_classes, seed=seed, **kw)
    checkpoints, recorder = train_with_checkpoints(
        model, (split.x_train, noisy), recipe, seed, progress, record, n_checkpoints=n_checkpoints,
        seeds=[seed * 1000 + stage for stage in range(n_checkpoints)])
    return model.eval(), checkpoints, recorder


def cached_training(cache_dir: Path, config: dict, make: Callable[[bool], tuple[nn.Module, list[dict], Any]],
                     build: Callable[[], nn.Module], trajectory: bool = False) -> tuple[nn.Module, list[dict], float, Any]:
    """Train via ``make(trajectory)`` or load the result saved under a hash of ``config``; also the
    seconds spent and the recorded trajectory (``trajectory``: needed; a cache without one retrains)."""
    from forwardinf.baselines.hydra import TrajectoryRecorder

    key = json_hash(config)
    path = cache_dir / f"mislabel-{key}.pt"
    traj_path = cache_dir / f"mislabel-{key}-trajectory.pt"
    if path.exists() and (traj_path.exists() or not trajectory):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = build()
        model.load_state_dict(saved["checkpoints"][-1])
        rec = TrajectoryRecorder.load(traj_path, model) if trajectory else None
        return model.eval(), saved["checkpoints"], float(saved["seconds"]), rec
    start = time.perf_counter()
    model, checkpoints, rec = make(trajectory)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"checkpoints": checkpoints, "seconds": seconds}, path)
    if rec is not None:
        rec.save(traj_path)
    return model, checkpoints, seconds, rec
