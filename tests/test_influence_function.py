"""Influence functions and the gradient core against exact answers (DESIGN.md "Exact answers")."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from forwardinf.baselines import InfluenceFunction
from forwardinf.core import gradients as G
from forwardinf.core.params import select_params
from forwardinf.tasks import ClassificationTask, Task


class SquaredLoss(Task):
    """``ℓ(θ, (x, y)) = (f(x) - y)²`` for a scalar-output regressor."""

    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def _regression(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    return model, x, y


def _closed_form(model, x, y, xq, yq, damping):
    """Scores ``g_q^T (H + λI)^{-1} g_i`` of least squares, derived by hand: θ = [w, b]."""
    theta = torch.cat([model.weight.detach().view(-1), model.bias.detach()])
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    xqa = torch.cat([xq, torch.ones(len(xq), 1, dtype=x.dtype)], 1)
    g = 2 * (xa @ theta - y)[:, None] * xa  # ∇(xᵀθ - y)² = 2 r x
    gq = 2 * (xqa @ theta - yq)[:, None] * xqa
    h = 2 * xa.T @ xa / len(x) + damping * torch.eye(xa.shape[1], dtype=x.dtype)  # ∇² of the mean loss
    return gq @ torch.linalg.solve(h, g.T), gq, g, h


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_exact_equals_closed_form_on_linear_regression(damping):
    model, x, y = _regression()
    xq, yq = x[:3] + 0.1, y[:3] - 0.2
    est = InfluenceFunction(model, SquaredLoss(), solver="exact", damping=damping).fit((x, y))
    ref, gq, g, h = _closed_form(model, x, y, xq, yq, damping)
    torch.testing.assert_close(est.influence((xq, yq)), ref, rtol=1e-10, atol=1e-10)
    # joint: the mean query gradient
    torch.testing.assert_close(est.influence((xq, yq), joint=True), gq.mean(0) @ torch.linalg.solve(h, g.T),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(est.hessian_, h, rtol=1e-12, atol=1e-12)


def test_exact_refuses_too_many_parameters():
    model = nn.Linear(100, 60)
    x, y = torch.randn(8, 100), torch.randint(0, 60, (8,))
    with pytest.raises(ValueError, match="params='last'"):
        InfluenceFunction(model, solver="exact").fit((x, y))


def test_self_influence_is_the_diagonal():
    model, x, y = _regression(n=25)
    for solver, kw in [("exact", {}), ("cg", {}), ("lissa", {"depth": 100, "lissa_batch_size": 8})]:
        est = InfluenceFunction(model, SquaredLoss(), solver=solver, damping=0.1, **kw).fit((x, y))
        torch.testing.assert_close(est.self_influence(), est.influence((x, y)).diagonal(), rtol=1e-8, atol=1e-10)


def _logistic(n=60, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, c, generator=g, dtype=torch.float64) + torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Linear(d, c).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.01 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model, x, y


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cg_and_lissa_converge_to_exact_on_logistic_regression():
    """Stated tolerances (relative L2 error of the [6, 60] score matrix against ``exact``):
    CG < 1e-8 within D = 15 iterations; full-batch LiSSA (deterministic) < 1e-8 at depth 200
    after > 1e-3 at depth 10; minibatch LiSSA (30 of 60 points per step, depth 150) is unbiased
    but noisy: < 0.25 for one run, < 0.06 averaged over 16 runs."""
    model, x, y = _logistic()
    xq, yq = x[:6] + 0.05, y[:6]
    kw = dict(damping=0.05, seed=0)
    exact = InfluenceFunction(model, solver="exact", **kw).fit((x, y)).influence((xq, yq))
    cg = InfluenceFunction(model, solver="cg", tol=1e-12, **kw).fit((x, y))
    assert _rel(cg.influence((xq, yq)), exact) < 1e-8
    assert cg.solver_info_["iterations"] <= 15  # D = 15: CG is exact after D steps

    def lissa(depth, batch, repeats=1):
        est = InfluenceFunction(model, solver="lissa", depth=depth, lissa_batch_size=batch, repeats=repeats, **kw)
        return _rel(est.fit((x, y)).influence((xq, yq)), exact)

    assert lissa(10, len(x)) > 1e-3
    assert lissa(200, len(x)) < 1e-8
    one, averaged = lissa(150, 30), lissa(150, 30, repeats=16)
    assert one < 0.25
    assert averaged < 0.06 and averaged < one


def _fit_regularised(x, y, weights, lam, init):
    """``argmin_θ (1/n) Σ_i w_i CE_i + (λ/2)||θ||²`` by L-BFGS to ``||∇|| < 1e-10`` (float64)."""
    model = init
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weights * F.cross_entropy(model(x), y, reduction="none")).sum() / len(x) \
            + lam / 2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


def test_exact_if_predicts_leave_one_out_retraining():
    """Strongly convex: L2 weight λ on every parameter, so ``damping = λ`` makes ``H + λI`` the
    Hessian of the training objective; retraining without z_i (to convergence, from the optimum)
    changes a query's loss by ≈ score_i / n. Pearson over the training points > 0.99 (measured:
    0.9991, 0.9982, 0.9966 for the three queries)."""
    import copy

    g = torch.Generator().manual_seed(3)
    n, d, c, lam = 80, 4, 3, 0.05
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, c, generator=g, dtype=torch.float64)
         + 0.8 * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = _fit_regularised(x, y, torch.ones(n, dtype=torch.float64), lam, nn.Linear(d, c).double())
    xq, yq = x[:3] + 0.3, y[:3]
    scores = InfluenceFunction(model, solver="exact", damping=lam).fit((x, y)).influence((xq, yq))  # [3, n]
    with torch.no_grad():
        base = F.cross_entropy(model(xq), yq, reduction="none")
    loo = torch.empty(3, n, dtype=torch.float64)
    for i in range(n):
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0
        refit = _fit_regularised(x, y, w, lam, copy.deepcopy(model))
        with torch.no_grad():
            loo[:, i] = F.cross_entropy(refit(xq), yq, reduction="none") - base
    for q in range(3):
        r = torch.corrcoef(torch.stack([scores[q] / n, loo[q]]))[0, 1]
        assert r > 0.99, f"query {q}: Pearson {r:.4f}"


def test_lissa_with_too_small_scale_diverges_loudly():
    model, x, y = _logistic()
    est = InfluenceFunction(model, solver="lissa", depth=400, scale=0.01, lissa_batch_size=len(x)).fit((x, y))
    with pytest.raises(FloatingPointError, match="increase scale"):
        est.influence((x[:2], y[:2]))


def test_last_layer_subset_matches_autograd_hessian():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    est = InfluenceFunction(model, solver="exact", params="last", damping=0.1).fit((x, y))
    w, b = model[2].weight.detach(), model[2].bias.detach()

    def mean_loss(flat):
        logits = model[:2](x) @ flat[:10].view(2, 5).T + flat[10:]
        return F.cross_entropy(logits, y)

    flat = torch.cat([w.reshape(-1), b])
    h = torch.autograd.functional.hessian(mean_loss, flat) + 0.1 * torch.eye(12, dtype=torch.float64)
    grads = torch.stack([torch.autograd.functional.jacobian(
        lambda f, i=i: F.cross_entropy((model[:2](x[i:i + 1]) @ f[:10].view(2, 5).T + f[10:]), y[i:i + 1]), flat)
        for i in range(30)])
    torch.testing.assert_close(est.influence((x[:4], y[:4])), grads[:4] @ torch.linalg.solve(h, grads.T),
                               rtol=1e-8, atol=1e-10)


# -- the gradient core --------------------------------------------------------------------------
def test_per_example_grads_match_autograd_and_chunking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(11, 4), torch.randint(0, 3, (11,))
    params = select_params(model)
    loss_fn = G.functional_loss(model, ClassificationTask().loss)
    got = G.grad_matrix(loss_fn, params, TensorDataset(x, y), batch_size=4, device=torch.device("cpu"))
    for i in range(11):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)
    again = G.grad_matrix(loss_fn, params, TensorDataset(x, y), batch_size=11, device=torch.device("cpu"))
    torch.testing.assert_close(got, again, rtol=1e-6, atol=1e-7)


def test_hessian_and_hvp_match_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    params = select_params(model)
    loss_fn = G.functional_loss(model, ClassificationTask().loss)
    flat = G.flatten(params)
    ref = torch.autograd.functional.hessian(lambda f: loss_fn(G.unflatten(f, params), (x, y)).mean(), flat)
    h = G.hessian(loss_fn, params, TensorDataset(x, y), batch_size=4, device=torch.device("cpu"), chunk=7)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(3, flat.numel(), dtype=torch.float64)
    torch.testing.assert_close(G.batch_hvp(loss_fn, params, (x, y), v), v @ ref, rtol=1e-10, atol=1e-12)
    assert G.last_layer(model) == "2"


def test_lanczos_finds_both_ends_of_an_indefinite_spectrum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # untrained: indefinite H
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    params = select_params(model)
    loss_fn = G.functional_loss(model, ClassificationTask().loss)
    h = G.hessian(loss_fn, params, TensorDataset(x, y), batch_size=9, device=torch.device("cpu"))
    eig = torch.linalg.eigvalsh(h)
    assert eig[0] < 0 < eig[-1]
    lo, hi = G.lanczos_extremes(lambda v: G.batch_hvp(loss_fn, params, (x, y), v), h.shape[0], steps=40,
                                dtype=torch.float64)
    assert abs(lo - eig[0]) < 1e-8 and abs(hi - eig[-1]) < 1e-8  # D = 26 < 40 steps: exact


def test_auto_damping_makes_the_system_positive_definite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,))
    exact = InfluenceFunction(model, solver="exact", damping="auto").fit((x, y))
    lo, hi = exact.spectrum_
    assert lo < 0  # untrained net: negative curvature
    assert exact.damping_ == pytest.approx(0.01 * hi - 2 * lo)
    assert torch.linalg.eigvalsh(exact.hessian_)[0] > 0
    cg = InfluenceFunction(model, solver="cg", damping="auto", tol=1e-10, depth=200).fit((x, y))
    assert cg.damping_ > -lo  # Lanczos on all 30 points: close to the exact spectrum
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not positive definite" warning
        scores = cg.influence((x[:3], y[:3]))
    same = InfluenceFunction(model, solver="exact", damping=cg.damping_).fit((x, y)).influence((x[:3], y[:3]))
    assert _rel(scores, same) < 1e-6


def test_bad_parameters_are_refused():
    model, x, y = _regression()
    for kw in [{"solver": "newton"}, {"damping": -1.0}, {"damping": "big"}, {"depth": 0}, {"scale": -2.0},
               {"params": "nope.*"}]:
        with pytest.raises(ValueError):
            InfluenceFunction(model, SquaredLoss(), **kw).fit((x, y))


def test_settings_are_read_only_and_change_through_with_config():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    est = InfluenceFunction(model, solver="exact", damping=0.1).fit((x, y))
    before = est.influence((x[:2], y[:2]))
    with pytest.raises(AttributeError, match=r"read-only \(damping\)"):
        est.damping = 0.2
    assert torch.equal(est.influence((x[:2], y[:2])), before)
    refit = est.with_config(est.config.replace(damping=0.2))
    assert refit.damping_ == 0.2 and refit.fitted_config_.damping == 0.2 and est.damping == 0.1
