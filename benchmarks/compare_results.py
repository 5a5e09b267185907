"""Compare the measured numbers of two runs of the experiments (results.json), timings and memory left out.

    .venv/bin/python benchmarks/compare_results.py RUNS_A RUNS_B [--rtol 0]

RUNS_A / RUNS_B: folders holding one sub-folder per run (each with a results.json), or two results.json
files. Prints one line per run: identical, or every number that differs (with both values). Exit 1 if any
run differs beyond ``--rtol``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

# Wall/CPU time and memory vary from run to run on a shared machine; they are not results.
NOISE = ("seconds", "_mb", "peak", "time", "minutes", "speedup")


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def differences(a: dict, b: dict, rtol: float = 0.0) -> list[str]:
    """Every leaf of ``methods`` and ``config`` that differs, timing and memory fields excepted."""
    out = []
    la = {p: v for p, v in _leaves({k: a.get(k) for k in ("methods", "config")}) if not any(n in p for n in NOISE)}
    lb = {p: v for p, v in _leaves({k: b.get(k) for k in ("methods", "config")}) if not any(n in p for n in NOISE)}
    for p in sorted(set(la) | set(lb)):
        x, y = la.get(p, "<absent>"), lb.get(p, "<absent>")
        if isinstance(x, float) and isinstance(y, float):
            same = (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rtol, abs_tol=0.0)
        else:
            same = x == y
        if not same:
            out.append(f"{p}: {x!r} != {y!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on floats (default: exact)")
    args = ap.parse_args(argv)
    if not args.a.exists():
        ap.error(f"{args.a} not found")
    if args.a.is_file():
        pairs = [(args.a.parent.name, args.a, args.b)]
    else:
        pairs = [(d.name, d / "results.json", args.b / d.name / "results.json")
                 for d in sorted(args.a.iterdir()) if (d / "results.json").is_file()]
    bad = 0
    for name, fa, fb in pairs:
        if not fb.is_file():
            print(f"{name}: missing in {args.b}")
            bad += 1
            continue
        diff = differences(json.loads(fa.read_text()), json.loads(fb.read_text()), args.rtol)
        n = sum(1 for p, _ in _leaves(json.loads(fa.read_text()).get("methods")) if not any(k in p for k in NOISE))
        print(f"{name}: identical ({n} numbers)" if not diff else f"{name}: {len(diff)} differ\n  " + "\n  ".join(diff))
        bad += bool(diff)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
