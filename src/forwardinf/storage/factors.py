"""Per-training-point rows ``[n, F]`` (float32), computed once, kept in shards on disk or in memory.

The shortlist's head-gradient re-ranker (:mod:`forwardinf.estimators.head_grad`) stores each
training point's gradient factors here, in the index folder (``factors/s000000.npy`` ...). A
shard is computed in blocks straight into a temporary ``.npy`` file and renamed once complete, so
an interrupted build keeps the finished shards and computes only the missing ones; the folder's
``manifest.json`` (written and checked by :class:`~forwardinf.storage.index.ShortlistIndex`)
decides whether the shards on disk belong to this model, data and configuration. Reading maps
the files (``mmap``): only the rows a query needs are read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from forwardinf.io import atomic_path

BLOCK = 4096  # points computed at once while filling a shard (bounds the memory of the build)


class FactorStore:
    """Rows ``compute(start, stop) -> [stop - start, F]`` of ``n`` points, shard by shard.

    Args:
        compute: the rows of points ``start..stop`` (called in blocks of at most ``BLOCK``).
        n: number of points.
        shard_size: points per shard (the unit of resuming).
        folder: where the shards live; None keeps them in memory.
    """

    def __init__(self, compute: Callable[[int, int], Tensor], n: int, shard_size: int, folder: Path | None = None):
        self.compute, self.n, self.shard_size, self.folder = compute, n, shard_size, folder
        self._shards: dict[int, np.ndarray] = {}

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def shard(self, s: int) -> np.ndarray:
        """``[Ns, F]`` rows of shard ``s``: loaded (memory-mapped), else computed (and written)."""
        if s in self._shards:
            return self._shards[s]
        a, b = s * self.shard_size, min((s + 1) * self.shard_size, self.n)
        if self.folder is None:
            rows = np.concatenate([self._block(i, min(i + BLOCK, b)) for i in range(a, b, BLOCK)])
        else:
            path = self.folder / f"s{s:06d}.npy"
            if not path.is_file():
                self._write(path, a, b)
            rows = np.load(path, mmap_mode="r")
            if rows.shape[0] != b - a:
                raise ValueError(f"FactorStore: {path} holds {rows.shape[0]} rows, expected {b - a}")
        self._shards[s] = rows
        return rows

    def _block(self, a: int, b: int) -> np.ndarray:
        return np.ascontiguousarray(torch.as_tensor(self.compute(a, b)).float().numpy())

    def _write(self, path: Path, a: int, b: int) -> None:
        """Shard ``a..b`` into ``path``, block by block into a temporary file, renamed once complete."""
        first = self._block(a, min(a + BLOCK, b))
        path.parent.mkdir(exist_ok=True)  # only now: the index has opened (checked or started) the folder
        with atomic_path(path, fsync=True) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(b - a, first.shape[1]))
            out[:len(first)] = first
            for i in range(a + BLOCK, b, BLOCK):
                out[i - a:min(i + BLOCK, b) - a] = self._block(i, min(i + BLOCK, b))
            out.flush()
            del out

    def complete(self) -> "FactorStore":
        """Every shard at hand (computed where missing)."""
        for s in range(self.n_shards):
            self.shard(s)
        return self

    def rows(self, idx: Tensor) -> Tensor:
        """``[len(idx), F]`` rows of points ``idx [r]`` (any order)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        shard = idx // self.shard_size
        first = self.shard(int(shard[0])) if len(idx) else self.shard(0)
        out = torch.empty(len(idx), first.shape[1])
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)
            local = (idx[at] - s * self.shard_size).numpy()
            out[at] = torch.from_numpy(np.asarray(self.shard(s)[local]))
        return out
