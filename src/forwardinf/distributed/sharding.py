"""Contiguous training shards, which rank scores which, and the dataset view of one shard."""
from __future__ import annotations

from torch.utils.data import Dataset, Subset, TensorDataset


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0..n-1`` in order, each ``shard_size`` long but the last."""
    if shard_size < 1:
        raise ValueError(f"invalid shard_size={shard_size!r}; expected a positive integer")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards rank ``rank`` scores: round robin, so ranks get near-equal work.

    The layout of shards does not depend on ``world_size``, only who computes them does; each
    shard is computed the same way on any rank, which is why any number of ranks writes the
    same store.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return list(range(rank, n_shards, world_size))


def shard_dataset(dataset: Dataset, start: int, stop: int) -> Dataset:
    """Examples ``start..stop-1`` of ``dataset`` as a dataset; tensor datasets stay tensor views."""
    if not 0 <= start <= stop <= len(dataset):
        raise ValueError(f"shard [{start}, {stop}) outside a dataset of {len(dataset)}")
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[start:stop] for t in dataset.tensors))
    return Subset(dataset, range(start, stop))


__all__ = ["shard_ranges", "shards_of_rank", "shard_dataset"]
