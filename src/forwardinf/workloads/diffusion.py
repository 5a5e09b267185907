"""The diffusion experiment's material: a dataset's images at 16x16, and a small DDPM pre-trained on
them (cached on disk). Needs the optional package diffusers (``forwardinf[diffusion]``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from forwardinf.data.loaders import load_dataset
from forwardinf.hashing import sha256_hex
from forwardinf.io import atomic_save
from forwardinf.models.diffusion import build_unet, train_denoiser

IMAGE_SIZE = 16


def concept_images(name: str, root: str | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """All images of a dataset (train + test) at 16x16 in [-1, 1]: ``([N, C, 16, 16], [N], classes)``."""
    split = load_dataset(name, root)
    x = split.denormalize(torch.cat([split.x_train, split.x_test]))
    y = torch.cat([split.y_train, split.y_test])
    if x.shape[-1] != IMAGE_SIZE:
        # Bilinear up-sampling (8x8 digits); anti-aliased down-sampling (28x28 MNIST-style).
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=x.shape[-1] > IMAGE_SIZE)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), y, split.classes


def pretrained_denoiser(pool: Tensor, recipe: dict, scheduler: Any, out_dir: Path, name: str,
              progress: bool) -> tuple[torch.nn.Module, dict, bool]:
    """A UNet pre-trained on ``pool`` ``[N, C, 16, 16]`` by ``recipe`` (``channels``, ``steps``, ``lr``,
    ``batch_size``, ``seed``), or loaded from ``out_dir`` when the recipe and the data match.

    Returns ``(unet, {"seconds", "cpu_seconds"} spent, loaded from the cache)``."""
    key = sha256_hex(repr(sorted(recipe.items())), pool.numpy().tobytes(), length=12)
    path = out_dir / f"pretrained-{name}-{key}.pt"
    unet = build_unet(sample_size=IMAGE_SIZE, channels=pool.shape[1], block_out_channels=recipe["channels"],
                      seed=recipe["seed"])
    if path.is_file():
        try:
            unet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return unet.eval(), {"seconds": 0.0, "cpu_seconds": 0.0}, True
        except Exception:  # a stale or foreign file is replaced
            pass
    start, cpu = time.perf_counter(), time.process_time()
    train_denoiser(unet, scheduler, pool, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                   seed=recipe["seed"], warmup=min(100, recipe["steps"] // 10), progress=progress)
    t = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(unet.state_dict(), path)
    return unet.eval(), t, False
