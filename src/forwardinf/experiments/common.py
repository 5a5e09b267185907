"""What every experiment shares: seeding, timing and warming up. Tables and ``--out`` files are the
reporting module's (:mod:`forwardinf.experiments.report`)."""
from __future__ import annotations

import random
import resource
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def timer(children: bool = False) -> Iterator[dict]:
    """``with timer() as t: ...`` then ``t["seconds"]`` (wall) and ``t["cpu_seconds"]`` (this process's
    CPU time, ``time.process_time``: steadier than wall time on a shared machine; with ``children``
    also the CPU time of worker processes that finished meanwhile)."""
    def cpu() -> float:
        if not children:
            return time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    t: dict = {}
    start, c0 = time.perf_counter(), cpu()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - start
        t["cpu_seconds"] = cpu() - c0


def warm_up(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Untimed: a tiny Forward-INF run and one gradient on 8 training examples ``(x, y)``, so that
    one-time costs (lazy kernel, autograd and ``torch.func`` initialisation) are not billed to
    whichever method is timed first. The model is left as it was (eval mode, no ``.grad``)."""
    import forwardinf as fi
    from forwardinf.core.params import mode

    x, y = train[0][:8], train[1][:8]
    task = fi.ClassificationTask()
    fi.ForwardINF(model, task, steps=1).fit((x, y)).influence((x[:2], y[:2]))
    params = [p for p in model.parameters() if p.requires_grad]
    with mode(model, False):
        torch.autograd.grad(task.loss(model, (x, y)).sum(), params)
