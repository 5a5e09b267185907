"""Estimators by name, with per-method defaults for classification networks (``--methods`` of the CLI).

| name | estimator |
|---|---|
| ``forward-inf`` | ``ForwardINF`` with its defaults |
| ``if-100`` / ``if-1000`` / ``if-10000`` | ``InfluenceFunction(solver="lissa", depth=N)`` (the paper's IF-N) |
| ``if-cg`` | ``InfluenceFunction(solver="cg", depth=100)`` |
| ``if-exact`` | ``InfluenceFunction(solver="exact")`` |
| ``tracin-1`` / ``-3`` / ``-5`` | ``TracIn`` (all layers) over the last 1 / 3 / 5 given checkpoints |
| ``tracin-last`` | ``TracIn(params="last")`` over the last (up to) 5 checkpoints, or the model |
| ``grad-cos`` | ``TracIn(normalize=True)`` on the final model (gradient cosine) |
| ``representer`` | ``RepresenterPoint`` |

Influence functions use ``damping="auto"`` (1% of the Hessian's top eigenvalue plus twice its
most negative one, estimated by Lanczos): trained networks have negative curvature, on which a
fixed small damping makes LiSSA diverge and CG stop early.

Parameter subsets: influence functions use every trainable parameter up to
``LARGE_MODEL`` parameters and the last layer beyond (the usual shortcut for big networks,
e.g. a ResNet-18's 11M); ``if-exact`` uses every parameter only up to ``EXACT_ALL`` (the
Hessian is ``D x D``) and the last layer otherwise. TracIn uses every parameter, as in
TracIn-CP, except ``tracin-last``. Any keyword overrides these defaults.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from forwardinf.baselines.influence_function import InfluenceFunction
from forwardinf.baselines.representer import RepresenterPoint
from forwardinf.baselines.tracin import TracIn
from forwardinf.estimators.base import Estimator
from forwardinf.tasks.base import Task

METHODS = ("forward-inf", "if-100", "if-1000", "if-10000", "if-cg", "if-exact",
           "tracin-1", "tracin-3", "tracin-5", "tracin-last", "grad-cos", "representer")

LARGE_MODEL = 1_000_000  # trainable parameters above which influence functions use the last layer
EXACT_ALL = 2_000  # if-exact uses all parameters only up to this many


def make_estimator(name: str, model: nn.Module, task: Task | None = None, *,
                   checkpoints: Sequence[Any] | None = None, **kw: Any) -> Estimator:
    """A fresh, unfitted estimator called ``name`` (one of :data:`METHODS`).

    ``checkpoints``: saved training checkpoints (state dicts or paths), oldest first, for the
    TracIn variants; ``lrs=`` may be given for all of them (it is sliced alongside).
    """
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if key == "forward-inf":
        from forwardinf.estimators.forward_inf import ForwardINF  # lazy: the baselines do not need it

        return ForwardINF(model, task, **kw)
    if key.startswith("if-"):
        solver = {"if-cg": "cg", "if-exact": "exact"}.get(key, "lissa")
        defaults: dict[str, Any] = {"solver": solver, "damping": "auto"}
        if solver == "lissa":
            defaults["depth"] = int(key.split("-")[1])
        if solver == "exact":
            defaults["params"] = None if n_params <= EXACT_ALL else "last"
        else:
            defaults["params"] = None if n_params <= LARGE_MODEL else "last"
        return InfluenceFunction(model, task, **{**defaults, **kw})
    if key.startswith("tracin-") or key == "grad-cos":
        ckpts = list(checkpoints or [])
        lrs = kw.pop("lrs", None)
        if lrs is not None and len(lrs) != len(ckpts):
            raise ValueError(f"{name}: {len(lrs)} lrs for {len(ckpts)} checkpoints")
        if key == "grad-cos":
            return TracIn(model, task, **{"normalize": True, **kw})
        want = 5 if key == "tracin-last" else int(key.split("-")[1])
        if key != "tracin-last" and len(ckpts) < want:
            raise ValueError(f"{name} needs at least {want} checkpoints, got {len(ckpts)}")
        chosen = ckpts[-want:] if ckpts else None
        chosen_lrs = list(lrs)[-want:] if lrs is not None and ckpts else None
        defaults = {"checkpoints": chosen, "lrs": chosen_lrs, "params": "last" if key == "tracin-last" else None}
        return TracIn(model, task, **{**defaults, **kw})
    return RepresenterPoint(model, task, **kw)
