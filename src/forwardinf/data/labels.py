"""Label noise for the mislabel experiment: exactly a given fraction of labels flipped to other classes."""
from __future__ import annotations

import torch
from torch import Tensor


def flip_labels(y: Tensor, fraction: float, n_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip exactly ``round(fraction * N)`` labels of ``y`` ``[N]`` to uniformly random *other* classes.

    Returns ``(noisy [N] int64, flipped [N] bool)``; ``y`` is not modified. The positions and the
    new classes depend only on ``seed``, ``N``, ``fraction`` and ``n_classes``.
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"y must be a 1-D integer label tensor, got shape {tuple(y.shape)} dtype {y.dtype}")
    if not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2 (a label needs another class to flip to), got {n_classes!r}")
    y = y.long()
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{int(y.min())}, {int(y.max())}]")
    n = len(y)
    n_flip = int(round(float(fraction) * n))
    g = torch.Generator().manual_seed(seed)
    positions = torch.randperm(n, generator=g)[:n_flip]
    # An offset in 1..C-1 modulo C is uniform over the C-1 other classes and never the same one.
    offsets = torch.randint(1, n_classes, (n_flip,), generator=g)
    noisy = y.clone()
    noisy[positions] = (y[positions] + offsets) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[positions] = True
    return noisy, flipped
