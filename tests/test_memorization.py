"""Memorization experiment: ground-truth helpers on hand-made cases, and the pipeline on a tiny case."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import forwardinf as fi
from forwardinf.baselines.retraining import Downsampling
from forwardinf.data.loaders import load_digits, subset
from forwardinf.experiments import memorization
from forwardinf.experiments.memorization import (agreement, all_ranks, correctness, fz_influence, nan_argmax,
                                                 split_half)
from forwardinf.metrics import target_ranks
from forwardinf.workloads.trainers import SubsetTrainer


def test_ranks_count_ties_against_the_method_and_nan_argmax():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert target_ranks(s, torch.tensor([1, 0])).tolist() == [1, 4]  # 4-way tie: last of the four
    assert target_ranks(s, torch.tensor([2, 3])).tolist() == [3, 4]
    r = all_ranks(s)
    assert r[0].tolist() == [4.0, 1.0, 3.0, 3.0] and r[1].tolist() == [4.0] * 4
    assert r.gather(1, torch.tensor([[1], [0]]))[:, 0].tolist() == target_ranks(s, torch.tensor([1, 0])).tolist()
    idx, val = nan_argmax(torch.tensor([[float("nan"), 0.2, 0.1], [0.3, float("nan"), 0.7]]))
    assert idx.tolist() == [1, 2] and val.tolist() == pytest.approx([0.2, 0.7])


def test_agreement_hand_made():
    gt = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # gt top 0
                       [0.0, 0.2, 0.1, 0.0],   # gt top 1 (low influence)
                       [0.0, 0.0, 0.0, 0.5]])  # gt top 3
    sc = torch.tensor([[5.0, 1.0, 0.0, 2.0],   # pick 0: agree, rank 1
                       [3.0, 1.0, 2.0, 0.0],   # pick 0: disagree, gt top at rank 3
                       [0.0, 4.0, 3.0, 2.0]])  # pick 1: disagree, gt top at rank 3
    a = agreement(sc, gt)
    assert a["n"] == 3 and a["top1"] == pytest.approx(1 / 3)
    assert a["mean_rank"] == pytest.approx(7 / 3) and a["median_rank"] == 3
    assert a["gt_influence_of_pick"] == pytest.approx((0.9 + 0.0 + 0.0) / 3)
    high = agreement(sc, gt, gt.max(1).values > 0.4)
    assert high["n"] == 2 and high["top1"] == 0.5 and high["top5"] == 1.0
    assert agreement(sc, gt, torch.zeros(3, dtype=torch.bool)) == {"n": 0}
    # Ties in the ground truth (a test point no training point affects): each tied top equally likely.
    flat = agreement(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.zeros(1, 4))
    assert flat["top1"] == pytest.approx(0.25) and flat["mean_rank"] == pytest.approx(2.5)
    two = agreement(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    assert two["top1"] == pytest.approx(0.5) and two["mean_rank"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="shape"):
        agreement(sc[:, :3], gt)


def test_fz_influence_hand_made():
    # 4 models, 3 training points, 2 queries.
    masks = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    correct = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.float64)
    inf = fz_influence(correct, masks)
    # point 0: in models 0,1 -> query0 correct (1+1)/2, out 2,3 -> 0: influence 1.
    assert inf[0, 0] == 1.0 and inf[1, 0] == pytest.approx(0.5 - 0.5)
    # point 2 is in models 0,2,3 (out: model 1).
    assert inf[0, 2] == pytest.approx(1 / 3 - 1) and inf[1, 2] == pytest.approx(1 / 3 - 1)
    all_in = fz_influence(correct, torch.ones(4, 3, dtype=torch.bool))
    assert torch.isnan(all_in).all()
    a, b = split_half(correct, masks)
    assert a.shape == b.shape == (2, 3)


@pytest.mark.filterwarnings("ignore:Downsampling")
def test_downsampling_matches_own_contrast(tmp_path):
    """Our correctness-based contrast reproduces the library's Feldman-Zhang estimate exactly."""
    split = subset(load_digits(), n_train=120, n_test=20, seed=0)
    trainer = SubsetTrainer("mlp", tuple(split.input_shape), 10, recipe=dict(epochs=3, lr=0.05, batch_size=64))
    ds = Downsampling(trainer, fi.ClassificationTask(), n_models=6, fraction=0.5, metric="accuracy", seed=0,
                      cache_dir=tmp_path)
    ds.fit(split.train())
    ours = fz_influence(correctness(ds.models_, *split.test()), ds.masks_)
    theirs = ds.influence(split.test())
    assert torch.allclose(torch.nan_to_num(ours, 9.0), torch.nan_to_num(theirs.double(), 9.0))


@pytest.mark.filterwarnings("ignore:Downsampling")
def test_pipeline_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    memorization.add_arguments(parser)
    args = parser.parse_args(["--n-train", "150", "--n-test", "20", "--n-models", "6", "--epochs", "5",
                              "--methods", "forward-inf,forward-inf-paper", "--pairs", "3"])
    args.dataset, args.data_root, args.out, args.seed, args.quiet = "digits", None, str(tmp_path), 0, True
    res = memorization.run(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "memorization" and saved["config"]["n_test"] == 20
    assert set(saved["methods"]) == {"forward-inf", "forward-inf-paper", "ground-truth"}
    for name in ("forward-inf", "forward-inf-paper"):
        m = saved["methods"][name]
        assert 0.0 <= m["top1"] <= 1.0 and 1.0 <= m["all"]["median_rank"] <= 150
        assert m["all"]["n"] == saved["methods"]["ground-truth"]["n_defined"] <= 20 and m["seconds"] > 0 and m["speedup_vs_ground_truth"] > 0
    assert saved["methods"]["ground-truth"]["n_models"] == 6
    assert (tmp_path / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "queries.html").read_text().count("<table>") == 3
    assert res["methods"]["forward-inf"]["top1"] == saved["methods"]["forward-inf"]["top1"]
    assert "memorization of GT top" in (tmp_path / "report.md").read_text()


def test_unknown_method_fails_fast(tmp_path):
    parser = argparse.ArgumentParser()
    memorization.add_arguments(parser)
    args = parser.parse_args(["--methods", "forward-inf,bogus"])
    args.dataset, args.data_root, args.out, args.seed, args.quiet = "digits", None, str(tmp_path), 0, True
    with pytest.raises(ValueError, match="bogus"):
        memorization.run(args)
    assert not (tmp_path / "cache").exists()  # nothing trained
