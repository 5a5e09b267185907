"""What a training run leaves behind: :class:`TrainingRun`, for the estimators that look at the
training and not only at the trained model.

- TracIn reads the saved ``checkpoints`` and the learning rate in force after each (``lrs``);
- HyDRA reads the recorded ``trajectory`` (:class:`~forwardinf.baselines.hydra.TrajectoryRecorder`);
- leave-one-out, leave-group-out, test-to-train, Downsampling and TMC-Shapley retrain with the
  training function ``train_fn(data, seed) -> nn.Module`` (:mod:`forwardinf.baselines.retraining`),
  cached under a hash of ``recipe`` (what identifies the training; default ``train_fn`` itself).

One value serves every estimator (``make_estimator(name, model, run=run)``): each reads the fields
it needs and refuses a run that lacks them with a ``ValueError`` naming the field.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from torch import nn
from torch.utils.data import Dataset

__all__ = ["TrainFn", "TrainingRun", "legacy_run", "training_function"]

TrainFn = Callable[[Dataset, int], nn.Module]


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainingRun:
    """One training run: its end point and what was kept along the way (every field optional).

    model: the trained model (the run's end point), ``[D]`` parameters.
    checkpoints: saved states, oldest first: state dicts, or paths written by
        ``torch.save(model.state_dict(), path)``.
    lrs: the learning rate in force after each checkpoint (TracIn's step size ``η_c``), one per
        checkpoint (one in all when there are none: the model's own); None = 1 each.
    trajectory: the :class:`~forwardinf.baselines.hydra.TrajectoryRecorder` of the model's SGD
        training (or its list of steps, or the path ``TrajectoryRecorder.save`` wrote).
    train_fn: the training recipe, ``train_fn(data, seed) -> nn.Module`` (deterministic in
        ``(data, seed)``; picklable for worker processes, see :mod:`forwardinf.baselines.retraining`).
    recipe: what identifies ``train_fn`` in cache keys (default: ``train_fn``'s own content); pass
        it when ``train_fn`` holds state that does not change the training.

    Checked on construction: ``lrs`` matches ``checkpoints``, ``train_fn`` is callable. Compared
    by identity (it holds tensors).
    """

    model: nn.Module | None = None
    checkpoints: Sequence[Any] = ()
    lrs: Sequence[float] | None = None
    trajectory: Any = None
    train_fn: TrainFn | None = None
    recipe: Any = None

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, nn.Module):
            raise TypeError(f"TrainingRun: model must be an nn.Module, got {type(self.model).__name__}")
        if self.checkpoints is None or isinstance(self.checkpoints, (str, os.PathLike, dict)):
            raise TypeError("TrainingRun: checkpoints must be a sequence of state dicts or paths, oldest first")
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if self.lrs is not None:
            lrs = tuple(self.lrs)
            if len(lrs) != max(len(self.checkpoints), 1):
                raise ValueError(f"TrainingRun: {len(lrs)} lrs for {len(self.checkpoints)} checkpoints")
            object.__setattr__(self, "lrs", lrs)
        if self.train_fn is not None and not callable(self.train_fn):
            raise ValueError("TrainingRun: train_fn must be callable as train_fn(data, seed) -> nn.Module, "
                             f"got {type(self.train_fn).__name__}")

    def last(self, k: int) -> "TrainingRun":
        """The same run with only its last ``k`` checkpoints (and their ``lrs``)."""
        lrs = self.lrs[-k:] if self.lrs is not None and self.checkpoints else self.lrs
        return TrainingRun(**{**self._given(), "checkpoints": self.checkpoints[-k:], "lrs": lrs})

    def require(self, owner: str, name: str) -> Any:
        """Field ``name``, refused with a ``ValueError`` naming ``owner`` when the run lacks it."""
        value = getattr(self, name)
        if value is None or (name == "checkpoints" and not value):
            raise ValueError(f"{owner} needs {name}= in its TrainingRun ({_NEEDS[name]})")
        return value

    def _given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:  # short: no tensors
        shown = []
        for k, v in self._given().items():
            if k == "checkpoints" and v:
                shown.append(f"checkpoints=<{len(v)}>")
            elif k == "lrs" and v is not None:
                shown.append(f"lrs={list(v)}")
            elif v is not None and k != "checkpoints":
                shown.append(f"{k}=<{type(v).__name__}>")
        return f"TrainingRun({', '.join(shown)})"


_NEEDS = {
    "model": "the trained model",
    "checkpoints": "saved training checkpoints, oldest first",
    "trajectory": "a TrajectoryRecorder of the model's SGD training, or the path TrajectoryRecorder.save wrote",
    "train_fn": "train_fn(data, seed) -> nn.Module",
    "lrs": "the learning rate after each checkpoint",
    "recipe": "what identifies train_fn",
}


def legacy_run(owner: str, run: Any, old: dict[str, Any]) -> Any:
    """``run``, or a :class:`TrainingRun` from the old catch-all keywords in ``old`` (``checkpoints=``,
    ``lrs=``, ``trajectory=``, ``train_fn=``; a retraining estimator's ``config=`` is ``recipe``),
    with a ``DeprecationWarning``; both at once is a ``TypeError``."""
    old = {k: v for k, v in old.items() if v is not None}
    if not old:
        return run
    if run is not None:
        raise TypeError(f"{owner}: give run=TrainingRun(...) or the old keywords {sorted(old)}, not both")
    new = ", ".join(f"{'recipe' if k == 'config' else k}=..." for k in old)
    warnings.warn(f"{owner}: the keywords {sorted(old)} are deprecated; pass run=TrainingRun({new})",
                  DeprecationWarning, stacklevel=4)
    return TrainingRun(**{("recipe" if k == "config" else k): v for k, v in old.items()})


def training_function(owner: str, run: Any) -> TrainFn:
    """``run.train_fn``, refused with a ``ValueError`` naming ``owner`` when ``run`` has none."""
    if not isinstance(run, TrainingRun):
        raise ValueError(f"{owner} needs run=TrainingRun(train_fn=...): a training function train_fn(data, seed) "
                         f"-> nn.Module, got {type(run).__name__}")
    return run.require(owner, "train_fn")
