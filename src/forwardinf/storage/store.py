"""A score matrix ``[n_query, n_train]`` on disk, as memory-mapped blocks.

Layout of a store folder::

    manifest.json                 what the scores were made from (see storage/manifest.py)
    blocks/q000000-s000000.npy    scores of query block qb x training shard s, float32 [Qb, Ns]

Query block ``qb`` holds queries ``[qb * query_block, (qb + 1) * query_block)``; training shard
``s`` holds training examples ``[s * shard_size, (s + 1) * shard_size)`` (the last ones shorter).
A block file appears only once it is complete (written to a temporary name, flushed, renamed),
so a run killed at any moment leaves only whole blocks, and the next run computes just the
missing ones. Different processes may write different blocks of the same store at once.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from forwardinf.io import atomic_path
from forwardinf.storage.manifest import StoreMismatchError, check_manifest, start_folder
from forwardinf.storage.topk import RunningTopK, TopK, concat_topk

MANIFEST = "manifest.json"


class ScoreStore:
    """Scores of ``n_query`` queries against ``n_train`` training points, block by block.

    Open one with :meth:`create` (new or matching folder) or :meth:`open` (existing folder).
    Blocks are ``np.memmap`` views when read, so nothing is loaded until it is used.
    """

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = dict(manifest)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> "ScoreStore":
        """A store at ``path`` for ``manifest``: a new one, or the existing one if it matches.

        An existing store made from anything else raises :class:`StoreMismatchError`, unless
        ``overwrite`` (then it is deleted first).
        """
        path = Path(path)
        _check_layout(manifest)
        if (path / MANIFEST).is_file() and not overwrite:
            return cls.open(path, manifest)
        start_folder(path, manifest, "blocks", "score store", overwrite)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> "ScoreStore":
        """The store at ``path``; with ``expected``, refuse it unless its manifest matches."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path} is not a score store (no {MANIFEST})")
        try:
            saved = json.loads((path / MANIFEST).read_text())
        except ValueError as e:
            raise StoreMismatchError(f"{path / MANIFEST} is not valid JSON ({e}); delete the store or use "
                                     "--overwrite") from None
        if expected is not None:
            check_manifest(saved, expected, str(path))
        _check_layout(saved, path / MANIFEST)
        return cls(path, saved)

    # -- layout -------------------------------------------------------------------------------
    @property
    def n_query(self) -> int:
        return int(self.manifest["n_query"])

    @property
    def n_train(self) -> int:
        return int(self.manifest["n_train"])

    @property
    def query_block(self) -> int:
        return int(self.manifest["query_block"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def n_query_blocks(self) -> int:
        return math.ceil(self.n_query / self.query_block)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_train / self.shard_size)

    def query_range(self, qb: int) -> tuple[int, int]:
        return qb * self.query_block, min((qb + 1) * self.query_block, self.n_query)

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.n_train)

    def block_path(self, qb: int, s: int) -> Path:
        return self.path / "blocks" / f"q{qb:06d}-s{s:06d}.npy"

    # -- blocks -------------------------------------------------------------------------------
    def has(self, qb: int, s: int) -> bool:
        return self.block_path(qb, s).is_file()

    def missing(self, shards: Iterator[int] | None = None) -> list[tuple[int, int]]:
        """``(qb, s)`` of the blocks not yet written (of ``shards`` only, if given), shard-major."""
        shards = range(self.n_shards) if shards is None else shards
        return [(qb, s) for s in shards for qb in range(self.n_query_blocks) if not self.has(qb, s)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary block files of writers that no longer run (a run killed while
        writing leaves one, ``blocks/.q...npy.<pid>-<hex>.tmp``); return what was deleted.

        A temporary file of a live process on this machine is left alone (it may be a concurrent
        writer). Processes on other machines sharing the folder cannot be told apart by pid: call
        this only when no other machine writes (``score_to_store`` does once the store is complete).
        """
        removed = []
        for tmp in (self.path / "blocks").glob(".*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2].split("-")[0]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed

    def write(self, qb: int, s: int, scores: Tensor | np.ndarray) -> Path:
        """Store block ``(qb, s)``: scores ``[Qb, Ns]`` of that query block and training shard."""
        q0, q1 = self.query_range(qb)
        t0, t1 = self.shard_range(s)
        arr = np.ascontiguousarray(scores.detach().cpu().numpy() if torch.is_tensor(scores) else scores,
                                   dtype=np.float32)
        if arr.shape != (q1 - q0, t1 - t0):
            raise ValueError(f"block ({qb}, {s}) must have shape {(q1 - q0, t1 - t0)}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"block ({qb}, {s}) contains non-finite scores")
        final = self.block_path(qb, s)
        with atomic_path(final, fsync=True) as tmp:  # a block is either absent or whole
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, arr)
        return final

    def read(self, qb: int, s: int) -> np.ndarray:
        """Block ``(qb, s)`` as a read-only memory map ``[Qb, Ns]``."""
        path = self.block_path(qb, s)
        if not path.is_file():
            raise FileNotFoundError(f"block ({qb}, {s}) of {self.path} has not been computed yet")
        try:
            block = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable score block ({e}); delete it and run the scoring "
                             "again to recompute it") from None
        (q0, q1), (t0, t1) = self.query_range(qb), self.shard_range(s)
        if block.shape != (q1 - q0, t1 - t0) or block.dtype != np.float32:
            raise ValueError(f"{path} holds {block.dtype} {block.shape}, but the manifest's layout (query_block "
                             f"{self.query_block}, shard_size {self.shard_size}) makes block ({qb}, {s}) float32 "
                             f"{(q1 - q0, t1 - t0)}: the manifest or the block was altered; delete the store and "
                             "score again")
        return block

    # -- reading results ------------------------------------------------------------------------
    def _check_complete(self) -> None:
        missing = self.missing()
        if missing:
            raise ValueError(f"the score store at {self.path} is incomplete: {len(missing)} of "
                             f"{self.n_query_blocks * self.n_shards} blocks missing (e.g. {missing[0]}); "
                             "run the scoring again to finish it")

    def top_k(self, k: int = 10, *, opponents: bool = False) -> TopK:
        """``TopK``: per query the ``k`` highest scores (proponents) best first, and the ``k``
        lowest (``opponents``) lowest first; ties to the lower index either way. With
        ``opponents=True`` the two swap places (``indices``/``scores`` are the lowest).

        Streams over blocks: memory is one query block's ``[Qb, k + shard_size]``.
        """
        self._check_complete()
        parts = []
        for qb in range(self.n_query_blocks):
            q0, q1 = self.query_range(qb)
            top = RunningTopK(q1 - q0, k)
            for s in range(self.n_shards):
                top.update(torch.from_numpy(np.array(self.read(qb, s))), self.shard_range(s)[0])
            parts.append(top.result())
        top = concat_topk(parts)
        return TopK(top.opponents, top.opponent_scores, top.indices, top.scores) if opponents else top

    def rows(self, start: int, stop: int) -> Tensor:
        """Scores ``[stop - start, n_train]`` of queries ``start..stop-1`` (the full width in memory)."""
        self._check_complete()
        out = torch.empty(stop - start, self.n_train)
        for qb in range(start // self.query_block, math.ceil(stop / self.query_block)):
            q0, q1 = self.query_range(qb)
            a, b = max(q0, start), min(q1, stop)
            for s in range(self.n_shards):
                t0, t1 = self.shard_range(s)
                out[a - start:b - start, t0:t1] = torch.from_numpy(np.array(self.read(qb, s)[a - q0:b - q0]))
        return out

    def to_tensor(self) -> Tensor:
        """The whole matrix ``[n_query, n_train]`` in memory (small stores only)."""
        return self.rows(0, self.n_query)

    def __repr__(self) -> str:
        done = self.n_query_blocks * self.n_shards - len(self.missing())
        return (f"ScoreStore({str(self.path)!r}, n_query={self.n_query}, n_train={self.n_train}, "
                f"blocks={done}/{self.n_query_blocks * self.n_shards})")


def _check_layout(manifest: Mapping[str, Any], where: Any = None) -> None:
    for key in ("n_query", "n_train", "query_block", "shard_size"):
        v = manifest.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where or 'ScoreStore'}: invalid {key}={v!r}; expected a positive integer")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
