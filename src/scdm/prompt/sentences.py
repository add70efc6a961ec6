"""Cell sentences: the top-k expressed genes of a cell, as gene symbols.

A cell is described to the language model by the symbols of its ``k`` most highly expressed genes
(scDrugMap/GPTCelltype: k = 10), highest first. The ranking is computed on the values stored in
the dataset's matrix:

- only genes with a value above zero are listed (a cell with three expressed genes lists three);
  on raw counts that means "never a zero-count gene";
- ties are broken by the symbol (alphabetical), so the sentence does not depend on the file's gene
  order and the same cell always gives the same prompt;
- genes without a symbol are left out (the model knows genes by their names); on a dataset whose
  gene ids are symbols, an id unknown to the shipped gene table is used as it is;
- a symbol carried by several columns is listed once, at its best rank.

On a dataset whose values are scaled (z-scores, ``x_kind = scaled``) "above zero" means "above the
gene's mean over the cells", so the sentence lists the genes most over-expressed relative to the
other cells, not the most abundant transcripts. :func:`value_note` says so in the provenance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from scdm.store.errors import InputDataError
from scdm.store.matrix import iter_row_blocks, to_csr

if TYPE_CHECKING:
    from scdm.store import Store

__all__ = ["DEFAULT_TOP_K", "top_genes", "gene_symbols", "cell_gene_lists", "value_note"]

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
"""Genes per cell (scDrugMap: the 10 most highly expressed)."""


def top_genes(x: sp.csr_matrix | np.ndarray, symbols: Sequence[str | None], k: int = DEFAULT_TOP_K) -> list[list[str]]:
    """The symbols of each row's ``k`` highest positive values (ties: alphabetical by symbol).

    Parameters
    ----------
    x : csr_matrix or ndarray of shape (n_cells, n_genes)
        Expression values.
    symbols : sequence of str or None, length n_genes
        Symbol of each column; None leaves the column out.
    k : int, default 10

    Returns
    -------
    list of list of str
        One list per row, at most ``k`` distinct symbols, highest value first.

    Examples
    --------
    >>> import numpy as np
    >>> top_genes(np.array([[0, 5, 2, 5, 1]]), ["A", "D", "B", "C", None], k=3)
    [['C', 'D', 'B']]
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        msg = f"top_k={k!r} must be an integer >= 1 (genes listed per cell)."
        raise InputDataError(msg)
    csr = to_csr(x)
    if csr.shape[1] != len(symbols):
        msg = f"The matrix has {csr.shape[1]} genes but {len(symbols)} symbols were given."
        raise InputDataError(msg)
    named = np.array([s is not None and s == s and str(s) != "" for s in symbols], dtype=bool)
    text = np.array([str(s) if ok else "" for s, ok in zip(symbols, named)], dtype=object)
    # rank of each column's symbol in alphabetical order: the tie-breaker, and equal for duplicates
    _, alpha = np.unique(text, return_inverse=True)
    out = []
    for i in range(csr.shape[0]):
        lo, hi = csr.indptr[i], csr.indptr[i + 1]
        cols, vals = csr.indices[lo:hi], csr.data[lo:hi]
        keep = (vals > 0) & named[cols]
        cols, vals = cols[keep], vals[keep]
        order = np.lexsort((alpha[cols], -vals.astype(np.float64)))
        listed: list[str] = []
        for c in cols[order]:
            symbol = text[c]
            if symbol not in listed:
                listed.append(symbol)
                if len(listed) == k:
                    break
        out.append(listed)
    return out


def gene_symbols(st: Store, dataset: str) -> list[str | None]:
    """The symbol of each column of a dataset's matrix (None where it has none; see module docstring)."""
    info = st.dataset(dataset)
    genes = st.genes(dataset)
    symbols = genes["symbol"].astype(object).where(genes["symbol"].notna(), None).tolist()
    if info.gene_id_kind == "symbol":
        symbols = [s if s is not None else str(g) for s, g in zip(symbols, genes["gene_id"])]
    n_named = sum(s is not None for s in symbols)
    if n_named == 0:
        msg = (f"No gene of dataset {info.name!r} has a symbol, so no cell sentence can be written. "
               "Ingest it with gene symbols or Ensembl/Entrez ids (var_names or --gene-key).")
        raise InputDataError(msg)
    if n_named < len(symbols):
        logger.info("prompt: %d of %d genes of %s have a symbol; the others are never listed",
                    n_named, len(symbols), info.name)
    return symbols


def cell_gene_lists(st: Store, dataset: str, rows: Sequence[int], k: int = DEFAULT_TOP_K) -> dict[int, list[str]]:
    """Top-k gene symbols of the given rows of a stored dataset (row -> symbols), read in row blocks."""
    wanted = np.unique(np.asarray(rows, dtype=np.int64))
    if wanted.size == 0:
        return {}
    symbols = gene_symbols(st, dataset)
    adata = st.open_anndata(dataset)
    out: dict[int, list[str]] = {}
    try:
        for lo, block in iter_row_blocks(adata, start=int(wanted[0]), stop=int(wanted[-1]) + 1):
            inside = wanted[(wanted >= lo) & (wanted < lo + block.shape[0])]
            if inside.size:
                for row, genes in zip(inside, top_genes(block[inside - lo], symbols, k)):
                    out[int(row)] = genes
    finally:
        file = getattr(adata, "file", None)
        if file is not None and getattr(adata, "isbacked", False):
            file.close()
    return out


def value_note(x_kind: str) -> str:
    """What "most highly expressed" means for a dataset's value kind (recorded with the run)."""
    if x_kind == "scaled":
        return ("values are scaled (e.g. z-scores): the listed genes are the most above their mean over the "
                "cells, not the most abundant transcripts")
    if x_kind == "normalized":
        return "values are normalised expression: the listed genes are the highest normalised values"
    return "values are counts: the listed genes are the highest counts (zero counts never listed)"

