"""One contract suite over every estimator of the registry, Forward-INF included, and the library's
estimators outside it: tail-only Forward-INF and the retraining ones (leave-one-out, Downsampling),
whose tiny training function re-fits the model's last layer (milliseconds per training).

Shapes, determinism, the user's model untouched (parameters, buffers, per-module train/eval
flags), and bad input refused with ValueError / NotFittedError.

Each method gets what it declares it needs (``registry.requirements``): TracIn saved checkpoints,
HyDRA the recorded SGD trajectory of a real (short) training of the very model under test, whose
end point is the model the estimator sees. ``top_k`` breaks ties by the lower training index
(KNN-Shapley gives its K nearest same-label neighbours equal values), and is checked exactly.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import forwardinf as fi
from forwardinf.baselines import METHODS, make_estimator
from forwardinf.baselines.hydra import TrajectoryRecorder
from forwardinf.baselines.methods import FORWARD_INF, PEER_METHODS, PEERS, REFERENCE_METHODS, requirements
from forwardinf.core.params import fingerprint
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.base import NotFittedError, TopK
from forwardinf.tasks import ClassificationTask

HAVE_FORWARD_INF = importlib.util.find_spec("forwardinf.estimators.forward_inf") is not None
# LiSSA's depth only changes how long the same code path runs; the contract does not depend on it.
# Likewise TMC-Shapley's number of permutations.
OVERRIDES = {"if-1000": {"depth": 100}, "if-10000": {"depth": 100}, "tmc-shapley": {"permutations": 4}}
N_TRAIN, N_QUERY, N_FEATURES, N_CLASSES = 24, 4, 6, 3
# An untrained net's damped Hessian is indefinite; the IF solvers say so, which is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore:.*positive definite")


def _last_layer_trainer(model: nn.Module) -> fi.LastLayerTrainer:
    return fi.LastLayerTrainer(model, max_iter=5)


# Estimators outside the registry: name -> builder(model, task).
EXTRA = {
    "tail-forward-inf": lambda model, task: fi.TailForwardINF(model, task, split="4", batch_size=8),
    "leave-one-out": lambda model, task: fi.LeaveOneOut(_last_layer_trainer(model), task),
    "downsampling": lambda model, task: fi.Downsampling(_last_layer_trainer(model), task, n_models=16),
}
ALL = (*METHODS, *EXTRA)


def _model(name: str | None = None) -> nn.Module:
    """The mixed-mode model under test; for a method that needs a trajectory, trained (and recorded)
    for a few SGD steps on the training data first, so the trajectory ends at this model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(8, N_CLASSES))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    if name is not None and name not in EXTRA and "trajectory" in requirements(name):
        TRAJECTORIES[name] = _record(model)
    model.train()
    model[3].eval()  # a mixed-mode model: every flag must come back as it was
    return model


TRAJECTORIES: dict[str, TrajectoryRecorder] = {}


def _record(model: nn.Module) -> TrajectoryRecorder:
    """Two epochs of SGD with momentum (batches of 8) on the training data, recorded."""
    x, y = _data(N_TRAIN, 0)
    rec = TrajectoryRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(N_TRAIN, generator=g).split(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            rec.record(idx, opt)
            opt.step()
    return rec


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_FEATURES, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def _checkpoints(model: nn.Module) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{k: v + 0.05 * c * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()} for c in range(5)]


def _make(name: str, model: nn.Module):
    if name == "forward-inf" and not HAVE_FORWARD_INF:
        pytest.skip("forwardinf.estimators.forward_inf is not there yet")
    if name in EXTRA:
        return EXTRA[name](model, ClassificationTask())
    run = fi.TrainingRun(checkpoints=_checkpoints(model), trajectory=TRAJECTORIES.get(name))
    return make_estimator(name, model, ClassificationTask(), run=run, **OVERRIDES.get(name, {}))


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_model_untouched(name):
    model = _model(name)
    before, flags = fingerprint(model), _flags(model)
    train, queries = _data(N_TRAIN, 0), _data(N_QUERY, 1)
    est = _make(name, model)
    assert est.fit(train) is est
    scores = est.influence(queries)
    assert scores.shape == (N_QUERY, N_TRAIN) and torch.isfinite(scores).all()
    joint = est.influence(queries, joint=True)
    assert joint.shape == (N_TRAIN,) and torch.isfinite(joint).all()
    top = est.top_k(queries, k=5)
    assert isinstance(top, TopK) and top.indices.shape == top.scores.shape == (N_QUERY, 5)
    # Best first; equal scores in training-index order (the first index attaining the maximum first).
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(top.indices, order.indices[:, :5]) and torch.equal(top.scores, order.values[:, :5])
    lowest = torch.sort(scores, dim=1, stable=True)
    assert torch.equal(top.opponents, lowest.indices[:, :5]) and torch.equal(top.opponent_scores, lowest.values[:, :5])
    # streamed over training chunks (estimators that score slices): the very same answer
    streamed = est.top_k(queries, k=5, chunk=5)
    for a, b in [(streamed.indices, top.indices), (streamed.scores, top.scores), (streamed.opponents, top.opponents)]:
        assert torch.equal(a, b)
    caps = est.capabilities
    assert isinstance(caps, fi.Capabilities)
    if caps.indices:
        torch.testing.assert_close(est.influence(queries, indices=[3, 0, 17]), scores[:, [3, 0, 17]], rtol=1e-3, atol=1e-4)
    try:
        own = est.self_influence()
    except NotImplementedError:
        own = None
    if own is not None:
        assert own.shape == (N_TRAIN,) and torch.isfinite(own).all()
    assert (own is None) == (caps.self_influence is None), "capabilities.self_influence must say what it means"
    after = fingerprint(model)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (n, a), (_, b) in zip(before, after):
        assert torch.equal(a, b), f"{name} changed {n}"
    assert _flags(model) == flags, f"{name} changed a train/eval flag"


# Self-influence that is NOT the diagonal of influence(train), by definition.
SELF_NOT_DIAGONAL = {
    "tail-forward-inf": "as forward-inf",
    "forward-inf": "the paper's self mode: ONE joint update on the whole training set, not one per point",
    "tmc-shapley": "each point's value in the game of its own loss, never truncated; the diagonal of "
                   "influence(train) comes from the joint game of all n queries, truncated",
}


@pytest.mark.parametrize("name", [m for m in ALL if m not in SELF_NOT_DIAGONAL])
def test_self_influence_is_the_diagonal(name):
    model = _model(name)
    train = _data(N_TRAIN, 0)
    est = _make(name, model).fit(train)
    try:
        own = est.self_influence()
    except NotImplementedError:
        pytest.skip(f"{name} has no self-influence")
    assert "not the diagonal" not in est.capabilities.self_influence
    diagonal = est.influence(train).diagonal()
    torch.testing.assert_close(own.double(), diagonal.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    model = _model(name)
    train, queries = _data(N_TRAIN, 0), _data(N_QUERY, 1)
    a = _make(name, model).fit(train).influence(queries)
    b = _make(name, model).fit(train).influence(queries)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_bad_input_refused(name):
    model = _model(name)
    train = _data(N_TRAIN, 0)
    x, y = _data(N_QUERY, 1)
    with pytest.raises(NotFittedError):
        _make(name, model).influence((x, y))
    est = _make(name, model).fit(train)
    with pytest.raises(ValueError):
        est.influence((x[:, :-1], y))  # feature shape mismatch
    with pytest.raises(ValueError):
        est.influence((x[:0], y[:0]))  # no queries
    with pytest.raises(ValueError):
        est.influence((x, torch.full_like(y, N_CLASSES + 4)))  # label out of range
    with pytest.raises(ValueError):
        est.influence((x, -torch.ones_like(y)))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        est.influence((bad, y))
    with pytest.raises(ValueError):
        _make(name, model).fit((train[0], torch.full_like(train[1], N_CLASSES)))  # bad training labels


@pytest.mark.parametrize("name", [m for m in ALL if m not in ("tmc-shapley", "leave-one-out", "downsampling")])
def test_config_round_trip(name):
    """Keywords, ``config=`` and ``with_config`` are one thing: the same configuration, the same scores."""
    model = _model(name)
    train, queries = _data(N_TRAIN, 0), _data(N_QUERY, 1)
    est = _make(name, model)
    cfg = est.config
    assert isinstance(cfg, fi.EstimatorConfig) and list(cfg.to_dict()) == list(type(cfg).names())
    again = type(est)(est.model, est.task, config=cfg)
    assert all(getattr(again, k) is v for k, v in cfg.to_dict().items())  # every field reads as an attribute
    scores = est.fit(train).influence(queries)
    assert torch.equal(est.with_config(cfg).influence(queries), scores)  # fitted like est
    assert torch.equal(again.fit(train).influence(queries), scores)


def test_registry_refuses_unknown_names_and_missing_checkpoints():
    model = _model()
    with pytest.raises(ValueError, match="needs trajectory="):
        make_estimator("hydra", model)
    with pytest.raises(ValueError, match="unknown method"):
        make_estimator("if-7", model)
    with pytest.raises(ValueError, match="at least 5 checkpoints"):
        make_estimator("tracin-5", model, run=fi.TrainingRun(checkpoints=_checkpoints(model)[:3]))
    est = make_estimator("tracin-3", model, run=fi.TrainingRun(checkpoints=_checkpoints(model), lrs=[1, 2, 3, 4, 5]))
    assert est.run.lrs == (3, 4, 5) and len(est.run.checkpoints) == 3


def test_requirements_are_declared():
    assert requirements("tracin-3") == {"checkpoints"} and requirements("hydra-last") == {"trajectory"}
    assert requirements("knn-shapley") == requirements("tmc-shapley") == requirements("forward-inf") == frozenset()
    with pytest.raises(ValueError, match="unknown method"):
        requirements("shapley")


@pytest.mark.slow
def test_leakage_cli_prints_table2_for_every_registered_method(tmp_path, capsys):
    """``forwardinf leakage --methods <every registry name>`` runs end to end (the trajectory for
    HyDRA recorded while training) and prints the paper's Table 2 layout with CPU seconds: T-1, T-5, T-10.
    About 35 s of CPU (IF-10000's 10,000 LiSSA steps dominate); minutes of wall time when shared."""
    import json

    from forwardinf.cli import main

    out = tmp_path / "run"
    argv = ["leakage", "--methods", ",".join(METHODS), "--n-train", "50", "--epochs", "5", "--n-queries", "2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | kind | fit CPU s | query CPU s | T-1 | T-5 | T-10 | mean rank |" in printed
    results = json.loads((out / "results.json").read_text())["methods"]
    assert list(results) == list(METHODS)
    for name in METHODS:
        assert f"| {name} | " in printed, name
        row = results[name]
        assert row["seconds"] > 0 and 0 <= row["top1"] <= row["top5"] <= row["top10"] <= 1, (name, row)


# ------------------------------------------------------------------ top_k is influence's ranking
# Every name the registry knows (Forward-INF variants, METHODS, nearest-neighbour references and the
# optional peer libraries), on real data: 8x8 digits and a small CNN trained on them for a few steps.
REGISTRY = tuple(dict.fromkeys([*FORWARD_INF, *METHODS, *REFERENCE_METHODS, *PEER_METHODS]))
DIGITS_TRAIN, DIGITS_QUERY = 40, 3
# Over 3 s each here (LiSSA's and Lanczos' iterations, retrainings, the peers' own set-up): run with -m slow;
# the METHODS among them have the same property checked by test_shapes_and_model_untouched on every run.
SLOW_ON_DIGITS = {"if-100", "if-1000", "if-10000", "if-exact", "tmc-shapley", "kronfluence-ekfac", "dattri-if-lissa",
                  "dattri-trak"}


@pytest.fixture(scope="module")
def digits_problem():
    """``(model, trajectory, train, queries)``: a conv net trained 2 epochs by SGD on 40 digits
    (recorded, for HyDRA), and 3 held-out digits as queries."""
    split = load_digits()
    x, y = split.train()
    xq, yq = split.test()
    train, queries = (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]), (xq[:DIGITS_QUERY], yq[:DIGITS_QUERY])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    rec = TrajectoryRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        for idx in torch.randperm(DIGITS_TRAIN, generator=g).split(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            rec.record(idx, opt)
            opt.step()
    return model.eval(), rec, train, queries


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ON_DIGITS else n for n in REGISTRY])
def test_top_k_is_a_stable_sort_of_influence(name, digits_problem):
    """``top_k`` and ``influence`` are one code path in every estimator: its indices and scores are
    exactly those of a stable descending sort of ``influence`` (ties by training index), whole or
    streamed over training chunks. (``InvariantForwardINF.top_k`` once ranked by plain Forward-INF.)"""
    if name in PEER_METHODS:
        pytest.importorskip(PEERS[name].package)
    model, rec, train, queries = digits_problem
    over = {**OVERRIDES.get(name, {}), **({"n_directions": 2} if name.startswith("forward-inf-diffusion-cosine") else {})}
    run = fi.TrainingRun(checkpoints=_checkpoints(model), trajectory=rec)
    est = make_estimator(name, model, ClassificationTask(), run=run, **over)
    est.fit(train)
    scores = est.influence(queries)
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    for chunk in (None, 16):
        top = est.top_k(queries, k=6, chunk=chunk)
        assert torch.equal(top.indices, order.indices[:, :6]), (name, chunk)
        assert torch.equal(top.scores, order.values[:, :6]), (name, chunk)
