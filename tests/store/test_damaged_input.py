"""Damaged or malformed input files: a clear InputDataError before anything is stored."""

from __future__ import annotations

import h5py
import pytest
import scipy.sparse as sp

from scdm.store import InputDataError
from scdm.store._ingest import IngestWarning
from tests.store.conftest import make_counts_adata


def _break_indices(f: h5py.File) -> None:
    indices = f["X/indices"][()]
    indices[7] = -1414812914  # what a run of 0xAB bytes reads as
    f["X/indices"][...] = indices


def _index_past_the_genes(f: h5py.File) -> None:
    indices = f["X/indices"][()]
    indices[7] = 5000
    f["X/indices"][...] = indices


def _decreasing_indptr(f: h5py.File) -> None:
    indptr = f["X/indptr"][()]
    indptr[5] = indptr[7] + 3
    f["X/indptr"][...] = indptr


def _indptr_past_the_values(f: h5py.File) -> None:
    indptr = f["X/indptr"][()]
    indptr[-1] += 100
    f["X/indptr"][...] = indptr


@pytest.mark.parametrize("damage", [_break_indices, _index_past_the_genes, _decreasing_indptr, _indptr_past_the_values])
def test_a_damaged_sparse_h5ad_is_refused_and_nothing_is_stored(st, tmp_path, damage):
    # before: gene indices outside the matrix were hashed and stored, and `scdm embed --model pca`
    # then died with a segmentation fault; a decreasing index pointer raised a raw RuntimeError
    path = tmp_path / "damaged.h5ad"
    make_counts_adata().write_h5ad(path)
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(InputDataError, match="sparse expression matrix is damaged.*write the file again"):
        st.ingest(path, label_key="label")
    assert st.datasets().empty and st.cells().empty
    assert not any((st.root / "datasets").iterdir())


def test_an_in_memory_matrix_with_indices_outside_it_is_refused(st):
    adata = make_counts_adata()
    x = adata.X
    indices = x.indices.copy()
    indices[3] = adata.n_vars + 2
    adata.X = sp.csr_matrix((x.data, indices, x.indptr), shape=x.shape)
    with pytest.raises(InputDataError, match=r"1 stored value\(s\) have a gene index outside 0-39 \(e.g. 42\)"):
        st.ingest(adata, label_key="label")
    assert st.datasets().empty


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_well_formed_sparse_matrices_pass_the_structure_check(st, fmt):
    adata = make_counts_adata()
    reference = st.ingest(adata.copy(), name="ref", label_key="label")
    unsorted = sp.csr_matrix(adata.X) if fmt == "csr" else sp.csc_matrix(adata.X)
    for i in range(unsorted.shape[0 if fmt == "csr" else 1]):  # reverse each row's entries: unsorted indices
        lo, hi = unsorted.indptr[i], unsorted.indptr[i + 1]
        unsorted.indices[lo:hi] = unsorted.indices[lo:hi][::-1].copy()
        unsorted.data[lo:hi] = unsorted.data[lo:hi][::-1].copy()
    unsorted.has_sorted_indices = False
    adata.X = unsorted
    with pytest.warns(IngestWarning, match="already in the store as 'ref'"):
        again = st.ingest(adata, name="again", label_key="label")
    assert again.content_hash == reference.content_hash
