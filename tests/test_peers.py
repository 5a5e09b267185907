"""The peer adapters (forwardinf.baselines.peers): orientation, shapes, the model left alone.
Each test skips cleanly when its peer library is not installed."""
import importlib.util

import pytest
import torch

from forwardinf.baselines.methods import PEERS
from forwardinf.baselines.peers import require
from forwardinf.data.loaders import load_digits
from forwardinf.models import build_model
from forwardinf.hashing import state_fingerprint as fingerprint
from forwardinf.training import train_classifier

PACKAGE = {"trak": "trak", "dattri-trak": "dattri", "kronfluence-ekfac": "kronfluence", "captum-tracincp": "captum"}
SOLVER = {"dattri-if-lissa": {"solver": "lissa"}, "dattri-if-cg": {"solver": "cg"}}


@pytest.fixture(scope="module")
def problem():
    split = load_digits()
    x, y = split.x_train[:200], split.y_train[:200]
    model = train_classifier(build_model("mlp", split.input_shape, split.n_classes, seed=0), (x, y), epochs=15,
                             lr=0.05, seed=0)
    leaked = torch.arange(0, 200, 25)  # queries: exact copies of 8 training points
    return model, (x, y), (x[leaked].clone(), y[leaked].clone()), leaked


@pytest.mark.parametrize("name", sorted(PACKAGE))
def test_a_peer_ranks_a_query_duplicate_as_a_proponent(problem, name):
    if importlib.util.find_spec(PACKAGE[name]) is None:
        pytest.skip(f"{PACKAGE[name]} is not installed")
    model, train, queries, leaked = problem
    before = fingerprint(model)
    scores = PEERS[name](model).fit(train).influence(queries)
    assert fingerprint(model) == before
    assert scores.shape == (8, 200) and torch.isfinite(scores).all()
    own = scores.gather(1, leaked[:, None]).squeeze(1)
    # higher = proponent: a query's own copy helps it, so it scores positive and above the median
    assert (own > 0).float().mean() >= 0.75
    assert (own > scores.median(1).values).float().mean() >= 0.75
    with pytest.raises(ValueError, match="joint"):
        PEERS[name](model).fit(train).influence(queries, joint=True)
    with pytest.raises(ValueError, match="out of range"):
        PEERS[name](model).fit((train[0], torch.full_like(train[1], 12)))


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_peer_rerun_gives_identical_scores_and_leaves_the_rng_alone(problem, name):
    package = PACKAGE.get(name, "dattri")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    model, (x, y), queries, _ = problem
    train = (x[:120], y[:120])  # kronfluence's sampled labels and dattri's LiSSA batches are random draws
    rng = torch.get_rng_state()
    few = (queries[0][:3], queries[1][:3])
    a = PEERS[name](model, **SOLVER.get(name, {})).fit(train).influence(few)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's stream is untouched
    torch.manual_seed(123)  # another global state: the scores must not depend on it
    b = PEERS[name](model, **SOLVER.get(name, {})).fit(train).influence(few)
    assert torch.equal(a, b)
    if name == "kronfluence-ekfac":  # the seed is what fixes them: another seed draws other labels
        c = PEERS[name](model, seed=1).fit(train).influence(few)
        assert not torch.equal(a, c)


def test_a_missing_peer_names_its_install_command():
    with pytest.raises(ImportError, match="pip install") as e:
        require("no_such_peer_library_xyz")
    assert e.value.name == "no_such_peer_library_xyz"


def test_kronfluence_damping_sweep_shares_the_factor_fit(problem):
    if importlib.util.find_spec("kronfluence") is None:
        pytest.skip("kronfluence is not installed")
    model, (x, y), queries, _ = problem
    train, few = (x[:120], y[:120]), (queries[0][:3], queries[1][:3])
    fitted = PEERS["kronfluence-ekfac"](model, damping=1e-3).fit(train)
    swept = fitted.with_config(fitted.config.replace(damping=1e-1))
    assert swept.analyzer_ is fitted.analyzer_ and swept.damping == 1e-1  # no second factor fit
    fresh = PEERS["kronfluence-ekfac"](model, damping=1e-1).fit(train)
    torch.testing.assert_close(swept.influence(few), fresh.influence(few))  # same seed: same factors
    assert not torch.allclose(swept.influence(few), fitted.influence(few))  # the damping is applied
    other = fitted.with_config(fitted.config.replace(measurement="loss"))  # another setting: fitted anew
    assert other.analyzer_ is not fitted.analyzer_
