"""Seeded work that leaves the caller's random state alone."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` on a forked CPU RNG, restoring the caller's
    state after (so building a model with a seed never shifts anyone else's random numbers).
    ``None``: the global RNG as it is, nothing forked."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
