"""Near-duplicate images for the harder leakage test: a training image, slightly altered, as a query.

:func:`near_duplicates` maps ``[N, C, H, W]`` images to altered copies of the same shape and dtype,
reproducibly for a given ``seed``. It works in whatever space the images are in (normalised or
[0, 1]): every strength is relative to the image itself (pixels, fraction of the side, fraction of
the image's own standard deviation or range), so no normalisation constants are needed.

Kinds and their ``strength`` (``None`` = the default in brackets):

- ``"shift"``: translate by a random non-zero integer offset in ``[-s, s]^2`` pixels, edges
  replicated [``s = max(1, round(H / 16))``: 1 px on 8x8 digits, 2 px on 28x28 / 32x32].
- ``"flip"``: mirror left-right (no strength). Not label-preserving for digits and letters (a
  mirrored 2 or 7 is not a digit), so :func:`flip_is_sensible` says no for digits / MNIST and the
  ``"mix"`` kind leaves flips out unless ``allow_flip=True``.
- ``"crop"``: keep a random window of ``strength`` times the side and resize it back (bilinear)
  [0.85; on 8x8 a 7x7 window].
- ``"noise"``: add Gaussian noise with standard deviation ``strength`` times the image's own
  standard deviation [0.1].
- ``"jpeg"``: JPEG-like lossy compression: each channel, rescaled to 0..255 by its own range, is
  cut into 8x8 blocks (edge-padded), transformed by the orthonormal 2-D DCT-II, divided by the
  standard JPEG luminance quantisation table times ``strength`` and rounded, then transformed
  back [1.0, about JPEG quality 50; larger = coarser].
- ``"mix"``: each image gets one kind drawn at random (see :func:`assign_kinds`) from the above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("shift", "flip", "crop", "noise", "jpeg")
ALL_KINDS = ("mix",) + KINDS
_NO_FLIP_DATASETS = ("digits", "mnist")

# Annex K of the JPEG standard (ITU-T T.81): luminance quantisation table for quality 50.
_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=torch.float64)


def flip_is_sensible(dataset: str) -> bool:
    """Whether a horizontal flip keeps images of ``dataset`` plausible and their label intact.

    False for handwritten digits (``digits``, ``mnist``); True for natural images and clothes.
    """
    return dataset.lower() not in _NO_FLIP_DATASETS


def assign_kinds(n: int, seed: int = 0, allow_flip: bool = False) -> list[str]:
    """The kind each of ``n`` images gets under ``kind="mix"`` (deterministic given ``seed``)."""
    pool = [k for k in KINDS if allow_flip or k != "flip"]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool), (n,), generator=g)
    return [pool[int(i)] for i in picks]


def near_duplicates(x: Tensor, kind: str = "mix", seed: int = 0, strength: float | None = None,
                    allow_flip: bool = False) -> Tensor:
    """Altered copies of images ``x`` ``[N, C, H, W]`` -> ``[N, C, H, W]`` (same dtype and device).

    ``kind`` is one of ``"mix"``, ``"shift"``, ``"flip"``, ``"crop"``, ``"noise"``, ``"jpeg"`` (see
    the module doc for each ``strength``); ``seed`` makes the result reproducible; ``allow_flip``
    lets ``"mix"`` use flips (leave it False for digits). ``x`` is not modified.
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
    if kind == "crop":
        return _crop(x, g, 0.85 if strength is None else strength)
    if kind == "noise":
        return _noise(x, g, 0.1 if strength is None else strength)
    return _jpeg(x, 1.0 if strength is None else strength)


def _shift(x: Tensor, g: torch.Generator, strength: float | None) -> Tensor:
    n, _, h, w = x.shape
    s = max(1, round(h / 16)) if strength is None else max(1, int(round(strength)))
    s = min(s, h - 1, w - 1) if min(h, w) > 1 else 0
    if s == 0:
        raise ValueError(f"images of size {h}x{w} are too small to shift")
    # Draw non-zero offsets: (0, 0) would be an exact duplicate, not a near one.
    side = 2 * s + 1
    code = torch.randint(side * side - 1, (n,), generator=g)
    code = code + (code >= (side * side) // 2).long()  # skip the centre (0, 0)
    dy, dx = (code // side - s).tolist(), (code % side - s).tolist()
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, s - dy[i]: s - dy[i] + h, s - dx[i]: s - dx[i] + w]
    return out


def _crop(x: Tensor, g: torch.Generator, keep: float) -> Tensor:
    if keep >= 1:
        raise ValueError(f"crop strength is the fraction of the side kept and must be in (0, 1), got {keep}")
    n, _, h, w = x.shape
    # At least one pixel removed, otherwise "crop" would return the input unchanged.
    ch, cw = min(h - 1, max(1, round(keep * h))), min(w - 1, max(1, round(keep * w)))
    ys = torch.randint(h - ch + 1, (n,), generator=g).tolist()
    xs = torch.randint(w - cw + 1, (n,), generator=g).tolist()
    out = torch.empty_like(x)
    for i in range(n):
        win = x[i: i + 1, :, ys[i]: ys[i] + ch, xs[i]: xs[i] + cw]
        out[i] = F.interpolate(win, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out


def _noise(x: Tensor, g: torch.Generator, strength: float) -> Tensor:
    std = x.flatten(1).std(dim=1).clamp_min(1e-8).reshape(-1, 1, 1, 1)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return x + strength * std * eps


def _dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix ``D`` [n, n]: coefficients = D @ block @ D.T."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _jpeg(x: Tensor, strength: float) -> Tensor:
    n, c, h, w = x.shape
    xd = x.detach().to(torch.float64).cpu()
    lo = xd.amin(dim=(2, 3), keepdim=True)
    hi = xd.amax(dim=(2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-12)
    v = (xd - lo) / span * 255.0 - 128.0  # JPEG's level shift on an 8-bit scale
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
    hh, ww = v.shape[-2:]
    # [N, C, HB, 8, WB, 8] -> blocks [N, C, HB, WB, 8, 8]
    blocks = v.reshape(n, c, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)
    d = _dct_matrix(8)
    q = (_JPEG_LUMA * strength).clamp_min(1.0)
    coef = d @ blocks @ d.T
    coef = torch.round(coef / q) * q
    rec = d.T @ coef @ d
    rec = rec.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww)[..., :h, :w]
    rec = (rec + 128.0).clamp(0, 255) / 255.0 * span + lo
    return rec.to(device=x.device, dtype=x.dtype)
