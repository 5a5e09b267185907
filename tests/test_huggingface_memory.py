"""The memory-saving paths of large models, forced on tiny ones: the same numbers as the plain paths.

- a tied embedding's gradient assembled from its lookups (:mod:`forwardinf.core.embedding_grad`)
  equals the plain gradient, and Forward-INF's scores with it equal the plain scores;
- directions drawn in pieces (:mod:`forwardinf.core.directions`) are ``torch.randn``'s numbers,
  the same in the fit and in the score, and the cosine computed from pieces equals the plain one.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

transformers = pytest.importorskip("transformers")
import forwardinf as fi  # noqa: E402
import forwardinf.core.embedding_grad as embedding_grad  # noqa: E402
import forwardinf.estimators.forward_inf as forward_inf  # noqa: E402
from forwardinf.core.directions import gaussian, gaussian_pieces  # noqa: E402
from forwardinf.core.embedding_grad import query_grads, tied_embeddings  # noqa: E402
from forwardinf.core.params import bind, buffers_of, fingerprint, select_params, stack  # noqa: E402
from forwardinf.data.inputs import unsqueeze  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
V, N, T = 64, 12, 8


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, tie_word_embeddings=True)).eval()


def _causal() -> dict:
    """Right-padded rows (pad id 0 = the embedding's padding_idx) and repeated tokens within a row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 12, (N, T), generator=g)  # a small range: tokens repeat, their rows are summed
    attn = torch.ones_like(ids)
    attn[: N // 3, T - 3:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}


def test_a_tied_tables_gradient_from_its_lookups_equals_the_plain_gradient():
    model, data = _tied_llama(), _causal()
    task = fi.LanguageModelTask.for_model(model)
    params, buffers = select_params(model), buffers_of(model)
    assert list(tied_embeddings(model, params, min_bytes=0)) == ["model.embed_tokens.weight"]
    assert tied_embeddings(model, params) == {}  # a 16 KB table keeps the plain gradient by default

    def objective(p, example):
        return task.score_loss(bind(model, p, buffers), unsqueeze(example)).mean()

    batch = {k: v[:5] for k, v in data.items()}  # rows 0-3 padded
    state = stack(params, 5)
    with torch.no_grad():
        plain = vmap(grad(objective))(state, batch)
        lean = query_grads(objective, state, batch, model, min_bytes=0)
    assert plain.keys() == lean.keys()
    for k in plain:
        torch.testing.assert_close(lean[k], plain[k], rtol=1e-6, atol=1e-7)


def test_untied_and_scaled_tables_keep_the_plain_gradient():
    torch.manual_seed(0)
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False))
    assert tied_embeddings(untied, select_params(untied), min_bytes=0) == {}
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(  # scaled word embeddings
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        scale_embedding=True))
    assert tied_embeddings(bart, select_params(bart), min_bytes=0) == {}


def test_forward_inf_with_the_lookup_gradient_scores_as_the_plain_one(monkeypatch):
    model, data = _tied_llama(), _causal()
    task = fi.LanguageModelTask.for_model(model)
    queries = {k: v[[0, 5, 9]] for k, v in data.items()}
    before = fingerprint(model)
    plain = fi.ForwardINF(model, task).fit(data).influence(queries)
    monkeypatch.setattr(embedding_grad, "MIN_TABLE_BYTES", 0)
    lean = fi.ForwardINF(model, task).fit(data).influence(queries)
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-5)
    own = lean[torch.arange(3), torch.tensor([0, 5, 9])]
    assert ((lean >= own[:, None]).sum(1) == 1).all()
    assert all(a == c and torch.equal(b, d) for (a, b), (c, d) in zip(before, fingerprint(model)))


@pytest.mark.parametrize("m, shape, piece", [(1, (49, 7), 16), (3, (5, 11), 32), (2, (40,), 48), (4, (3,), 16)])
def test_directions_drawn_in_pieces_are_randns_numbers(m, shape, piece):
    whole = torch.randn((m, *shape), generator=torch.Generator().manual_seed(3))
    assert torch.equal(gaussian(torch.Generator().manual_seed(3), m, shape, piece), whole)
    flat = whole.reshape(m, -1)
    pieces = list(gaussian_pieces(torch.Generator().manual_seed(3), m, shape, piece))
    assert sum(len(v) for _, _, v in pieces) == whole.numel()
    for j, start, values in pieces:
        assert torch.equal(values, flat[j, start:start + len(values)])
    with pytest.raises(ValueError, match="multiple of 16"):
        next(gaussian_pieces(torch.Generator(), 1, (40,), 20))


def test_the_cosine_from_direction_pieces_equals_the_whole_directions(monkeypatch):
    model, data = _tied_llama(), _causal()
    task = fi.LanguageModelTask.for_model(model)
    queries = {k: v[[0, 5, 9]] for k, v in data.items()}
    plain = fi.ForwardINF(model, task).fit(data)
    expected = plain.influence(queries)
    params = select_params(model)
    monkeypatch.setattr(forward_inf, "_PIECEWISE_BYTES", 0)  # every tensor drawn in pieces
    monkeypatch.setattr("forwardinf.core.directions.PIECE", 64)  # many pieces, across direction ends
    pieced = fi.ForwardINF(model, task).fit(data)
    assert not pieced._keeps_directions(params, 0)
    for chunk in range(2):  # the fit's tangents: the very same directions
        a, b = plain._directions(params, chunk), pieced._directions(params, chunk)
        assert all(torch.equal(a[k], b[k]) for k in a)
        pieces = list(pieced._direction_pieces(params, chunk))
        assert len(pieces) > len(params)
        for k, rows, start, values in pieces:  # the score's pieces: parts of the fit's tangents
            assert torch.equal(values, a[k].flatten(1)[rows, start:start + values.shape[1]])
    torch.testing.assert_close(pieced.influence(queries), expected, rtol=0, atol=1e-5)


def test_frozen_linear_tangents_equal_pytorchs(monkeypatch):
    """Layers outside the differentiated parameters (with or without a bias) take the lean tangent
    ``dx·Wᵀ``, the differentiated one PyTorch's own: the same derivatives as PyTorch's throughout."""
    from torch.func import functional_call, jvp

    import forwardinf.core.frozen_linear as frozen
    from forwardinf.core.frozen_linear import frozen_linear

    routed = []
    apply = frozen._LinearWithFrozenWeight.apply
    monkeypatch.setattr(frozen._LinearWithFrozenWeight, "apply", lambda *a: routed.append(a[1].shape) or apply(*a))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7, bias=False),
                              torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x = torch.randn(4, 6)
    params = {"0.weight": net[0].weight.detach(), "0.bias": net[0].bias.detach()}  # layers 2 and 4 frozen
    tangents = {k: torch.randn(5, *v.shape) for k, v in params.items()}

    def f(p):
        return functional_call(net, p, (x,)).pow(2).sum(-1)

    def tangent_of(t):
        return jvp(f, (params,), (t,))[1]

    with torch.no_grad():
        plain = vmap(tangent_of)(tangents)
        with frozen_linear():
            lean = vmap(tangent_of)(tangents)
    torch.testing.assert_close(lean, plain, rtol=1e-6, atol=1e-6)
    assert routed == [(7, 5), (3, 7)]  # the two frozen layers, once each (vmap traces the function once)
