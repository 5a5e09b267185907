"""Exact first-order scores: forward-mode changes (``difference="tangent"``) have no float32 cancellation."""
import copy

import pytest
import torch
from torch.func import grad, vmap

import forwardinf as fi
from forwardinf.core.params import bind
from forwardinf.data.loaders import load_dataset
from forwardinf.models import build_model
from forwardinf.tasks.classification import ClassificationTask
from forwardinf.training import train_classifier


@pytest.fixture(scope="module")
def fitted():
    """A digits MLP trained until most training losses are below float32's resolution near 0."""
    split = load_dataset("digits")
    x, y = split.x_train[:300], split.y_train[:300]
    model = build_model("mlp", split.input_shape, split.n_classes, seed=0)
    train_classifier(model, (x, y), epochs=100, lr=0.1, batch_size=32, seed=0)  # median loss ~1e-5
    return model, (x, y), (split.x_test[:6], split.y_test[:6])


def _gradient_norms(model, train, kind):
    task = ClassificationTask()
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = getattr(task, kind) if kind == "score_loss" else lambda m, b: torch.nn.functional.softplus(task.score_loss(m, b))
    one = lambda p, x, y: f(bind(model, p), (x[None], y[None])).sum()  # noqa: E731
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, *train)
    return torch.sqrt(sum(v.double().flatten(1).pow(2).sum(1) for v in g.values()))


def _float64_finite(model, train, queries, **kw):
    """The finite-difference scores of a float64 copy of ``model``: the reference without cancellation."""
    m64 = copy.deepcopy(model).double()
    est = fi.ForwardINF(m64, **{**kw, "difference": "finite"}).fit((train[0].double(), train[1]))
    return est.influence((queries[0].double(), queries[1])).double()


@pytest.mark.parametrize("preset,kind", [("counterfactual", "loss"), ("default", "score_loss")])
def test_no_score_is_exactly_zero_unless_its_gradient_is(fitted, preset, kind):
    model, train, queries = fitted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = fi.ForwardINFConfig.preset(preset, score="margin" if preset == "default" else "influence")
    est = fi.ForwardINF(model, config=cfg)
    tangent = est.fit(train).influence(queries)
    assert est.tangent_
    nonzero_grad = _gradient_norms(model, train, kind) > 0
    assert nonzero_grad.all()
    assert not (tangent[:, nonzero_grad] == 0).any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    # the reference: float64 finite differences (a tiny step for the per-unit-step influence score)
    ref = _float64_finite(model, train, queries, **{**cfg.to_dict(), "lr": 1e-7})
    if cfg.score == "margin":  # a raw change: linear in the step to first order
        ref = ref * (cfg.lr / 1e-7)
    rel = ((tangent.double() - ref).abs() / ref.abs()).flatten()
    assert rel.median() < 1e-3 and rel.quantile(0.9) < 0.05
    if preset == "counterfactual":
        # the float32 finite difference rounds most well-fitted points' loss changes to 0
        finite = est.with_config(cfg.replace(difference="finite")).influence(queries)
        assert (finite == 0).float().mean() > 0.5


def test_tangent_refuses_train_mode():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="difference='tangent'"):
        fi.ForwardINF(model, ClassificationTask(), difference="tangent", train_mode=True).fit(
            (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError, match="difference"):
        fi.ForwardINF(model, ClassificationTask(), difference="exact").fit((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))


def test_auto_resolves_by_update():
    model = torch.nn.Linear(3, 2)
    assert fi.ForwardINF(model).tangent_
    assert fi.ForwardINF.preset("counterfactual", model).tangent_
    assert not fi.ForwardINF.preset("paper", model).tangent_  # Adam moves far: the measured change
    assert not fi.ForwardINF.preset("group", model).tangent_  # two steps
    assert not fi.ForwardINF(model, train_mode=True).tangent_


@pytest.mark.parametrize("optimizer,extra", [("nsgd", {}), ("sgd", {"momentum": 0.9}), ("adam", {}),
                                             ("sgd", {"weight_decay": 0.1})])
def test_delta_is_the_tracked_displacement_of_step_bit_for_bit(optimizer, extra):
    """``UpdateRule.delta`` (the forward-mode scores' last step: θ_q is never formed, the step is
    computed in the gradients' memory) gives the very bits ``step`` tracks as ``θ_q - θ``."""
    from forwardinf.core.update import UpdateRule

    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 5, 4, generator=g), "b": torch.randn(3, 4, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(2)]
    a, b = (UpdateRule(optimizer, lr=1e-2, track=True, **extra) for _ in range(2))
    p = a.step(params, {k: v.clone() for k, v in grads[0].items()}, stacked=True)
    a.step(p, {k: v.clone() for k, v in grads[1].items()}, stacked=True)
    q = b.step(params, {k: v.clone() for k, v in grads[0].items()}, stacked=True)
    owned = {k: v.clone() for k, v in grads[1].items()}
    step = b.delta(q, owned, stacked=True)
    for k in params:
        assert torch.equal(a.state["displacement"][k], b.state["displacement"][k])
    if optimizer == "nsgd":  # a straight step: the change lives in the gradients' own memory
        assert all(step[k].data_ptr() == owned[k].data_ptr() for k in params)


def test_one_step_forward_mode_update_never_forms_the_updated_parameters(fitted):
    model, train, queries = fitted
    est = fi.ForwardINF(model).fit(train)
    update = next(est._updates(est._queries(queries)))[1]
    assert update.params is None and update.moved is not None
    assert fi.ForwardINF(model, difference="finite").fit(train)._query_chunk() == est._query_chunk() == 16


def test_delta_scales_gradients_that_share_memory_once():
    """A vmapped backward can return one gradient as a view into another's (ViT's class token's
    inside the position embeddings'): the in-place step must scale each element once."""
    from forwardinf.core.update import UpdateRule

    g = torch.Generator().manual_seed(0)
    params = {"pos": torch.randn(2, 5, 4, generator=g), "cls": torch.randn(2, 1, 4, generator=g)}
    pos = torch.randn(2, 5, 4, generator=g)
    shared = {"pos": pos, "cls": pos[:, :1]}
    fresh = {k: v.clone() for k, v in shared.items()}
    a, b = (UpdateRule("nsgd", lr=1e-2, track=True) for _ in range(2))
    a.step(params, fresh, stacked=True)
    b.delta(params, shared, stacked=True)
    for k in params:
        assert torch.equal(a.state["displacement"][k], b.state["displacement"][k]), k
