"""What a score store was made from: fingerprints of the model, the data and the configuration.

A store is only ever extended by a run that would have written the very same numbers, so its
manifest records everything the scores depend on: the model's weights (and names/shapes), its
structure (the module tree) and code (the source of its classes' modules), every example of the
training set and of the queries, the estimator's configuration and the code of its task, the block
layout and the library version. :func:`check_manifest` refuses anything else with a message
naming what differs.

Settings that change how the work is cut up but no score beyond float32 rounding
(:data:`RUNTIME`: batch size, queries per sweep, where the tail's features are cached) are
recorded under ``"runtime"`` and not checked: a run killed for lack of memory resumes with a
smaller ``--batch-size``. tests/test_trust_cli.py checks that scores agree within
:data:`RUNTIME_TOLERANCE` across batch sizes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

from forwardinf._version import __version__
from forwardinf.hashing import fingerprint_code, fingerprint_data, fingerprint_module, sha256_hex  # data, module: re-exported
from forwardinf.io import canonical_json, write_json
from forwardinf.io import jsonable as _jsonable

FORMAT = 2  # 2: the model fingerprint covers structure and code, the configuration the task's code

# Estimator settings that change no score beyond float32 rounding: kept out of the configuration hash.
RUNTIME = ("progress", "batch_size", "query_chunk", "cache", "cache_dir")
# What "beyond rounding" means: |a - b| <= RUNTIME_TOLERANCE * (1 + max |score|) (tested).
RUNTIME_TOLERANCE = 1e-4

# Fields that must agree for a run to reuse a store, with the words used in error messages.
CHECKED = {
    "format": "store format",
    "version": "forwardinf version",
    "model": "model fingerprint",
    "train": "training-set fingerprint",
    "queries": "query-set fingerprint",
    "n_train": "number of training examples",
    "n_query": "number of queries",
    "shard_size": "shard size",
    "query_block": "query block size",
    "config_hash": "configuration",
}


class StoreMismatchError(ValueError):
    """A score store was made from a different model, data, configuration or library version."""


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex chars) of the configuration's canonical JSON."""
    return sha256_hex(canonical_json(config), length=16)


def jsonable(obj: Any) -> Any:
    """A configuration as plain JSON values (arrays over 64 elements as ``"tensor(shape)"``)."""
    return _jsonable(obj, max_tensor=64)


def make_manifest(*, model: str, train: str, queries: str, n_train: int, n_query: int, shard_size: int,
                  query_block: int, config: Mapping[str, Any], runtime: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The manifest of a store: fingerprints (strings from the functions above), layout and config.

    ``runtime``: settings recorded but not checked (:data:`RUNTIME`); the ones in ``config`` move there."""
    runtime = {**{k: config[k] for k in RUNTIME if k in config}, **(runtime or {})}
    config = {k: v for k, v in config.items() if k not in RUNTIME}
    return {
        "format": FORMAT,
        "version": __version__,
        "model": model,
        "train": train,
        "queries": queries,
        "n_train": int(n_train),
        "n_query": int(n_query),
        "shard_size": int(shard_size),
        "query_block": int(query_block),
        "dtype": "float32",
        "config_hash": config_hash(config),
        "config": jsonable(config),
        "runtime": jsonable(runtime),
    }


def start_folder(path: Path, manifest: Mapping[str, Any], subdir: str, what: str, overwrite: bool) -> None:
    """Make ``path`` a new folder of ``what``: ``manifest.json`` and an empty ``subdir``. A folder
    that is not empty is cleared with ``overwrite``, else refused (:class:`StoreMismatchError`)."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise StoreMismatchError(f"{path} exists, is not empty and is not a {what} matching this run; "
                                     "choose another folder or pass overwrite=True (--overwrite)")
        shutil.rmtree(path)
    (path / subdir).mkdir(parents=True, exist_ok=True)
    write_json(path / "manifest.json", manifest, sort_keys=True)


def check_manifest(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str, what: str = "score store") -> None:
    """Raise :class:`StoreMismatchError` naming every checked field on which the two differ
    (``what``: the kind of folder, for the message)."""
    problems = []
    for key, words in CHECKED.items():
        if saved.get(key) != expected.get(key):
            if key == "config_hash":
                diff = _config_diff(saved.get("config", {}), expected.get("config", {}))
                problems.append(f"{words} differs ({diff})" if diff else f"{words} differs")
            else:
                problems.append(f"{words}: store has {saved.get(key)!r}, this run has {expected.get(key)!r}")
    if problems:
        raise StoreMismatchError(
            f"the {what} at {where} was made from something else: " + "; ".join(problems)
            + ". Use another store folder (--store), or overwrite=True (--overwrite) to start it afresh; "
            f"only {', '.join(RUNTIME[1:])} may change between runs of one store.")


def _config_diff(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    keys = sorted(set(saved) | set(expected))
    parts = [f"{k}: store {saved.get(k, '<unset>')!r} != now {expected.get(k, '<unset>')!r}"
             for k in keys if saved.get(k, "<unset>") != expected.get(k, "<unset>")]
    return ", ".join(parts[:6]) + (" ..." if len(parts) > 6 else "")


def config_of(estimator: Any) -> dict[str, Any]:
    """The public configuration of an estimator-like object: its class, its task's settings and
    code (``task_code``, :func:`forwardinf.hashing.fingerprint_code`) and every field of its
    frozen ``config`` (an estimator with a ``Config`` class), else every constructor argument it
    stored (attributes not starting or ending with ``_``); all of it but ``progress``, which
    changes no score (:func:`make_manifest` moves the other :data:`RUNTIME` settings aside)."""
    if getattr(type(estimator), "Config", None) is not None:
        stored = estimator.config.to_dict()
    else:
        stored = {k: v for k, v in vars(estimator).items() if k not in ("model", "task")}
    cfg = {k: v for k, v in stored.items() if not k.startswith("_") and not k.endswith("_") and k != "progress"}
    cfg["estimator"] = type(estimator).__name__
    task = getattr(estimator, "task", None)
    if task is not None:
        cfg["task"] = jsonable(task)
        cfg["task_code"] = fingerprint_code(task)
    return jsonable(cfg)


__all__ = ["RUNTIME", "RUNTIME_TOLERANCE", "StoreMismatchError", "fingerprint_module", "fingerprint_data", "config_hash",
           "make_manifest", "check_manifest", "start_folder", "config_of", "jsonable", "canonical_json"]
