"""``forwardinf <experiment> [options]``: parse, then hand over to the experiment module."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from forwardinf.experiments import EXPERIMENTS

# Experiments whose figures need matplotlib (the optional extra "plots"; leakage and lds skip theirs without it).
DRAWING = ("mislabel", "memorization", "hypothesis", "diffusion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwardinf",
        description="Training-data attribution with Forward-INF: which training examples made the model do this?",
    )
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in EXPERIMENTS:
        try:
            module = importlib.import_module(f"forwardinf.experiments.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"forwardinf.experiments.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--dataset", default=None, help="dataset name (default: the experiment's embedded default)")
        p.add_argument("--data-root", default=None, help="the dataset's file or folder (default: searched in $FORWARDINF_DATA, "
                       "then ~/.cache/forwardinf; see forwardinf.data.loaders)")
        p.add_argument("--out", default=f"runs/{name}", help=f"output folder (default: runs/{name})")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.experiment in DRAWING and importlib.util.find_spec("matplotlib") is None:
        print(f"forwardinf {args.experiment}: error: its figures need matplotlib: pip install 'forwardinf[plots]'",
              file=sys.stderr)
        return 2
    try:
        args._module.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"forwardinf {args.experiment}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
