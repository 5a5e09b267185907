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
