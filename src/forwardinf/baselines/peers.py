"""Peer libraries' attribution methods behind the estimator contract, for side-by-side runs.

Optional: the library does not depend on any of them. Each class imports its peer in ``fit``; a
missing peer raises ``ImportError`` whose ``name`` is the package and whose message holds the
install command (:data:`INSTALL`). Classification only: cross-entropy on ``(inputs, targets)``
tensors. The user's model is never modified: peers that load weights into, or wrap the layers
of, the module they are given (traker, captum, kronfluence) get a deep copy, once per ``fit``.
Every peer takes a ``seed``: its ``fit`` and ``influence`` run under a forked torch RNG seeded
from it (kronfluence's sampled-label Fisher, dattri's LiSSA batches draw from the global RNG), and
its projections take it, so a rerun gives identical scores and the caller's RNG is left alone.

Scores follow the library's orientation, ``[n_query, n_train]``, higher = proponent:

| name | class | what |
|---|---|---|
| ``trak`` | :class:`TRAK` | traker ``TRAKer`` (image classification = the margin output), float32 on CPU, ``proj_dim`` |
| ``dattri-trak`` | :class:`DattriTRAK` | dattri ``TRAKAttributor``, ``proj_dim`` |
| ``kronfluence-ekfac`` | :class:`KronfluenceEKFAC` | kronfluence EK-FAC factors on the training set (seeded sampled labels) + pairwise scores |
| ``captum-tracincp`` | :class:`CaptumTracInCP` | captum ``TracInCP`` over the given checkpoints (default: the model) |
| ``dattri-if-lissa`` / ``dattri-if-cg`` | :class:`DattriIF` | dattri influence functions |
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from forwardinf.baselines.run import TrainingRun, legacy_run
from forwardinf.data.inputs import DataLike, gather
from forwardinf.estimators.base import Estimator, EstimatorConfig, check_choice, check_positive
from forwardinf.tasks.base import Task
from forwardinf.tasks.classification import ClassificationTask

INSTALL = {  # the pip command that provides each peer's import
    "trak": "pip install traker",
    "captum": "pip install captum",
    "dattri": "pip install dattri",
    "kronfluence": "pip install --no-deps kronfluence  (its pinned dependencies would replace torch)",
}


def require(package: str) -> None:
    """Raise ``ImportError(name=package)`` with the install command unless ``package`` imports."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{package} is not installed ({INSTALL.get(package, 'pip install ' + package)})",
                          name=package)


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``[B]`` correct-class margin ``z_y - logsumexp_{j != y} z_j`` = ``log p_y / (1 - p_y)``
    (TRAK's output function for classification)."""
    return -ClassificationTask().score_loss(model, (x, y))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on the global torch RNG seeded with ``seed``, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True, kw_only=True)
class PeerConfig(EstimatorConfig):
    """The knobs every peer has: examples per batch and the seed of its RNG and projections."""

    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class TRAKConfig(PeerConfig):
    """Every knob of :class:`TRAK`."""

    proj_dim: int = 512
    checkpoints: Sequence[dict] | None = None
    lambda_reg: float = 0.0


@dataclass(frozen=True, kw_only=True)
class DattriTRAKConfig(PeerConfig):
    """Every knob of :class:`DattriTRAK`."""

    proj_dim: int = 512


@dataclass(frozen=True, kw_only=True)
class DattriIFConfig(PeerConfig):
    """Every knob of :class:`DattriIF`."""

    solver: str = "lissa"
    batch_size: int = 256


@dataclass(frozen=True, kw_only=True)
class KronfluenceEKFACConfig(PeerConfig):
    """Every knob of :class:`KronfluenceEKFAC`."""

    measurement: str = "margin"
    damping: float | None = 1e-8
    batch_size: int = 256


@dataclass(frozen=True, kw_only=True)
class CaptumTracInCPConfig(PeerConfig):
    """Every knob of :class:`CaptumTracInCP`; ``run`` holds the checkpoints."""

    run: TrainingRun | None = None


class _Peer(Estimator):
    """Shared plumbing: a scratch folder removed with the estimator, the training tensors, and the
    seeded RNG (subclasses implement ``_fit`` / ``_influence``; their settings are a :class:`PeerConfig`)."""

    package = ""
    Config: ClassVar[type[EstimatorConfig]] = PeerConfig

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: PeerConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of the class's ``Config``), or ``config=``."""
        if "checkpoints" in knobs and "run" in self.Config.names():  # the old keyword of CaptumTracInCP
            knobs["run"] = legacy_run(type(self).__name__, knobs.get("run"), {"checkpoints": knobs.pop("checkpoints")})
        super().__init__(model, task, config, **knobs)

    def fit(self, train: DataLike) -> "_Peer":
        with seeded(self.seed):
            return super().fit(train)

    def _check_params(self) -> None:
        name = type(self).__name__
        check_positive(name, "batch_size", self.batch_size, integer=True)
        if "proj_dim" in self.Config.names():
            check_positive(name, "proj_dim", self.proj_dim, integer=True)

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        with seeded(self.seed + 1):  # not the fit's stream: scoring twice after one fit still agrees
            return self._influence(queries, joint)

    def _load_train(self, train: DataLike) -> tuple[Tensor, Tensor]:
        require(self.package)
        self.__dict__.pop("shapes_", None)
        return self._tensors(train, "train")

    def _scratch(self) -> None:
        """A scratch folder for the peer's files, removed with the estimator: ``dir_``."""
        self.dir_ = Path(tempfile.mkdtemp(prefix=f"forwardinf-{self.package}-"))
        weakref.finalize(self, shutil.rmtree, str(self.dir_), True)

    def _queries(self, queries: DataLike, joint: bool) -> tuple[Tensor, Tensor]:
        self._check_fitted()
        if joint:
            raise ValueError(f"{type(self).__name__}: joint=True is not supported for a peer library")
        return self._tensors(queries, "queries")

    def _tensors(self, data: DataLike, name: str) -> tuple[Tensor, Tensor]:
        """``(inputs [N, ...], targets [N])`` of a classification dataset checked by the base's input
        check (:meth:`~forwardinf.estimators.base.Estimator._load`), gathered into one batch."""
        dataset = self._load(data, name, self.model)
        batch = gather(dataset, range(len(dataset)))
        return (batch["inputs"], batch["targets"]) if isinstance(batch, dict) else (batch[0], batch[1])


class TRAK(_Peer):
    """TRAK (Park et al. 2023) by its authors' ``traker`` package, on CPU in float32.

    ``traker``'s ``image_classification`` output function is the correct-class margin; its
    features are projected to ``proj_dim`` dimensions (a normal JL projection on CPU). With
    several ``checkpoints`` (independently trained models, TRAK's ensemble) the scores are summed
    by traker; default: the model alone.

    Args: proj_dim, checkpoints (state dicts), batch_size, seed (projector and RNG), lambda_reg
    (traker's ridge on ``XᵀX``; needed when ``proj_dim`` exceeds the number of training points).
    """

    package = "trak"
    Config = TRAKConfig

    def _fit(self, train: tuple[Tensor, Tensor]) -> None:
        self._scratch()
        from trak import TRAKer

        x, y = self.train_
        self.states_ = list(self.checkpoints or [self.model.state_dict()])
        self.traker_ = TRAKer(model=copy.deepcopy(self.model), task="image_classification", train_set_size=len(y),
                              save_dir=str(self.dir_), device="cpu", proj_dim=self.proj_dim,
                              use_half_precision=False, projector_seed=self.seed, lambda_reg=self.lambda_reg,
                              logging_level=logging.WARNING)
        for c, state in enumerate(self.states_):
            self.traker_.load_checkpoint(state, model_id=c)
            for a in range(0, len(y), self.batch_size):
                self.traker_.featurize(batch=[x[a:a + self.batch_size], y[a:a + self.batch_size]],
                                       num_samples=len(y[a:a + self.batch_size]))
        self.traker_.finalize_features()
        self.n_scored_ = 0

    def _influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        xq, yq = self._queries(queries, joint)
        name = f"queries{self.n_scored_}"  # traker keeps every experiment in its folder
        self.n_scored_ += 1
        for c, state in enumerate(self.states_):
            self.traker_.start_scoring_checkpoint(exp_name=name, checkpoint=state, model_id=c, num_targets=len(yq))
            for a in range(0, len(yq), self.batch_size):
                self.traker_.score(batch=[xq[a:a + self.batch_size], yq[a:a + self.batch_size]],
                                   num_samples=len(yq[a:a + self.batch_size]))
        scores = self.traker_.finalize_scores(exp_name=name)  # [N, Q]
        return torch.as_tensor(scores).float().T.contiguous()


def _dattri_task(model: nn.Module, output: str = "loss") -> Any:
    """dattri's ``AttributionTask``: ``loss_func`` is the cross-entropy (``output="loss"``) or the
    margin (``"margin"``: dattri's TRAK takes its output function from ``loss_func``, as in its
    own TRAK examples)."""
    from dattri.task import AttributionTask

    def loss(params: dict, data: Any) -> Tensor:  # one (image, label) under dattri's vmap, or a batch
        x, y = data[0], data[1].long()  # dattri's LiSSA sampler hands labels over as floats
        if y.ndim == 0:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        net = lambda inputs: torch.func.functional_call(model, params, (inputs,))  # noqa: E731
        if output == "margin":
            return _margin(net, x, y).sum()
        return nn.functional.cross_entropy(net(x), y)

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


class DattriTRAK(_Peer):
    """dattri's ``TRAKAttributor`` with one checkpoint (the model), a ``proj_dim`` projection,
    the margin as output function and the correct-class probability for TRAK's ``Q``."""

    package = "dattri"
    Config = DattriTRAKConfig

    def _fit(self, train: tuple[Tensor, Tensor]) -> None:
        self._scratch()
        from dattri.algorithm.trak import TRAKAttributor

        model = self.model

        def correct_probability(params: dict, sample: Any) -> Tensor:  # dattri: one example at a time
            x, y = sample
            logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
            return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0)))

        self.attributor_ = TRAKAttributor(_dattri_task(model, "margin"), correct_probability,
                                          projector_kwargs={"proj_dim": self.proj_dim, "proj_seed": self.seed,
                                                            "device": "cpu"}, device="cpu")
        self.attributor_.cache(DataLoader(TensorDataset(*self.train_), batch_size=self.batch_size, shuffle=False))

    def _influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        xq, yq = self._queries(queries, joint)
        loader = DataLoader(TensorDataset(xq, yq), batch_size=len(yq), shuffle=False)
        return self.attributor_.attribute(loader).T.contiguous()  # dattri: [N, Q]


class DattriIF(_Peer):
    """dattri's influence functions: ``solver="lissa"`` (depth 100, batch 32, damping 1e-3,
    scaling 50) or ``"cg"`` (10 iterations, regularization 1e-3). Queries go one per batch:
    dattri batches its solver over a batch's queries, which ran out of memory on a 455k-parameter
    CNN (LiSSA: 12 GB for 16 queries; CG: 13 GB)."""

    package = "dattri"
    Config = DattriIFConfig

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("DattriIF", "solver", self.solver, ("lissa", "cg"))

    def _fit(self, train: tuple[Tensor, Tensor]) -> None:
        self._scratch()
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorLiSSA

        task = _dattri_task(self.model)
        if self.solver == "cg":
            self.attributor_ = IFAttributorCG(task, max_iter=10, regularization=1e-3, device="cpu")
        else:
            self.attributor_ = IFAttributorLiSSA(task, recursion_depth=100, batch_size=32, damping=1e-3,
                                                 scaling=50.0, device="cpu")
        self.loader_ = DataLoader(TensorDataset(*self.train_), batch_size=self.batch_size, shuffle=False)
        self.attributor_.cache(self.loader_)

    def _influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        xq, yq = self._queries(queries, joint)
        scores = self.attributor_.attribute(self.loader_, DataLoader(TensorDataset(xq, yq), batch_size=1, shuffle=False))
        return scores.T.contiguous()  # dattri: [N, Q], larger = the training point helps the query more


class KronfluenceEKFAC(_Peer):
    """Kronfluence's EK-FAC influence: factors fitted on the training set (true Fisher: labels
    sampled from the model, kronfluence's default; seeded by ``seed``), pairwise scores of the queries' measurement.

    ``measurement``: ``"margin"`` (minus the correct-class margin, as in kronfluence's own
    classification examples) or ``"loss"`` (cross-entropy). ``damping``: kronfluence's
    ``damping_factor`` (its default 1e-8; None = its heuristic, 0.1 x the mean eigenvalue).
    Positive = helpful (lowers the measurement).
    """

    package = "kronfluence"
    Config = KronfluenceEKFACConfig

    def _check_params(self) -> None:
        super()._check_params()
        check_choice("KronfluenceEKFAC", "measurement", self.measurement, ("margin", "loss"))

    def _fit(self, train: tuple[Tensor, Tensor]) -> None:
        self._scratch()
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task as KTask

        margin = self.measurement == "margin"

        class CrossEntropy(KTask):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
                x, y = batch
                logits = model(x)
                if sample:  # the true Fisher: labels sampled from the model
                    with torch.no_grad():
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                return nn.functional.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                # minus the margin (kronfluence's own classification examples), or the loss
                task = ClassificationTask()
                return (task.score_loss(model, batch) if margin else task.loss(model, batch)).sum()

        self.ktask_ = CrossEntropy()
        work = prepare_model(copy.deepcopy(self.model), self.ktask_)
        self.analyzer_ = Analyzer("forwardinf", work, self.ktask_, cpu=True, disable_tqdm=True,
                                  output_dir=str(self.dir_ / "kronfluence"))
        self.analyzer_.fit_all_factors("ekfac", TensorDataset(*self.train_), per_device_batch_size=self.batch_size,
                                       factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        self.n_scored_ = 0

    def _fit_like(self, other: Estimator) -> "KronfluenceEKFAC":
        """Share ``other``'s fitted factors when only ``damping`` differs: kronfluence applies the
        damping when scoring, so a damping sweep is one factor fit (``with_config``)."""
        if (type(other) is not type(self) or other.model is not self.model or other.task is not self.task
                or other.config.replace(damping=self.damping) != self.config):
            return self.fit(other.train_)
        self._check_params()
        # ``other`` kept alive with its scratch folder (removed when it is collected); unique score names
        self.train_, self.ktask_, self.analyzer_, self.dir_, self.shares_ = (other.train_, other.ktask_,
                                                                            other.analyzer_, other.dir_, other)
        if "shapes_" in other.__dict__:
            self.shapes_ = other.shapes_
        self.n_scored_ = 0
        self.fitted_config_ = self.config
        return self

    def _influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        from kronfluence.arguments import ScoreArguments

        xq, yq = self._queries(queries, joint)
        name = f"scores{id(self)}-{self.n_scored_}"  # estimators sharing one analyzer (_fit_like) never clash
        self.n_scored_ += 1
        self.analyzer_.compute_pairwise_scores(name, "ekfac", TensorDataset(xq, yq), TensorDataset(*self.train_),
                                               score_args=ScoreArguments(damping_factor=self.damping),
                                               per_device_query_batch_size=min(len(yq), 64),
                                               per_device_train_batch_size=self.batch_size, overwrite_output_dir=True)
        return self.analyzer_.load_pairwise_scores(name)["all_modules"].float()  # [Q, N], positive = helpful


class CaptumTracInCP(_Peer):
    """captum's ``TracInCP`` over ``run.checkpoints`` (a :class:`~forwardinf.baselines.run.TrainingRun`'s
    state dicts or their paths, oldest first; default: the model as the one checkpoint), every
    layer, learning-rate weight 1 per checkpoint."""

    package = "captum"
    Config = CaptumTracInCPConfig

    def _fit(self, train: tuple[Tensor, Tensor]) -> None:
        self._scratch()
        from captum.influence import TracInCP

        paths = []
        checkpoints = self.run.checkpoints if self.run is not None else ()
        for c, state in enumerate(checkpoints or [self.model.state_dict()]):
            if isinstance(state, (str, os.PathLike)):  # a saved state dict already
                paths.append(os.fspath(state))
                continue
            paths.append(str(self.dir_ / f"checkpoint{c}.pt"))
            torch.save(state, paths[-1])

        def load(m: nn.Module, path: str) -> float:
            m.load_state_dict(torch.load(path, weights_only=True))
            return 1.0  # the learning-rate weight of this checkpoint

        self.tracin_ = TracInCP(copy.deepcopy(self.model), TensorDataset(*self.train_), paths, load,
                                loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=self.batch_size,
                                sample_wise_grads_per_batch=True)

    def _influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        xq, yq = self._queries(queries, joint)
        return self.tracin_.influence((xq, yq), show_progress=False)  # [Q, N], proponents positive
