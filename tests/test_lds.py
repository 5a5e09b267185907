"""`forwardinf lds`: the LDS and datamodel on an exactly linear problem, the subset sampler,
resuming and refusing the retraining cache, the bootstrap interval, and a tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from forwardinf import metrics as M
from forwardinf.cli import build_parser, main
from forwardinf.experiments import lds


# ----------------------------------------------------------------- an exactly linear world
class OneStep:
    """A linear model trained by ONE full-batch gradient step from zero on the summed squared loss:
    θ(S) = η Σ_{i∈S} y_i x_i, so the query output x_qᵀθ(S) is exactly linear in the subset."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, data, seed: int) -> nn.Module:
        x, y = data.tensors
        model = nn.Linear(x.shape[1], 1, bias=False).double()
        nn.init.zeros_(model.weight)
        loss = 0.5 * ((model(x).squeeze(-1) - y) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            model.weight -= self.lr * model.weight.grad
        return model


class QueryOutput:
    def __init__(self, xq: torch.Tensor) -> None:
        self.xq = xq

    def __call__(self, model: nn.Module) -> dict:
        with torch.no_grad():
            return {"output": model(self.xq).squeeze(-1)}


@pytest.fixture(scope="module")
def linear_world(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    n, d, q, m, lr = 14, 6, 4, 80, 0.1
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    xq = torch.randn(q, d, generator=g, dtype=torch.float64)
    masks = M.random_subsets(n, m, 0.5, seed=3)
    out = lds.retrain_outputs(OneStep(lr), (x, y), QueryOutput(xq), masks, 1, 0,
                              cache_dir=tmp_path_factory.mktemp("linear"))
    tau = (lr * y[None, :] * (xq @ x.T)).numpy()  # [Q, N]: the exact attribution η y_i x_q·x_i
    return masks, out["output"][:, 0], tau


def test_the_exact_attribution_has_lds_one_and_wrong_ones_do_not(linear_world):
    masks, outputs, tau = linear_world
    np.testing.assert_allclose(outputs, masks @ tau.T, atol=1e-10)  # the retraining really is linear
    assert M.lds(tau, masks, outputs) == pytest.approx(1.0)
    assert M.lds(-tau, masks, outputs) == pytest.approx(-1.0)
    random = np.random.default_rng(1).normal(size=tau.shape)
    assert abs(M.lds(random, masks, outputs)) < 0.5
    np.testing.assert_allclose(M.lds_per_query(tau, masks, outputs), 1.0)


def test_the_fitted_datamodel_recovers_the_exact_attribution(linear_world):
    masks, outputs, tau = linear_world
    fit = lds.n_fit(len(masks), 0.25)
    dm = M.fit_datamodel(masks[:fit], outputs[:fit])
    # fixed-size subsets cannot tell a constant shift of all weights from the intercept
    centred = dm.weights - dm.weights.mean(1, keepdims=True)
    np.testing.assert_allclose(centred, tau - tau.mean(1, keepdims=True), atol=1e-3)
    assert M.lds(dm.weights, masks[fit:], outputs[fit:]) == pytest.approx(1.0)
    assert dm.alpha == dm.alphas.min()  # noiseless: the least penalty wins the cross-validation


def test_datamodel_refuses_bad_input():
    masks = M.random_subsets(10, 6, 0.5, seed=0)
    with pytest.raises(ValueError, match="folds"):
        M.fit_datamodel(masks, np.zeros(6), folds=7)
    with pytest.raises(ValueError, match="share M"):
        M.fit_datamodel(masks, np.zeros(5))


# --------------------------------------------------------------------------- the sampler
def test_the_subset_sampler_is_seeded_and_grows_by_appending():
    a = M.random_subsets(50, 12, 0.3, seed=4)
    assert (a.sum(1) == 15).all()
    np.testing.assert_array_equal(a, M.random_subsets(50, 12, 0.3, seed=4))
    assert not np.array_equal(a, M.random_subsets(50, 12, 0.3, seed=5))
    np.testing.assert_array_equal(a[:7], M.random_subsets(50, 7, 0.3, seed=4))  # more subsets extend the list


def test_bootstrap_interval_contains_the_estimate_and_widens_with_the_level():
    v = np.random.default_rng(0).normal(0.3, 0.2, size=150)
    lo, hi = M.bootstrap_interval(v, 2000)
    assert lo < v.mean() < hi and hi - lo < 0.1
    lo99, hi99 = M.bootstrap_interval(v, 2000, level=0.99)
    assert lo99 < lo and hi99 > hi
    assert M.bootstrap_interval(np.r_[v, np.nan], 2000) == M.bootstrap_interval(v, 2000)  # NaN queries dropped
    with pytest.raises(ValueError, match="level"):
        M.bootstrap_interval(v, level=1.0)


# ------------------------------------------------------------------- the retraining cache
def _args(out, *extra):
    argv = ["lds", "--out", str(out), "--n-queries", "10", "--epochs", "2", "--quiet", "--subsets", "8", *extra]
    return lds.apply_defaults(build_parser().parse_args(argv))


def test_resuming_gives_the_numbers_of_an_uninterrupted_run(tmp_path):
    whole = _args(tmp_path / "whole", "--subsets", "12")
    masks, full = lds.ground_truth(whole, lds.load_problem(whole), False)
    part = _args(tmp_path / "part")  # "killed" after 8 of the 12 subsets
    lds.ground_truth(part, lds.load_problem(part), False)
    assert len(list((tmp_path / "part" / "ground_truth").glob("*.pt"))) == 8
    part.subsets = 12
    masks2, resumed = lds.ground_truth(part, lds.load_problem(part), False)
    assert len(list((tmp_path / "part" / "ground_truth").glob("*.pt"))) == 12
    np.testing.assert_array_equal(masks, masks2)
    for key in ("margin", "loss"):
        assert resumed[key].shape == (12, 1, 10)
        np.testing.assert_array_equal(resumed[key], full[key])


def test_a_cache_of_another_configuration_is_refused(tmp_path):
    args = _args(tmp_path)
    lds.ground_truth(args, lds.load_problem(args), False)
    other = _args(tmp_path, "--alpha", "0.4")
    with pytest.raises(ValueError, match="different configuration.*alpha"):
        lds.ground_truth(other, lds.load_problem(other), False)


def test_bad_options_are_refused(tmp_path, capsys):
    assert main(["lds", "--out", str(tmp_path), "--subsets", "4", "--quiet"]) == 2
    assert "--subsets" in capsys.readouterr().err
    assert main(["lds", "--out", str(tmp_path), "--checkpoint", "x.pt", "--quiet"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------ the method cache
def test_a_method_is_keyed_by_the_sources_it_runs_and_not_by_the_others(tmp_path):
    import shutil

    root = tmp_path / "forwardinf"
    shutil.copytree(lds._ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    tail, grad = ["forwardinf.estimators.tail"], ["forwardinf.baselines.tracin"]
    names = {str(f.relative_to(root)) for f in lds.method_sources(tail, root)}
    assert {"estimators/tail.py", "estimators/forward_inf.py", "core/curvature.py", "tasks/classification.py"} <= names
    assert not names & {"experiments/lds.py", "experiments/leakage.py", "baselines/tracin.py", "cli.py", "__init__.py"}

    def keys() -> tuple[str, str]:
        return tuple(lds.code_fingerprint(lds.method_sources(m, root), root) for m in (tail, grad))

    before = keys()
    assert keys() == before
    with open(root / "experiments" / "leakage.py", "a") as f:  # an unrelated edit: nothing recomputes
        f.write("\n# edited\n")
    assert keys() == before
    with open(root / "estimators" / "tail.py", "a") as f:  # the tail estimator's code: only it recomputes
        f.write("\n# edited\n")
    after = keys()
    assert after[0] != before[0] and after[1] == before[1]
    with open(root / "core" / "params.py", "a") as f:  # shared by every method
        f.write("\n# edited\n")
    assert all(a != b for a, b in zip(keys(), after))


def test_a_method_key_follows_its_options_and_its_presets_settings(tmp_path):
    args = _args(tmp_path)
    prepared = lds.load_problem(args).prepared
    key = lambda name, opts=None: lds.method_key(name, opts, prepared, {"model": "m"})  # noqa: E731
    assert key("forward-inf-counterfactual") == key("forward-inf-counterfactual")
    assert key("forward-inf-counterfactual") != key("forward-inf-counterfactual", {"damping": 0.1})
    assert key("forward-inf-counterfactual") != key("forward-inf-influence")  # the preset's settings differ
    assert key("grad-dot") != key("grad-dot", {"queries": 5})


# ------------------------------------------------------------------------------ end to end
def test_cli_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    argv = ["lds", "--out", str(out), "--subsets", "16", "--n-queries", "24", "--epochs", "8", "--quiet",
            "--in-process", "--methods", "forward-inf-loss,if-exact,grad-dot,grad-dot@again,trak,grad-dot@few",
            "--option", "grad-dot@again.normalize=True", "--option", "grad-dot@few.queries=10"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "lds" and res["dataset"] == "digits"
    rows = res["methods"]
    assert set(rows) == {"datamodel", "forward-inf-loss", "if-exact", "grad-dot", "grad-dot@again", "trak",
                         "grad-dot@few"}
    gt = res["config"]["ground_truth"]
    assert gt["models"] == 16 and gt["cpu_seconds"] > 0
    for name in ("forward-inf-loss", "if-exact", "grad-dot"):
        r = rows[name]
        for t in ("margin", "loss"):
            lo, hi = r[f"lds_{t}_ci"]
            assert -1 <= lo <= r[f"lds_{t}"] <= hi <= 1
        assert r["cpu_seconds"] > 0 and r["peak_mb"] > 0
    assert rows["if-exact"]["lds_margin"] > 0.2  # influence functions predict retraining on digits
    assert rows["grad-dot@again"]["lds_margin"] != rows["grad-dot"]["lds_margin"]  # its own options
    assert "lds_margin" in rows["trak"] or rows["trak"]["error"].startswith("not installed")
    assert "lds_margin_heldout" in rows["datamodel"]
    assert "| if-exact |" in (out / "report.md").read_text()
    per_query = np.load(out / "lds_per_query.npz")
    assert per_query["if-exact/lds_margin"].shape == (24,)
    # the capped method: its LDS is grad-dot's on the first 10 queries, and its row says so
    assert rows["grad-dot@few"]["n_queries"] == 10 and "first 10" in rows["grad-dot@few"]["note"]
    np.testing.assert_allclose(per_query["grad-dot@few/lds_margin"], per_query["grad-dot/lds_margin"][:10])

    # rerun: ground truth and scores come from the caches, the numbers are identical
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == rows


def test_a_method_runs_in_its_own_process(tmp_path):
    argv = ["lds", "--out", str(tmp_path), "--subsets", "8", "--n-queries", "10", "--epochs", "2", "--quiet",
            "--methods", "grad-dot"]
    assert main(argv) == 0
    row = json.loads((tmp_path / "results.json").read_text())["methods"]["grad-dot"]
    assert row["cpu_seconds"] > 0 and row["peak_mb"] > row["extra_mb"] >= 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["isolation"] == "one process per method"


def test_an_out_of_memory_result_is_cached_for_its_memory_limit_only(tmp_path, monkeypatch):
    import argparse

    calls = []

    def fake(name, args, options):
        calls.append(args.memory_limit_gb)
        return {"error": "RuntimeError: [enforce fail] DefaultCPUAllocator: can't allocate memory: 25690112 bytes"}

    monkeypatch.setattr(lds, "measure_method", fake)
    args = argparse.Namespace(recompute=False, in_process=True, memory_limit_gb=8.0)
    first = lds.run_method("m", args, None, tmp_path, "key")
    assert first["error"].startswith("out of memory at the 8 GB limit")
    assert lds.run_method("m", args, None, tmp_path, "key")["cached"] and calls == [8.0]  # not rerun
    args.memory_limit_gb = 16.0  # a higher limit may succeed: rerun
    lds.run_method("m", args, None, tmp_path, "key")
    assert calls == [8.0, 16.0]
