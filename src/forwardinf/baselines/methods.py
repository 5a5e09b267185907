"""Every estimator by name: the one method table (:data:`TABLE`), ``--methods`` of the CLI and
:func:`make_estimator`, with per-method defaults for classification networks.

| name | estimator |
|---|---|
| ``forward-inf`` and ``forward-inf-*`` | the named Forward-INF configurations of :data:`FORWARD_INF` (table below) |
| ``if-100`` / ``if-1000`` / ``if-10000`` | ``InfluenceFunction(solver="lissa", depth=N)`` (the paper's IF-N) |
| ``if-cg`` | ``InfluenceFunction(solver="cg", depth=100)`` |
| ``if-exact`` | ``InfluenceFunction(solver="exact")`` |
| ``tracin-1`` / ``-3`` / ``-5`` | ``TracIn`` (all layers) over the last 1 / 3 / 5 checkpoints of the training run |
| ``tracin-last`` | ``TracIn(params="last")`` over the last (up to) 5 checkpoints, or the model |
| ``grad-cos`` | ``TracIn(normalize=True)`` on the final model (gradient cosine) |
| ``grad-dot`` | ``TracIn()`` on the final model (gradient dot product) |
| ``representer`` | ``RepresenterPoint`` |
| ``pixel-nn`` / ``feature-nn`` | ``NearestNeighbour`` in pixel / penultimate-feature space (references, :mod:`forwardinf.baselines.nearest`) |
| ``knn-shapley`` | ``KNNShapley(k=10)`` on the penultimate-layer embedding (exact, closed form) |
| ``tmc-shapley`` | ``TMCShapley(permutations=20, truncation=0.05)`` over the run's ``train_fn``, by default ``LastLayerTrainer(model)`` |
| ``hydra`` / ``hydra-last`` | ``HyDRA`` (fast form) over the run's recorded ``trajectory``, all layers / last layer |
| ``trak``, ``dattri-trak``, ``kronfluence-ekfac``, ``captum-tracincp``, ``dattri-if-lissa``, ``dattri-if-cg`` | the peer libraries (optional installs), :mod:`forwardinf.baselines.peers`; ``captum-tracincp`` uses the run's checkpoints |

What a method needs beyond the model (:func:`requirements`, ``Method.needs``): fields of the
:class:`~forwardinf.baselines.run.TrainingRun`: ``"checkpoints"`` (TracIn-1/3/5: saved training
snapshots), ``"trajectory"`` (HyDRA: a :class:`TrajectoryRecorder` of the model's SGD training,
or the path it was saved to). ``tmc-shapley`` retrains: it uses the run's ``train_fn`` and falls
back to re-fitting the model's last layer. The experiments read :func:`requirements` to record
only what the chosen methods use, and pass it all in as ``make_estimator(name, model, task,
run=TrainingRun(...))``; a user does the same from Python.

Influence functions use ``damping="auto"`` (1% of the Hessian's top eigenvalue plus twice its
most negative one, estimated by Lanczos): trained networks have negative curvature, on which a
fixed small damping makes LiSSA diverge and CG stop early.

Forward-INF variants (:data:`FORWARD_INF`): one configuration object per name (a
``ForwardINFConfig``, or the ``TailForwardINFConfig`` / ``InvariantForwardINFConfig`` whose class
picks the estimator), so a name means the same configuration in every experiment. Each experiment
picks its default names from here.

| name | configuration | used by default in |
|---|---|---|
| ``forward-inf`` | ``ForwardINF`` defaults (preset ``default``: nsgd, lr 1e-3, 1 step, ``score="cosine"``) | leakage, memorization, lds |
| ``forward-inf-<preset>`` | ``ForwardINF.preset(<preset>)``: ``paper``, ``authors``, ``group``, ``counterfactual`` | leakage, mislabel, memorization (paper) |
| ``forward-inf-<score>`` | defaults with ``score=<score>``: ``margin``, ``loss``, ``abs``, ``influence``, ``cosine`` (= ``forward-inf``) | mislabel (``margin``) |
| ``forward-inf-tail`` / ``forward-inf-counterfactual-tail`` | ``TailForwardINF`` with ``split="auto"``: the layers after the last convolution / pooling / attention (a CNN's dense head; an MLP's every layer; :mod:`forwardinf.estimators.split`) (defaults / counterfactual preset) | lds |
| ``forward-inf-counterfactual-ekfac`` | preset ``counterfactual`` with ``eigencorrect=True`` (EK-FAC eigenvalues) | |
| ``forward-inf-invariant`` | ``InvariantForwardINF`` (images only) | |
| ``forward-inf-margin-cp`` / ``forward-inf-cosine-cp`` | ``forward-inf-margin`` / ``forward-inf`` averaged by the mislabel experiment over the run's checkpoints (they need ``checkpoints``) | mislabel |
| ``forward-inf-diffusion`` | adam, lr 3e-4, 3 steps, ``score="margin"`` (change of the log loss) on a ``DiffusionTask`` | diffusion |
| ``forward-inf-diffusion-{paper,loss,abs,nsgd,cosine,contrast}`` | the diffusion experiment's other variants (``-contrast``: the experiment subtracts the same ascent on the pre-trained model's samples) | |
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

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from forwardinf.baselines.hydra import HyDRA
from forwardinf.baselines.influence_function import InfluenceFunction
from forwardinf.baselines.nearest import NearestNeighbour
from forwardinf.baselines.peers import TRAK, CaptumTracInCP, DattriIF, DattriTRAK, KronfluenceEKFAC
from forwardinf.baselines.representer import RepresenterPoint
from forwardinf.baselines.retraining import legacy_run
from forwardinf.baselines.run import TrainingRun
from forwardinf.baselines.shapley import KNNShapley, LastLayerTrainer, TMCShapley
from forwardinf.baselines.tracin import TracIn
from forwardinf.estimators.base import Estimator
from forwardinf.estimators.forward_inf import PRESETS as _FI_PRESETS
from forwardinf.estimators.forward_inf import SCORES as _FI_SCORES
from forwardinf.estimators.forward_inf import ForwardINF, ForwardINFConfig
from forwardinf.estimators.invariant import InvariantForwardINF, InvariantForwardINFConfig
from forwardinf.estimators.tail import TailForwardINF, TailForwardINFConfig
from forwardinf.tasks.base import Task

__all__ = ["Method", "Variant", "TABLE", "FORWARD_INF", "METHODS", "PEER_METHODS", "REFERENCE_METHODS", "PEERS",
           "forward_inf_names", "requirements", "make_estimator", "LARGE_MODEL", "EXACT_ALL"]

LARGE_MODEL = 1_000_000  # trainable parameters above which influence functions use the last layer
EXACT_ALL = 2_000  # if-exact uses all parameters only up to this many

# (name, model, task, run, settings) -> a fresh estimator
Build = Callable[[str, nn.Module, "Task | None", TrainingRun, dict], Estimator]


@dataclass(frozen=True, kw_only=True)
class Method:
    """One name of :data:`TABLE`: what it builds and what it needs from the training run.

    estimator: the class built; settings: its keywords for this name (the caller's override
    them); kind: ``"library"`` (a baseline), ``"peer"`` (an optional peer library) or
    ``"reference"`` (nearest neighbours), ``"variant"`` for a :class:`Variant`; needs: the :class:`TrainingRun` fields it requires;
    build: for names whose keywords depend on the model or the run (default: the class with
    ``settings``).
    """

    estimator: type[Estimator]
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "library"
    needs: frozenset[str] = frozenset()
    build: Build | None = None

    def make(self, name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
        if self.build is not None:
            return self.build(name, model, task, run, {**self.settings, **kw})
        return self.estimator(model, task, **{**self.settings, **kw})


# The class of a variant's configuration picks its estimator.
_FI_CLASSES: dict[type, type[Estimator]] = {ForwardINFConfig: ForwardINF, TailForwardINFConfig: TailForwardINF,
                                            InvariantForwardINFConfig: InvariantForwardINF}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One named Forward-INF configuration: ``config`` (checked when made; its class picks the
    estimator), the kind of ``task`` it was set for (``"classification"``, ``"image"``:
    classification of images only, ``"diffusion"``, ``"language"``, ``"convex"``: the hypothesis
    study's linear model) and what it ``needs`` from the training run (``checkpoints`` for the
    variants the mislabel experiment averages over them). ``settings``: the fields the name sets
    (its preset's and its own), as recorded in results."""

    config: ForwardINFConfig
    settings: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    needs: frozenset[str] = frozenset()
    kind = "variant"

    @property
    def estimator(self) -> type[Estimator]:
        return _FI_CLASSES[type(self.config)]

    @property
    def kw(self) -> dict[str, Any]:
        """A copy of ``settings``: the estimator keywords the name stands for."""
        return dict(self.settings)

    def make(self, name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
        return self.estimator(model, task, config=self.config, **kw)


def _fi(preset: str = "default", cls: type[ForwardINFConfig] = ForwardINFConfig, task: str = "classification",
        needs: frozenset[str] = frozenset(), **fields: Any) -> Variant:
    settings = {**(_FI_PRESETS[preset] if preset != "default" else {}), **fields}
    return Variant(config=cls.preset(preset).replace(**fields), settings=settings, task=task, needs=needs)


_CP = frozenset({"checkpoints"})
_DIFFUSION = dict(score="margin", optimizer="adam", lr=3e-4, steps=3, task="diffusion")
FORWARD_INF: dict[str, Variant] = {
    "forward-inf": _fi(),
    **{f"forward-inf-{p}": _fi(p) for p in _FI_PRESETS if p != "default"},
    **{f"forward-inf-{s}": _fi(score=s) for s in _FI_SCORES if s not in _FI_PRESETS},
    "forward-inf-tail": _fi(cls=TailForwardINFConfig, split="auto"),
    # the counterfactual preset on the tail only (cached prefix: a CNN's queries cost its classifier)
    "forward-inf-counterfactual-tail": _fi("counterfactual", TailForwardINFConfig, split="auto"),
    # the counterfactual preset on EK-FAC curvature (eigenvalues corrected by one more sweep)
    "forward-inf-counterfactual-ekfac": _fi("counterfactual", eigencorrect=True),
    # The update averages over shifted views of each query, mirrored ones scored apart (mirrors
    # only where a flip keeps the label, see data.augment.flip_is_sensible).
    "forward-inf-invariant": _fi(cls=InvariantForwardINFConfig, task="image"),
    # Mislabel detection (self-influence), averaged over the run's checkpoints by the experiment:
    # margin ranks like cosine there without cosine's extra forward-mode sweeps in fit
    # (benchmarks/results/mislabel.md).
    "forward-inf-margin-cp": _fi(score="margin", needs=_CP),
    "forward-inf-cosine-cp": _fi(needs=_CP),
    # Diffusion (joint ascent on the generated images): the change of the log loss after 3 Adam
    # steps (benchmarks/results/diffusion.md); "-paper" is the paper's recipe (Adam lr 1e-5, raw
    # loss change); "-contrast" (the experiment's protocol) subtracts the same ascent on the
    # pre-trained model's samples.
    "forward-inf-diffusion": _fi(**_DIFFUSION),
    "forward-inf-diffusion-paper": _fi(**{**_DIFFUSION, "score": "loss", "lr": 1e-5}),
    "forward-inf-diffusion-loss": _fi(**{**_DIFFUSION, "score": "loss"}),
    "forward-inf-diffusion-abs": _fi(**{**_DIFFUSION, "score": "abs"}),
    "forward-inf-diffusion-nsgd": _fi(**{**_DIFFUSION, "optimizer": "nsgd", "lr": 1e-3}),
    # the setting measured in benchmarks/results/diffusion.md (per-example gradients of a UNet not measured)
    "forward-inf-diffusion-cosine": _fi(**{**_DIFFUSION, "score": "cosine", "sensitivity": "directions", "n_directions": 16}),
    "forward-inf-diffusion-contrast": _fi(**_DIFFUSION),
    # The hypothesis study's convex setting (experiments/hypothesis.py,
    # --option forward-inf-convex.lr): one plain SGD step, whose loss change is to first order the
    # gradient dot product.
    "forward-inf-convex": _fi(optimizer="sgd", score="loss", steps=1, lr=1e-3, task="convex"),
    # Fact tracing in a language model: lr and the parameter subset are tuned per run on held-out
    # queries (experiments/trace.py, --option forward-inf.lr=[...] / forward-inf.params=[...]).
    "forward-inf-trace": _fi(optimizer="nsgd", steps=1, score="loss", task="language"),
}


# -- builders of the names whose keywords depend on the model or the run ----------------------
def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _influence(name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
    """Every parameter up to ``LARGE_MODEL`` (``EXACT_ALL`` for the exact solver), else the last layer."""
    limit = EXACT_ALL if kw["solver"] == "exact" else LARGE_MODEL
    return InfluenceFunction(model, task, **{"params": None if _trainable(model) <= limit else "last", **kw})


def _tracin(name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
    """``last`` of the run's checkpoints (at least that many when ``least``), else the model alone."""
    last, least = kw.pop("last"), kw.pop("least")
    n = len(run.checkpoints)
    if n < least:
        raise ValueError(f"{name} needs at least {least} checkpoints, got {n}")
    return TracIn(model, task, **{"run": run.last(last) if n else None, **kw})


def _tmc(name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
    fn = run.train_fn if run.train_fn is not None else LastLayerTrainer(model)
    return TMCShapley(TrainingRun(train_fn=fn, recipe=run.recipe), task, **kw)


def _hydra(name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
    run.require(name, "trajectory")
    return HyDRA(model, task, **{"run": run, **kw})


def _with_run(name: str, model: nn.Module, task: Task | None, run: TrainingRun, kw: dict) -> Estimator:
    """A peer over the run's checkpoints (the model alone without)."""
    return CaptumTracInCP(model, task, **{"run": run if run.checkpoints else None, **kw})


def _if(solver: str, **settings: Any) -> Method:
    return Method(estimator=InfluenceFunction, settings={"solver": solver, "damping": "auto", **settings},
                  build=_influence)


def _tr(last: int, least: int, **settings: Any) -> Method:
    return Method(estimator=TracIn, settings={"last": last, "least": least, **settings}, build=_tracin,
                  needs=_CP if least else frozenset())


TABLE: dict[str, Variant | Method] = {
    **FORWARD_INF,
    "if-100": _if("lissa", depth=100),
    "if-1000": _if("lissa", depth=1000),
    "if-10000": _if("lissa", depth=10000),
    "if-cg": _if("cg"),
    "if-exact": _if("exact"),
    "tracin-1": _tr(1, 1),
    "tracin-3": _tr(3, 3),
    "tracin-5": _tr(5, 5),
    "tracin-last": _tr(5, 0, params="last"),
    "grad-cos": Method(estimator=TracIn, settings={"normalize": True}),
    "representer": Method(estimator=RepresenterPoint),
    "knn-shapley": Method(estimator=KNNShapley, settings={"k": 10}),
    "tmc-shapley": Method(estimator=TMCShapley, settings={"permutations": 20, "truncation": 0.05}, build=_tmc),
    "hydra": Method(estimator=HyDRA, settings={"params": None}, build=_hydra, needs=frozenset({"trajectory"})),
    "hydra-last": Method(estimator=HyDRA, settings={"params": "last"}, build=_hydra, needs=frozenset({"trajectory"})),
    "grad-dot": Method(estimator=TracIn),
    # The peer libraries (optional installs): fit / influence per query only (no joint mode or
    # self-influence), so they stay out of METHODS and its contract suite.
    "trak": Method(estimator=TRAK, kind="peer"),
    "dattri-trak": Method(estimator=DattriTRAK, kind="peer"),
    "kronfluence-ekfac": Method(estimator=KronfluenceEKFAC, kind="peer"),
    "captum-tracincp": Method(estimator=CaptumTracInCP, kind="peer", build=_with_run),
    "dattri-if-lissa": Method(estimator=DattriIF, settings={"solver": "lissa"}, kind="peer"),
    "dattri-if-cg": Method(estimator=DattriIF, settings={"solver": "cg"}, kind="peer"),
    # Nearest-neighbour references (no attribution theory, no self-influence): outside METHODS too.
    "pixel-nn": Method(estimator=NearestNeighbour, settings={"embedding": "inputs"}, kind="reference"),
    "feature-nn": Method(estimator=NearestNeighbour, settings={"embedding": "penultimate"}, kind="reference"),
}

# Views of TABLE by kind (their order is the table's).
# METHODS: the library's own estimators, the default Forward-INF variant (the table's first) and the baselines.
METHODS = (next(iter(FORWARD_INF)), *(n for n, m in TABLE.items() if m.kind == "library"))
PEER_METHODS = tuple(n for n, m in TABLE.items() if m.kind == "peer")
REFERENCE_METHODS = tuple(n for n, m in TABLE.items() if m.kind == "reference")
PEERS: dict[str, type[Estimator]] = {n: TABLE[n].estimator for n in PEER_METHODS}


def forward_inf_names(*tasks: str, checkpoints: bool = False) -> tuple[str, ...]:
    """The :data:`FORWARD_INF` names set for one of ``tasks`` (default ``"classification"``),
    without the ones that need checkpoints unless ``checkpoints``."""
    tasks = tasks or ("classification",)
    return tuple(n for n, v in FORWARD_INF.items() if v.task in tasks and (checkpoints or not v.needs))


def _method(name: str) -> Variant | Method:
    method = TABLE.get(name.lower())
    if method is None:
        raise ValueError(f"unknown method {name!r}; expected one of {tuple(TABLE)}")
    return method


def requirements(name: str) -> frozenset[str]:
    """What method ``name`` needs from the training run: a subset of ``{"checkpoints", "trajectory"}``."""
    return _method(name).needs


def make_estimator(name: str, model: nn.Module | None = None, task: Task | None = None, *,
                   run: TrainingRun | None = None, **kw: Any) -> Estimator:
    """A fresh, unfitted estimator called ``name`` (a key of :data:`TABLE`); ``kw`` override its keywords.

    ``run``: the :class:`~forwardinf.baselines.run.TrainingRun` the methods that look at the
    training read (TracIn's ``checkpoints`` and ``lrs``, sliced to the last ones it uses; HyDRA's
    ``trajectory``; TMC-Shapley's ``train_fn``, default: re-fit the last layer); each method
    ignores what it does not use, so one call site serves all. ``model`` defaults to
    ``run.model``. (The old ``checkpoints=`` / ``lrs=`` / ``trajectory=`` / ``train_fn=``
    keywords still work, with a ``DeprecationWarning``.)

    A Forward-INF variant's protocol (averaging over checkpoints, a contrast) is the experiments'
    to apply: here it is its estimator alone.
    """
    method = _method(name)
    old = {k: kw.pop(k) for k in ("checkpoints", "lrs", "trajectory", "train_fn") if k in kw}
    run = legacy_run(f"make_estimator({name!r})", run, old) or TrainingRun()
    if model is None:
        model = run.model
    return method.make(name.lower(), model, task, run, kw)
