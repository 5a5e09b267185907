"""Compare the measured numbers of two runs of the experiments (results.json), timings and memory left out.

    .venv/bin/python benchmarks/compare_results.py RUNS_A RUNS_B [--rtol 0] [--rename OLD=NEW ...]
        [--config-rename OLD=NEW ...]

RUNS_A / RUNS_B: folders holding one sub-folder per run (each with a results.json), or two results.json
files. Prints one line per run: identical, or every number that differs (with both values). Exit 1 if any
run differs beyond ``--rtol``. Paths under RUNS_A / RUNS_B compare as ``<RUNS>/...`` (the same run
written elsewhere). ``--rename OLD=NEW`` reads method ``OLD`` of RUNS_A as ``NEW`` (a method
renamed between the runs; ``OLD@LABEL`` follows), in keys and in string values such as config lists.
``--config-rename [RUN:]OLD=NEW`` reads the top-level ``config`` key ``OLD`` of RUNS_A as ``NEW`` (a
command-line flag renamed between the runs), in run ``RUN`` only when given; ``OLD=`` leaves it out of both
sides (a flag removed; its value is printed when it was not None).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

# Wall/CPU time and memory vary from run to run on a shared machine; they are not results.
NOISE = ("seconds", "_mb", "peak", "time", "minutes", "speedup", "cost_vs", "per_min", "at_budget")


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def renamed(obj: Any, names: dict[str, str]) -> Any:
    """``obj`` with every dict key and string equal to a name in ``names`` (or ``NAME@...``) renamed."""
    def one(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        base, at, label = text.partition("@")
        return names[base] + at + label if base in names else text

    if isinstance(obj, dict):
        return {one(k): renamed(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [renamed(v, names) for v in obj]
    return one(obj)


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


def under_runs(obj: Any, root: Path) -> Any:
    """``obj`` with the folder ``root`` written ``<RUNS>`` in every string (paths of a run's outputs)."""
    if isinstance(obj, dict):
        return {k: under_runs(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [under_runs(v, root) for v in obj]
    return obj.replace(str(root), "<RUNS>") if isinstance(obj, str) else obj


def renamed_config(a: dict, b: dict, names: dict[str, str], run: str = "") -> tuple[dict, dict]:
    """``(a, b)`` with ``a``'s ``config`` keys renamed by ``names`` (``OLD -> NEW``); ``NEW`` empty: the
    key is dropped from both, printed unless None, so that a dropped setting is seen."""
    ca, cb = dict(a.get("config") or {}), dict(b.get("config") or {})
    for old, new in names.items():
        if old in ca:
            value = ca.pop(old)
            if new:
                ca[new] = value
            else:
                cb.pop(old, None)
                if value is not None:
                    print(f"{run}: config {old}={value!r} left out")
    return {**a, "config": ca}, {**b, "config": cb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on floats (default: exact)")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="method OLD in RUNS_A is NEW in RUNS_B (repeatable)")
    ap.add_argument("--config-rename", action="append", default=[], metavar="OLD=NEW",
                    help="config key OLD in RUNS_A is NEW in RUNS_B (in run RUN only: RUN:OLD=NEW); OLD= leaves it "
                         "out (repeatable)")
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
        names = dict(item.split("=", 1) for item in args.rename)
        keys = {old.split(":", 1)[-1]: new for old, new in (item.split("=", 1) for item in args.config_rename)
                if ":" not in old or old.split(":", 1)[0] == name}
        runs_a, runs_b = (fa.parent.parent.resolve(), fb.parent.parent.resolve())
        a = under_runs(renamed(json.loads(fa.read_text()), names), runs_a)
        diff = differences(*renamed_config(a, under_runs(json.loads(fb.read_text()), runs_b), keys, name), args.rtol)
        n = sum(1 for p, _ in _leaves(json.loads(fa.read_text()).get("methods")) if not any(k in p for k in NOISE))
        print(f"{name}: identical ({n} numbers)" if not diff else f"{name}: {len(diff)} differ\n  " + "\n  ".join(diff))
        bad += bool(diff)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
