"""Representer points on a tiny network against the hand formula and an independent solver."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardinf.baselines import RepresenterPoint
from forwardinf.core.params import fingerprint


def _setup(n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(n, 3)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, x, y


def _features(model, x):
    """The head's input with a 1 appended, by hand: ``[tanh(x W1ᵀ + b1), 1]``."""
    with torch.no_grad():
        f = torch.tanh(x @ model[0].weight.T + model[0].bias).double()
    return torch.cat([f, torch.ones(len(x), 1, dtype=torch.float64)], 1)


def test_representer_matches_hand_formula():
    model, x, y = _setup()
    before = fingerprint(model)
    lam = 0.01
    est = RepresenterPoint(model, l2=lam).fit((x, y))
    assert est.head_name_ == "2"
    assert est.stationarity_ < 1e-8
    theta = est.head_weight_  # [C, d+1]
    f = _features(model, x)
    n = len(x)
    # α_i = -1/(2λn) ∂CE/∂logits = -(softmax - onehot)/(2λn)
    alpha = -(torch.softmax(f @ theta.T, 1) - F.one_hot(y, 3).double()) / (2 * lam * n)
    torch.testing.assert_close(est.alpha_, alpha, rtol=1e-10, atol=1e-12)
    # Representer theorem: Θ* = Σ_i α_i f_iᵀ
    torch.testing.assert_close(alpha.T @ f, theta, rtol=1e-6, atol=1e-8)
    xq, yq = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    fq = _features(model, xq)
    scores = est.influence((xq, yq))
    ref = alpha[:, yq].T * (fq @ f.T)  # α_i[y_q] f_i·f_q
    torch.testing.assert_close(scores, ref.float(), rtol=1e-5, atol=1e-7)
    # ... and the scores decompose the re-fitted logit of the query's class
    torch.testing.assert_close(scores.double().sum(1), (fq @ theta.T).gather(1, yq[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.self_influence(), est.influence((x, y)).diagonal(), rtol=1e-6, atol=1e-8)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))
    assert not model[2]._forward_pre_hooks  # the feature hook was removed


def test_refit_head_equals_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    model, x, y = _setup(n=60, seed=1)
    lam = 0.005
    est = RepresenterPoint(model, l2=lam).fit((x, y))
    f = _features(model, x).numpy()
    # sklearn minimises ½||W||² + C Σ ℓ_i; ours (1/n) Σ ℓ_i + λ||Θ||²: the same with C = 1/(2λn).
    clf = LogisticRegression(C=1 / (2 * lam * len(x)), fit_intercept=False, tol=1e-12, max_iter=10000).fit(f, y.numpy())
    np.testing.assert_allclose(est.head_weight_.numpy(), clf.coef_, rtol=1e-4, atol=1e-5)


def test_prediction_target_and_named_head():
    model, x, y = _setup()
    est = RepresenterPoint(model, head="2", target="prediction").fit((x, y))
    xq = torch.randn(4, 3)
    wrong = torch.full((4,), 2)
    pred = (_features(model, xq) @ est.head_weight_.T).argmax(1)
    by_label = RepresenterPoint(model).fit((x, y)).influence((xq, pred))
    torch.testing.assert_close(est.influence((xq, wrong)), by_label)
    with pytest.raises(ValueError, match="not nn.Linear"):
        RepresenterPoint(model, head="1").fit((x, y))
    with pytest.raises(ValueError, match="no module"):
        RepresenterPoint(model, head="fc").fit((x, y))
