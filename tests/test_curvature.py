"""K-FAC curvature and the counterfactual (curvature-preconditioned) Forward-INF score."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import forwardinf as fi
from forwardinf.core import curvature as C
from forwardinf.core.params import fingerprint, select_params
from forwardinf.data.inputs import as_dataset


class MultiSquaredLoss(fi.Task):
    """``||W x + b - y||²`` summed over 3 outputs: a quadratic loss with a 3 x 3 output factor."""

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum(-1)


@pytest.fixture(scope="module")
def digits_mlp():
    """A digits MLP trained for a few epochs on 400 points (fitted enough for self-support)."""
    from forwardinf.data.loaders import load_digits
    from forwardinf.models import build_model
    from forwardinf.training import train_classifier

    split = load_digits()
    x, y = split.train()
    model = build_model("mlp", split.input_shape, split.n_classes, seed=0)
    train_classifier(model, (x[:400], y[:400]), epochs=10, lr=0.05, seed=0)
    for p in model.parameters():
        p.grad = None  # so the tests can see that attribution writes none
    return model, (x[:400], y[:400])


def regression(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    return model, x, y


def explicit(model, x, y, damping):
    """By hand: per-example gradients of W_aug = [W | b] flattened row-major, and (S ⊗ A + λI)."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [n, d+1]
    g_out = 2 * (model(x).detach() - y)  # [n, 3]: d loss / d output
    grads = (g_out[:, :, None] * a[:, None, :]).flatten(1)  # [n, 3 (d+1)]
    A, S = a.T @ a / len(x), g_out.T @ g_out / len(x)
    lam = damping * torch.trace(S) / 3 * torch.trace(A) / a.shape[1]
    G = torch.kron(S, A) + lam * torch.eye(grads.shape[1], dtype=x.dtype)
    return grads, G


def test_factors_and_inverse_match_the_explicit_kronecker_product():
    model, x, y = regression()
    params = select_params(model)
    blocks = C.kfac(model, MultiSquaredLoss().loss, params, as_dataset((x, y)), 16, torch.device("cpu"))
    grads, G = explicit(model, x, y, damping=0.3)
    vec = grads[:5]  # any vectors laid out as [W | b]
    as_params = {"weight": vec.view(5, 3, -1)[..., :-1], "bias": vec.view(5, 3, -1)[..., -1]}
    out = C.precondition(blocks, as_params, 0.3)
    got = torch.cat([out["weight"], out["bias"][..., None]], -1).flatten(1)
    torch.testing.assert_close(got, torch.linalg.solve(G, vec.T).T, rtol=1e-9, atol=1e-12)


def test_global_damping_is_one_lambda_for_the_whole_block_diagonal_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    params = select_params(model)
    blocks = C.kfac(model, MultiSquaredLoss().loss, params, as_dataset((x, y)), 16, torch.device("cpu"))
    dense = [torch.kron(b.q_s @ torch.diag(b.s) @ b.q_s.T, b.q_a @ torch.diag(b.a) @ b.q_a.T) for b in blocks]
    G = torch.block_diag(*dense)  # row-major [W | b] per layer, layers in order
    lam = 0.3 * torch.trace(G) / len(G)  # damping x the mean eigenvalue of all of G
    assert C.damping_of(blocks, 0.3) == pytest.approx([float(lam)] * 2)
    per_layer = C.damping_of(blocks, 0.3, "layer")
    assert per_layer == pytest.approx([0.3 * float(torch.trace(d)) / len(d) for d in dense])
    assert per_layer[0] != pytest.approx(per_layer[1])  # the two layers' curvatures differ in scale
    vec = torch.randn(2, len(G), dtype=torch.float64)
    as_params, at = {}, 0
    for b, (name, module) in zip(blocks, [("0", model[0]), ("2", model[2])]):
        o, i = module.weight.shape
        w = vec[:, at:at + o * (i + 1)].view(2, o, i + 1)
        as_params[f"{name}.weight"], as_params[f"{name}.bias"] = w[..., :-1], w[..., -1]
        at += o * (i + 1)
    for scope, lams in (("global", [lam, lam]), ("layer", per_layer)):
        out = C.precondition(blocks, as_params, 0.3, scope=scope)
        got = torch.cat([torch.cat([out[f"{n}.weight"], out[f"{n}.bias"][..., None]], -1).flatten(1) for n in "02"], 1)
        damped = G + torch.diag(torch.cat([torch.full((len(d),), float(v), dtype=G.dtype) for d, v in zip(dense, lams)]))
        torch.testing.assert_close(got, torch.linalg.solve(damped, vec.T).T, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="scope"):
        C.damping_of(blocks, 0.3, "model")


def test_counterfactual_score_is_the_influence_function_up_to_order_eta():
    model, x, y = regression(seed=1)
    grads, G = explicit(model, x, y, damping=1.0)
    expected = grads[:4] @ torch.linalg.solve(G, grads.T)  # g_qᵀ (G + λI)⁻¹ g_i  [4, n]
    before = fingerprint(model)
    errors = []
    for lr in (1e-3, 1e-4, 1e-5):
        est = fi.ForwardINF(model, MultiSquaredLoss(), optimizer="kfac", score="influence", lr=lr, damping=1.0,
                            difference="finite")
        scores = est.fit((x, y)).influence((x[:4], y[:4]))
        errors.append(float((scores - expected).abs().max() / expected.abs().max()))
    assert errors[0] < 1e-2
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5  # O(eta): 10x smaller step, ~10x smaller error
    # the forward-mode change (the default for one step) is the first-order term itself
    est = fi.ForwardINF(model, MultiSquaredLoss(), optimizer="kfac", score="influence", lr=1e-2, damping=1.0)
    torch.testing.assert_close(est.fit((x, y)).influence((x[:4], y[:4])), expected.float(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fingerprint(model), before))
    assert all(p.grad is None for p in model.parameters())


def test_ekfac_eigenvalues_match_per_example_gradients_of_a_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).double()
    x = torch.randn(12, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    task = fi.ClassificationTask()
    params = select_params(model)
    blocks = C.kfac(model, task.loss, params, as_dataset((x, y)), 5, torch.device("cpu"), correct=True)

    def one(p, xi, yi):
        return task.loss(lambda inp: functional_call(model, p, (inp,)), (xi[None], yi[None])).sum()

    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for b in blocks:
        w = per_example[b.weight].flatten(2)
        w = torch.cat([w, per_example[b.bias][..., None]], -1)  # [n, out, in*k*k + 1]
        rotated = b.q_s.T @ w @ b.q_a
        torch.testing.assert_close(b.corrected, rotated.pow(2).mean(0), rtol=1e-8, atol=1e-12)
        # K-FAC's own eigenvalues have the same total where the Kronecker factorisation is exact in trace
        assert b.eigenvalues().shape == (w.shape[1], w.shape[2])


def test_counterfactual_preset_on_a_classifier(digits_mlp):
    model, (x, y) = digits_mlp
    before = fingerprint(model)
    est = fi.ForwardINF.preset("counterfactual", model).fit((x[:200], y[:200]))
    s = est.influence((x[:6], y[:6]))
    assert s.shape == (6, 200) and torch.isfinite(s).all()
    # a query in the training set supports itself (the influence score ranks it near the top, not
    # always first: high-loss points with large gradients compete, which is why identification
    # keeps the cosine score)
    ranks = (s > s.diagonal()[:, None]).sum(1)
    assert (s.diagonal() > 0).all() and (ranks < 20).float().mean() >= 5 / 6
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fingerprint(model), before))
    assert all(p.grad is None for p in model.parameters())
    joint = est.influence((x[:6], y[:6]), joint=True)
    assert joint.shape == (200,) and torch.isfinite(joint).all()


@pytest.mark.parametrize("damping", [0, -1.0, math.nan, math.inf, "1", True])
def test_bad_damping_refused(damping):
    model, x, y = regression()
    with pytest.raises(ValueError, match="damping"):
        fi.ForwardINF(model, MultiSquaredLoss(), optimizer="kfac", damping=damping).fit((x, y))


def test_unsupported_layer_and_fisher_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="LayerNorm"):
        fi.ForwardINF(model, optimizer="kfac").fit((x, y))
    est = fi.ForwardINF(model, optimizer="kfac", params=["0", "2"]).fit((x, y))  # the Linear layers only
    assert torch.isfinite(est.influence((x[:2], y[:2]))).all()
    with pytest.raises(ValueError, match="fisher"):
        fi.ForwardINF(model, optimizer="kfac", params=["0", "2"], fisher="exact").fit((x, y))
    with pytest.raises(ValueError, match="sampled"):
        fi.ForwardINF(*regression()[:1], MultiSquaredLoss(), optimizer="kfac", fisher="sampled").fit(regression()[1:])


def test_diverging_preconditioned_update_refused(digits_mlp):
    model, (x, y) = digits_mlp
    est = fi.ForwardINF(model, optimizer="kfac", score="influence", lr=1e30, steps=2).fit((x[:50], y[:50]))
    with pytest.raises(FloatingPointError, match="diverg|non-finite"):
        est.influence((x[:2], y[:2]))


def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, x, y


def _explicit_ggn(model, x, y):
    """mean_i J_iᵀ H_i J_i by hand: Jacobians of the logits, the softmax cross-entropy's output Hessian."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([v.flatten() for v in params.values()])
    sizes = [v.numel() for v in params.values()]

    def logits(theta, xi):
        parts = dict(zip(params, [t.view_as(v) for t, v in zip(torch.split(theta, sizes), params.values())]))
        return functional_call(model, parts, (xi[None],))[0]

    G = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda t: logits(t, xi), flat)  # [C, D]
        p = torch.softmax(logits(flat, xi), -1)
        G += J.T @ (torch.diag(p) - p[:, None] * p[None, :]) @ J
    return G / len(x), sizes


def test_gauss_newton_product_and_refined_solve_are_exact():
    model, x, y = _mlp_problem()
    task = fi.ClassificationTask()
    params = {k: v.detach() for k, v in model.named_parameters()}
    G, sizes = _explicit_ggn(model, x, y)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn((2, *p.shape), generator=g, dtype=torch.float64) for k, p in params.items()}
    flat_v = torch.cat([t.flatten(1) for t in v.values()], 1)  # [2, D]
    gv = C.gauss_newton_product(model, task.loss, params, as_dataset((x, y)), 7, torch.device("cpu"), v)
    torch.testing.assert_close(torch.cat([gv[k].flatten(1) for k in params], 1), flat_v @ G.T)
    # conjugate gradients from the K-FAC guess reach the exact damped solve in D iterations
    blocks = C.kfac(model, task.loss, params, as_dataset((x, y)), 30, torch.device("cpu"))
    lam = C.damping_of(blocks, 0.5)[0]
    product = lambda u: C.gauss_newton_product(model, task.loss, params, as_dataset((x, y)), 30,  # noqa: E731
                                               torch.device("cpu"), u)
    exact = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=torch.float64), flat_v.T).T
    kfac_only = C.refine(blocks, v, 0.5, 0, product)
    solved = C.refine(blocks, v, 0.5, len(G), product)
    flat = lambda d: torch.cat([d[k].flatten(1) for k in params], 1)  # noqa: E731
    torch.testing.assert_close(flat(solved), exact, rtol=1e-6, atol=1e-8)
    assert (flat(kfac_only) - exact).norm() > 1e-2 * exact.norm()  # K-FAC alone is not the exact solve
    few = C.refine(blocks, v, 0.5, 3, product)
    assert (flat(few) - exact).norm() < (flat(kfac_only) - exact).norm()


def test_type_damping_is_one_lambda_per_layer_type():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 1, 4, 4), torch.randn(20, 3)
    blocks = C.kfac(model, MultiSquaredLoss().loss, select_params(model), as_dataset((x, y)), 8, torch.device("cpu"))
    assert [b.kind for b in blocks] == ["Conv2d", "Linear", "Linear"]
    eig = [b.eigenvalues() for b in blocks]
    linear = float(torch.cat([eig[1].flatten(), eig[2].flatten()]).mean())  # the mean over both linear layers
    assert C.damping_of(blocks, 0.5, "type") == pytest.approx([0.5 * float(eig[0].mean()), 0.5 * linear, 0.5 * linear])
    assert C.damping_of(blocks, 0.5, "type")[0] != pytest.approx(C.damping_of(blocks, 0.5)[0])
    est = fi.ForwardINF(model, MultiSquaredLoss(), optimizer="kfac", score="influence", damping_scope="type")
    assert est.fit((x, y)).influence((x[:2], y[:2])).isfinite().all()
    with pytest.raises(ValueError, match="damping_scope"):
        fi.ForwardINF(model, MultiSquaredLoss(), optimizer="kfac", damping_scope="block").fit((x, y))
