"""Diffusion models: the denoising loss over a fixed, seeded set of timesteps and noise draws.

:class:`DiffusionTask` works with any ``diffusers`` noise predictor (``UNet2DModel``,
``UNet2DConditionModel``, ...) and any DDPM-family scheduler. The ``forwardinf diffusion``
experiment runs it on a small DDPM built from a config; Stable Diffusion works the same way in
latent space (below). That path is documented, not run in this repository (no downloads).

Stable Diffusion: which training images taught a fine-tuned model what it generated
------------------------------------------------------------------------------------
The paper's set-up (section 4.1): fine-tune SD on a few exemplars of a concept, generate images
from it, ascend on the generated images, score a candidate set (the exemplars, the ~50
pre-training images whose captions overlap the prompt most, ~50 random ones). With a local
checkpoint (``pip install 'forwardinf[diffusion]' transformers``)::

    import torch, forwardinf as fi
    from diffusers import StableDiffusionPipeline
    from forwardinf.models.diffusion import contiguous_group_norm

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd-checkpoint")   # your fine-tuned model

    @torch.no_grad()
    def encode_images(pixels):               # [N, 3, 512, 512] in [-1, 1] -> [N, 4, 64, 64]
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(captions):               # N strings -> [N, 77, 768]
        ids = pipe.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    cand = (encode_images(candidate_pixels), encode_text(candidate_captions))   # the candidate set
    gen = pipe([prompt] * 4, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    queries = (gen, encode_text([prompt] * 4))                                 # [4, 4, 64, 64], [4, 77, 768]
    task = fi.DiffusionTask(pipe.scheduler, timesteps=[10, 50, 100, 200, 400], noise_draws=2,
                            condition={"encoder_hidden_states": 1})
    with contiguous_group_norm(pipe.unet):
        est = fi.ForwardINF(pipe.unet, task, optimizer="adam", lr=1e-5, steps=3, score="margin",
                            params="*attn2*", batch_size=4).fit(cand)
        scores = est.influence(queries, joint=True)                          # [N candidates]
    top = scores.topk(8).indices

Notes on that recipe:

- Everything happens in latent space: encode the candidates once (the VAE and text encoder are
  frozen); the per-example loss is the UNet's denoising loss on the latents. The latents of the
  generated images come straight from the pipeline (``output_type="latent"``).
- ``lr=1e-5, steps=3`` is the paper's ascent (the same lr as their 5-iteration fine-tuning at
  batch 4); tune it as in :meth:`forwardinf.ForwardINF.tune` when a few ground-truth pairs are
  known. ``joint=True`` ascends on all generated images at once; drop it for one ranking per image
  (the paper's per-image protocol).
- ``params="*attn2*"`` restricts the update to the cross-attention layers (memory: the estimator
  holds one extra copy of the updated parameters); ``params=None`` updates the whole 860M-parameter
  UNet as the paper does, if memory allows.
- The SD UNet has attention blocks: :func:`forwardinf.models.diffusion.contiguous_group_norm` lets
  the estimators ``vmap`` over its parameters, and ``score="margin"`` or ``"loss"`` must be used
  (``"cosine"`` needs forward-mode derivatives, which the fused attention kernel does not have).
- Cost: ``M = len(timesteps) * noise_draws`` UNet forward passes per candidate, twice (before and
  after the update); the backward passes touch only the generated images.
- SD 2.x 768 checkpoints predict ``v``: the task reads ``prediction_type`` from the scheduler.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from forwardinf.tasks.base import Task

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCORE_AVERAGES = ("geometric", "arithmetic")


class DiffusionTask(Task):
    """Per-example denoising loss of a ``diffusers``-style noise predictor.

    With ``M`` fixed pairs ``(t_j, ε_j)`` (``timesteps`` x ``noise_draws``), the loss of an
    example ``x_i`` (image or latent, ``[C, H, W]``) is

        ``L_i = 1/M Σ_j mean_pixels (f_θ(√ᾱ_{t_j} x_i + √(1-ᾱ_{t_j}) ε_j, t_j) - y_j)²``

    with ``y_j = ε_j`` (``prediction_type="epsilon"``), ``√ᾱ ε_j - √(1-ᾱ) x_i``
    (``"v_prediction"``) or ``x_i`` (``"sample"``), taken from ``scheduler.config``. The noise comes
    from a NumPy generator seeded by ``seed``, never from torch's global RNG: every example and every model
    (``θ`` and the updated ``θ_K``) sees the same timesteps and the same noise, so a Forward-INF
    score ``L(θ_K, x_i) - L(θ, x_i)`` measures the change of the model and not a new noise draw
    (the same model scores exactly 0). The loss has no value-dependent Python branches, so
    estimators may ``vmap`` it.

    Args (keyword):
        scheduler: any ``diffusers`` scheduler with ``alphas_cumprod`` (DDPM, DDIM, PNDM, ...);
            only read.
        timesteps: an int ``n`` for ``n`` timesteps evenly spaced over ``[0, max_timestep)``
            (centres of ``n`` equal bins), or explicit timesteps. Spread them from low to
            mid noise: in the ``diffusion`` experiment, low timesteps alone (``2..50`` of 1000)
            let pre-training images that look like an exemplar outrank it, while
            ``10, 50, 100, 200, 400`` ranked the exemplars first over a 10x range of ascent lr
            (see ``benchmarks/results/diffusion.md``).
        max_timestep: upper end of the spread for an int ``timesteps`` (default ``T``, the
            scheduler's ``num_train_timesteps``).
        noise_draws: noise draws per timestep; ``M = len(timesteps) * noise_draws``.
        seed: seeds the noise.
        input_key: where the images are in a dict batch (tuple batches: element 0; a tensor
            batch is the images).
        condition: model keyword -> batch element (tuple position or dict key), e.g.
            ``{"class_labels": 1}`` for ``(images, labels)`` or ``{"encoder_hidden_states": 1}``.
            Other batch elements (e.g. class labels of an unconditional model) are ignored.
        score_average: how :meth:`score_loss` (``score="margin"``/``"cosine"``) averages the
            ``M`` pairs: ``"arithmetic"`` (default; log of the mean loss, in which the low
            timesteps, whose losses are largest, dominate) or ``"geometric"`` (mean of the log
            losses: every timestep's relative change weighs the same). On Fashion-MNIST the
            geometric mean fixed one of two missed exemplar sets and gave mixed results on
            held-out ones, so it is not the default (``benchmarks/results/diffusion.md``).

    Batches: ``images [B, C, H, W]``, a tuple ``(images, ...)`` or a dict. The model is called
    as ``model(noisy [B*M, C, H, W], t [B*M], **condition)`` and may return a tensor, a tuple
    or a ``diffusers`` output with ``.sample``. Cost: ``M`` forward passes per example.

    Stable Diffusion: encode images and captions once and attribute in latent space with the
    UNet alone, ``condition={"encoder_hidden_states": 1}``; the module docstring has the recipe.
    ``score="margin"`` (the change of :meth:`score_loss`) worked best in the ``diffusion``
    experiment.
    """

    def __init__(
        self,
        scheduler: Any,
        *,
        timesteps: int | Sequence[int] = 8,
        max_timestep: int | None = None,
        noise_draws: int = 1,
        seed: int = 0,
        input_key: str = "images",
        condition: Mapping[str, int | str] | None = None,
        score_average: str = "arithmetic",
    ) -> None:
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.max_timestep = max_timestep
        self.noise_draws = noise_draws
        self.seed = seed
        self.input_key = input_key
        self.condition = condition
        self.score_average = score_average

    # -- the fixed pairs ---------------------------------------------------------------------
    def plan(self) -> Tensor:
        """The ``M`` timesteps ``[M]`` (int64), in the order of the noise draws."""
        alphas = self._alphas_cumprod()
        T = len(alphas)
        if isinstance(self.timesteps, int) and not isinstance(self.timesteps, bool):
            top = T if self.max_timestep is None else self.max_timestep
            if not 1 <= top <= T:
                raise ValueError(f"DiffusionTask: max_timestep={top} must be in [1, {T}] (the scheduler has {T} timesteps)")
            if not 1 <= self.timesteps <= top:
                raise ValueError(f"DiffusionTask: timesteps={self.timesteps} must be in [1, {top}]")
            ts = ((torch.arange(self.timesteps, dtype=torch.float64) + 0.5) * top / self.timesteps).long()
        else:
            ts = torch.as_tensor(list(self.timesteps), dtype=torch.long)
            if ts.ndim != 1 or len(ts) == 0:
                raise ValueError(f"DiffusionTask: timesteps must be an int or a non-empty sequence of ints, got {self.timesteps!r}")
            if (ts < 0).any() or (ts >= T).any():
                raise ValueError(f"DiffusionTask: timesteps must lie in [0, {T}), got {ts.tolist()}")
        if not isinstance(self.noise_draws, int) or self.noise_draws < 1:
            raise ValueError(f"DiffusionTask: noise_draws must be a positive int, got {self.noise_draws!r}")
        return ts.repeat_interleave(self.noise_draws)

    def noise(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
        """The fixed noise ``[M, *shape]`` for examples of ``shape`` (``[C, H, W]``)."""
        key = (tuple(shape), dtype, str(device))
        cache = self.__dict__.setdefault("_noise_cache", {})
        if key not in cache:
            m = len(self.plan())
            # NumPy's generator, not torch.randn: random ops are refused inside vmap, and the
            # first call may come from a vmapped update or sweep.
            draws = np.random.default_rng(self.seed).standard_normal((m, *shape), dtype=np.float32)
            cache[key] = torch.from_numpy(draws).to(device=device, dtype=dtype)
        return cache[key]

    def _alphas_cumprod(self) -> Tensor:
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise ValueError(f"DiffusionTask: the scheduler {type(self.scheduler).__name__} has no alphas_cumprod "
                             "(use a DDPM-family scheduler such as DDPMScheduler, DDIMScheduler or PNDMScheduler)")
        return torch.as_tensor(alphas, dtype=torch.float64).cpu()

    def _prediction_type(self) -> str:
        config = getattr(self.scheduler, "config", None)
        kind = getattr(config, "prediction_type", None) or "epsilon"
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"DiffusionTask: prediction_type={kind!r} is not supported; expected one of {PREDICTION_TYPES}")
        return kind

    def _score_average(self) -> str:
        if self.score_average not in SCORE_AVERAGES:
            raise ValueError(f"DiffusionTask: score_average={self.score_average!r}; expected one of {SCORE_AVERAGES}")
        return self.score_average

    # -- the loss ----------------------------------------------------------------------------
    def images(self, batch: Any) -> Tensor:
        """The images (or latents) ``[B, C, H, W]`` of a batch."""
        if torch.is_tensor(batch):
            return batch
        if isinstance(batch, Mapping):
            if self.input_key not in batch:
                raise ValueError(f"DiffusionTask: dict batch has no key {self.input_key!r} (keys: {sorted(batch)}); set input_key")
            return batch[self.input_key]
        return batch[0]

    def _condition(self, batch: Any, m: int) -> dict[str, Any]:
        out = {}
        for name, where in (self.condition or {}).items():
            value = batch[where]
            # Each example is evaluated at M (t, ε) pairs, laid out example-major.
            out[name] = value.repeat_interleave(m, dim=0) if torch.is_tensor(value) else value
        return out

    def pair_losses(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """``[B, M]`` denoising losses, one per fixed ``(t_j, ε_j)`` pair (mean over pixels)."""
        x = self.images(batch)
        b, shape = x.shape[0], tuple(x.shape[1:])
        ts = self.plan().to(x.device)
        m = len(ts)
        alphas = self._alphas_cumprod()[ts.cpu()]
        view = (1, m) + (1,) * len(shape)
        a = alphas.sqrt().to(x.device, x.dtype).view(view)
        s = (1 - alphas).sqrt().to(x.device, x.dtype).view(view)
        eps = self.noise(shape, x.dtype, x.device).unsqueeze(0)  # [1, M, C, H, W]
        x0 = x.unsqueeze(1)  # [B, 1, C, H, W]
        noisy = (a * x0 + s * eps).reshape(b * m, *shape)
        out = model(noisy, ts.repeat(b), **self._condition(batch, m))
        pred = _sample(out).reshape(b, m, -1)
        kind = self._prediction_type()
        if kind == "epsilon":
            target = eps.expand(b, m, *shape)
        elif kind == "sample":
            target = x0.expand(b, m, *shape)
        else:
            target = a * eps - s * x0
        return (pred - target.reshape(b, m, -1)).pow(2).mean(-1)

    def loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """``[B]`` denoising losses averaged over the fixed ``(t_j, ε_j)`` pairs."""
        return self.pair_losses(model, batch).mean(-1)

    def score_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """``[B]`` log denoising losses: Forward-INF's ``"margin"``/``"cosine"`` scores see relative changes.

        ``score_average="arithmetic"`` (default): ``log(1/M Σ_j L_ij)`` = ``log`` of :meth:`loss`.
        ``"geometric"``: ``1/M Σ_j log L_ij``, the log of the geometric mean over the
        ``(t_j, ε_j)`` pairs. Denoising losses span orders of magnitude, between examples
        (memorised images have tiny ones) and between timesteps (ε-prediction: ~0.5 at t=10 of
        1000, ~0.02 at t=400): a raw change is dominated by the large losses; the change of the
        log of the arithmetic mean over timesteps is ``Σ_j w_j ΔL_ij / L_ij`` with weights
        ``w_j ∝ L_ij``, i.e. mostly the lowest timesteps; the geometric mean weighs them equally.
        Both have the gradient direction of :meth:`loss` for one timestep; for several the
        geometric mean weighs pair ``j`` by ``1/L_ij`` instead of 1.
        """
        if self._score_average() == "arithmetic":
            return self.loss(model, batch).log()
        return self.pair_losses(model, batch).log().mean(-1)

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        x = self.images(batch)
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor [B, C, H, W], got {getattr(x, 'dtype', type(x))}")
        if x.ndim < 2:
            raise ValueError(f"images must have a batch dimension and at least one more, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        ts = self.plan()
        self._prediction_type()
        self._score_average()
        for name, where in (self.condition or {}).items():
            try:
                value = batch[where]
            except (KeyError, IndexError, TypeError) as e:
                raise ValueError(f"condition {name!r}: the batch has no element {where!r}") from e
            if torch.is_tensor(value) and value.shape[:1] != x.shape[:1]:
                raise ValueError(f"condition {name!r} has {value.shape[0]} rows for {x.shape[0]} images")
        one = _index(batch, 0)
        with torch.no_grad():
            out = _sample(model(self.images(one), ts[:1].to(x.device), **self._condition(one, 1)))
        if tuple(out.shape) != (1, *x.shape[1:]):
            raise ValueError(f"model output has shape {tuple(out.shape)}; expected the input's shape {(1, *x.shape[1:])}")


def _sample(out: Any) -> Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _index(batch: Any, i: int) -> Any:
    """Example ``i`` of a batch, keeping a batch dim of 1."""
    if torch.is_tensor(batch):
        return batch[i:i + 1]
    if isinstance(batch, Mapping):
        return {k: _index(v, i) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(v, i) for v in batch)
    return batch
