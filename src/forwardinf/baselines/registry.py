"""Estimators by name, with per-method defaults for classification networks (``--methods`` of the CLI).

| name | estimator |
|---|---|
| ``forward-inf`` and ``forward-inf-*`` | the named Forward-INF configurations of :data:`FORWARD_INF` (table below) |
| ``if-100`` / ``if-1000`` / ``if-10000`` | ``InfluenceFunction(solver="lissa", depth=N)`` (the paper's IF-N) |
| ``if-cg`` | ``InfluenceFunction(solver="cg", depth=100)`` |
| ``if-exact`` | ``InfluenceFunction(solver="exact")`` |
| ``tracin-1`` / ``-3`` / ``-5`` | ``TracIn`` (all layers) over the last 1 / 3 / 5 given checkpoints |
| ``tracin-last`` | ``TracIn(params="last")`` over the last (up to) 5 checkpoints, or the model |
| ``grad-cos`` | ``TracIn(normalize=True)`` on the final model (gradient cosine) |
| ``grad-dot`` | ``TracIn()`` on the final model (gradient dot product) |
| ``representer`` | ``RepresenterPoint`` |
| ``pixel-nn`` / ``feature-nn`` | ``NearestNeighbour`` in pixel / penultimate-feature space (references, :mod:`forwardinf.baselines.nearest`) |
| ``knn-shapley`` | ``KNNShapley(k=10)`` on the penultimate-layer embedding (exact, closed form) |
| ``tmc-shapley`` | ``TMCShapley(train_fn, permutations=20, truncation=0.05)``; ``train_fn`` defaults to ``LastLayerTrainer(model)`` |
| ``hydra`` / ``hydra-last`` | ``HyDRA`` (fast form) over the recorded ``trajectory``, all layers / last layer |
| ``trak``, ``dattri-trak``, ``kronfluence-ekfac``, ``captum-tracincp``, ``dattri-if-lissa``, ``dattri-if-cg`` | the peer libraries (optional installs), :mod:`forwardinf.baselines.peers`; ``captum-tracincp`` uses the given checkpoints |

What a method needs beyond the model (:func:`requirements`): ``"checkpoints"`` (TracIn-1/3/5:
saved training snapshots), ``"trajectory"`` (HyDRA: a :class:`TrajectoryRecorder` of the
model's SGD training, or the path it was saved to). ``tmc-shapley`` retrains: it takes a
``train_fn(data, seed) -> nn.Module`` and falls back to re-fitting the model's last layer. The
experiments read :func:`requirements` to record only what the chosen methods use, and pass it
all in as ``make_estimator(name, model, task, checkpoints=..., trajectory=..., train_fn=...)``;
a user does the same from Python.

Influence functions use ``damping="auto"`` (1% of the Hessian's top eigenvalue plus twice its
most negative one, estimated by Lanczos): trained networks have negative curvature, on which a
fixed small damping makes LiSSA diverge and CG stop early.

Forward-INF variants (:data:`FORWARD_INF`): one definition per name, so a name means the same
configuration in every experiment. Each experiment picks its default names from here.

| name | configuration | used by default in |
|---|---|---|
| ``forward-inf`` | ``ForwardINF`` defaults (preset ``default``: nsgd, lr 1e-3, 1 step, ``score="cosine"``) | leakage, memorization, lds |
| ``forward-inf-<preset>`` | ``ForwardINF.preset(<preset>)``: ``paper``, ``authors``, ``group``, ``counterfactual`` | leakage, mislabel, memorization (paper) |
| ``forward-inf-<score>`` | defaults with ``score=<score>``: ``margin``, ``loss``, ``abs``, ``influence``, ``cosine`` (= ``forward-inf``) | mislabel (``margin``) |
| ``forward-inf-tail`` / ``forward-inf-counterfactual-tail`` | ``TailForwardINF`` with ``split="auto"``: the layers after the last convolution / pooling / attention (a CNN's dense head; an MLP's every layer; :mod:`forwardinf.estimators.split`) (defaults / counterfactual preset) | lds |
| ``forward-inf-counterfactual-ekfac`` | preset ``counterfactual`` with ``eigencorrect=True`` (EK-FAC eigenvalues) | |
| ``forward-inf-invariant`` | ``InvariantForwardINF`` (images only) | |
| ``forward-inf-margin-cp`` / ``forward-inf-cosine-cp`` | ``forward-inf-margin`` / ``forward-inf`` averaged over the saved training checkpoints (self-influence) | mislabel |
| ``forward-inf-diffusion`` | adam, lr 3e-4, 3 steps, ``score="margin"`` (change of the log loss) on a ``DiffusionTask`` | diffusion |
| ``forward-inf-diffusion-{paper,loss,abs,nsgd,cosine,contrast}`` | the diffusion experiment's other variants | |
| ``forward-inf-convex`` | one plain SGD step, lr 1e-3, ``score="loss"`` (to first order the gradient dot product) on a convex model | hypothesis (convex; noisy uses ``forward-inf-group``) |
| ``forward-inf-trace`` | nsgd, 1 step, ``score="loss"``; lr and parameter subset tuned on held-out queries by the experiment | trace |

Old labels: mislabel's ``forward-inf`` / ``forward-inf-cp`` are ``forward-inf-margin`` /
``forward-inf-margin-cp``, its ``forward-inf-cosine`` is ``forward-inf``; diffusion's ``forward-inf`` is
``forward-inf-diffusion`` and its ``forward-inf-<x>`` are ``forward-inf-diffusion-<x>``.

Parameter subsets: influence functions use every trainable parameter up to
``LARGE_MODEL`` parameters and the last layer beyond (the usual shortcut for big networks,
e.g. a ResNet-18's 11M); ``if-exact`` uses every parameter only up to ``EXACT_ALL`` (the
Hessian is ``D x D``) and the last layer otherwise. TracIn uses every parameter, as in
TracIn-CP, except ``tracin-last``. Any keyword overrides these defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from forwardinf.baselines.influence_function import InfluenceFunction
from forwardinf.baselines.peers import PEERS
from forwardinf.baselines.representer import RepresenterPoint
from forwardinf.baselines.tracin import TracIn
from forwardinf.estimators.base import Estimator
from forwardinf.estimators.forward_inf import PRESETS as _FI_PRESETS
from forwardinf.estimators.forward_inf import SCORES as _FI_SCORES
from forwardinf.tasks.base import Task


@dataclass(frozen=True)
class Variant:
    """One named Forward-INF configuration.

    ``kw``: the estimator's keywords (``preset`` names a ``ForwardINF.preset``); ``estimator``:
    ``"forward-inf"`` (:class:`ForwardINF`), ``"tail"`` (:class:`TailForwardINF`) or
    ``"invariant"`` (:class:`InvariantForwardINF`); ``task``: the kind of task it was set for
    (``"classification"``, ``"image"``: classification of images only, ``"diffusion"``,
    ``"language"``, ``"convex"``: the hypothesis study's linear model). Protocol flags the experiments read, not the estimator: ``checkpoints``
    (average the standardised self-influence over the saved training checkpoints, as TracIn-CP
    does) and ``contrast`` (diffusion: minus the same ascent on the pre-trained model's samples).
    """

    kw: dict = field(default_factory=dict)
    estimator: str = "forward-inf"
    task: str = "classification"
    checkpoints: bool = False
    contrast: bool = False


_DIFFUSION = dict(score="margin", optimizer="adam", lr=3e-4, steps=3)
FORWARD_INF: dict[str, Variant] = {
    "forward-inf": Variant(),
    **{f"forward-inf-{p}": Variant({"preset": p}) for p in _FI_PRESETS if p != "default"},
    **{f"forward-inf-{s}": Variant({"score": s}) for s in _FI_SCORES if s not in _FI_PRESETS},
    "forward-inf-tail": Variant(estimator="tail"),
    # the counterfactual preset on the tail only (cached prefix: a CNN's queries cost its classifier)
    "forward-inf-counterfactual-tail": Variant(dict(_FI_PRESETS["counterfactual"]), estimator="tail"),
    # the counterfactual preset on EK-FAC curvature (eigenvalues corrected by one more sweep)
    "forward-inf-counterfactual-ekfac": Variant({"preset": "counterfactual", "eigencorrect": True}),
    # The update averages over shifted views of each query, mirrored ones scored apart (mirrors
    # only where a flip keeps the label, see data.augment.flip_is_sensible).
    "forward-inf-invariant": Variant(estimator="invariant", task="image"),
    # Mislabel detection (self-influence): margin ranks like cosine there without cosine's extra
    # forward-mode sweeps in fit (benchmarks/results/mislabel.md).
    "forward-inf-margin-cp": Variant({"score": "margin"}, checkpoints=True),
    "forward-inf-cosine-cp": Variant(checkpoints=True),
    # Diffusion (joint ascent on the generated images): the change of the log loss after 3 Adam
    # steps (benchmarks/results/diffusion.md); "-paper" is the paper's recipe (Adam lr 1e-5, raw
    # loss change); "-contrast" subtracts the same ascent on the pre-trained model's samples.
    "forward-inf-diffusion": Variant(dict(_DIFFUSION), task="diffusion"),
    "forward-inf-diffusion-paper": Variant({**_DIFFUSION, "score": "loss", "lr": 1e-5}, task="diffusion"),
    "forward-inf-diffusion-loss": Variant({**_DIFFUSION, "score": "loss"}, task="diffusion"),
    "forward-inf-diffusion-abs": Variant({**_DIFFUSION, "score": "abs"}, task="diffusion"),
    "forward-inf-diffusion-nsgd": Variant({**_DIFFUSION, "optimizer": "nsgd", "lr": 1e-3}, task="diffusion"),
    "forward-inf-diffusion-cosine": Variant({**_DIFFUSION, "score": "cosine", "n_directions": 16}, task="diffusion"),
    "forward-inf-diffusion-contrast": Variant(dict(_DIFFUSION), task="diffusion", contrast=True),
    # The hypothesis study's convex setting (experiments/hypothesis.py, --convex-fi-lr): one plain
    # SGD step, whose loss change is to first order the gradient dot product.
    "forward-inf-convex": Variant(dict(optimizer="sgd", score="loss", steps=1, lr=1e-3), task="convex"),
    # Fact tracing in a language model: lr and the parameter subset are tuned per run on held-out
    # queries (experiments/trace.py, --fi-lr / --fi-params).
    "forward-inf-trace": Variant(dict(optimizer="nsgd", steps=1, score="loss"), task="language"),
}


def forward_inf_names(*tasks: str, checkpoints: bool = False) -> tuple[str, ...]:
    """The :data:`FORWARD_INF` names set for one of ``tasks`` (default ``"classification"``),
    without the checkpoint-averaged ones unless ``checkpoints``."""
    tasks = tasks or ("classification",)
    return tuple(n for n, v in FORWARD_INF.items() if v.task in tasks and (checkpoints or not v.checkpoints))


METHODS = ("forward-inf", "if-100", "if-1000", "if-10000", "if-cg", "if-exact",
           "tracin-1", "tracin-3", "tracin-5", "tracin-last", "grad-cos", "representer",
           "knn-shapley", "tmc-shapley", "hydra", "hydra-last", "grad-dot")
# The peer libraries (optional installs): fit / influence per query only (no joint mode or
# self-influence), so they stay out of METHODS and its contract suite.
PEER_METHODS = tuple(PEERS)
# Nearest-neighbour references (no attribution theory, no self-influence): outside METHODS too.
REFERENCE_METHODS = ("pixel-nn", "feature-nn")

# What each method needs beyond the model and task; absent = nothing.
REQUIREMENTS: dict[str, frozenset[str]] = {
    **{f"tracin-{c}": frozenset({"checkpoints"}) for c in (1, 3, 5)},
    "hydra": frozenset({"trajectory"}),
    "hydra-last": frozenset({"trajectory"}),
}

LARGE_MODEL = 1_000_000  # trainable parameters above which influence functions use the last layer
EXACT_ALL = 2_000  # if-exact uses all parameters only up to this many


def requirements(name: str) -> frozenset[str]:
    """What method ``name`` needs from the training run: a subset of ``{"checkpoints", "trajectory"}``."""
    key = name.lower()
    if key in FORWARD_INF:
        return frozenset({"checkpoints"}) if FORWARD_INF[key].checkpoints else frozenset()
    if key not in METHODS + PEER_METHODS + REFERENCE_METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of "
                         f"{tuple(FORWARD_INF) + METHODS[1:] + PEER_METHODS + REFERENCE_METHODS}")
    return REQUIREMENTS.get(key, frozenset())


def make_estimator(name: str, model: nn.Module, task: Task | None = None, *,
                   checkpoints: Sequence[Any] | None = None, trajectory: Any = None,
                   train_fn: Any = None, **kw: Any) -> Estimator:
    """A fresh, unfitted estimator called ``name`` (one of :data:`FORWARD_INF`, :data:`METHODS`,
    :data:`PEER_METHODS` or :data:`REFERENCE_METHODS`); ``kw`` override its keywords.

    A Forward-INF variant's protocol flags (``checkpoints``, ``contrast``) are the experiments'
    to apply: here it is its estimator alone. ``forward-inf-tail`` splits by the ``"auto"`` rule
    (:mod:`forwardinf.estimators.split`) unless ``split=`` is given.

    ``checkpoints``: saved training checkpoints (state dicts or paths), oldest first, for the
    TracIn variants; ``lrs=`` may be given for all of them (it is sliced alongside).
    ``trajectory``: for HyDRA, the :class:`~forwardinf.baselines.hydra.TrajectoryRecorder` that
    recorded ``model``'s training (``model`` is its end point), or a path it was saved to.
    ``train_fn``: for TMC-Shapley, ``train_fn(data, seed) -> nn.Module`` (default: re-fit the
    last layer, :class:`~forwardinf.baselines.shapley.LastLayerTrainer`).
    Each argument is ignored by the methods that do not use it, so one call site serves all.
    """
    key = name.lower()
    requirements(key)  # refuses unknown names
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if key in FORWARD_INF:
        return _forward_inf(key, model, task, **kw)
    if key.startswith("if-"):
        solver = {"if-cg": "cg", "if-exact": "exact"}.get(key, "lissa")
        defaults: dict[str, Any] = {"solver": solver, "damping": "auto"}
        if solver == "lissa":
            defaults["depth"] = int(key.split("-")[1])
        if solver == "exact":
            defaults["params"] = None if n_params <= EXACT_ALL else "last"
        else:
            defaults["params"] = None if n_params <= LARGE_MODEL else "last"
        return InfluenceFunction(model, task, **{**defaults, **kw})
    if key in REFERENCE_METHODS:
        from forwardinf.baselines.nearest import make_nearest

        return make_nearest(key, model, task, **kw)
    if key in PEERS:
        extra: dict[str, Any] = {"dattri-if-lissa": {"solver": "lissa"}, "dattri-if-cg": {"solver": "cg"},
                                 "captum-tracincp": {"checkpoints": list(checkpoints or []) or None}}.get(key, {})
        return PEERS[key](model, task, **{**extra, **kw})
    if key == "grad-dot":
        return TracIn(model, task, **kw)
    if key.startswith("tracin-") or key == "grad-cos":
        ckpts = list(checkpoints or [])
        lrs = kw.pop("lrs", None)
        if lrs is not None and len(lrs) != len(ckpts):
            raise ValueError(f"{name}: {len(lrs)} lrs for {len(ckpts)} checkpoints")
        if key == "grad-cos":
            return TracIn(model, task, **{"normalize": True, **kw})
        want = 5 if key == "tracin-last" else int(key.split("-")[1])
        if key != "tracin-last" and len(ckpts) < want:
            raise ValueError(f"{name} needs at least {want} checkpoints, got {len(ckpts)}")
        chosen = ckpts[-want:] if ckpts else None
        chosen_lrs = list(lrs)[-want:] if lrs is not None and ckpts else None
        defaults = {"checkpoints": chosen, "lrs": chosen_lrs, "params": "last" if key == "tracin-last" else None}
        return TracIn(model, task, **{**defaults, **kw})
    if key == "knn-shapley":
        from forwardinf.baselines.shapley import KNNShapley

        return KNNShapley(model, task, **{"k": 10, **kw})
    if key == "tmc-shapley":
        from forwardinf.baselines.shapley import LastLayerTrainer, TMCShapley

        fn = train_fn if train_fn is not None else LastLayerTrainer(model)
        return TMCShapley(fn, task, **{"permutations": 20, "truncation": 0.05, **kw})
    if key in ("hydra", "hydra-last"):
        from forwardinf.baselines.hydra import HyDRA, TrajectoryRecorder

        if trajectory is None:
            raise ValueError(f"{name} needs trajectory=: a TrajectoryRecorder of the model's SGD training "
                             "(or the path TrajectoryRecorder.save wrote)")
        if isinstance(trajectory, (str, os.PathLike)):
            trajectory = TrajectoryRecorder.load(trajectory, model)
        return HyDRA(model, task, **{"trajectory": trajectory, "params": "last" if key == "hydra-last" else None, **kw})
    return RepresenterPoint(model, task, **kw)


def _forward_inf(name: str, model: nn.Module, task: Task | None, **overrides: Any) -> Estimator:
    variant = FORWARD_INF[name]
    kw = {**variant.kw, **overrides}
    if variant.estimator == "tail":
        from forwardinf.estimators.tail import TailForwardINF

        kw.setdefault("split", "auto")
        return TailForwardINF(model, task, **kw)
    if variant.estimator == "invariant":
        from forwardinf.estimators.invariant import InvariantForwardINF

        return InvariantForwardINF(model, task, **kw)
    from forwardinf.estimators.forward_inf import ForwardINF

    return ForwardINF.preset(kw.pop("preset", "default"), model, task, **kw)


def default_split(model: nn.Module) -> str:
    """The last top-level submodule holding parameters (an MLP's last Linear, SmallCNN's
    ``classifier``, ResNet's ``fc``): the tail variants' split before ``"auto"``."""
    from forwardinf.estimators.split import last_parametrized_child

    return last_parametrized_child(model)
