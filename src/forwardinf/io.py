"""Writing files safely and turning values into JSON: the bottom layer every module may use.

Imports nothing from forwardinf. Every write goes through :func:`atomic_path`: a temporary file beside
the target, renamed over it in one step, so a reader (or a resumed run) sees the old file or the whole
new one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    The temporary file is removed on error. ``fsync``: flush it to disk before the rename (for data
    that other processes count on, e.g. score blocks). Missing parent folders are not created.
    """
    path = Path(path)
    # A hidden name of this process: concurrent writers never share a temporary file, and listings
    # of the folder (``*.pt``, ``*.npy``) never see one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def jsonable(obj: Any, *, max_tensor: int | None = None, _depth: int = 0) -> Any:
    """Plain JSON values: mappings -> dicts with string keys, tuples -> lists, numpy/torch scalars and
    arrays -> numbers and lists, paths -> strings, other objects -> their public settings.

    Never an address (``<... at 0x...>``), so equal values always give equal JSON (and hash equal).
    ``max_tensor``: arrays with more elements are written as ``"tensor(shape)"`` (configurations
    hold data-sized arrays whose content is fingerprinted separately); None writes every element.
    """
    kw = {"max_tensor": max_tensor, "_depth": _depth}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, **kw) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [jsonable(v, **kw) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        small = max_tensor is None or math.prod(obj.shape) <= max_tensor
        return obj.tolist() if small else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, nn.Module):
        return f"<{type(obj).__name__}>"  # a model's content is fingerprinted separately
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if hasattr(obj, "__dict__") and _depth < 4:
        # e.g. a task wrapping another task: its public settings, never its memory address
        fields = {k: jsonable(v, max_tensor=max_tensor, _depth=_depth + 1)
                  for k, v in vars(obj).items() if not k.startswith("_")}
        return {"class": type(obj).__name__, **fields}
    return type(obj).__name__


def canonical_json(obj: Any, *, max_tensor: int | None = 64) -> str:
    """Compact JSON with sorted keys: equal values give equal text (the input of configuration hashes)."""
    return json.dumps(jsonable(obj, max_tensor=max_tensor), sort_keys=True, separators=(",", ":"))


__all__ = ["atomic_path", "atomic_save", "atomic_write_text", "write_json", "jsonable", "canonical_json"]
