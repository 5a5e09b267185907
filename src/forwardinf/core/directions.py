"""Gaussian direction tensors drawn in pieces, so that a large one never exists whole.

``torch.randn((m, *shape), generator=g)`` on CPU draws one uniform per value in memory order
and turns them into normals 16 at a time (a draw whose size is not a multiple of 16 redraws its
last 16). So drawing the same ``m * prod(shape)`` values as consecutive pieces of a multiple of
16 values each (the last one at least 16) gives the very same numbers: :func:`gaussian_pieces`
yields them piece by piece, :func:`gaussian` assembles the whole tensor from the same pieces
(so the two agree by construction whatever the generator does).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

PIECE = 2**20  # values per draw (4 MiB in float32): a multiple of 16


def gaussian_pieces(gen: torch.Generator, m: int, shape: tuple[int, ...],
                    piece: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """``(j, start, values [k])``: ``values`` are entries ``start .. start + k`` of direction ``j``
    (flattened) of ``torch.randn((m, *shape), generator=gen)``, in memory order, float32 on CPU,
    drawn ``piece`` values at a time (None: :data:`PIECE`)."""
    piece = PIECE if piece is None else piece
    if piece % 16:
        raise ValueError(f"piece={piece} must be a multiple of 16")
    numel = math.prod(shape)
    total, start = m * numel, 0
    while start < total:
        stop = min(start + piece, total)
        if total - stop < 16:  # a last draw under 16 values would come from another algorithm
            stop = total
        values, at = torch.randn(stop - start, generator=gen), start
        while at < stop:  # split at direction boundaries
            j, offset = divmod(at, numel)
            k = min(numel - offset, stop - at)
            yield j, offset, values[at - start:at - start + k]
            at += k
        start = stop


def gaussian(gen: torch.Generator, m: int, shape: tuple[int, ...], piece: int | None = None) -> Tensor:
    """``[m, *shape]``: the values of :func:`gaussian_pieces`, assembled."""
    out = torch.empty(m, math.prod(shape))
    for j, start, values in gaussian_pieces(gen, m, shape, piece):
        out[j, start:start + len(values)] = values
    return out.view(m, *shape)
