"""Classification heads: one interface for every classifier the grid trains on embeddings.

Every head follows the scikit-learn conventions::

    head = get_head("logreg", C=0.5)       # parameters are only stored here
    head.fit(X_train, y_train)             # validated here, against ``_rules``; returns self
    p = head.predict_proba(X_test)         # ndarray (n,), probability of "sensitive" (1)

Fitted state ends in ``_`` and is set only in ``fit``; ``predict_proba`` first calls
:func:`check_fitted`. Heads that standardise do it with the mean and standard deviation of the
training cells only, so nothing about the test cells leaks into the fit.

Heads: ``mlp`` (the scDrugMap head), ``logreg``, ``lightgbm``, ``ridge`` (closed form, with the
Gram-downdate helpers the grid uses to solve every fold from one pass over the data),
``majority`` and ``shuffled-label`` (a leakage alarm: it must score at chance).
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import inspect
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.linalg

from store.errors import InputDataError, ScdmError, ScdmWarning

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "BaseHead",
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
    "get_head",
    "mlp_train_flops",
    "ridge_from_stats",
]


class NotFittedError(ScdmError, ValueError, AttributeError):
    """``predict_proba`` was called on a head before ``fit``."""


class HeadConvergenceWarning(ScdmWarning):
    """A head stopped at its iteration limit before converging."""


# --------------------------------------------------------------------------------------------
# Parameter rules (checked in fit, never in __init__)
# --------------------------------------------------------------------------------------------
class _Rule(abc.ABC):
    @abc.abstractmethod
    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The rule in words, for error messages."""


@dataclass(frozen=True)
class Range(_Rule):
    """A number of type ``kind`` within optional bounds."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else self.kind):
            return False
        if self.ge is not None and value < self.ge:
            return False
        if self.gt is not None and value <= self.gt:
            return False
        return not (self.le is not None and value > self.le)

    def describe(self) -> str:
        bounds = [f">= {self.ge}" if self.ge is not None else "", f"> {self.gt}" if self.gt is not None else "",
                  f"<= {self.le}" if self.le is not None else ""]
        return f"{self.kind.__name__} " + " and ".join(b for b in bounds if b)


@dataclass(frozen=True)
class OneOf(_Rule):
    """One of a fixed set of values."""

    options: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class IsType(_Rule):
    """An instance of ``kind`` (``None`` is spelled ``IsType(type(None))``)."""

    kind: type

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.kind)

    def describe(self) -> str:
        return "None" if self.kind is type(None) else self.kind.__name__


_NONE = IsType(type(None))


def check_fitted(head: BaseHead) -> None:
    """Raise :class:`NotFittedError` unless ``head.fit`` has run."""
    if not any(k.endswith("_") and not k.startswith("_") for k in vars(head)):
        msg = f"This {type(head).__name__} is not fitted yet; call fit(X, y) before predict_proba(X)."
        raise NotFittedError(msg)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------
class BaseHead(abc.ABC):
    """Common interface: ``fit(X, y) -> self`` and ``predict_proba(X) -> ndarray (n,)``."""

    name: ClassVar[str] = ""
    _rules: ClassVar[dict[str, list[_Rule]]] = {}
    needs_both_classes: ClassVar[bool] = True

    # -- parameters ------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments of this head, by name."""
        return {k: getattr(self, k) for k in self._param_names()}

    def params_key(self) -> str:
        """Canonical JSON of the parameters: part of a grid task's identity."""
        return json.dumps(self.get_params(), sort_keys=True, default=str)

    def _validate_params(self) -> None:
        for key, rules in self._rules.items():
            value = getattr(self, key)
            if not any(rule.accepts(value) for rule in rules):
                expected = " or ".join(rule.describe() for rule in rules)
                msg = f"{type(self).__name__}: parameter {key}={value!r} is invalid; expected {expected}."
                raise InputDataError(msg)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- data ------------------------------------------------------------------------------
    @staticmethod
    def _check_X(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            msg = f"X must be a 2-D array (n_cells, emb_dim); got shape {X.shape}."
            raise InputDataError(msg)
        if X.dtype != np.float32 and X.dtype != np.float64:
            X = X.astype(np.float32)
        return X

    def _check_fit_data(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = self._check_X(X)
        y = np.asarray(y).ravel()
        if y.shape[0] != X.shape[0]:
            msg = f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; pass one label per cell."
            raise InputDataError(msg)
        if X.shape[0] == 0:
            msg = "No training cells (X has 0 rows)."
            raise InputDataError(msg)
        if not np.isin(y, (0, 1)).all():
            msg = f"y must hold 0 (resistant) or 1 (sensitive); found {np.unique(y)[:5].tolist()}."
            raise InputDataError(msg)
        if self.needs_both_classes and np.unique(y).size < 2:
            msg = (f"{type(self).__name__} needs both classes in its training cells, but all {y.size} are "
                   f"{int(y[0])}; this task cannot be fitted (the grid records it as skipped).")
            raise InputDataError(msg)
        return X, y.astype(np.int64)

    def fit(self, X: np.ndarray, y: np.ndarray) -> BaseHead:
        """Fit on training cells.

        Parameters
        ----------
        X : ndarray of shape (n_cells, emb_dim)
            Training embeddings.
        y : ndarray of shape (n_cells,)
            Labels, 1 = sensitive, 0 = resistant.

        Returns
        -------
        self
        """
        self._validate_params()
        X, y = self._check_fit_data(X, y)
        t0 = time.perf_counter()
        self._fit(X, y)
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability that each cell is sensitive.

        Parameters
        ----------
        X : ndarray of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells,)
            Values in [0, 1].
        """
        check_fitted(self)
        X = self._check_X(X)
        if X.shape[1] != self.n_features_in_:
            msg = f"X has {X.shape[1]} columns but {type(self).__name__} was fitted on {self.n_features_in_}."
            raise InputDataError(msg)
        return np.clip(np.asarray(self._predict_proba(X), dtype=np.float64).ravel(), 0.0, 1.0)

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        """Fit on validated, labelled rows (set fitted attributes ending in ``_``)."""

    @abc.abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of the sensitive class for validated rows."""


def column_moments(X: np.ndarray, masks: np.ndarray | None = None, *,
                   block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (ddof 0) of ``X``'s rows, or of each mask's rows.

    One pass over ``X`` in row blocks, shifted by a sample mean so the float32 sums do not
    cancel, accumulated in float64: no float64 copy of ``X`` (which at 300k x 3072 would be 7 GB).

    Parameters
    ----------
    X : ndarray of shape (n_cells, emb_dim)
    masks : ndarray of shape (n_cells, n_masks), optional
        Boolean row selections (a fold's training cells, say); default: all rows.
    block_rows : int, default 2048

    Returns
    -------
    mean, scale : ndarray of shape (emb_dim,) or (n_masks, emb_dim), float32
        Constant columns get scale 1.
    """
    n, dim = X.shape
    weights = np.ones((n, 1), np.float32) if masks is None else np.asarray(masks, np.float32)
    shift = X[np.linspace(0, n - 1, min(n, 4096)).astype(np.int64)].mean(axis=0, dtype=np.float64)
    shift32 = shift.astype(np.float32)
    s1 = np.zeros((weights.shape[1], dim))
    s2 = np.zeros((weights.shape[1], dim))
    buffer = np.empty((min(block_rows, n), dim), np.float32)  # reused: fresh blocks cost page faults
    for lo in range(0, n, block_rows):
        block = buffer[: min(block_rows, n - lo)]
        np.subtract(X[lo:lo + block_rows], shift32, out=block)
        w = weights[lo:lo + block_rows].T
        s1 += w @ block
        np.square(block, out=block)
        s2 += w @ block
    count = np.maximum(weights.sum(axis=0, dtype=np.float64), 1.0)[:, None]
    centred = s1 / count
    scale = np.sqrt(np.maximum(s2 / count - centred**2, 0.0))
    scale[scale < 1e-12] = 1.0
    mean = (centred + shift32.astype(np.float64)).astype(np.float32)
    if masks is None:
        return mean[0], scale[0].astype(np.float32)
    return mean, scale.astype(np.float32)


def _standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of the training rows; constant columns get scale 1."""
    return column_moments(X)


# --------------------------------------------------------------------------------------------
# Sanity baselines
# --------------------------------------------------------------------------------------------
class MajorityHead(BaseHead):
    """Predicts the training share of sensitive cells for every cell (AUROC 0.5 by construction)."""

    name = "majority"
    needs_both_classes = False

    def __init__(self) -> None:
        pass

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.prior_ = float(y.mean())

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.full(X.shape[0], self.prior_)


class ShuffledLabelHead(BaseHead):
    """Fits ``base`` on randomly permuted training labels: must score at chance (leakage alarm).

    If it scores clearly above chance, test information leaks into training (for example the
    same cells or samples on both sides of a split).
    """

    name = "shuffled-label"
    _rules = {"base": [OneOf(("logreg", "ridge", "mlp", "lightgbm"))], "seed": [Range(int, ge=0)],
              "base_params": [IsType(dict), _NONE]}

    def __init__(self, base: str = "ridge", *, seed: int = 0, base_params: dict[str, Any] | None = None) -> None:
        self.base = base
        self.seed = seed
        self.base_params = base_params

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        self.permutation_ = rng.permutation(y.size)
        self.head_ = get_head(self.base, **(self.base_params or {})).fit(X, y[self.permutation_])

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head_.predict_proba(X)


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
        """In-place ``self += other`` (no new dim x dim matrix)."""
        self.sxx += other.sxx
        self.sx += other.sx
        self.sxy += other.sxy
        self.sy += other.sy
        self.n += other.n
        return self


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


def ridge_from_stats(stats: GramStats, alpha: float, *, standardize: bool = True,
                     minus: GramStats | None = None, work: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression of y on X from sufficient statistics.

    Minimises ``||y - b - Z w_z||^2 + alpha ||w_z||^2`` with ``Z`` the training rows standardised
    by their own mean and standard deviation (or only centred if ``standardize=False``) and an
    unpenalised intercept ``b``. Returned in the original coordinates: ``score = X @ coef + intercept``.

    Solving in original coordinates, ``(C + alpha * diag(sigma^2)) w = c`` with ``C`` the centred
    Gram matrix, is the same as the standardised problem and avoids scaling a dim x dim matrix.

    Parameters
    ----------
    stats : GramStats
        Statistics of the training rows, or of all rows when ``minus`` is given.
    alpha : float
    standardize : bool, default True
    minus : GramStats, optional
        Statistics of the held-out fold: the fit uses ``stats - minus`` (the fold downdate).
    work : ndarray of shape (emb_dim, emb_dim), float64, Fortran order, optional
        Scratch matrix the solve overwrites; pass one to reuse across many solves (a fresh
        dim x dim allocation costs more than the subtraction itself).

    Returns
    -------
    coef : ndarray of shape (emb_dim,)
    intercept : float
    """
    if minus is not None:
        if not np.array_equal(stats.shift, minus.shift):
            msg = "GramStats with different shifts cannot be combined; build them with the same shift."
            raise InputDataError(msg)
        n, sx, sy, sxy = stats.n - minus.n, stats.sx - minus.sx, stats.sy - minus.sy, stats.sxy - minus.sxy
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
        else:
            np.copyto(work, stats.sxx)
        # ``work`` is Fortran-ordered with a valid lower triangle: BLAS/LAPACK update it in place.
        out = scipy.linalg.blas.dsyr(-n, mean, a=work, lower=1, overwrite_a=1)  # centre: -= n mean mean^T
        diag = np.einsum("ii->i", out)
        if standardize:
            var = np.clip(diag / n, 0.0, None)
            diag += np.where(var > 1e-12, var, 1.0) * alpha
        else:
            diag += float(alpha)
        return out

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
    factor, info = scipy.linalg.lapack.dpotrf(lower, lower=1, overwrite_a=int(rebuild is not None), clean=0)
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
        factor, info = scipy.linalg.lapack.dpotrf(lower, lower=1, overwrite_a=0, clean=0)
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


class RidgeHead(BaseHead):
    """Ridge regression on the 0/1 label, closed form (one Gram matrix and one Cholesky solve).

    ``alpha`` is in units of standardised features (like scikit-learn's ``Ridge`` on scaled data).
    """

    name = "ridge"
    _rules = {"alpha": [Range(float, ge=0)], "standardize": [IsType(bool)]}

    def __init__(self, alpha: float = 1.0, *, standardize: bool = True) -> None:
        self.alpha = alpha
        self.standardize = standardize

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        shift = X[: min(len(X), 4096)].mean(axis=0, dtype=np.float64).astype(np.float32)
        stats = GramStats.from_rows(X, y, shift=shift)
        self.set_solution(*ridge_from_stats(stats, self.alpha, standardize=self.standardize))

    def set_solution(self, coef: np.ndarray, intercept: float) -> RidgeHead:
        """Install a solution computed elsewhere (the grid's Gram-downdate path)."""
        self._validate_params()
        self.coef_ = np.asarray(coef, np.float64)
        self.intercept_ = float(intercept)
        self.n_features_in_ = self.coef_.shape[0]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Raw linear-probability score ``X @ coef_ + intercept_``."""
        check_fitted(self)
        return self._check_X(X).astype(np.float32) @ self.coef_.astype(np.float32) + self.intercept_

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return ridge_score_to_proba(self.decision_function(X))


# --------------------------------------------------------------------------------------------
# Logistic regression (scikit-learn) and LightGBM
# --------------------------------------------------------------------------------------------
class LogRegHead(BaseHead):
    """L2 logistic regression (scikit-learn, lbfgs) on standardised embeddings.

    The evaluation grid does not call :meth:`fit` fold by fold: it solves every fold of a split
    together (:func:`scdm_classify._logreg_batch.fit_logreg_folds`, the same objective and
    stopping rule) and installs each fold's answer with :meth:`set_solution`.
    With ``warm_start=True`` a refit of the same head starts from its previous coefficients.
    """

    name = "logreg"
    _rules = {"C": [Range(float, gt=0)], "max_iter": [Range(int, ge=1)], "tol": [Range(float, gt=0)],
              "standardize": [IsType(bool)], "warm_start": [IsType(bool)]}

    def __init__(self, C: float = 1.0, *, max_iter: int = 200, tol: float = 1e-4, standardize: bool = True,
                 warm_start: bool = False) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.warm_start = warm_start

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        mean, scale = _standardizer(X) if self.standardize else (None, None)
        if mean is not None:
            X = (X - mean) / scale
        previous = getattr(self, "model_", None) if self.warm_start else None
        model = previous or LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, warm_start=self.warm_start)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X, y)
        self.model_ = model
        self.set_solution(model.coef_[0], float(model.intercept_[0]), mean=mean, scale=scale,
                          n_iter=int(np.max(model.n_iter_)),
                          converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught))

    def set_solution(self, coef: np.ndarray, intercept: float, *, mean: np.ndarray | None = None,
                     scale: np.ndarray | None = None, n_iter: int | None = None, converged: bool = True) -> LogRegHead:
        """Install a solution (weights on standardised inputs and their standardisation).

        :meth:`fit` ends here; the grid's batched fold solver calls it directly.
        """
        self._validate_params()
        self.coef_ = np.asarray(coef, np.float64)
        self.intercept_ = float(intercept)
        self.mean_, self.scale_ = mean, scale
        self.n_iter_ = n_iter
        self.n_features_in_ = self.coef_.shape[0]
        if not converged:
            msg = (f"logreg stopped at max_iter={self.max_iter} before converging (tol={self.tol}); "
                   "raise max_iter or C's regularisation (smaller C) if the scores matter.")
            warnings.warn(msg, HeadConvergenceWarning, stacklevel=3)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # heads saved before coef_/intercept_ existed (trained-head artifacts) predict as before
        if "coef_" not in state and "model_" in state:
            state = {**state, "coef_": np.asarray(state["model_"].coef_[0], np.float64),
                     "intercept_": float(state["model_"].intercept_[0])}
        self.__dict__.update(state)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log-odds of sensitivity: ``standardised(X) @ coef_ + intercept_``."""
        check_fitted(self)
        X = self._check_X(X)
        if self.mean_ is not None:
            X = (X - self.mean_) / self.scale_
        return X @ self.coef_.astype(X.dtype) + self.intercept_

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return expit(np.asarray(self.decision_function(X), np.float64))


class LightGBMHead(BaseHead):
    """Gradient-boosted trees (LightGBM). Trees need no standardisation."""

    name = "lightgbm"
    _rules = {"n_estimators": [Range(int, ge=1)], "learning_rate": [Range(float, gt=0)],
              "num_leaves": [Range(int, ge=2)], "seed": [Range(int, ge=0)], "n_jobs": [Range(int, ge=1), _NONE]}

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

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(X)[:, 1]


# --------------------------------------------------------------------------------------------
# The scDrugMap MLP head
# --------------------------------------------------------------------------------------------
MLP_PROFILES: dict[str, dict[str, Any]] = {
    # The scDrugMap head as published: batch 256, fp32, AdamW lr 1e-4, 10 epochs.
    "paper": {"epochs": 10, "batch_size": 256, "lr": 1e-4, "precision": "fp32", "early_stopping": False},
    # Same network, re-tuned for CPU throughput: 16x the batch with the learning rate scaled by
    # sqrt(16), bf16 autocast where supported, early stopping on 10% of the training cells.
    "fast": {"epochs": 10, "batch_size": 4096, "lr": 4e-4, "precision": "auto", "early_stopping": True},
}
"""Defaults of the two MLP profiles; explicit arguments override them."""


def mlp_train_flops(n_train: int, emb_dim: int, *, hidden: int = 512, epochs: int = 10) -> float:
    """Matmul FLOPs of training the MLP head (forward 2·n·P, backward 4·n·P, no input gradient).

    This is the floor that the benchmark divides by the machine's measured matmul rate.
    """
    macs = emb_dim * hidden + hidden * hidden + hidden * 2
    first_layer_input_grad = emb_dim * hidden  # never computed: the input needs no gradient
    return float(epochs) * n_train * (6 * macs - 2 * first_layer_input_grad)


_TORCH_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """torch's process-wide generator seeded for this block only, one thread at a time.

    Layer initialisation (and dropout) draw from that one generator: fits running in parallel
    threads (``jobs=N``) would interleave their draws, and a fit would depend on its neighbours.
    """
    import torch

    with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class MLPHead(BaseHead):
    """The scDrugMap head: Linear(D,512)-ReLU-Linear(512,512)-ReLU-Linear(512,2), cross-entropy, AdamW.

    Parameters
    ----------
    profile : {"paper", "fast"}, default "paper"
        Defaults for ``epochs``, ``batch_size``, ``lr``, ``precision`` and ``early_stopping``
        (see :data:`MLP_PROFILES`); any of those passed explicitly wins.
    hidden : int, default 512
    weight_decay : float, default 0.01 (torch's AdamW default)
    validation_fraction, patience
        Early stopping: the share of training cells held out (stratified) and the number of
        epochs without validation-loss improvement before stopping; the best epoch is kept.
    seed : int, default 0
        Seeds initialisation, shuffling and the validation carve-out.
    """

    name = "mlp"
    _rules = {
        "profile": [OneOf(tuple(MLP_PROFILES))], "hidden": [Range(int, ge=1)],
        "epochs": [Range(int, ge=1), _NONE], "batch_size": [Range(int, ge=1), _NONE],
        "lr": [Range(float, gt=0), _NONE], "weight_decay": [Range(float, ge=0)],
        "precision": [OneOf(("fp32", "bf16", "auto")), _NONE], "early_stopping": [IsType(bool), _NONE],
        "validation_fraction": [Range(float, gt=0, le=0.5)], "patience": [Range(int, ge=1)],
        "seed": [Range(int, ge=0)], "standardize": [IsType(bool)],
    }

    def __init__(self, profile: Literal["paper", "fast"] = "paper", *, hidden: int = 512, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, weight_decay: float = 0.01,
                 precision: Literal["fp32", "bf16", "auto"] | None = None, early_stopping: bool | None = None,
                 validation_fraction: float = 0.1, patience: int = 2, seed: int = 0, standardize: bool = True) -> None:
        self.profile = profile
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.precision = precision
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.seed = seed
        self.standardize = standardize

    def resolved(self) -> dict[str, Any]:
        """The effective settings: profile defaults overridden by explicit arguments."""
        out = dict(MLP_PROFILES[self.profile])
        for key in out:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def _build(self, dim: int) -> Any:
        from torch import nn

        return nn.Sequential(nn.Linear(dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, 2))

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        import torch

        cfg = self.resolved()
        use_bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and bf16_supported())
        self.mean_, self.scale_ = _standardizer(X) if self.standardize else (None, None)
        self._affine = None  # (1/scale, -mean/scale), built from these training statistics
        train_idx, val_idx = self._carve_validation(y, cfg["early_stopping"])
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        yt = torch.from_numpy(y)
        with torch_seeded(self.seed):  # initialisation; training draws only from its own generator
            model = self._build(X.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=self.weight_decay, **_fused_kwargs())
        self.history_ = self._train(model, opt, Xt, yt, torch.from_numpy(train_idx), val_idx, cfg, use_bf16, gen)
        model.eval()
        self.model_ = model
        self.bf16_ = use_bf16

    def _carve_validation(self, y: np.ndarray, early_stopping: bool) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.arange(y.size)
        if not early_stopping:
            return idx, None
        rng = np.random.default_rng(self.seed + 1)
        val = []
        for cls in (0, 1):
            members = idx[y == cls]
            take = int(round(members.size * self.validation_fraction))
            if 0 < take < members.size:
                val.append(rng.choice(members, size=take, replace=False))
        if not val:
            return idx, None
        val_idx = np.sort(np.concatenate(val))
        return np.setdiff1d(idx, val_idx), val_idx

    def _batch(self, Xt: Any, rows: Any) -> Any:
        xb = Xt.index_select(0, rows)  # a fresh tensor: standardise it in place
        if self.mean_ is not None:
            # Per batch, not once for the whole matrix: no standardised copy of all training cells.
            if getattr(self, "_affine", None) is None:
                import torch

                inv = torch.from_numpy(1.0 / self.scale_)
                self._affine = (inv, torch.from_numpy(-self.mean_) * inv)
            inv, shift = self._affine
            xb.mul_(inv).add_(shift)
        return xb

    def _train(self, model: Any, opt: Any, Xt: Any, yt: Any, train_idx: Any, val_idx: np.ndarray | None,
               cfg: dict[str, Any], use_bf16: bool, gen: Any) -> list[dict[str, float]]:
        import torch
        from torch.nn import functional as F

        history: list[dict[str, float]] = []
        best_loss, best_state, stale = math.inf, None, 0
        bs = int(cfg["batch_size"])
        for epoch in range(int(cfg["epochs"])):
            model.train()
            order = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
            total = 0.0
            for start in range(0, order.numel(), bs):
                rows = order[start:start + bs]
                xb = self._batch(Xt, rows)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = F.cross_entropy(model(xb), yt.index_select(0, rows))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * rows.numel()
            record = {"epoch": epoch, "train_loss": total / max(order.numel(), 1)}
            if val_idx is not None:
                record["val_loss"] = self._val_loss(model, Xt, yt, val_idx, use_bf16)
                if record["val_loss"] < best_loss - 1e-4:
                    best_loss, stale = record["val_loss"], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
            history.append(record)
            if val_idx is not None and stale >= self.patience:
                logger.debug("mlp early stop at epoch %d (best val loss %.4f)", epoch, best_loss)
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        return history

    def _val_loss(self, model: Any, Xt: Any, yt: Any, val_idx: np.ndarray, use_bf16: bool) -> float:
        import torch
        from torch.nn import functional as F

        model.eval()
        rows = torch.from_numpy(val_idx)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = torch.cat([model(self._batch(Xt, rows[s:s + 8192])).float() for s in range(0, rows.numel(), 8192)])
        return float(F.cross_entropy(logits, yt.index_select(0, rows)))

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        out = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_):
            for start in range(0, Xt.shape[0], 8192):
                rows = torch.arange(start, min(start + 8192, Xt.shape[0]))
                out.append(torch.softmax(self.model_(self._batch(Xt, rows)).float(), dim=1)[:, 1])
        return torch.cat(out).numpy() if out else np.zeros(0)


def _fused_kwargs() -> dict[str, bool]:
    """AdamW's fused CPU kernel (torch >= 2.4) is one pass over the parameters per step."""
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return {"fused": True} if (major, minor) >= (2, 4) else {"foreach": True}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
HEADS: dict[str, type[BaseHead]] = {
    cls.name: cls for cls in (MLPHead, LogRegHead, LightGBMHead, RidgeHead, MajorityHead, ShuffledLabelHead)
}
"""Head name -> class."""


def _register_transfer_heads() -> None:
    """Add the domain-adaptation head, which lives with the transfer code (imported on first use)."""
    if "dann" not in HEADS:
        from scdm_classify._transfer_dann import DANNHead

        HEADS[DANNHead.name] = DANNHead


def get_head(name: str, **params: Any) -> BaseHead:
    """Build a head by name.

    Parameters
    ----------
    name : str
        One of :data:`HEADS` (``mlp``, ``logreg``, ``lightgbm``, ``ridge``, ``majority``, ``shuffled-label``).
    **params
        Constructor arguments of that head (validated when it is fitted).

    Raises
    ------
    InputDataError
        Unknown head name, or an argument the head does not take.

    Examples
    --------
    >>> get_head("ridge", alpha=10.0)
    RidgeHead(alpha=10.0, standardize=True)
    """
    _register_transfer_heads()
    if name not in HEADS:
        close = difflib.get_close_matches(name, HEADS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        msg = f"Unknown head '{name}'. Registered: {', '.join(HEADS)}.{hint}"
        raise InputDataError(msg)
    cls = HEADS[name]
    unknown = sorted(set(params) - set(cls._param_names()))
    if unknown:
        msg = f"Head '{name}' takes no parameter {', '.join(unknown)}; it takes {', '.join(cls._param_names()) or 'none'}."
        raise InputDataError(msg)
    return cls(**params)

