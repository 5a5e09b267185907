"""Checks every experiment runs on its command line before any work (see docs/guides/refusals.md).

A refusal is a :class:`UsageError` (a ``ValueError``): ``forwardinf.cli.main`` prints it as one
line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import torch

# A label of ``--methods NAME@LABEL`` becomes a file name under --out: letters, digits, '.', '_', '-'.
LABEL = re.compile(r"[A-Za-z0-9._-]+")
# Memory a retraining worker may take (a small CNN with its data and torch: ~0.5 GB measured, doubled).
WORKER_GB = 1.0


class UsageError(ValueError):
    """A command line the experiment refuses: bad arguments, an unusable --out, a missing package."""


def refuse_renamed(p: argparse.ArgumentParser | argparse._ArgumentGroup, renamed: dict[str, str]) -> None:
    """Old spellings of flags, hidden from --help: each is refused with one line giving its new
    spelling (``forwardinf hypothesis: error: --lr is now --train-lr ...``, exit status 2).

    ``renamed``: old flag -> its new spelling (e.g. ``--option forward-inf-group.lr=VALUE``).
    Registering the old flag also stops argparse reading it as an abbreviation of a longer one
    (``--score`` of ``--score-average``).
    """
    for old, new in renamed.items():
        p.add_argument(old, nargs="*", action=_Renamed, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    def __init__(self, *args, new: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is now {self.new}")


def check_out(out: str | os.PathLike, experiment: str) -> None:
    """Refuse an ``--out`` that cannot hold this experiment's outputs, before anything is written.

    Refused: a file; a folder (or the nearest existing parent of a new one) this process cannot
    write in; a folder holding another experiment's ``results.json`` (its results and report would
    be overwritten: one experiment per folder).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose a folder")
    results = out / "results.json"
    if results.is_file():
        try:
            other = json.loads(results.read_text()).get("experiment")
        except (ValueError, AttributeError):
            other = None
        if other is not None and other != experiment:
            raise UsageError(f"--out {out} holds the results of 'forwardinf {other}'; this run would overwrite "
                             f"them: give 'forwardinf {experiment}' its own --out folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    try:  # the one reliable test (os.access ignores read-only mounts and says yes to root)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".forwardinf-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {existing} ({e.strerror or e}); choose a writable folder") from None


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, refused unless it exists on this machine (``cpu``, an available
    ``cuda[:i]`` or ``mps``)."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch has no usable CUDA (built for CPU, or no GPU); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise UsageError(f"--device {device}: the {d.type} backend is not supported; use cpu, cuda or mps")
    return d


def check_label(label: str, name: str) -> str:
    """A ``--methods NAME@LABEL`` label, refused unless made of ``[A-Za-z0-9._-]`` without ``..``:
    it names files under --out (``methods/NAME@LABEL.pt``), which must stay inside --out."""
    if not LABEL.fullmatch(label) or ".." in label:
        raise UsageError(f"--methods {name}: the label {label!r} may use only letters, digits, '.', '_' and '-' "
                         "(no '/', no '..')")
    return label


def memory_gb() -> float:
    """Memory this machine can still give (MemAvailable, GB); the CPU count's worth if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float(os.cpu_count() or 1) * WORKER_GB


def cap_workers(workers: int, option: str = "--workers") -> tuple[int, str | None]:
    """``(workers, note)``: ``workers`` capped by the CPU count and by the available memory
    (:data:`WORKER_GB` per worker); ``note`` says why when it was lowered (None otherwise)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise UsageError(f"{option} must be a positive integer, got {workers!r}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    by_memory = max(1, int(memory_gb() // WORKER_GB))
    capped = min(workers, cpus, by_memory)
    if capped == workers:
        return workers, None
    why = f"{cpus} CPU(s)" if capped == cpus else f"{memory_gb():.1f} GB available at {WORKER_GB:g} GB per worker"
    return capped, f"{option} {workers} lowered to {capped} ({why})"


__all__ = ["UsageError", "check_out", "check_device", "check_label", "cap_workers", "memory_gb"]
