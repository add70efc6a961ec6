"""Classification heads: one interface for every classifier the grid trains on embeddings.

Every head follows the scikit-learn conventions::

    head = get_head("logreg", C=0.5)       # parameters are only stored here
    head.fit(X_train, y_train)             # validated here, against ``_rules``; returns self
    p = head.predict_proba(X_test)[:, 1]   # probability of classes_[1]: "sensitive" for 0/1 labels
    p = head.proba_sensitive(X_test)       # the same, 1-D, for scdm's 0/1 labels

They are scikit-learn classifiers (:mod:`scdm.classify.head_base`): ``clone``, ``Pipeline`` and
``cross_val_score`` take them; their ``seed`` is scikit-learn's ``random_state``.

Fitted state ends in ``_`` and is set only in ``fit``; ``predict_proba`` first calls
:func:`check_fitted`. Heads that standardise do it with the mean and standard deviation of the
training cells only, so nothing about the test cells leaks into the fit.

Heads: ``mlp`` (the scDrugMap network, with a profile that trains at every fold size and one that
reproduces the paper's code), ``logreg``, ``lightgbm``, ``ridge`` (closed form, with the
Gram-downdate helpers the grid uses to solve every fold from one pass over the data),
``majority``, ``shuffled-label`` (a leakage alarm: it must score at chance) and ``dann``
(scDEAL's domain adaptation, :mod:`scdm.classify._transfer_dann`).

Input standardisation
    ``logreg``, ``ridge`` and ``mlp`` take ``standardize``, computed on the training cells only:

    - ``"global"`` (the default of all three, and of the mlp's ``default`` and ``fast`` profiles):
      centre every column and divide all of them by one number, the root mean square of the
      centred values. The inputs have unit size whatever the embedding's units (so ``C``,
      ``alpha`` and the learning rate mean the same for every model), and the columns keep their
      relative scales;
    - ``True``: scale every column to unit variance. It gives every column the same weight, which
      hurts PCA-type embeddings, whose variance ordering *is* the information (scaled, PC50's
      noise weighs as much as PC1: A375 pca logreg AUROC 0.956 against 1.000 with ``"global"``,
      JHU006 0.72 against 1.00); it may help embeddings with a few huge, uninformative columns;
    - ``False``: the embedding as it is (ridge and logreg still fit an unpenalised intercept; the
      mlp's ``paper`` profile, as scDrugMap's code).

    Whatever the setting, ``logreg`` and ``ridge`` solve about the training mean (the same objective:
    their intercept is unpenalised) and in float64, and score cells in float64
    (:func:`linear_scores`): embeddings with columns far from the origin (a foundation model's
    dimensions at 300 with sd 0.5, an LLM's massive activations near 1e3) give scikit-learn's
    float64 numbers, with float32 storage too.

    The default was chosen by measurement (10-fold pooled AUROC on A375 and JHU006 pca and hvg and
    on the planted synthetic collection, pca and hvg: ``"global"`` was the best, or within 0.003
    of it, for all three heads on every one); foundation-model embeddings could not be measured
    without their weights.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg

from scdm.classify._lapack import cholesky_lower
from scdm.classify._threads import solve_threads
from scdm.classify._transfer_dann import DANNHead
from scdm.classify.head_base import (
    NONE,
    BaseHead,
    HeadConvergenceWarning,
    IsType,
    NotFittedError,
    OneOf,
    Range,
    check_fitted,
    column_moments,
    torch_seeded,
)
from scdm.store.errors import InputDataError
from scdm.store.evaluation import OUTSIDE_GRID_REVISIONS
from scdm.store.warning_scopes import recording

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "MLP_PROFILES",
    "BaseHead",
    "DANNHead",
    "GramStats",
    "HeadConvergenceWarning",
    "LightGBMHead",
    "LogRegHead",
    "MLPHead",
    "MajorityHead",
    "NotFittedError",
    "RidgeHead",
    "ShuffledLabelHead",
    "check_fitted",
    "column_moments",
    "get_head",
    "linear_scores",
    "mlp_train_flops",
    "respelled_params_key",
    "ridge_from_stats",
    "ridge_score_to_proba",
    "torch_seeded",
]


def _standardizer(X: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of the training rows (``X[rows]``); constant columns get scale 1."""
    return column_moments(X, rows=rows)


def _global_standardizer(X: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column means and one shared scale: the root mean square of the centred training values.

    Constant columns (dead or zero-padded dimensions) add 0 to it, as in ridge's global scaling:
    counted as 1 they would inflate the scale, and with it the penalty, by orders of magnitude.
    """
    mean, scale = column_moments(X, rows=rows, constant_scale=0.0)
    rms = float(np.sqrt(np.mean(np.square(scale.astype(np.float64)))))
    return mean, np.full_like(scale, rms if rms > 1e-12 else 1.0)


def _scaling(X: np.ndarray, standardize: bool | str, rows: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(mean, scale) of the training rows (``X[rows]``) for a head's ``standardize`` setting; (None, None) for False."""
    if standardize == "global":
        return _global_standardizer(X, rows)
    return _standardizer(X, rows) if standardize else (None, None)


# --------------------------------------------------------------------------------------------
# Sanity baselines
# --------------------------------------------------------------------------------------------
class MajorityHead(BaseHead):
    """Predicts the training share of sensitive cells for every cell (AUROC 0.5 by construction)."""

    name = "majority"
    needs_both_classes = False
    scores_at_chance = True

    def __init__(self) -> None:
        pass

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.prior_ = float(y.mean())

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full(X.shape[0], self.prior_)

    def _fit_rows(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
        self._fit(X[:0], y)  # reads no embedding at all

    def _predict_proba_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.full(rows.size, self.prior_)


class ShuffledLabelHead(BaseHead):
    """Fits ``base`` on randomly permuted training labels: must score at chance (leakage alarm).

    If it scores clearly above chance, test information leaks into training (for example the
    same cells or samples on both sides of a split).
    """

    name = "shuffled-label"
    scores_at_chance = True
    _rules = {"base": [OneOf(("logreg", "ridge", "mlp", "lightgbm"))], "seed": [Range(int, ge=0)],
              "base_params": [IsType(dict), NONE]}

    def __init__(self, base: str = "ridge", *, seed: int = 0, base_params: dict[str, Any] | None = None) -> None:
        self.base = base
        self.seed = seed
        self.base_params = base_params

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        self.permutation_ = rng.permutation(y.size)
        self.head_ = get_head(self.base, **(self.base_params or {})).fit(X, y[self.permutation_])

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head_.proba_sensitive(X)  # head_ was fitted on the 0/1 encoding of this head's labels

    def _fit_rows(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
        # the same permutation of the training labels as _fit's, placed at their rows of X
        rng = np.random.default_rng(self.seed)
        self.permutation_ = rng.permutation(y.size)
        placed = np.zeros(X.shape[0], dtype=y.dtype)
        placed[rows] = y[self.permutation_]
        self.head_ = get_head(self.base, **(self.base_params or {})).fit_rows(X, rows, placed)

    def _predict_proba_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.head_.predict_proba_rows(X, rows)

    def revision(self) -> int:
        """4, whatever its base: a ridge or logreg base scores in float64 and a logreg base is fitted on
        float64 rows (its revision 4). 3: its probabilities are scored in float64 (before: rounded to float32,
        which tied the most confident cells; its mlp base's sigmoid ran in float32). Revision 2 was its logreg
        or mlp base's global scale (a ridge base, fitted one fold at a time, never needed ridge's own 2)."""
        return 4

    def _keyed_params(self) -> dict[str, Any]:
        """The parameters, an mlp base's resolved as its own key resolves them.

        Its profile's settings and the precision ``auto`` stands for on this machine: a bf16 and an
        fp32 fit of the baseline are never one result, as for the mlp head itself.
        """
        params = self.get_params()
        if self.base == "mlp":
            params["base_params"] = HEADS["mlp"](**(self.base_params or {}))._keyed_params()
        return params

    @classmethod
    def canonical_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters spelled by the rules, ``base_params`` by its base head's (``C=1`` of a logreg base too)."""
        out = super().canonical_params(params)
        base, base_params = out.get("base", "ridge"), out.get("base_params")
        if isinstance(base, str) and base in HEADS and isinstance(base_params, dict):
            out["base_params"] = HEADS[base].canonical_params(base_params)
        return out


# --------------------------------------------------------------------------------------------
# Ridge (closed form) and its Gram statistics
# --------------------------------------------------------------------------------------------
@dataclass
class GramStats:
    """Sufficient statistics of a least-squares fit over a set of rows.

    All sums are over ``X - shift`` (a fixed vector shared by stats that are added or
    subtracted), which keeps the float64 centring accurate when embeddings have large means.
    Stats of disjoint row sets add; the stats of a training fold are ``total - test_fold``
    (a downdate: no pass over the training rows).
    """

    n: float
    """Number of rows."""
    sx: np.ndarray
    """Sum of shifted rows, shape (emb_dim,)."""
    sy: float
    """Sum of labels."""
    sxx: np.ndarray
    """Gram matrix of shifted rows, shape (emb_dim, emb_dim), float64, Fortran order, *lower
    triangle only* (the upper triangle is zero: every consumer reads the lower half)."""
    sxy: np.ndarray
    """Shifted rows times labels, shape (emb_dim,)."""
    shift: np.ndarray
    """The shift subtracted from every row before summing, shape (emb_dim,)."""

    @classmethod
    def zeros(cls, dim: int, shift: np.ndarray | None = None, *, out: np.ndarray | None = None) -> GramStats:
        """Empty statistics for ``dim`` features (``out``: a (dim, dim) Fortran buffer to reuse)."""
        shift = np.zeros(dim, np.float32) if shift is None else np.asarray(shift, np.float32)
        if out is None:
            sxx = np.zeros((dim, dim), order="F")
        else:
            sxx = out
            sxx.fill(0.0)
        return cls(0.0, np.zeros(dim), 0.0, sxx, np.zeros(dim), shift)

    @classmethod
    def from_rows(cls, X: np.ndarray, y: np.ndarray, *, shift: np.ndarray | None = None,
                  block_rows: int = 8192, out: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> GramStats:
        """Statistics of ``X`` (n, dim) and ``y`` (n,) in one pass over the rows.

        By default the Gram matrix of each float32 block is summed in float64. With ``out`` (a
        float32 Fortran-ordered (dim, dim) buffer, reused by the caller) the sum stays in float32
        inside ``out``: half the memory, no allocation; the grid uses it for fold statistics.
        With ``rows``, only those rows of ``X`` (and ``y``) count, gathered block by block: no
        copy of the selection.
        """
        dim = X.shape[1]
        shift = np.zeros(dim, np.float32) if shift is None else np.asarray(shift, np.float32)
        if out is None:
            stats = cls.zeros(dim, shift)
            stats.add_rows(X, y, block_rows=block_rows, rows=rows)
            return stats
        if out.dtype != np.float32 or out.shape != (dim, dim) or not out.flags.f_contiguous:
            msg = f"out must be a float32 Fortran-ordered ({dim}, {dim}) array."
            raise InputDataError(msg)
        stats = cls(0.0, np.zeros(dim), 0.0, out, np.zeros(dim), shift)
        out.fill(0.0)
        for block, yb in _shifted_blocks(X, y, shift, rows, block_rows):
            stats.sxx = scipy.linalg.blas.ssyrk(1.0, block.T, beta=1.0, c=stats.sxx, trans=0, lower=1, overwrite_c=1)
            stats._add_vectors(block, yb)
        return stats

    def add_rows(self, X: np.ndarray, y: np.ndarray, *, block_rows: int = 8192, rows: np.ndarray | None = None) -> None:
        """Accumulate rows in place with a symmetric rank-k update (half the FLOPs of X.T @ X)."""
        dim = self.sx.shape[0]
        gram = np.zeros((dim, dim), np.float32, order="F")  # reused across blocks
        for block, yb in _shifted_blocks(X, y, self.shift, rows, block_rows):
            # block.T is Fortran-ordered (dim, rows): ssyrk computes block.T @ block, lower half,
            # in float32; the sum over blocks is kept in float64.
            gram = scipy.linalg.blas.ssyrk(1.0, block.T, beta=0.0, c=gram, trans=0, lower=1, overwrite_c=1)
            self.sxx += gram
            self._add_vectors(block, yb)

    def _add_vectors(self, block: np.ndarray, yb: np.ndarray) -> None:
        self.sx += block.sum(axis=0, dtype=np.float64)
        self.sxy += (yb @ block).astype(np.float64)
        self.sy += float(yb.sum(dtype=np.float64))
        self.n += block.shape[0]

    def _combine(self, other: GramStats, sign: float) -> GramStats:
        if not np.array_equal(self.shift, other.shift):
            msg = "GramStats with different shifts cannot be combined; build them with the same shift."
            raise InputDataError(msg)
        sxx = np.add(self.sxx, other.sxx) if sign > 0 else np.subtract(self.sxx, other.sxx)
        return GramStats(self.n + sign * other.n, self.sx + sign * other.sx, self.sy + sign * other.sy,
                         sxx, self.sxy + sign * other.sxy, self.shift)

    def __add__(self, other: GramStats) -> GramStats:
        return self._combine(other, 1.0)

    def __sub__(self, other: GramStats) -> GramStats:
        return self._combine(other, -1.0)

    def iadd(self, other: GramStats) -> GramStats:
        """In-place ``self += other`` (no new dim x dim matrix); ``other`` may be about another shift.

        Stats of another shift are moved to this one in float64 (see :func:`_moved_sums`), so each
        set of rows can be summed about its own mean, where its float32 sums keep their precision.
        """
        self.sxx += other.sxx
        sx, sxy, step = _moved_sums(other, self.shift)
        if step is not None:
            _move_gram(self.sxx, step, other.sx, other.n, sign=1.0)
        self.sx += sx
        self.sxy += sxy
        self.sy += other.sy
        self.n += other.n
        return self


def _moved_sums(stats: GramStats, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``stats``' row and label-weighted sums about ``shift`` instead of its own shift, and the step
    ``d = stats.shift - shift`` (None when the shifts are equal: nothing moves).

    Rows about ``shift`` are ``(x - stats.shift) + d``: their sum gains ``n d``, their label-weighted
    sum ``sy d``, and their Gram matrix ``d sx^T + sx d^T + n d d^T`` (:func:`_move_gram`).
    """
    if np.array_equal(stats.shift, shift):
        return stats.sx, stats.sxy, None
    step = stats.shift.astype(np.float64) - np.asarray(shift, np.float64)
    return stats.sx + stats.n * step, stats.sxy + stats.sy * step, step


def _move_gram(lower: np.ndarray, step: np.ndarray, sx: np.ndarray, n: float, *, sign: float) -> None:
    """Add ``sign * (d sx^T + sx d^T + n d d^T)`` to the lower triangle of a float64 Fortran matrix, in place."""
    if lower.dtype != np.float64 or not lower.flags.f_contiguous:
        msg = "GramStats of another shift are added into float64 (Fortran-ordered) statistics only."
        raise ValueError(msg)
    out = scipy.linalg.blas.dsyr2(sign, step, np.asarray(sx, np.float64), a=lower, lower=1, overwrite_a=1)
    out = scipy.linalg.blas.dsyr(sign * n, step, a=out, lower=1, overwrite_a=1)
    assert np.shares_memory(out, lower)  # overwrite_a on a Fortran float64 matrix: updated in place


def _shifted_blocks(X: np.ndarray, y: np.ndarray, shift: np.ndarray, rows: np.ndarray | None,
                    block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows - shift, labels) in float32 blocks, written into one reused buffer.

    A fresh 100 MB block per step costs page faults that rival the rank-k update itself.
    """
    y = np.asarray(y, np.float32).ravel()
    n = X.shape[0] if rows is None else rows.size
    if n == 0:
        return
    buffer = np.empty((min(block_rows, n), X.shape[1]), np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        block = buffer[: stop - start]
        if rows is None:
            np.subtract(X[start:stop], shift, out=block)
            yield block, y[start:stop]
        else:
            index = rows[start:stop]
            if X.dtype == np.float32:
                np.take(X, index, axis=0, out=block)
            else:
                block[...] = X[index]
            block -= shift
            yield block, y[index]


def ridge_from_stats(stats: GramStats, alpha: float, *, standardize: bool | Literal["global"] = "global",
                     minus: GramStats | None = None, work: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression of y on X from sufficient statistics.

    Minimises ``||y - b - Z w_z||^2 + alpha ||w_z||^2`` with ``Z`` the training rows standardised
    by their own mean and standard deviation (only centred if ``standardize=False``; centred and
    divided by the root mean square of all centred values if ``"global"``) and an unpenalised
    intercept ``b``. Returned in the original coordinates: ``score = X @ coef + intercept``.

    Solving in original coordinates, ``(C + alpha * diag(sigma^2)) w = c`` with ``C`` the centred
    Gram matrix, is the same as the standardised problem and avoids scaling a dim x dim matrix.

    Parameters
    ----------
    stats : GramStats
        Statistics of the training rows, or of all rows when ``minus`` is given.
    alpha : float
    standardize : bool or "global", default "global"
    minus : GramStats, optional
        Statistics of the held-out fold: the fit uses ``stats - minus`` (the fold downdate). It may be
        summed about another shift than ``stats`` (moved to it in float64).
    work : ndarray of shape (emb_dim, emb_dim), float64, Fortran order, optional
        Scratch matrix the solve overwrites; pass one to reuse across many solves (a fresh
        dim x dim allocation costs more than the subtraction itself).

    Returns
    -------
    coef : ndarray of shape (emb_dim,)
    intercept : float
    """
    step = None
    if minus is not None:
        # a held-out fold summed about its own mean (a cross-data atom) is moved to the total's shift in float64
        minus_sx, minus_sxy, step = _moved_sums(minus, stats.shift)
        n, sx, sy, sxy = stats.n - minus.n, stats.sx - minus_sx, stats.sy - minus.sy, stats.sxy - minus_sxy
    else:
        n, sx, sy, sxy = stats.n, stats.sx, stats.sy, stats.sxy
    if work is None or work.shape != stats.sxx.shape or not work.flags.f_contiguous:
        work = np.empty(stats.sxx.shape, order="F")
    if n < 1:
        msg = "Ridge needs at least one training row; the statistics hold none."
        raise InputDataError(msg)
    mean = sx / n
    cross = sxy - mean * sy

    def system() -> np.ndarray:
        """The penalised centred Gram matrix, written into ``work`` (lower triangle valid)."""
        if minus is not None:
            np.subtract(stats.sxx, minus.sxx, out=work)
            if step is not None:
                _move_gram(work, step, minus.sx, minus.n, sign=-1.0)
        else:
            np.copyto(work, stats.sxx)
        # ``work`` is Fortran-ordered with a valid lower triangle: BLAS/LAPACK update it in place.
        out = scipy.linalg.blas.dsyr(-n, mean, a=work, lower=1, overwrite_a=1)  # centre: -= n mean mean^T
        diag = np.einsum("ii->i", out)
        if standardize == "global":  # one scale for every column: the mean centred variance
            level = float(np.clip(diag / n, 0.0, None).mean()) if diag.size else 1.0
            diag += (level if level > 1e-12 else 1.0) * alpha
        elif standardize:
            var = np.clip(diag / n, 0.0, None)
            diag += np.where(var > 1e-12, var, 1.0) * alpha
        else:
            diag += float(alpha)
        return out

    with solve_threads():  # a factorisation runs fastest on one BLAS thread (scdm.classify._threads)
        lower = system()
        scale = float(np.einsum("ii->i", lower).mean()) if lower.size else 1.0
        coef = _solve_lower_spd(lower, cross, jitter_scale=scale, rebuild=system)
    intercept = sy / n - float((mean + stats.shift.astype(np.float64)) @ coef)
    return coef, intercept


def _solve_lower_spd(lower: np.ndarray, rhs: np.ndarray, *, jitter_scale: float = 1.0,
                     rebuild: Callable[[], np.ndarray] | None = None) -> np.ndarray:
    """Solve with a Fortran-ordered matrix whose lower triangle is valid (Cholesky).

    With ``rebuild`` (which writes the matrix again and returns it), the factorisation runs in
    place: no dim x dim copy per solve, which at D = 3072 costs a fifth of the solve.
    Gram downdates in float32 can leave a near-singular system (near-constant features, e.g. genes
    expressed in a handful of cells) slightly indefinite; then a growing ridge jitter relative to the
    mean diagonal is added (1e-10 .. 1e-4), which changes well-posed solutions by nothing measurable.
    """
    # not scipy.linalg.lapack.dpotrf: it holds the GIL, so map_solves' threads would factorise one at a time
    factor, info = cholesky_lower(lower, overwrite=rebuild is not None)
    if info == 0:
        coef, info = scipy.linalg.lapack.dpotrs(factor, rhs, lower=1)
        if info == 0:
            return coef
    if rebuild is not None:
        lower = rebuild()  # the failed in-place factorisation overwrote it
    diag = np.einsum("ii->i", lower)
    for exponent in (-10, -8, -6, -4):
        jitter = jitter_scale * 10.0**exponent
        diag += jitter
        factor, info = cholesky_lower(lower)
        diag -= jitter
        if info == 0:
            coef, info = scipy.linalg.lapack.dpotrs(factor, rhs, lower=1)
            if info == 0:
                logger.debug("ridge: added a %.1e jitter to solve a near-singular system", jitter)
                return coef
    msg = ("The ridge system is not positive definite (collinear features with alpha=0, or degenerate "
           "training rows); use alpha > 0, e.g. get_head('ridge', alpha=1.0).")
    raise InputDataError(msg)


def ridge_score_to_proba(score: np.ndarray) -> np.ndarray:
    """Map a linear-probability score to [0, 1] without ties.

    A logistic link centred at 0.5 keeps the ranking (so AUROC/AP are those of the raw score)
    and the 0.5 decision threshold, where clipping to [0, 1] would create ties.
    """
    return 1.0 / (1.0 + np.exp(-4.0 * (np.asarray(score, np.float64) - 0.5)))


SCORE_BLOCK_ROWS = 4096
"""Rows scored at a time by :func:`linear_scores` (their float64 copy: 16 MiB at D = 512)."""


def linear_scores(X: np.ndarray, coef: np.ndarray, intercept: float, *, rows: np.ndarray | None = None,
                  mean: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """``((X - mean) / scale) @ coef + intercept`` of ``X[rows]`` (all rows for None), in float64.

    A linear head's weights live in the embedding's own coordinates, where a column can sit far
    from 0 (a foundation model's dimension at 300 with sd 0.5, an LLM's massive activations near
    1e3): ``X @ coef`` then sums terms far larger than the score and cancels them. In float32 that
    cancellation rounded scores of an embedding 1e4 from the origin by 0.5% of their spread and
    reordered 7 in 10,000 pairs of cells; float32 rows are exact in float64, where it costs nothing
    measurable. Scored block by block: no float64 copy of all the rows (nor of ``X[rows]``).
    """
    n = X.shape[0] if rows is None else rows.size
    coef64 = np.asarray(coef, np.float64)
    mean64 = None if mean is None else np.asarray(mean, np.float64)
    scale64 = None if scale is None else np.asarray(scale, np.float64)
    out = np.empty(n)
    buffer = np.empty((min(n, SCORE_BLOCK_ROWS), X.shape[1]))  # reused: a fresh block per step costs page faults
    for lo in range(0, n, SCORE_BLOCK_ROWS):
        hi = min(lo + SCORE_BLOCK_ROWS, n)
        block = buffer[:hi - lo]
        block[...] = X[lo:hi] if rows is None else X[rows[lo:hi]]  # a copy: X is never written
        if mean64 is not None:
            block -= mean64
        if scale64 is not None:
            block /= scale64
        np.matmul(block, coef64, out=out[lo:hi])
    out += intercept
    return out


class RidgeHead(BaseHead):
    """Ridge regression on the 0/1 label, closed form (one Gram matrix and one Cholesky solve).

    Parameters
    ----------
    alpha : float, default 1.0
        Penalty, in units of the scaled features (like scikit-learn's ``Ridge`` on scaled data).
    standardize : bool or "global", default "global"
        Input scaling (module docstring): one shared scale, per column (``True``), or none.
    """

    name = "ridge"
    _rules = {"alpha": [Range(float, ge=0)], "standardize": [OneOf((True, False, "global"))]}

    def __init__(self, alpha: float = 1.0, *, standardize: bool | Literal["global"] = "global") -> None:
        self.alpha = alpha
        self.standardize = standardize

    def revision(self) -> int:
        """4: ``X @ coef_`` is summed in float64 (:func:`linear_scores`; before: float32, which cancelled on
        embeddings far from the origin); 3: its probabilities are scored and stored in float64 (before: rounded
        to float32, which tied cells within 6e-8 of 1); 2: the grid sums each split's float32 statistics about that split's own
        mean (before: about the whole space's mean, which lost a category's spread where datasets sit apart)."""
        return 4

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        shift = X[: min(len(X), 4096)].mean(axis=0, dtype=np.float64).astype(np.float32)
        stats = GramStats.from_rows(X, y, shift=shift)
        self.coef_, self.intercept_ = self._solution(*ridge_from_stats(stats, self.alpha, standardize=self.standardize))

    @staticmethod
    def _solution(coef: np.ndarray, intercept: float) -> tuple[np.ndarray, float]:
        return np.asarray(coef, np.float64), float(intercept)

    def set_solution(self, coef: np.ndarray, intercept: float) -> RidgeHead:
        """Install a solution computed elsewhere on 0/1 labels (the grid's Gram-downdate path)."""
        self._validate_params()
        self.coef_, self.intercept_ = self._solution(coef, intercept)
        self._set_scdm_labels(self.coef_.shape[0])
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Linear-probability score minus 0.5: positive where ``classes_[1]`` is predicted.

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells,)
            ``X @ coef_ + intercept_ - 0.5`` (the regression targets the 0/1 encoding of y).
        """
        return self._score(self._validated_rows(X)) - 0.5

    def _score(self, X: np.ndarray) -> np.ndarray:
        """The regression's prediction of the 0/1 label, ``X @ coef_ + intercept_``, in float64 (:func:`linear_scores`)."""
        return linear_scores(X, self.coef_, self.intercept_)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return ridge_score_to_proba(self._score(X))


# --------------------------------------------------------------------------------------------
# Logistic regression (scikit-learn) and LightGBM
# --------------------------------------------------------------------------------------------
class LogRegHead(BaseHead):
    """L2 logistic regression (scikit-learn, lbfgs) on scaled embeddings.

    ``standardize`` (default ``"global"``) scales the inputs as described in the module
    docstring; ``C`` is the inverse penalty on the scaled inputs. scikit-learn is handed the training
    rows in float64, centred on their mean (for ``standardize=False`` too; ``coef_``/``intercept_`` are
    then of the embedding as it is): float32 rows would keep its lbfgs in float32, which stops far from
    the optimum on embeddings far from the origin. That is a float64 copy of the training rows.

    The evaluation grid does not call :meth:`fit` fold by fold: it solves every fold of a split
    together (:func:`scdm.classify._logreg_batch.fit_logreg_folds`, the same objective and
    stopping rule) and installs each fold's answer with :meth:`set_solution`.
    With ``warm_start=True`` a refit of the same head starts from its previous coefficients.
    """

    name = "logreg"
    _rules = {"C": [Range(float, gt=0)], "max_iter": [Range(int, ge=1)], "tol": [Range(float, gt=0)],
              "standardize": [OneOf((True, False, "global"))], "warm_start": [IsType(bool)]}

    def revision(self) -> int:
        """4: fitted on float64 rows centred on the training mean and scored in float64 (before: scikit-learn's
        lbfgs ran in float32 on float32 rows and stopped far from the optimum on offset or massive-activation
        embeddings; ``standardize=False`` was solved uncentred, by the grid too); 3: its probabilities are
        scored and stored in float64 (before: rounded to float32, exactly 1.0 past a logit of ~16.6, which tied
        its most confident cells), for every ``standardize``; 2: constant columns add 0 to the global scale
        (``standardize="global"``; before: scale 1)."""
        return 4

    def __init__(self, C: float = 1.0, *, max_iter: int = 200, tol: float = 1e-4,
                 standardize: bool | Literal["global"] = "global",
                 warm_start: bool = False) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.warm_start = warm_start

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        mean, scale = _scaling(X, self.standardize)
        # scikit-learn is handed float64 rows, centred on the training mean. Float32 rows keep its lbfgs in
        # float32, whose loss and gradient stop it at a point far from the optimum, without a warning
        # (offset or massive-activation embeddings: 2 to 7 iterations, AUROC 0.53 for 0.82). Uncentred,
        # standardize=False couples the intercept to every weight through the columns' offsets (a column at 300
        # with sd 0.5: lbfgs ends far from the optimum). With an unpenalised intercept, centring is the same
        # objective; the intercept is moved back to the embedding's coordinates below.
        centre = X.mean(axis=0, dtype=np.float64) if mean is None else mean.astype(np.float64)
        Z = X.astype(np.float64)
        Z -= centre
        if scale is not None:
            Z /= scale.astype(np.float64)
        previous = getattr(self, "model_", None) if self.warm_start else None
        model = previous or LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, warm_start=self.warm_start)
        # every warning of the fit collected, not shown (each time: Python shows one once per code line), in this
        # context only: a server job fitting beside this one keeps its own warnings
        with recording() as caught:
            model.fit(Z, y)
        self.model_ = model
        intercept = float(model.intercept_[0])
        if mean is None:  # weights on the embedding as it is: the intercept of its own coordinates
            intercept -= float(centre @ model.coef_[0])
        self._install(model.coef_[0], intercept, mean=mean, scale=scale,
                      n_iter=int(np.max(model.n_iter_)),
                      converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught))

    def set_solution(self, coef: np.ndarray, intercept: float, *, mean: np.ndarray | None = None,
                     scale: np.ndarray | None = None, n_iter: int | None = None, converged: bool = True) -> LogRegHead:
        """Install a solution fitted on 0/1 labels (weights on standardised inputs and their standardisation).

        The grid's batched fold solver calls it directly.
        """
        self._validate_params()
        self._install(coef, intercept, mean=mean, scale=scale, n_iter=n_iter, converged=converged)
        self._set_scdm_labels(self.coef_.shape[0])
        return self

    def _install(self, coef: np.ndarray, intercept: float, *, mean: np.ndarray | None, scale: np.ndarray | None,
                 n_iter: int | None, converged: bool) -> None:
        self.coef_ = np.asarray(coef, np.float64)
        self.intercept_ = float(intercept)
        self.mean_, self.scale_ = mean, scale
        self.n_iter_ = n_iter
        if not converged:
            msg = (f"logreg stopped at max_iter={self.max_iter} before converging (tol={self.tol}); "
                   "raise max_iter or C's regularisation (smaller C) if the scores matter.")
            warnings.warn(msg, HeadConvergenceWarning, stacklevel=4)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # heads saved before coef_/intercept_ existed (trained-head artifacts) predict as before
        if "coef_" not in state and "model_" in state:
            state = {**state, "coef_": np.asarray(state["model_"].coef_[0], np.float64),
                     "intercept_": float(state["model_"].intercept_[0])}
        self.__dict__.update(state)

    def decision_function(self, X: Any) -> np.ndarray:
        """Log-odds of ``classes_[1]`` (sensitivity, for 0/1 labels).

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells,)
            ``standardised(X) @ coef_ + intercept_``.
        """
        return self._log_odds(self._validated_rows(X))

    def _log_odds(self, X: np.ndarray) -> np.ndarray:
        # float64 (linear_scores): standardize=False weighs the embedding's own, possibly far-off, coordinates
        return linear_scores(X, self.coef_, self.intercept_, mean=self.mean_, scale=self.scale_)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return expit(self._log_odds(X))


class LightGBMHead(BaseHead):
    """Gradient-boosted trees (LightGBM). Trees need no standardisation."""

    name = "lightgbm"
    _rules = {"n_estimators": [Range(int, ge=1)], "learning_rate": [Range(float, gt=0)],
              "num_leaves": [Range(int, ge=2)], "seed": [Range(int, ge=0)], "n_jobs": [Range(int, ge=1), NONE]}

    def __init__(self, n_estimators: int = 200, *, learning_rate: float = 0.05, num_leaves: int = 31, seed: int = 0,
                 n_jobs: int | None = None) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.seed = seed
        self.n_jobs = n_jobs

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        import lightgbm

        self.model_ = lightgbm.LGBMClassifier(
            n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
            random_state=self.seed, n_jobs=self.n_jobs or -1, verbose=-1, deterministic=True,
        ).fit(X, y)

    def revision(self) -> int:
        """2: its probabilities are scored and stored in float64 (before: rounded to float32, which tied
        cells within 6e-8 of 1)."""
        return 2

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict_proba(X))[:, 1]


# --------------------------------------------------------------------------------------------
# The scDrugMap MLP head
# --------------------------------------------------------------------------------------------
MLP_PROFILES: dict[str, dict[str, Any]] = {
    # Trains to convergence at every fold size: at least ``min_steps`` optimiser steps, batch size
    # and learning rate from the number of training cells, early stopping on a stratified inner
    # validation split of the training cells (the best epoch's weights are kept), one logit with
    # binary cross-entropy and a zero-initialised output layer (so swapping the labels mirrors the
    # whole fit: the scores become 1 - p).
    "default": {"epochs": 200, "batch_size": None, "lr": None, "min_steps": 500, "precision": "fp32",
                "early_stopping": True, "patience": None, "standardize": "global", "loss": "logit"},
    # scDrugMap's reference code (benchmarking_main_EBD.py of every model): Linear(D,512)-ReLU-
    # Linear(512,512)-ReLU-Linear(512,2), BCEWithLogitsLoss on one-hot labels, AdamW lr 1e-4
    # (weight decay 0.01, torch's default), batch 128 (shuffled, last batch kept), 10 epochs, the
    # last epoch kept, embeddings used as they are. On a fold of ~100 training cells that is 10
    # optimiser steps: the head is scored before it has learned much.
    "paper": {"epochs": 10, "batch_size": 128, "lr": 1e-4, "min_steps": 0, "precision": "fp32",
              "early_stopping": False, "patience": 2, "standardize": False, "loss": "onehot"},
    # CPU throughput on large folds: batch 4096 with the learning rate scaled by sqrt(16) from
    # 256, bf16 autocast where the CPU supports it, at most 10 epochs with early stopping.
    "fast": {"epochs": 10, "batch_size": 4096, "lr": 4e-4, "min_steps": 0, "precision": "auto",
             "early_stopping": True, "patience": 2, "standardize": "global", "loss": "logit"},
}
"""Settings of the MLP profiles; an argument passed explicitly overrides its profile's value
(``loss`` belongs to the profile: ``logit`` = one output, ``onehot`` = the paper's two outputs)."""

MLP_OVERRIDABLE = ("epochs", "batch_size", "lr", "min_steps", "precision", "early_stopping", "patience", "standardize")
"""Profile settings that are also constructor arguments."""


def mlp_batch_size(n_train: int) -> int:
    """The default profile's batch: about 1/16 of the training cells, a power of two in [16, 512].

    Small folds then take several steps per epoch; large folds use batches big enough for the
    matmuls to run near the machine's peak.
    """
    return int(min(512, max(16, 2 ** round(math.log2(max(n_train, 1) / 16)))))


def mlp_learning_rate(batch_size: int) -> float:
    """The default profile's AdamW learning rate: 1e-3 at batch 256, scaled by sqrt(batch / 256)."""
    return 1e-3 * math.sqrt(batch_size / 256)


def mlp_patience(steps_per_epoch: int) -> int:
    """The default profile's patience: epochs that make about 1,000 optimiser steps, 2 to 10.

    A 100-cell fold (a few steps per epoch) waits 10 epochs for a better validation loss; a
    300,000-cell fold (hundreds of steps per epoch) waits 2.
    """
    return int(min(10, max(2, math.ceil(1000 / max(steps_per_epoch, 1)))))


def mlp_train_flops(n_train: int, emb_dim: int, *, hidden: int = 512, epochs: int = 10) -> float:
    """Matmul FLOPs of training the MLP head (forward 2·n·P, backward 4·n·P, no input gradient).

    ``n_train * epochs`` is the number of training rows processed; this is the floor that the
    benchmark divides by the machine's measured matmul rate.
    """
    macs = emb_dim * hidden + hidden * hidden + hidden * 2
    first_layer_input_grad = emb_dim * hidden  # never computed: the input needs no gradient
    return float(epochs) * n_train * (6 * macs - 2 * first_layer_input_grad)


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class MLPHead(BaseHead):
    """The scDrugMap network: Linear(D,512)-ReLU-Linear(512,512)-ReLU-Linear(512,k), AdamW.

    Two profiles matter (:data:`MLP_PROFILES`):

    ``default``
        Trains to convergence on small and large folds alike. At least ``min_steps`` (500)
        optimiser steps whatever the fold size (a 100-cell fold gets hundreds of epochs, a
        300,000-cell fold stops after a few); batch size about 1/16 of the training cells (16 to
        512, :func:`mlp_batch_size`) and learning rate 1e-3 x sqrt(batch / 256)
        (:func:`mlp_learning_rate`); ``validation_fraction`` of the training cells (stratified,
        seeded; never the test fold) held out, and the epoch with the lowest validation loss
        among those after ``min_steps`` steps kept; training stops after ``patience`` epochs
        without improvement (:func:`mlp_patience`: about 1,000 steps' worth, 2 to 10 epochs) or
        at ``epochs``. Inputs centred and divided by one shared scale (``standardize="global"``).
        One output (k=1) with binary cross-entropy; the output layer starts at zero, which makes
        the fit mirror-symmetric: training on swapped labels gives scores 1 - p (up to rounding).
    ``paper``
        scDrugMap's reference code exactly: two outputs trained with ``BCEWithLogitsLoss`` on
        one-hot labels, AdamW lr 1e-4, batch 128, 10 epochs, the last epoch kept, no input
        standardisation; the probability of sensitivity is the sigmoid of the "sensitive" output
        (the reference ranks cells by that logit). It *under-trains* small folds: 10 epochs of
        batch 128 are 10 optimiser steps on a ~100-cell fold (training loss 0.69 -> 0.60), and
        its scores depend on the random initialisation enough that swapping the labels moves a
        fold's AUROC by up to 0.6. Use it to reproduce the paper's numbers, not to compare heads.

    ``fast`` is the default profile's network, loss and scaling tuned for CPU throughput on large
    folds (batch 4096, bf16 autocast where supported, at most 10 epochs with early stopping, no
    minimum number of steps: it under-trains small folds too).

    Parameters
    ----------
    profile : {"default", "paper", "fast"}, default "default"
        Defaults for ``epochs``, ``batch_size``, ``lr``, ``min_steps``, ``precision``,
        ``early_stopping``, ``patience`` and ``standardize``; any of those passed explicitly wins.
    hidden : int, default 512
    epochs : int, optional
        Most epochs (default profile: 200; more if ``min_steps`` needs them).
    batch_size : int, optional
        Default profile: :func:`mlp_batch_size` of the training cells.
    lr : float, optional
        Default profile: :func:`mlp_learning_rate` of the batch size.
    min_steps : int, optional
        Fewest optimiser steps (default profile: 500; paper and fast: 0).
    weight_decay : float, default 0.01 (torch's AdamW default, the paper's)
    precision : {"fp32", "bf16", "auto"}, optional
    early_stopping : bool, optional
    validation_fraction : float, default 0.1
        Share of each class's training cells held out for early stopping (at least one per
        class when the class has two or more cells).
    patience : int, optional
        Epochs without validation-loss improvement before stopping (default profile:
        :func:`mlp_patience`).
    standardize : bool or "global", optional
        Input scaling (see the module docstring): one shared scale (``"global"``, default and
        fast profiles), per column (``True``) or none (``False``, paper profile).
    seed : int, default 0
        Seeds initialisation, shuffling and the validation carve-out.

    Notes
    -----
    :meth:`params_key` spells out the profile's resolved settings (``{"profile": "paper",
    "batch_size": 128, ...}``), so every stored result says which profile and settings made it;
    ``precision="auto"`` is spelled as the precision it resolves to here (``"bf16"`` or ``"fp32"``),
    so results of different precisions are never merged.
    """

    name = "mlp"
    _rules = {
        "profile": [OneOf(tuple(MLP_PROFILES))], "hidden": [Range(int, ge=1)],
        "epochs": [Range(int, ge=1), NONE], "batch_size": [Range(int, ge=1), NONE],
        "lr": [Range(float, gt=0), NONE], "min_steps": [Range(int, ge=0), NONE], "weight_decay": [Range(float, ge=0)],
        "precision": [OneOf(("fp32", "bf16", "auto")), NONE], "early_stopping": [IsType(bool), NONE],
        "validation_fraction": [Range(float, gt=0, le=0.5)], "patience": [Range(int, ge=1), NONE],
        "standardize": [OneOf((True, False, "global")), NONE], "seed": [Range(int, ge=0)],
    }

    def __init__(self, profile: Literal["default", "paper", "fast"] = "default", *, hidden: int = 512,
                 epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 min_steps: int | None = None, weight_decay: float = 0.01,
                 precision: Literal["fp32", "bf16", "auto"] | None = None, early_stopping: bool | None = None,
                 validation_fraction: float = 0.1, patience: int | None = None,
                 standardize: bool | Literal["global"] | None = None, seed: int = 0) -> None:
        self.profile = profile
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.min_steps = min_steps
        self.weight_decay = weight_decay
        self.precision = precision
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.standardize = standardize
        self.seed = seed

    # -- settings ---------------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The effective settings: profile defaults overridden by explicit arguments.

        ``batch_size`` and ``lr`` stay None where the profile derives them from the fold
        (:func:`mlp_batch_size`, :func:`mlp_learning_rate`).
        """
        if self.profile not in MLP_PROFILES:
            self._validate_params()
        out = dict(MLP_PROFILES[self.profile])
        for key in MLP_OVERRIDABLE:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def revision(self) -> int:
        """3: the link (sigmoid or softmax) runs in float64 (before: float32, exactly 1.0 past a logit of
        ~16.6, which tied an overconfident head's most sensitive cells), for every ``standardize``; 2:
        constant columns add 0 to the global scale (``standardize="global"``; before: scale 1)."""
        return 3

    def _keyed_params(self) -> dict[str, Any]:
        """The parameters with the profile's settings filled in."""
        params = self.get_params()
        if self.profile in MLP_PROFILES:
            settings = self.resolved()
            params.update({k: settings[k] for k in MLP_OVERRIDABLE})
            if params["precision"] == "auto":
                # the precision the fit will use on this machine: bf16 and fp32 results are never one result
                params["precision"] = "bf16" if bf16_supported() else "fp32"
        return params

    def build_network(self, dim: int) -> Any:
        """The untrained network for ``dim`` input columns (its output count follows the profile's loss)."""
        from torch import nn

        outputs = 2 if self.resolved()["loss"] == "onehot" else 1
        return nn.Sequential(nn.Linear(dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, outputs))

    # -- fit --------------------------------------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self._train_on(X, None, y)

    def _fit_rows(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
        if _readable_in_place(X):
            self._train_on(X, rows, y)
        else:
            self._fit(self._check_X(X[rows]), y)

    def _train_on(self, X: np.ndarray, rows: np.ndarray | None, y: np.ndarray) -> None:
        """Fit on ``X[rows]`` (all of ``X`` for None) with their labels ``y``, reading rows by index only."""
        import torch

        cfg = self.resolved()
        use_bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and bf16_supported())
        self.mean_, self.scale_ = _scaling(X, cfg["standardize"], rows)
        self._affine: tuple[Any, Any] | None = None  # (1/scale, -mean/scale), built from these training statistics
        train_idx, val_idx = self._carve_validation(y, cfg["early_stopping"])
        self.n_train_ = int(train_idx.size)  # training cells after the validation carve-out
        self.batch_size_ = int(cfg["batch_size"] or mlp_batch_size(train_idx.size))
        self.lr_ = float(cfg["lr"] or mlp_learning_rate(self.batch_size_))
        self.output_ = cfg["loss"]
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))  # X itself where rows are given
        if rows is not None:
            # positions among the training cells -> rows of X; every label read is y's, placed at those rows
            train_idx = rows[train_idx]
            val_idx = rows[val_idx] if val_idx is not None else None
            placed = np.zeros(X.shape[0], dtype=y.dtype)
            placed[rows] = y
            y = placed
        with torch_seeded(self.seed):  # initialisation; training draws only from its own generator
            model = self.build_network(X.shape[1])
        if self.output_ == "logit":
            # A zero output layer: the fit on swapped labels is this fit with the layer negated.
            torch.nn.init.zeros_(model[-1].weight)
            torch.nn.init.zeros_(model[-1].bias)
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr_, weight_decay=self.weight_decay, **_fused_kwargs())
        self.history_ = self._train(model, opt, Xt, self._targets(y), torch.from_numpy(train_idx), val_idx, cfg,
                                    use_bf16, gen)
        model.eval()
        self.model_ = model
        self.bf16_ = use_bf16

    def _targets(self, y: np.ndarray) -> Any:
        """Float targets of the loss: y (one output) or the one-hot (resistant, sensitive) pair."""
        import torch

        if self.output_ == "onehot":
            return torch.from_numpy(np.eye(2, dtype=np.float32)[y])
        return torch.from_numpy(y.astype(np.float32))

    def _carve_validation(self, y: np.ndarray, early_stopping: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Stratified, seeded held-out rows of the training cells.

        One label-blind permutation, from which each class gives its first rows: swapping the
        labels holds out the same cells.
        """
        idx = np.arange(y.size)
        if not early_stopping:
            return idx, None
        order = np.random.default_rng(self.seed + 1).permutation(y.size)
        val = []
        for cls in (0, 1):
            members = order[y[order] == cls]
            take = min(max(int(round(members.size * self.validation_fraction)), 1), members.size - 1)
            val.append(members[:max(take, 0)])
        val_idx = np.sort(np.concatenate(val))
        if val_idx.size == 0 or np.unique(y[val_idx]).size < 2:
            return idx, None
        return np.setdiff1d(idx, val_idx), val_idx

    def _affine_tensors(self) -> tuple[Any, Any] | None:
        """The standardisation as ``x * scale + shift`` (two 1-d tensors), or None without one."""
        if self.mean_ is None:
            return None
        affine = getattr(self, "_affine", None)
        if affine is None:
            import torch

            inv = torch.from_numpy(1.0 / np.asarray(self.scale_, np.float32))
            affine = self._affine = (inv, torch.from_numpy(-np.asarray(self.mean_, np.float32)) * inv)
        return affine

    def _batch(self, Xt: Any, rows: Any) -> Any:
        xb = Xt.index_select(0, rows)  # a fresh tensor: standardise it in place
        affine = self._affine_tensors()
        if affine is not None:
            # Per batch, not once for the whole matrix: no standardised copy of all training cells.
            # One pass (addcmul), the same arithmetic as the training step's (scdm.classify._mlp_step).
            import torch

            torch.addcmul(affine[1], xb, affine[0], out=xb)
        return xb

    def _loss(self, logits: Any, targets: Any) -> Any:
        from torch.nn import functional as F

        if logits.shape[1] == 1:
            logits = logits[:, 0]
        return F.binary_cross_entropy_with_logits(logits.float(), targets)

    def _train(self, model: Any, opt: Any, Xt: Any, yt: Any, train_idx: Any, val_idx: np.ndarray | None,
               cfg: dict[str, Any], use_bf16: bool, gen: Any) -> list[dict[str, float]]:
        import torch

        from scdm.classify._mlp_step import MLPStep

        history: list[dict[str, float]] = []
        best_loss, best_state, stale, steps = math.inf, None, 0, 0
        bs = self.batch_size_
        step = MLPStep(model, min(bs, train_idx.numel()), bf16=use_bf16, affine=self._affine_tensors(),
                       loss=self._loss)
        per_epoch = math.ceil(train_idx.numel() / bs)
        min_steps = int(cfg["min_steps"])
        epochs = max(int(cfg["epochs"]), math.ceil(min_steps / per_epoch))
        if val_idx is None and cfg["early_stopping"] and min_steps:
            epochs = math.ceil(min_steps / per_epoch)  # nothing to stop on (a class too small to hold out): the minimum
        patience = int(cfg["patience"] or mlp_patience(per_epoch))
        self.best_epoch_ = epochs - 1
        for epoch in range(epochs):
            model.train()
            order = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
            total = 0.0
            for start in range(0, order.numel(), bs):
                rows = order[start:start + bs]
                loss = step(Xt, yt, rows)  # the gradients, written into every parameter's .grad
                opt.step()
                total += float(loss.detach()) * rows.numel()
            steps += per_epoch
            record = {"epoch": epoch, "steps": steps, "train_loss": total / max(order.numel(), 1)}
            history.append(record)
            if val_idx is None:
                continue
            record["val_loss"] = self._val_loss(model, Xt, yt, val_idx, use_bf16)
            if steps < min_steps:
                continue  # the kept epoch has had at least min_steps steps
            if record["val_loss"] < best_loss - 1e-4:
                best_loss, stale, self.best_epoch_ = record["val_loss"], 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    logger.debug("mlp early stop at epoch %d (best val loss %.4f)", epoch, best_loss)
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.zero_grad(set_to_none=True)  # a fitted head carries no gradients
        self.n_steps_ = steps
        return history

    def _val_loss(self, model: Any, Xt: Any, yt: Any, val_idx: np.ndarray, use_bf16: bool) -> float:
        import torch

        model.eval()
        rows = torch.from_numpy(val_idx)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = torch.cat([model(self._batch(Xt, rows[s:s + 8192])).float() for s in range(0, rows.numel(), 8192)])
        return float(self._loss(logits, yt.index_select(0, rows)))

    # -- predict ----------------------------------------------------------------------------
    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        return self._score_rows(X, np.arange(X.shape[0]))

    def _predict_proba_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._score_rows(X, rows) if _readable_in_place(X) else self._predict_proba(self._check_X(X[rows]))

    def _score_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        import torch

        Xt, picked = torch.from_numpy(X), torch.from_numpy(rows)
        # Heads saved before ``output_`` existed had two outputs trained with softmax cross-entropy.
        kind = getattr(self, "output_", None) or ("softmax" if self.model_[-1].out_features == 2 else "logit")
        blocks = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_):
            for start in range(0, picked.numel(), 8192):
                blocks.append(self.model_(self._batch(Xt, picked[start:start + 8192])).float())
        if not blocks:
            return np.zeros(0)
        # the link in float64 (and outside autocast): a float32 sigmoid is exactly 1.0 past a logit of
        # ~16.6, which tied an overconfident head's most sensitive cells and moved its AUROC (float64: ~36.7)
        logits = torch.cat(blocks).double()
        if kind == "softmax":
            return torch.softmax(logits, dim=1)[:, 1].numpy()
        return torch.sigmoid(logits[:, -1]).numpy()  # one output, or the paper's "sensitive" output of two sigmoids


def _readable_in_place(X: np.ndarray) -> bool:
    """Whether the MLP can gather batches straight from ``X`` (``torch.from_numpy`` without a copy or a warning)."""
    # a read-only array (Ray's object store) is never written, but torch.from_numpy warns of it: copied rows instead
    return X.dtype == np.float32 and X.flags.c_contiguous and X.flags.writeable


def _fused_kwargs() -> dict[str, Any]:
    """AdamW's fused CPU kernel (torch >= 2.4) is one pass over the parameters per step."""
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return {"fused": True} if (major, minor) >= (2, 4) else {"foreach": True}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
HEADS: dict[str, type[BaseHead]] = {
    cls.name: cls for cls in (MLPHead, LogRegHead, LightGBMHead, RidgeHead, MajorityHead, ShuffledLabelHead, DANNHead)
}
"""Head name -> class."""

REVISION_NOTES: dict[tuple[str, int], str] = {
    ("logreg", 2): "standardize='global' counted constant (dead or zero-padded) columns as scale 1",
    ("mlp", 2): "standardize='global' counted constant (dead or zero-padded) columns as scale 1",
    ("mlp", 3): "its sigmoid ran in float32, exactly 1.0 past a logit of ~16.6, so an overconfident head's most "
                "sensitive cells tied and AUROC/AP moved (a pooled melanoma fold: 0.696691 for 0.698529)",
    ("shuffled-label", 2): "its logreg or mlp base counted constant columns as scale 1 in the global scale",
    ("dann", 2): "its softmax ran in float32, exactly 1.0 past a logit gap of ~16.6, tying its most confident cells",
    ("shuffled-label", 3): "its probabilities were scored rounded to float32 (its mlp base's sigmoid ran in float32), "
                           "tying its most confident cells",
    ("logreg", 3): "its probabilities were scored rounded to float32, exactly 1.0 past a logit of ~16.6, so its "
                   "most confident cells tied and AUROC/AP moved",
    ("ridge", 3): "its probabilities were scored rounded to float32, tying cells within 6e-8 of 1",
    ("lightgbm", 2): "its probabilities were scored rounded to float32, tying cells within 6e-8 of 1",
    ("ridge", 2): "the grid summed each split's float32 statistics about the whole space's mean, losing a "
                  "category's spread where datasets sit apart (up to 3e-2 in probability)",
    ("ridge", 4): "X @ coef was summed in float32, which cancels on embeddings far from the origin: scores of an "
                  "embedding 1e4 from it were off by 0.5% of their spread and 7 in 10,000 pairs of cells reordered",
    ("logreg", 4): "the lbfgs of scikit-learn ran in float32 on float32 rows and stopped, without a warning, far from "
                   "the optimum on offset or massive-activation embeddings (2 iterations, AUROC 0.53 for 0.82); "
                   "standardize=False was solved uncentred (log-odds of the grid 0.5 sd off on columns at 1e4)",
    ("shuffled-label", 4): "its ridge or logreg base scored in float32 and its logreg base was fitted on float32 rows",
    ("lora-mlp", 2): "its softmax ran in float32, exactly 1.0 past a logit gap of ~16.6, so an overconfident tuned "
                     "head's most sensitive cells tied and AUROC/AP moved",
}
"""Why a head's revision was raised: what the results of the revision before it got wrong."""


def head_revision(name: str, params: dict[str, Any]) -> int:
    """:meth:`BaseHead.revision` of a head with these parameters (for a head fitted outside the grid, such
    as LoRA tuning's ``lora-mlp``, its :data:`store.evaluation.OUTSIDE_GRID_REVISIONS`; 1 for other names,
    such as prompting, and for parameters this scdm no longer takes)."""
    if name not in HEADS:
        return OUTSIDE_GRID_REVISIONS.get(name, 1)
    try:
        return get_head(name, **params).revision()
    except (InputDataError, TypeError):
        return 1


def get_head(name: str, **params: Any) -> BaseHead:
    """Build a head by name.

    Parameters
    ----------
    name : str
        One of :data:`HEADS` (``mlp``, ``logreg``, ``lightgbm``, ``ridge``, ``majority``,
        ``shuffled-label``, ``dann``).
    **params
        Constructor arguments of that head (validated when it is fitted).

    Raises
    ------
    InputDataError
        Unknown head name, or an argument the head does not take.

    Examples
    --------
    >>> get_head("ridge", alpha=10.0)
    RidgeHead(alpha=10.0, standardize='global')
    """
    import difflib

    if name not in HEADS:
        close = difflib.get_close_matches(name, HEADS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        msg = f"Unknown head '{name}'. Registered: {', '.join(HEADS)}.{hint}"
        raise InputDataError(msg)
    cls = HEADS[name]
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        msg = f"Head '{name}' takes no parameter {', '.join(unknown)}; it takes {', '.join(cls.param_names()) or 'none'}."
        raise InputDataError(msg)
    return cls(**cls.canonical_params(params))


def respelled_params_key(name: str, stored: str) -> str:
    """A stored ``head_params`` spelled as this scdm keys the same parameters (:meth:`BaseHead.canonical_params`).

    Older scdm versions keyed parameters as given (``{"C": 1}`` beside ``{"C": 1.0}``); only the
    spelling of the stored values changes, never which parameters are named. Text already spelled so,
    a head this scdm does not know, or text that is not a JSON object, is returned as stored.
    """
    import json

    try:
        params = json.loads(stored)
    except (TypeError, ValueError):
        return stored
    if name not in HEADS or not isinstance(params, dict):
        return stored
    respelled = json.dumps(HEADS[name].canonical_params(params), sort_keys=True, default=str)
    return stored if respelled == json.dumps(params, sort_keys=True, default=str) else respelled
