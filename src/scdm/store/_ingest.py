"""Reading and checking an AnnData for ingest: content hash, value kind, cell metadata, labels.

Everything here reads the expression matrix in row blocks, so memory stays bounded for
large backed ``.h5ad`` files.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdm.store.errors import InputDataError, ScdmWarning
from scdm.store.genes import GENE_ID_KINDS, GeneIdKind, as_gene_id_kind, detect_gene_id_kind, ids_not_of_kind, map_genes
from scdm.store.matrix import LOG_VALUE_MAX, SCAN_BLOCK_ROWS, iter_row_blocks, to_csr
from scdm.store.wording import input_file, offers, option

if TYPE_CHECKING:
    import anndata as ad

# iter_row_blocks and to_csr live in store.matrix (public); they stay importable from here too
__all__ = ["IngestOptions", "MatrixScan", "open_anndata", "iter_row_blocks", "to_csr", "scan_matrix", "normalise_response",
           "cell_table", "gene_ids_of", "IngestWarning"]

logger = logging.getLogger(__name__)

X_KINDS = ("counts", "normalized", "scaled")


class IngestWarning(ScdmWarning):
    """Ingest used something other than what was given or expected.

    A stored dataset's name instead of the one given, or a value kind that a few stray values decided.
    """


MIXED_GENE_ID_FRACTION = 0.1
"""More than this share of a dataset's gene ids shaped like another kind than the rest is warned
about: a matrix of two id kinds (Ensembl ids for some genes, symbols for others) is read as one kind,
and no model finds the genes of the other (a few spike-ins or unnamed genes stay below it)."""


UNEQUAL_TOTALS = 2.0
"""Cells' totals differing by more than this factor were not normalised to one total."""


STRAY_VALUE_FRACTION = 0.01
"""Up to this share of a matrix's stored values not being non-negative integers is warned about as
likely errors in a count matrix (a normalised or scaled matrix has far more such values)."""


_SENSITIVE = {"sensitive", "responder", "response", "responsive", "yes", "true", "1", "s", "r+", "sensitivity"}
_RESISTANT = {"resistant", "non-responder", "nonresponder", "non_responder", "non-response", "no", "false", "0",
              "non-responsive", "nonresponsive", "resistance"}
_UNKNOWN = {"", "nan", "na", "n/a", "none", "unknown", "null"}

# metadata column -> (option naming the obs column, option giving a constant)
METADATA_FIELDS: dict[str, tuple[str, str]] = {
    "study": ("study_key", "study"),
    "sample": ("sample_key", "sample"),
    "tissue": ("tissue_key", "tissue"),
    "cancer_type": ("cancer_key", "cancer_type"),
    "drug_type": ("drug_type_key", "drug_type"),
    "regimen": ("regimen_key", "regimen"),
}


LABEL_OPTIONS = ("label_key", "positive", "unknown_values", "drug", "label_set")
"""Options that define a label set rather than the dataset."""
DATASET_OPTIONS = ("gene_key", "gene_id_kind", "x_kind")
"""Options that define how the matrix is read (they change the dataset's content, not its metadata)."""


@dataclass(frozen=True)
class IngestOptions:
    """How an AnnData's columns map onto the catalog (every field is optional)."""

    label_key: str | None = None
    """obs column with the drug response; None = unlabelled dataset."""
    positive: str | None = None
    """Label value meaning sensitive, for labels that are not sensitive/resistant-like."""
    unknown_values: tuple[str, ...] = ()
    """Label values to store as unknown (NULL), e.g. ``not_in_scDEAL_set``."""
    drug: str | None = None
    """The drug the labels are the response to (recorded with the label set)."""
    label_set: str | None = None
    """Name of the label set the labels become (default: ``drug``, else ``label_key``)."""
    study_key: str | None = None
    study: str | None = None
    sample_key: str | None = None
    sample: str | None = None
    tissue_key: str | None = None
    tissue: str | None = None
    cancer_key: str | None = None
    cancer_type: str | None = None
    drug_type_key: str | None = None
    drug_type: str | None = None
    regimen_key: str | None = None
    regimen: str | None = None
    gene_key: str | None = None
    """var column holding the gene ids (default: ``var_names``)."""
    gene_id_kind: str | None = None
    """symbol | ensembl | entrez; detected when None."""
    x_kind: str | None = None
    """counts | normalized | scaled; detected when None."""

    def to_json_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v not in (None, ())}


@dataclass(frozen=True)
class MatrixScan:
    """What one pass over the expression matrix found."""

    content_hash: str
    x_kind: str
    x_format: str
    n_cells: int
    n_genes: int
    nnz: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def open_anndata(data: str | Path | ad.AnnData) -> tuple[ad.AnnData, str | None]:
    """Open an ``.h5ad`` path in backed mode (or take an AnnData as is).

    Returns the AnnData and the resolved source path (None for an in-memory object).
    """
    import anndata as ad

    if isinstance(data, ad.AnnData):
        if data.X is None:
            msg = "The AnnData has no expression matrix (X is None); set adata.X to the counts or normalised values."
            raise InputDataError(msg)
        return data, None
    path = Path(data).expanduser()
    if not path.exists():
        msg = f"No such file: {input_file(path)}. Give the path of an .h5ad file."
        raise InputDataError(msg)
    if path.is_dir() or not _is_hdf5(path):
        msg = (
            f"{input_file(path)} is not an .h5ad (HDF5) file. Convert it first, e.g. "
            "anndata.read_csv(...) / scanpy.read_10x_mtx(...) followed by adata.write_h5ad('data.h5ad')."
        )
        raise InputDataError(msg)
    outside = _outside_references(path)
    if outside:
        msg = (f"{input_file(path)} reads data from outside itself: {'; '.join(outside[:3])}"
               f"{f' (and {len(outside) - 3} more)' if len(outside) > 3 else ''}. The store keeps a copy of the file, "
               "which must hold its own data: write a self-contained copy with "
               "anndata.read_h5ad(path).write_h5ad(new_path) where those files are, and ingest that.")
        raise InputDataError(msg)
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # anndata raises many types for malformed files
        msg = f"Could not read {input_file(path)} as AnnData: {err}. Is it an .h5ad written by anndata?"
        raise InputDataError(msg) from err
    if not _has_x(adata):
        msg = (f"{input_file(path)} has no expression matrix (no X): anndata wrote it from an AnnData with X = None. "
               "Set adata.X to the counts or normalised values (e.g. adata.X = adata.layers['counts']), write the "
               "file again and ingest that.")
        raise InputDataError(msg)
    return adata, str(path.resolve())


def _has_x(adata: ad.AnnData) -> bool:
    """Whether a backed AnnData has X (its file may lack one; reading it then raises a bare KeyError)."""
    try:
        return adata.X is not None
    except KeyError:
        return False


def _outside_references(path: Path) -> list[str]:
    """Where an HDF5 file takes data from other files: external links, external raw storage, virtual datasets.

    anndata follows all three without a word, so an ``.h5ad`` can name any file its reader may
    read (an upload to ``scdm serve`` could pull a server-side file into the catalog, where SQL
    shows it), and the store's copy of it would change when those files do. None is written by
    anndata itself. Unreadable files answer ``[]`` (the reader's own error is clearer).
    """
    import h5py

    found: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            groups: list[Any] = [f]

            def visit(name: str, obj: Any) -> None:  # every object reached by hard links, once
                if isinstance(obj, h5py.Group):
                    groups.append(obj)
                elif obj.is_virtual:
                    found.append(f"/{name} is a virtual dataset over {sorted({m.file_name for m in obj.virtual_sources()})}")
                elif obj.external:
                    found.append(f"/{name} is stored in {sorted({str(e[0]) for e in obj.external})}")

            f.visititems(visit)
            for group in groups:  # visititems does not report links that point to other files
                for name in group:
                    link = group.get(name, getlink=True)
                    if isinstance(link, h5py.ExternalLink):
                        found.append(f"{group.name.rstrip('/')}/{name} links to {link.filename}:{link.path}")
    except OSError:
        return []
    return found


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def x_format_of(adata: ad.AnnData) -> str:
    x = adata.X
    name = type(x).__name__.lower()
    if sp.issparse(x) or "csr" in name:
        return "csc" if "csc" in name else "csr"
    if "csc" in name:
        return "csc"
    return "dense"


def gene_ids_of(adata: ad.AnnData, gene_key: str | None) -> np.ndarray:
    """The dataset's gene ids: ``var_names`` or the ``gene_key`` column."""
    if gene_key is None:
        ids = np.asarray(adata.var_names.astype(str), dtype=object)
    else:
        if gene_key not in adata.var.columns:
            cols = ", ".join(map(str, adata.var.columns)) or "(none)"
            msg = f"Gene id column {gene_key!r} is not in var. Available var columns: {cols}. Omit {option('gene_key')} to use var_names."
            raise InputDataError(msg)
        ids = np.asarray(adata.var[gene_key].astype(str), dtype=object)
    return ids


def check_gene_column(adata: ad.AnnData, gene_key: str | None) -> None:
    """Refuse a ``gene_key`` column with missing values (genes without an id in that column).

    As text they would be the gene id 'nan': one such gene is embedded by no model without a word,
    several read as duplicated ids, whose advice (make them unique) would name them 'nan-1', ...
    """
    if gene_key is None or gene_key not in adata.var.columns:
        return  # var_names are never missing; an absent column is gene_ids_of's error
    missing = np.flatnonzero(adata.var[gene_key].isna().to_numpy())
    if not missing.size:
        return
    where = ", ".join(map(str, missing[:5])) + (", ..." if missing.size > 5 else "")
    examples = ", ".join(map(repr, map(str, adata.var_names[missing[:3]])))
    msg = (f"{missing.size} of the {adata.n_vars} genes have no id in var column {gene_key!r} "
           f"({option('gene_key')}) (at position {where}; var_names {examples}). Fill them (e.g. from var_names), "
           f"drop those genes, or omit {option('gene_key')} to use var_names, and ingest again.")
    raise InputDataError(msg)


def check_ids(gene_ids: np.ndarray, cell_ids: np.ndarray) -> None:
    """Refuse empty data and duplicated cell or gene ids."""
    if len(cell_ids) == 0 or len(gene_ids) == 0:
        msg = f"The AnnData is empty ({len(cell_ids)} cells x {len(gene_ids)} genes); nothing to ingest."
        raise InputDataError(msg)
    for what, ids, fix in (
        ("cell", cell_ids, "adata.obs_names_make_unique()"),
        ("gene", gene_ids, f"adata.var_names_make_unique() (or pick another {option('gene_key')})"),
    ):
        blank = np.flatnonzero(pd.Series(np.asarray(ids, dtype=object)).astype(str).str.strip().eq("").to_numpy())
        if blank.size:
            where = ", ".join(map(str, blank[:5])) + (", ..." if blank.size > 5 else "")
            msg = (f"{blank.size} {what} id{'s are' if blank.size > 1 else ' is'} empty (at position {where}); every "
                   f"{what} needs an id. Set them (or drop those {what}s) and ingest again.")
            raise InputDataError(msg)
        dup = pd.Index(ids).duplicated()
        if dup.any():
            examples = ", ".join(map(repr, map(str, pd.unique(np.asarray(ids)[dup])[:5])))
            msg = f"{int(dup.sum())} duplicated {what} ids (e.g. {examples}). Make them unique first: {fix}."
            raise InputDataError(msg)
    _refuse_unclean_ids(cell_ids, "cell", r"[\x00-\x1f\x7f]", "obs_names")
    _refuse_unclean_ids(gene_ids, "gene", r"[\x00-\x1f\x7f]|^\s|\s$", "var_names")
    _refuse_positional_gene_ids(gene_ids)


def _refuse_unclean_ids(ids: np.ndarray, what: str, pattern: str, names: str) -> None:
    """Refuse ids holding a line break, tab or other control character (genes: or surrounding spaces).

    They come from a file read with the wrong line ending (barcodes.tsv written on Windows: every
    id ends in '\\r'). A CSV of cells (``scdm sql --format csv``, ``predict --out x.csv``) writes an
    id with '\\r' unquoted, so readers split its row in two and every later value shifts; a gene
    id with one, or with a space around it, is found by no model.
    """
    text = pd.Series(np.asarray(ids, dtype=object)).astype(str)
    bad = np.flatnonzero(text.str.contains(pattern, regex=True).to_numpy())
    if not bad.size:
        return
    examples = ", ".join(repr(text.iloc[i]) for i in bad[:3])
    around = " or spaces around it" if what == "gene" else ""
    msg = (f"{bad.size} {what} id{'s hold' if bad.size > 1 else ' holds'} a line break, tab or other control "
           f"character{around} (e.g. {examples}): read with the wrong line ending or separator? Clean them "
           f"(e.g. adata.{names} = adata.{names}.str.strip()) and ingest again.")
    raise InputDataError(msg)


def _refuse_positional_gene_ids(gene_ids: np.ndarray) -> None:
    """Refuse gene ids that are the column positions (0..n-1, or R's 1..n), not gene ids.

    An AnnData built from a bare matrix gets var_names "0", "1", ...; they read as Entrez ids,
    and most of them are real ones (1 = A1BG, 2 = A2M, 9 = NAT1, ...), so every model would take
    each column for an unrelated gene. Distinct integers none above n are positions: the n genes of
    a real Entrez list are never all among the ids 0..n.
    """
    text = pd.Series(np.asarray(gene_ids, dtype=object)).astype(str).str.strip()
    if not text.str.fullmatch(r"\d+").all():
        return
    numbers = text.astype(np.int64)
    n = len(numbers)
    if numbers.max() > n:
        return
    msg = (f"The {n} gene ids are the numbers {numbers.min()}..{numbers.max()}: column positions, not gene ids (the "
           "gene names were lost when the AnnData was made, e.g. from a bare matrix). Read as Entrez ids they would "
           "name unrelated genes (1 = A1BG, 2 = A2M, ...). Set the real ids (adata.var_names = GENE_IDS, or "
           f"{option('gene_key', 'COLUMN')} for a var column that holds them) and ingest again.")
    raise InputDataError(msg)


def scan_matrix(adata: ad.AnnData, gene_ids: np.ndarray, cell_ids: np.ndarray, *, block_rows: int = SCAN_BLOCK_ROWS) -> MatrixScan:
    """One pass over X: content hash, NaN/inf check, value kind (counts/normalized/scaled).

    The hash is of a canonical form: CSR with sorted indices, entries stored twice at one
    position summed, explicit zeros dropped, and the values *as float32* (widened to float64
    bytes, an encoding kept so stored datasets keep their ids). float32 because that is what the
    store reads and every model embeds (see :func:`store.matrix.to_csr`): the same numbers stored
    dense or sparse, float32 or float64, hash the same, and two float64 matrices that differ only
    below float32 precision are one dataset.

    A matrix of non-negative integers but for a few values (at most
    :data:`STRAY_VALUE_FRACTION` of them) is still classed by those values; ``notes["stray_values"]``
    records how many and the first one, for :func:`stray_values_message`. ``notes["negative_values"]``
    and ``notes["fractional_values"]`` do the same for every negative and every non-integer value,
    for :func:`check_given_x_kind`.

    Raises
    ------
    InputDataError
        On NaN or inf, or a matrix of zeros only.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{adata.n_obs}x{adata.n_vars}".encode())
    h.update("\x1f".join(map(str, gene_ids)).encode())
    h.update(b"\x1e")
    h.update("\x1f".join(map(str, cell_ids)).encode())
    h.update(b"\x1e")
    negative = False
    integer = True
    nnz = 0
    stray = _StrayValues()
    negatives, fractions = _StrayValues(), _StrayValues()  # what a given x_kind is checked against
    empty = _EmptyCells()
    totals = _CellTotals()
    for lo, block in iter_row_blocks(adata, block_rows):
        _check_finite(block, lo, gene_ids, cell_ids)
        block.eliminate_zeros()
        empty.add(block, lo)
        totals.add(block)
        below, fraction = block.data < 0, block.data != np.round(block.data)
        negative = negative or bool(below.any())
        integer = integer and not fraction.any()
        stray.add(block, lo, below | fraction)
        negatives.add(block, lo, below)
        fractions.add(block, lo, fraction)
        nnz += block.nnz
        h.update(np.diff(block.indptr).astype(np.int64).tobytes())
        h.update(block.indices.astype(np.int64).tobytes())
        h.update(block.data.astype(np.float64).tobytes())
    if nnz == 0:  # every model (and pca) would embed every cell alike: refuse before anything is stored
        msg = (f"The expression matrix holds only zeros ({adata.n_obs} cells x {adata.n_vars} genes): there is nothing to "
               "embed. Put the values in X first, e.g. adata.X = adata.layers['counts'] (or adata.raw.X), and ingest again.")
        raise InputDataError(msg)
    kind = "scaled" if negative else ("counts" if integer else "normalized")
    notes: dict[str, Any] = {"stray_values": stray.note(gene_ids, cell_ids)} if 0 < stray.n <= STRAY_VALUE_FRACTION * nnz else {}
    for key, found in (("negative_values", negatives), ("fractional_values", fractions)):
        if found.n:
            notes[key] = found.note(gene_ids, cell_ids)
    if kind == "normalized" and totals.max_value > LOG_VALUE_MAX:
        notes["unlogged"] = {"max": totals.max_value, "total_min": totals.low, "total_max": totals.high}
    if empty.n:
        notes["empty_cells"] = {"n": empty.n, "cells": [str(cell_ids[r]) for r in empty.first]}
    return MatrixScan(h.hexdigest(), kind, x_format_of(adata), adata.n_obs, adata.n_vars, nnz, notes)


def _check_finite(block: sp.csr_matrix, lo: int, gene_ids: np.ndarray, cell_ids: np.ndarray) -> None:
    data = block.data
    if data.size and not np.isfinite(data).all():
        bad = np.where(~np.isfinite(block.toarray()))
        msg = (
            f"The expression matrix holds NaN or inf (first at cell {cell_ids[lo + bad[0][0]]!r}, gene "
            f"{gene_ids[bad[1][0]]!r}). Replace them (e.g. adata.X = np.nan_to_num(adata.X)) and ingest again."
        )
        raise InputDataError(msg)


@dataclass
class _StrayValues:
    """Stored values that are not non-negative integers: how many, and the first (row, column, value)."""

    n: int = 0
    first: tuple[int, int, float] | None = None

    def add(self, block: sp.csr_matrix, lo: int, stray: np.ndarray) -> None:
        odd = np.flatnonzero(stray)
        if odd.size and self.first is None:
            k = int(odd[0])
            row = int(np.searchsorted(block.indptr, k, side="right")) - 1
            self.first = (lo + row, int(block.indices[k]), float(block.data[k]))
        self.n += int(odd.size)

    def note(self, gene_ids: np.ndarray, cell_ids: np.ndarray) -> dict[str, Any]:
        assert self.first is not None  # n > 0
        row, col, value = self.first
        return {"n": self.n, "cell": str(cell_ids[row]), "gene": str(gene_ids[col]), "value": value}


@dataclass
class _CellTotals:
    """The largest value and the smallest and largest total of the cells that hold any."""

    max_value: float = -np.inf
    low: float = np.inf
    high: float = -np.inf

    def add(self, block: sp.csr_matrix) -> None:
        if not block.nnz:
            return
        self.max_value = max(self.max_value, float(block.data.max()))
        sums = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()[np.diff(block.indptr) > 0]
        self.low, self.high = min(self.low, float(sums.min())), max(self.high, float(sums.max()))


@dataclass
class _EmptyCells:
    """Cells without a single non-zero value: how many, and the rows of the first three."""

    n: int = 0
    first: list[int] = field(default_factory=list)

    def add(self, block: sp.csr_matrix, lo: int) -> None:
        rows = np.flatnonzero(np.diff(block.indptr) == 0)
        self.n += int(rows.size)
        self.first.extend(int(lo + r) for r in rows[: 3 - len(self.first)])


def empty_cells_message(scan: MatrixScan, name: str) -> str | None:
    """The warning for cells whose expression is all zeros (else None)."""
    empty = scan.notes.get("empty_cells")
    if empty is None:
        return None
    shown = ", ".join(map(repr, empty["cells"])) + (", ..." if empty["n"] > len(empty["cells"]) else "")
    return (f"dataset {name!r}: {empty['n']} of its {scan.n_cells} cells have no expression at all (every value 0: "
            f"{shown}). pca and hvg give them all one and the same vector, which heads then score like any cell, and "
            "the foundation models refuse them. If they are empty droplets or filtered-out cells, remove them "
            "(scanpy.pp.filter_cells(adata, min_counts=1)) and ingest again.")


def stray_values_message(scan: MatrixScan, name: str) -> str | None:
    """The warning for a count or normalised matrix that a few stray values made look normalised or scaled (else None)."""
    stray = scan.notes.get("stray_values")
    if stray is None:
        return _stray_negatives_message(scan, name)
    verb = "is" if stray["n"] == 1 else "are"
    head = (f"dataset {name!r}: {stray['n']} of its {scan.nnz} stored values {verb} not a non-negative integer (e.g. cell "
            f"{stray['cell']!r}, gene {stray['gene']!r}: {stray['value']:g}), all others are, so its values were "
            f"classed as {scan.x_kind!r}, not counts, and pca/hvg take them as they are (no normalisation, no log). ")
    negative = scan.notes.get("negative_values")
    if negative is not None:  # no count is negative: taken as counts they make pca's log NaN and every count model refuses them
        n = negative["n"]
        return head + (f"{n} of them {'is' if n == 1 else 'are'} negative, which no count can be: if they are counts with "
                       "a few errors, correct those values (e.g. adata.X[adata.X < 0] = 0 on a dense X) and ingest again.")
    return head + (f"If they are counts with a few errors, {_again_with(option('x_kind', 'counts'))}; otherwise correct "
                   "those values in the data.")


def unlogged_message(scan: MatrixScan, name: str) -> str | None:
    """The warning for non-integer values that are not logged (else None), counts with fractions among them.

    pca and hvg take normalised values as they are: unlogged, the few most expressed genes dominate
    the embedding, and where the cells were not normalised to one total (counts with fractions:
    ambient-RNA corrected, EM-estimated by alevin or salmon) so does each cell's depth.
    """
    found = scan.notes.get("unlogged")
    if found is None or "stray_values" in scan.notes:  # counts but for a few stray values: that warning says so
        return None
    head = (f"dataset {name!r}: its values are not whole numbers, so they were classed as 'normalized', but they are not "
            f"logged (the largest is {found['max']:g}; log-normalised values stay below {LOG_VALUE_MAX:g})")
    if found["total_max"] > UNEQUAL_TOTALS * found["total_min"]:
        return head + (f" nor normalised per cell (the cells' totals range from {found['total_min']:g} to "
                       f"{found['total_max']:g}): counts with fractions (ambient-RNA corrected, or estimated by alevin or "
                       "salmon)? pca and hvg take normalised values as they are, so each cell's depth and the unlogged "
                       "scale shape the embedding, and the foundation models refuse them. If they are counts, round them "
                       "(adata.X = np.rint(adata.X)) and ingest that; if they are normalised, log them "
                       "(scanpy.pp.log1p) first.")
    return head + (". pca and hvg take normalised values as they are, so the few most expressed genes dominate the "
                   "embedding. Log them first (scanpy.pp.log1p(adata)) and ingest that.")


def _stray_negatives_message(scan: MatrixScan, name: str) -> str | None:
    """The warning for normalised values that a few negative ones (at most :data:`STRAY_VALUE_FRACTION`) made 'scaled'.

    Taken as z-scores, scGPT, tGPT and the llm refuse them, transfer ranks the target's genes by variance
    instead of by dispersion on log data, and prompts read them as deviations from the mean.
    """
    negative = scan.notes.get("negative_values")
    if scan.x_kind != "scaled" or negative is None or negative["n"] > STRAY_VALUE_FRACTION * scan.nnz:
        return None
    n = negative["n"]
    return (f"dataset {name!r}: {n} of its {scan.nnz} stored values {'is' if n == 1 else 'are'} negative (e.g. cell "
            f"{negative['cell']!r}, gene {negative['gene']!r}: {negative['value']:g}), all others are not, so its values "
            "were classed as 'scaled' (z-scores), although the rest look like normalised values: scGPT, tGPT and the llm "
            "refuse scaled values, transfer ranks its genes by variance instead of by dispersion, and prompts read its "
            f"values as deviations from the mean. If they are normalised values with a few errors, "
            f"{_again_with(option('x_kind', 'normalized'))}; otherwise correct those values in the data.")


def _contradiction(kind: str | None, scan: MatrixScan) -> tuple[dict[str, Any], str] | None:
    """The values that contradict a value kind (their note and what they are), else None; see :func:`check_given_x_kind`."""
    negative, fractional = scan.notes.get("negative_values"), scan.notes.get("fractional_values")
    few = STRAY_VALUE_FRACTION * scan.nnz
    if kind == "counts" and negative is not None:
        return negative, "negative"
    # fractions above any log value ("unlogged") whose cells' totals differ are estimated or corrected counts
    # (alevin, SoupX): counts as the user says; below it they are log-normalised, which pca would normalise
    # and log again, and with one total per cell they are normalised (CP10k), every cell of one depth
    unlogged = scan.notes.get("unlogged")
    if kind == "counts" and fractional is not None and fractional["n"] > few:
        if unlogged is None:
            return fractional, "not whole numbers"
        if unlogged["total_max"] <= UNEQUAL_TOTALS * unlogged["total_min"]:
            return fractional, (f"not whole numbers and every cell's total is about the same ({unlogged['total_min']:g} "
                                f"to {unlogged['total_max']:g}): values normalised per cell, not counts")
    if kind == "normalized" and negative is not None and negative["n"] > few:
        return negative, "negative"
    return None


def stored_x_kind_message(stored: str, scan: MatrixScan, name: str) -> str | None:
    """The warning for a stored dataset whose value kind its values contradict (else None).

    An scdm before :func:`check_given_x_kind` took any given kind, so a store may hold log-normalised
    values as counts (pca normalises and logs them again) or z-scores as normalised values; ingesting
    the file again without ``x_kind`` keeps the stored kind, so this is where the user hears of it.
    """
    contradiction = _contradiction(stored, scan)
    if contradiction is None:
        return None
    return (f"dataset {name!r} is stored with the value kind {stored!r} (given by an earlier ingest), which its values "
            f"contradict: {_contradiction_text(contradiction, scan)} (detected: {scan.x_kind!r}). Every "
            f"embedding reads them as {stored!r}: {_again_with(option('x_kind', scan.x_kind))} (refused while embeddings "
            "made with the stored kind exist: they are named, to remove first).")


def _contradiction_text(contradiction: tuple[dict[str, Any], str], scan: MatrixScan) -> str:
    """``'<n> of the <nnz> stored values (<share>) are <what> (e.g. cell ..., gene ...: <value>)'``."""
    found, what = contradiction
    return (f"{found['n']} of the {scan.nnz} stored values ({found['n'] / scan.nnz:.1%}) are {what} (e.g. cell "
            f"{found['cell']!r}, gene {found['gene']!r}: {found['value']:g})")


def contradicted_x_kind(given: str | None, scan: MatrixScan) -> str | None:
    """One sentence on the values that contradict a given value kind (see :func:`check_given_x_kind`), None if none do."""
    contradiction = _contradiction(given, scan)
    if contradiction is None:
        return None
    detected = "" if scan.x_kind == given else f" (detected: {scan.x_kind!r})"
    return f"{option('x_kind', given)} does not fit these values{detected}: {_contradiction_text(contradiction, scan)}."


def check_given_x_kind(given: str | None, scan: MatrixScan) -> None:
    """Refuse a given value kind that the matrix's values contradict.

    ``counts`` for a matrix with a negative value, or with more than :data:`STRAY_VALUE_FRACTION`
    of its values not whole numbers while none exceeds :data:`LOG_VALUE_MAX` (log-normalised): pca/hvg
    would normalise and log those values again (a negative one to NaN), and every count model would
    read them as counts; or while every cell's total is about the same (normalised per cell: each cell
    would be read as of one depth). Counts with fractions above that and cells' totals that differ
    (alevin's estimates, SoupX's corrected counts) are taken as counts when the user says so.
    ``normalized`` for a matrix with more than that share negative (z-scored): the checks that keep
    scaled values from the models that rank genes by expression would be passed by.
    """
    contradiction = _contradiction(given, scan)
    if contradiction is None:
        return
    what = contradiction[1]
    per_cell = what.endswith("not counts")  # normalised to one total per cell
    msg = f"{contradicted_x_kind(given, scan)} "
    if given == "counts":
        msg += ("Taken as counts, every count model would read each cell's depth as that one total (scFoundation's "
                "total-count token)" if per_cell else
                "Taken as counts, pca and hvg would normalise and log them again (a negative value to NaN) and every "
                "count model would read them as counts")
        msg += (". Put the raw counts in X (e.g. adata.X = adata.layers['counts'] "
                f"or adata.raw.X), or leave out {option('x_kind')} to have the kind detected.")
        if per_cell:
            msg += " If they are estimated counts of cells this alike in depth, round them first (adata.X = np.rint(adata.X))."
        if what == "not whole numbers":
            msg += (f" Estimated counts with fractions (alevin, SoupX) are taken as counts once a value exceeds "
                    f"{LOG_VALUE_MAX:g}; if these are such counts and stay below it, round them first (adata.X = np.rint(adata.X)).")
    else:
        msg += ("Values that are negative this often are scaled (z-scores): scGPT, tGPT and the llm rank genes by "
                "expression and refuse scaled values, but would rank these deviations from the mean. Leave out "
                f"{option('x_kind')} to have the kind detected, or give {option('x_kind', 'scaled')}.")
    raise InputDataError(msg)


def _again_with(setting: str) -> str:
    """Advice to rewrite a stored dataset with ``setting``: where the front end can (``update``), how."""
    if offers("update"):
        return f"ingest again with {setting} {option('update')}"
    return f"the stored dataset needs {setting} and an update, which this front end cannot do (the store's owner can)"


def mixed_gene_ids_message(gene_ids: np.ndarray, kind: GeneIdKind, name: str) -> str | None:
    """The warning for gene ids of which many are of another kind than ``kind`` (else None)."""
    other = ids_not_of_kind(gene_ids, kind)
    if len(other) <= MIXED_GENE_ID_FRACTION * len(gene_ids):
        return None
    examples = ", ".join(repr(i) for i in other[:3])
    return (f"dataset {name!r}: {len(other)} of its {len(gene_ids)} gene ids ({len(other) / len(gene_ids):.0%}, e.g. "
            f"{examples}) are not {kind} ids like the others, yet all are read as {kind} ids: no model finds those "
            f"genes, and their expression is left out of every embedding. Give every gene one kind of id (e.g. a var "
            f"column of symbols with {option('gene_key', 'COLUMN')}) and ingest again.")


_EXCEL_DATE = re.compile(r"^(\d{1,2}-(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)|"
                         r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)-\d{1,2})$", re.IGNORECASE)


def excel_dates_message(gene_ids: np.ndarray, kind: GeneIdKind, name: str) -> str | None:
    """The warning for symbols that a spreadsheet turned into dates (``1-Mar``, ``2-Sep``), else None.

    Excel reads MARCH1, SEPT2 or DEC1 as dates and writes them back as ``1-Mar``, ``2-Sep``, ``1-Dec``;
    such an id matches no gene, so no model reads those genes (SEPTIN2, SEPTIN7 and SEPTIN9 among them).
    """
    if kind != "symbol":
        return None
    dates = [str(g) for g in gene_ids if _EXCEL_DATE.match(str(g))]
    if dates:  # a few aliases look like dates (APR-1, Oct-2) and do name a gene
        dates = [g for g, entrez in zip(dates, map_genes(dates, src="symbol", dst="entrez")) if entrez is None]
    if not dates:
        return None
    n = len(dates)
    return (f"dataset {name!r}: {n} of its {len(gene_ids)} gene ids {'is a date' if n == 1 else 'are dates'} (e.g. "
            f"{', '.join(map(repr, dates[:3]))}), as a spreadsheet program writes the symbols MARCH1, SEPT2 or DEC1 "
            "(now MARCHF1, SEPTIN2, DELEC1) after reading them as dates: no model finds those genes, and their expression "
            "is left out of every embedding. Restore the symbols from the source of the matrix (e.g. its genes.tsv) and "
            "ingest again.")


MOUSE_STYLE_FRACTION = 0.5
"""More than this share of a symbol dataset's genes written like mouse symbols (``Actb``) is warned about."""

_MOUSE_STYLE = re.compile(r"^[A-Z][a-z][a-z0-9]*(-[a-z0-9]+)?$|^[A-Z][0-9]+[a-z][a-z0-9]*$")


def mouse_symbols_message(gene_ids: np.ndarray, kind: GeneIdKind, name: str) -> str | None:
    """The warning for symbols written like mouse genes (``Actb``, ``Gapdh``), else None.

    Human symbols are upper case; the gene table and every model are human, and symbols are matched
    case-insensitively, so a mouse matrix is read as the human genes of the same names.
    """
    if kind != "symbol" or len(gene_ids) == 0:
        return None
    mouse = [str(g) for g in gene_ids if _MOUSE_STYLE.match(str(g))]
    if len(mouse) <= MOUSE_STYLE_FRACTION * len(gene_ids):
        return None
    examples = ", ".join(repr(g) for g in mouse[:3])
    return (f"dataset {name!r}: {len(mouse)} of its {len(gene_ids)} gene symbols ({len(mouse) / len(gene_ids):.0%}, e.g. "
            f"{examples}) are written like mouse symbols. scdm's gene table and every model are human and symbols are "
            "matched case-insensitively, so these are read as the human genes of the same names: an approximate "
            "ortholog mapping, wrong wherever the names differ. For mouse data, map the genes to human orthologs "
            "first; for human data with odd casing, nothing is wrong.")


def resolve_x_kind(given: str | None, detected: str) -> str:
    """The value kind given (checked), else the detected one."""
    kind = given or detected
    if kind not in X_KINDS:
        msg = f"Unknown value kind {kind!r}; use one of {', '.join(X_KINDS)}."
        raise InputDataError(msg)
    return kind


def refuse_lower_case_ensembl(gene_ids: np.ndarray) -> None:
    """Refuse Ensembl ids written in lower case (``ensg00000141510``).

    Read as they are they are no Ensembl ids: the kind is detected as symbols (or, given as
    ``ensembl``, they match no Ensembl id of the table or of a model), so no gene maps and no model
    finds any, without a word at ingest.
    """
    ids = [str(g) for g in gene_ids]
    if detect_gene_id_kind(ids) == "ensembl" or detect_gene_id_kind([g.upper() for g in ids]) != "ensembl":
        return
    lower = [g for g in ids if g != g.upper() and not ids_not_of_kind([g.upper()], "ensembl")]
    msg = (f"{len(lower)} of the {len(ids)} gene ids are Ensembl ids written in lower case (e.g. "
           f"{', '.join(map(repr, lower[:3]))}): scdm's gene table and every model spell them in capitals, so none "
           "would map to a gene. Upper-case them (adata.var_names = adata.var_names.str.upper(), or the same on the "
           f"{option('gene_key')} column) and ingest again.")
    raise InputDataError(msg)


def resolve_gene_id_kind(gene_ids: np.ndarray, given: str | None) -> GeneIdKind:
    if given is None:
        return detect_gene_id_kind(list(gene_ids))
    if given not in GENE_ID_KINDS:
        msg = f"Unknown gene id kind {given!r}; use one of {', '.join(GENE_ID_KINDS)}."
        raise InputDataError(msg)
    return as_gene_id_kind(given)


def gene_table_frame(gene_ids: np.ndarray, kind: GeneIdKind) -> pd.DataFrame:
    """The ``genes`` rows of a dataset: id as given, plus symbol and Ensembl id from the shipped table.

    A GENCODE ``_PAR_Y`` copy of a gene that is also a column gets neither (see :func:`par_y_copies`):
    mapped, it would be a second column of one gene for every reader of the genes table.
    """
    symbol = map_genes(gene_ids, src=kind, dst="symbol")
    ensembl = map_genes(gene_ids, src=kind, dst="ensembl")
    copies = list(par_y_copies(gene_ids))
    symbol[copies] = None
    ensembl[copies] = None
    return pd.DataFrame({
        "idx": np.arange(len(gene_ids), dtype=np.int32),
        "gene_id": gene_ids.astype(str),
        "symbol": symbol,
        "ensembl": ensembl,
    })


PAR_Y_SUFFIX = "_PAR_Y"
"""GENCODE names the chrY copy of a pseudoautosomal gene ``<its Ensembl id>_PAR_Y`` (e.g.
``ENSG00000182378.14_PAR_Y`` beside ``ENSG00000182378.14``, both PLCXD1)."""


def par_y_copies(gene_ids: np.ndarray) -> dict[int, int]:
    """Columns that are a GENCODE ``_PAR_Y`` copy of a gene also in ``gene_ids``: copy column -> gene column.

    Both read as one gene (the suffix is dropped with the version), so a model would see it twice.
    A ``_PAR_Y`` id whose gene is not a column is simply that gene.
    """
    column = {str(g): i for i, g in enumerate(gene_ids)}
    out: dict[int, int] = {}
    for i, g in enumerate(map(str, gene_ids)):
        if g.upper().endswith(PAR_Y_SUFFIX) and (gene := column.get(g[: -len(PAR_Y_SUFFIX)])) is not None:
            out[i] = gene
    return out


def check_par_y_copies(adata: ad.AnnData, gene_ids: np.ndarray, name: str) -> str | None:
    """Refuse ``_PAR_Y`` copies that hold values or come before their gene; the warning for the others (else None).

    In GENCODE-based count matrices the copy is all zeros (reads of the pseudoautosomal region are
    counted on chrX): such a copy changes no embedding, since every model skips zero values or sums
    them in, provided the gene's own column comes first (scBERT, scFoundation and CellPLM read the first
    column of a gene only). A copy holding values would be read twice (two tokens in scGPT and UCE,
    summed in Geneformer) or not at all (the models that read the first column), so it is refused.
    """
    copies = par_y_copies(gene_ids)
    if not copies:
        return None
    columns = np.fromiter(copies, dtype=np.int64)
    nnz = np.zeros(columns.size, dtype=np.int64)
    for _, block in iter_row_blocks(adata):
        block.eliminate_zeros()
        nnz += np.asarray((block[:, columns] != 0).sum(axis=0)).ravel()
    holding = [str(gene_ids[c]) for c, n in zip(columns, nnz) if n]
    before = [str(gene_ids[c]) for c in columns if c < copies[int(c)]]
    n = columns.size
    if holding or before:
        what = (f"{len(holding)} of them hold values (e.g. {holding[0]!r})" if holding
                else f"{len(before)} of them come before their gene's column (e.g. {before[0]!r})")
        msg = (f"{n} gene ids are GENCODE {PAR_Y_SUFFIX} copies of genes also in the matrix (e.g. "
               f"{str(gene_ids[columns[0]])!r} beside {str(gene_ids[copies[int(columns[0])]])!r}), which read as the same "
               f"gene, and {what}: models would read that gene twice (scGPT, UCE, Geneformer) or only from the first "
               f"column (scBERT, scFoundation, CellPLM). Add each copy into its gene's column and drop the copies, e.g. "
               f"keep = ~adata.var_names.str.endswith('{PAR_Y_SUFFIX}'); adata = adata[:, keep].copy() after summing, "
               "and ingest again.")
        raise InputDataError(msg)
    return (f"dataset {name!r}: {n} gene ids are GENCODE {PAR_Y_SUFFIX} copies of genes also in the matrix (e.g. "
            f"{str(gene_ids[columns[0]])!r}) and hold only zeros, as in GENCODE-based count matrices; they are stored "
            "without a symbol or Ensembl id (no reader of the genes table sees the gene twice) and change no embedding.")


def shared_ensembl_message(genes: pd.DataFrame, name: str) -> str | None:
    """The warning for gene columns that map to an Ensembl id another column maps to as well (else None).

    Symbols that differ in case only (PC9: ``C2ORF15`` and ``C2orf15``) or genes the table gives one
    Ensembl id (``MCL1`` and ``ADAMTSL4-AS1``: ENSG00000143384) are one gene to the models keyed by
    Ensembl ids: Geneformer sums their counts (its reference's collapse path) and CellPLM reads the
    first column only, while the dataset holds them as different columns.
    """
    mapped = genes[genes["ensembl"].notna()]
    shared = mapped[mapped["ensembl"].duplicated(keep=False)]
    if shared.empty:
        return None
    examples = "; ".join(f"{' and '.join(map(repr, group['gene_id'].astype(str)))} -> {ensembl}"
                         for ensembl, group in list(shared.groupby("ensembl", sort=False))[:3])
    n_ids = shared["ensembl"].nunique()
    return (f"dataset {name!r}: {len(shared)} gene columns map to {n_ids} Ensembl id{'s' * (n_ids > 1)} that another "
            f"column maps to as well (e.g. {examples}): models keyed by Ensembl ids read each as one gene (Geneformer "
            "sums the columns, CellPLM reads the first one only). Sum or drop the duplicated columns and ingest again "
            "to choose yourself.")


def normalise_response(values: pd.Series, *, positive: str | None = None, unknown_values: Sequence[str] = ()) -> pd.Series:
    """Map labels to 1 = sensitive, 0 = resistant, <NA> = unknown.

    Accepts 0/1, booleans and sensitive/resistant-like strings (responder/non-responder, ...).
    With ``positive``, that value is sensitive and every other known value resistant.

    Raises
    ------
    InputDataError
        On values that are neither recognised nor declared (lists them and the options).
    """
    unknown = _UNKNOWN | {str(u).strip().lower() for u in unknown_values}
    text = values.astype("object").map(lambda v: None if _is_missing(v) else _label_text(v))
    _refuse_continuous(text[text.notna() & ~text.isin(unknown)], values.name)
    out = pd.Series(pd.array([pd.NA] * len(values), dtype="Int8"), index=values.index)
    if positive is not None:
        pos = _label_text(positive)
        known = text.notna() & ~text.isin(unknown)
        if not (text == pos).any():
            seen = ", ".join(sorted(map(str, text.dropna().unique()))[:10])
            msg = f"{option('positive', repr(positive))} does not occur in the label column (values: {seen})."
            raise InputDataError(msg)
        out[known] = (text[known] == pos).astype("int8")
        _warn_several_read_as_resistant(text[known & (text != pos)], positive, values.name)
        return out
    _refuse_flags_of_resistance(text[text.notna() & ~text.isin(unknown)], values.name)
    is_pos = text.isin(_SENSITIVE)
    is_neg = text.isin(_RESISTANT)
    is_unk = text.isna() | text.isin(unknown)
    bad = ~(is_pos | is_neg | is_unk)
    if bad.any():
        seen = ", ".join(sorted(map(str, text[bad].unique()))[:10])
        msg = (
            f"Unrecognised response labels: {seen}. Known: sensitive/resistant, responder/non-responder, "
            f"0/1, true/false. Pass {option('positive', 'VALUE')} to name the sensitive value (others become "
            f"resistant), and {option('unknown_values', 'VALUE')} for labels to store as unknown."
        )
        raise InputDataError(msg)
    out[is_pos & ~is_unk] = 1  # a value declared unknown stays unknown, even one that reads as a label
    out[is_neg & ~is_unk] = 0
    return out


def _warn_several_read_as_resistant(others: pd.Series, positive: str, column: Any) -> None:
    """Warn when ``positive`` made more than one other label value resistant, with each value's cell count.

    One other value is the binary column ``positive`` is for. Several are a graded scale or a column
    with extra states (CR/PR/SD/PD: partial responders; or 'untreated', a typo), whose cells would
    otherwise become resistant without a word.
    """
    counts = others.value_counts()
    if len(counts) < 2:
        return
    shown = ", ".join(f"{value!r} ({n} cells)" for value, n in counts.head(10).items())
    where = "the label column" if column is None else f"column {str(column)!r}"
    warnings.warn(
        f"{option('positive', repr(positive))}: {len(counts)} other values of {where} were read as resistant: {shown}. "
        f"If some of them are sensitive or unknown, say so ({option('unknown_values', 'VALUE')} for unknown), or map "
        "the column to sensitive/resistant first (adata.obs['response'] = adata.obs[COLUMN].map({...})) and ingest "
        "that column.", IngestWarning, stacklevel=2)


_RESISTANCE_COLUMN = re.compile(r"resist|non[-_ ]?respon", re.IGNORECASE)
_FLAGS = {"0", "1", "true", "false"}


def _refuse_flags_of_resistance(known: pd.Series, column: Any) -> None:
    """Refuse 0/1 or true/false in a column named for resistance (``is_resistant``, ``non_responder``).

    Flags are read as 1/true = sensitive; in such a column 1 most likely means resistant, and every
    label would be inverted (an AUROC of 0.8 reported as 0.2). ``positive`` says which it is.
    """
    if column is None or not _RESISTANCE_COLUMN.search(str(column)) or known.empty or not known.isin(_FLAGS).all():
        return
    values = "true/false" if known.isin({"true", "false"}).all() else "0/1"
    one = "true" if values == "true/false" else "1"
    msg = (f"Column {str(column)!r} ({option('label_key')}) is named for resistance but holds {values}, which scdm reads "
           f"as {one} = sensitive. Say which value means sensitive: {option('positive', 'false' if one == 'true' else '0')} "
           f"if {one} means resistant, {option('positive', one)} if it means sensitive.")
    raise InputDataError(msg)


def _refuse_continuous(known: pd.Series, column: Any) -> None:
    """Refuse numbers with fractions (IC50, AUC, a score): they are a measurement, not a response label.

    Read as labels they would fail with a list of values, and ``--positive`` would make one number
    sensitive and every other resistant.
    """
    numbers = pd.to_numeric(known, errors="coerce")
    if known.empty or numbers.isna().any() or (numbers == numbers.round()).all():
        return
    where = "The label column" if column is None else f"Column {str(column)!r} ({option('label_key')})"
    msg = (f"{where} holds measurements, not response labels: {numbers.nunique()} distinct numbers from "
           f"{numbers.min():g} to {numbers.max():g}. Binarise them first and ingest that column, e.g. "
           "adata.obs['response'] = np.where(adata.obs[COLUMN] < CUTOFF, 'sensitive', 'resistant') for an IC50 or "
           f"AUC (lower is sensitive), then {option('label_key', 'response')}.")
    raise InputDataError(msg)


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _label_text(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    return str(v).strip().lower()


def cell_table(adata: ad.AnnData, opts: IngestOptions, *, default_study: str) -> pd.DataFrame:
    """The ``cells`` rows of a dataset (without dataset_id) from obs and the options."""
    obs = adata.obs
    frame = pd.DataFrame({"row": np.arange(adata.n_obs, dtype=np.int32), "cell_id": adata.obs_names.astype(str)})
    for column, (key_opt, const_opt) in METADATA_FIELDS.items():
        key, const = getattr(opts, key_opt), getattr(opts, const_opt)
        if key is not None and const is not None:
            msg = f"Both {option(key_opt)} and {option(const_opt)} were given; pass one (a column or a constant)."
            raise InputDataError(msg)
        if key is not None:
            frame[column] = _obs_column(obs, key, key_opt).astype("object").map(lambda v: None if _is_missing(v) else str(v)).values
            if column == "study":
                _check_every_cell_has_a_study(frame, key)
        else:
            frame[column] = const if const is not None else (default_study if column == "study" else None)
    if opts.label_key is None:
        frame["response"] = pd.array([pd.NA] * adata.n_obs, dtype="Int8")
    else:
        labels = _obs_column(obs, opts.label_key, "label_key")
        frame["response"] = normalise_response(labels, positive=opts.positive, unknown_values=opts.unknown_values).values
        if frame["response"].isna().all():  # a label set without a label: the wrong column, or all declared unknown
            seen = ", ".join(sorted({str(v) for v in labels.astype("object").unique()})[:5])
            msg = (f"Column {opts.label_key!r} ({option('label_key')}) holds no response label: all {len(labels)} values "
                   f"are missing or unknown (values: {seen}). Check {option('label_key')} and "
                   f"{option('unknown_values')}; to ingest the cells without labels, leave {option('label_key')} out.")
            raise InputDataError(msg)
    return frame


def _check_every_cell_has_a_study(frame: pd.DataFrame, key: str) -> None:
    """Refuse a study column with gaps: cross-data holds out whole studies, and cells without one
    would otherwise fall together into a pseudo-study named after the dataset."""
    missing = frame["study"].isna().to_numpy()
    if not missing.any():
        return
    shown = ", ".join(frame["cell_id"].to_numpy()[missing][:3]) + (", ..." if missing.sum() > 3 else "")
    msg = (f"Column {key!r} ({option('study_key')}) has no value for {int(missing.sum())} of {len(frame)} cells ({shown}). "
           "Cross-data evaluation holds out whole studies, so every cell needs one: fill the gaps "
           f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(object).fillna('<study>')) or give one study "
           f"for every cell with {option('study')}.")
    raise InputDataError(msg)


def _obs_column(obs: pd.DataFrame, key: str, name: str) -> pd.Series:
    if key not in obs.columns:
        cols = ", ".join(map(str, obs.columns)) or "(none)"
        msg = f"Column {key!r} ({option(name)}) is not in obs. Available obs columns: {cols}."
        raise InputDataError(msg)
    return obs[key]


def restated_labels(obs: pd.DataFrame, response: pd.Series, columns: Sequence[str]) -> dict[str, str]:
    """Of ``columns`` (each splitting the labels perfectly), those where a class is one value: column -> which values.

    Such a column restates the labels (A375's ``condition``: parental = every sensitive cell, BRAFi_resistant =
    every resistant cell) rather than naming samples: folds grouped by it hold out a whole class, so every
    training fold holds one class and every fold is skipped.
    """
    y = pd.array(response, dtype="Int8")
    known = np.asarray(~pd.isna(y), dtype=bool)
    labels = np.asarray(y[known], dtype=np.int8)
    out = {}
    for col in columns:
        frame = pd.DataFrame({"v": obs[col].to_numpy()[known], "y": labels}).dropna()
        per_class = frame.groupby("y")["v"].unique()
        if any(len(values) == 1 for values in per_class):
            out[str(col)] = "; ".join(f"{', '.join(map(repr, map(str, values)))}: every {'sensitive' if cls == 1 else 'resistant'} "
                                      "cell" for cls, values in sorted(per_class.items(), reverse=True))
    return out


def label_confounders(obs: pd.DataFrame, response: pd.Series, *, skip: Sequence[str] = ()) -> list[str]:
    """obs columns whose values split the labels perfectly (every value one class, both classes present).

    Such a column (condition, batch, sample under another name) is a likely sample id: without
    grouped folds a head can score by recognising it.
    """
    y = pd.array(response, dtype="Int8")
    known = ~pd.isna(y)
    if known.sum() < 4 or pd.Series(y[known]).nunique() < 2:
        return []
    out = []
    for col in obs.columns:
        if col in skip:
            continue
        values = obs[col].to_numpy()[np.asarray(known, dtype=bool)]
        n_values = pd.Series(values).nunique(dropna=True)
        if not 2 <= n_values <= max(2, int(known.sum()) // 2):
            continue
        frame = pd.DataFrame({"v": values, "y": np.asarray(y[known], dtype=np.int8)}).dropna()
        if (frame.groupby("v", observed=True)["y"].nunique() == 1).all():
            out.append(str(col))
    return out
