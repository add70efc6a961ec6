"""Heads are scikit-learn classifiers: ``check_estimator`` passes, and the scdm-specific promises hold.

The settings are small (a tiny mlp, five LightGBM trees) so the whole of scikit-learn's suite runs in
seconds per head. ``dann`` is transductive (``fit`` needs the cells it will predict, ``target=``), so
only the checks that do not fit run on it; its fit is checked with a target below.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks as sk_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from scdm.classify.heads import HEADS, get_head
from scdm.store.errors import InputDataError

SMALL: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": 8, "epochs": 5, "batch_size": 512, "lr": 0.1, "min_steps": 0, "early_stopping": False, "precision": "fp32"},
    "logreg": {},
    "lightgbm": {"n_estimators": 5, "n_jobs": 1},
    "ridge": {},
    "majority": {},
    "shuffled-label": {},
    "dann": {"epochs": 2, "pretrain_epochs": 1, "n_clusters": 2, "cluster_method": "kmeans"},
}
"""Fast settings per head (every registered head must have an entry)."""
INDUCTIVE = [name for name in HEADS if not getattr(HEADS[name], "uses_target_domain", False)]


def small(name: str, **extra: Any) -> Any:
    return get_head(name, **{**SMALL[name], **extra})


def test_every_head_has_small_settings() -> None:
    assert set(SMALL) == set(HEADS)


@parametrize_with_checks([small(name) for name in INDUCTIVE])
def test_scikit_learn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


DANN_CHECKS = [
    sk_checks.check_estimator_cloneable,
    sk_checks.check_estimator_repr,
    sk_checks.check_no_attributes_set_in_init,
    sk_checks.check_parameters_default_constructible,
    sk_checks.check_get_params_invariance,
    sk_checks.check_set_params,
    sk_checks.check_estimators_unfitted,
    sk_checks.check_mixin_order,
    sk_checks.check_estimator_tags_renamed,
    sk_checks.check_valid_tag_types,
]


@pytest.mark.parametrize("check", DANN_CHECKS, ids=lambda c: c.__name__)
def test_dann_passes_the_checks_that_do_not_fit(check: Any) -> None:
    check("DANNHead", small("dann"))


def planted(n: int = 120, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, dim)) + 1.5 * y[:, None] * (np.arange(dim) < 2)
    return X.astype(np.float32), y


@pytest.mark.parametrize("name", INDUCTIVE)
def test_string_labels_give_the_same_model_as_0_1_labels(name: str) -> None:
    X, y = planted()
    words = np.where(y == 1, "sensitive", "resistant")
    by_word, by_int = small(name).fit(X, words), small(name).fit(X, y)
    assert list(by_word.classes_) == ["resistant", "sensitive"]
    assert list(by_int.classes_) == [0, 1]
    np.testing.assert_allclose(by_word.predict_proba(X), by_int.predict_proba(X), atol=1e-6)
    assert set(by_word.predict(X)) <= {"resistant", "sensitive"}
    np.testing.assert_allclose(by_int.predict_proba(X).sum(axis=1), 1.0)
    # the 1-D score is scdm's 0/1 convention: refused for other labels, with the way out
    with pytest.raises(InputDataError, match=r"predict_proba\(X\)\[:, 1\]"):
        by_word.proba_sensitive(X)


@pytest.mark.parametrize("name", ["logreg", "ridge"])
def test_decision_function_is_positive_exactly_where_class_1_is_predicted(name: str) -> None:
    X, y = planted()
    head = small(name).fit(X, y)
    decision = head.decision_function(X)
    assert ((decision > 0) == (head.predict(X) == 1)).all()
    assert ((decision > 0) == (head.proba_sensitive(X) > 0.5)).all()
    assert 0 < (decision > 0).mean() < 1  # both signs occur: the check is not vacuous


@pytest.mark.parametrize("name", INDUCTIVE)
def test_a_dataframe_fits_like_its_values_and_records_its_column_names(name: str) -> None:
    X, y = planted()
    frame = pd.DataFrame(X, columns=[f"dim{i}" for i in range(X.shape[1])], index=[f"cell{i}" for i in range(len(X))])
    head = small(name).fit(frame, pd.Series(y, index=frame.index))
    assert list(head.feature_names_in_) == list(frame.columns)
    np.testing.assert_allclose(head.predict_proba(frame), small(name).fit(X, y).predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("name", INDUCTIVE)
def test_inputs_are_not_changed(name: str) -> None:
    X, y = planted()
    X64 = X.astype(np.float64)
    X_before, y_before = X64.copy(), y.copy()
    head = small(name).fit(X64, y)
    head.predict_proba(X64)
    np.testing.assert_array_equal(X64, X_before)
    np.testing.assert_array_equal(y, y_before)


@pytest.mark.parametrize("name", ["ridge", "logreg", "mlp"])
def test_bad_matrices_are_refused_with_a_reason(name: str) -> None:
    X, y = planted()
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        small(name).fit(bad, y)
    head = small(name).fit(X, y)
    with pytest.raises(InputDataError, match="NaN"):  # not a NaN probability that looks like a score
        head.predict_proba(bad)
    with pytest.raises(TypeError, match="dense data is required"):
        small(name).fit(scipy.sparse.csr_matrix(X), y)
    with pytest.raises(InputDataError, match="Only binary classification"):
        small(name).fit(X, np.arange(len(y)) % 3)


def test_majority_on_one_class_predicts_it() -> None:
    X, _ = planted()
    head = small("majority").fit(X, np.ones(len(X), int))
    assert list(head.classes_) == [1]
    assert head.predict_proba(X).shape == (len(X), 1)
    assert (head.predict(X) == 1).all()
    assert (head.proba_sensitive(X) == 1.0).all()
    assert (small("majority").fit(X, np.zeros(len(X), int)).proba_sensitive(X) == 0.0).all()
    # the grid's row-wise fit keeps scdm's labels: classes_ is (0, 1) even with one class present
    rows = np.arange(10)
    grid = small("majority").fit_rows(X, rows, np.ones(len(X), int))
    assert list(grid.classes_) == [0, 1]
    assert (grid.predict_proba(X)[:, 1] == 1.0).all()


def test_installed_solutions_and_row_wise_fits_have_0_1_classes() -> None:
    X, y = planted()
    fitted = small("ridge").fit(X, np.where(y == 1, "b", "a"))
    installed = small("ridge").set_solution(fitted.coef_, fitted.intercept_)
    assert list(installed.classes_) == [0, 1]
    np.testing.assert_allclose(installed.predict_proba(X), fitted.predict_proba(X))
    frame_fit = small("logreg").fit(pd.DataFrame(X, columns=[f"d{i}" for i in range(X.shape[1])]), y)
    refit = frame_fit.fit_rows(X, np.arange(len(X)), y)  # a space's matrix: no column names any more
    assert not hasattr(refit, "feature_names_in_")
    refit.predict_proba(X)  # and no warning about missing names


@pytest.mark.parametrize("name", INDUCTIVE)
def test_clone_pipeline_and_cross_validation(name: str) -> None:
    X, y = planted()
    head = small(name)
    twin = clone(head)
    assert twin is not head and twin.get_params() == head.get_params() and repr(twin) == repr(head)
    assert clone(head.set_params(**head.get_params())).get_params() == head.get_params()
    scores = cross_val_score(make_pipeline(StandardScaler(), head), X, y, cv=3, scoring="roc_auc")
    assert scores.shape == (3,) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", INDUCTIVE)
def test_a_deep_copy_predicts_the_same(name: str) -> None:
    """In-memory copies (deepcopy, joblib workers) work like any estimator; scdm itself never unpickles a head."""
    X, y = planted()
    head = small(name).fit(X, y)
    np.testing.assert_array_equal(copy.deepcopy(head).predict_proba(X), head.predict_proba(X))


def test_dann_fits_with_a_target_and_any_two_labels() -> None:
    X, y = planted(n=80)
    target = planted(n=40, seed=1)[0] + 0.3
    head = small("dann").fit(X, np.where(y == 1, "S", "R"), target=target)
    assert list(head.classes_) == ["R", "S"]
    proba = head.predict_proba(target)
    assert proba.shape == (40, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    with pytest.raises(InputDataError, match="target"):
        small("dann").fit(X, y)
    with pytest.raises(InputDataError, match=r"target must be a non-empty \(n_target, 6\)"):
        small("dann").fit(X, y, target=target[:, :4])


def test_dann_refuses_one_target_cell_clearly_so_the_grid_skips_that_fold() -> None:
    # a held-out fold of one cell made every target batch that one cell: batch normalisation raised a bare
    # ValueError mid-fit ("Expected more than 1 value per channel"), which stopped the whole evaluation
    X, y = planted(n=80)
    with pytest.raises(InputDataError, match="at least 2 target cells"):
        small("dann").fit(X, y, target=X[:1])
