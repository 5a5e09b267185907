"""Tail-only Forward-INF equals full Forward-INF restricted to the tail; reduced-precision sweeps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import forwardinf as fi
from forwardinf.core.params import fingerprint
from forwardinf.data.loaders import load_digits
from forwardinf.estimators import tail
from forwardinf.estimators.tail import ReducedPrecisionTask, TailForwardINF, split_model
from forwardinf.models import ResNet, SmallCNN
from forwardinf.training import train_classifier


@pytest.fixture(scope="module")
def digits_cnn():
    """A small CNN trained on 400 digits, and 6 queries that duplicate training points 0..5."""
    d = load_digits()
    x, y = d.x_train[:400], d.y_train[:400]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(d.input_shape, 10, width=8), (x, y), epochs=4, lr=0.05, seed=0)
    torch.set_num_threads(saved)
    return model, (x, y), (x[:6].clone(), y[:6].clone())


def test_split_reproduces_the_model_exactly():
    x = torch.randn(5, 1, 8, 8)
    cnn = SmallCNN((1, 8, 8), 10, width=4).eval()
    s = split_model(cnn, "classifier", x)
    assert s.shapes == [(4 * 2 * 4,)] and s.width == 32
    assert torch.equal(s.tail(s.features(x)), cnn(x))
    assert [n for n, _ in s.tail.named_parameters()] == [n for n, _ in cnn.classifier.named_parameters(prefix="classifier")]
    res = ResNet((1, 8, 8), 10, width=4).eval()
    inside = split_model(res, "stages.3.0.conv2", x)  # mid-block: the skip connection's input is cached too
    assert len(inside.shapes) == 2
    assert torch.equal(inside.tail(inside.features(x)), res(x))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.embed(x)))


class _SizeAcross(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        n = x.size(0)
        return self.head(self.body(x)).view(n, -1)


def test_split_errors_name_the_problem():
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"split='fc' is not a module.*\['features', 'classifier'\]"):
        split_model(SmallCNN((1, 8, 8), 10, width=4), "fc", x)
    with pytest.raises(ValueError, match="tied weights"):
        split_model(_Tied(), "head", torch.randn(3, 4))
    with pytest.raises(ValueError, match="not a per-example tensor"):
        split_model(_SizeAcross(), "head", torch.randn(3, 4))


@pytest.mark.parametrize("score", ["cosine", "loss"])
def test_tail_mode_equals_full_forward_inf_on_the_tail(digits_cnn, score):
    model, train, queries = digits_cnn
    before = fingerprint(model)
    full = fi.ForwardINF(model, fi.ClassificationTask(), params="classifier", score=score, batch_size=128).fit(train)
    tail = TailForwardINF(model, fi.ClassificationTask(), split="classifier", score=score, batch_size=128).fit(train)
    assert tail.features_.tensors[0].shape == (400, 16 * 2 * 2)
    # The same arithmetic on the same numbers: equal to the bit.
    assert torch.equal(tail.influence(queries), full.influence(queries))
    assert torch.equal(tail.influence(queries, joint=True), full.influence(queries, joint=True))
    assert torch.equal(tail.base_losses_, full.base_losses_)
    assert torch.equal(tail.top_k(queries, 3).indices, full.top_k(queries, 3).indices)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))
    assert all(not m.training for m in model.modules())


def test_tail_self_influence_and_params_within_the_tail(digits_cnn):
    model, train, queries = digits_cnn
    full = fi.ForwardINF(model, fi.ClassificationTask(), params="classifier.2", score="loss").fit(train)
    tail = TailForwardINF(model, fi.ClassificationTask(), split="classifier", params="classifier.2", score="loss").fit(train)
    assert torch.equal(tail.influence(queries), full.influence(queries))
    sub = (train[0][:50], train[1][:50])
    assert torch.equal(TailForwardINF(model, fi.ClassificationTask(), split="classifier", score="loss").fit(sub).self_influence(),
                       fi.ForwardINF(model, fi.ClassificationTask(), params="classifier", score="loss").fit(sub).self_influence())


def test_tail_bfloat16_cache_keeps_the_ranking(digits_cnn):
    model, train, queries = digits_cnn
    exact = TailForwardINF(model, fi.ClassificationTask(), split="classifier").fit(train).influence(queries)
    low = TailForwardINF(model, fi.ClassificationTask(), split="classifier", precision="bfloat16").fit(train)
    assert low.features_.tensors[0].dtype == torch.bfloat16  # half the memory
    scores = low.influence(queries)
    assert scores.dtype == torch.float32
    for q in range(len(scores)):
        assert torch.corrcoef(torch.stack([scores[q], exact[q]]))[0, 1] > 0.999
    assert scores.argmax(1).tolist() == list(range(6))  # each duplicated training point still first


def test_reduced_precision_task_keeps_the_update_in_float32(digits_cnn):
    model, train, queries = digits_cnn
    task = ReducedPrecisionTask(fi.ClassificationTask(), "bfloat16")
    with torch.no_grad():
        swept = task.loss(model, queries)
    assert swept.dtype == torch.float32
    exact = fi.ClassificationTask().loss(model, queries)
    assert not torch.equal(swept, exact) and torch.allclose(swept, exact, rtol=0.05, atol=0.02)
    assert torch.equal(task.query_loss(model, queries), fi.ClassificationTask().query_loss(model, queries))
    # Every layer in reduced precision: float16's 11-bit mantissa resolves the change made by the
    # default step (lr 1e-3); bfloat16's 8 bits need a larger step (measured: r ~0.8 at 1e-3, 0.996 at 1e-2).
    low = fi.ForwardINF(model, ReducedPrecisionTask(fi.ClassificationTask(), "float16"), batch_size=128).fit(train)
    low = low.influence(queries)
    ref = fi.ForwardINF(model, fi.ClassificationTask(), batch_size=128).fit(train).influence(queries)
    for q in range(len(low)):
        assert torch.corrcoef(torch.stack([low[q], ref[q]]))[0, 1] > 0.98
    assert low.argmax(1).tolist() == ref.argmax(1).tolist() == list(range(6))


def test_tail_options_are_checked(digits_cnn):
    model, train, _ = digits_cnn
    with pytest.raises(ValueError, match="fitted_fallback"):
        TailForwardINF(model, split="classifier", fitted_fallback=True).fit(train)
    with pytest.raises(ValueError, match="precision"):
        TailForwardINF(model, split="classifier", precision="int8").fit(train)
    with pytest.raises(TypeError, match=r"TailForwardINF: unexpected keyword\(s\) \['stepz'\]"):
        TailForwardINF(model, split="classifier", stepz=2)
    with pytest.raises(TypeError, match="split="):
        TailForwardINF(model)
    with pytest.raises(fi.NotFittedError):
        TailForwardINF(model, split="classifier").influence(train)


def test_disk_cache_gives_the_same_scores_and_cleans_up(digits_cnn, tmp_path):
    model, train, queries = digits_cnn
    memory = TailForwardINF(model, fi.ClassificationTask(), split="classifier", batch_size=64).fit(train)
    disk = TailForwardINF(model, fi.ClassificationTask(), split="classifier", batch_size=64, cache="disk",
                          cache_dir=str(tmp_path)).fit(train)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    assert np.load(files[0], mmap_mode="r").shape == (400, 16 * 2 * 2)  # [N, D] float32 on disk, in .npy format
    assert files[0].stat().st_size < 400 * 16 * 2 * 2 * 4 + 256  # the matrix and a short header
    assert not isinstance(disk.features_, torch.utils.data.TensorDataset)
    assert torch.equal(disk.influence(queries), memory.influence(queries))  # same batches, same bits
    assert torch.equal(disk.influence(queries, indices=[5, 0, 9]), memory.influence(queries, indices=[5, 0, 9]))
    low = TailForwardINF(model, fi.ClassificationTask(), split="classifier", cache="disk", precision="bfloat16",
                         cache_dir=str(tmp_path / "bf16")).fit(train)
    assert low.influence(queries).argmax(1).tolist() == list(range(6))
    del disk, low
    import gc
    gc.collect()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # the cache files go with the estimators
    with pytest.raises(ValueError, match="cache"):
        TailForwardINF(model, split="classifier", cache="ram").fit(train)


def test_auto_cache_goes_to_disk_only_when_large(digits_cnn, tmp_path, monkeypatch):
    model, train, queries = digits_cnn
    small = TailForwardINF(model, fi.ClassificationTask(), split="classifier", cache_dir=str(tmp_path)).fit(train)
    assert small.cache_ == "memory" and not any(tmp_path.iterdir())
    monkeypatch.setattr(tail, "AUTO_MEMORY_BYTES", 400 * 16 * 2 * 2 * 4 - 1)  # one byte under this cache
    large = TailForwardINF(model, fi.ClassificationTask(), split="classifier", cache_dir=str(tmp_path)).fit(train)
    assert large.cache_ == "disk" and len(list(tmp_path.iterdir())) == 1
    assert torch.equal(large.influence(queries), small.influence(queries))


def test_tail_tune_returns_a_config_and_with_config_reuses_the_prefix(digits_cnn):
    model, train, queries = digits_cnn
    est = TailForwardINF(model, split="classifier", batch_size=64).fit(train)
    cfg = est.tune(queries, list(range(len(queries[0]))), lrs=[1e-3, 3e-3], steps=[1], scores=["loss", "cosine"])
    assert isinstance(cfg, fi.TailForwardINFConfig) and cfg.split == "classifier" and est.score == "cosine"
    assert len(est.tune_results_) == 4
    tuned = est.with_config(cfg)
    assert tuned.features_ is est.features_ and tuned.split_ is est.split_  # the prefix ran once
    assert torch.equal(tuned.influence(queries), TailForwardINF(model, config=cfg).fit(train).influence(queries))
    # settings are read-only: another one comes through with_config, reusing the prefix when it can
    with pytest.raises(AttributeError, match="read-only"):
        est.lr = 3e-3
    other = est.with_config(est.config.replace(lr=3e-3))
    assert other.features_ is est.features_
    assert torch.equal(other.influence(queries), TailForwardINF(model, split="classifier", batch_size=64,
                                                                lr=3e-3).fit(train).influence(queries))
    assert est.with_config(est.config.replace(precision="bfloat16")).features_ is not est.features_  # refitted
