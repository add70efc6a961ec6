from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.store import DatasetNotFoundError, InputDataError, Store
from tests.store.conftest import make_counts_adata


def test_ingest_real_a375_records_cells_and_labels(st, a375_path):
    ds = st.ingest(a375_path, label_key="response_PLX4720", study="GSE108383", tissue="skin")
    assert ds.created and ds.n_cells == 108 and ds.n_genes == 2873
    assert ds.gene_id_kind == "entrez" and ds.x_kind == "scaled"
    cells = st.cells(ds.name)
    assert cells["response"].sum() == 62 and (cells["response"] == 0).sum() == 46
    assert set(cells["study"]) == {"GSE108383"} and set(cells["tissue"]) == {"skin"}
    genes = st.genes(ds.name)
    assert genes.loc[genes.gene_id == "2", "symbol"].item() == "A2M"


def test_reingest_identical_content_is_a_noop(st, a375_path):
    first = st.ingest(a375_path, label_key="response_PLX4720")
    again = st.ingest(a375_path, label_key="response_PLX4720", name="other-name")
    assert not again.created and again.dataset_id == first.dataset_id
    assert len(st.datasets()) == 1 and len(st.cells()) == 108


def test_same_numbers_dense_or_sparse_hash_alike_and_changed_data_is_new(st):
    sparse = make_counts_adata(sparse=True)
    dense = make_counts_adata(sparse=False)
    a = st.ingest(sparse, name="a", label_key="label")
    b = st.ingest(dense, name="b", label_key="label")
    assert a.content_hash == b.content_hash and not b.created
    changed = make_counts_adata(sparse=True)
    changed.X[0, 0] += 1
    c = st.ingest(changed, name="c", label_key="label")
    assert c.created and c.content_hash != a.content_hash and c.x_kind == "counts"


def test_name_clash_with_different_content_is_refused(st):
    st.ingest(make_counts_adata(seed=1), name="x")
    with pytest.raises(InputDataError, match="already in the store.*--name"):
        st.ingest(make_counts_adata(seed=2), name="x")


@pytest.mark.parametrize(
    ("values", "kwargs", "expected"),
    [
        (["sensitive", "resistant", None], {}, [1, 0, None]),
        ([True, False, True], {}, [1, 0, 1]),
        ([1, 0, 1], {}, [1, 0, 1]),
        (["Responder", "non-responder", "NA"], {}, [1, 0, None]),
        (["CR", "PD", "PD"], {"positive": "CR"}, [1, 0, 0]),
        (["resistant", "not_in_set", "resistant"], {"unknown_values": ("not_in_set",)}, [0, None, 0]),
    ],
)
def test_response_normalisation(st, values, kwargs, expected):
    adata = make_counts_adata(n_cells=3)
    adata.obs["label"] = pd.Series(values, index=adata.obs_names)
    ds = st.ingest(adata, name="d", label_key="label", **kwargs)
    got = st.cells(ds.name)["response"].tolist()
    assert [None if pd.isna(v) else int(v) for v in got] == expected


def test_unknown_label_values_are_listed(st):
    adata = make_counts_adata(n_cells=4)
    adata.obs["label"] = ["CR", "PD", "SD", "CR"]
    with pytest.raises(InputDataError, match=r"Unrecognised response labels: cr, pd, sd.*--positive"):
        st.ingest(adata, label_key="label")


def test_missing_label_column_lists_available_columns(st):
    with pytest.raises(InputDataError, match=r"'resp' .* not in obs\. Available obs columns: label, study, patient"):
        st.ingest(make_counts_adata(), label_key="resp")


def test_column_mapping_and_constant_clash(st):
    adata = make_counts_adata()
    ds = st.ingest(adata, name="m", label_key="label", study_key="study", sample_key="patient", regimen="mono")
    cells = st.cells(ds.name)
    assert set(cells["study"]) == {"S1", "S2"} and cells["sample"].nunique() == 6
    with pytest.raises(InputDataError, match="Both --study-key and --study"):
        st.ingest(make_counts_adata(seed=5), name="n", study_key="study", study="X")


def test_bad_inputs_are_refused_and_nothing_is_written(st, tmp_path):
    empty = ad.AnnData(X=np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(InputDataError, match="empty"):
        st.ingest(empty)
    dup = make_counts_adata()
    dup.obs_names = ["same"] * dup.n_obs
    with pytest.raises(InputDataError, match="duplicated cell ids.*obs_names_make_unique"):
        st.ingest(dup)
    nan = make_counts_adata(sparse=False)
    nan.X[3, 2] = np.nan
    with pytest.raises(InputDataError, match="NaN or inf.*cell3"):
        st.ingest(nan)
    text = tmp_path / "data.h5ad"
    text.write_text("cell,gene\n")
    with pytest.raises(InputDataError, match="not an .h5ad"):
        st.ingest(text)
    with pytest.raises(InputDataError, match="No such file"):
        st.ingest(tmp_path / "missing.h5ad")
    assert st.datasets().empty and st.cells().empty
    assert not any((st.root / "datasets").iterdir())


def test_gene_key_and_detected_kinds(st, a375_path):
    ds = st.ingest(a375_path, gene_key="symbol")
    assert ds.gene_id_kind == "symbol"
    with pytest.raises(InputDataError, match="Available var columns: entrez, symbol"):
        st.ingest(a375_path, gene_key="gene_name", name="x")


def test_dataset_lookup_errors_list_names(st, a375_path):
    st.ingest(a375_path)
    with pytest.raises(DatasetNotFoundError, match="A375_melanoma_GSE108383"):
        st.dataset("nope")


def test_remove_dataset_removes_cells_and_copy(st, a375_path):
    ds = st.ingest(a375_path)
    st.remove_dataset(ds.name)
    assert st.datasets().empty and st.cells().empty
    assert not (st.root / ds.stored_path).exists()


def test_unwritable_store_path_gets_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="Cannot write to the store directory"):
        Store(blocker / "store")
