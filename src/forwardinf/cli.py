"""``forwardinf <experiment> [options]``: parse, then hand over to the experiment module.

Every refusal ends the same way: one line ``forwardinf <experiment>: error: ...`` on stderr and
exit status 2, no traceback (``FORWARDINF_TRACEBACK=1`` re-raises, for debugging). What each
refusal means and how to get past it: docs/guides/refusals.md.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import NoReturn

from forwardinf.experiments import EXPERIMENTS
from forwardinf.experiments.checks import UsageError, check_device, check_out

# Subcommand -> its module (``add_arguments(parser)``, ``run(args)``): the paper's experiments, then
# ``score``, Forward-INF on the user's own model and data (forwardinf.scoring).
COMMANDS: dict[str, str] = {**{n: f"forwardinf.experiments.{n}" for n in EXPERIMENTS}, "score": "forwardinf.scoring.command"}

# Experiments whose figures need matplotlib (the optional extra "plots"; leakage and lds skip theirs without it).
DRAWING = ("mislabel", "memorization", "hypothesis", "diffusion")
# What a run may raise on bad input or a broken file, reported as one line. Anything else is a bug:
# it keeps its traceback. (zipfile.BadZipFile and EOFError: a truncated .npz; OSError covers
# unreadable files and folders, PIL's unidentified images; FloatingPointError: a diverging update;
# ImportError: an optional package missing, its message naming the pip command.)
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, FloatingPointError, EOFError)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``forwardinf score: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forwardinf",
        description="Training-data attribution with Forward-INF: which training examples made the model do this?",
    )
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--dataset", default=None, help="dataset name (default: the experiment's embedded default)")
        p.add_argument("--data-root", default=None, help="the dataset's file or folder (default: searched in $FORWARDINF_DATA, "
                       "then ~/.cache/forwardinf; see forwardinf.data.loaders)")
        p.add_argument("--out", default=f"runs/{name}", help=f"output folder (default: runs/{name}); one experiment "
                       "per folder: a folder holding another experiment's results is refused")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an OS-level error keeps its type's name (``PermissionError: ...``)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (OSError, EOFError)):
        text = f"{type(e).__name__}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    prog = f"forwardinf {args.experiment}"
    if args.experiment in DRAWING and importlib.util.find_spec("matplotlib") is None:
        print(f"{prog}: error: its figures need matplotlib: pip install 'forwardinf[plots]'", file=sys.stderr)
        return 2
    try:
        # Up front, before any work: a run must not train for an hour and then find it cannot write.
        check_out(args.out, args.experiment)
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        args._module.run(args)
    except USER_ERRORS as e:
        if os.environ.get("FORWARDINF_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
