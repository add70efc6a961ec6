"""A dataset's file that changed after ingest is refused, never read as the ingested cells."""

from __future__ import annotations

import shutil

import anndata as ad
import pytest

from scdm.embedding.runner import embed
from scdm.store import DatasetFileChangedError, Store


def _no_copy_store(tmp_path, a375_path) -> tuple[Store, object]:
    source = tmp_path / "a375.h5ad"
    shutil.copy(a375_path, source)
    st = Store(tmp_path / "store")
    st.ingest(source, name="A375", copy=False, label_key="response_PLX4720")
    return st, source


def test_a_reordered_no_copy_source_is_refused_before_it_is_embedded(tmp_path, a375_path):
    st, source = _no_copy_store(tmp_path, a375_path)
    adata = ad.read_h5ad(source)
    adata[::-1].copy().write_h5ad(source)  # same cells, other order: rows would take other cells' labels
    with pytest.raises(DatasetFileChangedError, match=r"changed since it was ingested: 108 cell ids differ.*position 0.*scdm rm --dataset A375"):
        embed(st, "A375", "pca", n_comps=5, progress=False)
    assert st.query("SELECT count(*) AS n FROM embeddings")["n"].iloc[0] == 0


def test_a_cut_or_replaced_file_is_refused_with_its_shape(tmp_path, a375_path):
    st, source = _no_copy_store(tmp_path, a375_path)
    ad.read_h5ad(source)[:100].copy().write_h5ad(source)
    with pytest.raises(DatasetFileChangedError, match="holds 100 cells x 2873 genes, ingested as 108 x 2873"):
        st.open_anndata("A375")
    genes = ad.read_h5ad(a375_path)
    genes.var_names = [f"g{i}" for i in range(genes.n_vars)]
    genes.write_h5ad(source)
    with pytest.raises(DatasetFileChangedError, match="2873 gene ids differ"):
        st.open_anndata("A375", backed=False)


def test_a_file_with_new_obs_columns_but_the_same_cells_still_reads(tmp_path, a375_path):
    st, source = _no_copy_store(tmp_path, a375_path)
    adata = ad.read_h5ad(source)
    adata.obs["note"] = "annotated later"
    adata.write_h5ad(source)
    assert st.open_anndata("A375").n_obs == 108
