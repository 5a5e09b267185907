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


def test_topk_ties_count_in_expectation():
    # The target is tied with 3 others for first place: top-1 hit with probability 1/4, top-2 1/2.
    scores = np.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert M.topk_detection_rate(scores, [2], k=1) == pytest.approx(0.25)
    assert M.topk_detection_rate(scores, [2], k=2) == pytest.approx(0.5)
    # two acceptable targets among the 4 tied: P(at least one in top-1) = 1/2, top-2 = 1 - C(2,2)/C(4,2)
    assert M.topk_detection_rate(scores, [[0, 1]], k=1) == pytest.approx(0.5)
    assert M.topk_detection_rate(scores, [[0, 1]], k=2) == pytest.approx(1 - 1 / 6)


def test_precision_and_mrr_by_hand():
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], dtype=float)
    relevant = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=bool)
    # query 0: top-2 = {0, 1} -> 1 relevant; query 1: top-2 = {4, 3} -> 0 relevant
    assert M.precision_at_k(scores, relevant, k=2) == pytest.approx((1 / 2 + 0) / 2)
    # query 0: first relevant at rank 2; query 1: point 0 ranks 5th
    assert M.mean_reciprocal_rank(scores, relevant) == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert M.mrr(scores, [[1, 3], [0]]) == pytest.approx((1 / 2 + 1 / 5) / 2)


def test_mrr_with_ties_is_the_expectation():
    # one relevant among 3 tied at the top: E[1/rank] = (1 + 1/2 + 1/3) / 3
    scores = np.array([[2.0, 2.0, 2.0, 1.0]])
    assert M.mrr(scores, [[1]]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # brute force over all tie-breaks for 2 relevant among 4 tied, behind one higher point
    scores = np.array([[3.0, 1.0, 1.0, 1.0, 1.0]])
    rel = [[1, 2]]
    import itertools
    vals = []
    for perm in itertools.permutations([1, 2, 3, 4]):
        order = [0, *perm]
        vals.append(1 / (1 + min(order.index(1), order.index(2))))
    assert M.mrr(scores, rel) == pytest.approx(np.mean(vals))


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
