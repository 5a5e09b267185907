"""A nearest-neighbour index over the training set (FAISS), on disk beside a score store.

It holds one vector per training point (for Forward-INF: a sketch of the point's gradient, see
:mod:`forwardinf.estimators.shortlist`) and answers "which K training points are most similar
to this query vector" by inner product. Layout of an index folder::

    manifest.json              what the vectors were made from (the score store's manifest rules)
    vectors/s000000.npy        vectors of training shard s, float32 [Ns, d]
    index.faiss                the FAISS index over all vectors (written last)

Building is resumable: each shard's vectors appear only once complete (temporary name, rename),
so an interrupted build recomputes only the missing shards; ``index.faiss`` is written the same
way once every shard exists. A folder made from another model, training set or configuration is
refused (:class:`~forwardinf.storage.manifest.StoreMismatchError`) unless ``overwrite``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from forwardinf.io import atomic_path
from forwardinf.storage.manifest import StoreMismatchError, check_manifest, start_folder

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in the "index" extra
        raise ImportError("the shortlist index needs FAISS: pip install 'forwardinf[index]' (faiss-cpu)") from e
    return faiss


class ShortlistIndex:
    """Inner-product nearest neighbours over ``n`` training vectors ``[n, d]`` (FAISS).

    Make one with :meth:`build` (in memory with ``path=None``, else in a folder: new, resumed or
    reused). ``factory`` is a FAISS ``index_factory`` string: ``"Flat"`` (exact, default),
    ``"HNSW32"`` (graph, approximate), ``"IVF256,Flat"`` (clustered, approximate; trained on the
    vectors), ...
    """

    def __init__(self, index: Any, manifest: Mapping[str, Any], path: Path | None = None) -> None:
        self.index = index
        self.manifest = dict(manifest)
        self.path = path

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, vectors: Callable[[int, int], Tensor | np.ndarray], manifest: Mapping[str, Any], *,
              path: str | os.PathLike | None = None, shard_size: int = 65536, factory: str = "Flat",
              overwrite: bool = False) -> "ShortlistIndex":
        """The index of ``vectors(start, stop) -> [stop - start, d]`` over ``manifest["n_train"]`` points.

        With ``path``, shards of ``shard_size`` vectors are written as they are computed and
        ``vectors`` is called only for the shards not yet on disk; a complete folder is just
        loaded. ``manifest`` (:func:`~forwardinf.storage.manifest.make_manifest`) must match the
        folder's, else :class:`StoreMismatchError` (or, with ``overwrite``, the folder is cleared).
        """
        n = manifest.get("n_train")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"ShortlistIndex: invalid n_train={n!r}; expected a positive integer")
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"ShortlistIndex: invalid shard_size={shard_size!r}; expected a positive integer")
        manifest = {**manifest, "shard_size": shard_size, "factory": factory}
        if path is None:
            parts = [np.asarray(vectors(s, min(s + shard_size, n)), dtype=np.float32) for s in range(0, n, shard_size)]
            return cls(_make_index(np.concatenate(parts), factory, n), manifest)
        path = Path(path)
        _open_folder(path, manifest, overwrite)
        if (path / INDEX_FILE).is_file():
            return cls(_faiss().read_index(str(path / INDEX_FILE)), manifest, path)
        for s in range(math.ceil(n / shard_size)):
            shard = path / "vectors" / f"s{s:06d}.npy"
            if shard.is_file():
                continue  # written by an earlier, interrupted build
            block = np.ascontiguousarray(vectors(s * shard_size, min((s + 1) * shard_size, n)), dtype=np.float32)
            with atomic_path(shard, fsync=True) as tmp, open(tmp, "wb") as f:
                np.save(f, block)
        data = np.concatenate([np.load(path / "vectors" / f"s{s:06d}.npy") for s in range(math.ceil(n / shard_size))])
        index = _make_index(data, factory, n)
        with atomic_path(path / INDEX_FILE, fsync=True) as tmp:
            _faiss().write_index(index, str(tmp))
        return cls(index, manifest, path)

    def search(self, queries: Tensor | np.ndarray, k: int) -> Tensor:
        """``[Q, k']`` training positions with the largest inner products with ``queries [Q, d]``,
        best first; ``k' = min(k, n)``. Approximate factories may return fewer: those slots are -1."""
        q = np.ascontiguousarray(queries.detach().cpu().numpy() if torch.is_tensor(queries) else queries,
                                 dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"ShortlistIndex: queries must be [Q, {self.dim}], got {tuple(q.shape)}")
        _, ids = self.index.search(q, min(int(k), self.n))
        return torch.from_numpy(ids).long()

    def __repr__(self) -> str:
        return f"ShortlistIndex(n={self.n}, dim={self.dim}, factory={self.manifest['factory']!r}, path={self.path})"


def _open_folder(path: Path, manifest: Mapping[str, Any], overwrite: bool) -> None:
    """Make ``path`` an index folder for ``manifest``: new, matching, or (``overwrite``) cleared."""
    if (path / MANIFEST).is_file():
        saved = json.loads((path / MANIFEST).read_text())
        try:
            check_manifest(saved, manifest, str(path), what="shortlist index")
            if saved.get("factory") != manifest["factory"]:
                raise StoreMismatchError(f"the shortlist index at {path} was built with factory {saved.get('factory')!r}, "
                                         f"this run asks for {manifest['factory']!r}; use another folder or overwrite=True")
            return
        except StoreMismatchError:
            if not overwrite:
                raise
    start_folder(path, manifest, "vectors", "shortlist index", overwrite)


def _make_index(data: np.ndarray, factory: str, n: int) -> Any:
    faiss = _faiss()
    if data.ndim != 2 or data.shape[0] != n:
        raise ValueError(f"ShortlistIndex: expected vectors [{n}, d], got {tuple(data.shape)}")
    if not np.isfinite(data).all():
        raise ValueError("ShortlistIndex: non-finite training vectors")
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(data)
    index.add(data)
    return index
