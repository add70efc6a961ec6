from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import DatasetNotFoundError, InputDataError, Store
from scdm.store._ingest import IngestWarning
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
    from scdm.store._ingest import IngestWarning

    first = st.ingest(a375_path, label_key="response_PLX4720")
    with pytest.warns(IngestWarning, match="already in the store as 'A375_melanoma_GSE108383'"):
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
        (["sensitive", "resistant", "no"], {"unknown_values": ("no",)}, [1, 0, None]),  # was 0: the option was ignored
        (["CR", "PD", "NE"], {"positive": "CR", "unknown_values": ("NE",)}, [1, 0, None]),
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


def test_a_label_column_without_a_label_is_refused_and_nothing_is_written(st):
    adata = make_counts_adata()
    adata.obs["label"] = np.nan  # the wrong column: was stored as a label set of 0 labelled cells
    with pytest.raises(InputDataError, match=r"'label' \(--label-key\) holds no response label: all 60 values .*leave --label-key out"):
        st.ingest(adata, name="x", label_key="label")
    adata.obs["label"] = "not_in_set"
    with pytest.raises(InputDataError, match="holds no response label"):
        st.ingest(adata, name="x", label_key="label", unknown_values=("not_in_set",))
    assert st.datasets().empty and st.label_sets().empty


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
    zeros = make_counts_adata()
    zeros.X = sp.csr_matrix(zeros.shape, dtype=np.float32)  # the counts were left in a layer
    with pytest.raises(InputDataError, match=r"only zeros \(60 cells x 40 genes\).*adata.layers\['counts'\]"):
        st.ingest(zeros)
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


# ---- re-ingesting stored content with other kinds or another name ---------------------------------

def test_other_kinds_for_stored_content_are_refused_unless_update_which_rewrites_them(st):
    adata = make_counts_adata()
    first = st.ingest(adata, name="x")
    symbols = st.genes("x")
    assert (first.gene_id_kind, first.x_kind) == ("symbol", "counts") and symbols["symbol"].notna().all()
    with pytest.raises(InputDataError, match=r"gene_id_kind: stored 'symbol', given 'ensembl'; x_kind: stored 'counts', "
                                             r"given 'normalized'\).*--update"):
        st.ingest(adata, gene_id_kind="ensembl", x_kind="normalized")
    assert (st.dataset("x").gene_id_kind, st.dataset("x").x_kind) == ("symbol", "counts")
    wrong = st.ingest(adata, gene_id_kind="ensembl", x_kind="normalized", update=True)
    assert (wrong.gene_id_kind, wrong.x_kind) == ("ensembl", "normalized") and not wrong.created
    assert wrong.options["gene_id_kind"] == "ensembl" and wrong.options["x_kind"] == "normalized"
    assert st.genes("x")["symbol"].isna().all()  # symbols read as Ensembl ids map to nothing, as at a first ingest
    fixed = st.ingest(adata, gene_id_kind="symbol", x_kind="counts", update=True)
    assert (fixed.gene_id_kind, fixed.x_kind) == ("symbol", "counts")
    pd.testing.assert_frame_equal(st.genes("x"), symbols)
    assert len(st.datasets()) == 1


def test_kinds_are_not_rewritten_while_embeddings_made_with_them_exist(st):
    a = st.ingest(make_counts_adata(seed=1), name="a")
    st.ingest(make_counts_adata(seed=2), name="b")
    own = st.create_embedding("a", model="pca", params={}, dim=2)
    joint = st.create_embedding("b", model="pca", params={"fit_datasets": [a.content_hash]}, dim=2)  # fitted on a too
    with pytest.raises(InputDataError, match=rf"'a' cannot change its x_kind 'counts' -> 'normalized': 2 embedding.*"
                                             rf"{own.embedding_id}.*{joint.embedding_id} \(of 'b'.*scdm rm --embedding"):
        st.ingest(make_counts_adata(seed=1), x_kind="normalized", update=True)
    assert st.dataset("a").x_kind == "counts" and st.dataset("a").options == {}
    st.remove_embedding(own.embedding_id)
    st.remove_embedding(joint.embedding_id)
    assert st.ingest(make_counts_adata(seed=1), x_kind="normalized", update=True).x_kind == "normalized"


def test_another_name_for_stored_content_warns_with_the_stored_name(st):
    from scdm.store._ingest import IngestWarning

    st.ingest(make_counts_adata(), name="x")
    with pytest.warns(IngestWarning, match="'y': this content .* is already in the store as 'x'.*'y' was not added"):
        again = st.ingest(make_counts_adata(), name="y")
    assert again.name == "x" and list(st.datasets()["name"]) == ["x"]


def test_another_gene_key_is_other_content_and_the_name_clash_says_so(st, a375_path):
    st.ingest(a375_path)
    with pytest.raises(InputDataError, match="already in the store.*gene ids from var_names, this one from var column 'symbol'"):
        st.ingest(a375_path, gene_key="symbol")


# ---- value kind: a few stray values in a count matrix -----------------------------------------

@pytest.mark.parametrize(("value", "kind", "advice"), [
    (0.5, "normalized", "--x-kind counts"),
    (-1.0, "scaled", r"1 of them is negative, which no count can be: .*correct those values"),  # --x-kind counts is refused
])
def test_a_few_stray_values_in_counts_warn_and_keep_the_detected_kind(st, value, kind, advice):
    from scdm.store._ingest import IngestWarning

    adata = make_counts_adata(sparse=False)
    adata.X[2, 3] = value
    with pytest.warns(IngestWarning, match=rf"1 of its \d+ stored values is not a non-negative integer \(e\.g\. cell "
                                           rf"'cell2', gene '{adata.var_names[3]}': {value:g}\).*'{kind}'.*{advice}"):
        ds = st.ingest(adata, name="stray")
    assert ds.x_kind == kind


def _log_normalised(adata: ad.AnnData) -> ad.AnnData:
    x = np.asarray(adata.X)
    adata.X = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    return adata


def _z_scored(adata: ad.AnnData) -> ad.AnnData:
    x = np.asarray(adata.X)
    adata.X = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return adata


def _one_negative(adata: ad.AnnData) -> ad.AnnData:
    adata.X[2, 3] = -1.0
    return adata


@pytest.mark.parametrize(("values", "given", "found"), [
    (_log_normalised, "counts", r"(\d+) of the \1 stored values \(100\.0%\) are not whole numbers"),
    (_z_scored, "counts", r"are negative"),
    (_one_negative, "counts", r"1 of the \d+ stored values \(0\.\d%\) are negative \(e\.g\. cell 'cell2'.*: -1\)"),
    (_z_scored, "normalized", r"are negative.*scGPT, tGPT and the llm"),
])
def test_a_given_value_kind_the_values_contradict_is_refused_and_nothing_is_written(st, values, given, found):
    """--x-kind counts on log-normalised values was stored as counts: pca normalised and logged them again (other
    numbers, no word), and on a negative value (z-scores, or the one stray the warning advised --x-kind counts for)
    failed with numpy's 'array must not contain infs or NaNs'; --x-kind normalized let z-scores past the models'
    refusal of scaled values."""
    adata = values(make_counts_adata(sparse=False))
    with pytest.raises(InputDataError, match=rf"--x-kind {given} does not fit these values.*{found}"):
        st.ingest(adata, name="given", x_kind=given)
    assert st.datasets().empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IngestWarning)  # the one stray negative value: tested above
        stored = st.ingest(adata, name="given")  # detected: the stored kind cannot be rewritten to the wrong one either
    with pytest.raises(InputDataError, match=rf"--x-kind {given} does not fit these values"):
        st.ingest(adata, x_kind=given, update=True)
    assert st.dataset("given").x_kind == stored.x_kind != given


def test_a_stored_value_kind_the_values_contradict_warns_when_ingested_again(st):
    """A store of an scdm before the --x-kind check holds log-normalised values as 'counts' (pca normalises and logs
    them again); ingesting the file again without --x-kind kept that kind without a word, and the refusal of
    --x-kind counts says to leave it out, which keeps it too."""
    adata = _log_normalised(make_counts_adata(sparse=False))
    st.ingest(adata, name="old")
    with st.catalog.transaction() as con:  # as 7504fc1 stored --x-kind counts
        con.execute("UPDATE datasets SET x_kind = 'counts' WHERE name = 'old'")
    with pytest.warns(IngestWarning, match=r"'old' is stored with the value kind 'counts' \(given by an earlier ingest\), "
                                           r"which its values contradict: (\d+) of the \1 stored values \(100\.0%\) are "
                                           r"not whole numbers.*detected: 'normalized'.*--x-kind normalized --update"):
        st.ingest(adata, label_key="label", label_set="again")
    assert st.ingest(adata, x_kind="normalized", update=True).x_kind == "normalized"  # what the warning advises is taken
    with warnings.catch_warnings():
        warnings.simplefilter("error", IngestWarning)
        st.ingest(adata)  # a stored kind the values fit: no warning


def test_a_few_negative_values_in_normalised_data_warn_that_they_made_it_scaled(st):
    """Log-normalised values with one value below zero were classed 'scaled' without a word: scGPT/tGPT/llm then
    refused them, transfer picked the target's genes by variance (4 of 10 others than by dispersion on such data)
    and prompts read the values as deviations from the mean."""
    adata = _log_normalised(make_counts_adata(sparse=False))
    adata.X[2, 3] = -0.01
    with pytest.warns(IngestWarning, match=rf"'lognorm': 1 of its \d+ stored values is negative \(e\.g\. cell 'cell2', "
                                           rf"gene '{adata.var_names[3]}': -0\.01\), all others are not, so its values "
                                           r"were classed as 'scaled'.*--x-kind normalized --update"):
        ds = st.ingest(adata, name="lognorm")
    assert ds.x_kind == "scaled"
    assert st.ingest(adata, x_kind="normalized", update=True).x_kind == "normalized"  # what the warning advises is taken


def test_no_stray_negative_warning_for_z_scores(st, recwarn):
    assert st.ingest(_z_scored(make_counts_adata(sparse=False)), name="z").x_kind == "scaled"
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


def test_counts_with_fractions_warn_that_they_are_taken_as_they_are(st, recwarn):
    """Counts with fractions (here counts x 0.7..1.0, as ambient-RNA correction leaves them) were classed 'normalized'
    without a word, and pca/hvg took them as they are: no depth normalisation, no log."""
    adata = make_counts_adata(sparse=False)
    rng = np.random.default_rng(0)
    depth = np.linspace(1.0, 4.0, adata.n_obs)[:, None]
    adata.X = (rng.poisson(30.0 * depth, adata.shape) * rng.uniform(0.7, 1.0, adata.shape)).astype(np.float32)
    with pytest.warns(IngestWarning, match=r"'fractional': its values are not whole numbers, so they were classed as "
                                           r"'normalized', but they are not logged \(the largest is \d+.*\) nor "
                                           r"normalised per cell \(the cells' totals range from \d+.* to \d+.*\).*np\.rint"):
        assert st.ingest(adata, name="fractional").x_kind == "normalized"
    recwarn.clear()
    assert st.ingest(_log_normalised(make_counts_adata(seed=1, sparse=False)), name="log").x_kind == "normalized"
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


def test_normalised_values_not_logged_warn_that_they_are_taken_as_they_are(st):
    """CP10k values without log1p (largest 1,244.7 on 400 PC9 cells) were taken as they are by pca/hvg without a
    word, although transfer logs such values (with a warning)."""
    adata = make_counts_adata(sparse=False)
    x = np.asarray(adata.X)
    adata.X = (x / x.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    with pytest.warns(IngestWarning, match=r"'cp10k': its values are not whole numbers, so they were classed as "
                                           r"'normalized', but they are not logged \(the largest is \d+.*; log-normalised "
                                           r"values stay below 50\)\. pca and hvg take .* Log them first"):
        assert st.ingest(adata, name="cp10k").x_kind == "normalized"


def _value_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    """The ingest warnings but the one about PC9's gene columns of one Ensembl id (C2ORF15/C2orf15), which every
    ingest of the PC9 fixture gives."""
    return [str(w.message) for w in recwarn
            if issubclass(w.category, IngestWarning) and "that another column maps to as well" not in str(w.message)]


def test_counts_with_one_stray_value_warn_once_and_not_as_counts_with_fractions(st, pc9_counts_path, recwarn):
    """Real PC9 counts with one value made 1.5 (1 of 817,732 on 400 cells) got the stray-value warning (--x-kind counts) and also
    'its values are not whole numbers ... counts with fractions (ambient-RNA corrected ...)? ... round them', which
    is not so and advised otherwise for the same value."""
    adata = ad.read_h5ad(pc9_counts_path)[:100].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.data[5] += 0.5
    assert st.ingest(adata, name="stray").x_kind == "normalized"
    found = _value_warnings(recwarn)
    assert len(found) == 1 and "1 of its" in found[0] and "--x-kind counts" in found[0]


def test_counts_with_fractions_above_any_log_value_are_taken_as_counts_when_given(st, pc9_counts_path, recwarn):
    """The --x-kind check refused PC9 counts x uniform(0.7, 1.0) (as SoupX corrects them; largest value 364) given as
    counts, which 7504fc1 took: only fractions that stay below any log value are log-normalised values."""
    adata = ad.read_h5ad(pc9_counts_path)[:100].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.data *= np.random.default_rng(0).uniform(0.7, 1.0, adata.X.nnz).astype(np.float32)
    assert st.ingest(adata, name="soupx", x_kind="counts").x_kind == "counts"
    assert not _value_warnings(recwarn)
    with pytest.raises(InputDataError, match=r"not whole numbers.*exceeds 50.*np\.rint"):
        st.ingest(_log_normalised(make_counts_adata(sparse=False)), name="logged", x_kind="counts")


def test_a_given_value_kind_that_a_few_values_contradict_is_taken(st):
    fraction = make_counts_adata(sparse=False)
    fraction.X[0, 0] = 0.5  # a stray non-integer in counts: what --x-kind counts is for
    assert st.ingest(fraction, name="counts", x_kind="counts").x_kind == "counts"
    negative = _log_normalised(make_counts_adata(seed=1, sparse=False))
    negative.X[0, 0] = -0.1  # one below zero in log-normalised values: not scaled
    assert st.ingest(negative, name="normalised", x_kind="normalized").x_kind == "normalized"
    assert st.ingest(make_counts_adata(seed=2), name="declared", x_kind="normalized").x_kind == "normalized"


def test_no_stray_value_warning_for_normalised_data_or_a_given_kind(st, recwarn):
    from scdm.store._ingest import IngestWarning

    normalised = make_counts_adata(sparse=False)
    normalised.X = np.log1p(normalised.X)
    assert st.ingest(normalised, name="log").x_kind == "normalized"
    counts = make_counts_adata(seed=3, sparse=False)
    counts.X[0, 0] = 0.5
    assert st.ingest(counts, name="given", x_kind="counts").x_kind == "counts"
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


# ---- content hash: float32 values, duplicate sparse entries summed ------------------------------

def test_the_hash_is_of_float32_values_as_documented(st):
    from scdm.store._ingest import scan_matrix

    a = make_counts_adata(sparse=False)
    a.X = a.X.astype(np.float64) / 7.0
    a.X[0, 0] = 1.0 / 3.0
    b = a.copy()
    b.X[0, 0] = np.nextafter(a.X[0, 0], 10.0)  # another float64, the same float32
    assert a.X[0, 0] != b.X[0, 0] and np.float32(a.X[0, 0]) == np.float32(b.X[0, 0])
    assert st.ingest(a, name="a").dataset_id == st.ingest(b).dataset_id
    doc = " ".join((scan_matrix.__doc__ or "").split())
    assert "as float32" in doc and "float64 values" not in doc


def _with_duplicate_entry(dense: np.ndarray) -> sp.csr_matrix:
    """CSR of ``dense`` whose (0, 0) value is stored as two halves (scipy allows it; toarray() adds them)."""
    rest = sp.csr_matrix(dense)
    rest[0, 0] = 0
    rest.eliminate_zeros()
    first = np.r_[[0, 0], rest.indices[rest.indptr[0]:rest.indptr[1]]]
    data = np.r_[[dense[0, 0] / 2] * 2, rest.data[rest.indptr[0]:rest.indptr[1]], rest.data[rest.indptr[1]:]]
    indices = np.r_[first, rest.indices[rest.indptr[1]:]]
    out = sp.csr_matrix((data.astype(np.float32), indices, np.r_[0, rest.indptr[1:] + 2]), shape=dense.shape)
    out.has_canonical_format = False
    return out


def test_duplicate_sparse_entries_are_summed_like_the_equal_dense_matrix(st):
    dense = make_counts_adata(sparse=False)
    dense.X[0, 0] = 1.0
    dup = dense.copy()
    dup.X = _with_duplicate_entry(dense.X)
    assert np.array_equal(dup.X.toarray(), dense.X) and dup.X.nnz == np.count_nonzero(dense.X) + 1
    before = (dup.X.data.copy(), dup.X.indices.copy(), dup.X.indptr.copy())
    a = st.ingest(dense, name="dense")
    b = st.ingest(dup)
    assert b.dataset_id == a.dataset_id and b.x_kind == "counts"
    for got, want in zip((dup.X.data, dup.X.indices, dup.X.indptr), before):
        np.testing.assert_array_equal(got, want)  # the user's AnnData is left as it was


def test_to_csr_sums_duplicates_on_a_copy_in_every_block_reader():
    from scdm.store.matrix import iter_row_blocks, to_csr

    dense = make_counts_adata(n_cells=6, n_genes=5, sparse=False).X
    dense[0, 0] = 3.0
    dup = _with_duplicate_entry(dense)
    data = dup.data.copy()
    block = to_csr(dup)
    assert block.has_canonical_format and block.nnz == np.count_nonzero(dense) and block.dtype == np.float32
    np.testing.assert_array_equal(block.toarray(), dense)
    np.testing.assert_array_equal(dup.data, data)
    (_, first), = iter_row_blocks(ad.AnnData(X=dup))
    np.testing.assert_array_equal(first.toarray(), dense)
    assert first.has_canonical_format
    clean = sp.csr_matrix(dense)
    assert not np.shares_memory(to_csr(clean).data, clean.data)  # a copy even when nothing needs changing


# ---- gene ids of two kinds ----------------------------------------------------------------------

def _genes_with_both_ids(n: int) -> tuple[list[str], list[str]]:
    """``n`` genes of the shipped table that have a symbol and an Ensembl id: (symbols, Ensembl ids)."""
    from scdm.store.genes import gene_table

    table = gene_table()
    both = table[(table["symbol"] != "") & (table["ensembl"] != "")]
    both = both.drop_duplicates("symbol").drop_duplicates("ensembl").iloc[:n]
    return both["symbol"].tolist(), both["ensembl"].tolist()


def test_gene_ids_of_two_kinds_warn_how_many_are_left_out(st):
    from scdm.store._ingest import IngestWarning

    adata = make_counts_adata()
    symbols, ensembl = _genes_with_both_ids(40)
    adata.var_names = [*ensembl[:24], *symbols[24:]]  # 24 Ensembl ids, 16 symbols
    with pytest.warns(IngestWarning, match=r"16 of its 40 gene ids \(40%, e\.g\. '.+'\) are not ensembl ids .*--gene-key"):
        ds = st.ingest(adata, name="mixed")
    assert ds.gene_id_kind == "ensembl"


def test_one_kind_of_gene_ids_or_a_few_others_do_not_warn(st, recwarn):
    from scdm.store._ingest import IngestWarning

    st.ingest(make_counts_adata(), name="symbols")
    adata = make_counts_adata(seed=1)
    _, ensembl = _genes_with_both_ids(40)
    adata.var_names = [*ensembl[:37], "ERCC-00002", "ERCC-00003", "EGFP"]  # spike-ins and a transgene: 3 of 40
    st.ingest(adata, name="ensembl")
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


def test_symbols_written_like_mouse_genes_warn_that_they_are_read_as_human(st, recwarn):
    from scdm.store._ingest import IngestWarning

    adata = make_counts_adata()
    symbols, _ = _genes_with_both_ids(40)
    adata.var_names = [s[:1] + s[1:].lower() for s in symbols]  # Actb, Gapdh: how mouse matrices name genes
    with pytest.warns(IngestWarning, match=r"gene symbols \(\d+%, e\.g\. '.+'\) are written like mouse symbols.*orthologs"):
        st.ingest(adata, name="mouse")
    recwarn.clear()
    human = make_counts_adata(seed=1)
    human.var_names = symbols[:36] + ["C1orf43", "C11orf58", "C19orf53", "C6orf15"]  # open reading frames: human
    st.ingest(human, name="human")
    assert not [w for w in recwarn if "mouse" in str(w.message)]


def test_symbols_a_spreadsheet_made_dates_warn_that_no_model_finds_them(st, recwarn):
    """'1-Mar', '2-Sep' (MARCH1, SEPT2 read as dates by Excel) were stored as symbols of no gene without a word."""
    adata = make_counts_adata()
    adata.var_names = [*adata.var_names[:-4], "1-Mar", "2-Sep", "Sep-7", "APR-1"]  # APR-1: an alias of a gene
    with pytest.warns(IngestWarning, match=r"'dates': 3 of its 40 gene ids are dates \(e\.g\. '1-Mar', '2-Sep', "
                                           r"'Sep-7'\).*no model finds those genes.*Restore the symbols"):
        st.ingest(adata, name="dates")
    recwarn.clear()
    adata.var_names = [*adata.var_names[:-4], "MARCHF1", "SEPTIN2", "SEPT7", "APR-1"]
    st.ingest(adata, name="restored")
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


def test_a_study_column_with_gaps_is_refused_and_nothing_is_written(st):
    # cells without a study fell back to the dataset id as their study: cross-data then held
    # out those few cells as a study of their own (6 of SCC47's 120 cells scored as study
    # '6ec4f32cc640c0e4') without a word
    adata = make_counts_adata()
    study = adata.obs["study"].astype(object)
    study.iloc[[2, 7, 11]] = np.nan
    adata.obs["study"] = pd.Categorical(study)
    with pytest.raises(InputDataError, match=r"'study' \(--study-key\) has no value for 3 of 60 cells \(cell2, cell7, "
                                             r"cell11\).*whole studies.*--study"):
        st.ingest(adata, name="m", label_key="label", study_key="study")
    assert st.datasets().empty and st.cells().empty


@pytest.mark.parametrize("first", [0, 1])
def test_gene_ids_that_are_column_positions_are_refused_not_read_as_entrez(st, first):
    adata = make_counts_adata()
    adata.var_names = [str(i + first) for i in range(adata.n_vars)]  # a bare matrix (0..n-1) or R's row names (1..n)
    with pytest.raises(InputDataError, match=r"40 gene ids are the numbers \d+\.\.\d+: column positions"):
        st.ingest(adata)
    assert st.datasets().empty and st.cells().empty


def test_real_entrez_gene_ids_are_still_ingested(st, a375_path):
    assert st.ingest(a375_path).gene_id_kind == "entrez"  # 2, 14, 25980, ...: distinct, most above n


def test_a_relabelled_file_taken_with_update_becomes_the_stored_copy(st, tmp_path):
    adata = make_counts_adata()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    st.ingest(path, label_key="label")
    adata.obs["label"] = adata.obs["label"].astype(object)
    adata.obs.iloc[:10, adata.obs.columns.get_loc("label")] = "resistant"
    adata.obs.iloc[10:15, adata.obs.columns.get_loc("label")] = None
    adata.write_h5ad(path)
    st.ingest(path, label_key="label", update=True)
    stored = st.cells("cells")["response"].astype("float").fillna(-1).to_numpy()
    given = adata.obs["label"].astype(object)  # write_h5ad made the column categorical
    expected = given.map({"sensitive": 1.0, "resistant": 0.0}).fillna(-1).to_numpy(dtype=float)
    assert np.array_equal(stored, expected)
    copy = st.open_anndata("cells", backed=False)  # what export and predict --out write to .h5ad
    assert copy.obs["label"].astype(object).fillna("NA").tolist() == given.fillna("NA").tolist()


def test_positive_that_makes_several_values_resistant_warns_with_their_counts(st):
    adata = make_counts_adata(n_cells=8)
    adata.obs["recist"] = ["CR", "PR", "PR", "SD", "PD", "PD", "PD", "CR"]  # PR: partial responders
    with pytest.warns(IngestWarning, match=r"3 other values of column 'recist' were read as resistant: "
                                           r"'pd' \(3 cells\), 'pr' \(2 cells\), 'sd' \(1 cells\)"):
        st.ingest(adata, name="d", label_key="recist", positive="CR")


def test_positive_of_a_two_valued_column_does_not_warn(st, recwarn):
    adata = make_counts_adata(n_cells=6)
    adata.obs["arm"] = ["pre", "post", "post", "pre", "post", "NA"]
    st.ingest(adata, name="d", label_key="arm", positive="post")
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


@pytest.mark.parametrize("n_missing", [1, 3])
def test_a_gene_key_column_with_missing_ids_is_refused_not_read_as_gene_nan(st, n_missing):
    adata = make_counts_adata()
    symbols = pd.Series(list(adata.var_names), index=adata.var_names, dtype=object)
    symbols.iloc[5:5 + n_missing] = np.nan
    adata.var["symbol"] = pd.Categorical(symbols)
    with pytest.raises(InputDataError, match=rf"{n_missing} of the 40 genes have no id in var column 'symbol'.*at position 5"):
        st.ingest(adata, gene_key="symbol")
    assert st.datasets().empty


def test_ids_with_a_carriage_return_or_gene_ids_with_spaces_are_refused(st):
    crlf = make_counts_adata()
    crlf.obs_names = [f"{c}\r" for c in crlf.obs_names]  # barcodes.tsv with Windows line endings, split on '\n'
    with pytest.raises(InputDataError, match=r"60 cell ids hold a line break.*'cell0\\r'.*obs_names.str.strip\(\)"):
        st.ingest(crlf)
    spaced = make_counts_adata()
    spaced.var_names = [f" {g}" if i == 0 else g for i, g in enumerate(spaced.var_names)]
    with pytest.raises(InputDataError, match=r"1 gene id holds .*or spaces around it.*var_names.str.strip\(\)"):
        st.ingest(spaced)
    assert st.datasets().empty


def test_a_cells_csv_is_one_row_per_cell_for_odd_but_clean_ids(st, tmp_path):
    import io
    adata = make_counts_adata(n_cells=6)
    adata.obs_names = ["a,1", 'b"2', "c\u00e73", " d4 ", "=e5", "NA"]
    st.ingest(adata, name="odd")
    text = st.sql('SELECT cell_id FROM cells ORDER BY "row"').to_csv(index=False)  # what `scdm sql --format csv` prints
    back = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
    assert back["cell_id"].tolist() == list(adata.obs_names)


@pytest.mark.parametrize(("column", "flags"), [("is_resistant", [True, False]), ("non_responder", [1, 0])])
def test_flags_in_a_column_named_for_resistance_need_positive(st, column, flags):
    adata = make_counts_adata(n_cells=6)
    adata.obs[column] = flags * 3  # 1/true here means resistant, read alone as sensitive
    with pytest.raises(InputDataError, match=rf"Column '{column}' \(--label-key\) is named for resistance"):
        st.ingest(adata, name="d", label_key=column)
    assert st.datasets().empty
    st.ingest(adata, name="d", label_key=column, positive=str(flags[1]))
    assert st.cells("d")["response"].tolist() == [0, 1] * 3


def test_a_label_set_read_again_with_other_unknown_values_is_refused_saying_so(st):
    """The clash message named column, positive and drug (all the same), not the option that differed."""
    adata = make_counts_adata()
    adata.obs["label"] = adata.obs["label"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("label")] = "unclear"
    st.ingest(adata, name="d", label_key="label", drug="X", unknown_values=["unclear"])
    adata.obs.iloc[3, adata.obs.columns.get_loc("label")] = "n/a"
    with pytest.raises(InputDataError, match=r"differs in --unknown-value \(\['unclear'\] stored, \['unclear', 'n/a'\] given\)"):
        st.ingest(adata, name="d", label_key="label", drug="X", unknown_values=["unclear", "n/a"])


def test_gene_columns_of_one_ensembl_id_are_warned_about_with_their_count(st, recwarn):
    """PC9 holds 'C2ORF15' and 'C2orf15' (and MCL1 beside ADAMTSL4-AS1, both ENSG00000143384 in the table): Geneformer
    summed each pair into one gene and CellPLM read only the first column, without a word."""
    adata = make_counts_adata(n_genes=12)
    adata.var_names = [*adata.var_names[:8], "C2ORF15", "C2orf15", "MCL1", "ADAMTSL4-AS1"]
    with pytest.warns(IngestWarning, match=r"'pairs': 4 gene columns map to 2 Ensembl ids that another column maps to as "
                                           r"well \(e\.g\. 'C2ORF15' and 'C2orf15' -> ENSG00000273045; 'MCL1' and "
                                           r"'ADAMTSL4-AS1' -> ENSG00000143384\).*Geneformer sums"):
        st.ingest(adata, name="pairs")
    recwarn.clear()
    st.ingest(make_counts_adata(n_genes=12, seed=1), name="distinct")  # one column per Ensembl id: nothing to say
    assert not [w for w in recwarn if issubclass(w.category, IngestWarning)]


def test_values_normalised_per_cell_are_refused_as_counts_when_given(st):
    """1138715 took fractions above 50 given as counts as estimated counts, and so took CP10k values (every cell's total
    1e4, largest value over 1,000) as counts without a word, which 3aca9dc refused: every cell then has one depth."""
    adata = make_counts_adata(sparse=False)
    x = np.asarray(adata.X)
    adata.X = (x / x.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    with pytest.raises(InputDataError, match=r"not whole numbers and every cell's total is about the same \(10000 to "
                                             r"10000\): values normalised per cell, not counts.*one total"):
        st.ingest(adata, name="cp10k", x_kind="counts")
