"""Metrics of one test fold: values, and NULL plus a flag where a metric is undefined."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from scdm.classify.metrics import METRICS, compute_metrics
from scdm.store.errors import InputDataError


def test_values_match_sklearn_on_a_two_class_fold() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    pred = (p >= 0.5).astype(int)
    m = compute_metrics(y, p)
    assert set(m.values) == set(METRICS)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))  # from probabilities, not labels
    assert m["ap"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["ami"] == pytest.approx(skm.adjusted_mutual_info_score(y, pred))
    assert m["ari"] == pytest.approx(skm.adjusted_rand_score(y, pred))
    assert m.flags == ()
    assert (m.n, m.n_pos) == (200, int(y.sum()))


def test_ami_and_ari_match_sklearn_on_folds_of_every_shape() -> None:
    # closed forms on the 2 x 2 table (sklearn's validation was most of the grid's scoring time):
    # perfect, inverted, constant and random predictions; folds of 2 cells to 60,000
    rng = np.random.default_rng(7)
    for trial in range(240):
        n = int(rng.choice([2, 3, 5, 11, 200, 5000, 60000]))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        y[:2] = [0, 1]
        p = [rng.random(n), np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1), np.full(n, rng.random()),
             y.astype(float), 1.0 - y][trial % 5]
        pred = (p >= 0.5).astype(int)
        m = compute_metrics(y, p)
        assert m["ami"] == pytest.approx(skm.adjusted_mutual_info_score(y, pred), rel=1e-9, abs=1e-12), (n, trial)
        assert m["ari"] == pytest.approx(skm.adjusted_rand_score(y, pred), rel=1e-12, abs=1e-15), (n, trial)


def test_positive_class_is_sensitive() -> None:
    m = compute_metrics([1, 1, 0, 0], [0.9, 0.2, 0.1, 0.3])
    assert m["recall"] == 0.5  # one of the two sensitive cells found
    assert m["precision"] == 1.0


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_test_fold_is_scored_on_no_metric(label: int) -> None:
    # one rule for every metric: each aggregate then averages the same folds
    m = compute_metrics([label] * 5, [0.1, 0.4, 0.6, 0.8, 0.9])
    assert m.flags[0] == "single_class_test" and m.n == 5 and m.n_pos == 5 * label
    assert all(m[name] is None for name in METRICS)


def test_no_predicted_positive_leaves_precision_undefined() -> None:
    m = compute_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])
    assert m["precision"] is None
    assert "no_predicted_positive" in m.flags
    assert m["recall"] == 0.0  # defined: the sensitive cells exist and none was found
    assert "constant_prediction" in m.flags


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [([0, 1], [0.5], "one probability per test cell"), ([], [], "empty"), ([0, 2], [0.1, 0.2], "0 \\(resistant\\)"),
     ([0, 1], [0.1, 1.5], "in \\[0, 1\\]")],
)
def test_bad_input_is_explained(y: list[int], p: list[float], match: str) -> None:
    with pytest.raises(InputDataError, match=match):
        compute_metrics(np.array(y), np.array(p))


def test_closed_forms_equal_sklearn_on_random_folds_with_ties():
    from sklearn import metrics as skm

    from scdm.classify.metrics import compute_metrics

    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        p = np.round(rng.random(n), int(rng.integers(1, 3)))  # coarse values: many ties
        m = compute_metrics(y, p)
        pred = (p >= 0.5).astype(int)
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
        assert m["ap"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
        assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
        assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0), abs=1e-12)


def test_nan_scores_are_named_as_nan_not_as_out_of_range() -> None:
    # a head whose fit diverged scores NaN: the message said "values outside that range", which NaN is not
    with pytest.raises(InputDataError, match=r"NaN for 2 of 4 test cells"):
        compute_metrics(np.array([0, 1, 0, 1]), np.array([0.1, np.nan, np.nan, 0.8]))
