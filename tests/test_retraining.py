"""Retraining ground truth on a strongly convex model, where influence functions are exact to first order."""
import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from forwardinf import metrics as M
from forwardinf.baselines.retraining import (
    Downsampling,
    LeaveGroupOut,
    LeaveOneOut,
    LossProbe,
    TestToTrain,
    concat,
    fingerprint,
    group_mean,
    run_trainings,
    subset_of,
)
from forwardinf.data.loaders import load_digits
from forwardinf.estimators.base import NotFittedError
from forwardinf.workloads.convex import (
    LBFGSLogistic,
    NewtonLogistic,
    influence_scores,
    max_gradient,
    solve_reference,
)

N_TRAIN, L2 = 100, 1.0


@pytest.fixture(scope="module")
def problem():
    """Real digits: 100 training points, the 4 highest-loss test points as queries, exact optimum."""
    torch.set_num_threads(1)
    d = load_digits()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(d.y_train), generator=g)[:N_TRAIN]
    train = (d.x_train[idx], d.y_train[idx])
    model, h_inv = solve_reference(train, 10, N_TRAIN, L2)
    test_losses = LossProbe((d.x_test, d.y_test))(model)
    q = torch.topk(test_losses, 4).indices
    queries = (d.x_test[q], d.y_test[q])
    newton = NewtonLogistic(train, model.state_dict(), h_inv, n_ref=N_TRAIN, l2=L2)
    if_scores = influence_scores(model, train, queries, N_TRAIN, L2, h_inv)  # [4, 100]
    return dict(train=train, queries=queries, model=model, h_inv=h_inv, newton=newton, if_scores=if_scores, digits=d)


def test_reference_is_the_exact_optimum(problem):
    assert max_gradient(problem["model"], problem["train"], N_TRAIN, L2) < 1e-12


def test_newton_and_lbfgs_reach_the_same_leave_one_out_model(problem):
    train = TensorDataset(*problem["train"])
    keep = subset_of(train, np.setdiff1d(np.arange(N_TRAIN), [7]))
    a = problem["newton"](keep, 0)
    b = LBFGSLogistic(64, 10, N_TRAIN, L2, tol=1e-9, init=problem["model"].state_dict())(keep, 0)
    assert max_gradient(a, keep, N_TRAIN, L2) < 1e-11
    torch.testing.assert_close(a.linear.weight, b.linear.weight, atol=1e-6, rtol=0)


def test_leave_one_out_agrees_with_the_influence_function(problem):
    loo = LeaveOneOut(problem["newton"]).fit(problem["train"])
    scores = loo.influence(problem["queries"])
    assert scores.shape == (4, N_TRAIN)
    rho = M.rowwise_correlation(scores, problem["if_scores"])
    assert rho.min() > 0.99, rho
    # first order: the values themselves match within a few percent of their spread
    err = (scores - problem["if_scores"]).abs().max() / problem["if_scores"].abs().max()
    assert err < 0.15
    # joint = the influence on the mean query loss
    torch.testing.assert_close(loo.influence(problem["queries"], joint=True), scores.mean(0))
    # self-influence: leaving a point out raises its own loss (the model no longer fits it)
    own = loo.self_influence()
    assert own.shape == (N_TRAIN,) and (own > 0).all()
    top = loo.top_k(problem["queries"], k=3)
    assert top.indices.shape == (4, 3)
    torch.testing.assert_close(top.scores, scores.gather(1, top.indices))


def test_test_to_train_agrees_with_the_influence_function(problem):
    t2t = TestToTrain(problem["newton"]).fit(problem["train"])
    scores = t2t.influence(problem["queries"])  # one retraining per query
    assert scores.shape == (4, N_TRAIN)
    rho = M.rowwise_correlation(scores, problem["if_scores"])
    assert rho.min() > 0.99, rho
    joint = t2t.influence(problem["queries"], joint=True)
    assert joint.shape == (N_TRAIN,)
    # adding all 4 queries ~ the sum of adding each (first order), far from adding none
    assert M.pearson(joint, scores.sum(0)) > 0.95


def test_the_mirrored_influence_hypothesis_holds_exactly_here(problem):
    loo = LeaveOneOut(problem["newton"]).fit(problem["train"]).influence(problem["queries"])
    t2t = TestToTrain(problem["newton"]).fit(problem["train"]).influence(problem["queries"])
    assert M.rowwise_correlation(loo, t2t).min() > 0.98


def test_leave_group_out_and_group_mean(problem):
    groups = np.arange(N_TRAIN) % 5
    lgo = LeaveGroupOut(problem["newton"], groups=groups).fit(problem["train"])
    s = lgo.influence(problem["queries"])
    assert s.shape == (4, 5) and lgo.group_ids_ == [0, 1, 2, 3, 4]
    # removing a group of 20 is roughly the sum of removing its members (first order)
    summed = problem["if_scores"] @ torch.nn.functional.one_hot(torch.as_tensor(groups), 5).double()
    assert M.rowwise_correlation(s, summed).min() > 0.9
    torch.testing.assert_close(group_mean(problem["if_scores"], lgo.members_) * 20, summed)
    with pytest.raises(ValueError, match="groups is required"):
        LeaveGroupOut(problem["newton"], groups=None).fit(problem["train"])


def _digits_lbfgs(data, seed):
    # module-level so that spawned workers can unpickle it
    return LBFGSLogistic(64, 10, n_ref=len(data), l2=1e-4, tol=1e-7, max_iter=300)(data, seed)


def test_downsampling_memorization_finds_flipped_labels(problem):
    d = problem["digits"]
    x, y = d.x_train[:60].clone(), d.y_train[:60].clone()
    flipped = torch.zeros(60, dtype=torch.bool)
    flipped[:8] = True
    y[:8] = (y[:8] + 3) % 10  # atypical examples only a model that saw them gets right
    ds = Downsampling(_digits_lbfgs, n_models=30, fraction=0.5, metric="accuracy", seed=0).fit((x, y))
    mem = ds.self_influence()
    assert mem.shape == (60,)
    assert M.roc_auc(mem, flipped) > 0.9
    assert mem[flipped].mean() > 0.5 > mem[~flipped].mean()
    torch.testing.assert_close(ds.memorization(), mem)
    # the in/out contrast by hand for one point
    inside = ds.masks_[:, 5]
    correct = torch.stack([(m(x[5:6]).argmax(1) == y[5:6]).double()[0] for m in ds.models_])
    assert float(mem[5]) == pytest.approx(float(correct[inside].mean() - correct[~inside].mean()))
    infl = ds.influence((x[:3], y[:3]))
    assert infl.shape == (3, 60)
    # a flipped point is its own strongest supporter
    assert (infl.argmax(1) == torch.arange(3)).all()
    assert ds.losses((x[:3], y[:3])).shape == (30, 3)


def test_estimators_refuse_bad_input(problem):
    with pytest.raises(NotFittedError):
        LeaveOneOut(problem["newton"]).influence(problem["queries"])
    with pytest.raises(ValueError, match="seeds"):
        LeaveOneOut(problem["newton"], seeds=0).fit(problem["train"])
    with pytest.raises(ValueError, match="workers"):
        TestToTrain(problem["newton"], workers=0).fit(problem["train"])
    with pytest.raises(ValueError, match="fraction"):
        Downsampling(_digits_lbfgs, fraction=1.5).fit(problem["train"])
    with pytest.raises(ValueError, match="metric"):
        Downsampling(_digits_lbfgs, metric="f1").fit(problem["train"])
    with pytest.raises(ValueError, match="out of range"):
        run_trainings(_digits_lbfgs, problem["train"], [([0, N_TRAIN], 0)])
    with pytest.raises(ValueError, match="empty"):
        run_trainings(_digits_lbfgs, problem["train"], [([], 0)])


# ------------------------------------------------------------------------- caching / resuming
class _Interrupting:
    """A training function that dies like a Ctrl-C after ``ok`` trainings."""

    def __init__(self, inner, ok):
        self.inner, self.ok, self.calls = inner, ok, 0

    def __call__(self, data, seed):
        if self.calls >= self.ok:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner(data, seed)


def test_resumed_run_equals_uninterrupted_run(problem, tmp_path, caplog):
    train = problem["train"]
    jobs = [(np.setdiff1d(np.arange(N_TRAIN), [i]), 0) for i in range(10)]
    probe = LossProbe(problem["queries"])
    clean = run_trainings(problem["newton"], train, jobs, probe)  # no cache at all

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        run_trainings(_Interrupting(problem["newton"], 4), train, jobs, probe, cache_dir=cache, config="tiny")
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 4
    stamps = {f: f.stat().st_mtime_ns for f in files}

    counting = _Interrupting(problem["newton"], 10 ** 6)
    resumed = run_trainings(counting, train, jobs, probe, cache_dir=cache, config="tiny")
    assert counting.calls == 6  # only the unfinished trainings ran
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # finished ones untouched
    assert len(list(cache.glob("*.pt"))) == 10
    for a, b in zip(clean, resumed):
        assert torch.equal(a, b)
    # a third run trains nothing, and says so
    again = _Interrupting(problem["newton"], 0)
    with caplog.at_level(logging.INFO, logger="forwardinf.baselines.retraining"):
        run_trainings(again, train, jobs, probe, cache_dir=cache, config="tiny")
    assert "10 of 10 trainings found" in caplog.text
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]
    # a damaged file is named and trained again, the others are reused
    files[0].write_bytes(b"not a checkpoint")
    fix = _Interrupting(problem["newton"], 10 ** 6)
    with caplog.at_level(logging.INFO, logger="forwardinf.baselines.retraining"):
        repaired = run_trainings(fix, train, jobs, probe, cache_dir=cache, config="tiny")
    assert fix.calls == 1 and files[0].name in caplog.text
    for a, b in zip(clean, repaired):
        assert torch.equal(a, b)


def test_cache_key_tracks_data_seed_and_recipe(problem, tmp_path):
    train = problem["train"]
    probe = LossProbe(problem["queries"])
    job = [(np.arange(50), 0)]
    run_trainings(_digits_lbfgs, train, job, probe, cache_dir=tmp_path)
    run_trainings(_digits_lbfgs, train, [(np.arange(50), 1)], probe, cache_dir=tmp_path)  # new seed
    run_trainings(_digits_lbfgs, train, [(np.arange(51), 0)], probe, cache_dir=tmp_path)  # new subset
    run_trainings(_digits_lbfgs, train, job, probe, cache_dir=tmp_path, config={"l2": 1})  # new recipe
    run_trainings(_digits_lbfgs, train, job, probe, cache_dir=tmp_path)  # repeat: cached
    assert len(list(tmp_path.glob("*.pt"))) == 4
    x, y = train
    assert fingerprint((x, y)) == fingerprint((x.clone(), y.clone()))
    assert fingerprint(TensorDataset(x, y)) != fingerprint(TensorDataset(x, (y + 1) % 10))


def test_parallel_workers_match_in_process(problem):
    train = problem["train"]
    jobs = [(np.setdiff1d(np.arange(N_TRAIN), [i]), 0) for i in range(4)]
    probe = LossProbe(problem["queries"])
    serial = run_trainings(problem["newton"], train, jobs, probe, workers=1)
    parallel = run_trainings(problem["newton"], train, jobs, probe, workers=2)
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_concat_checks_shapes(problem):
    x, y = problem["train"]
    both = concat(TensorDataset(x, y), TensorDataset(x[:2], y[:2]))
    assert len(both) == N_TRAIN + 2
    with pytest.raises(ValueError, match="shape"):
        concat(TensorDataset(x, y), TensorDataset(x[:2, :, :4], y[:2]))
