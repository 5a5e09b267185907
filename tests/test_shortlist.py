"""Shortlist index + Forward-INF on the shortlist (issue 27): exactness, resuming, refusal, recall."""
import json

import pytest
import torch

import forwardinf as fi
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.shortlist import Retriever
from forwardinf.models import SmallCNN
from forwardinf.storage import StoreMismatchError, fingerprint_module
from forwardinf.training import train_classifier

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def digits():
    """A small CNN trained on 300 digits; queries: 4 copies of training points 0..3 and 4 test digits."""
    d = load_digits()
    x, y = d.x_train[:300], d.y_train[:300]
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(d.input_shape, 10, width=8), (x, y), epochs=4, lr=0.05, seed=0)
    queries = (torch.cat([x[:4], d.x_test[:4]]), torch.cat([y[:4], d.y_test[:4]]))
    return model, (x, y), queries


@pytest.fixture(scope="module")
def fitted(digits):
    model, train, _ = digits
    return fi.ForwardINF(model, query_chunk=3).fit(train)


def test_shortlist_of_the_whole_training_set_equals_the_full_sweep_exactly(digits, fitted):
    _, train, queries = digits
    full = fitted.top_k(queries, k=7)
    for short in (fitted.top_k(queries, k=7, shortlist=len(train[1])),
                  Retriever.of(fitted).top_k(queries, k=7, shortlist=len(train[1]) + 5, union=True)):
        for name in ("indices", "scores", "opponents", "opponent_scores"):
            assert torch.equal(getattr(full, name), getattr(short, name)), name
    # each query's model alone on its own shortlist: the same points, scores to float rounding
    alone = Retriever.of(fitted).top_k(queries, k=7, shortlist=len(train[1]), union=False)
    assert torch.equal(full.indices, alone.indices) and torch.equal(full.opponents, alone.opponents)
    assert torch.allclose(full.scores, alone.scores, rtol=1e-5, atol=1e-6)


def test_lazy_fit_computes_the_candidates_sensitivities_only_and_keeps_them(digits, fitted):
    model, train, queries = digits
    n = len(train[1])
    full = fitted.top_k(queries, k=7)
    # K = n_train after a lazy fit: every sensitivity computed on demand, in the eager fit's batches
    whole = fi.ForwardINF(model, query_chunk=3).fit(train, lazy=True).top_k(queries, k=7, shortlist=n)
    for name in ("indices", "scores", "opponents", "opponent_scores"):
        assert torch.equal(getattr(full, name), getattr(whole, name)), name
    lazy = fi.ForwardINF(model, query_chunk=3).fit(train, lazy=True)
    assert not any(key[0] == "directional" for key in lazy._cache_)  # fit swept nothing
    retriever = Retriever(lazy)  # features: needs no sensitivities
    cands = retriever.candidates(queries, 30)
    short = lazy.top_k(queries, k=5, shortlist=30)
    eager = fitted.top_k(queries, k=5, shortlist=30)
    computed = retriever.sensitivities_computed_
    assert computed == len(cands.unique()) < n  # the candidates', no more
    assert torch.equal(short.indices, eager.indices)
    assert torch.allclose(short.scores, eager.scores, rtol=1e-5, atol=1e-6)  # other batches: float rounding
    lazy.top_k(queries, k=5, shortlist=30)
    assert retriever.sensitivities_computed_ == computed  # kept: the same queries compute nothing again
    # the partial table never stands in the estimator's cache: a full sweep computes every point
    assert not any(key[0] == "directional" for key in lazy._cache_)
    again = lazy.top_k(queries, k=7)
    assert torch.equal(again.indices, full.indices) and torch.equal(again.scores, full.scores)
    # a lazy fit sweeps nothing: the index build is where a bad training label is refused
    bad = (train[0], train[1].clone())
    bad[1][150] = 10
    with pytest.raises(ValueError, match="train: label 10 is out of range"):
        Retriever(fi.ForwardINF(model).fit(bad, lazy=True))


def test_shortlist_finds_the_copies_and_scores_match_the_full_matrix(digits, fitted):
    _, train, queries = digits
    retriever = Retriever(fitted, source="directions")
    cands = retriever.candidates(queries, 30)
    assert cands.shape == (8, 30)
    # an exact copy's gradient sketch is its training point's: it is the nearest neighbour
    assert cands[:4, 0].tolist() == [0, 1, 2, 3]
    full = fitted.influence(queries)
    own = fitted.top_k(queries, k=5, shortlist=30)  # CPU: each query scores its own 30 candidates
    union = retriever.top_k(queries, k=5, shortlist=30, union=True)
    for top in (own, union):
        assert top.indices[:4, 0].tolist() == [0, 1, 2, 3]
        # every returned score is the full sweep's score of that training point
        assert torch.allclose(top.scores, full.gather(1, top.indices), atol=1e-5)
    for q in range(8):
        assert set(own.indices[q].tolist()) <= set(cands[q].tolist())
        # with union=True the points scored are the union of each chunk's shortlists (query_chunk=3)
        chunk = list(range(q // 3 * 3, min(q // 3 * 3 + 3, 8)))
        pool = cands[chunk].flatten().unique()
        assert union.indices[q].tolist() == pool[full[q, pool].argsort(descending=True, stable=True)[:5]].tolist()
    with pytest.raises(ValueError, match="at least k"):
        retriever.top_k(queries, k=5, shortlist=4)


def test_recall_is_one_at_full_shortlist_and_measures_overlap(digits, fitted):
    _, train, queries = digits
    retriever = Retriever(fitted)
    r = retriever.recall(queries, k=5, shortlist=len(train[1]), sample=3)
    assert r.per_query.tolist() == [1.0, 1.0, 1.0] and r.mean == 1.0 and retriever.recall_ is r
    small = retriever.recall(queries, k=5, shortlist=5, sample=None)
    full = fitted.top_k(queries, k=5).indices
    short = fitted.top_k(queries, k=5, shortlist=5).indices
    expected = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(full, short)]
    assert small.per_query.tolist() == pytest.approx(expected)


def _build(fitted, path, **kw):
    return Retriever(fitted, path, shard_size=64, **kw)


def test_index_build_resumes_after_an_interrupt_and_equals_a_fresh_build(digits, fitted, tmp_path, monkeypatch):
    _, _, queries = digits
    unit, calls = Retriever._unit, []

    def dying(v):  # the build is killed while computing its third shard of vectors
        calls.append(len(v))
        if len(calls) > 2:
            raise KeyboardInterrupt("killed mid-build")
        return unit(v)

    with monkeypatch.context() as m:
        m.setattr(Retriever, "_unit", staticmethod(dying))
        with pytest.raises(KeyboardInterrupt):
            _build(fitted, tmp_path / "idx")
    written = sorted(p.name for p in (tmp_path / "idx" / "vectors").glob("*.npy"))
    assert written == ["s000000.npy", "s000001.npy"] and not (tmp_path / "idx" / "index.faiss").exists()
    resumed = _build(fitted, tmp_path / "idx")
    fresh = _build(fitted, tmp_path / "fresh")
    assert (tmp_path / "idx" / "index.faiss").is_file() and resumed.index.n == 300
    assert torch.equal(resumed.candidates(queries, 20), fresh.candidates(queries, 20))
    for s in range(5):
        a = (tmp_path / "idx" / "vectors" / f"s{s:06d}.npy").read_bytes()
        assert a == (tmp_path / "fresh" / "vectors" / f"s{s:06d}.npy").read_bytes()
    # a complete folder is loaded, not rebuilt: and the shortlist through it is the same answer
    assert torch.equal(_build(fitted, tmp_path / "idx").candidates(queries, 20), fresh.candidates(queries, 20))


def test_index_is_refused_when_the_model_or_the_data_changed(digits, fitted, tmp_path):
    model, (x, y), _ = digits
    _build(fitted, tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"] == fingerprint_module(model)
    other = SmallCNN((1, 8, 8), 10, width=8)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.classifier[-1].bias[0] += 1e-3
    with pytest.raises(StoreMismatchError, match="model fingerprint"):
        _build(fi.ForwardINF(other, query_chunk=3).fit((x, y)), tmp_path / "idx")
    x2 = x.clone()
    x2[7, 0, 0, 0] += 0.5
    with pytest.raises(StoreMismatchError, match="training-set fingerprint"):
        _build(fi.ForwardINF(model, query_chunk=3).fit((x2, y)), tmp_path / "idx")
    with pytest.raises(StoreMismatchError, match="configuration"):
        _build(fi.ForwardINF(model, query_chunk=3, n_directions=8).fit((x, y)), tmp_path / "idx")
    rebuilt = _build(fi.ForwardINF(model, query_chunk=3).fit((x2, y)), tmp_path / "idx", overwrite=True)
    assert rebuilt.index.n == 300


def test_features_source_tail_estimator_and_errors(digits, fitted):
    model, train, queries = digits
    feats = Retriever(fitted, source="features")
    assert feats.source == "features" and feats.layer == "classifier.2" and feats.index.dim == 4 * 8
    assert feats.candidates(queries, 5)[:4, 0].tolist() == [0, 1, 2, 3]
    tail = fi.TailForwardINF(model, split="classifier", query_chunk=3).fit(train)
    full = tail.top_k(queries, k=4)
    short = tail.top_k(queries, k=4, shortlist=300)
    assert torch.equal(full.indices, short.indices) and torch.equal(full.scores, short.scores)
    with pytest.raises(ValueError, match="source"):
        Retriever(fitted, source="pixels")
    with pytest.raises(ValueError, match="shortlist"):
        fitted.top_k(queries, k=3, shortlist=0)
    with pytest.raises(TypeError, match="ForwardINF"):
        Retriever(fi.TracIn(model).fit(train))
    with pytest.raises(TypeError, match="no shortlist path"):
        fi.TracIn(model).fit(train).top_k(queries, k=3, shortlist=5)
    with pytest.raises(fi.NotFittedError):
        fi.ForwardINF(model).top_k(queries, shortlist=5)


def test_score_cli_shortlist_writes_the_table_index_and_recall(digits, tmp_path, capsys):
    import numpy as np

    from forwardinf.cli import main as cli_main
    from forwardinf.storage import read_topk_csv

    model, (x, y), queries = digits
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    np.savez(tmp_path / "train.npz", inputs=x.numpy(), targets=y.numpy())
    np.savez(tmp_path / "queries.npz", inputs=queries[0].numpy(), targets=queries[1].numpy())
    (tmp_path / "net.py").write_text("from forwardinf.models import SmallCNN\n"
                                     "def build():\n    return SmallCNN((1, 8, 8), 10, width=8)\n")
    args = ["score", "--model", str(tmp_path / "weights.pt"), "--arch", f"{tmp_path / 'net.py'}:build",
            "--train", str(tmp_path / "train.npz"), "--queries", str(tmp_path / "queries.npz"), "--k", "5",
            "--query-chunk", "3", "--out", str(tmp_path / "run"), "--shortlist", "300", "--recall-sample", "2"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "recall of the full sweep's top-5 on 2 sampled queries: 1.000" in printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    method = results["methods"]["forward-inf"]
    assert method["shortlist"] == 300 and method["recall"] == 1.0 and method["index_source"] == "head-grad"
    assert method["index_pool"] == 300 and (tmp_path / "run" / "index" / "factors" / "s000000.npy").is_file()
    assert (tmp_path / "run" / "index" / "index.faiss").is_file() and not (tmp_path / "run" / "store").exists()
    # K = n_train: the table is the full sweep's top-k
    idx, scores = read_topk_csv(tmp_path / "run" / "topk.csv")
    full = fi.ForwardINF(model, query_chunk=3).fit((x, y)).top_k(queries, k=5)
    assert torch.equal(idx, full.indices) and torch.allclose(scores, full.scores)
    assert cli_main(args[:-4] + ["--shortlist", "3"]) == 2  # fewer candidates than --k
    assert "at least --k" in capsys.readouterr().err


def test_last_grad_source_is_the_last_layer_gradient_exact_at_full_shortlist_and_refused_on_change(digits, fitted,
                                                                                                   tmp_path):
    import torch.nn.functional as F

    from forwardinf.tasks.base import Task

    model, train, queries = digits
    grad = Retriever(fitted, source="last-grad")
    assert grad.source == "last-grad" and grad.layer == "classifier.2" and grad.index.dim == 10 * (4 * 8 + 1)
    # each vector is the unit gradient of the point's cross-entropy wrt the last Linear's weight and bias
    head = model.classifier[2]
    vecs = grad.embed((train[0][:3], train[1][:3]))
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(train[0][i:i + 1]), train[1][i:i + 1]).backward()
        g = torch.cat([head.weight.grad, head.bias.grad[:, None]], 1).flatten()
        assert torch.allclose(vecs[i], g / g.norm(), atol=1e-5)
    model.zero_grad(set_to_none=True)
    assert grad.candidates(queries, 5)[:4, 0].tolist() == [0, 1, 2, 3]  # a copy's gradient is its point's
    # K = n_train: exactly the full sweep, own candidates and union alike
    full = fitted.top_k(queries, k=7)
    for union in (None, True):
        short = grad.top_k(queries, k=7, shortlist=len(train[1]), union=union)
        for name in ("indices", "scores", "opponents", "opponent_scores"):
            assert torch.equal(getattr(full, name), getattr(short, name)), name
    # a smaller K: every returned score is the full sweep's score of that point
    some = grad.top_k(queries, k=5, shortlist=40)
    assert torch.allclose(some.scores, fitted.influence(queries).gather(1, some.indices), atol=1e-5)
    # on disk: a folder built from another source is refused (the source is in the configuration)
    _build(fitted, tmp_path / "idx", source="features")
    with pytest.raises(StoreMismatchError, match="configuration"):
        _build(fitted, tmp_path / "idx", source="last-grad")
    saved = _build(fitted, tmp_path / "grad", source="last-grad")
    assert json.loads((tmp_path / "grad" / "manifest.json").read_text())["config"]["source"] == "last-grad"
    assert torch.equal(_build(fitted, tmp_path / "grad", source="last-grad").candidates(queries, 20),
                       grad.candidates(queries, 20)) and saved.index.n == 300
    with pytest.raises(StoreMismatchError, match="configuration"):
        _build(fitted, tmp_path / "grad", source="features")

    class Other(Task):  # not a ClassificationTask: no softmax error to take for granted
        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    other = fi.ForwardINF(model, Other()).fit(train, lazy=True)
    with pytest.raises(ValueError, match="ClassificationTask"):
        Retriever(other, source="last-grad")
    with pytest.raises(ValueError, match="ClassificationTask"):
        Retriever(other, source="head-grad")
    assert Retriever(other).source == "features"  # auto falls back
    assert Retriever(fitted).source == "head-grad"  # auto on a classifier
