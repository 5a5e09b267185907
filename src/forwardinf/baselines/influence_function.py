"""Influence functions (Koh & Liang 2017; survey section 5.1.1) with exact, CG and LiSSA solvers."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from forwardinf.baselines.gradient import GradientConfig, GradientEstimator
from forwardinf.core import gradients as G
from forwardinf.core.params import Params, mode
from forwardinf.data.inputs import DataLike, gather, to_device
from forwardinf.estimators.base import Capabilities, check_choice, check_positive
from forwardinf.tasks.base import Task

SOLVERS = ("exact", "cg", "lissa")
MAX_EXACT_DIM = 5000  # a float64 D x D Hessian of 200 MB; beyond that use cg/lissa or a subset


@dataclass(frozen=True, kw_only=True)
class InfluenceFunctionConfig(GradientConfig):
    """Every knob of :class:`InfluenceFunction` (see its docstring)."""

    solver: str = "cg"
    damping: float | str = 0.01
    depth: int = 100
    scale: float | None = None
    repeats: int = 1
    lissa_batch_size: int = 32
    tol: float = 1e-6
    query_chunk: int = 32
    seed: int = 0


class InfluenceFunction(GradientEstimator):
    """Influence functions: ``score(q, i) = g_q^T (H + λI)^{-1} g_i``.

    ``g = ∇_θ ℓ(z, θ)`` are per-example loss gradients over the selected parameters and ``H`` the
    Hessian of the mean training loss ``(1/n) Σ_i ℓ(z_i, θ)``, damped by ``λ = damping``.
    Sign: this is ``-I_up,loss`` of Koh & Liang, so a **positive score = proponent**: upweighting
    ``z_i`` lowers the query's loss. Removing ``z_i`` raises the query loss by about ``score / n``
    (survey eq. 33), which is what leave-one-out retraining measures.

    Solvers for ``s_q = (H + λI)^{-1} g_q`` (batched over queries):

    - ``"exact"``: the explicit ``D x D`` Hessian, built and factorised in :meth:`fit` (``D`` up
      to ``MAX_EXACT_DIM``; restrict ``params`` for bigger models).
    - ``"cg"``: conjugate gradient on Hessian-vector products over the whole training set, at
      most ``depth`` iterations, stopping at relative residual ``tol``.
    - ``"lissa"``: the stochastic recursion of Agarwal et al. used by Koh & Liang,
      ``h_j = v + h_{j-1} - (H_j + λI) h_{j-1} / scale`` with ``H_j`` the Hessian of a random
      minibatch of ``lissa_batch_size`` training points (drawn without replacement), ``depth`` steps, ``s = h / scale``,
      averaged over ``repeats`` runs. With ``λ = damping`` this solves the same damped system
      as ``exact``/``cg``; Koh & Liang's own parameterisation
      ``h_j = v + (1 - d) h_{j-1} - H_j h_{j-1} / scale`` is the same recursion with
      ``d = damping / scale``. It converges when ``scale`` exceeds the largest eigenvalue of
      ``H_j + λI`` and ``H + λI`` is positive definite; ``scale=None`` sets ``scale_`` to 1.5 x
      (the largest |eigenvalue| of ``H`` and of 8 sampled minibatch Hessians ``H_j``, by
      Lanczos, + ``λ``). The paper's IF-100 / IF-1000
      / IF-10000 are ``depth`` 100 / 1000 / 10000.

    Non-convex models have negative curvature: ``H + λI`` is then indefinite for small ``λ``,
    LiSSA diverges and CG stops early (both warn or raise). ``damping="auto"`` estimates the
    extreme eigenvalues ``θ_min, θ_max`` of ``H`` in :meth:`fit` (40 Lanczos steps on up to 1024
    training points; exact eigenvalues for ``exact``) and uses
    ``λ = 0.01 |θ_max| + 2 max(0, -θ_min)``: 1% relative damping, plus enough to make the
    system positive definite. The values used are kept in ``damping_``, ``spectrum_``.

    Args (all keyword):
        solver: ``"exact"``, ``"cg"`` or ``"lissa"``.
        damping: ``λ`` added to the Hessian's diagonal, or ``"auto"`` (see above).
        depth: LiSSA recursion depth, or the CG iteration limit.
        scale: LiSSA scale; None estimates it.
        repeats: independent LiSSA runs averaged.
        lissa_batch_size: training points sampled per LiSSA step.
        tol: CG stopping tolerance on ``||r|| / ||g_q||``.
        params: None for all trainable parameters, glob patterns (``"fc.*"``), or ``"last"`` for
            the last layer (see :func:`forwardinf.core.gradients.last_layer`).
        batch_size: examples per gradient / Hessian-product chunk (bounds memory).
        query_chunk: queries solved at once.
        cache_mb: keep the training gradients in memory if they fit in this many MB.
        seed: seeds LiSSA's minibatch sampling and the power iteration.
        progress: show progress bars.

    ``self_influence()`` is ``g_i^T (H + λI)^{-1} g_i``: one inverse-HVP per training point
    (cheap for ``exact``, ``n`` solves for ``cg``/``lissa``).
    """

    Config = InfluenceFunctionConfig
    fit_fields = ("solver", "damping", "scale", "lissa_batch_size", "params", "seed")
    capabilities = Capabilities(self_influence="g_iᵀ (H + λI)⁻¹ g_i: the diagonal of influence(train)")

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: InfluenceFunctionConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`InfluenceFunctionConfig`), or ``config=``."""
        super().__init__(model, task, config, **knobs)

    # -- fit --------------------------------------------------------------------------------
    def _fit(self, train: Any) -> None:
        """Settle ``damping_`` (and, for ``exact``, factorise ``H + λI``; for ``lissa``, pick ``scale_``)."""
        self._grad_cache_: dict[Any, Tensor] = {}
        params = self._select()
        d = G.dim(params)
        self.n_params_ = d
        loss_fn = self._loss_fn()
        if self.solver == "exact":
            if d > MAX_EXACT_DIM:
                raise ValueError(f"InfluenceFunction: solver='exact' needs a {d}x{d} Hessian (more than "
                                 f"{MAX_EXACT_DIM} parameters); pass params='last' (or other patterns) or use solver='cg'")
            with mode(self.model, False):
                h = G.hessian(loss_fn, params, self.train_, self.batch_size, self._device(), progress=self.progress).double()
            eig = torch.linalg.eigvalsh(h)
            self.spectrum_ = (float(eig[0]), float(eig[-1]))
            self.damping_ = self._damping_from(*self.spectrum_)
            h = h + self.damping_ * torch.eye(d, dtype=torch.float64, device=h.device)
            self.hessian_ = h
            factor, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                self._solve_ = lambda b: torch.cholesky_solve(b, factor)
            else:
                warnings.warn("InfluenceFunction: the damped Hessian is not positive definite "
                              "(non-convex model); solving with LU. Use a larger damping or damping='auto'.", stacklevel=2)
                lu, piv = torch.linalg.lu_factor(h)
                self._solve_ = lambda b: torch.linalg.lu_solve(lu, piv, b)
            return
        need_spectrum = self.damping == "auto" or (self.solver == "lissa" and self.scale is None)
        self.spectrum_ = self._spectrum(loss_fn, params) if need_spectrum else None
        self.damping_ = self._damping_from(*self.spectrum_) if self.damping == "auto" else float(self.damping)
        if self.solver == "lissa":
            if self.scale is not None:
                self.scale_ = float(self.scale)
            else:
                self.scale_ = 1.5 * (self._lissa_top(loss_fn, params) + self.damping_)

    def _lissa_top(self, loss_fn: G.LossFn, params: Params) -> float:
        """Largest |eigenvalue| over the full Hessian and 8 sampled LiSSA minibatches.

        A minibatch Hessian's top eigenvalue can be several times the full one (3x for 32
        digits); a step with ``H_j > 2 scale`` expands instead of contracting, which is how
        deep LiSSA recursions blow up (the paper's IF-10000).
        """
        lo, hi = self.spectrum_
        top = max(abs(lo), abs(hi))
        n, m = len(self.train_), min(self.lissa_batch_size, len(self.train_))
        if m < n:
            gen = torch.Generator().manual_seed(self.seed + 1)
            ref = next(iter(params.values()))
            with mode(self.model, False):
                for k in range(8):
                    batch = to_device(gather(self.train_, torch.randperm(n, generator=gen)[:m].tolist()), self._device())
                    blo, bhi = G.lanczos_extremes(lambda v: G.batch_hvp(loss_fn, params, batch, v), G.dim(params),
                                                  steps=10, seed=self.seed + k, dtype=ref.dtype, device=ref.device)
                    top = max(top, abs(blo), abs(bhi))
        return top

    def _damping_from(self, lowest: float, highest: float) -> float:
        """``damping="auto"``: 1% of the top eigenvalue, plus twice any negative curvature."""
        if self.damping != "auto":
            return float(self.damping)
        return 0.01 * abs(highest) + 2.0 * max(0.0, -lowest)

    def _spectrum(self, loss_fn: G.LossFn, params: Params) -> tuple[float, float]:
        """Extreme eigenvalues of ``H`` by 40 Lanczos steps on up to 1024 training points."""
        n = len(self.train_)
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen)[:1024].sort().values.tolist()
        sample = torch.utils.data.Subset(self.train_, idx)
        ref = next(iter(params.values()))
        with mode(self.model, False):
            return G.lanczos_extremes(
                lambda v: G.dataset_hvp(loss_fn, params, sample, v, self.batch_size, self._device()),
                G.dim(params), steps=40, seed=self.seed, dtype=ref.dtype, device=ref.device)

    # -- influence --------------------------------------------------------------------------
    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` scores, or ``[n_train]`` for the mean query gradient (``joint``)."""
        self._check_fitted()
        qset = self._load_queries(queries)
        params, loss_fn = self._select(), self._loss_fn()
        gq = self._grads(qset, loss_fn, params, "query gradients")  # [Q, D]
        if joint:
            gq = gq.mean(0, keepdim=True)
        s = self.inverse_hvp(gq)
        out = self._dot_train(s, "train", loss_fn, params)
        return out[0] if joint else out

    def self_influence(self) -> Tensor:
        """``[n_train]``: ``g_i^T (H + λI)^{-1} g_i`` for every training point."""
        self._check_fitted()
        params, loss_fn = self._select(), self._loss_fn()
        out = torch.empty(len(self.train_), dtype=next(iter(params.values())).dtype)
        for start, g in self._train_grad_blocks("train", loss_fn, params):
            s = self.inverse_hvp(g)
            out[start:start + g.shape[0]] = (s * g).sum(1).cpu()
        return out

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """``[K, D]``: ``(H + λI)^{-1} v`` for each row of ``vectors [K, D]``, with the chosen solver."""
        self._check_fitted()
        if self.solver == "exact":
            return self._solve_(vectors.T.double()).T.to(vectors.dtype)
        params, loss_fn = self._select(), self._loss_fn()
        outs = []
        with mode(self.model, False):
            for a in range(0, vectors.shape[0], self.query_chunk):
                v = vectors[a:a + self.query_chunk]
                outs.append(self._cg(v, params, loss_fn) if self.solver == "cg" else self._lissa(v, params, loss_fn))
        return torch.cat(outs, 0)

    # -- iterative solvers ------------------------------------------------------------------
    def _hvp(self, v: Tensor, params: Params, loss_fn: G.LossFn, batch: Any = None) -> Tensor:
        """``(H + λI) v`` over the training set (or over one ``batch``), rows of ``v [K, D]``."""
        if batch is None:
            hv = G.dataset_hvp(loss_fn, params, self.train_, v, self.batch_size, self._device())
        else:
            hv = G.batch_hvp(loss_fn, params, batch, v)
        return hv + self.damping_ * v

    def _cg(self, b: Tensor, params: Params, loss_fn: G.LossFn) -> Tensor:
        """Conjugate gradient, one independent system per row of ``b [K, D]``, vectorised."""
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = self.tol * b.norm(dim=1)
        active = rs.sqrt() > target
        iters = 0
        bad_curvature = False
        for iters in tqdm(range(1, self.depth + 1), desc="cg", disable=not self.progress, leave=False):
            if not active.any():
                iters -= 1
                break
            ap = self._hvp(p, params, loss_fn)
            pap = (p * ap).sum(1)
            curvature_ok = pap > 0
            bad_curvature |= bool((active & ~curvature_ok).any())
            active = active & curvature_ok  # a non-positive direction: stop that system here
            alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
            p = torch.where(active[:, None], r + beta[:, None] * p, p)
            rs = torch.where(active, rs_new, rs)
            active = active & (rs.sqrt() > target)
        if bad_curvature:
            warnings.warn("InfluenceFunction(cg): H + damping*I is not positive definite along a search "
                          "direction; stopped early. Increase damping.", stacklevel=3)
        self.solver_info_ = {"iterations": iters,
                             "max_relative_residual": float((rs.sqrt() / b.norm(dim=1).clamp_min(1e-30)).max())}
        return x

    def _lissa(self, v: Tensor, params: Params, loss_fn: G.LossFn) -> Tensor:
        """LiSSA on rows of ``v [K, D]``; the same minibatch sequence for every row (reseeded per call)."""
        n, m = len(self.train_), min(self.lissa_batch_size, len(self.train_))
        device = self._device()
        total = torch.zeros_like(v)
        for rep in range(self.repeats):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rep)
            h = v.clone()
            for j in tqdm(range(self.depth), desc=f"lissa {rep + 1}/{self.repeats}", disable=not self.progress, leave=False):
                idx = torch.randperm(n, generator=gen)[:m].tolist()  # without replacement: m = n is exact
                batch = to_device(gather(self.train_, idx), device)
                h = v + h - self._hvp(h, params, loss_fn, batch) / self.scale_
                if (j % 50 == 49 or j == self.depth - 1) and not torch.isfinite(h).all():
                    raise FloatingPointError(f"LiSSA diverged at step {j + 1} (scale={self.scale_:.4g}, "
                                             f"damping={self.damping_:.4g}); increase scale or damping")
            total += h / self.scale_
        return total / self.repeats

    # -- checks -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        name = type(self).__name__
        check_choice(name, "solver", self.solver, SOLVERS)
        if self.damping != "auto" and (not isinstance(self.damping, (int, float)) or isinstance(self.damping, bool)
                                       or self.damping < 0 or not math.isfinite(self.damping)):
            raise ValueError(f"{name}: invalid damping={self.damping!r}; expected a number >= 0 or 'auto'")
        check_positive(name, "depth", self.depth, integer=True)
        if self.scale is not None:
            check_positive(name, "scale", self.scale)
        check_positive(name, "repeats", self.repeats, integer=True)
        check_positive(name, "lissa_batch_size", self.lissa_batch_size, integer=True)
        check_positive(name, "tol", self.tol)
        check_positive(name, "query_chunk", self.query_chunk, integer=True)
        self._check_common()
