"""Keys that find identical cells (embedding or expression rows) in one pass over a matrix.

Used to notice the same cells under two dataset names, where a split or a transfer would train on
one copy and score the other.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 2048
"""Rows per float64 block (a few MB of temporaries even at 3,072 columns; no copy of the matrix)."""


def row_keys(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One float64 per row (a fixed random projection) and whether the row holds any non-zero value.

    Equal rows have equal keys; rows with equal keys still have to be compared exactly. All-zero rows
    are flagged because they are no evidence of a copy: unrelated cells with nothing in a baseline's
    genes (or the features used) share them.
    """
    direction = np.random.default_rng(0).standard_normal(X.shape[1])
    keys = np.empty(X.shape[0])
    informative = np.empty(X.shape[0], bool)
    for lo in range(0, X.shape[0], _BLOCK_ROWS):
        block = np.asarray(X[lo:lo + _BLOCK_ROWS])
        keys[lo:lo + len(block)] = block.astype(np.float64) @ direction
        informative[lo:lo + len(block)] = block.any(axis=1)
    return keys, informative
