"""Shared experiment set-up from the command line: the model arguments, ``--option`` keywords,
methods by registry name (:mod:`forwardinf.baselines.methods`) and a classifier
(:func:`forwardinf.workloads.classifier.train_or_load`; its ``Prepared`` is re-exported here).

The trajectory is recorded when a requested method needs it (HyDRA, see ``registry.requirements``).
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import torch

from forwardinf.baselines.methods import FORWARD_INF, forward_inf_names, make_estimator
from forwardinf.workloads.classifier import Prepared, train_or_load

# The registry's Forward-INF variants for classifiers (baselines.methods.FORWARD_INF, one definition
# per name): every one of FORWARD_INF_VARIANTS runs on any classifier (lds's 'all' runs them all);
# IMAGE_VARIANTS need images (forward-inf-invariant). Values: each variant's estimator keywords.
FORWARD_INF_VARIANTS: dict[str, dict[str, Any]] = {n: dict(FORWARD_INF[n].kw) for n in forward_inf_names()}
IMAGE_VARIANTS: dict[str, dict[str, Any]] = {n: dict(FORWARD_INF[n].kw) for n in forward_inf_names("image")}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="mlp, cnn or resnet18 (default: per dataset)")
    p.add_argument("--width", type=int, default=None, help="model width (cnn channels / resnet base width)")
    p.add_argument("--n-train", type=int, default=None, help="class-balanced training subset size (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: per dataset)")
    p.add_argument("--checkpoint", default=None,
                   help="model checkpoint to load instead of training (saved state dict; weights_only)")
    p.add_argument("--trajectory", default=None,
                   help="with --checkpoint: the model's recorded SGD training (TrajectoryRecorder.save), for HyDRA")
    add_option_argument(p)


def add_option_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, example: str | None = None) -> None:
    """``--option METHOD.KEY=VALUE``: the one spelling of an estimator setting on every command line
    (read by :func:`method_options`). ``example``: the help's examples (default: forward-inf's lr, if-100's damping)."""
    example = example or "e.g. forward-inf.lr=0.01 or if-100.damping=0.01"
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help=f"a keyword for one method's estimator, {example} "
                        "(values are Python literals, else strings); repeatable")


def parse_methods(spec: str, expand: dict[str, list[str]] | None = None) -> list[str]:
    """``--methods`` as a list of names, each a registry name (``NAME`` or ``NAME@LABEL``, the label
    checked by :func:`~forwardinf.experiments.checks.check_label`); ``expand`` maps a word (``all``)
    to the names it stands for. Unknown names are refused here, before any work."""
    from forwardinf.baselines.methods import METHODS, PEER_METHODS, REFERENCE_METHODS
    from forwardinf.experiments.checks import UsageError, check_label

    names = [n for m in str(spec or "").split(",") if m.strip()
             for n in (expand or {}).get(m.strip(), [m.strip()])]
    if not names:
        raise UsageError("--methods is empty")
    known = [*forward_inf_names("classification", "image"), *METHODS[1:], *PEER_METHODS, *REFERENCE_METHODS]
    for name in names:
        base, at, label = name.partition("@")
        if at:
            check_label(label, name)
        if base not in known:
            raise UsageError(f"--methods: unknown method {base!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))  # once each ('all,trak' runs trak once)


# Estimator keywords whose values name parts of the user's model: checked on the real one, not a stand-in.
MODEL_KEYWORDS = ("split", "params", "layers", "layer")


def check_methods(methods: list[str], options: dict[str, dict[str, Any]]) -> None:
    """Build every method with its ``--option`` keywords on a tiny stand-in classifier, so that an
    unknown keyword or a bad value is refused before the model is trained (the estimators check
    their values when built). Values naming parts of the model (:data:`MODEL_KEYWORDS`), methods
    needing a recorded trajectory and missing optional packages are left to the run, where a
    failure is that method's row of the results."""
    from torch import nn

    from forwardinf.baselines.methods import requirements
    from forwardinf.experiments.checks import UsageError

    stand_in = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    fake = Prepared(split=None, model=stand_in, model_name="stand-in", accuracy=0.0,
                    checkpoints=[stand_in.state_dict()] * 5)
    for name in methods:
        kw = {k: v for k, v in (options.get(name) or {}).items() if k not in MODEL_KEYWORDS and k != "queries"}
        if "trajectory" in requirements(name.split("@", 1)[0]):
            continue
        try:
            est = make_method(name, stand_in, fake, False, kw)
            check = getattr(est, "_check_params", None)  # the estimator's own value checks, else run by fit
            if callable(check):
                check()
        except ImportError:
            continue
        except (ValueError, TypeError) as e:
            raise UsageError(f"--methods {name}: {e}") from None


def run_safely(name: str, work: Any) -> tuple[Any, dict | None]:
    """``(work(), None)``, or ``(None, {"error": ...})`` when it raises: one failing method is a row of
    the results, not the end of the run (the other methods' results are kept)."""
    import traceback

    from forwardinf.baselines.peers import INSTALL

    try:
        return work(), None
    except ImportError as e:
        pkg = (e.name or "").split(".")[0]
        return None, {"error": f"not installed ({INSTALL.get(pkg, 'pip install ' + pkg)})"}
    except (ValueError, TypeError, RuntimeError, FloatingPointError, MemoryError) as e:
        traceback.print_exc()
        print(f"  {name}: failed ({type(e).__name__}); its row records the error, the other methods go on", flush=True)
        return None, {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` values as ``{method: {key: value}}``, each METHOD among ``methods``."""
    out: dict[str, dict[str, Any]] = {}
    for item in getattr(args, "option", None) or []:
        left, eq, text = item.partition("=")
        name, dot, key = left.rpartition(".")  # the key has no dot; a NAME@LABEL may
        if not (dot and eq and key.strip()):
            raise ValueError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. forward-inf.lr=0.01")
        if name not in methods:
            raise ValueError(f"--option {item!r}: {name!r} is not one of --methods ({', '.join(methods)})")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: adam, cosine
        out.setdefault(name, {})[key.strip().replace("-", "_")] = value
    return out


def make_method(name: str, model: torch.nn.Module, prepared: "Prepared", progress: bool = False,
                options: dict[str, Any] | None = None) -> Any:
    """A fresh estimator for ``--methods`` entry ``name`` (a registry name, ``baselines.methods``),
    with its ``--option`` keywords. ``NAME@LABEL`` is method ``NAME`` under another label, so that
    one method can run with several ``--option`` settings (``trak@reg``, ``--option trak@reg.lambda_reg=100``)."""
    import forwardinf as fi

    name = name.split("@", 1)[0]
    kw = dict(options or {})
    variant = FORWARD_INF.get(name)
    if variant is not None:
        if variant.task not in ("classification", "image") or variant.needs:
            raise ValueError(f"{name} is a {variant.task} variant" + (" averaged over checkpoints (forwardinf "
                             "mislabel)" if variant.needs else "") + "; choose a classifier's: "
                             + ", ".join(forward_inf_names("classification", "image")))
        kw.setdefault("progress", progress)
        if "flip" in variant.config.names() and prepared.split is not None:  # InvariantForwardINF
            from forwardinf.data.augment import flip_is_sensible

            if not flip_is_sensible(prepared.split.name):
                kw.setdefault("flip", False)
    try:
        run = fi.TrainingRun(model=model, checkpoints=prepared.checkpoints or (), trajectory=prepared.trajectory)
        return make_estimator(name, model, fi.ClassificationTask(), run=run, **kw)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}; check its --option keywords") from e


def needs_trajectory(args: argparse.Namespace) -> bool:
    """Whether a method in ``args.methods`` (comma-separated) needs the recorded trajectory."""
    from forwardinf.baselines.methods import METHODS, requirements

    names = [m.strip().lower().split("@", 1)[0] for m in str(getattr(args, "methods", "") or "").split(",")]
    return any(m in METHODS and "trajectory" in requirements(m) for m in names)


def prepare_classifier(args: argparse.Namespace, progress: bool = False) -> Prepared:
    """:func:`forwardinf.workloads.classifier.train_or_load` from the command line's arguments
    (``--dataset``, ``--data-root``, :func:`add_model_arguments`, ``--train-augment``, ``--out``
    for the cache, ``--seed``), recording the trajectory when :func:`needs_trajectory`."""
    return train_or_load(args.dataset, args.data_root, n_train=args.n_train, model=args.model, width=args.width,
                         epochs=args.epochs, lr=args.train_lr, augment=getattr(args, "train_augment", None),
                         checkpoint=args.checkpoint, trajectory=getattr(args, "trajectory", None),
                         cache_dir=Path(args.out) / "cache", seed=args.seed,
                         record_trajectory=needs_trajectory(args), progress=progress)
