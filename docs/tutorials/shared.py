"""What the digit tutorials share: scikit-learn's digits (shipped with scikit-learn, no download),
a small MLP and its training loop, the figure folder, and how a tutorial is run.

Every tutorial script has ``main(fast, out) -> dict`` (its measured numbers) and runs as
``python docs/tutorials/<name>.py [--fast] [--out DIR]``: the full run writes its figures and
``<name>.json`` into ``docs/assets/tutorials`` (the pages show those), ``--fast`` (or the
environment variable ``FORWARDINF_TUTORIAL_FAST=1``) a smaller version that the default test run
executes.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tutorials"


def load_digits(n_train: int, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(x_train [n_train, 64], y_train), (x_test [rest, 64], y_test)``: the 1,797 8x8 digits, pixels
    scaled to [0, 1], shuffled with ``seed``."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = torch.tensor(d.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[order], dtype=torch.long)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def mlp(seed: int = 0, hidden: int = 64) -> nn.Module:
    """A 64-``hidden``-10 MLP with a fixed initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(x: torch.Tensor, y: torch.Tensor, epochs: int = 300, seed: int = 0, hidden: int = 64) -> nn.Module:
    """Full-batch Adam (lr 1e-2) on cross-entropy: a second or less on one core; returns it in eval mode."""
    model = mlp(seed, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def image(ax, x: torch.Tensor, title: str = "", color: str = "black") -> None:
    """Show one flat 8x8 digit on a matplotlib axis."""
    ax.imshow(x.reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run(name: str, main: Callable[[bool, Path], dict]) -> dict:
    """The command line of a tutorial script: parse ``--fast`` / ``--out``, run, write ``<name>.json``."""
    p = argparse.ArgumentParser(description=f"the {name} tutorial")
    p.add_argument("--fast", action="store_true", help="the small version the default test run executes")
    p.add_argument("--out", type=Path, default=ASSETS, help=f"folder for the figures and {name}.json")
    args = p.parse_args()
    fast = args.fast or os.environ.get("FORWARDINF_TUTORIAL_FAST") == "1"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # same numbers on every machine size
    numbers = main(fast, args.out)
    (args.out / f"{name}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(json.dumps(numbers, indent=2))
    return numbers
