"""TracIn against closed forms: 1-D regression by hand, last-layer variant by autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardinf.baselines import TracIn
from forwardinf.core.params import fingerprint
from forwardinf.tasks import Task


class SquaredLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def _line(w: float, b: float) -> dict:
    return {"weight": torch.tensor([[w]], dtype=torch.float64), "bias": torch.tensor([b], dtype=torch.float64)}


def _by_hand(ckpts, lrs, x, y, xq, yq, normalize=False):
    """``Σ_c η_c g_c(q)·g_c(i)`` with ``g = 2 (w x + b - y) [x, 1]`` for ``ℓ = (w x + b - y)²``."""
    total = 0
    for (w, b), lr in zip(ckpts, lrs):
        g = 2 * (w * x + b - y)[:, None] * torch.stack([x, torch.ones_like(x)], 1)
        gq = 2 * (w * xq + b - yq)[:, None] * torch.stack([xq, torch.ones_like(xq)], 1)
        if normalize:
            g, gq = g / g.norm(dim=1, keepdim=True), gq / gq.norm(dim=1, keepdim=True)
        total = total + lr * gq @ g.T
    return total


def _data():
    x = torch.tensor([-1.5, -0.3, 0.2, 0.9, 2.0], dtype=torch.float64)
    y = torch.tensor([-2.0, 0.1, 0.5, 1.7, 3.5], dtype=torch.float64)
    return x, y


def test_tracincp_equals_closed_form_on_1d_regression(tmp_path):
    x, y = _data()
    xq, yq = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.2, -1.1], dtype=torch.float64)
    ckpts = [(0.1, 0.0), (0.8, 0.2), (1.6, 0.1)]
    lrs = [0.5, 0.2, 0.05]
    model = nn.Linear(1, 1).double()
    before = fingerprint(model)
    # one checkpoint as a state dict, one as a file in the trainer's {"state_dict": ...} layout, one raw file
    torch.save({"state_dict": _line(*ckpts[1]), "meta": {}}, tmp_path / "c1.pt")
    torch.save(_line(*ckpts[2]), tmp_path / "c2.pt")
    est = TracIn(model, SquaredLoss(), checkpoints=[_line(*ckpts[0]), tmp_path / "c1.pt", str(tmp_path / "c2.pt")],
                 lrs=lrs).fit((x[:, None], y))
    ref = _by_hand(ckpts, lrs, x, y, xq, yq)
    torch.testing.assert_close(est.influence((xq[:, None], yq)), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.influence((xq[:, None], yq), joint=True), ref.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), _by_hand(ckpts, lrs, x, y, x, y).diagonal(), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))  # never loaded into the model


def test_grad_dot_and_grad_cos_on_the_current_model():
    x, y = _data()
    model = nn.Linear(1, 1).double()
    w, b = float(model.weight.detach()), float(model.bias.detach())
    dot = TracIn(model, SquaredLoss()).fit((x[:, None], y))
    torch.testing.assert_close(dot.influence((x[:2, None], y[:2])), _by_hand([(w, b)], [1.0], x, y, x[:2], y[:2]))
    cos = TracIn(model, SquaredLoss(), normalize=True).fit((x[:, None], y))
    scores = cos.influence((x[:2, None], y[:2]))
    torch.testing.assert_close(scores, _by_hand([(w, b)], [1.0], x, y, x[:2], y[:2], normalize=True))
    assert scores.abs().max() <= 1 + 1e-12
    torch.testing.assert_close(scores[0, 0], torch.tensor(1.0, dtype=torch.float64))  # a point with itself


def test_last_layer_variant_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    est = TracIn(model, params="last").fit((x, y))

    def last_grad(i):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        return torch.cat([model[2].weight.grad.reshape(-1), model[2].bias.grad])

    grads = torch.stack([last_grad(i) for i in range(12)])
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(est.influence((x[:4], y[:4])), grads[:4] @ grads.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.self_influence(), grads.pow(2).sum(1), rtol=1e-5, atol=1e-6)


def test_streaming_equals_cached_training_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    cached = TracIn(model, batch_size=6).fit((x, y)).influence((x[:3], y[:3]))
    streamed = TracIn(model, batch_size=6, cache_mb=1e-6).fit((x, y)).influence((x[:3], y[:3]))
    torch.testing.assert_close(cached, streamed)


def test_bad_checkpoints_are_refused(tmp_path):
    x, y = _data()
    model = nn.Linear(1, 1).double()
    with pytest.raises(ValueError, match="does not exist"):
        TracIn(model, SquaredLoss(), checkpoints=[tmp_path / "missing.pt"]).fit((x[:, None], y))
    with pytest.raises(ValueError, match="lacks parameters"):
        TracIn(model, SquaredLoss(), checkpoints=[{"weight": torch.ones(1, 1, dtype=torch.float64)}]).fit((x[:, None], y))
    with pytest.raises(ValueError, match="lrs"):
        TracIn(model, SquaredLoss(), checkpoints=[_line(1, 0)], lrs=[0.1, 0.2]).fit((x[:, None], y))
    with pytest.raises(ValueError, match="shape"):
        TracIn(model, SquaredLoss(), checkpoints=[{"weight": torch.ones(2, 1), "bias": torch.ones(1)}]).fit((x[:, None], y))
