"""Functional optimizers for the query update: ``params -> params`` with no module copies.

Every tensor may carry a leading query dim ``[Q, ...]`` (``stacked=True``): each query then
gets its own update, all in one set of tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from forwardinf.core.params import Params, flat_norm

OPTIMIZERS = ("nsgd", "sgd", "adam", "kfac")


@dataclass
class UpdateRule:
    """One optimizer step, applied ``steps`` times by the caller.

    ``optimizer``: ``"sgd"`` (plain, optional momentum), ``"adam"``, or ``"nsgd"``: the
    gradient rescaled per query to the norm of the updated parameters, so ``lr`` is the
    step length relative to ``||θ||`` whatever the size of the query's gradient; ``"kfac"``:
    as ``"nsgd"`` on the preconditioned gradient ``precondition(g) = (G + λ I)⁻¹ g`` (a
    curvature-aware, natural-gradient step; see :mod:`forwardinf.core.curvature`).
    ``ascent=True`` climbs the objective (unlearning the queries).

    After the first step ``state["direction_norm"]`` holds ``||d₀||`` (``[Q]`` when stacked), the
    norm of the first direction before any step-size scaling (the gradient, or the preconditioned
    gradient): the update moved ``θ`` by about ``lr_eff ||d₀||``, which the ``"influence"`` score
    divides out.

    ``track=True``: ``state["displacement"]`` holds the sum of the steps taken, ``θ_K - θ`` as
    computed before it is added to ``θ`` (``[Q, ...]`` when stacked). Subtracting the float32
    parameters afterwards would lose most of its digits (a step of ``1e-4 ||θ||`` keeps ~3 of
    float32's 7); the forward-mode scores (``ForwardINF(difference="tangent")``) differentiate
    along it instead.
    """

    optimizer: str = "nsgd"
    lr: float = 1e-3
    ascent: bool = True
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    precondition: Callable[[Params, bool], Params] | None = None  # for "kfac": (grads, stacked) -> grads
    state: dict = field(default_factory=dict)
    track: bool = False

    def step(self, params: Params, grads: Params, stacked: bool) -> Params:
        """``θ`` after one step from ``params`` along ``grads`` (consumed: may be overwritten)."""
        grads, factor = self._direction(params, grads, stacked)
        if self._straight() and not self.track:
            # θ - lr d in one fused op per tensor: the [Q, ...] temporaries of the unfused form
            # were most of the update's memory.
            if isinstance(factor, Tensor):
                return {k: torch.addcmul(params[k], grads[k], _per_query(-self.lr * factor, grads[k], stacked))
                        for k in params}
            return {k: torch.add(params[k], grads[k], alpha=-self.lr * factor) for k in params}
        step = self._delta(params, grads, factor, stacked)
        self._track(step)
        return {k: params[k] + step[k] for k in params}

    def delta(self, params: Params, grads: Params, stacked: bool) -> Params:
        """The step's change ``θ_{k+1} - θ_k`` without forming ``θ_{k+1}`` (the forward-mode scores
        need only ``θ_K - θ``): the same bits as :meth:`step`'s, computed in ``grads``' memory for a
        straight step (one parameter copy per query in flight, not three)."""
        grads, factor = self._direction(params, grads, stacked)
        step = self._delta(params, grads, factor, stacked)
        self._track(step)
        return step

    def _straight(self) -> bool:
        """A plain (normalised) gradient step: no momentum, weight decay or Adam state."""
        return self.optimizer in ("sgd", "nsgd", "kfac") and not (self.momentum or self.weight_decay)

    def _direction(self, params: Params, grads: Params, stacked: bool) -> tuple[Params, float | Tensor]:
        """``(g, factor)`` with the descent direction ``d = factor * g``: ``factor`` a scalar, or
        ``[Q]`` per query for nsgd/kfac; ``g`` preconditioned for kfac. Records ``direction_norm``."""
        sign = -1.0 if self.ascent else 1.0  # descent direction of the objective
        factor: float | Tensor = sign
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.optimizer == "kfac":
            if self.precondition is None:
                raise ValueError("optimizer='kfac' needs a precondition function (ForwardINF builds it in fit)")
            grads = self.precondition(grads, stacked)
        if "direction_norm" not in self.state:  # the first step: θ is still the model's own
            self.state["direction_norm"] = flat_norm(grads, stacked)
            if not torch.isfinite(self.state["direction_norm"]).all():  # the query's fault, not lr's
                raise ValueError("queries: non-finite gradient of the query objective at the unchanged model "
                                 "(an input too large for the model's precision?)")
        if self.optimizer in ("nsgd", "kfac"):
            if "ref_norm" not in self.state:
                self.state["ref_norm"] = flat_norm(params, stacked)
            gnorm = flat_norm(grads, stacked)
            if not torch.isfinite(gnorm).all():
                raise FloatingPointError("non-finite gradient in the query update")
            factor = sign * self.state["ref_norm"] / gnorm.clamp_min(1e-30)
        return grads, factor

    def _delta(self, params: Params, grads: Params, factor: float | Tensor, stacked: bool) -> Params:
        """``-lr`` times the (momentum, weight-decayed or Adam) direction ``factor * grads``; in
        place in ``grads`` where no state keeps a reference to it."""
        d = {k: g.mul_(_per_query(factor, g, stacked) if isinstance(factor, Tensor) else factor)
             for k, g in _owned(grads).items()}
        if self.weight_decay:
            d = {k: v + self.weight_decay * params[k] for k, v in d.items()}
        if self.optimizer in ("sgd", "nsgd", "kfac"):
            if self.momentum:
                buf = self.state.get("momentum")
                buf = d if buf is None else {k: self.momentum * buf[k] + d[k] for k in d}
                self.state["momentum"] = d = buf
                return {k: -self.lr * d[k] for k in params}
            return {k: d[k].mul_(-self.lr) for k in params}
        b1, b2 = self.betas  # adam
        t = self.state["t"] = self.state.get("t", 0) + 1
        m = self.state.get("m") or {k: torch.zeros_like(v) for k, v in d.items()}
        v2 = self.state.get("v") or {k: torch.zeros_like(v) for k, v in d.items()}
        m = {k: b1 * m[k] + (1 - b1) * d[k] for k in d}
        v2 = {k: b2 * v2[k] + (1 - b2) * d[k] * d[k] for k in d}
        self.state["m"], self.state["v"] = m, v2
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        return {k: -self.lr * (m[k] / c1) / ((v2[k] / c2).sqrt() + self.eps) for k in params}

    def _track(self, step: Params) -> None:
        """Add ``step`` to ``state["displacement"]`` when tracking."""
        if self.track:
            total = self.state.get("displacement")
            self.state["displacement"] = step if total is None else {k: total[k] + step[k] for k in step}


def _owned(grads: Params) -> Params:
    """``grads`` safe to scale in place: a tensor sharing memory with another one is copied (a
    vmapped backward may return one parameter's gradient as a view into another's, e.g. ViT's
    class token's inside the position embeddings'), else a shared element would be scaled twice."""
    count: dict[int, int] = {}
    for g in grads.values():
        count[g.untyped_storage().data_ptr()] = count.get(g.untyped_storage().data_ptr(), 0) + 1
    return {k: g if count[g.untyped_storage().data_ptr()] == 1 else g.clone() for k, g in grads.items()}


def _per_query(scale: Tensor, like: Tensor, stacked: bool) -> Tensor:
    return scale.view(-1, *([1] * (like.ndim - 1))) if stacked else scale


@dataclass
class Update:
    """``Q`` queries' updates, as :class:`~forwardinf.estimators.forward_inf.ForwardINF` scores them.

    ``params``: ``θ_q`` ``{name: [Q, ...]}``, or None when the scores differentiate along
    ``moved`` alone (forward-mode scores: ``θ_q`` is never formed). ``buffers``: the model's
    buffers, or each query's own ``[Q, ...]`` when ``stacked_buffers`` (train-mode BatchNorm).
    ``direction_norm [Q]``: ``||d₀||``, the first update direction's norm before step-size
    scaling. ``moved``: ``θ_q - θ`` ``{name: [Q, ...]}`` as the update computed it (forward-mode
    scores), else None.
    """

    params: Params | None
    buffers: Params
    stacked_buffers: bool
    direction_norm: Tensor
    moved: Params | None = None

    def take(self, start: int, stop: int) -> "Update":
        """Queries ``start:stop`` alone (views, no copies)."""
        def part(tensors: Params | None) -> Params | None:
            return None if tensors is None else {k: v[start:stop] for k, v in tensors.items()}

        return Update(part(self.params), part(self.buffers) if self.stacked_buffers else self.buffers,
                      self.stacked_buffers, self.direction_norm[start:stop], part(self.moved))
