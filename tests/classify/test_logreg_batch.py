"""The grid's batched logistic regression: every fold's answer is its own scikit-learn fit's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from scdm.classify._logreg_batch import fit_logreg_folds
from scdm.classify.heads import HeadConvergenceWarning, LogRegHead, column_moments


def _objective(Xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, C: float) -> float:
    z = Xs @ w + b
    return float(np.mean(np.logaddexp(0, z) - y * z) + w @ w / (2 * C * len(y)))


@pytest.fixture(scope="module")
def folds_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n, dim, k = 1500, 24, 4
    # uneven scales and offsets: standardisation per fold matters
    X = (rng.standard_normal((n, dim)) * rng.uniform(0.3, 4, dim) + rng.normal(0, 5, dim)).astype(np.float32)
    y = (X[:, 0] / 2 - X[:, 1] + rng.normal(0, 2, n) > X[:, 1].mean() / 2).astype(np.int8)
    fold = rng.integers(0, k, n)
    train = np.stack([fold != f for f in range(k)], axis=1)
    train[:50, 0] = True  # folds of unequal size, some cells in every training set
    return X, y, train


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_each_fold_reaches_its_own_optimum(folds_data, C):
    X, y, train = folds_data
    fits = fit_logreg_folds(X.copy(), y, train, C=C, tol=1e-9, max_iter=500, standardize=True)
    for k in range(train.shape[1]):
        rows = train[:, k]
        mean, scale = column_moments(X[rows])
        np.testing.assert_allclose(fits.mean[k], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fits.scale[k], scale, rtol=1e-5)
        Xs = (X[rows].astype(np.float64) - mean) / scale
        reference = LogisticRegression(C=C, tol=1e-12, max_iter=5000).fit(Xs, y[rows])
        ours = _objective(Xs, y[rows], fits.coef[k], fits.intercept[k], C)
        best = _objective(Xs, y[rows], reference.coef_[0], reference.intercept_[0], C)
        assert ours == pytest.approx(best, rel=1e-7, abs=1e-9)
        np.testing.assert_allclose(fits.coef[k], reference.coef_[0], atol=2e-3 * np.abs(reference.coef_[0]).max())
    assert fits.converged.all()


def test_batched_folds_match_the_head_fold_by_fold(folds_data):
    """What the grid installs predicts like LogRegHead.fit on the fold (default tolerance)."""
    X, y, train = folds_data
    fits = fit_logreg_folds(X.copy(), y, train)
    for k in range(train.shape[1]):
        rows = train[:, k]
        alone = LogRegHead().fit(X[rows], y[rows])
        batched = LogRegHead().set_solution(fits.coef[k], fits.intercept[k], mean=fits.mean[k], scale=fits.scale[k])
        # both stop at max |gradient| <= 1e-4, from different paths: equal to that precision
        gap = np.abs(batched.proba_sensitive(X[~rows]) - alone.proba_sensitive(X[~rows]))
        assert gap.max() < 2e-2 and gap.mean() < 1e-3


def test_fold_independence(folds_data):
    """A fold's answer does not depend on which other folds share its batch."""
    X, y, train = folds_data
    together = fit_logreg_folds(X.copy(), y, train, tol=1e-5)
    alone = fit_logreg_folds(X.copy(), y, train[:, [2]], tol=1e-5)
    np.testing.assert_allclose(together.coef[2], alone.coef[0], atol=1e-4 * np.abs(alone.coef[0]).max())
    assert together.n_iter[2] == alone.n_iter[0]


def test_max_iter_is_reported_not_hidden(folds_data):
    X, y, train = folds_data
    fits = fit_logreg_folds(X.copy(), y, train, tol=1e-12, max_iter=2)
    assert (fits.n_iter == 2).all() and not fits.converged.any()
    with pytest.warns(HeadConvergenceWarning, match="max_iter=2"):
        LogRegHead(max_iter=2).set_solution(fits.coef[0], fits.intercept[0], converged=False)


def test_unstandardised_problem(folds_data):
    X, y, train = folds_data
    Xs = (X - X.mean(0)) / X.std(0)  # well scaled, so the raw problem converges too
    fits = fit_logreg_folds(Xs.copy(), y, train[:, :1], standardize=False, tol=1e-9, max_iter=500)
    reference = LogisticRegression(tol=1e-12, max_iter=5000).fit(Xs[train[:, 0]].astype(np.float64), y[train[:, 0]])
    np.testing.assert_allclose(fits.coef[0], reference.coef_[0], atol=2e-3 * np.abs(reference.coef_[0]).max())
    np.testing.assert_array_equal(fits.mean, 0)


def test_column_moments_per_mask_and_constant_columns():
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((5000, 7)) * 3 + 1000).astype(np.float32)  # large offset: shifted sums needed
    X[:, 4] = 2.5
    masks = rng.random((5000, 3)) < 0.7
    mean, scale = column_moments(X, masks, block_rows=512)
    for k in range(3):
        rows = X[masks[:, k]].astype(np.float64)
        np.testing.assert_allclose(mean[k], rows.mean(0), rtol=1e-6)
        expected = rows.std(0)
        expected[4] = 1.0  # constant column: scale 1, as _standardizer always did
        np.testing.assert_allclose(scale[k], expected, rtol=1e-4)


def test_column_moments_are_the_same_bits_for_any_thread_count():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((9000, 5)) * 2 + 50).astype(np.float32)
    masks = rng.random((9000, 2)) < 0.6
    one = column_moments(X, masks, block_rows=256, threads=1)
    for threads in (2, 3):
        more = column_moments(X, masks, block_rows=256, threads=threads)
        np.testing.assert_array_equal(one[0], more[0])
        np.testing.assert_array_equal(one[1], more[1])
    np.testing.assert_allclose(one[0][1], X[masks[:, 1]].astype(np.float64).mean(0), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_fold_scores_every_cell_as_its_head_would(folds_data, threads):
    """The grid's scores (``decisions``) are each fold's head applied to the rows, to float32 rounding."""
    X, y, train = (np.repeat(a, 40, axis=0) for a in folds_data)  # several 4 MiB blocks: several groups of them
    rows = np.sort(np.random.default_rng(4).choice(len(X), 50_000, replace=False))  # a split's cells inside a larger matrix
    plain = fit_logreg_folds(X, y[rows], train[rows], rows=rows, threads=threads)
    fits = fit_logreg_folds(X, y[rows], train[rows], rows=rows, threads=threads, decisions=True)
    assert plain.decision is None and fits.decision is not None and fits.decision.shape == (rows.size, train.shape[1])
    np.testing.assert_array_equal(plain.coef, fits.coef)  # scoring changes nothing of the fit
    for k in range(train.shape[1]):
        head = LogRegHead().set_solution(fits.coef[k], fits.intercept[k], mean=fits.mean[k], scale=fits.scale[k])
        expected = head.decision_function(X[rows])
        np.testing.assert_allclose(fits.decision[:, k], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_rows_in_runs_are_centred_bit_for_bit_as_a_gather():
    """A category's rows (whole datasets: runs of consecutive rows) are centred run by run, the same bits."""
    from scdm.classify._logreg_batch import _Rows

    rng = np.random.default_rng(6)
    X = rng.standard_normal((3000, 9)).astype(np.float32) * 3 + 7
    shift = X[::7].mean(axis=0)
    runs = np.concatenate([np.arange(100, 400), np.arange(900, 1000), np.arange(1000 - 1000, 200), np.arange(2500, 3000)])
    scattered = np.sort(rng.choice(3000, 700, replace=False))
    for rows, in_runs in ((runs, True), (scattered, False)):
        view = _Rows(X, rows)
        assert (view.runs is not None) == in_runs
        out = np.empty((257, 9), np.float32)
        for lo in range(0, rows.size, 257):  # blocks straddle the runs' ends
            hi = min(lo + 257, rows.size)
            np.testing.assert_array_equal(view.centred(lo, hi, shift, out), X[rows][lo:hi] - shift)


def test_logreg_head_probabilities_are_sklearns():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((400, 10)).astype(np.float32)
    y = (X[:, 0] + rng.normal(0, 1, 400) > 0).astype(np.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadConvergenceWarning)
        head = LogRegHead().fit(X, y)
    Xs = (X - head.mean_) / head.scale_
    np.testing.assert_allclose(head.proba_sensitive(X), head.model_.predict_proba(Xs)[:, 1], atol=1e-6)


def test_logreg_artifacts_saved_before_coef_attributes_still_predict():
    """Trained-head artifacts (joblib) from before coef_/intercept_ keep predicting the same."""
    import pickle

    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int8)
    head = LogRegHead().fit(X, y)
    expected = head.proba_sensitive(X)
    old_style = LogRegHead()
    old_style.__dict__.update({k: v for k, v in vars(head).items() if k not in ("coef_", "intercept_")})
    restored = pickle.loads(pickle.dumps(old_style))
    np.testing.assert_allclose(restored.proba_sensitive(X), expected, rtol=1e-12)


def test_threads_sharing_a_pass_give_the_same_bits_and_the_grid_uses_them(folds_data, monkeypatch):
    X, y, train = folds_data
    big = np.repeat(X, 40, axis=0)  # enough 4 MiB blocks for several groups
    yy, tt = np.repeat(y, 40), np.repeat(train, 40, axis=0)
    one = fit_logreg_folds(big, yy, tt, max_iter=15, threads=1)
    two = fit_logreg_folds(big, yy, tt, max_iter=15, threads=2)
    np.testing.assert_array_equal(one.coef, two.coef)
    np.testing.assert_array_equal(one.intercept, two.intercept)

    # the grid hands its thread allowance to the pass (it sets one BLAS thread for the solver steps)
    from scdm.classify import _logreg_batch, grid
    from scdm.classify._threads import gemm_threads

    seen = []
    real = _logreg_batch._Problem.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(len(self.buffers))

    monkeypatch.setattr(_logreg_batch._Problem, "__init__", spy)
    monkeypatch.setattr("scdm.classify._threads.cpu_budget", lambda: 2)

    class _Space:
        pass

    space = _Space()
    space.X, space.y = big, yy
    space.positions = lambda cells: np.arange(big.shape[0])
    from types import SimpleNamespace

    import pandas as pd

    cells = pd.DataFrame({"dataset_id": "d", "row": np.arange(big.shape[0])})
    split = SimpleNamespace(split_id="s", cells=cells, train_mask=lambda f: tt[:, f], test_mask=lambda f: ~tt[:, f])
    tasks = [SimpleNamespace(params_key="{}", split=split, fold=f, params={"max_iter": 3}) for f in range(tt.shape[1])]
    with gemm_threads(10**9):  # as _math_threads sets it for one large space
        list(grid._logreg_outcomes(space, tasks))
    assert seen == [2]


def test_a_fold_that_backtracks_costs_the_others_no_pass(folds_data, monkeypatch):
    """Folds move at their own pace: a batch takes as many passes as its slowest fold alone."""
    from scdm.classify import _logreg_batch

    X, y, train = folds_data
    passes = [0]
    real = _logreg_batch._Problem.value_and_grad

    def counting(self, *args):
        passes[0] += 1
        return real(self, *args)

    monkeypatch.setattr(_logreg_batch._Problem, "value_and_grad", counting)
    alone = []
    for k in range(train.shape[1]):
        passes[0] = 0
        fit_logreg_folds(X.copy(), y, train[:, [k]], tol=1e-5)
        alone.append(passes[0])
    passes[0] = 0
    fit_logreg_folds(X.copy(), y, train, tol=1e-5)
    assert passes[0] == max(alone)
    assert len(set(alone)) > 1  # the folds do need different numbers of evaluations


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_moments_of_rows_are_the_moments_of_their_copy(dtype):
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((7000, 6)) * 2 + 300).astype(dtype)
    rows = rng.permutation(7000)[:5100]
    masks = rng.random((5100, 2)) < 0.5
    for args in ((), (masks,)):
        expected = column_moments(X[rows], *args, block_rows=512, threads=2)
        got = column_moments(X, *args, block_rows=512, threads=2, rows=rows)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))  # the same bits, no copy of the rows


def test_unstandardised_problem_far_from_the_origin_reaches_the_optimum():
    # standardize=False was solved in the embedding's own coordinates: columns at 1e4 with sd 0.5 coupled the
    # intercept to every weight and L-BFGS stopped at the float precision floor, log-odds 0.5 sd from the
    # optimum and 9% of pairs of cells reordered. It is solved about each fold's mean (the same objective).
    rng = np.random.default_rng(0)
    n, dim = 3000, 32
    Z = rng.standard_normal((n, dim))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-1.5 * Z @ rng.standard_normal(dim) / np.sqrt(dim)))).astype(np.int64)
    X = (1e4 + 0.5 * Z).astype(np.float32)
    train = (np.arange(n) % 3 != 0)[:, None]
    fits = fit_logreg_folds(X, y, train, standardize=False, decisions=True)
    X64 = X.astype(np.float64)
    mean = X64[train[:, 0]].mean(axis=0)
    reference = LogisticRegression(tol=1e-10, max_iter=10_000).fit(X64[train[:, 0]] - mean, y[train[:, 0]])
    expected = (X64 - mean) @ reference.coef_[0] + reference.intercept_[0]
    raw = X64 @ fits.coef[0] + fits.intercept[0]  # weights and intercept of the embedding as it is
    assert np.abs(raw - expected).max() < 1e-2 * expected.std()
    np.testing.assert_array_equal(fits.mean, 0)
    np.testing.assert_allclose(fits.decision[:, 0], raw, atol=1e-4 * expected.std())
