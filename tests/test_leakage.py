"""`forwardinf leakage` end to end on the embedded digits, and its pieces."""
import json

import pytest
import torch

from forwardinf.cli import main
from forwardinf.experiments.leakage import detection, leaked_queries


def test_detection_counts_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.0, 0.3, 0.9]])
    m = detection(scores, torch.tensor([0, 1, 0]))
    # ranks: 1 (best), 2 (tied with another point: counts against), 3 (last)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == 1.0 and m["mean_rank"] == pytest.approx(2.0)


def test_leaked_queries_are_copies_or_near_copies():
    from forwardinf.data.loaders import load_digits

    split = load_digits()
    idx, x, y = leaked_queries(split, 12, seed=3, near=False)
    assert torch.equal(x, split.x_train[idx]) and torch.equal(y, split.y_train[idx])
    idx2, xn, yn = leaked_queries(split, 12, seed=3, near=True)
    assert torch.equal(idx, idx2) and torch.equal(yn, y)
    assert not torch.equal(xn, x) and xn.shape == x.shape
    with pytest.raises(ValueError, match="--n-queries"):
        leaked_queries(split, 0, seed=0, near=False)


def test_cli_writes_results_report_and_figures(tmp_path):
    out = tmp_path / "run"
    argv = ["leakage", "--out", str(out), "--n-queries", "12", "--epochs", "10", "--quiet",
            "--methods", "forward-inf,forward-inf-paper"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "leakage" and results["dataset"] == "digits"
    assert set(results["methods"]) == {"forward-inf", "forward-inf-paper"}
    fi_row = results["methods"]["forward-inf"]
    assert fi_row["top1"] >= 0.9 and fi_row["top1"] <= fi_row["top5"] <= fi_row["top10"]
    assert fi_row["seconds"] > 0
    assert "forward-inf" in (out / "report.md").read_text()
    assert (out / "queries.png").stat().st_size > 0
    page = (out / "queries.html").read_text()
    assert page.count("<img") > 12 and "base64" in page


def test_cli_refuses_bad_options(tmp_path, capsys):
    assert main(["leakage", "--out", str(tmp_path), "--n-queries", "0", "--quiet"]) == 2
    assert "--n-queries" in capsys.readouterr().err


def test_warm_up_leaves_the_model_untouched():
    from forwardinf.core.params import fingerprint
    from forwardinf.data.loaders import load_digits
    from forwardinf.experiments.common import warm_up

    split = load_digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10)).train()
    before = fingerprint(model)
    warm_up(model, split.train())
    assert model.training  # parameters and BN statistics bit-identical, no gradients left behind:
    assert all(n == m and torch.equal(a, b) for (n, a), (m, b) in zip(before, fingerprint(model)))
    assert all(p.grad is None for p in model.parameters())


def test_method_options_reach_the_named_estimator():
    import argparse

    from forwardinf.experiments.setup import Prepared, make_method, method_options

    args = argparse.Namespace(option=["forward-inf.lr=0.01", "forward-inf.optimizer=adam", "forward-inf.steps=3",
                                      "if-100.damping=0.1"])
    options = method_options(args, ["forward-inf", "if-100"])
    assert options == {"forward-inf": {"lr": 0.01, "optimizer": "adam", "steps": 3}, "if-100": {"damping": 0.1}}
    model = torch.nn.Linear(64, 10)
    prepared = Prepared(split=None, model=model, model_name="linear", accuracy=0.0)
    est = make_method("forward-inf", model, prepared, options=options["forward-inf"])
    assert (est.lr, est.optimizer, est.steps) == (0.01, "adam", 3)
    paper = make_method("forward-inf-paper", model, prepared, options={"steps": 2})
    assert paper.steps == 2 and paper.score == make_method("forward-inf-paper", model, prepared).score
    assert make_method("if-100", model, prepared, options=options["if-100"]).damping == 0.1
    for bad, match in [("forward-inf.lr", "METHOD.KEY=VALUE"), ("tracin-5.lr=1", "not one of --methods")]:
        with pytest.raises(ValueError, match=match):
            method_options(argparse.Namespace(option=[bad]), ["forward-inf"])
    with pytest.raises(ValueError, match="stepz"):
        make_method("forward-inf", model, prepared, options={"stepz": 1})


def test_cli_option_is_applied_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["leakage", "--out", str(out), "--n-queries", "6", "--epochs", "5", "--quiet", "--methods", "forward-inf"]
    assert main([*base, "--option", "forward-inf.score=loss", "--option", "forward-inf.steps=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["options"] == {"forward-inf": {"score": "loss", "steps": 2}}
    assert main([*base, "--option", "forward-inf.stepz=2"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_near_kinds():
    from forwardinf.data.augment import KINDS
    from forwardinf.experiments.leakage import near_kinds

    assert near_kinds(None) == ["exact"] and near_kinds("mix") == ["mix"]
    assert near_kinds("exact, shift+flip") == ["exact", "shift+flip"]
    assert near_kinds("all") == ["exact", *KINDS, "mix"]
    with pytest.raises(ValueError, match="rotate"):
        near_kinds("shift,rotate")


def test_cli_near_kinds_share_one_fit(tmp_path):
    out = tmp_path / "run"
    argv = ["leakage", "--out", str(out), "--n-queries", "8", "--epochs", "10", "--quiet", "--near", "exact,noise,shift",
            "--methods", "forward-inf,forward-inf-invariant,pixel-nn,feature-nn"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["near"] == ["exact", "noise", "shift"]
    for name, row in results["methods"].items():
        assert set(row["kinds"]) == {"exact", "noise", "shift"}, name
        assert row["top1"] == row["kinds"]["exact"]["top1"] and row["fit_cpu_seconds"] >= 0
        assert all(k["query_cost_vs_exact"] > 0 for k in row["kinds"].values())
    rows = results["methods"]
    assert rows["forward-inf"]["kinds"]["exact"]["query_cost_vs_exact"] == 1.0
    assert rows["forward-inf"]["top1"] >= 0.85 and rows["pixel-nn"]["top1"] == 1.0
    assert rows["pixel-nn"]["kinds"]["noise"]["top1"] >= 0.85  # 0.1 std of noise: pixel space still finds it
