"""Seeded training of classifiers, accuracy, and checkpoints that experiments cache models in.

Determinism: the shuffling order comes from a ``torch.Generator`` seeded with ``seed`` and any
other randomness (e.g. dropout) runs under a forked, seeded global RNG, so on CPU the same model
init + data + arguments give bit-identical weights, and the caller's RNG state is left alone.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from forwardinf.core.params import device_of, mode
from forwardinf.data.inputs import as_dataset, batches, gather, to_device
from forwardinf.hashing import fingerprint_data, state_fingerprint
from forwardinf.io import atomic_save

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("crop+flip",)


def _xy(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("training data must yield (inputs, targets) pairs")


def train_classifier(model: nn.Module, train: Any, *, epochs: int = 10, lr: float = 0.01,
                     batch_size: int = 64, optimizer: str = "sgd", momentum: float = 0.9,
                     weight_decay: float = 0.0, seed: int = 0, schedule: str = "constant",
                     augment: str | None = None, progress: bool = False) -> nn.Module:
    """Train ``model`` in place with cross-entropy on ``train`` and return it in eval mode.

    ``train``: ``(x [N, ...], y [N])`` tensors, a Dataset or an unshuffled DataLoader of
    ``(inputs, targets)``. ``optimizer`` "sgd" (with ``momentum``) or "adam"; ``schedule``
    "constant" or "cosine" (per-step cosine decay of ``lr`` to 0). ``augment`` None (default) or
    "crop+flip": each batch of images ``[B, C, H, W]`` gets a random crop of the zero-padded image
    and a random horizontal flip (``data.augment.crop_flip``, padding ``default_pad(H)``), drawn
    from a generator of its own seeded by ``seed`` (deterministic; the shuffling order is the
    same as without). A final batch of a single example is skipped (BatchNorm cannot train on it).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be None or one of {AUGMENTATIONS}, got {augment!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    dataset = as_dataset(train, "train")
    n = len(dataset)
    device = device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
             if schedule == "cosine" else None)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 104_729)  # its own stream: shuffling unchanged
    tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None

    epoch_iter: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epoch_iter = tqdm(epoch_iter, desc="train", unit="epoch")
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in epoch_iter:
            perm = torch.randperm(n, generator=gen)
            total_loss, seen = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                if len(idx) == 1 and n > 1:
                    continue
                batch = tuple(t[idx] for t in tensors) if tensors is not None else gather(dataset, idx.tolist())
                x, y = _xy(to_device(batch, device))
                if augment is not None:
                    x = _augment(x, augment, aug_gen)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
            if progress:
                epoch_iter.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}")
    return model.eval()


def _augment(x: Any, kind: str, gen: torch.Generator) -> Tensor:
    from forwardinf.data.augment import crop_flip, default_pad

    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"augment={kind!r} needs image inputs [B, C, H, W], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    return crop_flip(x, gen, default_pad(x.shape[-2]))


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, batch_size: int = 512) -> float:
    """Fraction of ``data`` (``(x, y)``, Dataset or DataLoader) classified correctly, in eval mode.

    The model's train/eval flags are restored afterwards.
    """
    dataset = as_dataset(data, "data")
    device = device_of(model)
    correct = 0
    with mode(model, False):
        for _, batch in batches(dataset, batch_size):
            x, y = _xy(to_device(batch, device))
            correct += int((model(x).argmax(dim=-1) == y).sum())
    return correct / len(dataset)


# ----------------------------------------------------------------------------------- checkpoints
_META_TYPES = (str, int, float, bool, type(None))


def _check_meta(v: Any, where: str = "meta") -> None:
    # Only plain values survive torch.load(weights_only=True); fail at save time, not load time.
    if isinstance(v, _META_TYPES):
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_meta(x, f"{where}[{i}]")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {type(k).__name__}")
            _check_meta(x, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where}: {type(v).__name__} is not storable; use str/int/float/bool/None/list/dict")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **meta: Any) -> Path:
    """Write ``{"state_dict": ..., "meta": meta}`` to ``path`` (atomically; parents created)."""
    _check_meta(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"state_dict": state, "meta": meta}, path)


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load the weights saved at ``path`` into ``model`` (strict) and return the saved meta."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a forwardinf checkpoint (no 'state_dict')")
    model.load_state_dict(ckpt["state_dict"])
    return dict(ckpt.get("meta", {}))


# ------------------------------------------------------------------------------------- caching
_TRAIN_DEFAULTS = {k: p.default for k, p in inspect.signature(train_classifier).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}


def train_or_load(build_fn: Callable[[], nn.Module], train: Any, path: str | os.PathLike | None = None,
                  **train_kw: Any) -> nn.Module:
    """A model from ``build_fn()`` trained on ``train`` with ``train_classifier(**train_kw)``,
    loaded from the checkpoint at ``path`` instead when that was made from the same initial
    weights, data and training arguments (defaults filled in; ``progress`` ignored).

    Returns the model in eval mode. With ``path`` None this just trains.
    """
    unknown = set(train_kw) - set(_TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training arguments {sorted(unknown)}; allowed: {sorted(_TRAIN_DEFAULTS)}")
    model = build_fn()
    if path is None:
        return train_classifier(model, train, **train_kw)
    kw = {**_TRAIN_DEFAULTS, **train_kw}
    kw.pop("progress")
    if kw["augment"] is None:  # keys of models trained before augment existed stay valid
        kw.pop("augment")
    key = {"train_kw": kw, "data": fingerprint_data(train), "init": state_fingerprint(model)}
    path = Path(path)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(saved, dict) and saved.get("meta", {}).get("key") == key:
                model.load_state_dict(saved["state_dict"])
                return model.eval()
        except Exception:  # an unreadable or foreign file is simply replaced by a fresh one
            pass
    train_classifier(model, train, **train_kw)
    save_checkpoint(model, path, key=key)
    return model
