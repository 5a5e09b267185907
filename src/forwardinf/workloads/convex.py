"""The near-noiseless setting's model: L2-regularised multinomial logistic regression, solved exactly.

Objective (sklearn's multinomial ``LogisticRegression`` up to scaling), on a training subset ``S``:

    F_S(θ) = (1 / n_ref) Σ_{j ∈ S} CE(θ; x_j, y_j) + (l2 / 2) ||θ||²,     θ = (W [C, D], b [C])

``n_ref`` is fixed (the full training-set size), so leaving a point out removes exactly one term
and adding a point adds exactly one: the exact-answer setting of influence functions. The bias is
regularised too, which makes ``F`` strongly convex (softmax is invariant to a common shift of
the logits, so an unregularised bias has a flat direction): the optimum is unique, and a warm
start or the choice of solver changes only the speed, never the answer. Everything is float64.

Two training functions (both ``(data, seed) -> LinearSoftmax``, usable with
:mod:`forwardinf.baselines.retraining`):

- :class:`LBFGSLogistic`: the paper's solver (L-BFGS, optional warm start). Its strong-Wolfe
  line search compares objective values, which stop resolving changes once the gradient is
  ~1e-9, so it cannot certify more than that.
- :class:`NewtonLogistic`: for retraining around a solved reference problem (leave-one-out,
  leave-group-out, add-a-point). Warm-starts at the reference optimum ``θ̂`` and runs L-BFGS
  whose initial inverse Hessian is the exact ``H_S(θ̂)⁻¹`` (the reference Hessian's inverse,
  corrected by the Woodbury identity for the few examples removed or added): its first step is
  an exact Newton step, and it reaches a gradient of ~1e-12 in a handful of iterations.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forwardinf.data.inputs import as_dataset, gather


class LinearSoftmax(nn.Module):
    """Logits ``[B, C]`` of a float64 linear model on flattened inputs ``[B, ...]``."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1).to(self.linear.weight.dtype))


def xy(data: Any) -> tuple[Tensor, Tensor]:
    """``(x [n, D] float64, y [n] int64)`` from any training data."""
    ds = as_dataset(data, "train")
    x, y = gather(ds, range(len(ds)))[:2]
    return x.flatten(1).to(torch.float64), y.long()


def _theta(model: LinearSoftmax) -> Tensor:
    """``[C, D+1]``: weights with the bias as the last column."""
    return torch.cat([model.linear.weight.detach(), model.linear.bias.detach()[:, None]], 1).double()


def _model_from(theta: Tensor) -> LinearSoftmax:
    c, d1 = theta.shape
    m = LinearSoftmax(d1 - 1, c)
    with torch.no_grad():
        m.linear.weight.copy_(theta[:, :-1])
        m.linear.bias.copy_(theta[:, -1])
    return m.eval()


def _augment(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # the bias as a constant feature


def objective(w: Tensor, b: Tensor, x: Tensor, y: Tensor, n_ref: int, l2: float) -> Tensor:
    """``F_S`` for weights ``w [C, D]``, bias ``b [C]``, data ``x [n, D]``, ``y [n]``."""
    logits = x @ w.T + b
    return F.cross_entropy(logits, y, reduction="sum") / n_ref + 0.5 * l2 * (w.pow(2).sum() + b.pow(2).sum())


def gradient(theta: Tensor, x1: Tensor, y: Tensor, n_ref: int, l2: float) -> Tensor:
    """``∇F_S`` ``[C, D+1]`` at ``theta [C, D+1]`` for augmented inputs ``x1 [n, D+1]``."""
    p = torch.softmax(x1 @ theta.T, -1)
    r = p - F.one_hot(y, theta.shape[0]).to(p.dtype)
    return r.T @ x1 / n_ref + l2 * theta


def max_gradient(model: LinearSoftmax, data: Any, n_ref: int, l2: float) -> float:
    """Largest entry of ``∇F_S`` at ``model`` on ``data`` (0 at the exact optimum)."""
    x, y = xy(data)
    return float(gradient(_theta(model), _augment(x), y, n_ref, l2).abs().max())


def hessian(theta: Tensor, x: Tensor, n_ref: int, l2: float) -> Tensor:
    """Exact ``∇²F_S`` ``[P, P]``, ``P = C (D+1)``, parameters ordered as ``theta.flatten()``.

    ``Σ_j (diag(p_j) - p_j p_jᵀ) ⊗ x̃_j x̃_jᵀ / n_ref + l2 I``, built block by block (class pairs).
    """
    x1 = _augment(x)
    c, d1 = theta.shape
    p = torch.softmax(x1 @ theta.T, -1)  # [n, C]
    h = torch.zeros(c * d1, c * d1, dtype=torch.float64)
    for a in range(c):
        for b in range(a, c):
            w = p[:, a] * ((1.0 if a == b else 0.0) - p[:, b])
            block = (x1 * w[:, None]).T @ x1 / n_ref
            h[a * d1:(a + 1) * d1, b * d1:(b + 1) * d1] = block
            if a != b:
                h[b * d1:(b + 1) * d1, a * d1:(a + 1) * d1] = block
    h.diagonal().add_(l2)
    return h


# -------------------------------------------------------------------------------- solvers
@dataclass
class LBFGSLogistic:
    """Training function ``(data, seed) -> LinearSoftmax``: minimise ``F_S`` by L-BFGS (the paper's).

    ``seed`` is ignored (deterministic). ``init``: a state dict to warm-start from. Stops when the
    largest gradient entry is below ``tol`` or after ``max_iter`` iterations.
    """

    in_features: int
    n_classes: int
    n_ref: int
    l2: float = 1e-3
    tol: float = 1e-9
    max_iter: int = 1000
    history: int = 50
    init: dict[str, Tensor] | None = field(default=None, repr=False)

    def __call__(self, data: Any, seed: int = 0) -> LinearSoftmax:
        x, y = xy(data)
        model = LinearSoftmax(self.in_features, self.n_classes)
        with torch.no_grad():
            if self.init is not None:
                model.load_state_dict(self.init)
            else:
                model.linear.weight.zero_()
                model.linear.bias.zero_()
        w, b = model.linear.weight, model.linear.bias
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, max_eval=2 * self.max_iter,
                                tolerance_grad=self.tol, tolerance_change=1e-32, history_size=self.history,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective(w, b, x, y, self.n_ref, self.l2)
            loss.backward()
            return loss

        opt.step(closure)
        return model.eval()


def _row_keys(x: Tensor, y: Tensor) -> list[bytes]:
    rows = torch.cat([x, y[:, None].to(x.dtype)], 1).contiguous().numpy()
    return [r.tobytes() for r in rows]


@dataclass
class NewtonLogistic:
    """Training function for retraining around a solved reference problem (see the module doc).

    Starts at the reference optimum ``θ̂`` and runs L-BFGS whose initial inverse Hessian is the
    *exact* ``H_S(θ̂)⁻¹``: the reference Hessian's inverse corrected by the Woodbury identity for
    the examples removed from or added to the reference data. The first step is therefore an
    exact Newton step, and the quasi-Newton memory only has to learn how the Hessian changes
    between ``θ̂`` and the new optimum. Steps are accepted when they shrink the gradient (objective
    values stop resolving progress long before the gradient reaches ``tol``).

    Args:
        reference: the reference training data (what ``center`` is optimal for).
        center: state dict of the reference optimum ``θ̂``.
        h_inv: ``[P, P]`` inverse of ``∇²F_ref(θ̂)`` (:func:`solve_reference`).
        n_ref, l2: the objective's constants. tol: target largest gradient entry.
        max_changes: above this many removed + added examples, the Woodbury correction is skipped
            (the reference Hessian alone then preconditions the iteration).
    """

    reference: Any = field(repr=False)
    center: dict[str, Tensor] = field(repr=False)
    h_inv: Tensor = field(repr=False)
    n_ref: int = 1
    l2: float = 1e-3
    tol: float = 1e-12
    max_iter: int = 200
    memory: int = 20
    max_changes: int = 200

    def __call__(self, data: Any, seed: int = 0) -> LinearSoftmax:
        x, y = xy(data)
        theta = torch.cat([self.center["linear.weight"], self.center["linear.bias"][:, None]], 1).double().clone()
        shape = theta.shape
        h0 = self._solver(theta, x, y)
        x1 = _augment(x)

        def grad_at(t: Tensor) -> Tensor:
            return gradient(t.view(shape), x1, y, self.n_ref, self.l2).reshape(-1)

        th, g = theta.reshape(-1), grad_at(theta)
        mem_s: list[Tensor] = []
        mem_y: list[Tensor] = []
        for _ in range(self.max_iter):
            if float(g.abs().max()) <= self.tol:
                break
            d = _two_loop(g, mem_s, mem_y, h0)  # ≈ H⁻¹ g
            gnorm, t = float(g.norm()), 1.0
            while t >= 2 ** -10:
                g_new = grad_at(th - t * d)
                if float(g_new.norm()) < gnorm:
                    break
                t /= 2
            if t < 2 ** -10:  # no progress along this direction: restart from the exact Hessian
                mem_s.clear(), mem_y.clear()
                if float(g.abs().max()) <= 1e3 * self.tol:
                    break
                h_inv = _inverse(hessian(th.view(shape), x, self.n_ref, self.l2)).float()
                h0 = lambda v, h=h_inv: (h @ v.float()).double()  # noqa: E731
                continue
            step = -t * d
            mem_s.append(step)
            mem_y.append(g_new - g)
            if len(mem_s) > self.memory:
                mem_s.pop(0), mem_y.pop(0)
            th, g = th + step, g_new
        if float(g.abs().max()) > 1e3 * self.tol:
            warnings.warn(f"NewtonLogistic stopped at max |grad| = {float(g.abs().max()):.2e} "
                          f"(target {self.tol:.0e})", stacklevel=2)
        return _model_from(th.view(shape))

    def _solver(self, theta0: Tensor, x: Tensor, y: Tensor) -> Any:
        """``v -> H_S(θ̂)⁻¹ v`` for flattened ``v [P]``."""
        if getattr(self, "_h32", None) is None:
            # A preconditioner need not be exact (the fixed point is set by the float64 gradient);
            # float32 halves the memory traffic of the [P, P] products that dominate the cost.
            self._h32 = self.h_inv.to(torch.float32).contiguous()
        H = self._h32
        removed, added = self._changes(x, y)
        k = len(removed[0]) + len(added[0])
        if k == 0 or k > self.max_changes:
            return lambda v: (H @ v.float()).double()
        c, d1 = theta0.shape
        # Each changed example j adds s_j (B_j ⊗ x̃_j)(B_j ⊗ x̃_j)ᵀ / n_ref to the Hessian, with
        # B = diag(√p) - p √pᵀ so that B Bᵀ = diag(p) - p pᵀ (the softmax Hessian).
        cols, hcols, signs = [], [], []
        h3 = H.view(-1, c, d1)  # [P, C, D+1]: H0⁻¹ with its columns split by (class, feature)
        for (xs, _), s in ((removed, -1.0), (added, 1.0)):
            if len(xs) == 0:
                continue
            x1 = _augment(xs)
            p = torch.softmax(x1 @ theta0.T, -1)  # [m, C]
            sq = p.sqrt()
            bmat = torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]  # [m, C, C]
            # column k of example j: vec over (c, d) of B[c, k] x̃[d]
            w = torch.einsum("mck,md->mkcd", bmat, x1).reshape(-1, c * d1)  # [m*C, P]
            # H0⁻¹ w without forming a [P, m*C] product: contract H0⁻¹ with x̃ first (one pass over H0⁻¹)
            hx = (h3.reshape(-1, d1) @ x1.T.float()).view(-1, c, len(xs)).double()  # [P, C, m]
            hcols.append(torch.einsum("pcm,mck->pmk", hx, bmat).reshape(hx.shape[0], -1))
            cols.append(w)
            signs.append(torch.full((w.shape[0],), s, dtype=torch.float64))
        scale = np.sqrt(self.n_ref)
        W = (torch.cat(cols).T / scale).contiguous()  # [P, r]
        sign = torch.cat(signs)
        hw = torch.cat(hcols, 1) / scale  # H0⁻¹ W
        # (H0 + W S Wᵀ)⁻¹ = H0⁻¹ - H0⁻¹ W (S⁻¹ + Wᵀ H0⁻¹ W)⁻¹ Wᵀ H0⁻¹,  S = diag(sign)
        core_lu = torch.linalg.lu_factor(torch.diag(1.0 / sign) + W.T @ hw)

        def solve(v: Tensor) -> Tensor:
            a = (H @ v.float()).double()
            return a - hw @ torch.linalg.lu_solve(*core_lu, (W.T @ a).reshape(-1, 1)).reshape(-1)

        return solve

    def _changes(self, x: Tensor, y: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Examples in the reference but not in ``(x, y)`` (removed) and vice versa (added), as multisets."""
        if getattr(self, "_ref", None) is None:  # computed once per process, not a dataclass field
            rx, ry = xy(self.reference)
            keys = _row_keys(rx, ry)
            self._ref = (rx, ry, keys, Counter(keys))
        rx, ry, ref_keys, ref_count = self._ref
        n, m = len(rx), len(x)
        empty = (x[:0], y[:0])
        # Fast paths for what retraining jobs produce (order kept): the reference with examples
        # appended, or with one example deleted; anything else falls back to multiset hashing.
        if m >= n and torch.equal(x[:n], rx) and torch.equal(y[:n], ry):
            return empty, (x[n:], y[n:])
        if m == n - 1:
            differs = (x != rx[:m]).any(1) | (y != ry[:m])
            i = int(differs.nonzero()[0]) if bool(differs.any()) else m
            if torch.equal(x[i:], rx[i + 1:]) and torch.equal(y[i:], ry[i + 1:]):
                return (rx[i:i + 1], ry[i:i + 1]), empty
        keys = _row_keys(x, y)
        count = Counter(keys)
        gone, new = ref_count - count, count - ref_count
        rem, add = [], []
        for i, k in enumerate(ref_keys):
            if gone[k] > 0:
                rem.append(i)
                gone[k] -= 1
        for i, k in enumerate(keys):
            if new[k] > 0:
                add.append(i)
                new[k] -= 1
        return (rx[rem], ry[rem]), (x[add], y[add])


def _two_loop(g: Tensor, mem_s: list[Tensor], mem_y: list[Tensor], h0: Any) -> Tensor:
    """L-BFGS two-loop recursion: ``≈ H⁻¹ g`` from the pairs ``(s, y)`` and the initial ``h0(v) ≈ H⁻¹ v``."""
    q = g.clone()
    alphas = []
    for s, yv in zip(reversed(mem_s), reversed(mem_y)):
        rho = 1.0 / float(yv @ s)
        a = rho * float(s @ q)
        q -= a * yv
        alphas.append((rho, a))
    r = h0(q)
    for (s, yv), (rho, a) in zip(zip(mem_s, mem_y), reversed(alphas)):
        b = rho * float(yv @ r)
        r += (a - b) * s
    return r


def solve_reference(data: Any, n_classes: int, n_ref: int | None = None, l2: float = 1e-3,
                    tol: float = 1e-12) -> tuple[LinearSoftmax, Tensor]:
    """Solve ``F_D`` exactly: L-BFGS from zero (the paper's solver), then Newton-preconditioned to ``tol``.

    Returns ``(model, h_inv)`` with ``h_inv`` the inverse ``[P, P]`` of ``∇²F_D(θ̂)``.
    """
    x, y = xy(data)
    n_ref = len(x) if n_ref is None else n_ref
    model = LBFGSLogistic(x.shape[1], n_classes, n_ref, l2)(data)
    # The L-BFGS point is within ~1e-9 of θ̂: its Hessian makes the polish converge at once.
    h_inv = _inverse(hessian(_theta(model), x, n_ref, l2))
    model = NewtonLogistic(data, model.state_dict(), h_inv, n_ref=n_ref, l2=l2, tol=tol)(data)
    return model, _inverse(hessian(_theta(model), x, n_ref, l2))


def _inverse(h: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite matrix (via Cholesky), symmetrised."""
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    # row-major: matmuls with a transposed-layout [P, P] operand hit a ~50x slower path
    return ((inv + inv.T) / 2).contiguous()


# ----------------------------------------------------------------------- influence function
def influence_scores(model: LinearSoftmax, train: Any, queries: Any, n_ref: int, l2: float,
                     h_inv: Tensor | None = None) -> Tensor:
    """First-order leave-one-out prediction ``[n_query, n_train]`` (higher = proponent).

        score[q, i] = (1 / n_ref) ∇ℓ_q(θ̂)ᵀ H⁻¹ ∇ℓ_i(θ̂),    H = ∇²F_D(θ̂)

    ≈ ``L(θ_{-i}, q) - L(θ̂, q)`` (leave-one-out) and ``L(θ̂, z_i) - L(θ_{+q}, z_i)`` (add ``q``):
    the influence function is symmetric in the two, the hypothesis' exact limit. ``h_inv``: ``H⁻¹``
    ``[P, P]`` (computed when None).
    """
    xt, yt = xy(train)
    xq, yq = xy(queries)
    theta = _theta(model)
    c, d1 = theta.shape
    if h_inv is None:
        h_inv = _inverse(hessian(theta, xt, n_ref, l2))
    x1, q1 = _augment(xt), _augment(xq)

    def residuals(a: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(a @ theta.T, -1)
        return p - F.one_hot(y, c).to(p.dtype)

    gq = torch.einsum("qc,qd->qcd", residuals(q1, yq), q1).reshape(len(xq), -1)  # [Q, P]
    s = (gq @ h_inv).reshape(len(xq), c, d1)  # H⁻¹ ∇ℓ_q (H symmetric)
    return torch.einsum("qcd,nd,nc->qn", s, x1, residuals(x1, yt)) / n_ref


def gradient_dot(model: LinearSoftmax, train: Any, queries: Any) -> Tensor:
    """``[n_query, n_train]`` dot products ``∇ℓ_q(θ̂)ᵀ ∇ℓ_i(θ̂)`` of per-example cross-entropy gradients.

    The influence function without its inverse Hessian (TracIn at one checkpoint, up to the step
    size). One plain SGD ascent step of Forward-INF with a small lr scores ``≈ lr`` times this.
    """
    xt, yt = xy(train)
    xq, yq = xy(queries)
    theta = _theta(model)
    c = theta.shape[0]
    x1, q1 = _augment(xt), _augment(xq)
    rt = torch.softmax(x1 @ theta.T, -1) - F.one_hot(yt, c).to(theta.dtype)  # [n, C]
    rq = torch.softmax(q1 @ theta.T, -1) - F.one_hot(yq, c).to(theta.dtype)  # [Q, C]
    # (r_q ⊗ x̃_q) · (r_i ⊗ x̃_i) = (r_q · r_i)(x̃_q · x̃_i)
    return (rq @ rt.T) * (q1 @ x1.T)
