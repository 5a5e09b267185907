"""Representer points (Yeh et al. 2018; survey section 5.1.2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from forwardinf.baselines.gradient import GradientEstimator
from forwardinf.core.params import mode
from forwardinf.data.inputs import DataLike, batches, gather, to_device
from forwardinf.estimators.base import Capabilities, EstimatorConfig, check_choice, check_positive
from forwardinf.tasks.base import Task

TARGETS = ("label", "prediction")


@dataclass(frozen=True, kw_only=True)
class RepresenterPointConfig(EstimatorConfig):
    """Every knob of :class:`RepresenterPoint` (see its docstring)."""

    head: str = "auto"
    l2: float = 1e-3
    target: str = "label"
    max_iter: int = 500
    batch_size: int = 256
    progress: bool = False


class RepresenterPoint(GradientEstimator):
    """Representer point selection: ``score(q, i) = α_i[c_q] · (f_i · f_q)``.

    ``f`` is the input of the model's last linear layer (the ``head``), with a constant 1
    appended so the head's bias is part of the same linear map ``Θ = [W, b]``. Following Yeh et
    al., the backbone is frozen and the head is re-fitted (L-BFGS from the trained head, then a
    few Newton steps for heads up to 2048 weights; float64) to the stationary point of the
    L2-regularised objective

        ``(1/n) Σ_i ℓ(Θ f_i, y_i) + λ ||Θ||²``       (``λ = l2``, bias included),

    where the representer theorem gives exactly ``Θ* = Σ_i α_i f_iᵀ`` with
    ``α_i = -1/(2λn) ∂ℓ(Θ* f_i, y_i)/∂logits``  (``[n, C]``), so the re-fitted logits of a query
    decompose into one term per training point, ``Θ* f_q = Σ_i α_i (f_i · f_q)``. The score is
    that term in class ``c_q``: the query's label (``target="label"``) or the re-fitted head's
    prediction (``"prediction"``). Positive = the training point pushes the query towards ``c_q``
    (proponent). The user's model is not changed; the re-fitted head lives in ``head_weight_``.

    Needs a classifier whose head is an ``nn.Linear`` producing the logits, and batches
    ``(inputs, targets, ...)`` or dicts with ``"inputs"``/``"targets"``; the task's loss is
    applied to the head's logits (features are passed to it in place of the inputs).

    Args (all keyword):
        head: name of the last linear layer (as in ``model.named_modules()``), or ``"auto"``:
            the last ``nn.Linear`` registered.
        l2: ``λ``, the L2 strength of the re-fit (Yeh et al.'s objective, no factor 1/2).
        target: ``"label"`` or ``"prediction"`` (which class of the query is explained).
        max_iter: L-BFGS iterations of the re-fit (per restart; up to 5 restarts).
        batch_size: examples per feature-extraction batch.
        progress: unused (features are one forward sweep); kept for a uniform signature.

    ``self_influence()`` is ``α_i[y_i] ||f_i||²``: the training point's own term in its label's logit.
    """

    Config = RepresenterPointConfig
    fit_fields = ("head", "l2", "max_iter")
    # the head is re-fitted on the whole training set: a slice would give another head
    capabilities = Capabilities(self_influence="α_i[y_i] ||f_i||²: the diagonal of influence(train)")

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: RepresenterPointConfig | None = None,
                 **knobs: Any) -> None:
        """Every knob a keyword (the fields of :class:`RepresenterPointConfig`), or ``config=``."""
        super().__init__(model, task, config, **knobs)

    def _fit(self, train: Any) -> None:
        """Extract features, re-fit the head with L2 to stationarity, compute ``alpha_ [n, C]``."""
        first = gather(self.train_, [0])
        if isinstance(first, dict) and "inputs" not in first:  # e.g. {input_ids, attention_mask, labels}
            raise ValueError("RepresenterPoint: train must be (inputs, targets) batches or dicts with 'inputs'; "
                             f"keyword batches ({', '.join(sorted(first))}) are not supported: the head's input "
                             "features are taken from the model's positional input")
        self.head_name_, head = self._head()
        feats, rest = self._features(self.train_)  # [n, d+1] float64
        theta0 = torch.cat([head.weight.detach(), _bias(head)[:, None]], 1).double().to(feats.device)
        theta = theta0.clone().requires_grad_(True)
        n, lam = feats.shape[0], float(self.l2)

        def objective(t: Tensor) -> Tensor:
            return self._losses(feats @ t.T, feats, rest).mean() + lam * t.pow(2).sum()

        opt = torch.optim.LBFGS([theta], lr=1, max_iter=self.max_iter, tolerance_grad=1e-10,
                                tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        with torch.enable_grad():
            for _ in range(5):  # L-BFGS stops on small changes; restart it until the gradient vanishes
                opt.step(closure)
                if theta.grad is not None and float(theta.grad.norm()) < 1e-10:
                    break
            theta = theta.detach()
            if theta.numel() <= 2048:
                theta = _newton_polish(objective, theta)
            logits = (feats @ theta.T).requires_grad_(True)
            (dlogits,) = torch.autograd.grad(self._losses(logits, feats, rest).sum(), logits)
            theta_g = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(objective(theta_g), theta_g)
        self.head_weight_ = theta  # [C, d+1], last column the bias
        self.alpha_ = -dlogits / (2 * lam * n)  # [n, C]
        self.features_ = feats
        self.labels_ = _targets(rest).to(feats.device)
        # ||∇ objective|| at the re-fit: how exactly Θ* = Σ α_i f_iᵀ holds (0 at stationarity).
        self.stationarity_ = float(g.norm())

    def influence(self, queries: DataLike, joint: bool = False) -> Tensor:
        """``[n_query, n_train]`` representer scores, or ``[n_train]`` their mean over queries (``joint``)."""
        self._check_fitted()
        qset = self._load_queries(queries)
        fq, rest = self._features(qset)
        if self.target == "label":
            classes = _targets(rest).to(fq.device)
        else:
            classes = (fq @ self.head_weight_.T).argmax(1)
        n_classes = self.alpha_.shape[1]
        if (classes < 0).any() or (classes >= n_classes).any():
            raise ValueError(f"queries: labels must be in [0, {n_classes})")
        scores = self.alpha_[:, classes].T * (fq @ self.features_.T)  # [Q, n]
        scores = scores.float().cpu()
        return scores.mean(0) if joint else scores

    def self_influence(self) -> Tensor:
        """``[n_train]``: ``α_i[y_i] ||f_i||²``."""
        self._check_fitted()
        own = self.alpha_.gather(1, self.labels_[:, None]).squeeze(1)
        return (own * self.features_.pow(2).sum(1)).float().cpu()

    # -- helpers ----------------------------------------------------------------------------
    def _head(self) -> tuple[str, nn.Linear]:
        modules = dict(self.model.named_modules())
        if self.head == "auto":
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linear:
                raise ValueError("RepresenterPoint: the model has no nn.Linear layer; pass head=<name>")
            name = linear[-1]
        else:
            name = self.head
            if name not in modules:
                raise ValueError(f"RepresenterPoint: no module named {name!r}")
            if not isinstance(modules[name], nn.Linear):
                raise ValueError(f"RepresenterPoint: head {name!r} is a {type(modules[name]).__name__}, not nn.Linear")
        return name, modules[name]

    def _features(self, dataset: Any) -> tuple[Tensor, Any]:
        """``([n, d+1] float64 head inputs with a trailing 1, the batch without its inputs)``."""
        _, head = self._head()
        device = self._device()
        captured: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().flatten(1)))
        try:
            with torch.no_grad(), mode(self.model, False):
                for _, batch in batches(dataset, self.batch_size):
                    batch = to_device(batch, device)
                    self.model(_inputs(batch))
        finally:
            handle.remove()  # the model leaves with no hook attached
        feats = torch.cat(captured, 0).double()
        if feats.shape[0] != len(dataset):
            raise ValueError(f"RepresenterPoint: head {self.head_name_!r} ran {feats.shape[0]} times the batch "
                             f"for {len(dataset)} examples; it must run once per example")
        ones = torch.ones(feats.shape[0], 1, dtype=feats.dtype, device=feats.device)
        return torch.cat([feats, ones], 1), _without_inputs(to_device(gather(dataset, range(len(dataset))), device))

    def _losses(self, logits: Tensor, feats: Tensor, rest: Any) -> Tensor:
        """Per-example task loss of the head's ``logits`` (the task sees the features as inputs)."""
        return self.task.loss(lambda _: logits, _with_inputs(rest, feats))

    def _check_params(self) -> None:
        name = type(self).__name__
        check_positive(name, "l2", self.l2)
        check_choice(name, "target", self.target, TARGETS)
        check_positive(name, "max_iter", self.max_iter, integer=True)
        check_positive(name, "batch_size", self.batch_size, integer=True)
        self._head()


def _newton_polish(objective: Any, theta: Tensor, steps: int = 3) -> Tensor:
    """A few Newton steps on the strongly convex re-fit: L-BFGS's line search stalls near
    ``||∇|| ≈ 1e-8`` (objective changes below float64 resolution); Newton needs no line search."""
    def grad_norm(t: Tensor) -> tuple[Tensor, float]:
        t = t.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(t), t)
        return g, float(g.norm())

    g, norm = grad_norm(theta)
    for _ in range(steps):
        if norm < 1e-13:
            break
        h = torch.autograd.functional.hessian(objective, theta, vectorize=True).reshape(theta.numel(), theta.numel())
        candidate = theta - torch.linalg.solve(h, g.reshape(-1)).view_as(theta)
        g_new, norm_new = grad_norm(candidate)
        if not norm_new < norm:
            break
        theta, g, norm = candidate, g_new, norm_new
    return theta


def _bias(head: nn.Linear) -> Tensor:
    return head.bias.detach() if head.bias is not None else torch.zeros(head.out_features, device=head.weight.device)


def _inputs(batch: Any) -> Any:
    return batch["inputs"] if isinstance(batch, dict) else batch[0]


def _targets(rest: Any) -> Tensor:
    return rest["targets"] if isinstance(rest, dict) else rest[1]


def _without_inputs(batch: Any) -> Any:
    """The batch with its inputs dropped (kept as a placeholder so positions stay)."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "inputs"}
    return (None, *batch[1:])


def _with_inputs(rest: Any, inputs: Tensor) -> Any:
    if isinstance(rest, dict):
        return {**rest, "inputs": inputs}
    return (inputs, *rest[1:])
