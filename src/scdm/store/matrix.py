"""Reading an expression matrix in row blocks, so memory stays bounded for large backed ``.h5ad`` files.

Ingest scans a matrix this way; the embedding stage reads the cells it tokenises this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["SCAN_BLOCK_ROWS", "iter_row_blocks", "to_csr"]

SCAN_BLOCK_ROWS = 4096
"""Rows read at a time by default."""


def iter_row_blocks(adata: ad.AnnData, block_rows: int = SCAN_BLOCK_ROWS, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
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
    for lo in range(start, stop, block_rows):
        hi = min(lo + block_rows, stop)
        block = adata.X[lo:hi]
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
    out = sp.csr_matrix(block)  # shares the block's arrays when it is already CSR
    if not out.has_canonical_format:
        out = out.copy()  # sum_duplicates works in place: never on the caller's (or AnnData's) arrays
        out.sum_duplicates()  # in the block's own dtype, as toarray() sums, before the float32 cast
    return out.astype(np.float32)  # always a copy (astype copies even when the dtype is float32)
