"""Near-duplicate images for the harder leakage test, and the augmentations models train with.

:func:`near_duplicates` maps ``[N, C, H, W]`` images to altered copies of the same shape and dtype,
reproducibly for a given ``seed``, with the labels unchanged (the caller keeps them). It works in
whatever space the images are in (normalised or [0, 1]): every strength is relative to the image
itself (pixels, fraction of the side, fraction of the image's own standard deviation or range), so
no normalisation constants are needed. Every output pixel stays inside its source channel's own
[min, max] range (the clamp stands in for clipping to [0, 1] in pixel space).

Kinds and their ``strength`` (``None`` = the default in brackets):

- ``"shift"``: translate by a random non-zero integer offset in ``[-s, s]^2`` pixels, edges
  replicated [``s = max(1, round(H / 16))``: 1 px on 8x8 digits, 2 px on 28x28 / 32x32].
- ``"flip"``: mirror left-right (no strength). Not label-preserving for digits and letters (a
  mirrored 2 or 7 is not a digit), so :func:`flip_is_sensible` says no for digits / MNIST and the
  ``"mix"`` kind leaves flips out unless ``allow_flip=True``.
- ``"shift+flip"``: a ``"shift"`` then a flip (the strength is the shift's).
- ``"crop"``: crop+resize: keep a random window of ``strength`` times the side and resize it back
  (bilinear) [0.85; on 8x8 a 7x7 window].
- ``"noise"``: add Gaussian noise with standard deviation ``strength`` times the image's own
  standard deviation [0.1].
- ``"jpeg"``: a real JPEG round trip through Pillow at quality ``strength`` (1-95, lower = coarser)
  [75, Pillow's default]: each channel is mapped to 0..255 by its own range and rounded to 8 bits,
  the image encoded as greyscale (1 channel) or RGB (3 channels: YCbCr with 4:2:0 chroma
  subsampling, as real files are) JPEG, decoded, and mapped back.
- ``"jitter"``: colour jitter: brightness (add ``b`` times the image's std), contrast (scale about
  the image mean by ``c``) and, on 3-channel images, saturation (scale about the per-pixel channel
  mean by ``s``), with ``b ~ U[-strength, strength]`` and ``c, s ~ U[1 - strength, 1 + strength]``
  per image [0.2].
- ``"mix"``: each image gets one kind drawn at random (see :func:`assign_kinds`) from the above.

Training augmentation (:func:`crop_flip`, ``train_classifier(augment="crop+flip")``): the standard
CIFAR recipe, a random crop of the zero-padded image (``pad`` pixels each side) and a random
horizontal flip. :func:`views` gives the deterministic set of shifted / flipped copies of a query
that augmentation-invariant Forward-INF averages over.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("shift", "flip", "shift+flip", "crop", "noise", "jpeg", "jitter")
ALL_KINDS = ("mix",) + KINDS
FLIP_KINDS = ("flip", "shift+flip")
_NO_FLIP_DATASETS = ("digits", "mnist")


def flip_is_sensible(dataset: str) -> bool:
    """Whether a horizontal flip keeps images of ``dataset`` plausible and their label intact.

    False for handwritten digits (``digits``, ``mnist``); True for natural images and clothes.
    """
    return dataset.lower() not in _NO_FLIP_DATASETS


def assign_kinds(n: int, seed: int = 0, allow_flip: bool = False) -> list[str]:
    """The kind each of ``n`` images gets under ``kind="mix"`` (deterministic given ``seed``)."""
    pool = [k for k in KINDS if allow_flip or k not in FLIP_KINDS]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (n,), generator=g)
    return [pool[int(i)] for i in picks]


def near_duplicates(x: Tensor, kind: str = "mix", seed: int = 0, strength: float | None = None,
                    allow_flip: bool = False) -> Tensor:
    """Altered copies of images ``x`` ``[N, C, H, W]`` -> ``[N, C, H, W]`` (same dtype and device).

    ``kind`` is one of :data:`ALL_KINDS` (see the module doc for each ``strength``); ``seed``
    makes the result reproducible; ``allow_flip`` lets ``"mix"`` use flips (leave it False for
    digits). ``x`` is not modified.
    """
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"x must be a tensor of images [N, C, H, W], got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if kind not in ALL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ALL_KINDS)}; got {kind!r}")
    if strength is not None and not (isinstance(strength, (int, float)) and strength > 0):
        raise ValueError(f"strength must be a positive number, got {strength!r}")
    if kind == "flip" and strength is not None:
        raise ValueError("kind='flip' takes no strength")
    if x.shape[0] == 0:
        return x.clone()
    if kind == "mix":
        kinds = assign_kinds(x.shape[0], seed, allow_flip)
        out = torch.empty_like(x)
        for j, k in enumerate(KINDS):
            rows = [i for i, kk in enumerate(kinds) if kk == k]
            if rows:
                idx = torch.tensor(rows, device=x.device)
                # A distinct sub-seed per kind keeps each kind's draws independent of the others.
                out[idx] = _apply(x[idx], k, seed * 7919 + j + 1, None if k == "flip" else strength)
        return out
    return _apply(x, kind, seed, strength)


def _apply(x: Tensor, kind: str, seed: int, strength: float | None) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "shift":
        return _shift(x, g, strength)
    if kind == "flip":
        return x.flip(-1)
    if kind == "shift+flip":
        return _shift(x, g, strength).flip(-1)
    if kind == "crop":
        return _crop(x, g, 0.85 if strength is None else strength)
    if kind == "noise":
        return _clamp_like(x + (0.1 if strength is None else strength) * _std(x) * _randn(x, g), x)
    if kind == "jpeg":
        return _jpeg(x, 75 if strength is None else strength)
    return _jitter(x, g, 0.2 if strength is None else strength)


def _std(x: Tensor) -> Tensor:
    """Each image's own standard deviation ``[N, 1, 1, 1]``."""
    return x.flatten(1).std(dim=1).clamp_min(1e-8).reshape(-1, 1, 1, 1)


def _randn(x: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _clamp_like(out: Tensor, x: Tensor) -> Tensor:
    """``out`` clamped to each source channel's [min, max] (pixel values stay in their range)."""
    return out.clamp(x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True))


def default_shift(height: int) -> int:
    """The ``"shift"`` kind's default largest offset: 1 px on 8x8, 2 px on 28x28 / 32x32."""
    return max(1, round(height / 16))


def _check_shift(h: int, w: int, strength: float | None) -> int:
    s = default_shift(h) if strength is None else max(1, int(round(strength)))
    s = min(s, h - 1, w - 1) if min(h, w) > 1 else 0
    if s == 0:
        raise ValueError(f"images of size {h}x{w} are too small to shift")
    return s


def _shift(x: Tensor, g: torch.Generator, strength: float | None) -> Tensor:
    n, _, h, w = x.shape
    s = _check_shift(h, w, strength)
    # Draw non-zero offsets: (0, 0) would be an exact duplicate, not a near one.
    side = 2 * s + 1
    code = torch.randint(side * side - 1, (n,), generator=g)
    code = code + (code >= (side * side) // 2).long()  # skip the centre (0, 0)
    dy, dx = (code // side - s).tolist(), (code % side - s).tolist()
    return _translate(x, dy, dx, s, "replicate")


def _translate(x: Tensor, dy: list[int], dx: list[int], s: int, pad_mode: str) -> Tensor:
    """Image ``i`` of ``x [N, C, H, W]`` moved by ``(dy[i], dx[i])`` pixels (|offsets| <= ``s``), the
    uncovered border filled by ``pad_mode`` (``"replicate"`` or ``"constant"``: zeros)."""
    _, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s), mode=pad_mode)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = padded[i, :, s - dy[i]: s - dy[i] + h, s - dx[i]: s - dx[i] + w]
    return out


def _crop(x: Tensor, g: torch.Generator, keep: float) -> Tensor:
    if keep >= 1:
        raise ValueError(f"crop strength is the fraction of the side kept and must be in (0, 1), got {keep}")
    n, _, h, w = x.shape
    if h < 2 or w < 2:  # no window smaller than the image but non-empty exists
        raise ValueError(f"crop needs images of at least 2x2 pixels (it keeps a smaller window), got {h}x{w}")
    # At least one pixel removed, otherwise "crop" would return the input unchanged.
    ch, cw = min(h - 1, max(1, round(keep * h))), min(w - 1, max(1, round(keep * w)))
    ys = torch.randint(h - ch + 1, (n,), generator=g).tolist()
    xs = torch.randint(w - cw + 1, (n,), generator=g).tolist()
    out = torch.empty_like(x)
    for i in range(n):
        win = x[i: i + 1, :, ys[i]: ys[i] + ch, xs[i]: xs[i] + cw]
        out[i] = F.interpolate(win, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out


def _jpeg(x: Tensor, quality: float) -> Tensor:
    from PIL import Image

    q = int(round(quality))
    if not 1 <= q <= 95:
        raise ValueError(f"jpeg strength is the JPEG quality and must be in 1..95, got {quality}")
    n, c, h, w = x.shape
    xd = x.detach().to(torch.float64).cpu()
    lo = xd.amin(dim=(2, 3), keepdim=True)
    span = (xd.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)
    pixels = ((xd - lo) / span * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()  # [N, C, H, W]
    out = np.empty_like(pixels)
    for i in range(n):
        # RGB images are encoded as colour JPEG (chroma subsampled); any other channel count one
        # greyscale JPEG per channel.
        planes = [pixels[i].transpose(1, 2, 0)] if c == 3 else [p for p in pixels[i]]
        decoded = []
        for plane in planes:
            buf = io.BytesIO()
            Image.fromarray(plane, mode="RGB" if plane.ndim == 3 else "L").save(buf, format="JPEG", quality=q)
            buf.seek(0)
            decoded.append(np.asarray(Image.open(buf).convert("RGB" if plane.ndim == 3 else "L")))
        out[i] = decoded[0].transpose(2, 0, 1) if c == 3 else np.stack(decoded)
    rec = torch.from_numpy(out).to(torch.float64) / 255.0 * span + lo
    return rec.to(device=x.device, dtype=x.dtype)


def _jitter(x: Tensor, g: torch.Generator, strength: float) -> Tensor:
    n, c = x.shape[:2]

    def uniform(lo: float, hi: float) -> Tensor:
        u = torch.rand((n, 1, 1, 1), generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        return lo + (hi - lo) * u

    brightness, contrast = uniform(-strength, strength), uniform(1 - strength, 1 + strength)
    saturation = uniform(1 - strength, 1 + strength)
    out = x + brightness * _std(x)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + contrast * (out - mean)
    if c == 3:
        grey = out.mean(dim=1, keepdim=True)
        out = grey + saturation * (out - grey)
    return _clamp_like(out, x)


# --------------------------------------------------------------------------- training augmentation
def crop_flip(x: Tensor, g: torch.Generator, pad: int) -> Tensor:
    """The standard CIFAR training augmentation of a batch ``x [B, C, H, W]`` -> ``[B, C, H, W]``:
    a random ``H x W`` crop of the image zero-padded by ``pad`` pixels each side (a random shift
    by up to ``pad`` pixels; zero is the data mean of normalised inputs), then a horizontal flip
    with probability 1/2. Draws come from ``g`` only (deterministic given its seed)."""
    b = x.shape[0]
    offsets = torch.randint(2 * pad + 1, (2, b), generator=g) - pad
    flips = torch.rand(b, generator=g) < 0.5
    out = _translate(x, offsets[0].tolist(), offsets[1].tolist(), pad, "constant") if pad > 0 else x.clone()
    out[flips] = out[flips].flip(-1)
    return out


def default_pad(height: int) -> int:
    """Crop padding for ``train_classifier(augment="crop+flip")``: 4 px on 32x32 (the standard
    CIFAR recipe) and 28x28, 1 px on 8x8."""
    return max(1, round(height / 8))


def views(x: Tensor, shift: int, flip: bool) -> Tensor:
    """Every translation of ``x [N, C, H, W]`` by offsets in ``[-shift, shift]^2`` (edges replicated),
    each also mirrored when ``flip``: ``[N, V, C, H, W]`` with ``V = (2 shift + 1)^2 (1 + flip)``,
    view 0 the image itself (and, with ``flip``, view ``V/2`` its mirror)."""
    n = x.shape[0]
    offsets = [(0, 0)] + [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                          if (dy, dx) != (0, 0)]
    out = [x if (dy, dx) == (0, 0) else _translate(x, [dy] * n, [dx] * n, shift, "replicate") for dy, dx in offsets]
    if flip:
        out += [v.flip(-1) for v in out]
    return torch.stack(out, 1)
