"""HyDRA, hypergradient data relevance analysis (Chen et al. 2021; survey section 5.2.2).

HyDRA estimates leave-one-out influence by differentiating the *recorded training trajectory*
with respect to each training point's weight. Give training point ``i`` the weight ``1 + n ε_i``
in every batch objective ``Σ_{j ∈ B_t} w_t ℓ(z_j; θ)`` (``w_t = 1/|B_t|`` for a mean); its
hypergradient ``h_i = dθ_T / dε_i`` (``[D]``) then follows the optimiser's recursion. For SGD
with momentum ``μ``, dampening ``τ``, weight decay ``λ`` and learning rate ``η_t`` (PyTorch's
``torch.optim.SGD``), with ``b`` the derivative of the momentum buffer:

    s_t = n w_t 1[i ∈ B_t] ∇ℓ(z_i; θ_{t-1})  [+ H_{B_t}(θ_{t-1}) h_{t-1}]      (injection)
    d_t = s_t + λ h_{t-1};   b_t = μ b_{t-1} + (1 - τ) d_t  (b_t = d_t on a buffer's first step)
    h_t = h_{t-1} - η_t (d_t + μ b_t  if Nesterov  else  b_t)                  (b_t = d_t if μ = 0)

Removing ``z_i`` is ``ε_i = -1/n``, so the influence on a query is (survey eq. 62)

    score(q, i) = -(1/n) ∇ℓ(q; θ_T) · h_i      ≈ ℓ(q; θ_T without z_i) - ℓ(q; θ_T)

**positive = removing ``z_i`` raises the query's loss = proponent**, the library's orientation.

- ``hessian=False`` (default, the *fast* form of Chen et al.): the Hessian term is dropped, so
  the recursion is linear in the injections with per-step scalar factors ``a_t`` (computed once
  by an adjoint pass over the recorded hyperparameters), and ``h_i = Σ_{t: i ∈ B_t} a_t n w_t
  ∇ℓ(z_i; θ_{t-1})``: one per-example gradient per training point per epoch. For plain SGD
  ``a_t = -η_t`` and the score is ``Σ_{t: i ∈ B_t} η_t w_t ∇ℓ(q; θ_T) · ∇ℓ(z_i; θ_{t-1})``
  (survey eq. 64), TracIn's sum with the final query gradient.
- ``hessian=True``: the exact first-order derivative of the recorded trajectory, with one
  Hessian-vector product per training point per step (small models only).

The trajectory comes from :class:`TrajectoryRecorder`, a training-loop callback that snapshots
``θ_{t-1}``, the batch's training indices and the optimiser's hyperparameters before every step.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from forwardinf.baselines.gradient import GradientConfig, GradientEstimator
from forwardinf.baselines.run import TrainingRun, legacy_run
from forwardinf.core import gradients as G
from forwardinf.core.params import mode
from forwardinf.data.inputs import DataLike, as_dataset, batch_len, gather, to_device
from forwardinf.estimators.base import Capabilities, check_choice, check_positive
from forwardinf.io import atomic_save
from forwardinf.tasks.base import Task

__all__ = ["Step", "TrajectoryRecorder", "HyDRA", "step_coefficients"]

REDUCTIONS = ("mean", "sum")
# Per parameter: (lr, momentum, dampening, weight_decay, nesterov, fresh buffer). None = not updated.
Hyper = tuple[float, float, float, float, bool, bool]


@dataclass
class Step:
    """One optimiser step: ``state`` holds ``θ_{t-1}`` (parameters, and buffers if recorded),
    ``indices [B]`` the training positions in the batch, ``weight`` the per-example weight of the
    batch objective (``1/|B|`` for a mean), ``hyper`` the SGD settings per parameter name."""

    state: dict[str, Tensor]
    indices: Tensor
    weight: float
    hyper: dict[str, Hyper | None] = field(default_factory=dict)


class TrajectoryRecorder:
    """A training-loop callback that records what HyDRA unrolls.

    Call :meth:`record` once per optimiser step, after ``loss.backward()`` and *before*
    ``optimizer.step()``::

        rec = TrajectoryRecorder(model)
        for idx in batches_of_indices:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(); loss.backward()
            rec.record(idx, opt)          # snapshots θ_{t-1}, lr, momentum, ... and the indices
            opt.step()

    With a ``torch.optim.SGD`` optimiser the settings of each parameter's group are read (the
    current ``lr``, so schedules are followed); without one pass ``lr=`` (plain SGD, or give
    ``momentum=`` etc.). ``reduction`` says whether the batch loss is a mean (default) or a sum
    over the batch. Other optimisers (Adam, ...) are refused: the unrolling is SGD's.

    For loops you do not own (e.g. :func:`forwardinf.training.train_classifier`), use
    :meth:`recording`, which watches which training examples each forward pass consumed.

    Storage is ``O(p T / every)``: a copy of the trainable parameters every ``every`` steps (kept
    on ``device``); with ``every > 1`` the steps in between reuse the latest copy as their ``θ_{t-1}``
    (an approximation, like TracIn's checkpoints, for models too big to snapshot every step).
    ``buffers=True`` also keeps the buffers (BatchNorm statistics).
    """

    def __init__(self, model: nn.Module, *, every: int = 1, buffers: bool = False,
                 device: str | torch.device = "cpu") -> None:
        check_positive("TrajectoryRecorder", "every", every, integer=True)
        self.model = model
        self.every = every
        self.buffers = buffers
        self.device = device
        self.steps_: list[Step] = []

    def __len__(self) -> int:
        return len(self.steps_)

    def __call__(self, indices: Any, optimizer: torch.optim.Optimizer | None = None, **kw: Any) -> None:
        self.record(indices, optimizer, **kw)

    def record(self, indices: Any, optimizer: torch.optim.Optimizer | None = None, *, lr: float | None = None,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
               reduction: str = "mean") -> None:
        """Record the step about to be taken on the batch of training positions ``indices [B]``."""
        check_choice("TrajectoryRecorder", "reduction", reduction, REDUCTIONS)
        idx = torch.as_tensor(indices).detach().reshape(-1).to("cpu", torch.long)
        if idx.numel() == 0:
            raise ValueError("TrajectoryRecorder: a step with an empty batch")
        if idx.min() < 0:
            raise ValueError(f"TrajectoryRecorder: negative training index {int(idx.min())}")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if optimizer is not None:
            hyper = self._from_optimizer(optimizer, named)
        else:
            if lr is None:
                raise ValueError("TrajectoryRecorder.record: pass the optimizer or lr=")
            check_positive("TrajectoryRecorder", "lr", lr)
            fresh = len(self.steps_) == 0
            hyper = {n: (float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), fresh)
                     for n, _ in named}
        if len(self.steps_) % self.every == 0:
            state = {n: p.detach().to(self.device, copy=True) for n, p in named}
            if self.buffers:
                state.update({n: b.detach().to(self.device, copy=True) for n, b in self.model.named_buffers()})
        else:
            state = self.steps_[-1].state  # shared, not copied
        weight = 1.0 / idx.numel() if reduction == "mean" else 1.0
        self.steps_.append(Step(state, idx, weight, hyper))

    @staticmethod
    def _from_optimizer(optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]]) -> dict[str, Hyper | None]:
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"TrajectoryRecorder: HyDRA unrolls SGD (momentum, dampening, weight decay, Nesterov); "
                             f"got {type(optimizer).__name__}")
        by_id = {id(p): n for n, p in named}
        hyper: dict[str, Hyper | None] = {n: None for n, _ in named}  # parameters no group updates stay put
        for group in optimizer.param_groups:
            if group.get("maximize", False):
                raise ValueError("TrajectoryRecorder: SGD with maximize=True is not supported")
            for p in group["params"]:
                name = by_id.get(id(p))
                if name is None:
                    continue
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                hyper[name] = (float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                               float(group["weight_decay"]), bool(group["nesterov"]), buf is None)
        return hyper

    @contextlib.contextmanager
    def recording(self, train: DataLike, reduction: str = "mean") -> Iterator[Dataset]:
        """Record every SGD step on the model taken inside the ``with`` block.

        Yields a view of ``train`` that notes which positions are fetched; train on it (a
        ``DataLoader`` over it needs ``num_workers=0``). Each training-mode forward pass of the
        model takes the positions fetched since the previous one as its batch, and each
        ``step()`` of an optimiser over the model's parameters is recorded with that batch::

            with rec.recording(train) as watched:
                train_classifier(model, watched, epochs=30, lr=0.05)
        """
        check_choice("TrajectoryRecorder", "reduction", reduction, REDUCTIONS)
        dataset = as_dataset(train, "train")
        fetched: list[int] = []
        current: dict[str, Tensor] = {}
        own = {id(p) for p in self.model.parameters()}

        def on_forward(_module: nn.Module, args: tuple) -> None:
            if not (self.model.training and torch.is_grad_enabled()):
                return
            idx = torch.tensor(fetched, dtype=torch.long)
            fetched.clear()
            x = args[0] if args else None
            if torch.is_tensor(x) and idx.numel() != x.shape[0]:
                raise RuntimeError(f"TrajectoryRecorder.recording: the forward pass got {x.shape[0]} examples "
                                   f"but {idx.numel()} were fetched from the watched dataset since the last one; "
                                   "train on the dataset yielded by recording() (num_workers=0)")
            current["indices"] = idx

        def on_step(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            if not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
                return
            if "indices" not in current:
                raise RuntimeError("TrajectoryRecorder.recording: optimizer.step() before any training forward pass")
            self.record(current["indices"], optimizer, reduction=reduction)

        h1 = self.model.register_forward_pre_hook(on_forward)
        h2 = register_optimizer_step_pre_hook(on_step)
        try:
            yield _Watched(dataset, fetched)
        finally:
            h1.remove()
            h2.remove()

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the steps to ``path`` (``torch.save``, atomically; loadable with ``weights_only=True``)."""
        atomic_save([{"state": s.state, "indices": s.indices, "weight": s.weight, "hyper": s.hyper}
                    for s in self.steps_], path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> "TrajectoryRecorder":
        rec = cls(model)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        rec.steps_ = [Step(r["state"], r["indices"], float(r["weight"]),
                           {k: (tuple(v) if v is not None else None) for k, v in r["hyper"].items()}) for r in raw]
        return rec


class _Watched(Dataset):
    """``dataset`` that appends every fetched position to ``log``."""

    def __init__(self, dataset: Dataset, log: list[int]) -> None:
        self.dataset = dataset
        self.log = log

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        self.log.append(int(i))
        return self.dataset[i]


# ------------------------------------------------------------------------------ the recursion
def _transition(hp: Hyper | None) -> tuple[np.ndarray, np.ndarray]:
    """``(A [2, 2], c [2])`` with ``(h_t, b_t) = A (h_{t-1}, b_{t-1}) + c s_t`` for one SGD step."""
    if hp is None:  # not updated by the optimiser
        return np.eye(2), np.zeros(2)
    lr, mu, damp, wd, nesterov, fresh = hp
    d = np.array([wd, 0.0, 1.0])  # d_t = λ h + 0 b + s, as coefficients of (h, b, s)
    if mu == 0:
        b_new = np.array([0.0, 1.0, 0.0])
        direction = d
    else:
        b_new = d.copy() if fresh else np.array([(1 - damp) * wd, mu, 1 - damp])
        direction = d + mu * b_new if nesterov else b_new
    h_new = np.array([1.0, 0.0, 0.0]) - lr * direction
    a = np.stack([h_new[:2], b_new[:2]])
    c = np.array([h_new[2], b_new[2]])
    return a, c


def step_coefficients(hypers: Sequence[Hyper | None]) -> np.ndarray:
    """``a [T]``: ``h_T = Σ_t a_t s_t`` for a scalar recursion with per-step settings ``hypers``.

    The adjoint pass ``λ_T = (1, 0)``, ``a_t = λ_t · c_t``, ``λ_{t-1} = A_tᵀ λ_t``.
    """
    out = np.zeros(len(hypers))
    lam = np.array([1.0, 0.0])
    for t in range(len(hypers) - 1, -1, -1):
        a, c = _transition(hypers[t])
        out[t] = lam @ c
        lam = a.T @ lam
    return out


@dataclass(frozen=True, kw_only=True)
class HyDRAConfig(GradientConfig):
    """Every knob of :class:`HyDRA` (see its docstring)."""

    run: TrainingRun | None = None
    hessian: bool = False
    chunk: int = 256


class HyDRA(GradientEstimator):
    """HyDRA leave-one-out estimates from a recorded SGD trajectory (module docstring).

        score(q, i) = -(1/n) ∇ℓ(q; θ_T) · h_i          ``[n_query, n_train]``

    ``θ_T`` is the model as given (the end of the recorded training); ``h_i`` (``hypergradients_``,
    ``[n, D]``) are computed in :meth:`fit` and reused by every query: the incremental cost of a
    query is one gradient and ``n`` dot products.

    Args (all keyword):
        run: a :class:`~forwardinf.baselines.run.TrainingRun` whose ``trajectory`` is a
            :class:`TrajectoryRecorder` (or its list of :class:`Step`, or the path
            :meth:`TrajectoryRecorder.save` wrote) with indices that are positions in the ``train``
            passed to :meth:`fit`. (``trajectory=`` still works, with a ``DeprecationWarning``.)
        params: None for all trainable parameters, glob patterns, or ``"last"`` (the last layer):
            the hypergradients live in this subspace (the others are held fixed).
        hessian: False for the fast (Hessian-free) form, True for the exact unrolling with one
            Hessian-vector product per training point and step.
        batch_size: examples per gradient chunk (query and final-model gradients).
        chunk: training points unrolled together by ``hessian=True`` (memory ``2 · chunk · D``).
        cache_mb: keep the final model's training gradients for :meth:`self_influence` in memory
            if they fit.
        progress: show a progress bar over the steps.

    Gradients are taken in eval mode (dropout off); with ``buffers=True`` in the recorder each
    step uses its own BatchNorm statistics, else the model's. ``self_influence()`` ``[n]`` is
    ``-(1/n) ∇ℓ(z_i; θ_T) · h_i``: how much removing ``z_i`` would raise its own loss.
    """

    # the hypergradients follow the whole training run: not shardable
    capabilities = Capabilities(self_influence="-(1/n) ∇ℓ(z_i; θ_T) · h_i: the diagonal of influence(train)")

    Config = HyDRAConfig
    fit_fields = ("run", "params", "hessian")

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: HyDRAConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`HyDRAConfig`), or ``config=``."""
        if "trajectory" in knobs:
            knobs["run"] = legacy_run(type(self).__name__, knobs.get("run"), {"trajectory": knobs.pop("trajectory")})
        super().__init__(model, task, config, **knobs)

    # -- fit --------------------------------------------------------------------------------
    def _fit(self, train: Any) -> None:
        """Unroll the trajectory: ``hypergradients_ [n_train, D]``."""
        steps = self._steps()
        self._grad_cache_: dict[Any, Tensor] = {}
        n = len(self.train_)
        seen = torch.zeros(n, dtype=torch.bool)
        for t, s in enumerate(steps):
            if int(s.indices.max()) >= n:
                raise ValueError(f"HyDRA: step {t} holds training index {int(s.indices.max())} but train has {n} points")
            seen[s.indices] = True
        if not bool(seen.all()):
            warnings.warn(f"HyDRA: {int((~seen).sum())} training points never appear in the trajectory; "
                          "their influence is 0", stacklevel=2)
        self._own_ = {k: v.detach() for k, v in self.model.state_dict().items()}
        names = list(self._select().keys())
        for s in steps:
            self._select(s.state)  # every step must hold the selected parameters
        self.n_steps_ = len(steps)
        self.hypergradients_ = self._fast(steps, names) if not self.hessian else self._full(steps, names)

    def _state(self, step: Step) -> dict[str, Tensor]:
        return {**self._own_, **step.state}  # buffers a step lacks come from the model

    def _scales(self, steps: Sequence[Step], names: list[str], like: dict[str, Tensor]) -> Tensor:
        """``[T, D]`` fast-form factors ``a_t`` per coordinate (one scalar per parameter tensor)."""
        per_name = {}
        memo: dict[tuple, np.ndarray] = {}
        for name in names:
            key = tuple(s.hyper.get(name) for s in steps)
            if key not in memo:
                memo[key] = step_coefficients(key)
            per_name[name] = memo[key]
        ref = next(iter(like.values()))
        return torch.cat([torch.as_tensor(per_name[k], dtype=ref.dtype)[:, None].expand(-1, like[k].numel())
                          for k in names], 1)

    def _fast(self, steps: Sequence[Step], names: list[str]) -> Tensor:
        n = len(self.train_)
        like = self._select()
        scales = self._scales(steps, names, like)  # [T, D]
        out = torch.zeros(n, G.dim(like), dtype=next(iter(like.values())).dtype, device=self._device())
        device = self._device()
        with mode(self.model, False):
            for t, step in enumerate(tqdm(steps, desc="HyDRA", disable=not self.progress, leave=False)):
                state = self._state(step)
                params, loss_fn = self._select(state), self._loss_fn(state)
                idx = step.indices
                for a in range(0, len(idx), self.batch_size):
                    part = idx[a:a + self.batch_size]
                    g = G.per_example_grads(loss_fn, params, to_device(gather(self.train_, part.tolist()), device))
                    out.index_add_(0, part.to(device), g * (scales[t].to(device) * (n * step.weight)))
        return out

    def _full(self, steps: Sequence[Step], names: list[str]) -> Tensor:
        n = len(self.train_)
        like = self._select()
        device = self._device()
        dtype = next(iter(like.values())).dtype
        d = G.dim(like)
        # Per-coordinate transition entries for every step: [T, 6, D].
        rows = []
        for step in steps:
            blocks = []
            for k in names:
                a, c = _transition(step.hyper.get(k))
                entry = torch.tensor([a[0, 0], a[0, 1], a[1, 0], a[1, 1], c[0], c[1]], dtype=dtype)
                blocks.append(entry[:, None].expand(6, like[k].numel()))
            rows.append(torch.cat(blocks, 1))
        coef = torch.stack(rows).to(device)
        out = torch.zeros(n, d, dtype=dtype, device=device)
        total = len(steps) * ((n + self.chunk - 1) // self.chunk)
        with mode(self.model, False), tqdm(total=total, desc="HyDRA (Hessian)", disable=not self.progress, leave=False) as bar:
            for start in range(0, n, self.chunk):
                members = torch.arange(start, min(start + self.chunk, n))
                h = torch.zeros(len(members), d, dtype=dtype, device=device)
                b = torch.zeros_like(h)
                for t, step in enumerate(steps):
                    state = self._state(step)
                    params, loss_fn = self._select(state), self._loss_fn(state)
                    batch = to_device(gather(self.train_, step.indices.tolist()), device)
                    # The batch objective is Σ_j w ℓ_j = (w |B|) × the mean the HVP differentiates.
                    s = G.batch_hvp(loss_fn, params, batch, h) * (step.weight * batch_len(batch))
                    inside = (step.indices >= start) & (step.indices < start + len(members))
                    if bool(inside.any()):
                        pos = step.indices[inside]
                        g = G.per_example_grads(loss_fn, params, to_device(gather(self.train_, pos.tolist()), device))
                        s.index_add_(0, (pos - start).to(device), g * (n * step.weight))
                    hh, hb, bh, bb, ch, cb = coef[t]
                    h, b = hh * h + hb * b + ch * s, bh * h + bb * b + cb * s
                    bar.update(1)
                out[members.to(device)] = h
        return out

    # -- influence --------------------------------------------------------------------------
    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` scores, or ``[n_train]`` for the mean query loss (``joint``)."""
        self._check_fitted()
        qset = self._load_queries(queries)
        params, loss_fn = self._select(), self._loss_fn()
        gq = self._grads(qset, loss_fn, params, "query gradients")  # [Q, D] at θ_T
        if joint:
            gq = gq.mean(0, keepdim=True)
        scores = -(gq @ self.hypergradients_.T) / len(self.train_)
        scores = scores.cpu()
        return scores[0] if joint else scores

    def self_influence(self) -> Tensor:
        """``[n_train]``: ``-(1/n) ∇ℓ(z_i; θ_T) · h_i``."""
        self._check_fitted()
        params, loss_fn = self._select(), self._loss_fn()
        out = torch.empty(len(self.train_), dtype=self.hypergradients_.dtype)
        for start, g in self._train_grad_blocks("final", loss_fn, params):
            h = self.hypergradients_[start:start + g.shape[0]]
            out[start:start + g.shape[0]] = (-(g * h).sum(1) / len(self.train_)).cpu()
        return out

    def _check_params(self) -> None:
        name = type(self).__name__
        if not isinstance(self.hessian, bool):
            raise ValueError(f"{name}: invalid hessian={self.hessian!r}; expected True or False")
        check_positive(name, "chunk", self.chunk, integer=True)
        self._check_common()
        self._steps(load=False)

    def _steps(self, load: bool = True) -> list[Step]:
        """The recorded steps of ``run.trajectory`` (read onto the model when it is a path and
        ``load``; else only checked to exist)."""
        name = type(self).__name__
        if self.run is not None and not isinstance(self.run, TrainingRun):
            raise TypeError(f"{name}: run must be a TrainingRun, got {type(self.run).__name__}")
        traj = self.run.trajectory if self.run is not None else None
        if isinstance(traj, (str, os.PathLike)):
            if not load:
                if not os.path.isfile(traj):
                    raise ValueError(f"{name}: trajectory file {os.fspath(traj)!r} does not exist")
                return []
            traj = TrajectoryRecorder.load(traj, self.model)
        steps = traj.steps_ if isinstance(traj, TrajectoryRecorder) else traj
        if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, Step) for s in steps):
            raise ValueError(f"{name}: trajectory must be a TrajectoryRecorder with recorded steps (or a list of Step); "
                             f"got {type(traj).__name__}" + (" with no steps" if isinstance(traj, TrajectoryRecorder) else ""))
        return list(steps)
