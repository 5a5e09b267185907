"""Content hashes (SHA-256) for cache keys and store manifests: the bottom layer every module may use.

The one place for them: a model's weights (:func:`state_fingerprint`), what a model computes
(:func:`fingerprint_module`), a dataset's examples (:func:`fingerprint_data`), the code a model
runs (:func:`fingerprint_code`), any object (:func:`fingerprint`), and the static import walk
(:func:`imported_names`) behind the code fingerprints of ``forwardinf lds`` and the layering test.

Imports only the bottom layer (``forwardinf.data.inputs``). Changing what any function here feeds
the hash changes every cache key made with it: caches are then recomputed, never misread, and
score stores are refused (``storage.manifest.check_manifest`` names what differs).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import ast
import re
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from forwardinf.data.inputs import as_dataset, batches


def sha256_hex(*parts: str | bytes, length: int | None = None) -> str:
    """SHA-256 of the concatenated ``parts`` (strings UTF-8 encoded), as hex; the first ``length`` chars."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def json_hash(obj: Any, length: int | None = 16) -> str:
    """SHA-256 of ``obj`` as JSON with sorted keys (anything else by ``str``): a cache key of a configuration."""
    return sha256_hex(json.dumps(obj, sort_keys=True, default=str), length=length)


def tensor_bytes(t: Any) -> bytes:
    """The raw bytes of a tensor's values in C order (b"" when empty); dtype and shape not included."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def hash_tensor(h: "hashlib._Hash", t: Any) -> None:
    """Feed ``h`` a tensor (or array) with its dtype and shape, so equal bytes of another shape differ."""
    if not torch.is_tensor(t):
        t = torch.as_tensor(np.asarray(t))
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(tensor_bytes(t))


def hash_state(h: "hashlib._Hash", model: nn.Module) -> None:
    """Feed ``h`` every parameter and buffer of ``model``: its name, then its dtype, shape and values."""
    for name, t in model.state_dict().items():
        h.update(name.encode())
        hash_tensor(h, t)


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex chars) of a model's weights: names, dtypes, shapes and values (not its code)."""
    h = hashlib.sha256()
    hash_state(h, model)
    return h.hexdigest()[:16]


def fingerprint_module(model: nn.Module) -> str:
    """SHA-256 (16 hex chars) of what a model computes: every parameter and buffer (names, dtypes,
    shapes, values), its module tree (``repr``: a ReLU and a Tanh model of equal weights differ)
    and its code (:func:`fingerprint_code`)."""
    h = hashlib.sha256()
    hash_state(h, model)
    h.update(module_repr(model).encode())
    h.update(fingerprint_code(model).encode())
    return h.hexdigest()[:16]


def fingerprint_data(data: Any, batch_size: int = 1024) -> str:
    """SHA-256 (16 hex chars) of every example of ``data`` in order, read batch by batch: equal iff
    the examples are (a dict batch by its sorted keys and their tensors).

    Streaming: memory stays at one batch whatever the size of the dataset. The hash depends on
    ``batch_size`` (each batch's shape is fed): keep the default.
    """
    dataset = as_dataset(data, "data")
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    for _, batch in batches(dataset, batch_size):
        _hash_leaves(h, batch)
    return h.hexdigest()[:16]


def _hash_leaves(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _hash_leaves(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_leaves(h, v)
    else:
        hash_tensor(h, obj)


def fingerprint(obj: Any) -> str:
    """A stable SHA-256 of ``obj``'s content: tensors, arrays, datasets, modules, dataclasses,
    partials, functions (by qualified name), containers and plain objects (by their attributes)."""
    h = hashlib.sha256()
    _feed(h, obj, 0)
    return h.hexdigest()


def _feed(h: Any, obj: Any, depth: int) -> None:
    if depth > 40:
        raise ValueError("fingerprint: object nesting too deep (a reference cycle?)")
    d = depth + 1
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif torch.is_tensor(obj):
        h.update(f"tensor:{obj.dtype}:{tuple(obj.shape)};".encode())
        h.update(tensor_bytes(obj))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    elif isinstance(obj, (np.generic,)):
        _feed(h, obj.item(), d)
    elif isinstance(obj, dict):
        h.update(f"dict:{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k, d)
            _feed(h, obj[k], d)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        h.update(f"{type(obj).__name__}:{len(items)};".encode())
        for v in items:
            _feed(h, v, d)
    elif isinstance(obj, nn.Module):
        h.update(f"module:{type(obj).__module__}.{type(obj).__qualname__}:{obj.training};".encode())
        _feed(h, dict(obj.state_dict()), d)
    elif isinstance(obj, TensorDataset):
        h.update(b"TensorDataset;")
        _feed(h, list(obj.tensors), d)
    elif isinstance(obj, Subset):
        h.update(b"Subset;")
        _feed(h, obj.dataset, d)
        _feed(h, np.asarray(obj.indices, dtype=np.int64), d)
    elif isinstance(obj, ConcatDataset):
        h.update(b"ConcatDataset;")
        _feed(h, list(obj.datasets), d)
    elif isinstance(obj, functools.partial):
        h.update(b"partial;")
        _feed(h, obj.func, d)
        _feed(h, list(obj.args), d)
        _feed(h, dict(obj.keywords), d)
    elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        if isinstance(obj, types.MethodType):
            _feed(h, obj.__self__, d)
            obj = obj.__func__
        h.update(f"fn:{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))};".encode())
    elif dataclasses.is_dataclass(obj):
        h.update(f"dataclass:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, d)
    elif isinstance(obj, Dataset) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        # An arbitrary map-style dataset: hash its content item by item (slow but exact).
        h.update(f"dataset:{type(obj).__qualname__}:{len(obj)};".encode())
        for i in range(len(obj)):
            _feed(h, obj[i], d)
    elif hasattr(obj, "__dict__"):
        h.update(f"object:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        _feed(h, {k: v for k, v in vars(obj).items()}, d)
    else:
        h.update(f"repr:{obj!r};".encode())


def module_repr(model: nn.Module) -> str:
    """``repr(model)`` (the module tree: every submodule's class and settings) without memory
    addresses, so that equal structures give equal text in every process."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(model))


def fingerprint_code(obj: Any) -> str:
    """SHA-256 (16 hex chars) of the code that runs when ``obj`` runs.

    For an ``nn.Module``: the classes of every submodule; for any other object (a task): its class
    and the classes of the objects it holds (one level down, e.g. a wrapped task). A class counts
    by the source file of the module defining it (each file once) when that file is the user's or
    forwardinf's own, by its package's version when it comes from an installed package or the
    standard library (``torch==2.x``), and by its qualified name when it has no file. Graph code
    a module carries as text (``torch.fx`` / ``torch.export`` graphs, TorchScript wrappers: a
    string attribute ``code``) is hashed too.

    Not covered: functions of other user files that a model's ``forward`` calls (edit-proof only
    for the files defining its classes).
    """
    classes: list[type] = []
    texts: list[str] = []
    for part in (obj.modules() if isinstance(obj, nn.Module) else _held(obj)):
        classes += [c for c in type(part).__mro__ if c not in (object, nn.Module)]
        code = getattr(part, "code", None)
        if isinstance(code, str):
            texts.append(code)
    seen: dict[str, str | bytes] = {}
    for cls in classes:
        key, content = _class_source(cls)
        seen.setdefault(key, content)
    return sha256_hex(*[x for key in sorted(seen) for x in (key, seen[key])], *texts, length=16)


def _held(obj: Any) -> list[Any]:
    """``obj`` and the plain objects among its attributes (not tensors, modules, containers)."""
    held = [obj]
    for v in (vars(obj).values() if hasattr(obj, "__dict__") else ()):
        if hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type, types.FunctionType, types.ModuleType)) \
                and not torch.is_tensor(v):
            held.append(v)
    return held


_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> tuple[str, str | bytes]:
    """``(key, content)`` standing for ``cls``'s code (see :func:`fingerprint_code`)."""
    module = getattr(cls, "__module__", "") or ""
    name = f"{module}.{cls.__qualname__}"
    try:
        path = Path(inspect.getsourcefile(cls) or "").resolve()
    except (TypeError, OSError):
        path = None
    top = module.split(".")[0]
    installed = path is None or not path.is_file() or "site-packages" in path.parts or "dist-packages" in path.parts \
        or _STDLIB in path.parents or top in sys.builtin_module_names
    if not installed:  # keyed by the module's name, not the path: a moved project keeps its fingerprints
        return module, path.read_bytes()
    try:
        version = importlib.metadata.version(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = str(getattr(sys.modules.get(top), "__version__", sys.version.split()[0]))
    return name, f"{top}=={version}"


def imported_names(source: str, package: str) -> Iterator[tuple[str, list[str]]]:
    """``(module, names)`` for every import statement of ``source``, anywhere in it (function level
    included), read from the syntax tree (nothing is imported): ``import a.b`` gives ``("a.b", [])``,
    ``from .x import y, z`` in package ``p`` gives ``("p.x", ["y", "z"])`` (relative imports resolved
    against ``package``, the package the source belongs to). Whether a name is a submodule or
    something the module defines is left to the caller."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from ..x import y
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base, [a.name for a in node.names]


__all__ = ["sha256_hex", "json_hash", "tensor_bytes", "hash_tensor", "hash_state", "state_fingerprint",
           "fingerprint_module", "fingerprint_data", "fingerprint", "fingerprint_code", "module_repr", "imported_names"]
