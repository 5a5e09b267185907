"""forwardinf.metrics on hand-made rankings with answers worked out by hand."""
import math

import numpy as np
import pytest
import torch

from forwardinf import metrics as M


# ---------------------------------------------------------------------------- top-k / ranking
def test_topk_detection_rate_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 0 ranks 1st
                           [0.2, 0.8, 0.7, 0.1],    # target 2 ranks 2nd
                           [0.4, 0.3, 0.2, 0.1]])   # target 3 ranks 4th
    targets = [0, 2, 3]
    assert M.topk_detection_rate(scores, targets, k=1) == pytest.approx(1 / 3)
    assert M.topk_detection_rate(scores, targets, k=2) == pytest.approx(2 / 3)
    assert M.topk_detection_rate(scores, targets, k=4) == pytest.approx(1.0)
    assert M.topk_detection_rate(scores, torch.tensor(targets), k=10) == 1.0  # k > N is clipped


def test_topk_ties_count_against_the_method():
    # The target is tied with 3 others for first place: it ranks 4th.
    scores = np.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert M.target_ranks(scores, [2]).tolist() == [4]
    assert M.topk_detection_rate(scores, [2], k=3) == 0.0
    assert M.topk_detection_rate(scores, [2], k=4) == 1.0
    # two acceptable targets among the 4 tied: both go after the 2 other tied points
    assert M.target_ranks(scores, [[0, 1]]).tolist() == [3]
    assert M.topk_detection_rate(scores, [[0, 1]], k=2) == 0.0
    assert M.precision_at_k(scores, [[0, 1]], k=3) == pytest.approx(1 / 3)
    # one target: the rank is the number of points scoring at least as high (leakage's old count)
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, (20, 30)).astype(float)
    t = rng.integers(0, 30, 20)
    assert M.target_ranks(s, t).tolist() == (s >= s[np.arange(20), t][:, None]).sum(1).tolist()


def test_precision_and_mrr_by_hand():
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], dtype=float)
    relevant = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=bool)
    # query 0: top-2 = {0, 1} -> 1 relevant; query 1: top-2 = {4, 3} -> 0 relevant
    assert M.precision_at_k(scores, relevant, k=2) == pytest.approx((1 / 2 + 0) / 2)
    # query 0: first relevant at rank 2; query 1: point 0 ranks 5th
    assert M.mean_reciprocal_rank(scores, relevant) == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert M.mrr(scores, [[1, 3], [0]]) == pytest.approx((1 / 2 + 1 / 5) / 2)


def test_mrr_with_ties_counts_against_the_method():
    # one relevant among 3 tied at the top ranks 3rd
    assert M.mrr(np.array([[2.0, 2.0, 2.0, 1.0]]), [[1]]) == pytest.approx(1 / 3)
    # 2 relevant among 4 tied behind one higher point: the first relevant is at rank 1 + 2 + 1
    assert M.mrr(np.array([[3.0, 1.0, 1.0, 1.0, 1.0]]), [[1, 2]]) == pytest.approx(1 / 4)
    # a relevant point above the ties is unaffected
    assert M.mrr(np.array([[3.0, 1.0, 1.0]]), [[0, 1]]) == 1.0


def test_correlations_and_auc_match_scipy_and_sklearn():
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.integers(0, 6, 50).astype(float), rng.normal(size=50)  # a has many ties
        assert M.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
        assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
        np.testing.assert_array_equal(M.rankdata(a), stats.rankdata(a))
        labels = rng.random(50) < 0.3
        assert M.roc_auc(a, labels) == pytest.approx(roc_auc_score(labels, a), abs=1e-12)


def test_no_relevant_gives_zero_rr_and_bad_input_is_refused():
    assert M.mrr(np.array([[1.0, 2.0]]), np.array([[False, False]])) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        M.topk_detection_rate(np.array([[np.nan, 1.0]]), [0], k=1)
    with pytest.raises(ValueError, match="k"):
        M.precision_at_k(np.ones((1, 3)), [[0]], k=0)
    with pytest.raises(ValueError, match="out of range"):
        M.topk_detection_rate(np.ones((1, 3)), [5], k=1)
    with pytest.raises(ValueError, match="entries"):
        M.topk_detection_rate(np.ones((2, 3)), [0], k=1)


# ------------------------------------------------------------------------------ AUC / curves
def test_roc_auc_by_hand():
    labels = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert M.roc_auc([5, 4, 3, 2, 1], labels) == pytest.approx(5 / 6)  # pairs: (5>4,2,1)+(3>2,1) = 5 of 6
    assert M.roc_auc([1, 1, 1, 1, 1], labels) == pytest.approx(0.5)
    assert M.roc_auc([0, 1, 0, 1, 1], labels) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="positives and negatives"):
        M.roc_auc([1, 2], [True, True])


def test_roc_auc_matches_pairwise_count_on_random_data():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert M.roc_auc(s, y) == pytest.approx(brute)


def test_detection_curve_and_found_at():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    x, f = M.detection_curve(scores, labels)
    assert x.shape == f.shape == (11,)
    np.testing.assert_allclose(f, np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3]) / 3)
    assert M.found_at(scores, labels, 0.3) == pytest.approx(2 / 3)
    assert M.found_at(scores, labels, 0.0) == 0.0
    assert M.found_at(scores, labels, 1.0) == 1.0
    # all tied: the expected curve is the diagonal
    x, f = M.detection_curve(np.zeros(10), labels)
    np.testing.assert_allclose(f, x)
    with pytest.raises(ValueError, match="fraction"):
        M.found_at(scores, labels, 1.5)


# ------------------------------------------------------------------------------- correlations
def test_pearson_spearman_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    assert M.pearson(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert M.pearson(x, [8.0, 6.0, 4.0, 2.0]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson < 1
    y = [1.0, 10.0, 100.0, 1000.0]
    assert M.spearman(x, y) == pytest.approx(1.0)
    assert M.pearson(x, y) < 0.9
    # hand value: x=[1,2,3], y=[1,3,2] -> ranks equal values -> r = 0.5
    assert M.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    np.testing.assert_allclose(M.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    with pytest.raises(ValueError, match="values"):
        M.pearson([1, 2], [1, 2, 3])


def test_rowwise_correlation():
    a = np.array([[1, 2, 3], [1, 2, 3]], dtype=float)
    b = np.array([[2, 4, 6], [3, 2, 1]], dtype=float)
    np.testing.assert_allclose(M.rowwise_correlation(a, b), [1.0, -1.0])
    np.testing.assert_allclose(M.rowwise_correlation(a, b, "spearman"), [1.0, -1.0])
    with pytest.raises(ValueError, match="method"):
        M.rowwise_correlation(a, b, "kendall")


# ------------------------------------------------------------------------------------------ LDS
def test_lds_is_one_for_an_exactly_linear_world_and_lower_for_noise():
    rng = np.random.default_rng(1)
    n, q, m = 40, 3, 60
    true = rng.normal(size=(q, n))
    masks = M.random_subsets(n, m, 0.5, seed=2)
    assert masks.shape == (m, n) and (masks.sum(1) == 20).all()
    outputs = masks @ true.T  # the model output is exactly additive in the training points
    assert M.lds(true, masks, outputs) == pytest.approx(1.0)
    assert M.lds(-true, masks, outputs) == pytest.approx(-1.0)
    noisy = M.lds(true + rng.normal(scale=3.0, size=true.shape), masks, outputs)
    assert 0.0 < noisy < 0.9
    with pytest.raises(ValueError, match="outputs"):
        M.lds(true, masks, outputs.T)
