"""Classification metrics of one test fold (positive class = sensitive = 1).

Every metric is computed from the true labels and the predicted probability of the sensitive
class; hard predictions are ``proba >= threshold``. A metric that is undefined on the fold
(for example AUROC on a test fold holding one class only) is ``None`` (NULL in the catalog) and
the reason is added to ``flags``; it is never reported as ``0.0``, because a zero would be
averaged into a leaderboard as if the head had failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from scdm.store.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "FoldMetrics", "compute_metrics", "fold_summary", "fold_summary_sql"]

METRICS: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "f1_macro",
    "f1_weighted",
    "auroc",
    "ap",
    "mcc",
    "ami",
    "ari",
)
"""Names of the metrics, in the order they are reported."""

# Metrics that compare the two classes: undefined when the test fold holds one class.
_NEED_BOTH_CLASSES = ("f1_macro", "f1_weighted", "auroc", "ap", "mcc", "ami", "ari")

SINGLE_CLASS_TEST = "single_class_test"
NO_PREDICTED_POSITIVE = "no_predicted_positive"
NO_SCORES = "no_scores"
"""The predictions are hard labels (no probability): AUROC and AP are not computed from them."""
CONSTANT_PREDICTION = "constant_prediction"


def fold_summary_sql(value: str, *, where: str | None = None, mean: str = "mean", sd: str = "sd", n: str = "n") -> str:
    """SQL select-list fragment: the mean, sd and n of a metric over the folds of a result (one owner for every reader).

    ``value`` is the column of the fold values (``r.value``); ``where``, if given, is a condition the rows must meet
    (an aggregate ``FILTER``, e.g. one metric of a wide row); ``mean``, ``sd`` and ``n`` name the three columns.
    A fold whose metric is NULL (undefined there: :func:`compute_metrics`) is left out of all three: ``n`` counts the
    folds with a value, and ``sd`` is the sample standard deviation (ddof 1), NULL for fewer than two. The numpy
    twin is :func:`fold_summary`.
    """
    only = f" FILTER (WHERE {where})" if where else ""
    return (f"avg({value}){only} AS {mean}, stddev_samp({value}){only} AS {sd}, "
            f"count({value}){only} AS {n}")


def fold_summary(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sd, n)`` of a metric's fold values, as :func:`fold_summary_sql` computes them in the catalog.

    ``None`` (a fold where the metric is undefined; NULL in the catalog) and NaN (how pandas reads such a NULL) are
    left out; ``sd`` is ddof 1 and ``None`` below two values, ``mean`` ``None`` without any.
    """
    kept = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    mean = float(kept.mean()) if kept.size else None
    sd = float(kept.std(ddof=1)) if kept.size > 1 else None
    return mean, sd, int(kept.size)


@dataclass(frozen=True)
class FoldMetrics:
    """Metrics of one (head, split, fold) test set."""

    values: dict[str, float | None]
    """Metric name -> value; ``None`` where the metric is undefined on this fold."""
    flags: tuple[str, ...] = field(default_factory=tuple)
    """Why some values are ``None`` (or conventional), e.g. ``"single_class_test"``."""
    n: int = 0
    """Number of test cells."""
    n_pos: int = 0
    """Number of sensitive (label 1) test cells."""

    def __getitem__(self, name: str) -> float | None:
        return self.values[name]


def _check_inputs(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    if y.shape != p.shape:
        msg = f"y_true has {y.shape[0]} values but proba has {p.shape[0]}; pass one probability per test cell."
        raise InputDataError(msg)
    if y.size == 0:
        msg = "The test fold is empty (0 cells); metrics need at least one test cell."
        raise InputDataError(msg)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        msg = f"y_true must hold 0 (resistant) or 1 (sensitive); found {np.unique(y[bad])[:5].tolist()}."
        raise InputDataError(msg)
    nan = np.isnan(p)
    if nan.any():  # a head whose fit diverged: no number of the fold can be computed from it
        msg = (f"proba holds NaN for {int(nan.sum())} of {p.size} test cells (a model whose fit diverged?); "
               "metrics need a probability for every test cell.")
        raise InputDataError(msg)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        msg = "proba must be finite probabilities in [0, 1]; got values outside that range."
        raise InputDataError(msg)
    return y.astype(np.int8), p


def _auroc(y: np.ndarray, p: np.ndarray, n_pos: int, n_neg: int) -> float:
    """Mann-Whitney AUROC with average ranks for ties (equals ``roc_auc_score``)."""
    from scipy.stats import rankdata

    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_precision(y: np.ndarray, p: np.ndarray, n_pos: int) -> float:
    """Step-wise average precision over distinct thresholds (equals ``average_precision_score``)."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p_sorted)), p_sorted.size - 1]  # last index of each distinct score
    tps = np.cumsum(y_sorted, dtype=np.float64)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _adjusted_rand(table: np.ndarray) -> float:
    """Adjusted Rand index of a contingency table (equals ``adjusted_rand_score``, in exact integers as there)."""
    n = int(table.sum())
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    same_both = int((table.astype(np.int64) ** 2).sum())
    # pairs of cells: together in both labellings, only in the predicted one, only in the true one, in neither
    tp = same_both - n
    fp = int(table.dot(cols).sum()) - same_both
    fn = int(table.T.dot(rows).sum()) - same_both
    tn = n * n - fp - fn - same_both
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - np.log(total))))


def _expected_mutual_info(rows: np.ndarray, cols: np.ndarray, n: int) -> float:
    """Expected mutual information of two labellings with these class sizes under random permutation.

    The hypergeometric sum of Vinh, Epps & Bailey (2010), each cell's range of counts at once, in
    log space as ``sklearn.metrics.cluster.expected_mutual_information`` computes it.
    """
    from scipy.special import gammaln

    total = 0.0
    log_n, gln_n = np.log(n), gammaln(n + 1)
    for a in rows.tolist():
        for b in cols.tolist():
            nij = np.arange(max(1, a + b - n), min(a, b) + 1, dtype=np.float64)
            log_term = (gammaln(a + 1) + gammaln(b + 1) + gammaln(n - a + 1) + gammaln(n - b + 1) - gln_n
                        - gammaln(nij + 1) - gammaln(a - nij + 1) - gammaln(b - nij + 1) - gammaln(n - a - b + nij + 1))
            total += float(np.sum(nij / n * (log_n + np.log(nij) - np.log(a) - np.log(b)) * np.exp(log_term)))
    return total


def _adjusted_mutual_info(table: np.ndarray) -> float:
    """Adjusted mutual information, arithmetic normalisation (equals ``adjusted_mutual_info_score``).

    ``table`` holds both true classes; an empty predicted column (a constant prediction) is dropped,
    as sklearn's contingency matrix holds only the labels that occur, which gives 0.
    """
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0
    n = int(table.sum())
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    nz = table > 0
    counts = table[nz].astype(np.float64)
    outer = np.outer(rows, cols)[nz].astype(np.float64)
    # sum of p_ij log(n n_ij / (a_i b_j)), in sklearn's grouping of the logs: stored AMI values agree to an ulp
    terms = counts / n * (np.log(counts) - np.log(n)) + counts / n * (np.log(n) + np.log(n) - np.log(outer))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    mi = max(float(terms.sum()), 0.0)
    emi = _expected_mutual_info(rows, cols, n)
    denominator = (_entropy(rows) + _entropy(cols)) / 2 - emi
    # On a perfect match of two cells, mi, emi and the normaliser are equal: 0/0. Floating point can
    # also put emi a hair above either; keep the sign and read the match as 1, as sklearn does.
    return _keep_sign(mi - emi) / _keep_sign(denominator)


def _keep_sign(value: float) -> float:
    eps = float(np.finfo(np.float64).eps)
    return min(value, -eps) if value < 0 else max(value, eps)


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, threshold: float = 0.5,
                    hard_only: bool = False) -> FoldMetrics:
    """Compute every metric in :data:`METRICS` for one test fold.

    Parameters
    ----------
    y_true : ndarray of shape (n_cells,)
        True labels, 1 = sensitive, 0 = resistant.
    proba : ndarray of shape (n_cells,)
        Predicted probability that each cell is sensitive.
    threshold : float, default 0.5
        Cells with ``proba >= threshold`` are predicted sensitive.
    hard_only : bool, default False
        ``proba`` holds hard labels (0/1), not probabilities, e.g. a language model's answers
        without token log-probabilities. AUROC and AP are then ``None`` with the flag
        ``"no_scores"``: a ranking metric computed from hard labels is not a ranking metric.

    Returns
    -------
    FoldMetrics
        Values (``None`` where undefined) and the flags explaining them.

    Raises
    ------
    InputDataError
        If the arrays differ in length, are empty, or hold labels other than 0/1.

    Examples
    --------
    >>> m = compute_metrics([0, 1, 1, 0], [0.2, 0.9, 0.6, 0.4])
    >>> m["auroc"], m["accuracy"]
    (1.0, 1.0)
    >>> compute_metrics([1, 1], [0.7, 0.2])["auroc"] is None   # one class: no metric at all
    True
    >>> compute_metrics([1, 1], [0.7, 0.2])["accuracy"] is None
    True
    >>> m = compute_metrics([0, 1, 1, 0], [0, 1, 0, 0], hard_only=True)
    >>> m["auroc"] is None, m["f1"], m.flags
    (True, 0.6666666666666666, ('no_scores',))
    """
    y, p = _check_inputs(y_true, proba)
    if hard_only and not np.isin(p, (0.0, 1.0)).all():
        msg = "hard_only=True needs hard labels (0 or 1) in proba; pass probabilities with hard_only=False."
        raise InputDataError(msg)
    pred = (p >= threshold).astype(np.int8)
    n, n_pos = int(y.size), int(y.sum())
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    values: dict[str, float | None] = dict.fromkeys(METRICS)
    flags: list[str] = [NO_SCORES] if hard_only else []

    values["accuracy"] = float((pred == y).mean())
    # Precision, recall and F1 are computed by hand so that a zero denominator gives None, not
    # sklearn's zero_division fill value.
    if tp + fp > 0:
        values["precision"] = tp / (tp + fp)
    else:
        flags.append(NO_PREDICTED_POSITIVE)
    if n_pos > 0:
        # Recall, and so F1, is undefined without sensitive cells in the fold.
        values["recall"] = tp / n_pos
        values["f1"] = 2 * tp / (2 * tp + fp + fn)

    if n_pos in (0, n):
        # One rule for every metric: a test fold holding one class is scored on none of them, so
        # each aggregate averages the same folds (accuracy of such a fold would reward predicting
        # the majority class, and mixing it with two-class folds changes what a mean means).
        flags.insert(0, SINGLE_CLASS_TEST)
        return FoldMetrics(values=dict.fromkeys(METRICS), flags=tuple(flags), n=n, n_pos=n_pos)

    # Closed forms from the confusion counts and one sort: the grid scores thousands of folds and
    # sklearn's input validation would dominate (tests check equality with sklearn; AMI and ARI were
    # 7 ms of sklearn per fold, most of a 1,042-fold grid's scoring time on 2 cores).
    tn = n - n_pos - fp
    n_neg = n - n_pos
    f1_pos = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if (2 * tn + fn + fp) else 0.0
    values["f1_macro"] = (f1_pos + f1_neg) / 2
    values["f1_weighted"] = (n_pos * f1_pos + n_neg * f1_neg) / n
    if not hard_only:
        values["auroc"] = _auroc(y, p, n_pos, n_neg)
        values["ap"] = _average_precision(y, p, n_pos)
    denom = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    values["mcc"] = (tp * tn - fp * fn) / np.sqrt(denom) if denom > 0 else 0.0
    table = np.bincount(2 * y + pred, minlength=4).reshape(2, 2)  # rows: true class, columns: predicted
    values["ami"] = _adjusted_mutual_info(table)
    values["ari"] = _adjusted_rand(table)
    if np.unique(pred).size == 1:
        # MCC/AMI/ARI of a constant predictor are 0 by the usual limit convention; say so.
        flags.append(CONSTANT_PREDICTION)
    return FoldMetrics(values=values, flags=tuple(flags), n=n, n_pos=n_pos)
