"""ForwardINF: exact answers on small problems, the API contract, and refusal of bad input."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import forwardinf as fi
from forwardinf.core.params import fingerprint


class SquaredLoss(fi.Task):
    """``(x^T θ - y)^2`` for a bias-free linear model: the quadratic case of DESIGN.md."""

    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def linear_problem(n=30, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return model, x, y


def test_exact_quadratic_case():
    model, x, y = linear_problem()
    theta = model.weight.detach()[0]
    eta = 0.05
    est = fi.ForwardINF(model, SquaredLoss(), optimizer="sgd", lr=eta, steps=1, score="loss",
                        difference="finite").fit((x, y))
    q = slice(3, 6)
    scores = est.influence((x[q], y[q]))
    first_order = fi.ForwardINF(model, SquaredLoss(), optimizer="sgd", lr=eta, steps=1, score="loss").fit((x, y))
    assert first_order.tangent_  # "auto" on one plain step: the forward-mode derivative
    tangent = first_order.influence((x[q], y[q]))
    resid = x @ theta - y
    g = 2 * resid[:, None] * x  # per-example gradients [n, d]
    for row, qi in enumerate(range(3, 6)):
        gq = g[qi]
        expected = eta * g @ gq + eta**2 / 2 * 2 * (x @ gq) ** 2  # η g_i·g_q + η²/2 g_qᵀ(2 x_i x_iᵀ)g_q
        torch.testing.assert_close(scores[row], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tangent[row], eta * g @ gq, rtol=1e-10, atol=1e-12)  # first order, exactly


def test_small_step_tends_to_gradient_dot_product():
    model, x, y = linear_problem(seed=1)
    resid = x @ model.weight.detach()[0] - y
    g = 2 * resid[:, None] * x
    expected = g[:4] @ g.T
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        est = fi.ForwardINF(model, SquaredLoss(), optimizer="sgd", lr=eta, score="loss",
                            difference="finite").fit((x, y))
        errors.append((est.influence((x[:4], y[:4])) / eta - expected).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * expected.abs().max().item()
    # the forward-mode change is the limit itself, at any step
    est = fi.ForwardINF(model, SquaredLoss(), optimizer="sgd", lr=1e-2, score="loss").fit((x, y))
    torch.testing.assert_close(est.influence((x[:4], y[:4])) / 1e-2, expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def digits_mlp():
    from forwardinf.data.loaders import load_digits
    from forwardinf.models import MLP
    from forwardinf.training import train_classifier

    split = load_digits()
    model = MLP(split.input_shape, split.n_classes, hidden=(64,))
    torch.manual_seed(0)
    train_classifier(model, split.train(), epochs=15, lr=0.05, seed=0)
    return model, split


def test_cosine_score_finds_exact_duplicates(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))[:25]
    scores = fi.ForwardINF(model).fit((x, y)).influence((x[idx], y[idx]))
    top1 = (scores.argmax(1) == idx).float().mean().item()
    assert top1 >= 0.9, top1
    # An exact duplicate's score is the cosine of its gradient with itself: ~1.
    assert scores.gather(1, idx[:, None]).min() > 0.99


def test_cosine_score_matches_exact_gradient_cosine(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    x, y = x[:200], y[:200]
    task = fi.ClassificationTask()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def margin(p, xi, yi):
        return task.score_loss(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None])).sum()

    g = vmap(grad(margin), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([t.flatten(1) for t in g.values()], 1).double()
    exact = (g[:5] @ g.T) / (g[:5].norm(dim=1, keepdim=True) * g.norm(dim=1)[None])
    # default sensitivity="exact": the first-order change along the update over exact gradient norms
    est = fi.ForwardINF(model, lr=1e-4).fit((x, y))
    torch.testing.assert_close(est.influence((x[:5], y[:5])).double(), exact, rtol=0, atol=2e-4)
    # self-influence: (dℓ/dm)² ||∇m||², with dℓ/dm = 1 - e^{-ℓ} (= sigmoid(m)) for the softplus cross-entropy
    slope = -torch.expm1(-est.base_losses_.double())
    torch.testing.assert_close(est.self_influence().double(), slope ** 2 * g.pow(2).sum(1), rtol=1e-4, atol=0)
    est = fi.ForwardINF(model, lr=1e-4, sensitivity="directions", n_directions=64).fit((x, y)).influence((x[:5], y[:5]))
    # directions: the estimated orthogonal component is noisy (~1/sqrt(n_directions)); the component along the update is exact
    assert (est.double() - exact).abs().mean() < 0.05
    assert torch.corrcoef(torch.stack([est.flatten().double(), exact.flatten()]))[0, 1] > 0.95


def test_gradient_norms_fall_back_to_materializing_when_a_weight_is_used_outside_its_layer():
    from forwardinf.core.grad_norms import squared_grad_norms
    from forwardinf.core.params import bind

    class SideUse(nn.Module):  # fc's weight also read directly: a use the closed form cannot see
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x[..., :3] @ self.fc.weight[:, :3].T

    torch.manual_seed(0)
    model, x = SideUse(), torch.randn(6, 5)
    params = dict(model.named_parameters())
    one = lambda p, xi: bind(model, p)(xi[None]).pow(2).sum()  # noqa: E731
    plan: dict = {}
    with torch.no_grad():
        got = squared_grad_norms(one, params, x, model, 2**30, plan)
    assert plan["checked"] and not plan["ghost"]
    expected = []
    for i in range(6):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        expected.append(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=0)


def test_squared_grad_norms_are_the_per_example_gradients_norms_also_for_a_tied_embedding():
    transformers = pytest.importorskip("transformers")
    from forwardinf.core.grad_norms import squared_grad_norms
    from forwardinf.core.params import bind, buffers_of, select_params
    from forwardinf.data.inputs import take
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True)).eval()
    task = fi.LanguageModelTask.for_model(model)
    ids = torch.randint(1, 64, (5, 7))
    attn = torch.ones_like(ids)
    attn[:2, 5:] = 0  # right padding, as a tokenizer pads a batch
    batch = {"input_ids": ids.masked_fill(attn == 0, 0), "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}
    params, buffers = select_params(model, None), buffers_of(model)
    one = lambda p, ex: task.score_loss(bind(model, p, buffers), {k: v[None] for k, v in ex.items()}).sum()  # noqa: E731
    expected = []
    for i in range(5):
        model.zero_grad()
        alone = {k: v[i:i + 1, : int(attn[i].sum())] for k, v in batch.items()}
        task.score_loss(model, alone).sum().backward()  # the example alone, unpadded
        expected.append(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    model.zero_grad()
    for min_bytes in (None, 0):  # the plain gradient, and the tied table assembled from its lookups
        import forwardinf.core.embedding_grad as E
        old, E.MIN_TABLE_BYTES = E.MIN_TABLE_BYTES, (E.MIN_TABLE_BYTES if min_bytes is None else 0)
        try:
            got = squared_grad_norms(one, params, batch, model, 2**30)  # vmapped
            alone = torch.cat([squared_grad_norms(one, params, take(batch, slice(i, i + 1)), model, 2**30) for i in range(5)])
        finally:
            E.MIN_TABLE_BYTES = old
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=0)
        torch.testing.assert_close(alone, torch.stack(expected), rtol=1e-5, atol=0)  # one at a time: plain autograd


def test_batched_queries_equal_one_at_a_time(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:300], y[:300]), (x[:7], y[:7])
    for score in ("cosine", "loss"):
        together = fi.ForwardINF(model, score=score, query_chunk=16).fit(train).influence(q)
        alone = fi.ForwardINF(model, score=score, query_chunk=1).fit(train).influence(q)
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


def test_dict_of_tensors_equals_tuple_data(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:200], y[:200]), (x[:3], y[:3])
    as_dicts = fi.ForwardINF(model, batch_size=64).fit({"inputs": train[0], "targets": train[1]})
    scores = as_dicts.influence({"inputs": q[0], "targets": q[1]}, indices=[5, 0, 199])
    torch.testing.assert_close(scores, fi.ForwardINF(model, batch_size=64).fit(train).influence(q)[:, [5, 0, 199]])
    with pytest.raises(ValueError, match="different lengths"):
        fi.ForwardINF(model).fit({"inputs": x[:5], "targets": y[:4]})


def test_auto_batch_size_fits_the_budget_and_changes_no_score(digits_mlp):
    from forwardinf.core.autobatch import DEFAULT_BUDGET, activation_bytes

    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:300], y[:300]), (x[:3], y[:3])
    auto = fi.ForwardINF(model).fit(train)
    per_example = activation_bytes(model, fi.ClassificationTask(), (x[:8], y[:8]))
    assert auto.batch_size == "auto" and 1 <= auto.batch_size_ <= 512
    assert auto.batch_size_ == 512 or 16 * (auto.batch_size_ + 1) * per_example > DEFAULT_BUDGET  # 16 tangents in flight
    fixed = fi.ForwardINF(model, batch_size=auto.batch_size_).fit(train)
    assert torch.equal(auto.influence(q), fixed.influence(q))
    assert fi.ForwardINF(model, batch_size=7).fit(train).batch_size_ == 7
    with pytest.raises(ValueError, match="batch_size"):
        fi.ForwardINF(model, batch_size="big").fit(train)


def test_models_returning_tuples_or_dicts_of_logits(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:100], y[:100]), (x[:3], y[:3])

    class Wrapped(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.inner, self.kind = model, kind

        def forward(self, inputs):
            logits = self.inner(inputs)
            return (logits, inputs.sum()) if self.kind == "tuple" else {"logits": logits}

    plain = fi.ForwardINF(model).fit(train).influence(q)
    for kind in ("tuple", "dict"):
        torch.testing.assert_close(fi.ForwardINF(Wrapped(kind)).fit(train).influence(q), plain)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model  # registered: its parameters are the ones to update

        def forward(self, inputs):
            return {"scores": self.inner(inputs)}

    with pytest.raises(ValueError, match="model output is a dict; expected logits"):
        fi.ForwardINF(Odd()).fit(train)


def test_numpy_arrays_equal_tensors_and_float64_gets_a_hint(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:200], y[:200]), (x[:3], y[:3])
    from_numpy = fi.ForwardINF(model, batch_size=64).fit((train[0].numpy(), train[1].numpy()))
    assert torch.equal(from_numpy.influence((q[0].numpy(), q[1].numpy())),
                       fi.ForwardINF(model, batch_size=64).fit(train).influence(q))
    with pytest.raises(ValueError, match="inputs are torch.float64, the model's parameters torch.float32"):
        fi.ForwardINF(model).fit((train[0].double().numpy(), train[1].numpy()))


@pytest.mark.parametrize("score", ["cosine", "loss"])
def test_indices_score_a_subset_of_one_fit(digits_mlp, score):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:300], y[:300]), (x[:4], y[:4])
    est = fi.ForwardINF(model, score=score).fit(train)
    full, full_joint = est.influence(q), est.influence(q, joint=True)
    rows = torch.tensor([250, 3, 17, 0, 120])
    torch.testing.assert_close(est.influence(q, indices=rows), full[:, rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.influence(q, joint=True, indices=rows.tolist()), full_joint[rows], rtol=1e-5, atol=1e-6)
    for bad, words in [([], "non-empty"), ([[1, 2]], "1-D"), ([0.5], "integer"), ([300], r"\[0, 300\)"), ([-1], r"\[0, 300\)")]:
        with pytest.raises(ValueError, match=words):
            est.influence(q, indices=bad)


@pytest.mark.parametrize("optimizer,score", [("nsgd", "cosine"), ("adam", "loss"), ("sgd", "abs")])
def test_joint_on_one_query_equals_per_query(digits_mlp, optimizer, score):
    model, split = digits_mlp
    x, y = split.train()
    est = fi.ForwardINF(model, optimizer=optimizer, score=score, lr=1e-3, steps=2).fit((x[:300], y[:300]))
    per_query = est.influence((x[10:11], y[10:11]))[0]
    joint = est.influence((x[10:11], y[10:11]), joint=True)
    torch.testing.assert_close(joint, per_query, rtol=1e-4, atol=1e-6)


def bn_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("preset", ["default", "paper", "authors", "group"])
@pytest.mark.parametrize("train_flag", [False, True])
def test_model_untouched(digits_mlp, preset, train_flag):
    _, split = digits_mlp
    x, y = split.train()
    model = bn_cnn()
    model.train(train_flag)
    before = fingerprint(model)
    modes = [m.training for m in model.modules()]
    est = fi.ForwardINF.preset(preset, model).fit((x[:100], y[:100]))
    est.influence((x[:3], y[:3]))
    est.influence((x[:3], y[:3]), joint=True)
    est.top_k((x[:3], y[:3]), k=4)
    est.self_influence()
    est.tune((x[:2], y[:2]), [0, 1], lrs=[1e-3], steps=[1], scores=["loss"])
    after = fingerprint(model)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after):
        assert torch.equal(a, b), name
    assert [m.training for m in model.modules()] == modes


def test_same_seed_same_scores(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    a = fi.ForwardINF(model, seed=5).fit((x[:200], y[:200])).influence((x[:4], y[:4]))
    b = fi.ForwardINF(model, seed=5).fit((x[:200], y[:200])).influence((x[:4], y[:4]))
    assert torch.equal(a, b)


def test_top_k_and_shapes(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    est = fi.ForwardINF(model).fit((x[:200], y[:200]))
    s = est.influence((x[:3], y[:3]))
    assert s.shape == (3, 200)
    assert est.influence((x[:3], y[:3]), joint=True).shape == (200,)
    assert est.self_influence().shape == (200,)
    top = est.top_k((x[:3], y[:3]), k=5)
    assert isinstance(top, fi.TopK) and top.indices.shape == (3, 5) and top.scores.shape == (3, 5)
    torch.testing.assert_close(top.scores, s.topk(5, dim=1).values)


def test_params_subset_only_moves_those(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    head = [n for n, _ in model.named_parameters()][-2].rsplit(".", 1)[0]
    est = fi.ForwardINF(model, params=head, optimizer="sgd", lr=0.1, score="loss").fit((x[:100], y[:100]))
    scores = est.influence((x[:1], y[:1]))[0]
    # by hand: one SGD ascent step on the head only
    task = fi.ClassificationTask()
    params = dict(model.named_parameters())
    chosen = {k: v.detach() for k, v in params.items() if k.startswith(head + ".")}
    g = grad(lambda p: task.loss(lambda inp: functional_call(model, p, (inp,), strict=False), (x[:1], y[:1])).mean())(chosen)
    moved = {k: chosen[k] + 0.1 * g[k] for k in chosen}
    with torch.no_grad():
        after = task.loss(lambda inp: functional_call(model, moved, (inp,), strict=False), (x[:100], y[:100]))
        before = task.loss(model, (x[:100], y[:100]))
    torch.testing.assert_close(scores, after - before, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        fi.ForwardINF(model, params="nope.*").fit((x[:10], y[:10]))


def test_descent_keeps_orientation(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    idx = torch.arange(0, 100, 10)
    scores = fi.ForwardINF(model, direction="descent").fit((x[:100], y[:100])).influence((x[idx], y[idx]))
    assert (scores.argmax(1) == idx).float().mean() >= 0.9


def test_tune_picks_a_working_setting(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    idx = torch.arange(0, 300, 30)
    est = fi.ForwardINF(model, score="margin").fit((x[:300], y[:300]))
    before = est.influence((x[:3], y[:3]))
    cfg = est.tune((x[idx], y[idx]), idx, lrs=[1e-3], steps=[1], scores=["loss", "cosine"])
    assert isinstance(cfg, fi.ForwardINFConfig) and cfg.score == "cosine" and cfg.lr == 1e-3
    assert cfg == est.config.replace(score="cosine")  # everything else as configured
    assert est.score == "margin" and torch.equal(est.influence((x[:3], y[:3])), before)  # est is left as it was
    assert {r["score"] for r in est.tune_results_} == {"loss", "cosine"}
    best = max(r["top1"] for r in est.tune_results_)
    assert best >= 0.9
    tuned = est.with_config(cfg)
    assert tuned.score == "cosine" and tuned.train_ is est.train_
    torch.testing.assert_close(tuned.influence((x[:3], y[:3])),
                               fi.ForwardINF(model, config=cfg).fit((x[:300], y[:300])).influence((x[:3], y[:3])))


def test_config_and_keywords_are_one_thing(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    cfg = fi.ForwardINFConfig(steps=2, lr=5e-3, optimizer="adam", score="loss")
    by_config = fi.ForwardINF(model, config=cfg)
    by_keywords = fi.ForwardINF(model, steps=2, lr=5e-3, optimizer="adam", score="loss")
    assert by_config.config == by_keywords.config and by_keywords.lr == 5e-3 and by_keywords.steps == 2
    assert fi.ForwardINF(model, config=cfg, lr=1e-2).config == cfg.replace(lr=1e-2)  # keywords override config=
    assert cfg.to_dict()["optimizer"] == "adam" and set(cfg.to_dict()) == set(fi.ForwardINFConfig.names())
    assert fi.ForwardINFConfig.preset("paper") == fi.ForwardINFConfig(**{**fi.ForwardINFConfig().to_dict(),
                                                                         **fi.PRESETS["paper"]})
    assert fi.ForwardINF.preset("paper", model, steps=3).config == fi.ForwardINFConfig.preset("paper", steps=3)
    assert repr(fi.ForwardINF.preset("paper", model)) == "ForwardINF(lr=0.005, optimizer='adam', score='loss')"
    train, q = (x[:100], y[:100]), (x[:3], y[:3])
    assert torch.equal(by_config.fit(train).influence(q), by_keywords.fit(train).influence(q))
    with pytest.raises(AttributeError, match=r"read-only \(lr\); est.with_config"):  # settings change only by with_config
        by_config.lr = 0.1
    assert by_config.with_config(cfg.replace(lr=0.1)).config == cfg.replace(lr=0.1) and cfg.lr == 5e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1
    with pytest.raises(TypeError, match=r"ForwardINF: unexpected keyword\(s\) \['stepz'\]"):
        fi.ForwardINF(model, stepz=2)
    with pytest.raises(TypeError, match="config must be a ForwardINFConfig"):
        fi.ForwardINF(model, config={"lr": 1.0})
    with pytest.raises(ValueError, match="preset"):
        fi.ForwardINFConfig.preset("nope")
    with pytest.raises(ValueError, match=r"invalid lr=-1"):  # values are checked on construction
        fi.ForwardINF(model, config=cfg.replace(lr=-1))


def test_with_config_reuses_the_cached_base_values(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    train, q = (x[:200], y[:200]), (x[:4], y[:4])
    est = fi.ForwardINF(model, batch_size=50).fit(train)
    other = est.with_config(est.config.replace(lr=3e-3, steps=2))
    assert other._cache_ is est._cache_  # one cache, keyed by what each entry depends on
    assert other._base("score_loss") is est._base("score_loss") and other._base("directional") is est._base("directional")
    assert torch.equal(other.influence(q), fi.ForwardINF(model, batch_size=50, lr=3e-3, steps=2).fit(train).influence(q))
    loss = est.with_config(est.config.replace(score="loss"))
    assert torch.equal(loss.base_losses_, est.base_losses_)  # computed once, shared
    seeded = est.with_config(est.config.replace(seed=1))  # other random directions: not reused
    assert not torch.equal(seeded._base("directional"), est._base("directional"))
    assert torch.equal(seeded.influence(q), fi.ForwardINF(model, batch_size=50, seed=1).fit(train).influence(q))
    assert not hasattr(fi.ForwardINF(model).with_config(est.config), "train_")  # unfitted stays unfitted


def test_streaming_top_k_equals_the_full_matrix_with_ties(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    # every training point three times: ties everywhere, spread over different chunks
    train = (torch.cat([x[:40]] * 3), torch.cat([y[:40]] * 3))
    q = (x[:5], y[:5])
    for kw in ({"batch_size": 7}, {"batch_size": 16, "score": "loss", "optimizer": "adam", "lr": 5e-3}):
        est = fi.ForwardINF(model, query_chunk=2, **kw).fit(train)
        full = est.influence(q)
        best = torch.sort(full, dim=1, descending=True, stable=True)
        worst = torch.sort(full, dim=1, stable=True)
        for chunk in (1, 10, 33, 8192):
            top = est.top_k(q, k=9, chunk=chunk)
            assert torch.equal(top.indices, best.indices[:, :9]) and torch.equal(top.scores, best.values[:, :9])
            assert torch.equal(top.opponents, worst.indices[:, :9])
            assert torch.equal(top.opponent_scores, worst.values[:, :9])
        idx, val = top  # unpacks as before
        assert (val[:, :3] == val[:, :1]).all()  # the three copies of the best point tie
    assert est.capabilities.indices and est.capabilities.shardable
    assert not fi.ForwardINF(model, optimizer="kfac").capabilities.shardable


# -- bad input ---------------------------------------------------------------------------------
def test_influence_before_fit(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    with pytest.raises(fi.NotFittedError, match="fit"):
        fi.ForwardINF(model).influence((x[:2], y[:2]))


def test_bad_input_refused(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    est = fi.ForwardINF(model).fit((x[:50], y[:50]))
    with pytest.raises(ValueError, match="cannot run|shape"):
        est.influence((torch.randn(2, 1, 9, 9), y[:2]))
    with pytest.raises(ValueError, match="empty"):
        est.influence((x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        fi.ForwardINF(model).fit((x[:0], y[:0]))
    with pytest.raises(ValueError, match="out of range"):
        est.influence((x[:2], torch.tensor([1, 10])))
    with pytest.raises(ValueError, match="out of range"):
        fi.ForwardINF(model).fit((x[:5], torch.tensor([0, 1, 2, 3, 11])))
    with pytest.raises(ValueError, match="out of range"):  # a bad label beyond the first batch
        fi.ForwardINF(model, batch_size=8).fit((x[:40], torch.cat([y[:39], torch.tensor([-1])])))
    bad = x[:2].clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        est.influence((bad, y[:2]))
    with pytest.raises(ValueError, match="NaN or inf"):
        fi.ForwardINF(model).fit((bad, y[:2]))
    with pytest.raises(ValueError, match="different lengths"):
        fi.ForwardINF(model).fit((x[:5], y[:4]))
    with pytest.raises(ValueError, match="invalid lr"):
        fi.ForwardINF(model, lr=-1).fit((x[:5], y[:5]))
    with pytest.raises(ValueError, match="invalid score"):
        fi.ForwardINF(model, score="best").fit((x[:5], y[:5]))


def test_diverging_update_refused(digits_mlp):
    model, split = digits_mlp
    x, y = split.train()
    est = fi.ForwardINF(model, optimizer="sgd", lr=1e30, steps=3, score="loss").fit((x[:50], y[:50]))
    with pytest.raises(FloatingPointError, match="diverg|non-finite"):
        est.influence((x[:2], y[:2]))
