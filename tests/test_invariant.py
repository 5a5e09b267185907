"""Augmentation-invariant Forward-INF and the nearest-neighbour references, on tiny real cases."""
from __future__ import annotations

import pytest
import torch

from forwardinf import ClassificationTask, ForwardINF
from forwardinf.baselines.nearest import NearestNeighbour
from forwardinf.core.params import fingerprint
from forwardinf.data.augment import near_duplicates, views
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.invariant import InvariantForwardINF, ViewAveragedTask
from forwardinf.models import build_model
from forwardinf.training import train_classifier


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained with crop+flip augmentation on 400 digits (a few seconds)."""
    split = load_digits()
    x, y = split.x_train[:400], split.y_train[:400]
    model = build_model("cnn", (1, 8, 8), 10, seed=0, width=8)
    train_classifier(model, (x, y), epochs=15, lr=0.05, seed=0, augment="crop+flip")
    return model, x, y


def test_view_averaged_task_is_the_mean_over_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 5))
    x, y = torch.randn(3, 2, 6, 6), torch.tensor([0, 3, 4])
    v = views(x, shift=1, flip=True)  # [3, 18, 2, 6, 6]
    task, inner = ViewAveragedTask(ClassificationTask()), ClassificationTask()
    expect = torch.stack([inner.score_loss(model, (v[i], y[i].repeat(18))).mean() for i in range(3)])
    assert torch.allclose(task.score_loss(model, (v, y)), expect, atol=1e-6)
    assert torch.equal(task.loss(model, (x, y)), inner.loss(model, (x, y)))  # no views: unchanged
    with pytest.raises(ValueError, match="label 7"):
        task.validate(model, (v, torch.tensor([0, 1, 7])))


def test_one_view_is_plain_forward_inf(trained):
    model, x, y = trained
    q = (x[:5], y[:5])
    plain = ForwardINF(model).fit((x, y)).influence(q)
    inv = InvariantForwardINF(model, shift=0, flip=False).fit((x, y))
    assert torch.allclose(inv.influence(q), plain, atol=1e-5) and inv.views_per_query_ == 1
    with pytest.raises(ValueError, match="flip"):
        InvariantForwardINF(model, flip="min").fit((x, y)).influence(q)


@pytest.mark.parametrize("flip", ["mean", "max"])
def test_mirror_invariant_and_finds_mirrored_copies(trained, flip):
    model, x, y = trained
    before = fingerprint(model)
    idx = torch.arange(0, 400, 20)  # 20 leaked points
    exact, mirrored = (x[idx], y[idx]), (near_duplicates(x[idx], "flip"), y[idx])
    inv = InvariantForwardINF(model, shift=0, flip=flip).fit((x, y))
    s_exact, s_mirror = inv.influence(exact), inv.influence(mirrored)
    # A query and its mirror have the same views ("mean") or the same pair of updates ("max"):
    # the same scores.
    assert torch.allclose(s_exact, s_mirror, atol=1e-4)
    assert inv.updates_per_query_ == (2 if flip == "max" else 1)
    top1_inv = (s_mirror.argmax(1) == idx).float().mean()
    top1_plain = (ForwardINF(model).fit((x, y)).influence(mirrored).argmax(1) == idx).float().mean()
    # measured: 0.75 ("mean": the average dilutes), 1.0 ("max": one update is on the source itself); plain 0.15
    assert top1_inv >= {"mean": 0.6, "max": 0.9}[flip] and top1_inv > top1_plain + 0.3, (top1_inv, top1_plain)
    assert all(n == m and torch.equal(a, b) for (n, a), (m, b) in zip(before, fingerprint(model)))


def test_invariant_refuses_non_images(trained):
    model, x, y = trained
    inv = InvariantForwardINF(model, shift=9).fit((x, y))
    with pytest.raises(ValueError, match="shift"):
        inv.influence((x[:2], y[:2]))
    with pytest.raises(ValueError, match="images"):
        InvariantForwardINF(torch.nn.Linear(4, 3)).fit((torch.randn(6, 4), torch.zeros(6, dtype=torch.long))).influence(
            (torch.randn(2, 4), torch.zeros(2, dtype=torch.long)))


def test_nearest_neighbour_references(trained):
    model, x, y = trained
    q = (x[:6] + 0.01, y[:6])
    pixel = NearestNeighbour(model, embedding="inputs").fit((x, y))
    s = pixel.influence(q)
    d = torch.cdist(q[0].flatten(1).double(), x.flatten(1).double())
    assert torch.allclose(s, -d.float(), atol=1e-4) and torch.equal(s.argmax(1), torch.arange(6))
    feat = NearestNeighbour(model, embedding="penultimate").fit((x, y))
    f = feat.influence((x[:6], y[:6]))
    assert f.shape == (6, 400) and torch.allclose(f[torch.arange(6), torch.arange(6)], torch.ones(6), atol=1e-5)
    assert torch.allclose(feat.influence((x[:6], y[:6]), joint=True), f.mean(0))
    with pytest.raises(ValueError, match="embedding"):
        NearestNeighbour(model, embedding="pixels").fit((x, y))
