"""Tutorial: predict what removing training data does, and measure it (the LDS).

Attribution scores make a prediction: a model retrained without a subset of the training data
should lose, on a query, the sum of the removed points' scores. The linear datamodeling score
(LDS) checks it: retrain on random halves of the training set, measure each query's correct-class
margin, and take the Spearman correlation between the summed scores and the measured margins.

    python docs/tutorials/lds.py          # full run: figures into docs/assets/tutorials
    python docs/tutorials/lds.py --fast   # the small version the tests run
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import forwardinf as fi
from forwardinf import metrics

import shared as dm


def margin(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[Q]`` correct-class logit minus the log-sum-exp of the others (higher = more confident)."""
    with torch.no_grad():
        z = model(x)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z.gather(1, y[:, None])[:, 0] - others.logsumexp(1)


def main(fast: bool, out: Path) -> dict:
    n_train, n_queries, n_subsets = (200, 10, 24) if fast else (400, 50, 100)
    epochs = 200
    (x_train, y_train), (x_test, y_test) = dm.load_digits(n_train=n_train)
    queries = (x_test[:n_queries], y_test[:n_queries])
    model = dm.train(x_train, y_train, epochs=epochs)

    # Ground truth: the same recipe (same initialisation) retrained on random halves.
    subsets = metrics.random_subsets(n_train, n_subsets, fraction=0.5, seed=0)  # bool [M, n_train]
    outputs = torch.stack([margin(dm.train(x_train[m], y_train[m], epochs=epochs), *queries)
                           for m in torch.as_tensor(subsets)])  # [M, Q]

    task = fi.ClassificationTask()
    estimators = {
        "counterfactual": fi.ForwardINF.preset("counterfactual", model, task),  # K-FAC-preconditioned step
        "default (cosine)": fi.ForwardINF(model, task),                          # identification score
        "TracIn, final model": fi.TracIn(model, task),                           # gradient dot product
    }
    numbers: dict = {"n_train": n_train, "n_queries": n_queries, "n_subsets": n_subsets}
    per_query = {}
    for name, est in estimators.items():
        scores = est.fit((x_train, y_train)).influence(queries)  # [Q, n_train]
        per_query[name] = metrics.lds_per_query(scores, subsets, outputs)
        numbers[f"lds {name}"] = round(metrics.lds(scores, subsets, outputs), 4)
    _figure(out, per_query)
    return numbers


def _figure(out: Path, per_query: dict) -> None:
    plt = dm.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3))
    names = list(per_query)
    ax.boxplot([v[~np.isnan(v)] for v in per_query.values()], orientation="horizontal")
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Spearman correlation per query (LDS = its mean)")
    fig.tight_layout()
    fig.savefig(out / "lds_per_query.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    dm.run("lds", main)
