"""Evaluation without copies of the matrix (issue 19 point 4): same numbers, no n x dim copies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scdm.classify import grid, tasks
from scdm.classify._logreg_batch import _Rows, fit_logreg_folds
from scdm.classify.heads import LogRegHead


@pytest.fixture()
def data():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((900, 24)) * 3 + 5).astype(np.float32)
    y = (X[:, :3].sum(1) + rng.standard_normal(900) > 15).astype(np.int8)
    return X, y


def test_the_row_view_reads_exactly_what_a_copy_of_the_rows_holds(data):
    X, _ = data
    rng = np.random.default_rng(0)
    for rows in (None, np.arange(100, 700), np.sort(rng.choice(900, 500, replace=False)), rng.permutation(900)[:300]):
        copy = X if rows is None else X[rows]
        view = _Rows(X, rows)
        assert view.shape == copy.shape
        assert np.array_equal(view[10:250], copy[10:250])
        picks = np.array([0, 7, len(copy) - 1])
        assert np.array_equal(view[picks], copy[picks])
        shift = copy[::7].mean(axis=0).astype(np.float32)
        out = np.empty((64, X.shape[1]), np.float32)
        assert np.array_equal(view.centred(5, 69, shift, out), copy[5:69] - shift)  # bit for bit


def test_logreg_folds_on_rows_of_the_matrix_match_a_fit_on_their_copy_and_leave_the_matrix_alone(data, monkeypatch):
    X, y = data
    rows = np.sort(np.random.default_rng(1).choice(900, 600, replace=False))
    train = np.stack([np.arange(600) % 3 != k for k in range(3)], axis=1)
    before = X.copy()
    monkeypatch.setattr("scdm.classify._logreg_batch._BLOCK_BYTES", 24 * 4 * 128)  # several blocks per pass
    blocked = fit_logreg_folds(X, y[rows], train, rows=rows, tol=1e-8, max_iter=500)
    assert np.array_equal(X, before)
    monkeypatch.setattr("scdm.classify._logreg_batch._BLOCK_BYTES", 1 << 30)  # one block: the whole split at once
    whole = fit_logreg_folds(X[rows].copy(), y[rows], train, tol=1e-8, max_iter=500)
    np.testing.assert_array_equal(blocked.mean, whole.mean)
    np.testing.assert_array_equal(blocked.scale, whole.scale)
    # the same optimum, to the float32 objective's precision floor (block sums change the rounding, not the problem)
    np.testing.assert_allclose(blocked.coef, whole.coef, atol=1e-4 * np.abs(whole.coef).max())
    np.testing.assert_allclose(blocked.intercept, whole.intercept, atol=1e-4 * np.abs(whole.coef).max())
    assert blocked.converged.all() and whole.converged.all()


def test_predictions_in_blocks_are_the_whole_predictions(data, monkeypatch):
    X, y = data
    head = LogRegHead().fit(X[:600], y[:600])
    positions = np.random.default_rng(2).permutation(900)[:700]
    monkeypatch.setattr(tasks, "PREDICT_BLOCK_ROWS", 64)
    assert np.array_equal(tasks.predict_in_blocks(head, X, positions), head.proba_sensitive(X[positions]))


class _OneMatrix:
    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix

    def read_embedding(self, embedding_id: str) -> np.ndarray:
        return self.matrix


def test_a_single_embedding_is_used_as_read_not_copied(data):
    X, y = data
    cells = pd.DataFrame({"dataset_id": "d", "row": np.arange(100, 900), "response": y[100:]})
    space = tasks.Space("s", "m", "", pd.DataFrame({"embedding_id": ["e"], "dataset_id": ["d"], "dataset_name": ["d"], "dim": [24]}),
                        cells=cells)
    grid._load_matrix(_OneMatrix(X), space)  # type: ignore[arg-type]
    assert space.X is not None and np.shares_memory(space.X, X)
    assert np.array_equal(space.X, X[100:])
    assert np.array_equal(space.positions(cells.iloc[[0, 5]]), [0, 5])
    # cells out of order or from several embeddings are gathered into one matrix, as before
    shuffled = cells.iloc[::-1].reset_index(drop=True)
    other = tasks.Space("s", "m", "", space.embeddings, cells=shuffled)
    grid._load_matrix(_OneMatrix(X), other)  # type: ignore[arg-type]
    assert other.X is not None and not np.shares_memory(other.X, X)
    assert np.array_equal(other.X, X[100:][::-1])
