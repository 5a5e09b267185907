"""HyDRA: exact answers against independent computations, the recorder, and the contract."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import forwardinf as fi
from forwardinf.baselines.hydra import HyDRA, Step, TrajectoryRecorder, step_coefficients
from forwardinf.core.params import fingerprint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny problems gain nothing from intra-op threads, and on a loaded machine they cost a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearLoss(fi.Task):
    """``ℓ = -s (w·x + b)`` with a sign ``s = ±1`` per example: linear in θ, so its Hessian is 0."""

    def loss(self, model, batch):
        x, s = batch
        return -s * model(x).squeeze(-1)


class SquaredLoss(fi.Task):
    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def record_sgd(model, task, data, batches, *, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
               nesterov=False, lr_decay=1.0):
    """Train ``model`` with torch.optim.SGD over ``batches`` (index tensors), recording each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_decay)
    rec = TrajectoryRecorder(model)
    for idx in batches:
        loss = task.loss(model, tuple(t[idx] for t in data)).mean()
        opt.zero_grad()
        loss.backward()
        rec.record(idx, opt)
        opt.step()
        sched.step()
    return rec


def unrolled_jacobian(model, task, data, batches, init, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                      nesterov=False, lr_decay=1.0):
    """``dθ_T/dε [n, D]`` by autograd through a hand-written replay of SGD with weights ``1 + n ε_i``."""
    names = [k for k, _ in model.named_parameters()]
    n = len(data[0])

    def replay(eps):
        p = {k: init[k].clone().requires_grad_(True) for k in names}
        buf = {k: None for k in names}
        eta = lr
        for idx in batches:
            w = (1 + n * eps[idx]) / len(idx)
            loss = (task.loss(lambda x: functional_call(model, p, (x,)), tuple(t[idx] for t in data)) * w).sum()
            grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=True)
            new = {}
            for k, g in zip(names, grads):
                d = g + weight_decay * p[k]
                if momentum:
                    buf[k] = d if buf[k] is None else momentum * buf[k] + (1 - dampening) * d
                    d = d + momentum * buf[k] if nesterov else buf[k]
                new[k] = p[k] - eta * d
            p = new
            eta = eta * lr_decay
        return torch.cat([p[k].reshape(-1) for k in names])

    return torch.autograd.functional.jacobian(replay, torch.zeros(n, dtype=torch.float64)).T


def random_batches(n, size, epochs, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[s:s + size] for s in range(0, n, size)]
    return out


def per_example_grad(model, task, params, example):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = task.loss(lambda x: functional_call(model, p, (x,)), tuple(t[None] for t in example)).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))])


# ------------------------------------------------------------------------------ exact answers
def test_fast_form_is_the_tracin_style_gradient_sum_for_plain_sgd():
    """Plain SGD on a linear model: score = Σ_{t: i ∈ B_t} η_t/|B_t| ∇ℓ(q; θ_T)·∇ℓ(z_i; θ_{t-1}) (survey eq. 64)."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 17, 4, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    model = nn.Linear(d, c).double()
    task = fi.ClassificationTask()
    batches = random_batches(n, 5, 3)  # uneven batches (5, 5, 5, 2)
    rec = record_sgd(model, task, (x, y), batches, lr=0.3, lr_decay=0.9)  # a decaying schedule
    est = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec)).fit((x, y))
    scores = est.influence((x[:4], y[:4]))

    final = {k: v.detach() for k, v in model.named_parameters()}
    gq = torch.stack([per_example_grad(model, task, final, (x[q], y[q])) for q in range(4)])
    expected = torch.zeros(4, n, dtype=torch.float64)
    for t, idx in enumerate(batches):
        eta = 0.3 * 0.9**t
        for i in idx.tolist():
            gi = per_example_grad(model, task, rec.steps_[t].state, (x[i], y[i]))
            expected[:, i] += eta / len(idx) * (gq @ gi)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fast_form_is_exact_when_the_hessian_vanishes(nesterov):
    """A loss linear in θ has a zero Hessian: the fast form is then the exact derivative dθ_T/dε,
    with momentum, dampening and weight decay (checked against autograd through the unrolled run)."""
    g = torch.Generator().manual_seed(1)
    n, d = 12, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    s = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    model = nn.Linear(d, 1).double()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    task = LinearLoss()
    batches = random_batches(n, 4, 4)
    kw = dict(lr=0.05, momentum=0.9, dampening=0.0 if nesterov else 0.2, weight_decay=0.1, nesterov=nesterov)
    rec = record_sgd(model, task, (x, s), batches, **kw)
    truth = unrolled_jacobian(model, task, (x, s), batches, init, **kw)
    fast = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec)).fit((x, s)).hypergradients_
    full = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), hessian=True).fit((x, s)).hypergradients_
    torch.testing.assert_close(fast, truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full, truth, rtol=1e-10, atol=1e-12)


def test_hessian_form_is_the_exact_derivative_of_the_trajectory():
    """Non-convex MLP, SGD with momentum + dampening + weight decay: the Hessian form equals
    autograd through the unrolled training; the fast form drops a real term there."""
    g = torch.Generator().manual_seed(2)
    n, d, c = 10, 4, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).double()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    task = fi.ClassificationTask()
    batches = random_batches(n, 4, 2)
    kw = dict(lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01)
    rec = record_sgd(model, task, (x, y), batches, **kw)
    truth = unrolled_jacobian(model, task, (x, y), batches, init, **kw)
    full = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), hessian=True, chunk=4).fit((x, y))  # chunks of 4 training points
    torch.testing.assert_close(full.hypergradients_, truth, rtol=1e-9, atol=1e-11)
    fast = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec)).fit((x, y))
    assert (fast.hypergradients_ - truth).abs().max() > 1e-3 * truth.abs().max()


def test_step_coefficients_of_plain_and_momentum_sgd():
    assert np.allclose(step_coefficients([(0.1, 0.0, 0.0, 0.0, False, True)] * 3), [-0.1] * 3)
    # Momentum μ without decay: an injection at step t moves θ_T by -η (1 + μ + ... + μ^(T-t)).
    a = step_coefficients([(0.1, 0.5, 0.0, 0.0, False, t == 0) for t in range(3)])
    assert np.allclose(a, [-0.1 * 1.75, -0.1 * 1.5, -0.1])


def test_first_order_leave_one_out_on_least_squares():
    """Full-batch gradient descent on least squares to convergence: HyDRA (Hessian form) matches
    exact leave-one-out (closed form, refit without z_i) to first order in 1/n."""
    g = torch.Generator().manual_seed(3)
    n, d = 150, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    xq = torch.randn(5, d, generator=g, dtype=torch.float64)
    yq = xq @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(5, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    task = SquaredLoss()
    everyone = torch.arange(n)
    rec = record_sgd(model, task, (x, y), [everyone] * 40, lr=0.4)  # converged: contraction 0.2 per step
    est = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), hessian=True).fit((x, y))
    scores = est.influence((xq, yq))

    def fit(idx):
        return torch.linalg.lstsq(x[idx], y[idx, None]).solution[:, 0]

    theta = fit(everyone)
    assert torch.allclose(model.weight.detach()[0], theta, atol=1e-10)
    loss = lambda w: (xq @ w - yq) ** 2  # noqa: E731
    loo = torch.stack([loss(fit(everyone[everyone != i])) - loss(theta) for i in range(n)], 1)  # [Q, n]
    for q in range(len(xq)):
        assert np.corrcoef(scores[q].numpy(), loo[q].numpy())[0, 1] > 0.99
    # First order: the error is a small fraction of the effect (second-order terms are O(1/n^2)).
    assert ((scores - loo).abs().sum() / loo.abs().sum()) < 0.05


def test_first_order_leave_one_out_on_logistic_regression_with_weight_decay():
    """Strongly convex logistic regression (weight decay), full-batch GD: HyDRA (Hessian form)
    against leave-one-out by retraining every model without one point with the same recipe (all n
    retrainings at once, by hand). Removal also rescales the mean to 1/(n-1), a shift shared by
    all points, so the check is the correlation per query."""
    g = torch.Generator().manual_seed(4)
    n, d, c, steps, lr, wd = 100, 3, 2, 60, 2.0, 0.05
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    xq = torch.randn(4, d, generator=g, dtype=torch.float64)
    yq = (xq[:, 0] > 0).long()
    task = fi.ClassificationTask()
    torch.manual_seed(4)
    model = nn.Linear(d, c).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    rec = record_sgd(model, task, (x, y), [torch.arange(n)] * steps, lr=lr, weight_decay=wd)
    scores = HyDRA(model, task, run=fi.TrainingRun(trajectory=rec), hessian=True).fit((x, y)).influence((xq, yq))

    # Model k of n + 1 trains on mask[k] (k < n: everyone but k; k = n: everyone).
    mask = torch.ones(n + 1, n, dtype=torch.float64) - torch.eye(n + 1, n, dtype=torch.float64)
    w = w0.expand(n + 1, c, d).clone().requires_grad_(True)
    b = b0.expand(n + 1, c).clone().requires_grad_(True)
    for _ in range(steps):
        logits = torch.einsum("kcd,nd->knc", w, x) + b[:, None, :]
        ce = F.cross_entropy(logits.reshape(-1, c), y.repeat(n + 1), reduction="none").view(n + 1, n)
        objective = ((ce * mask).sum(1) / mask.sum(1)).sum()  # each model's own mean loss
        gw, gb = torch.autograd.grad(objective, [w, b])
        with torch.no_grad():
            w -= lr * (gw + wd * w)
            b -= lr * (gb + wd * b)
    torch.testing.assert_close(w[n], model.weight.detach())  # the same recipe as the recorded run
    with torch.no_grad():
        lq = F.cross_entropy((torch.einsum("kcd,qd->kqc", w, xq) + b[:, None, :]).reshape(-1, c),
                             yq.repeat(n + 1), reduction="none").view(n + 1, -1)
    loo = (lq[:n] - lq[n]).T  # [Q, n]: L(without i) - L(all)
    for q in range(len(xq)):
        assert np.corrcoef(scores[q].numpy(), loo[q].numpy())[0, 1] > 0.99


# ------------------------------------------------------------------------------ the recorder
def test_recording_a_train_classifier_run():
    """``recording()`` captures train_classifier's batches: replaying them with SGD reproduces the model."""
    from forwardinf.models import MLP
    from forwardinf.training import train_classifier

    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (70,), generator=g)
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=(8,))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rec = TrajectoryRecorder(model)
    with rec.recording((x, y)) as watched:
        train_classifier(model, watched, epochs=2, lr=0.1, batch_size=16, seed=3)
    assert len(rec) == 2 * 5  # 16, 16, 16, 16, 6 per epoch
    assert sorted(torch.cat([s.indices for s in rec.steps_[:5]]).tolist()) == list(range(70))
    plain = MLP((1, 4, 4), 3, hidden=(8,))
    plain.load_state_dict(init)
    train_classifier(plain, (x, y), epochs=2, lr=0.1, batch_size=16, seed=3)
    replay = MLP((1, 4, 4), 3, hidden=(8,))
    replay.load_state_dict(init)
    opt = torch.optim.SGD(replay.parameters(), lr=0.1, momentum=0.9)
    for step in rec.steps_:
        assert step.hyper["1.weight"] == (0.1, 0.9, 0.0, 0.0, False, step is rec.steps_[0])
        opt.zero_grad()
        F.cross_entropy(replay(x[step.indices]), y[step.indices]).backward()
        opt.step()
    for (k, a), b, c in zip(model.state_dict().items(), plain.state_dict().values(), replay.state_dict().values()):
        assert torch.equal(a, b), k
        assert torch.equal(a, c), k


def test_recorder_refuses_other_optimizers_and_save_load_roundtrip(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="SGD"):
        TrajectoryRecorder(model).record([0, 1], torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="lr="):
        TrajectoryRecorder(model).record([0, 1])
    rec = TrajectoryRecorder(model)
    rec.record([0, 2], lr=0.1)
    rec.record(torch.tensor([1]), lr=0.05, reduction="sum")
    rec.save(tmp_path / "traj.pt")
    back = TrajectoryRecorder.load(tmp_path / "traj.pt", model)
    assert len(back) == 2 and back.steps_[1].weight == 1.0 and back.steps_[0].weight == 0.5
    assert back.steps_[0].hyper == rec.steps_[0].hyper
    assert torch.equal(back.steps_[1].state["weight"], rec.steps_[1].state["weight"])
    sparse = TrajectoryRecorder(model, every=2)
    for t in range(3):
        sparse.record([t], lr=0.1)
    assert sparse.steps_[1].state is sparse.steps_[0].state and sparse.steps_[2].state is not sparse.steps_[0].state


# ------------------------------------------------------------------------------ the contract
@pytest.fixture(scope="module")
def digits_run():
    from forwardinf.data.loaders import load_digits, subset
    from forwardinf.models import MLP
    from forwardinf.training import train_classifier

    split = subset(load_digits(), n_train=200, seed=0)
    model = MLP(split.input_shape, split.n_classes, hidden=(32,))
    rec = TrajectoryRecorder(model)
    with rec.recording(split.train()) as watched:
        train_classifier(model, watched, epochs=5, lr=0.05, batch_size=32, seed=0)
    return split, model, rec


def test_contract_shapes_self_influence_and_untouched_model(digits_run):
    split, model, rec = digits_run
    x, y = split.train()
    before = fingerprint(model)
    model.train()  # a mode the estimator must restore
    est = HyDRA(model, run=fi.TrainingRun(trajectory=rec)).fit((x, y))
    scores = est.influence((x[:6], y[:6]))
    assert scores.shape == (6, len(y)) and torch.isfinite(scores).all()
    assert est.influence((x[:6], y[:6]), joint=True).shape == (len(y),)
    torch.testing.assert_close(est.influence((x[:6], y[:6]), joint=True), scores.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(est.self_influence(), est.influence((x, y)).diagonal(), rtol=1e-4, atol=1e-7)
    assert est.top_k((x[:3], y[:3]), k=4).indices.shape == (3, 4)
    torch.testing.assert_close(est.influence((x[:6], y[:6])), scores)  # deterministic
    assert model.training
    model.eval()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))
    last = HyDRA(model, run=fi.TrainingRun(trajectory=rec), params="last").fit((x, y))
    assert last.hypergradients_.shape == (len(y), 32 * 10 + 10)


def test_bad_input_is_refused(digits_run):
    split, model, rec = digits_run
    x, y = split.train()
    with pytest.raises(fi.NotFittedError):
        HyDRA(model, run=fi.TrainingRun(trajectory=rec)).influence((x[:2], y[:2]))
    with pytest.raises(ValueError, match="trajectory"):
        HyDRA(model).fit((x, y))
    with pytest.raises(ValueError, match="training index"):
        HyDRA(model, run=fi.TrainingRun(trajectory=rec)).fit((x[:50], y[:50]))
    with pytest.raises(ValueError, match="hessian"):
        HyDRA(model, run=fi.TrainingRun(trajectory=rec), hessian="yes").fit((x, y))
    est = HyDRA(model, run=fi.TrainingRun(trajectory=rec)).fit((x, y))
    with pytest.raises(ValueError, match="shape"):
        est.influence((torch.randn(2, 1, 4, 4), y[:2]))
    with pytest.warns(UserWarning, match="never appear"):
        HyDRA(model, run=fi.TrainingRun(trajectory=[Step(rec.steps_[0].state, torch.tensor([0, 1]), 0.5,
                                                          rec.steps_[0].hyper)])).fit((x, y))


# ------------------------------------------------------------------------------ the experiments
def test_experiments_record_cache_and_load_the_trajectory(tmp_path):
    """``prepare_classifier`` records the SGD trajectory only when a method needs it, caches it beside
    the model, and recording does not change training; a loaded ``--checkpoint`` takes ``--trajectory``."""
    from forwardinf.baselines.methods import make_estimator
    from forwardinf.cli import build_parser
    from forwardinf.experiments.setup import prepare_classifier
    from forwardinf.training import save_checkpoint

    def args(*extra):
        return build_parser().parse_args(["leakage", "--n-train", "60", "--epochs", "2", "--quiet",
                                          "--out", str(tmp_path / "run"), *extra])

    plain = prepare_classifier(args("--methods", "forward-inf,tracin-5"))
    assert plain.trajectory is None and len(plain.checkpoints) == 5
    recorded = prepare_classifier(args("--methods", "forward-inf,hydra"))  # cache lacks it: trains again, recorded
    assert len(recorded.trajectory) == 2 * 1  # 60 points, batch 64: one step per epoch
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), recorded.model.state_dict().values()))
    again = prepare_classifier(args("--methods", "hydra-last"))  # from the cache now
    assert len(again.trajectory) == 2 and torch.equal(again.trajectory.steps_[1].indices, recorded.trajectory.steps_[1].indices)
    x, y = recorded.split.train()
    run = fi.TrainingRun(trajectory=recorded.trajectory)
    scores = make_estimator("hydra", recorded.model, run=run).fit((x, y)).influence((x[:3], y[:3]))
    assert scores.shape == (3, 60) and torch.isfinite(scores).all()

    # A user's own model: --checkpoint with the trajectory file its training loop saved.
    ckpt, traj = tmp_path / "model.pt", tmp_path / "trajectory.pt"
    save_checkpoint(recorded.model, ckpt)
    recorded.trajectory.save(traj)
    loaded = prepare_classifier(args("--methods", "hydra", "--checkpoint", str(ckpt), "--trajectory", str(traj)))
    torch.testing.assert_close(make_estimator("hydra", loaded.model, run=fi.TrainingRun(trajectory=loaded.trajectory))
                               .fit((x, y)).influence((x[:3], y[:3])), scores)
    torch.testing.assert_close(make_estimator("hydra", run=fi.TrainingRun(model=loaded.model, trajectory=str(traj)))
                               .fit((x, y)).influence((x[:3], y[:3])), scores)  # or just the path; the run's model
    with pytest.raises(ValueError, match="--trajectory"):
        prepare_classifier(args("--methods", "hydra", "--checkpoint", str(ckpt)))
    with pytest.raises(ValueError, match="--checkpoint"):
        prepare_classifier(args("--methods", "hydra", "--trajectory", str(traj)))
