"""Mislabel experiment: label flipping, detection metrics on hand-made rankings, a tiny end-to-end run."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from forwardinf.experiments import mislabel
from forwardinf.data.labels import flip_labels
from forwardinf.experiments.mislabel import detection_metrics, oracle_found_at


@pytest.mark.parametrize("n,fraction,classes", [(1347, 0.2, 10), (2000, 0.2, 10), (101, 0.33, 3), (50, 1.0, 2), (7, 0.0, 4)])
def test_flip_exact_fraction_other_class(n, fraction, classes):
    y = torch.arange(n) % classes
    noisy, flipped = flip_labels(y, fraction, classes, seed=3)
    assert int(flipped.sum()) == round(fraction * n)
    assert (noisy[flipped] != y[flipped]).all()  # always a different class
    assert torch.equal(noisy[~flipped], y[~flipped])  # the rest untouched
    assert noisy.min() >= 0 and noisy.max() < classes
    assert torch.equal(y, torch.arange(n) % classes)  # input not modified


def test_flip_reproducible_and_seeded():
    y = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a, fa = flip_labels(y, 0.2, 10, seed=1)
    b, fb = flip_labels(y, 0.2, 10, seed=1)
    c, fc = flip_labels(y, 0.2, 10, seed=2)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.equal(fa, fc)


def test_flip_targets_uniform_over_other_classes():
    y = torch.zeros(30000, dtype=torch.long)
    noisy, flipped = flip_labels(y, 0.9, 4, seed=0)
    counts = torch.bincount(noisy[flipped], minlength=4).double()
    assert counts[0] == 0
    share = counts[1:] / counts.sum()  # 27,000 draws: each of the 3 others ~1/3 (sd ~0.003)
    assert (share - 1 / 3).abs().max() < 0.015


def test_flip_bad_input():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(y, 1.5, 3)
    with pytest.raises(ValueError, match="n_classes"):
        flip_labels(y, 0.5, 1)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        flip_labels(y, 0.5, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        flip_labels(torch.zeros(3, 2), 0.5, 3)


def test_detection_metrics_hand_made():
    # 20 points, 4 flipped (20%).
    flipped = np.zeros(20, bool)
    flipped[[2, 5, 11, 17]] = True
    perfect = flipped.astype(float) + np.linspace(0, 0.1, 20)
    m = detection_metrics(perfect, flipped)
    # 15% of 20 = 3 inspected, all flipped: 3 of 4 found = the oracle.
    assert m["found_at_15pct"] == pytest.approx(0.75) == pytest.approx(oracle_found_at(0.2, 0.15))
    assert m["auc"] == 1.0 and m["found_at_nflip"] == 1.0
    assert m["inspect_for_80pct"] == pytest.approx(4 / 20)  # 80% of 4 -> the 4th point
    worst = detection_metrics(-perfect, flipped)
    assert worst["found_at_15pct"] == 0.0 and worst["auc"] == 0.0 and worst["inspect_for_80pct"] == 1.0
    # Hand-made order: inspect 2, 0, 5, 1, 11, 3, 17, rest.
    order = [2, 0, 5, 1, 11, 3, 17] + [i for i in range(20) if i not in (2, 0, 5, 1, 11, 3, 17)]
    scores = np.empty(20)
    scores[order] = np.arange(20, 0, -1)
    m = detection_metrics(scores, flipped)
    assert m["found_at_15pct"] == pytest.approx(2 / 4)  # 2, 0, 5
    assert m["found_at_nflip"] == pytest.approx(2 / 4)  # 2, 0, 5, 1
    assert m["inspect_for_80pct"] == pytest.approx(7 / 20)  # 4th flipped found at position 7
    # AUC: each flipped point vs the 16 clean: 2 beats 16, 5 beats 15, 11 beats 14, 17 beats 13.
    assert m["auc"] == pytest.approx((16 + 15 + 14 + 13) / 64)
    # All tied: expected random order.
    tied = detection_metrics(np.zeros(20), flipped)
    assert tied["auc"] == 0.5 and tied["found_at_15pct"] == pytest.approx(0.15)


def test_detection_metrics_needs_both_classes():
    with pytest.raises(ValueError, match="flipped and clean"):
        detection_metrics(np.arange(5.0), np.zeros(5, bool))


def test_end_to_end_tiny(tmp_path):
    """Digits subset, short training: the report, figure and schema; Forward-INF beats random."""
    parser = argparse.ArgumentParser()
    mislabel.add_arguments(parser)
    args = parser.parse_args(["--n-train", "300", "--epochs", "10", "--checkpoints", "2",
                              "--methods", "forward-inf-margin,forward-inf-margin-cp,loss,random"])
    args.dataset, args.data_root, args.out, args.seed, args.quiet = "digits", None, str(tmp_path), 0, True
    res = mislabel.run(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "mislabel" and saved["dataset"] == "digits"
    assert set(saved["methods"]) == {"forward-inf-margin", "forward-inf-margin-cp", "loss", "random"}
    assert saved["config"]["n_flipped"] == 60
    for m in saved["methods"].values():
        assert {"found_at_15pct", "auc", "seconds"} <= set(m)
    assert (tmp_path / "detection_curve.png").read_bytes()[:4] == b"\x89PNG"
    fi_ = res["methods"]["forward-inf-margin"]
    # Max is 0.75; a random order finds ~0.15 (sd ~0.05 here).
    assert fi_["found_at_15pct"] > 0.4 and fi_["auc"] > 0.8
    # A second run loads the cached model instead of retraining: identical numbers.
    res2 = mislabel.run(args)
    assert res2["methods"]["forward-inf-margin"]["auc"] == fi_["auc"]
    # --option changes that method alone, on the same cached model; loss/random take none.
    args.methods, args.option = "forward-inf-margin,random", ["forward-inf-margin.score='loss'"]
    res3 = mislabel.run(args)
    assert res3["config"]["options"] == {"forward-inf-margin": {"score": "loss"}}
    assert res3["methods"]["forward-inf-margin"]["auc"] != fi_["auc"]
    assert res3["methods"]["random"]["auc"] == res["methods"]["random"]["auc"]
    args.option = ["random.seed=3"]
    with pytest.raises(ValueError, match="no --option"):
        mislabel.run(args)


def test_unknown_method(tmp_path):
    parser = argparse.ArgumentParser()
    mislabel.add_arguments(parser)
    args = parser.parse_args(["--methods", "forward-inf,bogus"])
    args.dataset, args.data_root, args.out, args.seed, args.quiet = "digits", None, str(tmp_path), 0, True
    with pytest.raises(ValueError, match="bogus"):
        mislabel.run(args)


def test_cli_asks_for_the_plots_extra_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    import sys

    from forwardinf.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec gives None
    assert main(["mislabel", "--out", str(tmp_path), "--quiet"]) == 2
    assert "pip install 'forwardinf[plots]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work
