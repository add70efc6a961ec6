"""Damaged or malformed input files: a clear InputDataError before anything is stored."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
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


def test_an_h5ad_without_x_gets_a_message_not_a_key_error(st, tmp_path):
    # before: "KeyError: Unable to synchronously open object (object 'X' doesn't exist)"
    adata = make_counts_adata()
    path = tmp_path / "no_x.h5ad"
    ad.AnnData(obs=adata.obs, var=adata.var).write_h5ad(path)
    with pytest.raises(InputDataError, match=r"has no expression matrix \(no X\).*adata.X ="):
        st.ingest(path, label_key="label")
    assert st.datasets().empty


@pytest.mark.parametrize("positive", [None, "0.5"])
def test_continuous_labels_are_refused_as_measurements(st, positive):
    # before: listed ten of the numbers and advised --positive, which made one value sensitive and
    # every other resistant
    adata = make_counts_adata()
    adata.obs["ic50"] = np.linspace(0.5, 3.0, adata.n_obs)
    with pytest.raises(
        InputDataError,
        match=r"Column 'ic50' \(--label-key\) holds measurements.*60 distinct numbers "
        r"from 0.5 to 3.*Binarise them",
    ):
        st.ingest(adata, label_key="ic50", positive=positive)
    assert st.datasets().empty


@pytest.mark.parametrize(("one", "zero", "missing"), [(1.0, 0.0, np.nan), (1, 0, None), ("1", "0", "NA")])
def test_zero_one_labels_as_numbers_are_still_labels(st, one, zero, missing):
    adata = make_counts_adata()
    y = np.where(adata.obs["label"] == "sensitive", one, zero).astype(object)
    y[0] = missing
    adata.obs["y"] = y
    st.ingest(adata, label_key="y")
    response = st.cells()["response"]
    expected = (adata.obs["label"] == "sensitive").astype(int).to_numpy()[1:]
    assert pd.isna(response.iloc[0]) and response.iloc[1:].astype(int).tolist() == expected.tolist()


def test_cells_without_any_expression_are_warned_about_and_kept(st):
    # before: ingested silently; pca/hvg gave them one shared vector and evaluation scored them
    from scdm.store._ingest import IngestWarning

    adata = make_counts_adata()
    x = adata.X.toarray()
    x[[4, 9]] = 0
    adata.X = sp.csr_matrix(x)
    with pytest.warns(IngestWarning, match=r"2 of its 60 cells have no expression at all .*'cell4', 'cell9'\).*filter_cells"):
        info = st.ingest(adata, label_key="label")
    assert info.n_cells == 60


def test_no_empty_cell_warning_when_every_cell_has_a_count(st, recwarn):
    st.ingest(make_counts_adata(), label_key="label")
    assert not [w for w in recwarn if "no expression at all" in str(w.message)]


@pytest.mark.parametrize("axis", ["gene", "cell"])
def test_an_empty_id_is_refused_and_a_duplicate_is_quoted(st, axis):
    # an empty gene id was stored (and joined to nothing); two gave "duplicated gene ids (e.g. )"
    adata = make_counts_adata(n_cells=6, n_genes=5)
    names = (adata.var_names if axis == "gene" else adata.obs_names).tolist()
    names[2] = " "
    setattr(adata, "var_names" if axis == "gene" else "obs_names", names)
    with pytest.raises(InputDataError, match=rf"1 {axis} id is empty \(at position 2\)"):
        st.ingest(adata, name="blank")
    names[2], names[3] = "X 1", "X 1"
    setattr(adata, "var_names" if axis == "gene" else "obs_names", names)
    with pytest.raises(InputDataError, match=rf"duplicated {axis} ids \(e\.g\. 'X 1'\)"):
        st.ingest(adata, name="dup")
    assert st.datasets().empty
