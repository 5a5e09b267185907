"""train_classifier(augment="crop+flip"): seeded, deterministic, and off by default."""
from __future__ import annotations

import pytest
import torch

from forwardinf.data.loaders import load_digits
from forwardinf.models import build_model
from forwardinf.training import train_classifier, train_or_load


@pytest.fixture(scope="module")
def data():
    split = load_digits()
    return split.x_train[:256], split.y_train[:256]


def _train(data, **kw):
    model = build_model("cnn", (1, 8, 8), 10, seed=0, width=4)
    return [p.detach().clone() for p in train_classifier(model, data, epochs=2, lr=0.05, seed=3, **kw).parameters()]


def test_crop_flip_is_deterministic_and_changes_training(data):
    a, b = _train(data, augment="crop+flip"), _train(data, augment="crop+flip")
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    plain, default = _train(data), _train(data, augment=None)
    assert all(torch.equal(p, q) for p, q in zip(plain, default))  # off by default
    assert not all(torch.equal(p, q) for p, q in zip(a, plain))
    other_seed = build_model("cnn", (1, 8, 8), 10, seed=0, width=4)
    train_classifier(other_seed, data, epochs=2, lr=0.05, seed=4, augment="crop+flip")
    assert not all(torch.equal(p, q) for p, q in zip(a, other_seed.parameters()))


def test_bad_augment_and_non_images(data):
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    with pytest.raises(ValueError, match="augment"):
        train_classifier(model, data, epochs=1, augment="rotate")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        train_classifier(torch.nn.Linear(64, 10), (data[0].flatten(1), data[1]), epochs=1, augment="crop+flip")


def test_train_or_load_key_without_augment_is_unchanged(data, tmp_path):
    path = tmp_path / "m.pt"
    build = lambda: build_model("cnn", (1, 8, 8), 10, seed=0, width=4)  # noqa: E731
    train_or_load(build, data, path, epochs=1)
    key = torch.load(path, weights_only=True)["meta"]["key"]
    assert "augment" not in key["train_kw"]  # models cached before augment existed still load
    train_or_load(build, data, path, epochs=1, augment="crop+flip")
    assert torch.load(path, weights_only=True)["meta"]["key"]["train_kw"]["augment"] == "crop+flip"
