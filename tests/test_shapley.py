"""Shapley values: exact answers by enumeration, TMC within its error bars, KNN-Shapley's recursion."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import forwardinf as fi
from forwardinf.baselines.shapley import (
    KNNShapley,
    TMCShapley,
    cardinality_weights,
    exact_semivalues,
    knn_coefficients,
)
from forwardinf.core.params import fingerprint
from forwardinf.data.inputs import gather


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny problems gain nothing from intra-op threads, and on a loaded machine they cost a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ a tiny game
class SquaredLoss(fi.Task):
    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def ridge(data, seed, lam=1.0):
    """A real training function: closed-form ridge regression -> nn.Linear (module level: picklable)."""
    x, y = gather(data, range(len(data)))
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model


class CountingRidge:
    """``ridge`` that counts its trainings (the count is excluded from the cache key via ``config``)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, data, seed):
        self.calls += 1
        return ridge(data, seed)


def ridge_problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    y[0] += 3.0  # one corrupted target: a point with negative value
    xq = torch.randn(3, 2, generator=g, dtype=torch.float64)
    zero = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(zero.weight)  # "trained on nothing": predicts 0
    return (x, y), (xq, xq @ w), zero


def utility_table(train, queries, n):
    """``U_q(S)`` for every subset ``S`` (a dict keyed by sorted tuples): ``[Q]`` each."""
    x, y = train
    table = {}
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            if not subset:
                table[subset] = -(queries[1] ** 2)  # the zero model
            else:
                model = ridge(TensorDataset(x[list(subset)], y[list(subset)]), 0)
                table[subset] = -SquaredLoss().loss(model, queries).detach()
    return table


def shapley_by_enumeration(table, n):
    """Eq. (17) of the survey: (1/n) Σ_{S ∌ i} [U(S ∪ i) - U(S)] / C(n-1, |S|)."""
    values = torch.zeros(n, *next(iter(table.values())).shape, dtype=torch.float64)
    for subset, u in table.items():
        for i in set(range(n)) - set(subset):
            values[i] += (table[tuple(sorted(subset + (i,)))] - u) / (n * math.comb(n - 1, len(subset)))
    return values


@pytest.fixture(scope="module")
def game():
    train, queries, zero = ridge_problem()
    table = utility_table(train, queries, 6)
    return train, queries, zero, table, shapley_by_enumeration(table, 6).T  # exact [Q, n]


def test_exact_shapley_is_efficient(game):
    _, _, _, table, exact = game
    full, empty = table[tuple(range(6))], table[()]
    torch.testing.assert_close(exact.sum(1), full - empty, rtol=1e-12, atol=1e-12)
    assert exact[:, 0].mean() < 0  # the corrupted point hurts the queries on average


def test_tmc_without_truncation_is_efficient_and_within_error_bars_of_exact(game):
    train, queries, zero, table, exact = game
    est = TMCShapley(ridge, SquaredLoss(), permutations=400, empty=zero, seed=0).fit(train)
    values = est.influence(queries)
    assert values.shape == (3, 6)
    # Efficiency: every permutation's marginals telescope to U(D) - U(∅).
    torch.testing.assert_close(values.sum(1), table[tuple(range(6))] - table[()], rtol=1e-10, atol=1e-10)
    # Stated tolerance: within 4 standard errors of the exact values, each of them.
    err = (values - exact).abs()
    assert bool((err <= 4 * est.stderr_.T + 1e-9).all()), (err / est.stderr_.T).max()
    assert float(err.max()) < 0.1 * float(exact.abs().max())
    assert est.diagnostics_["permutations"] == 400
    assert est.diagnostics_["rhat_max"] < 1.1
    torch.testing.assert_close(est.influence(queries, joint=True), values.mean(0))


def test_library_enumeration_matches_the_survey_formula(game):
    _, _, _, table, exact = game
    ours = exact_semivalues(lambda s: table[s], 6)
    torch.testing.assert_close(ours.T, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting,beta", [("banzhaf", (1, 1)), ("beta", (4, 1)), ("beta", (1, 1))])
def test_tmc_semivalue_weightings_match_enumeration(game, weighting, beta):
    """Beta-Shapley / Banzhaf by reweighting the permutation samples: unbiased, within error bars."""
    from scipy.stats import betabinom, binom

    train, queries, zero, table, _ = game
    n = 6
    j = np.arange(n)
    q = binom.pmf(j, n - 1, 0.5) if weighting == "banzhaf" else betabinom.pmf(j, n - 1, beta[1], beta[0])
    np.testing.assert_allclose(cardinality_weights(n, weighting, beta).numpy(), q, rtol=1e-10)
    exact = torch.zeros(n, 3, dtype=torch.float64)  # independent enumeration with scipy's weights
    for subset, u in table.items():
        for i in set(range(n)) - set(subset):
            exact[i] += q[len(subset)] / math.comb(n - 1, len(subset)) * (table[tuple(sorted(subset + (i,)))] - u)
    est = TMCShapley(ridge, SquaredLoss(), permutations=400, empty=zero, weighting=weighting, beta=beta).fit(train)
    values = est.influence(queries)
    assert bool(((values - exact.T).abs() <= 4.5 * est.stderr_.T + 1e-9).all())
    torch.testing.assert_close(exact_semivalues(lambda s: table[s], n, weighting, beta), exact, rtol=1e-10, atol=1e-12)


def test_truncation_saves_trainings_and_stays_close(game):
    train, queries, zero, table, exact = game
    full = TMCShapley(ridge, SquaredLoss(), permutations=200, empty=zero).fit(train)
    full.influence(queries)
    cut = TMCShapley(ridge, SquaredLoss(), permutations=200, empty=zero, truncation=0.05).fit(train)
    values = cut.influence(queries)
    assert cut.diagnostics_["trainings"] < 0.9 * full.diagnostics_["trainings"]
    span = float((table[tuple(range(6))] - table[()]).mean())
    # Truncated permutations stop within 5% of the span: the mean efficiency gap is at most that.
    assert abs(float(values.sum(1).mean()) - span) <= 0.05 * abs(span) + 1e-12


def test_resume_from_cache_and_early_stopping(game, tmp_path):
    train, queries, zero, _, _ = game
    fn = CountingRidge()
    run = fi.TrainingRun(train_fn=fn, recipe="ridge-1.0")  # the cache key: the recipe, not fn's changing state
    kw = dict(empty=zero, cache_dir=tmp_path)
    first = TMCShapley(run, SquaredLoss(), permutations=10, **kw).fit(train)
    v10 = first.influence(queries)
    assert fn.calls == 1 + 10 * 5  # A(D) once, then n-1 prefixes per permutation
    again = TMCShapley(run, SquaredLoss(), permutations=20, **kw).fit(train)
    v20 = again.influence(queries)
    assert fn.calls == 2 + 20 * 5  # only the 10 new permutations were trained
    fresh = TMCShapley(ridge, SquaredLoss(), permutations=20, empty=zero).fit(train).influence(queries)
    torch.testing.assert_close(v20, fresh)  # cached = recomputed
    torch.testing.assert_close(TMCShapley(run, SquaredLoss(), permutations=10, **kw).fit(train).influence(queries), v10)
    stop = TMCShapley(ridge, SquaredLoss(), permutations=500, empty=zero, tolerance=0.1, min_permutations=8).fit(train)
    stop.influence(queries)
    d = stop.diagnostics_
    assert d["converged"] and 8 <= d["permutations"] < 500 and d["relative_stderr"] <= 0.1


def test_parallel_workers_give_the_same_values(game):
    train, queries, zero, _, _ = game
    one = TMCShapley(ridge, SquaredLoss(), permutations=4, empty=zero).fit(train).influence(queries)
    two = TMCShapley(ridge, SquaredLoss(), permutations=4, empty=zero, workers=2).fit(train).influence(queries)
    torch.testing.assert_close(one, two)


@pytest.mark.slow  # two more pools of spawned workers (~15 s)
def test_parallel_early_stopping_stops_where_serial_does(game):
    train, queries, zero, _, _ = game
    # permutations are absorbed in order, so both stop after the same ones
    kw = dict(permutations=500, empty=zero, tolerance=0.1, min_permutations=8)
    serial, parallel = (TMCShapley(ridge, SquaredLoss(), workers=w, **kw).fit(train) for w in (1, 2))
    torch.testing.assert_close(serial.influence(queries), parallel.influence(queries))
    assert serial.diagnostics_["permutations"] == parallel.diagnostics_["permutations"] < 500


# ------------------------------------------------------------------------------ a real classifier
def logistic(data, seed):
    """Softmax regression on flattened digits, 25 full-batch Adam steps from a seeded init."""
    x, y = gather(data, range(len(data)))
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(0.01 * torch.randn(10, 64, generator=g))
        model[1].bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_classifier_self_values_are_efficient_and_flag_a_flipped_label():
    from forwardinf.data.loaders import load_digits

    split = load_digits()
    keep = (split.y_train < 2).nonzero()[:, 0][:16]  # 16 zeros and ones
    x, y = split.x_train[keep], split.y_train[keep].clone()
    y[3] = 1 - y[3]  # one flipped label
    est = TMCShapley(logistic, permutations=5).fit((x, y))
    own = est.self_influence()
    assert own.shape == (16,) and int(own.argmax()) == 3  # memorising the flipped point matters most
    values = TMCShapley(logistic, permutations=2).fit((x, y)).influence((x[:4], y[:4]))
    full = -torch.nn.functional.cross_entropy(est.full_model_(x[:4]), y[:4], reduction="none").double()
    torch.testing.assert_close(values.sum(1), full.detach() + math.log(10), rtol=1e-6, atol=1e-6)  # U(∅) = -log 10
    acc = TMCShapley(logistic, utility="accuracy", permutations=1).fit((x, y)).influence((x[:4], y[:4]))
    right = (est.full_model_(x[:4]).argmax(1) == y[:4]).double()
    torch.testing.assert_close(acc.sum(1), right - 0.1)  # U(D) - U(∅), with U(∅) = 1/C


# ------------------------------------------------------------------------------ KNN-Shapley
def knn_utility(d, labels, y_query, k):
    """U(S) of the K-nearest-neighbour classifier (ties broken by index), for a brute force."""

    def u(subset):
        nearest = sorted(subset, key=lambda i: (float(d[i]), i))[:k]
        return sum(float(labels[i] == y_query) for i in nearest) / k

    return u


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_knn_shapley_equals_the_average_over_all_permutations(k):
    g = torch.Generator().manual_seed(k)
    n = 6
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    xq = torch.randn(4, 2, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (4,), generator=g)
    values = KNNShapley(k=k, embedding="inputs").fit((x, y)).influence((xq, yq))
    for q in range(4):
        u = knn_utility(torch.cdist(xq[q:q + 1], x)[0], y, yq[q], k)
        brute = torch.zeros(n, dtype=torch.float64)
        perms = list(itertools.permutations(range(n)))
        for perm in perms:  # Shapley's definition: the mean marginal over all n! orders
            for pos, i in enumerate(perm):
                brute[i] += u(perm[:pos + 1]) - u(perm[:pos])
        brute /= len(perms)
        torch.testing.assert_close(values[q], brute, rtol=1e-12, atol=1e-12)
        assert math.isclose(float(values[q].sum()), u(tuple(range(n))), abs_tol=1e-12)  # efficiency


@pytest.mark.parametrize("weighting,beta", [("banzhaf", (1, 1)), ("beta", (16, 1)), ("beta", (2, 3))])
def test_knn_semivalues_equal_enumeration(weighting, beta):
    from scipy.stats import betabinom, binom

    g = torch.Generator().manual_seed(7)
    n, k = 7, 3
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    xq = torch.randn(3, 3, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 2, (3,), generator=g)
    values = KNNShapley(k=k, embedding="inputs", weighting=weighting, beta=beta).fit((x, y)).influence((xq, yq))
    j = np.arange(n)
    q = binom.pmf(j, n - 1, 0.5) if weighting == "banzhaf" else betabinom.pmf(j, n - 1, beta[1], beta[0])
    for row in range(3):
        u = knn_utility(torch.cdist(xq[row:row + 1], x)[0], y, yq[row], k)
        expected = torch.zeros(n, dtype=torch.float64)
        for size in range(n):
            for subset in itertools.combinations(range(n), size):
                for i in set(range(n)) - set(subset):
                    expected[i] += q[size] / math.comb(n - 1, size) * (u(tuple(sorted(subset + (i,)))) - u(subset))
        torch.testing.assert_close(values[row], expected, rtol=1e-10, atol=1e-12)


def test_knn_coefficients_closed_forms():
    r = torch.arange(1, 300, dtype=torch.float64)
    c, last = knn_coefficients(300, 7, "beta", (1, 1))  # Beta(1, 1) is Shapley: Jia et al.'s min(K, r)/r
    torch.testing.assert_close(c, torch.clamp(7 / r, max=1.0), rtol=1e-9, atol=1e-12)
    assert math.isclose(last, 7 / 300, rel_tol=1e-9)
    from scipy.stats import binom

    c, _ = knn_coefficients(300, 7, "banzhaf")  # P(Binomial(r-1, 1/2) < K)
    np.testing.assert_allclose(c.numpy(), binom.cdf(6, r.numpy() - 1, 0.5), rtol=1e-8, atol=1e-12)


@pytest.fixture(scope="module")
def digits_mlp():
    from forwardinf.data.loaders import load_digits
    from forwardinf.models import MLP
    from forwardinf.training import train_classifier

    split = load_digits()
    torch.manual_seed(0)
    model = MLP(split.input_shape, split.n_classes, hidden=(32,))
    train_classifier(model, split.train(), epochs=5, lr=0.05, seed=0)
    return split, model


def jia_recursion(dist, labels, y_query, k):
    """KNN-Shapley by Jia et al. (2019), Theorem 1, written out in numpy for one query.

    With ``α_1..α_N`` the training points by increasing distance:
    ``s(α_N) = 1[y(α_N) = y_q] / N`` and
    ``s(α_i) = s(α_{i+1}) + (1[y(α_i) = y_q] - 1[y(α_{i+1}) = y_q]) / K · min(K, i) / i``.
    """
    n = len(labels)
    alpha = np.argsort(dist, kind="stable")  # equal distances: lower index nearer, as the library
    match = (labels[alpha] == y_query).astype(np.float64)
    s = np.zeros(n)
    s[n - 1] = match[n - 1] / n
    for i in range(n - 1, 0, -1):  # 1-based rank i = position i - 1
        s[i - 1] = s[i] + (match[i - 1] - match[i]) / k * min(k, i) / i
    out = np.zeros(n)
    out[alpha] = s
    return out


@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_shapley_equals_jia_et_al_recursion_on_digits(digits_mlp, k):
    """On the real penultimate-layer embedding of 1,347 digits (far beyond enumeration), every value
    equals the recursion above, computed independently here; the values sum to U(D) (efficiency)."""
    split, model = digits_mlp
    x, y = split.train()
    xq, yq = split.x_test[:12], split.y_test[:12]
    est = KNNShapley(model, k=k).fit((x, y))
    values = est.influence((xq, yq)).numpy()
    ft, _ = est.embed((x, y))
    fq, _ = est.embed((xq, yq))
    dist = torch.cdist(fq, ft).numpy()
    for q in range(len(yq)):
        expected = jia_recursion(dist[q], y.numpy(), int(yq[q]), k)
        np.testing.assert_allclose(values[q], expected, rtol=1e-10, atol=1e-13)
        nearest = np.argsort(dist[q], kind="stable")[:k]
        assert math.isclose(values[q].sum(), float((y.numpy()[nearest] == int(yq[q])).mean()), abs_tol=1e-10)


def test_knn_self_values_find_flipped_labels(digits_mlp):
    """A mislabeled point is supported only by itself: its own-game value is ≈ 1/K, others' ≈ 1/n."""
    from forwardinf.metrics import roc_auc

    split, model = digits_mlp
    x, y = split.train()
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(len(y), generator=g)[:100]
    noisy = y.clone()
    noisy[flipped] = (noisy[flipped] + torch.randint(1, 10, (100,), generator=g)) % 10
    labels = torch.zeros(len(y), dtype=torch.bool)
    labels[flipped] = True
    own = KNNShapley(model, k=10).fit((x, noisy)).self_influence()
    assert roc_auc(own, labels) > 0.95
    est = KNNShapley(model, k=10).fit((x, noisy))
    torch.testing.assert_close(own, est.influence((x, noisy)).diagonal())  # no exact duplicates in digits


def test_knn_contract(digits_mlp):
    split, model = digits_mlp
    x, y = split.train()
    before = fingerprint(model)
    model.train()
    est = KNNShapley(model, k=5).fit((x, y))
    scores = est.influence((split.x_test[:7], split.y_test[:7]))
    assert scores.shape == (7, len(y)) and scores.dtype == torch.float64
    torch.testing.assert_close(scores.sum(1), est.influence((split.x_test[:7], split.y_test[:7])).sum(1))
    assert est.top_k((split.x_test[:3], split.y_test[:3]), k=4).indices.shape == (3, 4)
    assert est.influence((x[:5], y[:5]), joint=True).shape == (len(y),)
    assert model.training
    model.eval()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))
    cos = KNNShapley(model, k=5, metric="cosine", embedding="logits").fit((x, y)).influence((x[:2], y[:2]))
    assert cos.shape == (2, len(y))
    feats = KNNShapley(k=5, embedding=lambda t: t.flatten(1)).fit((x, y)).influence((x[:2], y[:2]))
    torch.testing.assert_close(feats, KNNShapley(k=5, embedding="inputs").fit((x, y)).influence((x[:2], y[:2])))


def test_bad_input_is_refused(digits_mlp):
    split, model = digits_mlp
    x, y = split.train()
    with pytest.raises(fi.NotFittedError):
        KNNShapley(model).influence((x[:2], y[:2]))
    with pytest.raises(ValueError, match="weighting"):
        KNNShapley(model, weighting="owen").fit((x, y))
    with pytest.raises(ValueError, match="k="):
        KNNShapley(model, k=0).fit((x, y))
    with pytest.raises(ValueError, match="needs a model"):
        KNNShapley(k=3).fit((x, y))
    with pytest.raises(ValueError, match="shapes"):
        KNNShapley(k=3, embedding="inputs").fit((x, y)).influence((torch.randn(2, 1, 4, 4), y[:2]))
    with pytest.raises(ValueError, match="targets"):
        KNNShapley(model).fit((x, y.float()))
    with pytest.raises(ValueError, match="truncation"):
        TMCShapley(ridge, SquaredLoss(), truncation=1.5).fit((x, y))
    with pytest.raises(ValueError, match="empty"):
        TMCShapley(ridge, SquaredLoss(), empty="nothing").fit((x, y))
    with pytest.raises(fi.NotFittedError):
        TMCShapley(ridge, SquaredLoss()).influence((x[:2], y[:2]))
