"""No silently wrong answer from the Python API (issue 22, items 2, 3, 13 and the property test).

Each test here fails on commit 62c4a6f: settings assigned after ``fit`` were used with state
fitted under the old ones; bad settings passed construction; weights edited after ``fit`` were
scored against stale base losses; ``InvariantForwardINF.top_k`` ranked by plain Forward-INF;
tail mode's batch-size probe ran before any check of the data; a frozen model got a ``vmap``
message; a diverging ``lr`` raised a bare ``FloatingPointError``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import forwardinf as fi
from forwardinf.baselines import make_estimator
from forwardinf.core.autobatch import auto_batch_size
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.base import NotFittedError, StaleFitError
from forwardinf.estimators.invariant import InvariantForwardINF
from forwardinf.estimators.validation import DivergedError, checksum

N_TRAIN, N_QUERY = 48, 3


@pytest.fixture(scope="module")
def digits():
    """``(train, queries)``: 48 training and 3 held-out 8x8 digits ``([N, 1, 8, 8], [N])``."""
    split = load_digits()
    x, y = split.train()
    xq, yq = split.test()
    return (x[:N_TRAIN], y[:N_TRAIN]), (xq[:N_QUERY], yq[:N_QUERY])


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 10)).eval()


# Estimators with a configuration: name -> (builder, one valid setting to try assigning).
BUILDERS = {
    "forward-inf": (lambda m: fi.ForwardINF(m, n_directions=4), "lr"),
    "forward-inf-tail": (lambda m: fi.TailForwardINF(m, split="4", n_directions=4), "score"),
    "forward-inf-invariant": (lambda m: InvariantForwardINF(m, n_directions=4, flip=False, shift=1), "flip"),
    "if-exact": (lambda m: fi.InfluenceFunction(m, solver="exact", damping=0.1, params="4.bias"), "damping"),
    "tracin": (lambda m: fi.TracIn(m), "normalize"),
    "representer": (lambda m: fi.RepresenterPoint(m), "l2"),
    "knn-shapley": (lambda m: fi.KNNShapley(m), "k"),
}


# ------------------------------------------------------------------------- item 2: settings
@pytest.mark.parametrize("name", BUILDERS)
def test_settings_are_read_only_and_change_only_through_with_config(name, digits):
    build, field = BUILDERS[name]
    train, queries = digits
    est = build(_cnn()).fit(train)
    before = est.influence(queries)
    value = getattr(est, field)
    with pytest.raises(AttributeError, match=rf"read-only \({field}\).*with_config"):
        setattr(est, field, value)
    with pytest.raises(AttributeError, match="read-only"):
        est.config = est.config
    assert torch.equal(est.influence(queries), before)  # nothing changed
    again = est.with_config(est.config)
    assert torch.equal(again.influence(queries), before)


def test_assigned_lr_no_longer_gives_all_zero_scores(digits):
    """On 62c4a6f ``est.lr = 0`` after fit was accepted and every score became 0."""
    train, queries = digits
    est = fi.ForwardINF(_cnn(), n_directions=4).fit(train)
    with pytest.raises(AttributeError):
        est.lr = 0
    assert est.influence(queries).abs().max() > 0
    with pytest.raises(ValueError, match=r"invalid lr=0; expected a finite positive number"):
        est.with_config(est.config.replace(lr=0))


@pytest.mark.parametrize("kw, match", [
    ({"score": "bogus"}, r"invalid score='bogus'; expected one of \('cosine'"),
    ({"steps": 0}, r"invalid steps=0; expected a positive integer"),
    ({"steps": 1.5}, r"invalid steps=1.5"),
    ({"lr": 0.0}, r"invalid lr=0.0"),
    ({"lr": -1e-3}, r"invalid lr=-0.001"),
    ({"lr": math.inf}, r"invalid lr=inf"),
    ({"lr": math.nan}, r"invalid lr=nan"),
    ({"lr": "big"}, r"invalid lr='big'"),
    ({"n_directions": 100_000_000}, r"invalid n_directions=100000000; expected an integer in \[1, 1024\]"),
    ({"n_directions": 0}, r"invalid n_directions=0"),
    ({"optimizer": "rmsprop"}, r"invalid optimizer='rmsprop'; expected one of \('nsgd', 'sgd', 'adam', 'kfac'\)"),
    ({"direction": "up"}, r"invalid direction='up'"),
    ({"momentum": 1.0}, r"invalid momentum=1.0; expected a number in \[0, 1\)"),
    ({"weight_decay": -1.0}, r"invalid weight_decay=-1.0"),
    ({"batch_size": "big"}, r"invalid batch_size='big'"),
    ({"batch_size": 0}, r"invalid batch_size=0"),
    ({"query_chunk": 0}, r"invalid query_chunk=0"),
    ({"query_repeat": 0}, r"invalid query_repeat=0"),
    ({"train_mode": "yes"}, r"invalid train_mode='yes'; expected True or False"),
    ({"seed": 1.5}, r"invalid seed=1.5"),
    ({"optimizer": "kfac", "damping": 0.0}, r"damping=0.0; expected a finite number > 0"),
    ({"params": "nope.*"}, r"matches no trainable parameter"),
])
def test_bad_settings_are_refused_at_construction(kw, match):
    """Before any data is seen (``n_directions=100000000`` ran for minutes on 62c4a6f)."""
    model = _cnn()
    for cls in (fi.ForwardINF, InvariantForwardINF):
        with pytest.raises(ValueError, match=match):
            cls(model, **kw)
    with pytest.raises(ValueError, match=match):
        fi.TailForwardINF(model, split="4", **kw)
    with pytest.raises(ValueError, match=match):  # config= is checked the same way as keywords
        fi.ForwardINF(model, config=fi.ForwardINFConfig(**kw))


@pytest.mark.parametrize("build, match", [
    (lambda m: fi.TailForwardINF(m, split="4", precision="fp8"), r"invalid precision='fp8'"),
    (lambda m: fi.TailForwardINF(m, split="4", cache="cloud"), r"invalid cache='cloud'"),
    (lambda m: fi.TailForwardINF(m, split="4", fitted_fallback=True), r"fitted_fallback"),
    (lambda m: InvariantForwardINF(m, flip="twice"), r"invalid flip='twice'"),
    (lambda m: InvariantForwardINF(m, shift=-1), r"invalid shift=-1"),
    (lambda m: fi.InfluenceFunction(m, solver="newton"), r"invalid solver='newton'"),
    (lambda m: fi.InfluenceFunction(m, tol=math.inf), r"invalid tol=inf"),
    (lambda m: fi.KNNShapley(m, k=0), r"invalid k=0"),
    (lambda m: make_estimator("feature-nn", m, metric="manhattan"), r"invalid metric='manhattan'"),
    (lambda m: fi.RepresenterPoint(m, l2=-1.0), r"invalid l2=-1.0"),
    (lambda m: fi.TMCShapley(fi.LastLayerTrainer(m), permutations=0), r"invalid permutations=0"),
    (lambda m: fi.LeaveOneOut(fi.LastLayerTrainer(m), workers=0), r"invalid workers=0"),
])
def test_other_estimators_check_their_settings_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build(_cnn())


def test_missing_split_is_a_type_error():
    with pytest.raises(TypeError, match="missing the keyword split="):
        fi.TailForwardINF(_cnn())


# --------------------------------------------------------------- item 2: weights changed after fit
def _edits():
    """Ways a user changes a model after fit: name -> edit(model)."""
    def no_grad_add(m):
        with torch.no_grad():
            m[4].weight.add_(0.01)

    def through_data(m):  # bypasses PyTorch's version counter
        m[0].bias.data[0] += 1e-3

    def permute(m):  # the same values in another order
        m[4].bias.data.copy_(m[4].bias.data.flip(0))

    def load_other(m):
        m.load_state_dict(_cnn(seed=1).state_dict())

    def buffers(m):  # a train-mode forward moves BatchNorm's running statistics
        m.train()
        m(torch.randn(4, 1, 8, 8))
        m.eval()

    def optimizer_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.randn(4, 1, 8, 8)).sum().backward()
        opt.step()

    return {f.__name__: f for f in (no_grad_add, through_data, permute, load_other, buffers, optimizer_step)}


@pytest.mark.parametrize("edit", _edits())
@pytest.mark.parametrize("name", ["forward-inf", "forward-inf-tail", "forward-inf-invariant", "if-exact", "tracin"])
def test_weights_changed_since_fit_are_refused(name, edit, digits):
    """On 62c4a6f ForwardINF scored the edited weights against the base losses of the old ones."""
    train, queries = digits
    model = _cnn()
    est = BUILDERS[name][0](model).fit(train)
    _edits()[edit](model)
    for call in (lambda: est.influence(queries), lambda: est.top_k(queries, k=3),
                 lambda: est.influence(queries, joint=True), lambda: est.with_config(est.config)):
        with pytest.raises(StaleFitError, match=r"weights changed since fit \(.*\).*call fit\(train\) again"):
            call()
    try:
        with pytest.raises(StaleFitError):
            est.self_influence()
    except NotImplementedError:
        pass
    assert isinstance(StaleFitError("x"), NotFittedError)
    refit = est.fit(train).influence(queries)  # a new fit takes the new weights
    assert torch.equal(refit, BUILDERS[name][0](model).fit(train).influence(queries))


def test_restored_weights_are_accepted(digits):
    """The fingerprint is of the values: weights edited and put back are the fitted ones."""
    train, queries = digits
    model = _cnn()
    est = fi.ForwardINF(model, n_directions=4).fit(train)
    before = est.influence(queries)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[4].weight.mul_(2)
    model.load_state_dict(saved)
    assert torch.equal(est.influence(queries), before)


def test_checksum_sees_every_single_change_and_permutations():
    t = torch.randn(300_000)  # more than one block of the checksum
    base = checksum(t)
    for i in (0, 1, 262_143, 262_144, 299_999):
        u = t.clone()
        u[i] = torch.nextafter(u[i], torch.tensor(math.inf))  # the smallest change a float32 can take
        assert checksum(u) != base
    swapped = t.clone()
    swapped[[3, 270_000]] = swapped[[270_000, 3]]
    assert checksum(swapped) != base
    assert checksum(torch.zeros(512)) != checksum(torch.ones(512))  # equal pairs do not cancel
    assert checksum(t.clone()) == base


# ------------------------------------------------------------- item 3: one path for top_k
def test_invariant_top_k_ranks_by_its_own_influence(digits):
    """On 62c4a6f ``top_k`` went through ForwardINF's blocks and ignored the views."""
    train, queries = digits
    model = _cnn()
    est = InvariantForwardINF(model, n_directions=4, shift=1).fit(train)
    scores = est.influence(queries)
    plain = fi.ForwardINF(model, n_directions=4).fit(train).influence(queries)
    assert not torch.equal(scores, plain)
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    for chunk in (None, 16):
        top = est.top_k(queries, k=10, chunk=chunk)
        assert torch.equal(top.indices, order.indices[:, :10]) and torch.equal(top.scores, order.values[:, :10])


@pytest.mark.parametrize("kw", [dict(params="4"), dict(params="4", optimizer="sgd"), dict(params="4", train_mode=True)])
def test_scores_of_a_parameter_subset_carry_no_autograd_graph(kw, digits):
    """On 62c4a6f the update's gradient kept a graph to the model's other parameters: the scores
    required grad (``scores.numpy()`` raised) and held that graph's memory."""
    train, queries = digits
    est = fi.ForwardINF(_cnn(), n_directions=4, **kw).fit(train)
    for scores in (est.influence(queries), est.influence(queries, joint=True), est.top_k(queries, k=3).scores):
        assert not scores.requires_grad and scores.grad_fn is None
    est.influence(queries).numpy()


# --------------------------------------------------------------- item 13: clear errors
def _bad_data(train):
    """Bad training sets (each named in the error as ``train``) -> a word of the expected message."""
    x, y = train
    return {
        "feature count": ((x[:, :, :, :7], y), "cannot run on these inputs"),
        "labels out of range": ((x, y + 10), "out of range"),
        "negative labels": ((x, y - 10), "out of range"),
        "2-D labels": ((x, y[:, None]), r"class indices \[B\]"),
        "int64 inputs": ((x.long(), y), "inputs are torch.int64"),
        "float64 inputs": ((x.double(), y), "inputs are torch.float64"),
        "float labels": ((x, y.float()), "integer tensor"),
        "NaN input": ((torch.where(torch.arange(len(x))[:, None, None, None] == 30, math.nan, x), y), "NaN"),
    }


@pytest.mark.parametrize("case", _bad_data(load_digits().train()))
@pytest.mark.parametrize("name", ["forward-inf", "forward-inf-tail"])
def test_bad_training_data_is_refused_before_the_batch_size_probe(name, case, digits):
    """Tail mode traced and probed the model before any check on 62c4a6f (raw RuntimeError/IndexError)."""
    train, _ = digits
    data, match = _bad_data(train)[case]
    with pytest.raises(ValueError, match=rf"^train[: ].*{match}"):
        BUILDERS[name][0](_cnn()).fit(data)


def test_auto_batch_size_names_the_argument_its_probe_batch_came_from(digits):
    (x, y), _ = digits
    with pytest.raises(ValueError, match=r"^train: the model and task cannot score these examples .*out of bounds"):
        auto_batch_size(_cnn(), fi.ClassificationTask(), (x[:8], y[:8] + 10), name="train")
    with pytest.raises(ValueError, match=r"^batch: the model and task cannot score these examples"):
        auto_batch_size(_cnn(), fi.ClassificationTask(), (x[:8, :, :5], y[:8]))


@pytest.mark.parametrize("name", ["forward-inf", "forward-inf-tail", "if-exact", "tracin"])
def test_a_model_without_trainable_parameters_is_refused_at_construction(name):
    model = _cnn().requires_grad_(False)
    build = BUILDERS[name][0] if name != "if-exact" else (lambda m: fi.InfluenceFunction(m, solver="exact"))
    with pytest.raises(ValueError, match="model: it has no trainable parameters"):
        build(model)


# difference="finite": the measured change. A one-step update's exact first-order score (the default
# difference="auto") is linear in lr, so lr=1e30 only scales it (test below): nothing diverges there.
@pytest.mark.parametrize("kw", [dict(lr=1e30, optimizer="sgd", score="loss", difference="finite"),
                                dict(lr=1e30, difference="finite"),
                                dict(lr=1e30, optimizer="sgd", score="loss", steps=3)])
def test_a_diverging_update_is_a_clear_error_naming_lr(kw, digits):
    train, queries = digits
    est = fi.ForwardINF(_cnn(), n_directions=4, **kw).fit(train)
    for call in (lambda: est.influence(queries), lambda: est.top_k(queries, k=3),
                 lambda: est.influence(queries, joint=True)):
        with pytest.raises(ValueError, match=r"the query update diverged with lr=1e\+30.*Lower lr") as info:
            call()
        assert isinstance(info.value, (DivergedError, FloatingPointError))


def test_a_huge_lr_only_scales_the_exact_first_order_score(digits):
    train, queries = digits
    model = _cnn()
    small = fi.ForwardINF(model, n_directions=4, lr=1e-3, optimizer="sgd", score="loss").fit(train).influence(queries)
    huge = fi.ForwardINF(model, n_directions=4, lr=1e20, optimizer="sgd", score="loss").fit(train).influence(queries)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge * 1e-23, small, rtol=1e-4, atol=1e-6 * small.abs().max().item())


# ---------------------------------------------------------- property: random bad inputs
_NAMES = ["forward-inf", "forward-inf-tail", "forward-inf-invariant", "tracin-last", "grad-dot", "representer",
          "knn-shapley"]
_CORRUPTIONS = ["drop feature", "extra dim", "int inputs", "float64 inputs", "bool inputs", "nan", "inf", "-inf",
                "empty", "label too high", "label negative", "2-D labels", "float labels", "length mismatch",
                "list of lists", "string", "None", "dict without targets", "shuffled loader", "huge value"]


@pytest.fixture(scope="module")
def fitted():
    """One fitted estimator per name in ``_NAMES`` on a small digits CNN (what the property test scores with)."""
    split = load_digits()
    x, y = split.train()
    model = _cnn()
    train = (x[:N_TRAIN], y[:N_TRAIN])
    return {name: make_estimator(name, model, fi.ClassificationTask(), n_directions=2).fit(train)
            if name.startswith("forward-inf") else make_estimator(name, model, fi.ClassificationTask()).fit(train)
            for name in _NAMES}, split.test()


def _corrupt(kind: str, x: torch.Tensor, y: torch.Tensor, row: int):
    """``(x, y)`` broken in one way (``row``: which example carries a bad value)."""
    if kind == "drop feature":
        return x[..., :-1], y
    if kind == "extra dim":
        return x[:, None], y
    if kind in ("int inputs", "float64 inputs", "bool inputs"):
        return x.to({"int inputs": torch.int64, "float64 inputs": torch.float64, "bool inputs": torch.bool}[kind]), y
    if kind in ("nan", "inf", "-inf"):
        x = x.clone()
        x[row, 0, row % 8, 3] = float(kind)
        return x, y
    if kind == "empty":
        return x[:0], y[:0]
    if kind in ("label too high", "label negative"):
        y = y.clone()
        y[row] = 10 + row if kind == "label too high" else -1 - row
        return x, y
    if kind == "2-D labels":
        return x, y[:, None]
    if kind == "float labels":
        return x, y.float()
    if kind == "length mismatch":
        return x, y[:-1]
    if kind == "list of lists":
        return x.tolist(), y.tolist()
    if kind == "string":
        return "digits.npz", y
    if kind == "dict without targets":
        return {"inputs": x}, y
    if kind == "shuffled loader":
        return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True), y
    if kind == "huge value":  # finite, but overflows to inf in the first layer
        x = x.clone()
        x[row] = 3e38
        return x, y
    return None, y


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(_NAMES), kind=st.sampled_from(_CORRUPTIONS), n=st.integers(1, 5),
       row=st.integers(0, 4), call=st.sampled_from(["influence", "top_k", "joint", "fit"]))
def test_random_bad_inputs_get_a_named_error_never_a_result(fitted, name, kind, n, row, call):
    """Any one corruption of queries (or of training data for ``fit``), for any of seven estimators:
    a ``ValueError`` or ``TypeError`` whose message names the argument, never a result."""
    estimators, (xq, yq) = fitted
    x, y = _corrupt(kind, xq[:n], yq[:n], row % n)
    data = (x, y) if kind not in ("string", "None", "dict without targets", "shuffled loader") else x
    est = estimators[name]
    arg = "train" if call == "fit" else "queries"

    def run():
        if call == "fit":
            fresh = make_estimator(name, est.model, fi.ClassificationTask()).fit(data)
            return fresh.influence((xq[:2], yq[:2]))
        if call == "top_k":
            return est.top_k(data, k=3).scores
        return est.influence(data, joint=call == "joint")

    if kind == "huge value":  # finite inputs: scores are allowed, but only finite ones
        try:
            assert torch.isfinite(run()).all(), (name, call)
            return
        except (ValueError, TypeError) as e:
            assert arg in str(e), (name, kind, call, str(e))
            return
    with pytest.raises((ValueError, TypeError)) as info:
        run()
    assert arg in str(info.value), (name, kind, call, str(info.value))
