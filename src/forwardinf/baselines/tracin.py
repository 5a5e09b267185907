"""TracIn / TracInCP (Pruthi et al. 2020; survey section 5.2.1), grad-dot and grad-cosine."""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from forwardinf.baselines.influence_function import GradientEstimator
from forwardinf.core import gradients as G
from forwardinf.core.params import Params
from forwardinf.data.inputs import DataLike
from forwardinf.estimators.base import check_positive
from forwardinf.tasks.base import Task

Checkpoint = Any  # a state dict, or a path to one saved with torch.save


class TracIn(GradientEstimator):
    """TracInCP: ``score(q, i) = Σ_c η_c ∇ℓ(z_q; θ_c) · ∇ℓ(z_i; θ_c)`` over saved checkpoints ``θ_c``.

    Higher = proponent: a gradient step on ``z_i`` at checkpoint ``c`` lowers the query's loss by
    about ``η_c`` times this dot product (survey eq. 56). With no checkpoints the current model is
    the only one (``η = 1``): grad-dot; ``normalize=True`` replaces each dot product by the
    cosine of the two gradients (grad-cos, TracIn-CP with unit gradients).

    Checkpoints are loaded into functional parameter dicts, never into the user's model; a
    checkpoint may omit buffers (the model's own are used) but must hold every selected parameter.

    Args (all keyword):
        checkpoints: list of state dicts or paths (``torch.save(model.state_dict(), path)``); a
            dict with a ``"state_dict"`` or ``"model"`` entry is unwrapped. None/empty: the model.
        lrs: step size ``η_c`` per checkpoint (e.g. the learning rate in force after it); default 1.
        params: None for all trainable parameters, glob patterns, or ``"last"`` (the last layer).
        normalize: use gradient cosines instead of dot products.
        batch_size: examples per per-example-gradient chunk.
        cache_mb: keep each checkpoint's training gradients in memory if they fit in this many MB.
        progress: show progress bars.

    ``joint=True`` scores the mean query gradient (for dot products, the mean of the per-query
    rows). ``self_influence()`` is ``Σ_c η_c ||∇ℓ(z_i; θ_c)||²`` (``Σ_c η_c`` when normalised).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        *,
        checkpoints: Sequence[Checkpoint] | None = None,
        lrs: Sequence[float] | None = None,
        params: str | Iterable[str] | None = None,
        normalize: bool = False,
        batch_size: int = 64,
        cache_mb: float = 512.0,
        progress: bool = False,
    ) -> None:
        super().__init__(model, task)
        self.checkpoints = checkpoints
        self.lrs = lrs
        self.params = params
        self.normalize = normalize
        self.batch_size = batch_size
        self.cache_mb = cache_mb
        self.progress = progress

    def fit(self, train: DataLike) -> "TracIn":
        """Load the checkpoints and store the training set (its gradients are computed lazily)."""
        self._check_params()
        self.train_ = self._load_train(train)
        self._grad_cache_: dict[Any, Tensor] = {}
        device = self._device()
        checkpoints = list(self.checkpoints or [])
        self.states_: list[dict[str, Tensor] | None] = [_load_state(c, device) for c in checkpoints] or [None]
        lrs = [1.0] * len(self.states_) if self.lrs is None else [float(x) for x in self.lrs]
        if len(lrs) != len(self.states_):
            raise ValueError(f"TracIn: {len(lrs)} lrs for {len(self.states_)} checkpoints")
        self.lrs_ = lrs
        own = {k: v.detach() for k, v in self.model.state_dict().items()}
        for c, state in enumerate(self.states_):
            if state is not None:
                self._select(state)  # every checkpoint must hold the selected parameters
                # Buffers (and unselected parameters) a checkpoint lacks come from the model.
                self.states_[c] = {**own, **state}
        return self

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` TracInCP scores, or ``[n_train]`` for the mean query gradient (``joint``)."""
        self._check_fitted()
        qset, _ = self._load_queries(queries)
        total = None
        for c, (state, lr) in enumerate(zip(self.states_, self.lrs_)):
            params, loss_fn = self._checkpoint(state)
            gq = self._grads(qset, loss_fn, params, f"query gradients ({c + 1}/{len(self.states_)})")  # [Q, D]
            if joint:
                gq = gq.mean(0, keepdim=True)
            if self.normalize:
                gq = gq / gq.norm(dim=1, keepdim=True).clamp_min(1e-30)
            dots = self._dot_train(gq, c, loss_fn, params)
            if self.normalize:
                dots = dots / self._train_norms(c, loss_fn, params)[None, :].clamp_min(1e-30)
            total = lr * dots if total is None else total + lr * dots
        return total[0] if joint else total

    def self_influence(self) -> Tensor:
        """``[n_train]``: ``Σ_c η_c ||∇ℓ(z_i; θ_c)||²`` (``Σ_c η_c`` for every point when normalised)."""
        self._check_fitted()
        total = None
        for c, (state, lr) in enumerate(zip(self.states_, self.lrs_)):
            params, loss_fn = self._checkpoint(state)
            if self.normalize:
                value = torch.ones(len(self.train_), dtype=next(iter(params.values())).dtype)
            else:
                value = self._train_norms(c, loss_fn, params) ** 2
            total = lr * value if total is None else total + lr * value
        return total

    # -- helpers ----------------------------------------------------------------------------
    def _checkpoint(self, state: dict[str, Tensor] | None) -> tuple[Params, G.LossFn]:
        return self._select(state), self._loss_fn(state)

    def _train_norms(self, c: int, loss_fn: G.LossFn, params: Params) -> Tensor:
        """``[n_train]`` gradient norms at checkpoint ``c`` (cached)."""
        key = ("norm", c)
        if key not in self._grad_cache_:
            out = torch.empty(len(self.train_), dtype=next(iter(params.values())).dtype)
            for start, g in self._train_grad_blocks(c, loss_fn, params):
                out[start:start + g.shape[0]] = g.norm(dim=1).cpu()
            self._grad_cache_[key] = out
        return self._grad_cache_[key]

    def _check_params(self) -> None:
        name = type(self).__name__
        if self.lrs is not None:
            for lr in self.lrs:
                check_positive(name, "lrs entry", lr)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"{name}: invalid normalize={self.normalize!r}; expected True or False")
        self._check_common()


def _load_state(checkpoint: Checkpoint, device: torch.device) -> dict[str, Tensor]:
    """A checkpoint as a flat ``{name: tensor}`` dict on ``device`` (paths loaded weights-only)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise ValueError(f"TracIn: checkpoint file {os.fspath(checkpoint)!r} does not exist")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise ValueError("TracIn: each checkpoint must be a state dict of tensors or a path to one")
    # Copies: a live module's tensors must not change under us if its owner keeps training.
    return {k: v.detach().to(device, copy=True) for k, v in checkpoint.items()}
