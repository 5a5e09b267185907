"""The `Task` contract: how a batch becomes per-example losses."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor


class Task:
    """How a model and a batch become per-example losses.

    Subclasses implement one method, :meth:`loss`. ``model`` is any callable with the
    user's module signature: the module itself, or a functional view of it with other
    parameters (see :func:`forwardinf.core.params.bind`), so a task must only *call* it.
    ``batch`` is whatever the data yields (e.g. ``(inputs, targets)`` or a dict), with a
    leading batch dimension on every tensor.

    Estimators may vmap over :meth:`loss`, so it must avoid Python control flow that
    depends on tensor values; put such checks in :meth:`validate`.
    """

    def loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """Per-example loss, ``Tensor[B]``. The only method a task must implement."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, batch)")

    def query_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """Scalar objective of an update on a query set; the mean per-example loss."""
        return self.loss(model, batch).mean()

    def score_loss(self, model: Callable[..., Any], batch: Any) -> Tensor:
        """Per-example quantity whose change Forward-INF scores, ``Tensor[B]``.

        Defaults to :meth:`loss`. Tasks whose loss saturates on well-fitted examples
        (cross-entropy) return a non-saturating relative with the same gradient direction.
        """
        return self.loss(model, batch)

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        """Raise ``ValueError`` naming the problem if ``batch`` cannot be scored."""
