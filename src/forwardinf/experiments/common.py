"""What every experiment shares: seeding, timing, tables, and writing ``--out``."""
from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from forwardinf.io import jsonable, write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def timer() -> Iterator[dict]:
    """``with timer() as t: ...`` then ``t["seconds"]`` (wall) and ``t["cpu_seconds"]`` (this process's
    CPU time, ``time.process_time``: steadier than wall time on a shared machine)."""
    t: dict = {}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - start
        t["cpu_seconds"] = time.process_time() - cpu


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_object(experiment: str, dataset: str, config: dict, methods: dict) -> dict:
    """The fixed ``results.json`` schema."""
    return {"experiment": experiment, "dataset": dataset, "config": jsonable(config), "methods": jsonable(methods)}


def write_outputs(out_dir: str | os.PathLike, results: dict, report: str) -> Path:
    """Write ``results.json`` and ``report.md`` into ``out_dir`` (created); return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "report.md").write_text(report.rstrip() + "\n")
    return out

