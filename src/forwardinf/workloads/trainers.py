"""Training functions ``train_fn(data, seed) -> nn.Module`` of the retraining experiments (picklable
for worker processes): the attributed model's recipe on a subset (:class:`SubsetTrainer`: lds,
memorization), and the hypothesis study's CNN (:class:`CNNTrainer`, :class:`PairedCNNTrainer`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forwardinf.data.inputs import gather
from forwardinf.models import build_model
from forwardinf.training import train_classifier


@dataclass
class SubsetTrainer:
    """``trainer(data, seed) -> model``: a fresh model trained with the attributed model's recipe.

    ``recipe``: :func:`~forwardinf.training.train_classifier`'s keywords (epochs, lr, batch_size,
    optimizer, weight_decay); ``model_kw``: :func:`~forwardinf.models.build_model`'s (e.g. width).
    Records its own CPU seconds on the model (``fit_cpu_seconds_``; lds reports the ground truth's cost).
    """

    model: str
    input_shape: tuple
    n_classes: int
    model_kw: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # epochs, lr, batch_size, optimizer, weight_decay

    def __call__(self, data: Any, seed: int) -> nn.Module:
        cpu = time.process_time()
        net = build_model(self.model, self.input_shape, self.n_classes, seed=seed, **self.model_kw)
        train_classifier(net, data, seed=seed, **self.recipe)
        net.fit_cpu_seconds_ = time.process_time() - cpu
        return net


@dataclass
class CNNTrainer:
    """Training function ``(data, seed) -> SmallCNN``: the paper's CNN (no BatchNorm) trained by SGD."""

    input_shape: tuple[int, ...]
    n_classes: int
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 64
    width: int = 32

    def _model(self, seed: int) -> nn.Module:
        # 28x28 / 32x32: the classic unpadded layout (fc input 4 * 4 * 64 on MNIST); 8x8 digits need padding.
        padding = 0 if min(self.input_shape[1:]) >= 28 else 2
        return build_model("cnn", self.input_shape, self.n_classes, seed=seed, width=self.width,
                           batchnorm=False, padding=padding)

    def __call__(self, data: Any, seed: int) -> nn.Module:
        x, y = gather(data, range(len(data)))[:2]
        return train_classifier(self._model(seed), (x, y), epochs=self.epochs, lr=self.lr,
                                batch_size=self.batch_size, optimizer="sgd", momentum=self.momentum,
                                weight_decay=self.weight_decay, seed=seed)


@dataclass
class PairedCNNTrainer(CNNTrainer):
    """:class:`CNNTrainer` with common random numbers: every training of one seed shares one schedule.

    ``data`` holds ``(x, y, slot)``: ``slot`` is each example's position in the pool of all
    ``pool_size`` examples that any training may use (training set + D_tst). One seed fixes the
    initialisation and, per epoch, a permutation of the pool's slots cut into ``steps_per_epoch``
    batches; a training on a subset walks the same batches and skips the slots of absent examples
    (each batch's loss is the mean over its present examples). Removing a group or adding D_tst
    therefore changes only the batches those examples sit in, and the SGD noise (initialisation,
    order) cancels in the paired difference ``L(A(D \\ D_i)) - L(A(D))`` instead of adding to it.
    ``steps_per_epoch`` is the base recipe's ``ceil(n_train / batch_size)``, so the base model
    sees batches of ``batch_size`` examples on average, as in :class:`CNNTrainer`.
    """

    pool_size: int = 0
    steps_per_epoch: int = 1

    def __call__(self, data: Any, seed: int) -> nn.Module:
        x, y, slot = gather(data, range(len(data)))[:3]
        if slot.numel() and (int(slot.min()) < 0 or int(slot.max()) >= self.pool_size):
            raise ValueError(f"slots must lie in [0, {self.pool_size}), got {int(slot.min())}..{int(slot.max())}")
        row = torch.full((self.pool_size,), -1, dtype=torch.long)
        row[slot.long()] = torch.arange(len(slot))
        model = self._model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(self.epochs):
                for chunk in torch.tensor_split(torch.randperm(self.pool_size, generator=gen), self.steps_per_epoch):
                    present = row[chunk]
                    present = present[present >= 0]
                    if len(present) == 0:
                        continue
                    loss = F.cross_entropy(model(x[present]), y[present])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return model.eval()
