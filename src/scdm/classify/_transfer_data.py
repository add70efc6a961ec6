"""Inputs of scDEAL transfer learning: bulk labels, gene matching, features, balancing, clusters.

Nothing here imports torch. The pieces, in the order :func:`scdm.classify.transfer.transfer`
uses them:

- :func:`waterfall_cutoff` / :func:`binarize_response`: continuous bulk drug response (IC50, AUC,
  activity area) -> sensitive/resistant with the waterfall method of the scDEAL paper (which
  takes it from CCLE, Barretina et al. 2012), or binary labels as given.
- :func:`read_bulk`: a bulk source as an AnnData (``obs[drug]`` holds the response) or a CSV pair
  (expression: samples x genes; response: samples x drugs).
- :func:`log_normalize`, :func:`select_hvg`, :class:`MinMax`: log-normalised expression on shared
  highly variable genes, scaled to [0, 1] per domain as in the paper.
- :func:`balance_classes`: up/down-sampling or SMOTE of the source training cells.
- :func:`cluster_cells`: Leiden (or Louvain) clusters of the target cells for the cluster
  regulariser, with KMeans as the fallback when ``leidenalg``/``igraph`` are not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdm.store.errors import GeneMappingError, InputDataError, ScdmWarning
from scdm.store.matrix import LOG_VALUE_MAX

if TYPE_CHECKING:

    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "BulkData",
    "Clusters",
    "MinMax",
    "ResponseKind",
    "TransferWarning",
    "WaterfallCut",
    "balance_classes",
    "binarize_response",
    "bulk_drug",
    "bulk_hashes",
    "bulk_kind",
    "cluster_cells",
    "column_index",
    "dense",
    "log_normalize",
    "read_bulk",
    "read_store_expression",
    "select_hvg",
    "shared_genes",
    "split_source",
    "store_symbols",
    "store_gene_keys",
    "gene_keys_of",
    "spelled_as_target",
    "symbols_of",
    "waterfall_cutoff",
]

ResponseKind = Literal["auto", "binary", "ic50", "auc", "activity_area"]
"""How the source response is given: binary labels, or a continuous measure binarised by the
waterfall method. ``ic50`` and ``auc`` (GDSC's area under the viability curve): low = sensitive;
``activity_area`` (CCLE's ActArea): high = sensitive."""

_SENSITIVE_WHEN = {"ic50": "low", "auc": "low", "activity_area": "high"}
_TARGET_SUM = 1e4
_MIN_SHARED_GENES = 10
LOG_SCALE_MAX = LOG_VALUE_MAX
"""Normalised values above this are not log-scale: log1p is taken (ingest's bound, one number for both)."""
LOW_GENE_OVERLAP = 0.5
"""Fewer shared genes than this share of the smallest gene list is warned about (ids of another kind or species)."""
_MAX_KMEANS_K = 10
_KMEANS_SUBSAMPLE = 3000


class TransferWarning(ScdmWarning):
    """scdm chose something on the user's behalf during transfer learning (fallbacks, coercions)."""


# --------------------------------------------------------------------------------------------
# waterfall binarisation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaterfallCut:
    """Where the waterfall method put the sensitive/resistant boundary of one drug."""

    cutoff: float
    """Response value of the boundary."""
    method: Literal["median", "knee"]
    """``median`` when the sorted values are linear (Pearson r of the linear fit >= ``linear_r``),
    ``knee`` otherwise (the point farthest from the line joining the two extremes)."""
    r: float
    """Pearson correlation of the sorted values with their rank (the linear fit's r)."""
    sensitive: Literal["low", "high"]
    """Which side of the cutoff is sensitive."""
    n_sensitive: int
    """Samples labelled sensitive."""
    n_resistant: int
    """Samples labelled resistant."""

    def to_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "method": self.method, "r": self.r, "sensitive": self.sensitive,
                "n_sensitive": self.n_sensitive, "n_resistant": self.n_resistant}


def waterfall_cutoff(values: Sequence[float] | np.ndarray, *, sensitive: Literal["low", "high"] = "low",
                     linear_r: float = 0.95) -> WaterfallCut:
    """The waterfall cutoff of one drug's continuous response over samples (cell lines).

    The values are sorted into a waterfall curve (value against rank). A straight line is fitted
    to it; if the curve is linear -- Pearson r of the fit at least ``linear_r`` (0.95 in CCLE and
    scDEAL) -- the cutoff is the median. Otherwise the cutoff is the value of the point farthest
    (perpendicular distance) from the line joining the first and the last point of the curve: the
    knee that separates the tail of strong responders from the rest. The farthest point does not
    depend on the units of either axis (the distance to a fixed line scales uniformly), so ranks
    and raw values are used as they are.

    Samples strictly on the sensitive side of the cutoff are sensitive (``value < cutoff`` for
    ``sensitive="low"``, ``value > cutoff`` for ``"high"``); a sample exactly at the cutoff, the
    knee itself included, is resistant.

    Parameters
    ----------
    values : array-like of shape (n_samples,)
        Finite response values of one drug (missing values removed by the caller).
    sensitive : {"low", "high"}, default "low"
        ``low`` for IC50 / GDSC AUC (a small value = sensitive), ``high`` for activity area.
    linear_r : float, default 0.95
        Pearson r at or above which the waterfall counts as linear.

    Returns
    -------
    WaterfallCut

    Raises
    ------
    InputDataError
        Fewer than 3 values, non-finite values, or all values equal.

    Examples
    --------
    >>> waterfall_cutoff(np.arange(10.0)).method
    'median'
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if sensitive not in ("low", "high"):
        msg = f"sensitive={sensitive!r}: pass 'low' (IC50, AUC) or 'high' (activity area)."
        raise InputDataError(msg)
    if v.size < 3 or not np.isfinite(v).all():
        msg = f"The waterfall method needs at least 3 finite response values; got {v.size} (non-finite: {int((~np.isfinite(v)).sum())})."
        raise InputDataError(msg)
    curve = np.sort(v)
    if curve[0] == curve[-1]:
        msg = f"All {v.size} response values equal {curve[0]:g}; a waterfall cannot split them into sensitive and resistant."
        raise InputDataError(msg)
    rank = np.arange(curve.size, dtype=np.float64)
    r = float(np.corrcoef(rank, curve)[0, 1])
    if r >= linear_r:
        cutoff, method = float(np.median(curve)), "median"
    else:
        # perpendicular distance to the chord from (0, first) to (n-1, last), up to a constant factor
        dx, dy = rank[-1] - rank[0], curve[-1] - curve[0]
        distance = np.abs(dx * (curve - curve[0]) - dy * (rank - rank[0]))
        cutoff, method = float(curve[int(np.argmax(distance))]), "knee"
    labels = _labels_from_cutoff(v, cutoff, sensitive)
    return WaterfallCut(cutoff=cutoff, method=method, r=r, sensitive=sensitive,  # type: ignore[arg-type]
                        n_sensitive=int(labels.sum()), n_resistant=int(labels.size - labels.sum()))


def _labels_from_cutoff(v: np.ndarray, cutoff: float, sensitive: str) -> np.ndarray:
    return ((v < cutoff) if sensitive == "low" else (v > cutoff)).astype(np.int8)


_TEXT_LABELS = {"sensitive": 1, "resistant": 0, "1": 1, "0": 0, "true": 1, "false": 0, "responder": 1,
                "non-responder": 0, "yes": 1, "no": 0, "s": 1, "r": 0}


def binarize_response(values: Sequence[Any] | pd.Series, *, kind: ResponseKind = "auto",
                      linear_r: float = 0.95) -> tuple[np.ndarray, WaterfallCut | None]:
    """Sensitive (1) / resistant (0) labels of one drug; missing values give -1.

    Parameters
    ----------
    values : array-like of shape (n_samples,)
        Binary labels (0/1, ``sensitive``/``resistant``, ...) or a continuous response.
    kind : {"auto", "binary", "ic50", "auc", "activity_area"}, default "auto"
        ``auto`` accepts binary labels and refuses continuous values (their direction is
        ambiguous: say ``ic50``, ``auc`` or ``activity_area``).
    linear_r : float, default 0.95
        See :func:`waterfall_cutoff`.

    Returns
    -------
    labels : ndarray of int8, shape (n_samples,)
        1 sensitive, 0 resistant, -1 missing.
    cut : WaterfallCut or None
        The waterfall cutoff (None for binary labels).
    """
    series = pd.Series(values).reset_index(drop=True)
    missing = series.isna().to_numpy()
    known = series[~missing]
    if kind not in ("auto", "binary", *_SENSITIVE_WHEN):
        msg = f"response kind {kind!r} is unknown; use auto, binary, ic50, auc or activity_area."
        raise InputDataError(msg)
    as_binary = _as_binary(known)
    if kind in ("auto", "binary"):
        if as_binary is None:
            example = known.iloc[:3].tolist()
            msg = (f"The response values are not binary labels (e.g. {example}). For a continuous measure pass "
                   "response='ic50' or 'auc' (low = sensitive) or 'activity_area' (high = sensitive) to binarise "
                   "it with the waterfall method.")
            raise InputDataError(msg)
        out = np.full(series.size, -1, np.int8)
        out[~missing] = as_binary
        return out, None
    numeric = pd.to_numeric(known, errors="coerce")
    if numeric.isna().any():
        bad = known[numeric.isna()].iloc[:3].tolist()
        msg = f"response={kind!r} needs numbers, but the values include {bad}."
        raise InputDataError(msg)
    cut = waterfall_cutoff(numeric.to_numpy(np.float64), sensitive=_SENSITIVE_WHEN[kind], linear_r=linear_r)  # type: ignore[arg-type]
    out = np.full(series.size, -1, np.int8)
    out[~missing] = _labels_from_cutoff(numeric.to_numpy(np.float64), cut.cutoff, cut.sensitive)
    logger.info("waterfall (%s): cutoff %.4g by %s (r = %.3f): %d sensitive, %d resistant", kind, cut.cutoff,
                cut.method, cut.r, cut.n_sensitive, cut.n_resistant)
    return out, cut


def _as_binary(values: pd.Series) -> np.ndarray | None:
    if values.empty:
        return np.zeros(0, np.int8)
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy().astype(np.int8)
    if pd.api.types.is_numeric_dtype(values):
        v = values.to_numpy(np.float64)
        return v.astype(np.int8) if np.isin(v, (0.0, 1.0)).all() else None
    text = values.astype(str).str.strip().str.lower()
    if text.isin(list(_TEXT_LABELS)).all():
        return text.map(_TEXT_LABELS).to_numpy(np.int8)
    return None


# --------------------------------------------------------------------------------------------
# bulk input
# --------------------------------------------------------------------------------------------
@dataclass
class BulkData:
    """A bulk source: expression of samples (cell lines) and one drug's labels."""

    X: np.ndarray
    """Expression, float64 of shape (n_samples, n_genes), samples with a label only."""
    genes: np.ndarray
    """Gene ids as given (object array)."""
    y: np.ndarray
    """Labels (int8), 1 sensitive, 0 resistant."""
    sample_ids: np.ndarray
    """Sample (cell line) names."""
    cut: WaterfallCut | None
    """Waterfall cutoff when the response was continuous."""
    description: dict[str, Any]
    """What was read (paths, drug, response kind), for the run's record."""


def read_bulk(source: Any, *, drug: str | None, response: ResponseKind = "auto", linear_r: float = 0.95) -> BulkData:
    """Read a bulk source: an AnnData / ``.h5ad`` path, or a (expression CSV, response CSV) pair.

    Parameters
    ----------
    source
        AnnData or ``.h5ad`` path whose ``obs[drug]`` holds the response (``obs["response"]`` when
        ``drug`` is None); or a pair of CSV paths: expression with samples as rows and genes as
        columns (first column = sample ids), and response with samples as rows and one column
        per drug (first column = sample ids). Samples are matched by id.
    drug
        The response column.
    response, linear_r
        See :func:`binarize_response`.
    """
    if isinstance(source, (tuple, list)):
        X, genes, samples, values, desc = _read_csv_pair(source, drug)
    else:
        X, genes, samples, values, desc = _read_bulk_anndata(source, drug)
    labels, cut = binarize_response(values, kind=response, linear_r=linear_r)
    keep = labels >= 0
    if keep.sum() < 4:
        msg = f"Only {int(keep.sum())} bulk samples have a response for drug {drug!r}; transfer needs at least 4."
        raise InputDataError(msg)
    y = labels[keep]
    if np.unique(y).size < 2:
        msg = f"All {y.size} labelled bulk samples of drug {drug!r} are {'sensitive' if y[0] else 'resistant'}; the source needs both classes."
        raise InputDataError(msg)
    if not np.isfinite(X[keep]).all():
        msg = "The bulk expression matrix holds NaN or inf values; impute or drop them before transfer."
        raise InputDataError(msg)
    desc.update({"drug": drug, "response": response, "n_samples": int(keep.sum()),
                 "n_missing_response": int((~keep).sum()), **bulk_hashes(X[keep], genes, samples[keep], y)})
    return BulkData(X=X[keep], genes=genes, y=y, sample_ids=samples[keep], cut=cut, description=desc)


def bulk_hashes(X: np.ndarray, genes: np.ndarray, samples: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """``content_hash`` (expression, gene ids, sample ids) and ``labels_hash`` (sample, label) of what a run reads.

    A store source is recorded by dataset id and label set; without these a bulk source was recorded by its path
    only (an AnnData passed in memory: by nothing), so two runs on different bulk data, or on a file changed since,
    could not be told apart. The same values hash alike whether read from an AnnData or a CSV pair.
    """
    import hashlib

    content = hashlib.blake2b(digest_size=16)
    content.update(f"{X.shape[0]}x{X.shape[1]}".encode())
    for part in (genes, samples):
        content.update("\x1f".join(map(str, part)).encode() + b"\x1e")
    content.update(np.ascontiguousarray(X, np.float64).tobytes())
    labels = hashlib.blake2b(digest_size=16)
    labels.update("\x1f".join(f"{s}:{int(v)}" for s, v in zip(samples, y)).encode())
    return {"content_hash": content.hexdigest(), "labels_hash": labels.hexdigest()}


def bulk_drug(source: Any, drug: str | None) -> str | None:
    """The drug a bulk source's responses are of: ``drug``, else the only drug column of a response CSV (None: unknown).

    A CSV pair without ``drug`` is read for its one response column; the run must know that drug before it picks the
    target's label set to score against, or it scores one drug's predictions against another drug's labels.
    """
    if drug is not None or not isinstance(source, (tuple, list)) or len(source) != 2:
        return drug
    path = Path(source[1])
    if not path.is_file():
        return None  # read_bulk refuses it, naming the path
    columns = pd.read_csv(path, index_col=0, nrows=0).columns
    return str(columns[0]) if len(columns) == 1 else None


def _read_csv_pair(pair: Sequence[Any], drug: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Series, dict[str, Any]]:
    if len(pair) != 2:
        msg = f"A CSV bulk source is a pair (expression.csv, response.csv); got {len(pair)} paths."
        raise InputDataError(msg)
    expr_path, resp_path = (Path(p) for p in pair)
    for path in (expr_path, resp_path):
        if not path.exists():
            msg = f"Bulk source file {str(path)!r} does not exist."
            raise InputDataError(msg)
    expr = pd.read_csv(expr_path, index_col=0)
    # pandas renames a repeated header 'TP53' to 'TP53.1', a gene no dataset has: it dropped out of the shared genes
    # without the warning the same columns of an AnnData get (column_index)
    expr.columns = pd.read_csv(expr_path, header=None, nrows=1, index_col=0, dtype=str).iloc[0].to_numpy()
    resp = pd.read_csv(resp_path, index_col=0)
    if drug is None:
        if resp.shape[1] != 1:
            msg = f"The response CSV has {resp.shape[1]} drug columns; name one with drug=... (--drug). Columns: {', '.join(map(str, resp.columns[:10]))}."
            raise InputDataError(msg)
        drug = str(resp.columns[0])
    if drug not in resp.columns:
        msg = f"Drug {drug!r} is not a column of {resp_path.name}; columns: {', '.join(map(str, resp.columns[:20]))}."
        raise InputDataError(msg)
    expr.index = expr.index.astype(str)
    resp.index = resp.index.astype(str)
    for frame, path in ((expr, expr_path), (resp, resp_path)):
        twice = frame.index[frame.index.duplicated()].unique()
        if len(twice):  # which row would be the sample's? matching by id needs one row each
            msg = (f"{path.name} lists {len(twice)} sample ids more than once (e.g. {list(twice[:3])}); the first "
                   "column must name each sample once: drop or merge the repeated rows.")
            raise InputDataError(msg)
    common = expr.index.intersection(resp.index)
    if len(common) == 0:
        msg = (f"No sample id of {expr_path.name} is in {resp_path.name} (e.g. {list(expr.index[:3])} vs "
               f"{list(resp.index[:3])}); the first column of both files must hold the same sample ids.")
        raise InputDataError(msg)
    unmatched = _responses_without_expression(resp[drug], expr.index, expr_path.name, resp_path.name)
    expr = expr.loc[common]
    try:
        X = expr.to_numpy(np.float64)
    except ValueError as err:
        msg = f"{expr_path.name} holds non-numeric expression values ({err}); samples must be rows, genes columns."
        raise InputDataError(msg) from err
    desc = {"kind": "bulk-csv", "expression": str(expr_path), "response_file": str(resp_path),
            "n_response_without_expression": unmatched}
    return X, np.asarray(expr.columns.astype(str), dtype=object), np.asarray(common, dtype=object), resp.loc[common, drug], desc


def _match_key(sample: str) -> str:
    return "".join(ch for ch in sample.casefold() if ch.isalnum())


def _responses_without_expression(response: pd.Series, expressed: pd.Index, expr_name: str, resp_name: str) -> int:
    """How many samples with a response have no expression row; a warning names them when there are any.

    They were left out without a word: the run trained on fewer cell lines than the response file holds, and a
    waterfall cutoff was computed on those left, not on every response to the drug.
    """
    measured = response.index[response.notna().to_numpy()]
    missing = measured.difference(expressed, sort=False)
    if missing.empty:
        return 0
    spelled = {_match_key(s): s for s in expressed}
    near = [f"{s!r} ~ {spelled[_match_key(s)]!r}" for s in missing if _match_key(s) in spelled]
    hint = (f"; {len(near)} of them match an expression row but for case or punctuation (e.g. {', '.join(near[:3])}): "
            "spell the sample ids of both files alike" if near else "")
    warnings.warn(f"{len(missing)} of the {len(measured)} samples with a response to {response.name!r} in {resp_name} have "
                  f"no row in {expr_name} (e.g. {', '.join(map(repr, missing[:3]))}) and are left out: the run trains on "
                  f"the other {len(measured) - len(missing)}, and a waterfall cutoff is computed on them alone{hint}.",
                  TransferWarning, stacklevel=4)
    return len(missing)


def _read_bulk_anndata(source: Any, drug: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Series, dict[str, Any]]:
    import anndata as ad

    path = None
    if not isinstance(source, ad.AnnData):
        path = Path(source)
        if not path.exists():
            msg = f"Bulk source {str(path)!r} does not exist (pass an .h5ad path, an AnnData or a CSV pair)."
            raise InputDataError(msg)
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            msg = (f"Bulk source {path.name!r} is an expression table: give the CSV of its responses with it "
                   "(--labels responses.csv; in Python the pair (expression.csv, responses.csv)).")
            raise InputDataError(msg)
        try:
            source = ad.read_h5ad(path)
        except OSError as err:
            msg = (f"Cannot read bulk source {str(path)!r} as an .h5ad ({err}); pass an .h5ad file, an AnnData or a "
                   "pair of CSVs (expression, responses).")
            raise InputDataError(msg) from err
    column = drug if drug is not None else "response"
    if column not in source.obs.columns:
        msg = (f"The bulk AnnData has no obs column {column!r} with the drug response; obs columns: "
               f"{', '.join(map(str, source.obs.columns[:20])) or '(none)'}.")
        raise InputDataError(msg)
    X = source.X.toarray() if sp.issparse(source.X) else np.asarray(source.X)
    desc = {"kind": "bulk-anndata", "path": None if path is None else str(path)}
    return (X.astype(np.float64), np.asarray(source.var_names.astype(str), dtype=object),
            np.asarray(source.obs_names.astype(str), dtype=object), source.obs[column].reset_index(drop=True), desc)


# --------------------------------------------------------------------------------------------
# genes
# --------------------------------------------------------------------------------------------
def symbols_of(gene_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """HGNC symbols of gene ids of any kind (symbols pass through; unknown Ensembl/Entrez ids -> None)."""
    from scdm.store.genes import detect_gene_id_kind, map_genes

    ids = [str(g) for g in gene_ids]
    kind = detect_gene_id_kind(ids)
    if kind == "symbol":
        return np.asarray(ids, dtype=object)
    return map_genes(ids, src=kind, dst="symbol")


def shared_genes(symbol_lists: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[str]:
    """Symbols present in every list, in the order and spelling of the last list (the target).

    Symbols are matched case-insensitively, as the models' vocabularies and the gene table match
    them (``Actb`` is ``ACTB``: a mouse-style target against a human bulk source). Fewer than :data:`LOW_GENE_OVERLAP` of the smallest list's genes shared is warned about
    (``names`` name the lists in the warning): the model then sees a fraction of each domain's
    genes, which usually means ids of another kind or species that did not map.
    """
    sets = [{s.upper() for s in lst if s} for lst in symbol_lists]
    common = set.intersection(*sets)
    order, seen = [], set()
    for s in symbol_lists[-1]:
        if s and s.upper() in common and s.upper() not in seen:
            seen.add(s.upper())
            order.append(s)
    if len(order) < _MIN_SHARED_GENES:
        msg = (f"Source and target share only {len(order)} genes (by HGNC symbol); transfer needs at least "
               f"{_MIN_SHARED_GENES}. Check that both use human gene ids the shipped table knows.")
        raise GeneMappingError(msg)
    if len(order) < LOW_GENE_OVERLAP * min(len(s) for s in sets):
        names = list(names) if names is not None else [f"list {i + 1}" for i in range(len(sets))]
        counts = ", ".join(f"{name} {len(s)}" for name, s in zip(names, sets))
        warnings.warn(f"Source and target share only {len(order)} genes (by HGNC symbol, of "
                      f"{counts} genes): the model sees only these. Check that every dataset uses human gene ids the "
                      "shipped table knows (symbols or Ensembl ids of one kind).", TransferWarning, stacklevel=3)
    return order


def column_index(symbols: np.ndarray, genes: Sequence[str], *, name: str = "a matrix") -> np.ndarray:
    """Column of each of ``genes`` in a matrix whose columns have ``symbols`` (first occurrence, any case).

    A gene of ``genes`` with several columns (gene ids that map to one symbol) is read from its first
    column only; a warning naming ``name`` says how many genes and columns that concerns, since the
    others' values are left out.
    """
    first: dict[str, int] = {}
    n_columns: dict[str, int] = {}
    for i, s in enumerate(symbols):
        if s:
            key = s.upper()
            first.setdefault(key, i)
            n_columns[key] = n_columns.get(key, 0) + 1
    several = [g for g in dict.fromkeys(g.upper() for g in genes) if n_columns.get(g, 0) > 1]
    if several:
        left_out = sum(n_columns[g] - 1 for g in several)
        examples = ", ".join(f"{g!r} ({n_columns[g]} columns)" for g in several[:3])
        warnings.warn(f"{name}: {len(several)} of the {len(genes)} genes used have several columns (gene ids that map to "
                      f"one symbol, e.g. {examples}); only the first column of each is read, so {left_out} columns are "
                      "left out. Sum or drop the duplicated columns and ingest again to choose yourself.",
                      TransferWarning, stacklevel=3)
    return np.asarray([first[g.upper()] for g in genes], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# expression
# --------------------------------------------------------------------------------------------
def log_normalize(X: Any, kind: str, *, columns: np.ndarray | None = None) -> sp.csr_matrix:
    """Log-normalised expression of the selected columns, as CSR float32.

    ``counts``: library size normalisation to 1e4 over *all* genes of the row, then ``log1p``
    (scanpy's ``normalize_total`` + ``log1p``). ``tpm``: ``log1p``. ``normalized``/``scaled``/
    ``log``: taken as they are (already normalised or log-scale).
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    if kind == "counts":
        totals = np.asarray(X.sum(axis=1)).ravel()
        totals[totals == 0] = 1.0
        X = sp.csr_matrix(sp.diags(_TARGET_SUM / totals) @ X)
    if columns is not None:
        X = X[:, columns]
    X = sp.csr_matrix(X)
    if kind in ("counts", "tpm"):
        X.data = np.log1p(X.data)
    return X.astype(np.float32)


def bulk_kind(X: np.ndarray, transform: str) -> str:
    """How to log-normalise a bulk matrix: ``auto`` looks at the values.

    Non-negative integers -> ``counts``; non-negative values above 50 -> ``tpm`` (log1p);
    anything else is taken to be log-scale already (RMA / log2 expression as in GDSC and CCLE).
    """
    if transform != "auto":
        if transform not in ("counts", "tpm", "log"):
            msg = f"source_transform={transform!r}: use auto, counts, tpm or log."
            raise InputDataError(msg)
        return transform
    if (X < 0).any():
        return "log"
    if np.all(X == np.round(X)):
        return "counts"
    return "tpm" if X.max() > LOG_SCALE_MAX else "log"


def read_store_expression(st: Store, dataset: str, genes: Sequence[str], *, block_rows: int = 8192,
                          names: np.ndarray | None = None) -> sp.csr_matrix:
    """Log-normalised expression of a store dataset on ``genes`` (symbols), CSR (n_cells, n_genes).

    Counts get ``normalize_total`` + ``log1p``; normalised values are taken as they are when they
    are log-scale, and get ``log1p`` (with a warning) when some exceed :data:`LOG_SCALE_MAX`, as a
    TPM bulk source does: then every domain is log-scale, and the target's highly variable genes
    (scanpy's ``seurat`` flavour, which takes ``expm1`` of its input) do not overflow. The choice
    looks at every gene of the dataset, so it does not depend on ``genes``. ``names``: the dataset's column names
    ``genes`` are looked up in (:func:`spelled_as_target`); by default its stored symbols.
    """
    info = st.dataset(dataset)
    symbols = _store_symbols(st.genes(dataset)) if names is None else names
    cols = column_index(symbols, genes, name=f"dataset {info.name!r}")
    adata = st.open_anndata(dataset, backed=True)
    try:
        # scaled values (negative: z-scores) are taken as they are; log1p is for non-negative ones
        kind = {"counts": "counts", "normalized": None}.get(info.x_kind, "normalized")
        kind = kind or _normalized_kind(adata, info.name, block_rows)
        blocks = []
        for lo in range(0, adata.n_obs, block_rows):
            block = adata.X[lo:min(lo + block_rows, adata.n_obs)]
            blocks.append(log_normalize(block, kind, columns=cols))
    finally:
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(genes)), dtype=np.float32)


def _normalized_kind(adata: Any, name: str, block_rows: int) -> str:
    """``tpm`` (log1p them) for normalised values above :data:`LOG_SCALE_MAX`, else ``normalized`` (as they are)."""
    top = 0.0
    for lo in range(0, adata.n_obs, block_rows):
        block = adata.X[lo:min(lo + block_rows, adata.n_obs)]
        values = block.data if sp.issparse(block) else np.asarray(block)
        if values.size:
            top = max(top, float(np.max(values)))
    if top <= LOG_SCALE_MAX:
        return "normalized"
    warnings.warn(f"Dataset {name!r} holds normalised values up to {top:.4g}, not log-scale: transfer takes log1p of "
                  "them, as of a TPM bulk source (ingest log-normalised values, or counts, to choose yourself).",
                  TransferWarning, stacklevel=4)
    return "tpm"


def _store_symbols(table: pd.DataFrame) -> np.ndarray:
    """Symbols of a store dataset's genes (the mapped symbol, else the id itself).

    An id the shipped table cannot map (a retired Entrez id) still matches the same id in another
    dataset, as in the pca/hvg baselines; dropping it lost shared genes without a word.
    """
    symbol = table["symbol"].astype(object).where(table["symbol"].notna(), None)
    ids = table["gene_id"].astype(str)
    return np.asarray([s if s else (g or None) for s, g in zip(symbol, ids)], dtype=object)


def store_symbols(st: Store, dataset: str) -> np.ndarray:
    """Symbols of a store dataset's genes, in matrix column order."""
    return _store_symbols(st.genes(dataset))


def store_gene_keys(st: Store, dataset: str) -> np.ndarray:
    """The gene each of a store dataset's columns resolves to (:func:`scdm.store.genes.stored_gene_keys`)."""
    from scdm.store.genes import as_gene_id_kind, stored_gene_keys

    return stored_gene_keys(st.genes(dataset), as_gene_id_kind(st.dataset(dataset).gene_id_kind))


def gene_keys_of(gene_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The gene each of a bulk source's gene ids (of any one kind) resolves to (:func:`scdm.store.genes.gene_match_keys`)."""
    from scdm.store.genes import detect_gene_id_kind, gene_match_keys

    ids = [str(g) for g in gene_ids]
    return gene_match_keys(ids, detect_gene_id_kind(ids))


def spelled_as_target(keys: np.ndarray, target_names: np.ndarray, target_keys: np.ndarray) -> np.ndarray:
    """A domain's gene names with each gene the target also has written as the target writes it.

    Genes are matched by the gene they resolve to, not by their spelling: an outdated symbol (``AARS``)
    in one dataset and the Ensembl id of its gene (``AARS1``) in another are one gene. A gene the
    target lacks gets its key as name (``entrez:...``/``id:...``), which no target name equals.
    """
    target_name: dict[str, str] = {}
    for name, key in zip(target_names, target_keys):
        if name:
            target_name.setdefault(key, name)
    return np.asarray([target_name.get(k, k) for k in keys], dtype=object)


def select_hvg(X: sp.csr_matrix, genes: Sequence[str], n_top: int | None, *, scaled: bool = False) -> list[str]:
    """The ``n_top`` most variable genes of the target (scanpy's ``seurat`` flavour on log data).

    ``None`` or ``n_top >= n_genes`` keeps every gene. Only the target's expression is used: no
    label and no source value enters the choice. ``scaled`` (z-scored) values are ranked by their
    variance: the ``seurat`` flavour takes ``expm1`` of its input as log data, and on z-scores its
    dispersion is NaN wherever a gene's mean is negative (on SCC47 it kept genes of mean variance
    1.07 and left out those of 1.36). When z-scoring gave every gene one variance, no ranking
    exists and every gene is kept.
    """
    genes = list(genes)
    if n_top is None or n_top >= len(genes):
        return genes
    if scaled:
        return _top_variance_genes(X, genes, int(n_top))
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32))
    adata.var_names = genes
    sc.pp.highly_variable_genes(adata, n_top_genes=int(n_top), flavor="seurat")
    hv = adata.var["highly_variable"].to_numpy()
    return [g for g, keep in zip(genes, hv) if keep]


VARIANCE_TIE_RTOL = 1e-5
"""Variances this close (relative) are one value (a matrix z-scored per gene: 1 +- 3e-6 in float32)."""


def column_variances(X: sp.spmatrix | np.ndarray, *, block_bytes: int = 64 << 20) -> np.ndarray:
    """Per-column variance (float64, ddof 0), a block of columns at a time.

    A whole float64 copy of the target would take 16 GB at 100,000 cells x 20,000 genes; a block
    takes ``block_bytes``. Each column's variance is numpy's over the same values: it equals
    ``X.toarray().astype(float64).var(axis=0)`` up to summation order (1e-16 relative).
    """
    n_cells, n_genes = X.shape
    step = max(1, block_bytes // (8 * max(n_cells, 1)))
    out = np.empty(n_genes, dtype=np.float64)
    if sp.issparse(X):
        columns = sp.csc_matrix(X)  # column slices of a CSC matrix are cheap
        for lo in range(0, n_genes, step):
            out[lo:lo + step] = columns[:, lo:lo + step].toarray().astype(np.float64).var(axis=0)
        return out
    dense = np.asarray(X)
    for lo in range(0, n_genes, step):
        out[lo:lo + step] = dense[:, lo:lo + step].astype(np.float64).var(axis=0)
    return out


def _top_variance_genes(X: sp.spmatrix | np.ndarray, genes: list[str], n_top: int) -> list[str]:
    """The ``n_top`` genes of largest variance, in gene order; every gene when the cut falls inside a tie."""
    var = column_variances(X)
    ranked = np.argsort(-var, kind="stable")
    cut = var[ranked[n_top - 1]]
    tied = np.abs(var - cut) <= VARIANCE_TIE_RTOL * max(abs(float(cut)), 1e-12)
    if cut > 0 and 10 * int(tied[ranked[:n_top]].sum()) >= n_top and tied[ranked[n_top:]].any():
        warnings.warn(f"{int(tied.sum())} of the {len(genes)} shared genes of the target have one variance ({float(cut):.6g}; "
                      f"values z-scored per gene on these cells): no {n_top} of them are more variable than the others, so "
                      "every gene is kept as a feature", TransferWarning, stacklevel=3)
        return genes
    keep = np.zeros(len(genes), dtype=bool)
    keep[ranked[:n_top]] = True
    return [g for g, k in zip(genes, keep) if k]


@dataclass(frozen=True)
class MinMax:
    """Per-feature MinMax scaling to [0, 1], fitted on one domain (as in scDEAL)."""

    low: np.ndarray
    """Per-feature minimum, float32 (n_features,)."""
    span: np.ndarray
    """Per-feature max - min (1 where constant), float32 (n_features,)."""

    @classmethod
    def fit(cls, X: np.ndarray) -> MinMax:
        low = X.min(axis=0).astype(np.float32)
        span = (X.max(axis=0) - low).astype(np.float32)
        span[span <= 0] = 1.0
        return cls(low, span)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float32) - self.low) / self.span).astype(np.float32)


def dense(X: Any) -> np.ndarray:
    """A dense float32 copy of a (possibly sparse) matrix."""
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# validation carve-out and class balance
# --------------------------------------------------------------------------------------------
def split_source(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, validation) row indices of labelled source cells.

    Each class gives ``round(fraction * its size)`` rows to validation, at least one when it has
    two or more and never all of them; the kept epoch of a transfer fit is chosen on these rows.
    """
    rng = np.random.default_rng(seed)
    val = []
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        take = round(members.size * fraction)
        if members.size >= 2 and take == 0:
            take = 1
        if take >= members.size:
            take = members.size - 1
        if take > 0:
            val.append(rng.choice(members, size=take, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(y.size), val_idx), val_idx


def balance_classes(X: np.ndarray, y: np.ndarray, method: str, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balance the two classes of the source training cells.

    Parameters
    ----------
    method : {"none", "upsample", "downsample", "smote"}
        ``upsample`` draws minority rows with replacement up to the majority count;
        ``downsample`` keeps a random subset of the majority of the minority's size; ``smote``
        synthesises minority rows (imbalanced-learn's SMOTE, an optional dependency).
    """
    if method == "none":
        return X, y
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if counts.min() == 0:
        msg = "Cannot balance classes: the source training cells hold one class only."
        raise InputDataError(msg)
    rng = np.random.default_rng(seed)
    minority = int(np.argmin(counts))
    idx_min, idx_maj = np.flatnonzero(y == minority), np.flatnonzero(y != minority)
    if method == "upsample":
        extra = rng.choice(idx_min, size=counts.max() - counts.min(), replace=True)
        rows = np.concatenate([np.arange(y.size), extra])
    elif method == "downsample":
        rows = np.concatenate([idx_min, rng.choice(idx_maj, size=idx_min.size, replace=False)])
    elif method == "smote":
        return _smote(X, y, seed=seed, n_minority=int(counts.min()))
    else:
        msg = f"balance={method!r}: use none, upsample, downsample or smote."
        raise InputDataError(msg)
    rows = np.sort(rows)
    return X[rows], y[rows]


def _smote(X: np.ndarray, y: np.ndarray, *, seed: int, n_minority: int) -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("imblearn") is None:
        msg = ("balance='smote' needs the imbalanced-learn package, which is not installed. Install it "
               "(pip install imbalanced-learn) or use balance='upsample' / 'downsample'.")
        raise InputDataError(msg)
    from imblearn.over_sampling import SMOTE

    if n_minority < 2:
        msg = f"SMOTE needs at least 2 minority samples; the source has {n_minority}. Use balance='upsample'."
        raise InputDataError(msg)
    sampler = SMOTE(random_state=seed, k_neighbors=min(5, n_minority - 1))
    Xb, yb = sampler.fit_resample(X, y)
    return np.asarray(Xb, np.float32), np.asarray(yb, y.dtype)


# --------------------------------------------------------------------------------------------
# target clusters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clusters:
    """Clusters of the target cells for the cluster regulariser."""

    labels: np.ndarray
    """Cluster of every target cell (int64, 0..n_clusters-1)."""
    method: str
    """``leiden``, ``louvain`` or ``kmeans``."""
    note: str
    """How they were obtained (fallbacks included)."""

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0


def cluster_cells(X: np.ndarray, *, method: Literal["auto", "leiden", "louvain", "kmeans"] = "auto",
                  resolution: float = 0.3, n_neighbors: int = 10, n_clusters: int | None = None,
                  seed: int = 0) -> Clusters:
    """Cluster the target cells (graph clusters on their PCA, as scDEAL does with Leiden).

    ``auto`` uses Leiden when ``leidenalg`` and ``igraph`` are importable, else Louvain when
    ``louvain`` is, else KMeans on the PCA with ``k`` chosen by the silhouette score over
    2..10 on at most 3,000 cells (or ``n_clusters`` when given). The fallback is logged and
    recorded with the run. No label is used.
    """
    n = X.shape[0]
    if n < 4:
        return Clusters(np.zeros(n, np.int64), "none", "fewer than 4 target cells: one cluster")
    pcs = _pca(X, seed=seed)
    have_leiden, have_louvain = _have_leiden(), _have_louvain()
    if method == "auto":
        method = auto_cluster_method()
        if method == "kmeans":
            warnings.warn("leidenalg/igraph are not installed: the target clusters of the cluster regulariser come "
                          "from KMeans on the PCA instead of Leiden (pip install leidenalg for the paper's clusters); "
                          "the run records cluster_method='kmeans'.", TransferWarning, stacklevel=4)
    if method in ("leiden", "louvain"):
        if (method == "leiden" and not have_leiden) or (method == "louvain" and not have_louvain):
            need = "leidenalg and igraph" if method == "leiden" else "louvain"
            msg = f"cluster_method={method!r} needs {need}, which is not installed; use 'kmeans' or 'auto'."
            raise InputDataError(msg)
        return _graph_clusters(pcs, method, resolution=resolution, n_neighbors=n_neighbors, seed=seed)
    if method != "kmeans":
        msg = f"cluster_method={method!r}: use auto, leiden, louvain or kmeans."
        raise InputDataError(msg)
    return _kmeans_clusters(pcs, n_clusters=n_clusters, seed=seed)


def _have_leiden() -> bool:
    return importlib.util.find_spec("leidenalg") is not None and importlib.util.find_spec("igraph") is not None


def _have_louvain() -> bool:
    return importlib.util.find_spec("louvain") is not None


def auto_cluster_method() -> Literal["leiden", "louvain", "kmeans"]:
    """The method ``cluster_method="auto"`` stands for here: it depends on the packages installed."""
    return "leiden" if _have_leiden() else ("louvain" if _have_louvain() else "kmeans")


def _pca(X: np.ndarray, *, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    k = int(min(50, X.shape[1], X.shape[0] - 1))
    return PCA(n_components=k, random_state=seed).fit_transform(np.asarray(X, np.float64)).astype(np.float32)


def _graph_clusters(pcs: np.ndarray, method: str, *, resolution: float, n_neighbors: int, seed: int) -> Clusters:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.zeros((pcs.shape[0], 1), np.float32))
    adata.obsm["X_pca"] = pcs
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, pcs.shape[0] - 1), use_rep="X_pca", random_state=seed)
    if method == "leiden":
        sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2,
                     directed=False)
    else:
        sc.tl.louvain(adata, resolution=resolution, random_state=seed)
    labels = pd.Categorical(adata.obs[method]).codes.astype(np.int64)
    note = f"{method} (resolution {resolution}, {n_neighbors} neighbours on {pcs.shape[1]} PCs): {labels.max() + 1} clusters"
    return Clusters(labels, method, note)


def _kmeans_clusters(pcs: np.ndarray, *, n_clusters: int | None, seed: int) -> Clusters:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = pcs.shape[0]
    if n_clusters is None:
        rng = np.random.default_rng(seed)
        sub = pcs[rng.choice(n, size=min(n, _KMEANS_SUBSAMPLE), replace=False)]
        best_k, best = 2, -math.inf
        for k in range(2, min(_MAX_KMEANS_K, sub.shape[0] - 1) + 1):
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(sub)
            if np.unique(labels).size < 2:
                continue
            score = float(silhouette_score(sub, labels))
            if score > best:
                best_k, best = k, score
        k, how = best_k, f"k={best_k} by silhouette ({best:.3f}) over 2..{_MAX_KMEANS_K}"
    else:
        k, how = int(n_clusters), f"k={n_clusters} as given"
    labels = KMeans(n_clusters=min(k, n), n_init=4, random_state=seed).fit_predict(pcs).astype(np.int64)
    return Clusters(labels, "kmeans", f"kmeans on {pcs.shape[1]} PCs, {how} (Leiden not available)")
