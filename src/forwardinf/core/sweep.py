"""Forward sweeps over a dataset: the only thing the training set ever sees."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from forwardinf.core.attention import functional_attention
from forwardinf.data.inputs import batches, to_device
from forwardinf.memory import trim_heap


def sweep(
    fn: Callable[[Any], Tensor],
    dataset: Any,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "sweep",
    trim: bool = False,
) -> Tensor:
    """Concatenate ``fn(batch) -> Tensor[..., B]`` over ``dataset`` in order: ``[..., N]`` on CPU.

    ``trim``: hand the heap's free pages back before each batch (:func:`~forwardinf.memory.trim_heap`; for large models)."""
    out = []
    n = len(dataset)
    # the attention kernel of every functional call, so base and updated values are computed alike
    with torch.no_grad(), functional_attention(), tqdm(total=n, desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        for start, batch in batches(dataset, batch_size):
            if trim:
                trim_heap()
            values = fn(to_device(batch, device))
            out.append(values.detach().cpu())
            bar.update(values.shape[-1])
    return torch.cat(out, dim=-1)
