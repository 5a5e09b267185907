"""Augmentation-invariant Forward-INF: one update per query on the mean over its augmented views.

A near-duplicate of a training image (shifted, mirrored) has a gradient unlike its source's, so
plain Forward-INF, which moves the model along the query's own gradient, no longer ranks the source
first. A model trained with crop+flip augmentation has seen each training image under every small
shift and both mirrorings; :class:`InvariantForwardINF` therefore updates on the mean objective over
the same family of views of the query (every shift in ``[-shift, shift]^2``, each also mirrored):
the views of a shifted / mirrored copy include (nearly) its source itself, and the update no longer
depends on which member of the family the query happens to be.

Mirror images are handled apart by default (``flip="max"``): a second update on the mirrored
query's views, and each training point keeps the better of its two scores, because a shift moves
the gradient far less than a mirror does and one average over both families dilutes the update.

Cost: the views multiply only the backward passes on the queries (``V`` per query, batched); the
training set is swept by forward passes once per update, i.e. twice per query with
``flip="max"`` (once with ``"mean"`` or ``False``) against once for :class:`ForwardINF`.

The engine is ForwardINF's own: the views ride in the query batch as an extra input dimension
``[Q, V, C, H, W]`` that :class:`ViewAveragedTask` folds into the batch and averages out, so the
update is ``θ_q = θ ± lr · ∇ mean_v m(θ, view_v(q))`` (gradient of the mean loss over views).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from forwardinf.data.augment import default_shift, views
from forwardinf.data.inputs import DataLike, gather
from forwardinf.estimators.base import check_choice
from forwardinf.estimators.forward_inf import ForwardINF, ForwardINFConfig
from forwardinf.tasks.base import Task
from forwardinf.tasks.classification import ClassificationTask


class ViewAveragedTask(Task):
    """``task`` on batches whose image inputs may carry views: ``(inputs [B, V, C, H, W], targets
    [B], ...)`` -> per-example values ``[B]``, each the mean over its ``V`` views; plain image
    batches ``[B, C, H, W]`` pass through to ``task`` unchanged. Batches are ``(inputs, targets,
    ...)`` tuples; every element after the inputs is repeated per view."""

    def __init__(self, task: Task) -> None:
        self.task = task

    @staticmethod
    def _fold(batch: Any) -> tuple[Any, int]:
        """``(batch with views folded into the batch dim [B V, ...], V)``; ``V = 0``: no views."""
        if not isinstance(batch, (tuple, list)) or not torch.is_tensor(batch[0]) or batch[0].dim() != 5:
            return batch, 0
        inputs = batch[0]
        b, v = inputs.shape[:2]
        rest = [t.unsqueeze(1).expand(b, v, *t.shape[1:]).reshape(b * v, *t.shape[1:]) for t in batch[1:]]
        return (inputs.reshape(b * v, *inputs.shape[2:]), *rest), v

    def _averaged(self, fn: Callable[[Any, Any], Tensor], model: Any, batch: Any) -> Tensor:
        folded, v = self._fold(batch)
        values = fn(model, folded)
        return values if v == 0 else values.reshape(-1, v).mean(1)

    def loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        return self._averaged(self.task.loss, model, batch)

    def score_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        return self._averaged(self.task.score_loss, model, batch)

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        self.task.validate(model, self._fold(batch)[0])


@dataclass(frozen=True, kw_only=True)
class InvariantForwardINFConfig(ForwardINFConfig):
    """Every knob of :class:`InvariantForwardINF`: ``shift``, ``flip`` and those of :class:`ForwardINF`."""

    shift: int | None = None
    flip: bool | str = "max"


class InvariantForwardINF(ForwardINF):
    """Forward-INF whose query update averages over shifted (and mirrored) views of each query.

    Args (keyword; the rest as :class:`ForwardINF`):
        shift: largest translation in pixels of the views (every offset in ``[-shift, shift]^2``);
            None (default): the near-duplicate shift's own default (``data.augment.default_shift``),
            2 px on 28x28 / 32x32 images.
        flip: how mirror images count: ``"max"`` (default) one more update per query on the
            mirrored query's views, each training point scored by the better of the two (two
            forward sweeps per query instead of one); ``True`` / ``"mean"`` the mirrored views join
            the one average (one sweep); ``False`` no mirrors (digits, letters).

    Queries are ``(inputs [Q, C, H, W], targets [Q])``; each update averages over
    ``views_per_query_ = (2 shift + 1)^2`` views (twice that with ``flip="mean"``); each query
    costs ``updates_per_query_`` forward sweeps of the training set (ForwardINF: 1).
    """

    Config = InvariantForwardINFConfig

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: ForwardINFConfig | None = None,
                 **knobs: Any) -> None:
        task = task if task is not None else ClassificationTask()
        super().__init__(model, task if isinstance(task, ViewAveragedTask) else ViewAveragedTask(task),
                         config=config, **knobs)

    # The hooks of ForwardINF's one scoring path (ForwardINF._blocks), so influence, top_k and
    # self_influence all update on the views: a query set becomes its views (and its mirror
    # image's views), an update a pair of updates, a pair's score the better of the two.
    def _check_params(self) -> None:
        super()._check_params()
        name = type(self).__name__
        check_choice(name, "flip", self.flip, FLIPS)
        if self.shift is not None and (not isinstance(self.shift, int) or isinstance(self.shift, bool) or self.shift < 0):
            raise ValueError(f"{name}: invalid shift={self.shift!r}; expected None or an integer >= 0")

    def _load_train(self, train: DataLike) -> Any:
        """As ForwardINF's; the training examples must be images ``[C, H, W]`` (a 5-D batch would
        be taken for views)."""
        dataset = super()._load_train(train)
        _check_images(gather(dataset, [0]), "train")
        return dataset

    def _queries(self, queries: DataLike) -> Views:
        """The queries' views ``(inputs [Q, V, C, H, W], targets [Q], ...)``, checked, and with
        ``flip="max"`` the mirrored queries' views too."""
        qset = self._dataset(queries, "queries")
        batch = gather(qset, range(len(qset)))
        _check_images(batch, "queries")
        h, w = batch[0].shape[-2:]
        shift = default_shift(h) if self.shift is None else self.shift
        if shift >= min(h, w):
            raise ValueError(f"InvariantForwardINF: shift must be an int in 0..{min(h, w) - 1} for {h}x{w} queries, "
                             f"got {self.shift!r}")
        flip = FLIPS[self.flip]
        stacked = views(batch[0], shift, flip == "mean")  # [Q, V, C, H, W]
        self.views_per_query_ = stacked.shape[1]
        plain = super()._queries((stacked, *batch[1:]))
        self.updates_per_query_ = 2 if flip == "max" else 1
        if flip != "max":
            return Views(plain, None)
        return Views(plain, super()._queries((views(batch[0].flip(-1), shift, False), *batch[1:])))

    def _updates(self, qset: Views) -> Iterator[tuple[int, Any]]:  # type: ignore[override]
        plain = super()._updates(qset.plain)
        if qset.mirrored is None:
            yield from plain
            return
        for (start, a), (_, b) in zip(plain, super()._updates(qset.mirrored)):
            yield start, Mirrored(a, b)

    def _update_joint(self, qset: Views) -> Any:  # type: ignore[override]
        a = super()._update_joint(qset.plain)
        return a if qset.mirrored is None else Mirrored(a, super()._update_joint(qset.mirrored))

    def _score(self, update: Any, rows: Tensor | None = None) -> Tensor:
        """Scores ``[Q, n]``; for a :class:`Mirrored` pair each training point's better score."""
        if isinstance(update, Mirrored):
            return torch.maximum(super()._score(update.plain, rows), super()._score(update.mirrored, rows))
        return super()._score(update, rows)


def _check_images(batch: Any, name: str) -> None:
    """``batch`` must be ``(floating images [B, C, H, W], targets [B], ...)``."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else None
    if not torch.is_tensor(inputs) or inputs.dim() != 4 or not inputs.is_floating_point():
        got = f"{tuple(inputs.shape)} of {inputs.dtype}" if torch.is_tensor(inputs) else type(batch).__name__
        raise ValueError(f"{name}: InvariantForwardINF needs (floating images [B, C, H, W], targets [B], ...); got {got}")


# flip setting -> how the mirrored views count: None (not at all), one "mean", or apart ("max")
FLIPS: dict[Any, str | None] = {"max": "max", "mean": "mean", True: "mean", False: None}


class Views(NamedTuple):
    """The queries' views, and the mirrored queries' views (None unless ``flip="max"``)."""

    plain: Any
    mirrored: Any


class Mirrored(NamedTuple):
    """The updates on a query chunk's views and on its mirror image's views."""

    plain: Any
    mirrored: Any
