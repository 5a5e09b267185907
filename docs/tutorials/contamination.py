"""Tutorial: find test-set contamination (exact and near-duplicate copies of training digits).

A test set of digits is contaminated: some test points are copies of training points, exact or
slightly altered (1-pixel shifts, noise, crops). Forward-INF explains each test point by its
training data; a contaminated point's top training point is its source, with a cosine score near 1.

    python docs/tutorials/contamination.py          # full run: figures into docs/assets/tutorials
    python docs/tutorials/contamination.py --fast   # the small version the tests run
"""
from __future__ import annotations

from pathlib import Path

import torch

import forwardinf as fi
from forwardinf import metrics
from forwardinf.data.augment import near_duplicates

import shared as dm


def main(fast: bool, out: Path) -> dict:
    n_clean, n_exact, n_near = (20, 10, 10) if fast else (150, 50, 50)
    (x_train, y_train), (x_test, y_test) = dm.load_digits(n_train=1000)
    model = dm.train(x_train, y_train, epochs=150 if fast else 300)

    # The contaminated test set: clean test digits, exact copies of training digits, and
    # near-duplicates (shift, crop, noise, jpeg) of other training digits.
    g = torch.Generator().manual_seed(0)
    src = torch.randperm(len(x_train), generator=g)[: n_exact + n_near]
    exact = x_train[src[:n_exact]]
    images = x_train[src[n_exact:]].reshape(-1, 1, 8, 8)  # near_duplicates works on NCHW images
    near = near_duplicates(images, kind="mix", seed=0).reshape(n_near, 64)
    queries = torch.cat([x_test[:n_clean], exact, near])
    labels = torch.cat([y_test[:n_clean], y_train[src]])
    leaked = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_exact + n_near, dtype=torch.bool)])

    # Forward-INF with its defaults (cosine score): fit once on the training set, then one
    # update per query and a forward sweep; top_k streams over the training set.
    est = fi.ForwardINF(model, fi.ClassificationTask()).fit((x_train, y_train))
    top = est.top_k((queries, labels), k=3)

    # 1. Which training point is each leaked query a copy of? (T-1: its source ranks first)
    found = top.indices[n_clean:, 0] == src
    # 2. Which queries are leaked at all? A copy is much closer to its source than to any other
    # training point: compare the cosine distance (1 - score) of the nearest and second-nearest
    # training points (a ratio test); the top-1 score alone is a weaker detector.
    distance = (1 - top.scores).clamp_min(1e-6)  # [n_query, 3]
    ratio = (distance[:, 1] / distance[:, 0]).log10()
    best = top.scores[:, 0]
    numbers = {
        "n_train": len(x_train), "n_clean": n_clean, "n_exact": n_exact, "n_near": n_near,
        "test_accuracy": round(dm.accuracy(model, x_test, y_test), 4),
        "top1_exact": round(float(found[:n_exact].float().mean()), 4),
        "top1_near": round(float(found[n_exact:].float().mean()), 4),
        "detection_auc_top1_score": round(metrics.roc_auc(best, leaked), 4),
        "detection_auc_ratio": round(metrics.roc_auc(ratio, leaked), 4),
        "detection_auc_ratio_near_only": round(metrics.roc_auc(
            torch.cat([ratio[:n_clean], ratio[n_clean + n_exact:]]),
            torch.cat([torch.zeros(n_clean), torch.ones(n_near)])), 4),
        "min_top1_score_exact": round(float(best[n_clean:n_clean + n_exact].min()), 4),
        "max_top1_score_clean": round(float(best[:n_clean].max()), 4),
    }
    _figures(out, queries, ratio, n_clean, n_exact, top, x_train)
    return numbers


def _figures(out: Path, queries, ratio, n_clean, n_exact, top, x_train) -> None:
    plt = dm.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    groups = [(ratio[:n_clean], "clean test digits"), (ratio[n_clean:n_clean + n_exact], "exact copies"),
              (ratio[n_clean + n_exact:], "near-duplicates")]
    top_bin = float(ratio.max()) + 0.1
    for values, label in groups:
        ax.hist(values.numpy(), bins=40, range=(0, top_bin), alpha=0.6, label=label)
    ax.set_xlabel("log10(distance of 2nd / distance of 1st training point), distance = 1 - score")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "contamination_scores.png", dpi=110)
    plt.close(fig)

    # three queries of each kind with their top-3 training digits
    rows = [0, 1, n_clean, n_clean + 1, n_clean + n_exact, n_clean + n_exact + 1]
    fig, axes = plt.subplots(len(rows), 4, figsize=(4.4, 1.25 * len(rows)))
    for r, q in enumerate(rows):
        kind = "clean" if q < n_clean else ("exact" if q < n_clean + n_exact else "near")
        dm.image(axes[r, 0], queries[q], f"query ({kind})")
        for j in range(3):
            dm.image(axes[r, j + 1], x_train[top.indices[q, j]], f"#{j + 1}: {float(top.scores[q, j]):.2f}")
    fig.tight_layout()
    fig.savefig(out / "contamination_topk.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    dm.run("contamination", main)
