"""Streaming top-k over score blocks, and the top-k table written for users (CSV or Parquet)."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from forwardinf.io import atomic_path


@dataclass(frozen=True, eq=False)
class TopK:
    """Most influential training points per query: ``indices [Q, k]`` (positions in train) and
    ``scores [Q, k]``, highest first; ``opponents`` / ``opponent_scores`` ``[Q, k]``: the ``k``
    lowest scores (most negative influence), lowest first, when computed (else None).

    Unpacks as ``indices, scores``.
    """

    indices: Tensor
    scores: Tensor
    opponents: Tensor | None = None
    opponent_scores: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.indices, self.scores))


class StreamingTopK:
    """The ``k`` largest scores per row over column blocks seen one at a time.

    Holds ``[n_rows, k]`` values and indices, never the whole ``[n_rows, n_cols]`` matrix. Ties
    are broken towards the lower column index, so the result does not depend on the order in
    which blocks arrive (hence the same on one process or many). Values keep the blocks' floating
    dtype (float32 for integer blocks).
    """

    def __init__(self, n_rows: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"StreamingTopK: invalid k={k!r}; expected a positive integer")
        self.k = k
        self.values = torch.empty(n_rows, 0, dtype=torch.float32)
        self.indices = torch.empty(n_rows, 0, dtype=torch.long)

    def update(self, scores: Tensor | np.ndarray, offset: int) -> None:
        """Merge a block ``[n_rows, B]`` whose column ``j`` is global column ``offset + j``."""
        block = torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores)
        block = block if block.is_floating_point() else block.float()
        if block.ndim != 2 or block.shape[0] != self.values.shape[0]:
            raise ValueError(f"StreamingTopK: block of shape {tuple(block.shape)} for {self.values.shape[0]} rows")
        if torch.isnan(block).any():
            raise ValueError("StreamingTopK: NaN score in the block at column offset "
                             f"{offset + int(torch.isnan(block).nonzero()[0, 1])}")
        cols = torch.arange(offset, offset + block.shape[1]).expand(block.shape[0], -1)
        values = torch.cat([self.values.to(block.dtype), block], 1)
        indices = torch.cat([self.indices, cols], 1)
        # Sort by index, then stably by value: equal values keep the lower index first.
        by_index = indices.argsort(dim=1, stable=True)
        values, indices = values.gather(1, by_index), indices.gather(1, by_index)
        order = values.argsort(dim=1, descending=True, stable=True)[:, :self.k]
        self.values, self.indices = values.gather(1, order), indices.gather(1, order)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(indices [n_rows, k'], values [n_rows, k'])`` best first, ``k' = min(k, columns seen)``."""
        return self.indices, self.values


class RunningTopK:
    """Proponents and opponents at once: the ``k`` highest and the ``k`` lowest scores per row."""

    def __init__(self, n_rows: int, k: int) -> None:
        self.best, self.worst = StreamingTopK(n_rows, k), StreamingTopK(n_rows, k)

    def update(self, scores: Tensor | np.ndarray, offset: int) -> None:
        """Merge a block ``[n_rows, B]`` whose column ``j`` is global column ``offset + j``."""
        block = torch.as_tensor(scores)
        self.best.update(block, offset)
        self.worst.update(-block, offset)  # the k lowest are the k highest of the negation

    def result(self) -> TopK:
        (i, v), (j, w) = self.best.result(), self.worst.result()
        return TopK(i, v, j, -w)


def concat_topk(parts: Sequence[TopK]) -> TopK:
    """Row blocks of a top-k (consecutive queries) as one."""
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return TopK(cat("indices"), cat("scores"), cat("opponents"), cat("opponent_scores"))


FORMATS = ("csv", "parquet")


def write_topk(path: str | os.PathLike, indices: Tensor, scores: Tensor, *, fmt: str = "csv",
               query_ids: Sequence[Any] | None = None, train_ids: Sequence[Any] | None = None) -> Path:
    """Write the long table ``query, rank, train_index, score`` (rank 1 = most influential).

    ``indices``/``scores``: ``[Q, k]``. ``query_ids``: optional names of the queries (default
    their positions); ``train_ids``: optional names of all training points, added as a column
    ``train_id``. ``fmt="parquet"`` needs pyarrow. Written atomically.
    """
    if fmt not in FORMATS:
        raise ValueError(f"write_topk: invalid fmt={fmt!r}; expected one of {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    q, k = indices.shape
    ids = list(range(q)) if query_ids is None else list(query_ids)
    with atomic_path(path) as tmp:
        _write_table(tmp, fmt, indices, scores, ids, train_ids)
    return path


def _write_table(tmp: Path, fmt: str, indices: Tensor, scores: Tensor, ids: list, train_ids: Any) -> None:
    q, k = indices.shape
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError("Parquet output needs pyarrow: pip install 'forwardinf[parquet]' (or use CSV)") from e
        columns = {
            "query": np.repeat(np.asarray(ids), k),
            "rank": np.tile(np.arange(1, k + 1), q),
            "train_index": indices.reshape(-1).numpy(),
            "score": scores.reshape(-1).float().numpy(),
        }
        if train_ids is not None:
            columns["train_id"] = np.asarray([str(train_ids[int(i)]) for i in indices.reshape(-1)])
        pq.write_table(pa.table(columns), tmp)
    else:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "rank", "train_index", "score"] + (["train_id"] if train_ids is not None else []))
            for i in range(q):
                for r in range(k):
                    j = int(indices[i, r])
                    extra = [train_ids[j]] if train_ids is not None else []
                    w.writerow([ids[i], r + 1, j, repr(float(scores[i, r]))] + extra)


def read_topk_csv(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read a CSV written by :func:`write_topk` back as ``(indices [Q, k], scores [Q, k])``, queries
    in file order."""
    rows: dict[str, list[tuple[int, int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["query"], []).append((int(row["rank"]), int(row["train_index"]), float(row["score"])))
    ordered = [sorted(r) for r in rows.values()]
    idx = torch.tensor([[r[1] for r in row] for row in ordered], dtype=torch.long)
    val = torch.tensor([[r[2] for r in row] for row in ordered], dtype=torch.float32)
    return idx, val
