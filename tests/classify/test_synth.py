"""The scDrugMap-shaped synthetic collection: shape, determinism, counts, genes, samples, writer."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify import synth
from scdm.store.errors import InputDataError
from scdm.store.genes import gene_table, map_genes

SCALE = 0.003
N_GENES = 120


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return synth.synthesize(SCALE, n_genes=N_GENES, seed=7)


def test_primary_datasets_reproduce_every_category_exactly() -> None:
    table = synth.primary_datasets()
    assert len(table) == 36 and table["dataset"].tolist() == [f"Data{i}" for i in range(1, 37)]
    assert table["study"].nunique() == 23
    assert table["n_cells"].sum() == synth.FULL_SCALE_CELLS == 326_751
    assert table["n_sensitive"].sum() == 162_957
    for _, cat in synth.category_table().iterrows():
        rows = table if cat["category_type"] == "all" else table[table[cat["category_type"]] == cat["category"]]
        assert (rows["n_sensitive"].sum(), rows["n_resistant"].sum()) == (cat["n_sensitive"], cat["n_resistant"]), cat["category"]
    assert (table["count_source"] == "exact").sum() == 23


def test_full_scale_layout_matches_tables_exactly() -> None:
    config = synth.SynthConfig(scale=1.0, seed=0, n_genes=20, response_strength=1.0, study_shift=0.5, batch_sd=0.5,
                               sample_sd=0.5, library_median=3000.0, n_cell_states=3, dtype="float32")
    obs = synth._layout(config).obs
    assert len(obs) == 326_751
    cmp = synth.compare_to_tables(obs, 1.0)
    assert (cmp["cells"] == cmp["expected_cells"]).all()
    assert (cmp["sensitive"] == cmp["expected_sensitive"]).all()


def test_small_scale_matches_tables_within_rounding(small: ad.AnnData) -> None:
    cmp = synth.compare_to_tables(small.obs, SCALE)
    assert len(cmp) == 47
    # each (dataset, label) part is rounded once (or raised to one cell): at most one cell off
    assert ((cmp["cells"] - cmp["expected_cells"]).abs() <= cmp["n_parts"]).all()
    assert ((cmp["sensitive"] - cmp["expected_sensitive"]).abs() <= cmp["n_parts"] / 2).all()
    total = cmp.iloc[0]
    assert abs(total["cells"] - 326_751 * SCALE) <= 36 and abs(total["fraction"] - 0.4987) < 0.02


def test_label_balance_per_dataset(small: ad.AnnData) -> None:
    table = synth.primary_datasets().set_index("dataset")
    counts = small.obs.groupby(["dataset", "response"], observed=True).size().unstack()
    assert (counts > 0).all().all()  # both classes in every dataset, as in the real data
    for dataset, row in counts.iterrows():
        expected = table.loc[dataset, "n_sensitive"] * SCALE
        assert abs(row["sensitive"] - expected) <= 1


def test_obs_columns_and_categories(small: ad.AnnData) -> None:
    obs = small.obs
    for column in ("study", "dataset", "sample", "tissue", "cancer_type", "drug_type", "regimen", "response", "n_counts"):
        assert column in obs.columns
    assert set(obs["response"].astype(str)) == {"sensitive", "resistant"}
    assert obs.index.is_unique
    table = synth.primary_datasets().set_index("dataset")
    per_dataset = obs.drop_duplicates("dataset").set_index("dataset")
    for column in ("study", "tissue", "cancer_type", "drug_type"):
        assert (per_dataset[column].astype(str) == table.loc[per_dataset.index, column]).all()
    assert obs.loc[obs["dataset"] == "Data19", "regimen"].isna().all()  # no regimen in the source table
    assert obs["study"].nunique() == 23 and obs["dataset"].nunique() == 36


def test_samples_nested_in_studies_with_constant_labels(small: ad.AnnData) -> None:
    obs = small.obs
    per_sample = obs.groupby("sample", observed=True).agg(
        {"dataset": "nunique", "study": "nunique", "response": "nunique"}
    )
    assert (per_sample == 1).all().all()
    assert (obs.groupby("dataset", observed=True)["study"].nunique() == 1).all()
    assert obs["sample"].nunique() > obs["dataset"].nunique()


def test_counts_are_nonnegative_integers_with_realistic_sparsity(small: ad.AnnData) -> None:
    x = small.X
    assert x.format == "csr" and x.dtype == np.float32
    assert (x.data > 0).all() and np.array_equal(x.data, np.round(x.data))
    zeros = 1 - x.nnz / (x.shape[0] * x.shape[1])
    assert 0.80 <= zeros <= 0.96, zeros
    totals = np.asarray(x.sum(axis=1)).ravel()
    n_counts = small.obs["n_counts"].to_numpy()
    assert (n_counts >= totals).all()  # the whole transcriptome holds the panel
    assert 1500 <= np.median(n_counts) <= 6000


def test_int32_counts() -> None:
    adata = synth.synthesize(0.001, n_genes=30, dtype="int32")
    assert adata.X.dtype == np.int32 and adata.X.min() >= 0


def test_gene_ids_valid(small: ad.AnnData) -> None:
    symbols = small.var_names.to_numpy(dtype=object)
    assert small.var_names.is_unique and len(symbols) == N_GENES
    assert set(symbols) <= set(gene_table()["symbol"])
    ensembl = small.var["ensembl"].to_numpy(dtype=object)
    assert all(re.fullmatch(r"ENSG\d{11}", e) for e in ensembl)
    assert list(map_genes(symbols, src="symbol", dst="ensembl")) == list(ensembl)
    assert list(map_genes(ensembl, src="ensembl", dst="symbol")) == list(symbols)
    assert symbols[0] == "ACTB"  # housekeeping genes first, the same for every seed
    assert list(synth.synth_genes(N_GENES)["symbol"]) == list(symbols)


def test_same_seed_gives_identical_matrix(small: ad.AnnData) -> None:
    again = synth.synthesize(SCALE, n_genes=N_GENES, seed=7)
    for part in ("data", "indices", "indptr"):
        assert getattr(again.X, part).tobytes() == getattr(small.X, part).tobytes()
    pd.testing.assert_frame_equal(again.obs, small.obs)
    other = synth.synthesize(SCALE, n_genes=N_GENES, seed=8)
    assert other.X.nnz != small.X.nnz or (other.X != small.X).nnz > 0


def test_block_writer_equals_in_memory(tmp_path, small: ad.AnnData) -> None:
    path = synth.synthesize(SCALE, n_genes=N_GENES, seed=7, out=tmp_path / "c.h5ad", block_cells=100)
    assert path == tmp_path / "c.h5ad" and not list(tmp_path.glob(".*tmp*"))
    back = ad.read_h5ad(path)
    assert back.X.dtype == small.X.dtype
    assert (back.X != small.X).nnz == 0 and back.X.shape == small.X.shape
    pd.testing.assert_frame_equal(back.obs, small.obs)
    pd.testing.assert_frame_equal(back.var, small.var)
    assert back.uns["synth"]["seed"] == 7
    other = synth.synthesize(SCALE, n_genes=N_GENES, seed=7, out=tmp_path / "d.h5ad", block_cells=1, compression=None)
    assert (ad.read_h5ad(other).X != small.X).nnz == 0


def test_existing_output_needs_overwrite(tmp_path) -> None:
    path = tmp_path / "c.h5ad"
    path.write_text("x")
    with pytest.raises(InputDataError, match="already exists; pass overwrite=True"):
        synth.synthesize(0.001, n_genes=20, out=path)
    synth.synthesize(0.001, n_genes=20, out=path, overwrite=True)
    assert ad.read_h5ad(path).n_vars == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 0}, r"scale=0: pass a fraction"),
        ({"study_shift": 1.5}, r"study_shift=1.5: pass a value in \[0, 1\]"),
        ({"response_strength": -1.0}, r"response_strength=-1.0"),
        ({"n_genes": 5}, r"n_genes=5 is out of range"),
        ({"dtype": "float64"}, r"dtype='float64'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(InputDataError, match=match):
        synth.synthesize(**{"scale": 0.001, "n_genes": 20, **kwargs})


def _program_shift(adata: ad.AnnData) -> tuple[float, float]:
    """Mean log-normalised expression, sensitive minus resistant, of the up and down genes."""
    x = adata.X.toarray().astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e4)
    sens = (adata.obs["response"] == "sensitive").to_numpy()
    up = (adata.var["response_program"] > 0).to_numpy()
    down = (adata.var["response_program"] < 0).to_numpy()
    diff = x[sens].mean(axis=0) - x[~sens].mean(axis=0)
    return float(diff[up].mean()), float(diff[down].mean())


def test_response_program_is_planted() -> None:
    shared = synth.synthesize(0.004, n_genes=200, study_shift=0.0, sample_sd=0.0, batch_sd=0.2)
    up, down = _program_shift(shared)
    assert up > 0.1 and down < -0.1
    assert set(shared.uns["synth"]["program_up"]) == set(shared.var_names[shared.var["response_program"] > 0])
    null = synth.synthesize(0.004, n_genes=200, response_strength=0.0, sample_sd=0.0, batch_sd=0.2)
    up0, down0 = _program_shift(null)
    assert abs(up0) < 0.06 and abs(down0) < 0.06


def test_written_collection_ingests_into_the_store(tmp_path) -> None:
    from scdm.store import Store

    path = synth.synthesize(0.001, n_genes=40, out=tmp_path / "synth.h5ad")
    st = Store(tmp_path / "store")
    info = st.ingest(path, name="synth", label_key="response", study_key="study", sample_key="sample",
                     tissue_key="tissue", cancer_key="cancer_type", drug_type_key="drug_type", regimen_key="regimen")
    cells = st.cells(["synth"])
    assert info.n_cells == len(cells) and info.n_genes == 40 and info.gene_id_kind == "symbol"
    assert cells["study"].nunique() == 23
    assert set(cells["response"].dropna().astype(int)) == {0, 1}
