"""TracIn / TracInCP (Pruthi et al. 2020; survey section 5.2.1), grad-dot and grad-cosine."""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from forwardinf.baselines.gradient import GradientConfig, GradientEstimator, blocked_dot
from forwardinf.baselines.run import TrainingRun, legacy_run
from forwardinf.core import gradients as G
from forwardinf.core.params import Params, mode
from forwardinf.data.inputs import DataLike, batches, gather, to_device
from forwardinf.estimators.base import Capabilities, check_indices, check_positive
from forwardinf.tasks.base import Task

Checkpoint = Any  # a state dict, or a path to one saved with torch.save


@dataclass(frozen=True, kw_only=True)
class TracInConfig(GradientConfig):
    """Every knob of :class:`TracIn` (see its docstring)."""

    run: TrainingRun | None = None
    normalize: bool = False


class TracIn(GradientEstimator):
    """TracInCP: ``score(q, i) = Σ_c η_c ∇ℓ(z_q; θ_c) · ∇ℓ(z_i; θ_c)`` over saved checkpoints ``θ_c``.

    Higher = proponent: a gradient step on ``z_i`` at checkpoint ``c`` lowers the query's loss by
    about ``η_c`` times this dot product (survey eq. 56). With no checkpoints the current model is
    the only one (``η = 1``): grad-dot; ``normalize=True`` replaces each dot product by the
    cosine of the two gradients (grad-cos, TracIn-CP with unit gradients).

    Checkpoints are loaded into functional parameter dicts, never into the user's model; a
    checkpoint may omit buffers (the model's own are used) but must hold every selected parameter.

    Tied weights (GPT-2/T5's shared input embedding and ``lm_head``: one tensor under several
    names) are one parameter: ``params`` may name any alias (``"lm_head"``, ``"last"``), its
    gradient is the tied tensor's full gradient (both uses), and a checkpoint's copies of the
    aliases must agree. Data may also be a mapping of equal-length tensors (``encode``'s dict, a
    ``transformers`` ``BatchEncoding``): one example per row.

    Args (all keyword):
        run: the :class:`~forwardinf.baselines.run.TrainingRun` whose ``checkpoints`` (state dicts
            or paths written by ``torch.save(model.state_dict(), path)``; a dict with a
            ``"state_dict"`` or ``"model"`` entry is unwrapped) and ``lrs`` (step size ``η_c`` per
            checkpoint, e.g. the learning rate in force after it; default 1) are summed over.
            None, or a run without checkpoints: the model alone. (``checkpoints=`` / ``lrs=``
            still work, with a ``DeprecationWarning``.)
        params: None for all trainable parameters, glob patterns, or ``"last"`` (the last layer).
        normalize: use gradient cosines instead of dot products.
        batch_size: examples per per-example-gradient chunk.
        cache_mb: keep each checkpoint's training gradients in memory if they fit in this many MB.
        progress: show progress bars.

    ``joint=True`` scores the mean query gradient (for dot products, the mean of the per-query
    rows). ``self_influence()`` is ``Σ_c η_c ||∇ℓ(z_i; θ_c)||²`` (``Σ_c η_c`` when normalised).

    ``influence(queries, indices=idx)`` scores only the training positions ``idx``: from the
    cached gradients when the whole training set's fit in ``cache_mb`` (computed once, reused by
    every later call), otherwise by computing the gradients of just those points.
    """

    Config = TracInConfig
    fit_fields = ("run", "params")
    capabilities = Capabilities(indices=True, shardable=True,
                                self_influence="Σ_c η_c ||∇ℓ(z_i; θ_c)||²: the diagonal of influence(train)")

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: TracInConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`TracInConfig`), or ``config=``."""
        old = {k: knobs.pop(k) for k in ("checkpoints", "lrs") if k in knobs}
        if old:
            knobs["run"] = legacy_run(type(self).__name__, knobs.get("run"), old)
        super().__init__(model, task, config, **knobs)

    def _fit(self, train: Any) -> None:
        """Load the checkpoints (the training gradients are computed lazily)."""
        self._grad_cache_: dict[Any, Tensor] = {}
        device = self._device()
        run = self.run if self.run is not None else TrainingRun()
        self.states_: list[dict[str, Tensor] | None] = [_load_state(c, device) for c in run.checkpoints] or [None]
        self.lrs_ = [1.0] * len(self.states_) if run.lrs is None else [float(x) for x in run.lrs]
        aliases = _aliases(self.model)
        own = _untie({k: v.detach() for k, v in self.model.state_dict().items()}, aliases, "the model")
        for c, state in enumerate(self.states_):
            if state is not None:
                state = _untie(state, aliases, f"checkpoint {c}")
                self._select(state)  # every checkpoint must hold the selected parameters
                # Buffers (and unselected parameters) a checkpoint lacks come from the model.
                self.states_[c] = {**own, **state}

    def influence(self, queries: DataLike, joint: bool = False, indices: Any = None) -> Tensor:
        """``[n_query, n]`` TracInCP scores, or ``[n]`` for the mean query gradient (``joint``).

        ``indices``: training positions ``[n]`` to score (default: all ``n_train``).
        """
        self._check_fitted()
        rows = check_indices("TracIn", indices, len(self.train_))
        qset = self._load_queries(queries)
        total = None
        for c, (state, lr) in enumerate(zip(self.states_, self.lrs_)):
            params, loss_fn = self._checkpoint(state)
            gq = self._grads(qset, loss_fn, params, f"query gradients ({c + 1}/{len(self.states_)})")  # [Q, D]
            if joint:
                gq = gq.mean(0, keepdim=True)
            if self.normalize:
                gq = gq / gq.norm(dim=1, keepdim=True).clamp_min(1e-30)
            if rows is None:
                dots = self._dot_train(gq, c, loss_fn, params)
                norms = self._train_norms(c, loss_fn, params) if self.normalize else None
            else:
                g = self._train_rows(rows, c, loss_fn, params)  # [n, D]
                dots = blocked_dot(gq, g, self.batch_size).cpu()  # as _dot_train's blocks when rows are aligned
                norms = g.norm(dim=1).cpu() if self.normalize else None
            if self.normalize:
                dots = dots / norms[None, :].clamp_min(1e-30)
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
    def _train_rows(self, rows: Tensor, c: int, loss_fn: G.LossFn, params: Params) -> Tensor:
        """``[n, D]`` gradients of the training points ``rows`` at checkpoint ``c``."""
        if c in self._grad_cache_ or self._fits_cache(params):
            ((_, every),) = self._train_grad_blocks(c, loss_fn, params)  # all of them: computed once, then cached
            return every[rows.to(every.device)]
        unique, inverse = torch.unique(rows, return_inverse=True)
        subset = torch.utils.data.Subset(self.train_, unique.tolist())
        return self._grads(subset, loss_fn, params, "train gradients")[inverse.to(self._device())]

    def _grads(self, dataset: Any, loss_fn: G.LossFn, params: Params, desc: str) -> Tensor:
        """``[n, D]`` per-example gradients; each batch first goes through ``task.trim`` when the task
        has one (e.g. dropping padding columns, which it cannot do inside the per-example ``vmap``)."""
        trim = getattr(self.task, "trim", None)
        if not callable(trim):
            return super()._grads(dataset, loss_fn, params, desc)
        device, out = self._device(), []
        with mode(self.model, False):
            for _, batch in batches(dataset, self.batch_size):
                out.append(G.per_example_grads(loss_fn, params, to_device(trim(batch), device)))
        return torch.cat(out, 0)

    def _fits_cache(self, params: Params) -> bool:
        """Whether the whole training set's gradients fit in ``cache_mb`` beside what is cached."""
        size = len(self.train_) * G.dim(params) * next(iter(params.values())).element_size()
        used = sum(t.numel() * t.element_size() for t in self._grad_cache_.values())
        return used + size <= self.cache_mb * 2**20

    def _patterns(self) -> str | list[str] | None:
        """``params`` resolved to canonical parameter names, tied aliases included.

        ``named_parameters()`` lists a tied tensor once (``transformer.wte.weight``), so a pattern
        naming its other alias (``lm_head``, or ``"last"`` on GPT-2) would match nothing.
        """
        patterns = super()._patterns()
        if patterns is None:
            return None
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        chosen: list[str] = []
        for alias, name in _aliases(self.model).items():
            if name in trainable and name not in chosen and any(
                    fnmatch.fnmatchcase(alias, pat) or fnmatch.fnmatchcase(alias, pat + ".*") for pat in patterns):
                chosen.append(name)
        return chosen or patterns  # nothing matched: select_params reports the patterns

    def _load_queries(self, queries: DataLike) -> Any:
        """As the base check, but dict batches (``transformers`` inputs) may be padded to another
        length than the training data: they must have the same keys and tensor ranks."""
        qset = self._dataset(queries, "queries")
        batch = gather(qset, range(len(qset)))
        if not isinstance(batch, Mapping):
            return super()._load_queries(queries)
        example = gather(self.train_, [0])
        if not isinstance(example, Mapping):
            raise ValueError(f"queries: a dict of fields {sorted(batch)}, but the training examples are "
                             f"{type(example).__name__}s")
        ours, theirs = _signature(batch), _signature(example)
        if ours != theirs:
            raise ValueError(f"queries: fields {ours} (name: per-example rank) do not match the training data's {theirs}")
        self._validate(batch, "queries")
        return qset

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
        if self.run is not None and not isinstance(self.run, TrainingRun):
            raise TypeError(f"{name}: run must be a TrainingRun, got {type(self.run).__name__}")
        for lr in (self.run.lrs or ()) if self.run is not None else ():
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


def _aliases(module: nn.Module) -> dict[str, str]:
    """``{name: canonical name}`` for every parameter and buffer name, tied aliases included.

    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` report.
    """
    out: dict[str, str] = {}
    for named in (module.named_parameters, module.named_buffers):
        first = {}
        for n, t in named():
            first.setdefault(id(t), n)
        for n, t in named(remove_duplicate=False):
            out[n] = first[id(t)]
    return out


def _untie(state: dict[str, Tensor], aliases: dict[str, str], owner: str) -> dict[str, Tensor]:
    """``state`` with each tied tensor under its canonical name only.

    ``torch.func.functional_call`` refuses two values for one tied tensor; a state dict of a tied
    model holds every alias (equal copies). Differing copies cannot be one tied tensor: an error.
    """
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for k, v in state.items():
        name = aliases.get(k, k)
        if name in out:
            if out[name].shape != v.shape or not torch.equal(out[name], v):
                raise ValueError(f"TracIn: {owner} holds different values for {source[name]!r} and {k!r}, "
                                 "which the model ties (one shared tensor)")
            continue
        out[name], source[name] = v, k
    return out


def _signature(batch: Mapping[str, Any]) -> dict[str, int]:
    """``{key: per-example rank}`` of a dict batch's tensors."""
    return {k: v.ndim - 1 for k, v in batch.items() if torch.is_tensor(v)}
