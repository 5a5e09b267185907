"""Tutorial: find mislabelled training digits with Forward-INF's self mode.

10% of the training labels are flipped to another class and the model is trained on them (it
memorises most of the wrong labels). The paper's self mode, ``influence(train, joint=True)``,
makes one joint update on the whole training set and scores each point by how much the rest of the data *supports* it: a wrong label
has no support, so the **lowest** scores are inspected first.

    python docs/tutorials/mislabel.py          # full run: figures into docs/assets/tutorials
    python docs/tutorials/mislabel.py --fast   # the small version the tests run
"""
from __future__ import annotations

from pathlib import Path

import torch

import forwardinf as fi
from forwardinf import metrics

import shared as dm


def main(fast: bool, out: Path) -> dict:
    n_train = 500 if fast else 1200
    (x_train, y_true), (x_test, y_test) = dm.load_digits(n_train=n_train)
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(n_train, generator=g)[: n_train // 10]
    y_noisy = y_true.clone()
    y_noisy[flipped] = (y_true[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10  # another class
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    # trained long enough to memorise the wrong labels (as large networks do), which hides them from the loss
    model = dm.train(x_train, y_noisy, epochs=800 if fast else 1500, hidden=128)

    # Self mode with the margin score: the change of each point's (non-saturating) margin after
    # one ascent step on the whole training set. Low = the rest of the data does not support it.
    est = fi.ForwardINF(model, fi.ClassificationTask(), score="margin").fit((x_train, y_noisy))
    support = est.influence((x_train, y_noisy), joint=True)  # [n_train]: the paper's self mode
    suspicion = -support            # inspect the lowest support first

    # The simplest baseline: each point's training loss (high = suspicious).
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x_train), y_noisy, reduction="none")

    numbers = {
        "n_train": n_train, "n_flipped": len(flipped),
        "fits_flipped_labels": round(dm.accuracy(model, x_train[flipped], y_noisy[flipped]), 4),
        "test_accuracy": round(dm.accuracy(model, x_test, y_test), 4),
        "forward_inf_found_at_10pct": round(metrics.found_at(suspicion, is_flipped, 0.10), 4),
        "forward_inf_found_at_20pct": round(metrics.found_at(suspicion, is_flipped, 0.20), 4),
        "forward_inf_auc": round(metrics.roc_auc(suspicion, is_flipped), 4),
        "forward_inf_auc_highest_first": round(metrics.roc_auc(support, is_flipped), 4),
        "loss_found_at_20pct": round(metrics.found_at(loss, is_flipped, 0.20), 4),
        "loss_auc": round(metrics.roc_auc(loss, is_flipped), 4),
    }
    _figures(out, suspicion, loss, is_flipped, x_train, y_noisy, model)
    return numbers


def _figures(out: Path, suspicion, loss, is_flipped, x_train, y_noisy, model) -> None:
    plt = dm.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for s, label in [(suspicion, "Forward-INF self mode (lowest support first)"), (loss, "training loss (highest first)")]:
        inspected, found = metrics.detection_curve(s, is_flipped)
        ax.plot(inspected, found, label=label)
    ax.plot([0, 1], [0, 1], "k:", label="random order")
    ax.axvline(float(is_flipped.float().mean()), color="grey", lw=0.5)
    ax.set_xlabel("fraction of the training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "mislabel_curve.png", dpi=110)
    plt.close(fig)

    # the 8 most suspicious digits, with their given label and the model's prediction
    order = suspicion.argsort(descending=True)[:8]
    with torch.no_grad():
        pred = model(x_train[order]).argmax(1)
    fig, axes = plt.subplots(1, 8, figsize=(8, 1.6))
    for ax, i, p in zip(axes, order.tolist(), pred.tolist()):
        color = "red" if is_flipped[i] else "black"
        dm.image(ax, x_train[i], f"label {int(y_noisy[i])}\n{'flipped' if is_flipped[i] else 'clean'}", color)
    fig.tight_layout()
    fig.savefig(out / "mislabel_top.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    dm.run("mislabel", main)
