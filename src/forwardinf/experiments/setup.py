"""Shared experiment set-up from the command line: the model arguments, ``--option`` keywords,
methods by registry name (:mod:`forwardinf.baselines.registry`) and a classifier
(:func:`forwardinf.workloads.classifier.train_or_load`; its ``Prepared`` is re-exported here).

The trajectory is recorded when a requested method needs it (HyDRA, see ``registry.requirements``).
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import torch

from forwardinf.baselines.registry import FORWARD_INF, forward_inf_names, make_estimator
from forwardinf.workloads.classifier import Prepared, train_or_load

# The registry's Forward-INF variants for classifiers (baselines.registry.FORWARD_INF, one definition
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


def add_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a keyword for one method's estimator, e.g. forward-inf.lr=0.01 or if-100.damping=0.01 "
                        "(values are Python literals, else strings); repeatable")


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
    """A fresh estimator for ``--methods`` entry ``name`` (a registry name, ``baselines.registry``),
    with its ``--option`` keywords. ``NAME@LABEL`` is method ``NAME`` under another label, so that
    one method can run with several ``--option`` settings (``trak@reg``, ``--option trak@reg.lambda_reg=100``)."""
    import forwardinf as fi

    name = name.split("@", 1)[0]
    kw = dict(options or {})
    variant = FORWARD_INF.get(name)
    if variant is not None:
        if variant.task not in ("classification", "image") or variant.checkpoints or variant.contrast:
            raise ValueError(f"{name} is a {variant.task} variant" + (" averaged over checkpoints (forwardinf "
                             "mislabel)" if variant.checkpoints else "") + "; choose a classifier's: "
                             + ", ".join(forward_inf_names("classification", "image")))
        kw.setdefault("progress", progress)
        if variant.estimator == "invariant" and prepared.split is not None:
            from forwardinf.data.augment import flip_is_sensible

            if not flip_is_sensible(prepared.split.name):
                kw.setdefault("flip", False)
    try:
        return make_estimator(name, model, fi.ClassificationTask(), checkpoints=prepared.checkpoints,
                              trajectory=prepared.trajectory, **kw)
    except TypeError as e:  # an unknown keyword
        raise ValueError(f"{name}: {e}; check its --option keywords") from e


def needs_trajectory(args: argparse.Namespace) -> bool:
    """Whether a method in ``args.methods`` (comma-separated) needs the recorded trajectory."""
    from forwardinf.baselines.registry import METHODS, requirements

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
