"""One contract suite over every estimator of the registry, Forward-INF included.

Shapes, determinism, the user's model untouched (parameters, buffers, per-module train/eval
flags), and bad input refused with ValueError / NotFittedError.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from forwardinf.baselines import METHODS, make_estimator
from forwardinf.core.params import fingerprint
from forwardinf.estimators.base import NotFittedError, TopK
from forwardinf.tasks import ClassificationTask

HAVE_FORWARD_INF = importlib.util.find_spec("forwardinf.estimators.forward_inf") is not None
# LiSSA's depth only changes how long the same code path runs; the contract does not depend on it.
OVERRIDES = {"if-1000": {"depth": 100}, "if-10000": {"depth": 100}}
N_TRAIN, N_QUERY, N_FEATURES, N_CLASSES = 24, 4, 6, 3
# An untrained net's damped Hessian is indefinite; the IF solvers say so, which is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore:.*positive definite")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(8, N_CLASSES))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    model.train()
    model[3].eval()  # a mixed-mode model: every flag must come back as it was
    return model


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
    return make_estimator(name, model, ClassificationTask(), checkpoints=_checkpoints(model),
                          **OVERRIDES.get(name, {}))


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("name", METHODS)
def test_shapes_and_model_untouched(name):
    model = _model()
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
    assert torch.equal(scores.gather(1, top.indices[:, :1]).squeeze(1), scores.max(1).values)  # ties may pick any
    assert (top.scores[:, :-1] >= top.scores[:, 1:]).all()  # best first
    try:
        own = est.self_influence()
    except NotImplementedError:
        own = None
    if own is not None:
        assert own.shape == (N_TRAIN,) and torch.isfinite(own).all()
    after = fingerprint(model)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (n, a), (_, b) in zip(before, after):
        assert torch.equal(a, b), f"{name} changed {n}"
    assert _flags(model) == flags, f"{name} changed a train/eval flag"


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(name):
    model = _model()
    train, queries = _data(N_TRAIN, 0), _data(N_QUERY, 1)
    a = _make(name, model).fit(train).influence(queries)
    b = _make(name, model).fit(train).influence(queries)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_bad_input_refused(name):
    model = _model()
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


def test_registry_refuses_unknown_names_and_missing_checkpoints():
    model = _model()
    with pytest.raises(ValueError, match="unknown method"):
        make_estimator("if-7", model)
    with pytest.raises(ValueError, match="at least 5 checkpoints"):
        make_estimator("tracin-5", model, checkpoints=_checkpoints(model)[:3])
    est = make_estimator("tracin-3", model, checkpoints=_checkpoints(model), lrs=[1, 2, 3, 4, 5])
    assert est.lrs == [3, 4, 5] and len(est.checkpoints) == 3
