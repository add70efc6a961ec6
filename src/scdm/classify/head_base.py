"""What every head is built from: the base class, parameter rules, column moments, torch seeding.

Every head is a scikit-learn binary classifier (``ClassifierMixin`` + ``BaseEstimator``): ``clone``,
``get_params``/``set_params``, ``Pipeline``, ``cross_val_score`` and ``check_estimator`` work, and
:meth:`BaseHead.fit` takes any two labels (ints, bools, strings; ``classes_`` sorted, the second is
the positive class: with scdm's 0/1 labels, 1 = sensitive), a pandas DataFrame (``feature_names_in_``)
and float32 or float64 input, refusing NaN, infinities, sparse matrices and more than two classes.

Two calling conventions, one model:

- scikit-learn's: ``fit(X, y)``, ``predict(X)``, ``predict_proba(X)`` of shape (n_cells, 2) in
  ``classes_`` order (one column where ``fit`` saw a single class, as scikit-learn's
  ``DummyClassifier``), and ``decision_function(X)`` (positive = ``classes_[1]``) where a head has one;
- scdm's, labels 0 (resistant) / 1 (sensitive): ``fit_rows(X, rows, y)``,
  ``predict_proba_rows(X, rows)`` and :meth:`BaseHead.proba_sensitive`, each a 1-D probability of
  label 1. The evaluation grid and trained heads use these (no copy of a space's matrix).

Persistence: scdm stores a fitted head as an artifact that cannot run code
(:mod:`scdm.classify.trained_heads`) and never unpickles one from a store. A head pickles in memory
like any scikit-learn estimator (``copy.deepcopy``, joblib workers); that is the caller's choice, with
the usual rule that a pickle is only loaded from a trusted source.

Heads live in :mod:`scdm.classify.heads` (and the domain-adaptation head in
:mod:`scdm.classify._transfer_dann`); both build on this module, which imports no head, so the
two never import each other.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import json
import math
import numbers
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils import Tags
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import validate_data

from scdm.store.errors import InputDataError, ScdmError, ScdmWarning
from scdm.store.warning_scopes import in_context

__all__ = [
    "NONE",
    "BaseHead",
    "HeadConvergenceWarning",
    "IsType",
    "NotFittedError",
    "OneOf",
    "Range",
    "Rule",
    "canonical_value",
    "check_fitted",
    "column_moments",
    "torch_seeded",
]


class NotFittedError(ScdmError, SklearnNotFittedError):
    """``predict_proba`` was called on a head before ``fit`` (also scikit-learn's ``NotFittedError``)."""


class HeadConvergenceWarning(ScdmWarning):
    """A head stopped at its iteration limit before converging."""


# --------------------------------------------------------------------------------------------
# Parameter rules (checked in fit, never in __init__)
# --------------------------------------------------------------------------------------------
class Rule(abc.ABC):
    """One acceptable form of a head parameter."""

    @abc.abstractmethod
    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The rule in words, for error messages."""


@dataclass(frozen=True)
class Range(Rule):
    """A number of type ``kind`` within optional bounds."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else self.kind):
            return False
        number = float(cast(float, value))
        if self.ge is not None and number < self.ge:
            return False
        if self.gt is not None and number <= self.gt:
            return False
        return not (self.le is not None and number > self.le)

    def describe(self) -> str:
        bounds = [f">= {self.ge}" if self.ge is not None else "", f"> {self.gt}" if self.gt is not None else "",
                  f"<= {self.le}" if self.le is not None else ""]
        return f"{self.kind.__name__} " + " and ".join(b for b in bounds if b)


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of values (``True``/``False`` match only themselves, not 1/0)."""

    options: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return any(value is o if isinstance(o, bool) or isinstance(value, bool) else value == o for o in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class IsType(Rule):
    """An instance of ``kind`` (``None`` is spelled ``IsType(type(None))``, or :data:`NONE`)."""

    kind: type

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.kind)

    def describe(self) -> str:
        return "None" if self.kind is type(None) else self.kind.__name__


NONE = IsType(type(None))
"""The rule that accepts ``None`` (a parameter left to a default resolved at fit time)."""


def canonical_value(rules: list[Rule], value: Any) -> Any:
    """``value`` spelled as the parameter's rules type it, so one setting has one key.

    ``C=1`` and ``C=1.0`` fit the same head, but JSON keeps the int: without this they were two
    task ids, two stored results and a refit. An int for a float-only parameter becomes a float, an
    integral float (or a numpy integer) for an int-only one an int, a list for a tuple parameter a
    tuple, a numpy bool a bool. Anything else is left as given for ``fit`` to accept or refuse
    (``True`` is never ``1``: rules tell them apart).
    """
    kinds = {rule.kind for rule in rules if isinstance(rule, Range)}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and kinds:
        return float(value) if int not in kinds else int(value)
    if isinstance(value, numbers.Real) and kinds and math.isfinite(float(value)):
        if float in kinds:
            return float(value)
        return int(float(value)) if float(value).is_integer() else value
    if isinstance(value, list) and any(isinstance(rule, IsType) and rule.kind is tuple for rule in rules):
        return tuple(value)
    return value


def _unit_scores(scores: Any, head: str) -> np.ndarray:
    """A head's scores as float64 probabilities in [0, 1], one per cell.

    A NaN score is refused here, where the head is known: clipping keeps it, and every reader of the
    scores (the metrics, ``proba >= threshold``) would either fail without naming the head or read it
    as resistant.
    """
    p = np.asarray(scores, dtype=np.float64).ravel()
    nan = np.isnan(p)
    if nan.any():
        msg = (f"Head {head!r} scored {int(nan.sum())} of {p.size} cells NaN: its fit diverged (its weights are "
               "not finite). Fit it with a smaller learning rate or with standardized input (e.g. mlp lr, standardize).")
        raise InputDataError(msg)
    return np.clip(p, 0.0, 1.0)


def check_fitted(head: BaseHead) -> None:
    """Raise :class:`NotFittedError` unless ``head.fit`` has run."""
    if not head.__sklearn_is_fitted__():
        msg = f"This {type(head).__name__} is not fitted yet; call fit(X, y) before predict_proba(X)."
        raise NotFittedError(msg)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------
class BaseHead(ClassifierMixin, BaseEstimator, metaclass=abc.ABCMeta):
    """A scikit-learn binary classifier with scdm's row-wise fit and 1-D scores (module docstring)."""

    name: ClassVar[str] = ""
    _rules: ClassVar[dict[str, list[Rule]]] = {}
    needs_both_classes: ClassVar[bool] = True
    scores_at_chance: ClassVar[bool] = False
    """A baseline that is meant to score at chance (scikit-learn's ``poor_score`` tag)."""

    # -- parameters ------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constructor arguments."""
        return cls._param_names()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments of this head, by name, in signature order.

        ``deep`` is scikit-learn's; no head takes an estimator as a parameter, so it changes nothing.
        """
        return {k: getattr(self, k) for k in self._param_names()}

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        assert tags.classifier_tags is not None
        tags.classifier_tags.multi_class = False
        tags.classifier_tags.poor_score = self.scores_at_chance
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    @classmethod
    def canonical_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with each value spelled as the head's rules type it (:func:`canonical_value`).

        Only the values given are respelled: no default is added, no name dropped.
        """
        return {key: canonical_value(cls._rules.get(key, []), value) for key, value in params.items()}

    def _keyed_params(self) -> dict[str, Any]:
        """The parameters a key spells: the constructor's, with settings resolved where a head resolves them."""
        return self.get_params()

    def params_key(self) -> str:
        """Canonical JSON of the parameters: part of a grid task's identity.

        ``get_head(name, **json.loads(head.params_key()))`` builds the same head. Values are spelled
        by the head's rules (:meth:`canonical_params`): ``C=1`` and ``C=1.0`` are one key.
        """
        return json.dumps(self.canonical_params(self._keyed_params()), sort_keys=True, default=str)

    def spelled_params_key(self) -> str:
        """The key as scdm spelled it before :meth:`params_key` respelled values by the rules: the
        parameters as given (``C=1`` gave ``{"C": 1}``). What an older store's rows were keyed with."""
        return json.dumps(self._keyed_params(), sort_keys=True, default=str)

    def revision(self) -> int:
        """What this head computes with these parameters: raised (with a line in
        :data:`scdm.classify.heads.REVISION_NOTES`) whenever a fix changes its numbers. From 2 on it
        is part of the task and trained-head identities, so what an earlier revision stored is
        fitted again instead of reused, and readers leave its results out."""
        return 1

    def _validate_params(self) -> None:
        for key, rules in self._rules.items():
            value = getattr(self, key)
            if not any(rule.accepts(value) for rule in rules):
                expected = " or ".join(rule.describe() for rule in rules)
                msg = f"{type(self).__name__}: parameter {key}={value!r} is invalid; expected {expected}."
                raise InputDataError(msg)

    def validate_params(self) -> None:
        """Check the parameters against the head's rules (``fit`` does this too).

        Raises
        ------
        InputDataError
            A parameter is out of range, saying what is expected.
        """
        self._validate_params()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- data ------------------------------------------------------------------------------
    @staticmethod
    def _check_X(X: np.ndarray) -> np.ndarray:
        """Rows as float32 or float64 (scdm's own path: the grid's matrices are checked when stored)."""
        X = np.asarray(X)
        _require_matrix(X)
        if X.dtype != np.float32 and X.dtype != np.float64:
            X = X.astype(np.float32)
        return X

    def _validate_X(self, X: Any, y: Any = None, *, reset: bool) -> Any:
        """scikit-learn's input validation (2-D, finite, dense, float32/float64, feature count and names).

        Its ``ValueError`` becomes an :class:`InputDataError` with the same message.
        """
        try:
            if y is None:
                return validate_data(self, X, reset=reset, dtype=_FLOATS)
            return validate_data(self, X, y, reset=reset, dtype=_FLOATS)
        except InputDataError:
            raise
        except ValueError as err:
            raise InputDataError(str(err)) from err

    def _check_fit_data(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validated rows and labels encoded as int64 0/1 (1 = ``classes_[1]``); sets ``classes_``."""
        if y is None:
            msg = f"{type(self).__name__} requires y to be passed, but the target y is None; pass one label per cell."
            raise InputDataError(msg)
        X, y = self._validate_X(X, y, reset=True)
        self.classes_, encoded = self._encode_labels(y)
        return X, encoded

    def _encode_labels(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes_, labels as 0/1 positions in classes_), refusing regression and multiclass targets."""
        try:
            check_classification_targets(y)
        except ValueError as err:
            raise InputDataError(str(err)) from err
        kind = type_of_target(y, input_name="y")
        if kind != "binary":
            msg = (f"Only binary classification is supported. The type of the target is {kind} "
                   f"({np.unique(y).size} classes); a head separates two labels (sensitive vs resistant).")
            raise InputDataError(msg)
        classes, encoded = np.unique(y, return_inverse=True)
        if classes.size == 1:
            if self.needs_both_classes:
                msg = (f"{type(self).__name__} needs both classes, but y holds one class ({classes[0]!r}) in all "
                       f"{y.size} cells; add cells of the other class.")
                raise InputDataError(msg)
            # scdm's 0/1 convention: a lone label 1 is "sensitive" (proba_sensitive 1), anything else 0
            encoded = np.full(y.size, int(_is_label_one(classes[0])))
        return classes, encoded.astype(np.int64)

    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        """The training labels as int64 0/1 (refused: none, other values, one class where both are needed)."""
        if y.shape[0] == 0:
            msg = "No training cells (X has 0 rows)."
            raise InputDataError(msg)
        if not np.isin(y, (0, 1)).all():
            msg = f"y must hold 0 (resistant) or 1 (sensitive); found {np.unique(y)[:5].tolist()}."
            raise InputDataError(msg)
        if self.needs_both_classes and np.unique(y).size < 2:
            msg = (f"{type(self).__name__} needs both classes in its training cells, but all {y.size} are "
                   f"{int(y[0])}; this task cannot be fitted (the grid records it as skipped).")
            raise InputDataError(msg)
        return y.astype(np.int64)

    def fit(self, X: Any, y: Any) -> BaseHead:
        """Fit on training cells.

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)
            Training embeddings (ndarray or DataFrame; float64 stays float64, other dtypes become
            float32).
        y : array-like of shape (n_cells,)
            Two labels (scdm's: 1 = sensitive, 0 = resistant); ``classes_`` holds them sorted.

        Returns
        -------
        self

        Raises
        ------
        InputDataError
            A parameter is invalid, X is not a finite 2-D matrix, y is not a binary target, or
            it holds one class for a head that needs both.
        """
        self._validate_params()
        X, y = self._check_fit_data(X, y)
        t0 = time.perf_counter()
        self._fit(X, y)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def fit_rows(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> BaseHead:
        """Fit on the cells ``X[rows]`` with labels ``y[rows]``: the same fit as ``fit(X[rows], y[rows])``.

        What the evaluation grid calls with a space's whole matrix and a fold's training rows.
        A head that only reads its training cells in batches (``mlp``) never copies them, so a
        fit of a 4 GB matrix's fold needs no second 4 GB; the others are fitted on the copy.

        Parameters
        ----------
        X : ndarray of shape (n_cells, emb_dim)
        rows : ndarray of int
            Positions in ``X`` of the training cells, in training order.
        y : ndarray of shape (n_cells,)
            Labels of every row of ``X`` (only ``y[rows]`` is read).

        Returns
        -------
        self
        """
        self._validate_params()
        X = np.asarray(X)
        _require_matrix(X)
        rows = _checked_rows(rows, X.shape[0])
        y = np.asarray(y).ravel()
        if y.shape[0] != X.shape[0]:
            msg = f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; pass one label per cell."
            raise InputDataError(msg)
        labels = self._check_labels(y[rows])
        t0 = time.perf_counter()
        self._fit_rows(X, rows, labels)
        self._set_scdm_labels(X.shape[1])
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit_rows(self, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
        """Fit on ``X[rows]`` with their validated labels ``y``; by default on a copy of those rows."""
        self._fit(self._check_X(X[rows]), y)

    def _set_scdm_labels(self, n_features: int) -> None:
        """Fitted on scdm's 0/1 labels (a row-wise fit or an installed solution): ``classes_`` is (0, 1)."""
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = int(n_features)
        self.__dict__.pop("feature_names_in_", None)  # a matrix of a space has no column names

    def _validated_rows(self, X: Any) -> np.ndarray:
        check_fitted(self)
        shape: tuple[int, ...] = getattr(X, "shape", ())  # arrays and frames; anything else gets scikit-learn's own message
        if len(shape) == 2 and shape[1] != self.n_features_in_:
            # scikit-learn's wording first (its checks match it), then what to do
            msg = (f"X has {shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} features "
                   f"as input: it was fitted on {self.n_features_in_} embedding columns; pass cells of that embedding.")
            raise InputDataError(msg)
        return cast(np.ndarray, self._validate_X(X, reset=False))

    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of ``classes_[1]`` (label 1 for a one-class fit on it) of validated rows."""
        return _unit_scores(self._predict_proba(X), self.name or type(self).__name__)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, in ``classes_`` order.

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells, 2)
            Rows sum to 1; column 1 is the probability of ``classes_[1]`` (sensitive, for 0/1
            labels). Shape (n_cells, 1), all ones, where ``fit`` saw a single class.
        """
        p = self._positive_proba(self._validated_rows(X))
        if len(self.classes_) == 1:
            return np.ones((p.size, 1))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """The more probable class of each cell (``classes_[1]`` where its probability exceeds 0.5).

        A tie at exactly 0.5 (a majority head on a balanced fold scores every cell so) goes to
        ``classes_[0]``, as scikit-learn's ``argmax`` of ``predict_proba``; the stored metrics and
        ``scdm predict`` call a cell sensitive where ``proba >= threshold``. To reproduce them, use
        ``head.proba_sensitive(X) >= threshold``.

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells,)
            Labels from ``classes_``.
        """
        proba = self.predict_proba(X)  # first: an unfitted head raises NotFittedError here
        return cast(np.ndarray, self.classes_[np.argmax(proba, axis=1)])

    def proba_sensitive(self, X: Any) -> np.ndarray:
        """Probability that each cell is sensitive (label 1): scdm's 1-D score.

        Parameters
        ----------
        X : array-like of shape (n_cells, emb_dim)

        Returns
        -------
        ndarray of shape (n_cells,)
            Values in [0, 1] (for a one-class fit: 1 where that class is 1, else 0).

        Raises
        ------
        InputDataError
            The head was fitted on labels other than 0/1 (use ``predict_proba(X)[:, 1]``, the
            probability of ``classes_[1]``).
        """
        X = self._validated_rows(X)
        if not all(_is_label_one(c) or _is_label_zero(c) for c in self.classes_):
            msg = (f"proba_sensitive reads labels 0/1, but this {type(self).__name__} was fitted on "
                   f"{list(self.classes_)}; use predict_proba(X)[:, 1], the probability of {self.classes_[-1]!r}.")
            raise InputDataError(msg)
        return self._positive_proba(X)

    def predict_proba_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``predict_proba(X[rows])``, the same numbers; heads that read rows in batches do not copy them.

        Parameters
        ----------
        X : ndarray of shape (n_cells, emb_dim)
        rows : ndarray of int
            Positions in ``X`` of the cells to score, in output order.

        Returns
        -------
        ndarray of shape (len(rows),)
        """
        check_fitted(self)
        X = np.asarray(X)
        _require_matrix(X)
        self._check_columns(X)
        rows = _checked_rows(rows, X.shape[0])
        return _unit_scores(self._predict_proba_rows(X, rows), self.name or type(self).__name__)

    def _predict_proba_rows(self, X: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of ``X[rows]``; by default of a copy of those rows."""
        return self._predict_proba(self._check_X(X[rows]))

    def _check_columns(self, X: np.ndarray) -> None:
        if X.shape[1] != self.n_features_in_:
            msg = f"X has {X.shape[1]} columns but {type(self).__name__} was fitted on {self.n_features_in_}."
            raise InputDataError(msg)

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        """Fit on validated, labelled rows (set fitted attributes ending in ``_``)."""

    @abc.abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of the sensitive class for validated rows."""


_FLOATS = (np.float32, np.float64)
"""Input dtypes kept as they are; any other is converted to the first."""


def _is_label_one(label: Any) -> bool:
    return isinstance(label, (bool, int, np.bool_, np.integer, float, np.floating)) and label == 1


def _is_label_zero(label: Any) -> bool:
    return isinstance(label, (bool, int, np.bool_, np.integer, float, np.floating)) and label == 0


def _require_matrix(X: np.ndarray) -> None:
    if np.ndim(X) != 2:
        msg = f"X must be a 2-D array (n_cells, emb_dim); got shape {np.shape(X)}."
        raise InputDataError(msg)


def _checked_rows(rows: np.ndarray, n_cells: int) -> np.ndarray:
    """``rows`` as int64 positions, each in ``0..n_cells-1`` (no negative ones: they are not numpy's here)."""
    rows = np.asarray(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        msg = f"rows must be integer positions of cells in X; got dtype {rows.dtype}."
        raise InputDataError(msg)
    rows = rows.astype(np.int64, copy=False).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n_cells):
        msg = f"rows must be positions in 0..{n_cells - 1} (X has {n_cells} cells); got {rows.min()}..{rows.max()}."
        raise InputDataError(msg)
    return rows


# --------------------------------------------------------------------------------------------
# Standardisation statistics
# --------------------------------------------------------------------------------------------
_MOMENT_GROUPS = 8
"""Row groups of :func:`column_moments`, summed in this order whatever the number of threads (the same bits)."""


def column_moments(X: np.ndarray, masks: np.ndarray | None = None, *,
                   block_rows: int = 2048, threads: int = 1, rows: np.ndarray | None = None,
                   constant_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (ddof 0) of ``X``'s rows, or of each mask's rows.

    One pass over ``X`` in row blocks, shifted by a sample mean so the float32 sums do not
    cancel, accumulated in float64: no float64 copy of ``X`` (which at 300k x 3072 would be 7 GB).

    Parameters
    ----------
    X : ndarray of shape (n_cells, emb_dim)
    masks : ndarray of shape (n_cells, n_masks), optional
        Boolean row selections (a fold's training cells, say); default: all rows.
    block_rows : int, default 2048
    threads : int, default 1
        Threads that share the pass (numpy and BLAS release the GIL; run it under one BLAS thread
        each). The rows are summed in fixed groups, so the result is the same bits for any number.
    rows : ndarray of int, optional
        Read ``X[rows]`` instead of ``X``, block by block (no copy of those rows); the same bits
        as ``column_moments(X[rows], ...)``. ``masks`` then has one row per entry of ``rows``.
    constant_scale : float, default 1.0
        The scale constant columns get: 1 to divide by (they are all zeros once centred), 0 to
        average scales over (a dead dimension adds nothing to a shared root mean square).

    Returns
    -------
    mean, scale : ndarray of shape (emb_dim,) or (n_masks, emb_dim), float32
    """
    n, dim = X.shape if rows is None else (len(rows), X.shape[1])
    weights = np.ones((n, 1), np.float32) if masks is None else np.asarray(masks, np.float32)
    sample = np.linspace(0, n - 1, min(n, 4096)).astype(np.int64)
    shift = X[sample if rows is None else rows[sample]].mean(axis=0, dtype=np.float64)
    shift32 = shift.astype(np.float32)
    starts = list(range(0, n, block_rows))
    per_group = max(1, -(-len(starts) // _MOMENT_GROUPS))
    groups = [starts[i:i + per_group] for i in range(0, len(starts), per_group)]

    def sums(group: list[int]) -> tuple[np.ndarray, np.ndarray]:
        s1 = np.zeros((weights.shape[1], dim))
        s2 = np.zeros((weights.shape[1], dim))
        buffer = np.empty((min(block_rows, n), dim), np.float32)  # reused: fresh blocks cost page faults
        for lo in group:
            block = buffer[: min(block_rows, n - lo)]
            if rows is None:
                np.subtract(X[lo:lo + block_rows], shift32, out=block)
            elif X.dtype == np.float32:
                np.take(X, rows[lo:lo + block_rows], axis=0, out=block)
                np.subtract(block, shift32, out=block)
            else:
                np.subtract(X[rows[lo:lo + block_rows]], shift32, out=block)
            w = weights[lo:lo + block_rows].T
            s1 += w @ block
            np.square(block, out=block)
            s2 += w @ block
        return s1, s2

    width = max(1, min(threads, len(groups)))
    if width > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="scdm-moments") as pool:
            parts = list(pool.map(in_context(sums), groups))
    else:
        parts = [sums(group) for group in groups]
    s1 = np.zeros((weights.shape[1], dim))
    s2 = np.zeros((weights.shape[1], dim))
    for p1, p2 in parts:  # in group order: the same sum for any thread count
        s1 += p1
        s2 += p2
    count = np.maximum(weights.sum(axis=0, dtype=np.float64), 1.0)[:, None]
    centred = s1 / count
    scale = np.sqrt(np.maximum(s2 / count - centred**2, 0.0))
    scale[scale < 1e-12] = constant_scale
    mean = (centred + shift32.astype(np.float64)).astype(np.float32)
    if masks is None:
        return mean[0], scale[0].astype(np.float32)
    return mean, scale.astype(np.float32)


# --------------------------------------------------------------------------------------------
# torch's global generator, one fit at a time
# --------------------------------------------------------------------------------------------
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
