"""Metrics every experiment uses: detection, ranking, correlation and the linear datamodeling score.

Conventions:
- ``scores`` are "higher = more influential" (the estimator contract), shaped ``[Q, N]`` (one row
  per query, one column per training point) or ``[N]``.
- Inputs may be torch tensors, numpy arrays or lists; results are Python floats (or numpy arrays
  for curves).
- **Ties**, one policy per kind of metric, never the order in which tied points happen to be stored:
  - *rank metrics* (the rank of a known target: :func:`target_ranks`, :func:`topk_detection_rate`,
    :func:`precision_at_k`, :func:`mean_reciprocal_rank`) count ties **against** the method: a
    relevant point tied with irrelevant ones ranks after all of them (a target tied with 3 others
    at the top ranks 4th). A method has detected a point only when it ranks it above the rest.
  - *detection curves* over a whole ranking (:func:`roc_auc`, :func:`detection_curve`,
    :func:`found_at`) take the expectation over a uniformly random tie-break (AUC: ties count
    1/2, as Mann-Whitney U and scikit-learn do).
- NaN scores are refused with a ``ValueError``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "target_ranks",
    "topk_detection_rate",
    "precision_at_k",
    "mean_reciprocal_rank",
    "mrr",
    "roc_auc",
    "detection_curve",
    "found_at",
    "pearson",
    "spearman",
    "rankdata",
    "rowwise_correlation",
    "random_subsets",
    "lds",
    "lds_per_query",
    "bootstrap_interval",
    "Datamodel",
    "fit_datamodel",
]


# ------------------------------------------------------------------------------------ helpers
def _np(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _scores_2d(scores: Any) -> np.ndarray:
    s = _np(scores, "scores")
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must be [N] or [Q, N] with N > 0, got shape {s.shape}")
    return s


def _relevance_2d(relevant: Any, shape: tuple[int, int], name: str = "relevant") -> np.ndarray:
    """A bool mask ``[Q, N]`` from a mask ``[Q, N]`` / ``[N]``, target indices ``[Q]``, or lists of index sets."""
    q, n = shape
    if hasattr(relevant, "detach"):
        relevant = relevant.detach().cpu().numpy()
    if isinstance(relevant, np.ndarray) and relevant.dtype == bool:
        mask = relevant if relevant.ndim == 2 else relevant[None]
        if mask.shape != (q, n):
            raise ValueError(f"{name} mask has shape {relevant.shape}; expected {(q, n)}")
        return mask
    if isinstance(relevant, (int, np.integer)):
        relevant = [relevant]
    if isinstance(relevant, np.ndarray) and relevant.dtype.kind in "iu" and relevant.ndim == 1:
        relevant = relevant.tolist()
    if len(relevant) != q:
        raise ValueError(f"{name} has {len(relevant)} entries for {q} queries")
    mask = np.zeros((q, n), dtype=bool)
    for row, targets in enumerate(relevant):
        idx = np.atleast_1d(np.asarray(targets, dtype=np.int64))
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"{name}[{row}] holds index {int(idx.max())} out of range for {n} training points")
        mask[row, idx] = True
    return mask


def _expected_found(scores: np.ndarray, labels: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Expected number of positives among the top ``k`` (random tie-break), for each ``k`` in ``ks``.

    ``scores``, ``labels``: ``[N]``; ``ks``: int ``[K]`` in ``0..N``. Returns float ``[K]``.
    """
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order].astype(np.float64)
    # Tie groups in sorted order: start position, size and positives of each group.
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, len(s)])
    pos = np.add.reduceat(lab, starts)
    before = np.r_[0.0, np.cumsum(pos)[:-1]]  # positives in groups strictly above
    ks = np.asarray(ks, dtype=np.int64)
    out = np.zeros(len(ks))
    nz = ks > 0
    g = np.searchsorted(starts, ks[nz] - 1, side="right") - 1  # group holding position k-1
    out[nz] = before[g] + (ks[nz] - starts[g]) * pos[g] / sizes[g]
    return out


# ----------------------------------------------------------------------------------- ranking
def _ranked(scores: Any, relevant: Any, name: str = "relevant") -> tuple[np.ndarray, np.ndarray]:
    """``(hits [Q, N] bool, s [Q, N])``: ``hits[q, j]`` is whether the ``j``-th ranked point of query
    ``q`` is relevant, ranking by descending score with ties against the method (relevant last)."""
    s = _scores_2d(scores)
    mask = _relevance_2d(relevant, s.shape, name)
    # lexsort's last key is the primary one: score descending, then the irrelevant points first.
    order = np.stack([np.lexsort((m, -row)) for row, m in zip(s, mask)])
    return np.take_along_axis(mask, order, axis=1), s


def target_ranks(scores: Any, targets: Any) -> np.ndarray:
    """``[Q]`` 1-based rank of each query's best-ranked target, ties counted against the method.

    ``scores`` ``[Q, N]`` (or ``[N]``); ``targets``: ``[Q]`` indices, per-query index collections or
    a bool mask ``[Q, N]``. A target tied with other points ranks after all of them, so for one
    target per query the rank is the number of points scoring at least as high as it. A query
    without a target gets rank ``N + 1``. The one tie policy of every rank metric here and in the
    experiments (leakage T-k and mean rank, memorization ranks, ``ForwardINF.tune``).
    """
    hits, s = _ranked(scores, targets, "targets")
    first = np.where(hits.any(1), hits.argmax(1) + 1, s.shape[1] + 1)
    return first.astype(np.int64)


def topk_detection_rate(scores: Any, targets: Any, k: int = 1) -> float:
    """Fraction of queries whose target training point ranks within the top ``k``.

    Args:
        scores: ``[Q, N]`` (or ``[N]`` for one query), higher = more influential.
        targets: ``[Q]`` index of each query's ground-truth training point (e.g. its leaked
            duplicate), or per-query collections of acceptable indices (a hit if any is in the top
            ``k``), or a bool mask ``[Q, N]``.
        k: how many top-ranked points are inspected.

    Ties count against the method (:func:`target_ranks`).
    """
    _check_k(k)
    hits, _ = _ranked(scores, targets, "targets")
    if not hits.any(axis=1).all():
        raise ValueError("every query needs at least one target")
    return float(np.mean(hits.argmax(1) + 1 <= k))


def precision_at_k(scores: Any, relevant: Any, k: int = 10) -> float:
    """Mean over queries of (relevant points among the top ``k``) / ``k``, ties against the method.

    ``scores`` ``[Q, N]``; ``relevant``: bool mask ``[Q, N]`` or per-query index collections.
    """
    _check_k(k)
    hits, s = _ranked(scores, relevant)
    kk = min(k, s.shape[1])
    return float(hits[:, :kk].sum(1).mean() / kk)


def mean_reciprocal_rank(scores: Any, relevant: Any) -> float:
    """Mean over queries of ``1 / rank`` of the first relevant training point (0 if none), ties
    against the method.

    ``scores`` ``[Q, N]``; ``relevant``: bool mask ``[Q, N]`` or per-query index collections.
    """
    hits, _ = _ranked(scores, relevant)
    rr = np.where(hits.any(1), 1.0 / (hits.argmax(1) + 1), 0.0)
    return float(rr.mean())


mrr = mean_reciprocal_rank


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"invalid k={k!r}; expected a positive integer")


# ---------------------------------------------------------------------------------- detection
def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _np(scores, "scores").reshape(-1)
    y = _np(labels, "labels", dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} entries but labels has {y.size}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 or bool (1 = the points to find, e.g. mislabeled)")
    return s, y.astype(bool)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for the positives ``labels`` ``[N]`` (bool/0-1).

    Equals P(score of a random positive > score of a random negative), ties counting 1/2
    (Mann-Whitney U / (n_pos n_neg); ``sklearn.metrics.roc_auc_score`` to rounding). Raises ``ValueError`` unless both classes are present.
    """
    s, y = _binary(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs positives and negatives, got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of positives found vs fraction of the data inspected, highest scores first.

    Returns ``(inspected [N+1], found [N+1])``: after inspecting ``k`` points (``inspected[k] =
    k / N``), ``found[k]`` is the expected fraction of positives among them (random tie-break).
    The curve of a random ranking is the diagonal; the paper's Figure 5 plots this.
    """
    s, y = _binary(scores, labels)
    if not y.any():
        raise ValueError("detection_curve needs at least one positive label")
    n = s.size
    ks = np.arange(n + 1)
    return ks / n, _expected_found(s, y, ks) / y.sum()


def found_at(scores: Any, labels: Any, fraction: float) -> float:
    """Fraction of the positives found after inspecting the top ``fraction`` of the data.

    ``round(fraction * N)`` points are inspected (e.g. ``found_at(s, flipped, 0.15)`` is the
    mislabel experiment's ``found_at_15pct``).
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"invalid fraction={fraction!r}; expected a number in [0, 1]")
    s, y = _binary(scores, labels)
    if not y.any():
        raise ValueError("found_at needs at least one positive label")
    k = int(round(float(fraction) * s.size))
    return float(_expected_found(s, y, np.array([k]))[0] / y.sum())


# -------------------------------------------------------------------------------- correlation
def rankdata(x: Any) -> np.ndarray:
    """Ranks ``1..N`` of ``x`` ``[N]``, tied values sharing their average rank (``scipy.stats.rankdata``)."""
    from scipy.stats import rankdata as _rankdata

    return _rankdata(_np(x, "x").reshape(-1), method="average").astype(np.float64)


def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _np(x, "x").reshape(-1), _np(y, "y").reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"x has {a.size} values but y has {b.size}")
    if a.size < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    return a, b


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two ``[N]`` vectors; NaN if either is constant (``scipy.stats.pearsonr``
    to rounding, without its warning)."""
    a, b = _pair(x, y)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two ``[N]`` vectors (``scipy.stats.spearmanr``)."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def rowwise_correlation(x: Any, y: Any, method: str = "pearson") -> np.ndarray:
    """Correlation of each row pair of ``x``, ``y`` ``[Q, N]`` -> ``[Q]`` (``"pearson"``/``"spearman"``)."""
    fn = {"pearson": pearson, "spearman": spearman}.get(method)
    if fn is None:
        raise ValueError(f"invalid method={method!r}; expected one of ('pearson', 'spearman')")
    a, b = _np(x, "x"), _np(y, "y")
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"x and y must both be [Q, N], got {a.shape} and {b.shape}")
    return np.array([fn(r, t) for r, t in zip(a, b)])


# ------------------------------------------------------------------------------------------ LDS
def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``m`` random subsets of ``round(fraction * n)`` of ``n`` training points: bool ``[m, n]``."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"invalid fraction={fraction!r}; expected a number in (0, 1]")
    if n < 1 or m < 1:
        raise ValueError(f"need n >= 1 and m >= 1, got n={n}, m={m}")
    rng = np.random.default_rng(seed)
    size = max(1, int(round(float(fraction) * n)))
    masks = np.zeros((m, n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size, replace=False)] = True
    return masks


def lds(scores: Any, subsets: Any, outputs: Any) -> float:
    """Linear datamodeling score (Park et al., TRAK): how well summed attributions predict retraining.

    For each query ``q`` the attribution predicts the output of a model trained on subset ``S_m``
    as ``g_m(q) = sum_{i in S_m} scores[q, i]``; LDS is the Spearman correlation over the ``M``
    subsets between ``g_m(q)`` and the measured ``outputs[m, q]``, averaged over queries.

    Args:
        scores: ``[Q, N]`` attributions, higher = more support for the query.
        subsets: bool ``[M, N]``, the training subsets the models were retrained on
            (see :func:`random_subsets`, :class:`forwardinf.baselines.retraining.Downsampling`).
        outputs: ``[M, Q]`` the measured output of each retrained model on each query (average over
            seeds). It must *increase* with support: pass the negative loss or the correct-class
            margin, not the loss.

    Returns the mean over queries with a defined correlation (NaN rows, from constant outputs,
    are skipped; NaN if none remains). :func:`lds_per_query` gives the per-query values.
    """
    rho = lds_per_query(scores, subsets, outputs)
    rho = rho[~np.isnan(rho)]
    return float(rho.mean()) if rho.size else float("nan")


def lds_per_query(scores: Any, subsets: Any, outputs: Any) -> np.ndarray:
    """``[Q]`` Spearman correlation per query behind :func:`lds` (same arguments); NaN where the
    outputs or the predictions are constant over the subsets."""
    s = _scores_2d(scores)
    masks = _np(subsets, "subsets", dtype=np.float64)
    f = _np(outputs, "outputs")
    if f.ndim == 1:
        f = f[:, None]
    if masks.ndim != 2 or masks.shape[1] != s.shape[1]:
        raise ValueError(f"subsets must be [M, N={s.shape[1]}], got {masks.shape}")
    if f.shape != (masks.shape[0], s.shape[0]):
        raise ValueError(f"outputs must be [M={masks.shape[0]}, Q={s.shape[0]}], got {f.shape}")
    if masks.shape[0] < 2:
        raise ValueError("lds needs at least 2 subsets")
    if not np.isfinite(s).all() or not np.isfinite(f).all():
        raise ValueError("lds: scores and outputs must be finite (inf found)")
    predicted = masks @ s.T  # [M, Q]
    return np.array([spearman(predicted[:, q], f[:, q]) for q in range(s.shape[0])])


def bootstrap_interval(values: Any, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` ``[Q]`` (e.g. per-query LDS).

    The *queries* are resampled with replacement (``n_boot`` times); NaN entries are dropped
    first. Variation from the choice of subsets or retraining seeds is not part of it.
    Returns ``(low, high)``; ``(nan, nan)`` when no value is finite.
    """
    _check_k(n_boot)
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"invalid level={level!r}; expected a number in (0, 1)")
    v = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    tail = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


class Datamodel(NamedTuple):
    """A linear datamodel per query: ``output[m, q] ≈ subsets[m] @ weights[q] + intercept[q]``.

    ``weights`` ``[Q, N]``, ``intercept`` ``[Q]``, ``alpha`` the ridge penalty chosen by
    cross-validation, ``cv_error`` the normalised CV error at each of ``alphas``.
    """

    weights: np.ndarray
    intercept: np.ndarray
    alpha: float
    alphas: np.ndarray
    cv_error: np.ndarray


def fit_datamodel(subsets: Any, outputs: Any, *, alphas: Any = None, folds: int = 5, seed: int = 0) -> Datamodel:
    """Fit a ridge datamodel ``outputs[:, q] ~ subsets @ w_q + b_q`` for every query at once.

    Ridge on the subset indicators, solved in the dual (``M x M``, cheap when ``M << N``). One
    penalty is shared by all queries, chosen from ``alphas`` (default: 25 values spanning
    ``1e-6 .. 1e3`` times the mean eigenvalue of the centred ``M x M`` Gram matrix) by
    ``folds``-fold cross-validation over the subsets, minimising the CV squared error of each
    query divided by its variance (so every query weighs the same).

    With subsets of one fixed size, adding a constant to every weight is absorbed by the
    intercept: the weights are determined up to that shift (ridge picks the smallest-norm one).

    Args:
        subsets: bool ``[M, N]``; outputs: ``[M, Q]`` (or ``[M]``).
    """
    x = _np(subsets, "subsets", dtype=np.float64)
    y = _np(outputs, "outputs")
    if y.ndim == 1:
        y = y[:, None]
    m = x.shape[0]
    if x.ndim != 2 or y.shape[0] != m:
        raise ValueError(f"subsets [M, N] and outputs [M, Q] must share M, got {x.shape} and {y.shape}")
    if not 2 <= folds <= m:
        raise ValueError(f"folds must be in 2..M={m}, got {folds}")

    def ridge(xt: np.ndarray, yt: np.ndarray, lams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``[L, Q, N]`` and intercepts ``[L, Q]`` for each penalty in ``lams``."""
        xm, ym = xt.mean(0), yt.mean(0)
        xc, yc = xt - xm, yt - ym
        e, u = np.linalg.eigh(xc @ xc.T)
        uy = u.T @ yc  # [M', Q]
        w = np.stack([(xc.T @ (u @ (uy / (np.clip(e, 0, None) + lam)[:, None]))).T for lam in lams])
        return w, ym[None] - w @ xm

    if alphas is None:
        xc = x - x.mean(0)
        scale = max(float(np.trace(xc @ xc.T)) / m, 1e-12)
        alphas = scale * np.logspace(-6, 3, 25)
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if alphas.size == 0 or (alphas <= 0).any():
        raise ValueError("alphas must be positive")
    order = np.random.default_rng(seed).permutation(m)
    err = np.zeros((alphas.size, y.shape[1]))
    for part in np.array_split(order, folds):
        train = np.setdiff1d(order, part)
        w, b = ridge(x[train], y[train], alphas)
        pred = np.einsum("mn,lqn->lmq", x[part], w) + b[:, None, :]
        err += ((pred - y[part][None]) ** 2).sum(1)
    var = y.var(0)
    cv = (err / np.where(var > 0, var, 1.0)[None]).mean(1) / m
    best = int(np.argmin(cv))
    w, b = ridge(x, y, alphas[best:best + 1])
    return Datamodel(w[0], b[0], float(alphas[best]), alphas, cv)
