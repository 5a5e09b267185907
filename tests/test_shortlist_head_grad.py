"""Shortlist source "head-grad": a features pool re-ranked by the factorised head gradient (issue 27)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardinf as fi
from forwardinf.core.params import fingerprint
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.head_grad import Head
from forwardinf.estimators.shortlist import Retriever
from forwardinf.models import SmallCNN
from forwardinf.storage import StoreMismatchError
from forwardinf.training import train_classifier

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def setup():
    """A small CNN trained on 250 digits, its eager fit, and queries: copies of training points
    0..2 and 5 test digits."""
    d = load_digits()
    train = (d.x_train[:250], d.y_train[:250])
    torch.manual_seed(1)
    model = train_classifier(SmallCNN(d.input_shape, 10, width=4), train, epochs=4, lr=0.05, seed=1)
    queries = tuple(torch.cat([t[:3], u[:5]]) for t, u in zip(train, (d.x_test, d.y_test)))
    return model, train, queries, fi.ForwardINF(model, query_chunk=3).fit(train)


@pytest.fixture(scope="module")
def digits(setup):
    return setup[:3]


@pytest.fixture(scope="module")
def fitted(setup):
    return setup[3]


def explicit_head_grads(model, head, x, y):
    """``[n, P]``: each point's gradient of its cross-entropy wrt the head's weights and biases,
    per example by ``torch.func`` (the thing the factors must reproduce without materialising)."""
    names = [f"{layer}.{p}" for layer in head.layers for p in ("weight", "bias")]
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    rest = {k: v.detach() for k, v in model.named_parameters() if k not in names}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, {**rest, **p}, (xi[None],))
        return F.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[k].flatten(1) for k in names], 1)


def test_factorised_head_similarity_equals_explicit_per_example_gradients(digits, fitted):
    model, (x, y), queries = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    retriever = Retriever(fitted, source="head-grad")
    head = retriever.head
    assert head.layers == ("classifier.0", "classifier.2") and head.width == 32 + 16 + 16 + 10
    ft = retriever._head_factors(fitted._dataset((x[:40], y[:40]), "train"))
    fq = retriever._head_factors(fitted._dataset(queries, "queries"), "queries")
    gt, gq = explicit_head_grads(model, head, x[:40], y[:40]), explicit_head_grads(model, head, *queries)
    # the score_loss (margin) gradient is the cross-entropy's times 1 / (1 - p_y): cosines agree exactly
    cos = (gq / gq.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    assert torch.allclose(head.cosine(fq, ft), cos, atol=1e-5)
    # and for one loss, the raw inner products and norms too: rescale δ to the cross-entropy's
    with torch.no_grad():
        s = 1 - F.softmax(model(x[:40]), 1).gather(1, y[:40, None])
    ce = torch.cat([part for xx, d in head.split(ft) for part in (xx, d * s)], 1)
    assert torch.allclose(head.gram(ce, ce), gt @ gt.T, rtol=1e-4, atol=1e-6)
    assert torch.allclose(head.sq_norms(ce), gt.square().sum(1), rtol=1e-4, atol=1e-7)
    # the user's model is bit-identical: no parameter changed, no .grad touched, no hook left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(g is p.grad is None or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert not any(m._forward_hooks for m in model.modules())


def test_full_pool_reranks_to_the_exact_head_gradient_top_k_and_full_shortlist_is_the_full_sweep(digits, fitted):
    model, (x, y), queries = digits
    n = len(y)
    retriever = Retriever(fitted, pool=n)  # auto: a classifier gets head-grad
    assert retriever.source == "head-grad" and retriever.layer == "classifier.2" and retriever.pool_size(10) == n
    # a pool of the whole set: the K best by the (explicit) head-gradient cosine, in that order
    gt, gq = explicit_head_grads(model, retriever.head, x, y), explicit_head_grads(model, retriever.head, *queries)
    cos = (gq / gq.norm(dim=1, keepdim=True)) @ (gt / gt.norm(dim=1, keepdim=True)).T
    cands = retriever.candidates(queries, 12)
    assert torch.equal(cands, cos.topk(12, dim=1).indices)
    assert cands[:3, 0].tolist() == [0, 1, 2]  # an exact copy's head gradient is its training point's
    # K = n_train: exactly the full sweep, after an eager and after a lazy fit
    full = fitted.top_k(queries, k=7)
    lazy = fi.ForwardINF(model, query_chunk=3).fit((x, y), lazy=True)
    for est in (fitted, lazy):
        Retriever(est)
        short = est.top_k(queries, k=7, shortlist=n)
        for name in ("indices", "scores", "opponents", "opponent_scores"):
            assert torch.equal(getattr(full, name), getattr(short, name)), name
    # a smaller pool: each query's K come from the features index's pool, re-ranked
    small = Retriever(fitted, pool=40)
    pools = Retriever(fitted, source="features").candidates(queries, 40)
    got = small.candidates(queries, 15)
    for q in range(len(got)):
        assert set(got[q].tolist()) <= set(pools[q].tolist())
        assert got[q].tolist() == pools[q][cos[q, pools[q]].argsort(descending=True, stable=True)[:15]].tolist()
    some = small.top_k(queries, k=5, shortlist=15)  # the scores are the full sweep's
    assert torch.allclose(some.scores, fitted.influence(queries).gather(1, some.indices), atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        Retriever(fitted, pool=0)


def _build(est, path, **kw):
    return Retriever(est, path, source="head-grad", shard_size=64, **kw)


def test_factor_store_resumes_after_an_interrupted_build(digits, fitted, tmp_path, monkeypatch):
    _, _, queries = digits
    real, calls = Retriever._head_factors, []

    def dying(self, data, name="train"):  # killed while computing the third shard's factors
        calls.append(len(data))
        if len(calls) > 2:
            raise KeyboardInterrupt("killed mid-build")
        return real(self, data, name)

    with monkeypatch.context() as m:
        m.setattr(Retriever, "_head_factors", dying)
        with pytest.raises(KeyboardInterrupt):
            _build(fitted, tmp_path / "idx")
    folder = tmp_path / "idx"
    assert sorted(p.name for p in (folder / "factors").iterdir()) == ["s000000.npy", "s000001.npy"]  # no temp file
    assert not (folder / "index.faiss").exists()
    computed = []
    with monkeypatch.context() as m:
        m.setattr(Retriever, "_head_factors", lambda self, data, name="train": computed.append(len(data))
                  or real(self, data, name))
        resumed = _build(fitted, folder)
    assert computed[:2] == [64, 58]  # the two missing shards only (then the queries of nothing yet)
    fresh = _build(fitted, tmp_path / "fresh")
    for s in range(4):
        for part in ("factors", "vectors"):
            assert (folder / part / f"s{s:06d}.npy").read_bytes() == (tmp_path / "fresh" / part / f"s{s:06d}.npy").read_bytes()
    assert torch.equal(resumed.candidates(queries, 20), fresh.candidates(queries, 20))
    # a complete folder is loaded: nothing is computed again, the answer is the same
    expected, computed = fresh.candidates(queries, 20), []
    with monkeypatch.context() as m:
        m.setattr(Retriever, "_head_factors", lambda self, data, name="train": computed.append(name) or real(self, data, name))
        assert torch.equal(_build(fitted, folder).candidates(queries, 20), expected)
    assert computed == ["queries"]


def test_factor_store_is_refused_when_the_model_data_or_source_changed(digits, fitted, tmp_path):
    model, (x, y), queries = digits
    _build(fitted, tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["config"]["source"] == "head-grad" and manifest["config"]["head"] == ["classifier.0", "classifier.2"]
    other = SmallCNN((1, 8, 8), 10, width=4)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.classifier[0].weight[0, 0] += 1e-3
    with pytest.raises(StoreMismatchError, match="model fingerprint"):
        _build(fi.ForwardINF(other, query_chunk=3).fit((x, y), lazy=True), tmp_path / "idx")
    y2 = y.clone()
    y2[5] = (y2[5] + 1) % 10
    with pytest.raises(StoreMismatchError, match="training-set fingerprint"):
        _build(fi.ForwardINF(model, query_chunk=3).fit((x, y2), lazy=True), tmp_path / "idx")
    with pytest.raises(StoreMismatchError, match="configuration"):
        Retriever(fitted, tmp_path / "idx", source="features", shard_size=64)
    # overwrite: the folder is rebuilt from the new data, factors included
    rebuilt = _build(fi.ForwardINF(model, query_chunk=3).fit((x, y2), lazy=True), tmp_path / "idx", overwrite=True)
    assert rebuilt.factors.rows(torch.tensor([5])).shape == (1, rebuilt.head.width)
    assert not torch.equal(rebuilt.factors.rows(torch.tensor([5])), _build(fitted, tmp_path / "old").factors.rows(
        torch.tensor([5])))


class SequenceHead(nn.Module):
    """A classifier whose first head layer runs on every position ([B, T, D]): no single outer product."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)).mean(1))


def test_sequence_heads_are_refused_and_auto_falls_back_to_features():
    x, y = torch.randn(40, 5, 6), torch.randint(0, 3, (40,))
    est = fi.ForwardINF(SequenceHead(), query_chunk=4).fit((x, y), lazy=True)
    with pytest.raises(ValueError, match=r"'inner' called once per batch on \[B, D\] inputs .*input \(\d+, 5, 6\)"):
        Retriever(est, source="head-grad")
    assert Retriever(est).source == "features"
    with pytest.raises(ValueError, match="nn.Linear"):
        Head.of(SequenceHead(), "nope")


def _hf_classifier(kind: str):
    """A tiny transformers sequence classifier at default settings (sdpa attention), padded dict batches."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":  # the head (pooler, classifier) runs on [B, H]
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, num_labels=3)
        model = transformers.BertForSequenceClassification(cfg).eval()
    else:  # Llama's score head runs on every token [B, T, H]: head-grad does not apply
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=64, num_labels=3, pad_token_id=0)
        model = transformers.LlamaForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (30, 10))
    mask = torch.ones_like(ids)
    ids[::3, 7:], mask[::3, 7:] = 0, 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (30,))}


@pytest.mark.parametrize("kind, source", [("bert", "head-grad"), ("llama", "features")])
def test_auto_source_on_hugging_face_classifiers(kind, source):
    """A user's HF classifier: "auto" re-ranks by the head gradient where the head runs on [B, H]
    and falls back to features where it runs per token; the shortlist with K = n is the full sweep."""
    model, train = _hf_classifier(kind)
    before = fingerprint(model)
    est = fi.ForwardINF(model, fi.ClassificationTask()).fit(train)
    retriever = Retriever(est)
    assert retriever.source == source
    queries = {k: v[:4] for k, v in train.items()}
    torch.testing.assert_close(retriever.top_k(queries, 5, shortlist=30).indices, est.top_k(queries, 5).indices)
    assert retriever.top_k(queries, 3, shortlist=10).indices[:, 0].tolist() == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))
