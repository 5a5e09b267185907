"""Tiny denoising diffusion models built from configs (no downloads): ``UNet2DModel`` + ``DDPMScheduler``.

``diffusers`` is an optional extra (``pip install forwardinf[diffusion]``); importing this module
works without it, the builders raise an ``ImportError`` that says what to install.

- :func:`build_unet`, :func:`build_scheduler`: a small noise predictor and its noise schedule.
- :func:`train_denoiser`: the standard DDPM objective (random timestep, random noise, MSE on ε).
- :func:`generate`: ancestral / DDIM sampling with a seeded generator.
- :func:`contiguous_group_norm`: lets ``torch.func.vmap`` run UNets *with attention blocks*.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from forwardinf.core.params import device_of
from forwardinf.core.seeding import seeded

DIFFUSERS_HINT = "the diffusion models need the optional package diffusers: pip install 'forwardinf[diffusion]'"


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ``ImportError`` naming the extra to install."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(DIFFUSERS_HINT) from e
    return diffusers


def build_unet(
    sample_size: int = 16,
    channels: int = 1,
    block_out_channels: Sequence[int] = (16, 32, 32),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention: bool = False,
    seed: int | None = 0,
) -> nn.Module:
    """A ``diffusers.UNet2DModel`` noise predictor for ``[B, channels, sample_size, sample_size]`` images.

    One down/up block per entry of ``block_out_channels`` (each halves the resolution but the
    last). ``attention=False`` (default) leaves out every attention block: the model is then a
    pure conv/GroupNorm net that ``vmap`` and forward-mode ``jvp`` handle (PyTorch's fused CPU
    attention has neither a batching rule that GroupNorm accepts nor a forward derivative; see
    :func:`contiguous_group_norm`). ``seed`` seeds the initial weights (None: global RNG).
    """
    diffusers = require_diffusers()
    n = len(block_out_channels)
    if n < 1 or sample_size % (2 ** (n - 1)):
        raise ValueError(f"sample_size={sample_size} must be divisible by 2^(len(block_out_channels) - 1) = {2 ** (n - 1)}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"every entry of block_out_channels={tuple(block_out_channels)} must be divisible by norm_num_groups={norm_num_groups}")
    down = ["AttnDownBlock2D" if attention and i == n - 1 else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(n)]
    with seeded(seed):
        return diffusers.UNet2DModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups,
            add_attention=attention,
        )


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                    prediction_type: str = "epsilon") -> Any:
    """A ``diffusers.DDPMScheduler`` (``beta_schedule``: ``"linear"``, ``"squaredcos_cap_v2"``, ...)."""
    diffusers = require_diffusers()
    return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                   prediction_type=prediction_type)


def _target(scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type={kind!r} is not supported; expected 'epsilon', 'sample' or 'v_prediction'")


def train_denoiser(
    unet: nn.Module,
    scheduler: Any,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    warmup: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``unet`` in place on ``images [N, C, H, W]`` (pixels in [-1, 1]) with the DDPM objective.

    Each step draws ``batch_size`` images (with replacement when ``N`` is smaller), a uniform
    timestep and Gaussian noise per image, and takes an AdamW step on the MSE between the model's
    output and the scheduler's target. LR: linear warm-up over ``warmup`` steps, then cosine
    decay to 0. Returns the per-step losses. Leaves ``unet`` in eval mode.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_denoiser: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if images.ndim != 4:
        raise ValueError(f"train_denoiser: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed)
    device = device_of(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    n, T = len(images), scheduler.config.num_train_timesteps
    losses = []
    unet.train()
    for step in tqdm(range(steps), desc="train denoiser", disable=not progress, leave=False):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(n, (batch_size,), generator=gen) if n < batch_size else torch.randperm(n, generator=gen)[:batch_size]
        x0 = images[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(T, (len(x0),), generator=gen).to(device)
        out = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss = (out - _target(scheduler, x0, noise, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval()
    return losses


@torch.no_grad()
def generate(unet: nn.Module, scheduler: Any, n: int, *, steps: int = 50, seed: int = 0,
             sampler: str = "ddim") -> Tensor:
    """``n`` samples ``[n, C, H, W]`` (clamped to [-1, 1]) from ``unet`` with ``steps`` denoising steps.

    ``sampler``: ``"ddim"`` (deterministic given the initial noise; good with few steps) or
    ``"ddpm"`` (ancestral). A fresh scheduler is built from ``scheduler.config``, so the caller's
    scheduler is not changed. Seeded: the same arguments give the same images.
    """
    diffusers = require_diffusers()
    kinds = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}
    if sampler not in kinds:
        raise ValueError(f"sampler={sampler!r}; expected one of {sorted(kinds)}")
    sched = kinds[sampler].from_config(scheduler.config)
    sched.set_timesteps(steps)
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    device = device_of(unet)
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen).to(device)
    was_training = unet.training
    unet.eval()
    try:
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, generator=gen).prev_sample
    finally:
        unet.train(was_training)
    return x.clamp(-1, 1)


@contextlib.contextmanager
def contiguous_group_norm(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``GroupNorm`` of ``module`` first makes its input contiguous.

    Attention blocks hand GroupNorm a transposed (non-contiguous) tensor; inside ``vmap`` over
    parameters PyTorch 2.x then fails with "NYI: querying is_contiguous inside of vmap". The
    hooks change no parameter, buffer or result and are removed on exit.
    """
    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
               for m in module.modules() if isinstance(m, nn.GroupNorm)]
    try:
        yield module
    finally:
        for h in handles:
            h.remove()
