"""Reading an expression matrix in row blocks, so memory stays bounded for large backed ``.h5ad`` files.

Ingest scans a matrix this way; the embedding stage reads the cells it tokenises this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from scdm.store.errors import InputDataError

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["LOG_VALUE_MAX", "SCAN_BLOCK_ROWS", "iter_row_blocks", "to_csr"]

SCAN_BLOCK_ROWS = 4096
"""Rows read at a time by default."""

LOG_VALUE_MAX = 50.0
"""A log-transformed expression value above this is not met in practice (log1p of 1e4-normalised counts
stays below 10): non-integer values above it are on the count scale, not logged. Ingest warns of them
(or takes them as counts when told so); transfer takes their log1p."""


def iter_row_blocks(
    adata: ad.AnnData, block_rows: int = SCAN_BLOCK_ROWS, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, csr block)`` over rows ``start:stop`` of ``adata.X``.

    Parameters
    ----------
    adata : anndata.AnnData
        In memory or backed.
    block_rows : int, default 4096
        Rows per block (the last block may be shorter).
    start, stop : int, optional
        The row range (default: every row).
    """
    stop = adata.n_obs if stop is None else stop
    if sp.issparse(adata.X):  # in memory: scipy slices rows by the index pointer, so check it first
        _check_sparse_structure(adata.X)
    for lo in range(start, stop, block_rows):
        hi = min(lo + block_rows, stop)
        try:
            block = adata.X[lo:hi]
        except (ValueError, IndexError, RuntimeError) as err:  # anndata/scipy on a damaged sparse matrix
            raise InputDataError(_damaged_message(f"rows {lo}-{hi - 1} could not be read ({err})")) from err
        yield lo, to_csr(block)


def to_csr(block: Any) -> sp.csr_matrix:
    """A CSR float32 copy of a dense or sparse block in canonical form; the block itself is never changed.

    Canonical: indices sorted and entries stored twice at one position (which scipy allows in a
    CSR/COO matrix and ``toarray()`` adds up) summed, so equal numbers give equal blocks whether
    they come dense, sparse, or sparse with duplicates: the content hash, the value kind and every
    model see the same matrix.
    """
    if not sp.issparse(block):
        return sp.csr_matrix(np.asarray(block, dtype=np.float32))
    _check_sparse_structure(block)
    out = sp.csr_matrix(block)  # shares the block's arrays when it is already CSR
    if not out.has_canonical_format:
        out = out.copy()  # sum_duplicates works in place: never on the caller's (or AnnData's) arrays
        out.sum_duplicates()  # in the block's own dtype, as toarray() sums, before the float32 cast
    return out.astype(np.float32)  # always a copy (astype copies even when the dtype is float32)


def _check_sparse_structure(block: Any) -> None:
    """Refuse a sparse block whose index arrays are inconsistent (a damaged or hand-built file).

    scipy trusts them: an index outside the matrix or a decreasing row pointer reads memory that is
    not the matrix (garbage values, or a crash in sorting, PCA or a tokenizer). The check reads the
    arrays only; the block is never changed.
    """
    if block.format not in ("csr", "csc"):
        return  # coo and the others are converted by scipy, which checks their coordinates
    n_major, n_minor = block.shape if block.format == "csr" else block.shape[::-1]
    indptr, indices = np.asarray(block.indptr), np.asarray(block.indices)
    if len(indptr) != n_major + 1 or (len(indptr) and indptr[0] != 0):
        problem = f"its index pointer has {len(indptr)} entries starting at {indptr[0] if len(indptr) else None}, not {n_major + 1} from 0"
    elif np.any(np.diff(indptr) < 0):
        problem = f"its index pointer decreases (at {'row' if block.format == 'csr' else 'column'} {int(np.argmax(np.diff(indptr) < 0))})"
    elif indptr[-1] > min(len(indices), len(block.data)):
        problem = f"its index pointer ends at {int(indptr[-1])}, past its {min(len(indices), len(block.data))} stored values"
    else:
        used = indices[: int(indptr[-1])]
        outside = (used < 0) | (used >= n_minor)
        if not outside.any():
            return
        what = "gene" if block.format == "csr" else "cell"
        problem = (
            f"{int(outside.sum())} stored value(s) have a {what} index outside 0-{n_minor - 1} (e.g. {int(used[outside][0])})"
        )
    raise InputDataError(_damaged_message(problem))


def _damaged_message(problem: str) -> str:
    return (
        f"The sparse expression matrix is damaged: {problem}. The file is likely truncated or corrupt (an "
        "interrupted copy or download), or X was built by hand with wrong indices. Copy or write the file again "
        "from its source (anndata.read_h5ad(src).write_h5ad(dst)), then run the command again."
    )
