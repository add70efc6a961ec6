from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdm.store import EmbeddingIncompleteError, EmbeddingNotFoundError, InputDataError, Store, StoreFormatError
from scdm.store._catalog import SCHEMA_VERSION
from tests.store import _writer
from tests.store.conftest import make_counts_adata

WRITER = Path(_writer.__file__)


def _fill(emb, data):
    for c in emb.missing_chunks():
        lo, hi = emb.chunk_bounds(c)
        emb.write_chunk(c, data[lo:hi])
    emb.finalize(telemetry={"device": "cpu"})


@pytest.fixture()
def ds(st, a375_path):
    return st.ingest(a375_path, label_key="response_PLX4720")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk_rows", [7, 32, 108, 256])
def test_round_trip_all_rows_and_subsets(st, ds, dtype, chunk_rows):
    data = np.random.default_rng(0).normal(size=(108, 13)).astype(np.float32)
    emb = st.create_embedding(ds.name, model="m", params={"k": chunk_rows}, dim=13, dtype=dtype, chunk_rows=chunk_rows)
    _fill(emb, data)
    expect = data.astype(dtype).astype(np.float32)
    got = st.read_embedding(emb.embedding_id)
    assert got.dtype == np.float32 and np.array_equal(got, expect)
    rows = np.array([107, 0, 55, 55, 8])
    assert np.array_equal(st.read_embedding(emb.embedding_id, rows=rows), expect[rows])
    assert st.verify_embedding(emb.embedding_id) == []


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_rows_as_a_boolean_mask_select_cells_never_rows_0_and_1(st, ds, compressor):
    """A mask cast to integers read cells 0 and 1 over and over: the expected shape, the wrong cells."""
    data = np.random.default_rng(2).normal(size=(108, 4)).astype(np.float32)
    emb = st.create_embedding(ds.name, model="m", params={}, dim=4, chunk_rows=16, compressor=compressor)
    _fill(emb, data)
    mask = np.zeros(108, dtype=bool)
    mask[[5, 40, 99]] = True
    assert np.array_equal(st.read_embedding(emb.embedding_id, rows=mask), data[mask])
    assert np.array_equal(st.read_embedding(emb.embedding_id, rows=[3.0, 1.0]), data[[3, 1]])
    assert np.array_equal(st.read_embedding(emb.embedding_id, rows=np.array([7, 2], dtype=object)), data[[7, 2]])
    for bad in (mask[:50], [2.7], ["c3"], [[1, 2]]):  # a short mask, a fraction, cell ids, a 2-D array
        with pytest.raises(InputDataError):
            st.read_embedding(emb.embedding_id, rows=bad)


def test_a_chunk_is_never_taller_than_the_dataset(st, ds):
    """Zarr stores an edge chunk at full size: a default 65,536-row chunk of 108 cells took 13 MB for 22 KB of data."""
    data = np.random.default_rng(0).normal(size=(108, 50)).astype(np.float32)
    emb = st.create_embedding(ds.name, model="m", params={}, dim=50)
    assert emb.chunk_rows == 108 and emb.n_chunks == 1
    _fill(emb, data)
    assert np.array_equal(st.read_embedding(emb.embedding_id), data)
    on_disk = sum(f.stat().st_size for f in Path(emb.path).rglob("*") if f.is_file())
    assert on_disk < 2 * data.nbytes


def test_compressed_arrays_read_through_zarr(st, ds):
    data = np.random.default_rng(1).normal(size=(108, 5)).astype(np.float32)
    emb = st.create_embedding(ds.name, model="m", params={}, dim=5, chunk_rows=16, compressor="zstd")
    _fill(emb, data)
    assert np.array_equal(st.read_embedding(emb.embedding_id), data)
    assert np.array_equal(st.read_embedding(emb.embedding_id, rows=[3, 90]), data[[3, 90]])


def test_array_is_plain_zarr_v3(st, ds):
    import zarr

    data = np.arange(108 * 4, dtype=np.float32).reshape(108, 4)
    emb = st.create_embedding(ds.name, model="m", params={}, dim=4, chunk_rows=50)
    _fill(emb, data)
    arr = zarr.open_array(str(emb.path), mode="r")
    assert arr.metadata.zarr_format == 3 and arr.chunks == (50, 4)
    assert np.array_equal(arr[:], data) and arr.attrs["scdm-encoding"] == "embedding"


def test_create_is_idempotent_and_identity_depends_on_params(st, ds):
    a = st.create_embedding(ds.name, model="m", params={"layer": -2}, dim=4)
    b = st.create_embedding(ds.name, model="m", params={"layer": -2}, dim=4)
    c = st.create_embedding(ds.name, model="m", params={"layer": -1}, dim=4)
    assert a.embedding_id == b.embedding_id != c.embedding_id
    assert a.space_id != c.space_id and len(st.embeddings()) == 2


def test_space_is_shared_across_datasets(st, ds):
    other = st.ingest(make_counts_adata(), name="other")
    a = st.create_embedding(ds.name, model="m", params={"x": 1}, dim=4, checkpoint_hash="abc")
    b = st.create_embedding(other.name, model="m", params={"x": 1}, dim=4, checkpoint_hash="abc")
    assert a.space_id == b.space_id and a.embedding_id != b.embedding_id


def test_incomplete_embedding_is_hidden_unless_asked(st, ds):
    emb = st.create_embedding(ds.name, model="m", params={}, dim=3, chunk_rows=50)
    emb.write_chunk(0, np.ones((50, 3), np.float32))
    with pytest.raises(EmbeddingIncompleteError, match="1 of 3 chunks.*same `scdm embed`"):
        st.read_embedding(emb.embedding_id)
    partial = st.read_embedding(emb.embedding_id, allow_partial=True)
    assert partial[:50].sum() == 150 and partial[50:].sum() == 0
    with pytest.raises(EmbeddingIncompleteError):
        emb.finalize()
    assert emb.missing_chunks() == [1, 2]
    assert len(st.embeddings(status="complete")) == 0


def test_bad_chunks_are_refused(st, ds):
    emb = st.create_embedding(ds.name, model="m", params={}, dim=3, chunk_rows=50)
    with pytest.raises(InputDataError, match=r"shape \(50, 3\)"):
        emb.write_chunk(0, np.ones((49, 3)))
    with pytest.raises(InputDataError, match="NaN"):
        emb.write_chunk(0, np.full((50, 3), np.nan))
    with pytest.raises(IndexError, match="chunks 0..2"):
        emb.write_chunk(3, np.ones((8, 3)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_non_finite_chunk_in_a_writer_is_refused_and_the_good_ones_are_kept(st, ds, dtype):
    emb = st.create_embedding(ds.name, model="m", params={"dtype": dtype}, dim=3, dtype=dtype, chunk_rows=50)
    good = np.ones((50, 3), np.float32)
    bad = good.copy()
    bad[49, 2] = np.inf
    with pytest.raises(InputDataError, match=f"Chunk 1 .* NaN or inf \\(in {dtype}\\)"):
        with emb.writer() as w:
            w.write(0, good)
            w.write(2, good[:8])
            w.write(1, bad)  # refused when its write is collected: here, on leaving the block
    assert emb.written_chunks() == [0, 2]  # the chunks written beside the bad one are on disk and committed
    assert not (Path(emb.location) / "c" / "1" / "0").exists()  # nothing of the refused chunk
    assert list((Path(emb.location) / "c").rglob("*.partial")) == []  # no temporary file left behind


def test_a_value_beyond_the_stored_dtype_is_refused_not_stored_as_inf(st, ds):
    emb = st.create_embedding(ds.name, model="m", params={}, dim=3, dtype="float16", chunk_rows=50)
    big = np.ones((50, 3))
    big[7, 1] = 1e6  # finite in float64, inf in float16
    with pytest.raises(InputDataError, match="NaN or inf"):
        emb.write_chunk(0, big)
    assert emb.written_chunks() == []


def test_missing_embedding_errors(st, ds):
    with pytest.raises(EmbeddingNotFoundError, match="scdm ls"):
        st.read_embedding("0123456789abcdef")
    with pytest.raises(EmbeddingNotFoundError, match="scdm embed"):
        st.find_embedding(ds.name, "geneformer")


def test_remove_embedding_deletes_rows_and_array(st, ds):
    emb = st.create_embedding(ds.name, model="m", params={}, dim=3)
    _fill(emb, np.zeros((108, 3), np.float32))
    st.remove_embedding(emb.embedding_id)
    assert st.embeddings().empty and not emb.path.exists()
    assert st.query("SELECT count(*) AS n FROM embedding_chunks")["n"].item() == 0


def test_export_npy_and_h5ad(st, ds, tmp_path):
    data = np.random.default_rng(2).normal(size=(108, 6)).astype(np.float32)
    emb = st.create_embedding(ds.name, model="pca", params={}, dim=6)
    _fill(emb, data)
    st.export_embedding(emb.embedding_id, tmp_path / "e.npy")
    assert np.array_equal(np.load(tmp_path / "e.npy"), data)
    st.export_embedding(emb.embedding_id, tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    assert np.array_equal(back.obsm["X_pca"], data) and back.n_obs == 108
    with pytest.raises(InputDataError, match=r"\.npy or \.h5ad"):
        st.export_embedding(emb.embedding_id, tmp_path / "e.csv")


def test_catalog_from_a_newer_scdm_is_refused(st):
    st.execute("INSERT INTO migrations VALUES (?, 'future', now(), '99.0')", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreFormatError, match=r"schema version .* scdm 99\.0.*Upgrade scdm"):
        Store(st.root)


def test_read_only_sql_refuses_writes(st, ds):
    from scdm.store import ReadOnlyQueryError

    assert st.sql("SELECT count(*) AS n FROM cells")["n"].item() == 108
    for bad in ["DROP TABLE cells", "INSERT INTO meta VALUES ('a','b')", f"COPY cells TO '{st.root}/x.csv'",
                "SELECT 1; DELETE FROM cells", "ATTACH 'other.db'", "SELECT * FROM read_csv('/etc/hostname')"]:
        with pytest.raises(ReadOnlyQueryError):
            st.sql(bad)
    assert not (st.root / "x.csv").exists() and len(st.cells()) == 108


def test_read_only_sql_tells_a_syntax_error_from_a_write_and_refuses_bad_limits(st):
    from scdm.store import ReadOnlyQueryError
    from scdm.store.errors import QueryError

    for broken in ["SELEC name FROM datasets", "SELECT FROM WHERE", ""]:  # a mistake to fix, not a write to refuse
        with pytest.raises(QueryError) as info:
            st.sql(broken)
        assert not isinstance(info.value, ReadOnlyQueryError), broken
    with pytest.raises(QueryError, match="syntax error"):
        st.sql("SELEC name FROM datasets")
    with pytest.raises(ReadOnlyQueryError):
        st.sql("DROP TABLE cells")  # parses, and writes
    for bad in [{"max_rows": -1}, {"max_rows": 0}, {"max_rows": 1.5}, {"timeout_s": 0}, {"timeout_s": -1.0},
                {"timeout_s": float("nan")}, {"timeout_s": float("inf")}]:
        with pytest.raises(InputDataError, match="max_rows" if "max_rows" in bad else "timeout_s"):
            st.sql("SELECT 1 AS x", **bad)
    assert st.sql("SELECT * FROM range(5)", max_rows=np.int64(2), timeout_s=30)["range"].tolist() == [0, 1]


def _run_writer(store, dataset, chunks="all", delay=0.0):
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(store), dataset, chunks, str(delay)],
        stdout=subprocess.PIPE, text=True,
    )


def test_killed_writer_resumes_to_bit_identical_result(tmp_path):
    adata = make_counts_adata(n_cells=100)
    clean_store, crash_store = Store(tmp_path / "clean"), Store(tmp_path / "crash")
    for s in (clean_store, crash_store):
        s.ingest(adata, name="d")
    assert _run_writer(clean_store.root, "d").wait(timeout=60) == 0
    clean = _writer.open_embedding(str(clean_store.root), "d")
    clean.finalize()

    proc = _run_writer(crash_store.root, "d", delay=0.05)
    for _ in range(3):  # let three chunks commit, then kill while the fourth is being written
        assert proc.stdout.readline().startswith("chunk")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    emb = _writer.open_embedding(str(crash_store.root), "d")
    written = emb.written_chunks()
    assert 3 <= len(written) < emb.n_chunks
    assert crash_store.verify_embedding(emb.embedding_id) == []  # nothing marked written is corrupt
    missing = emb.missing_chunks()
    resume = _run_writer(crash_store.root, "d")
    out, _ = resume.communicate(timeout=60)
    assert out.splitlines() == [f"chunk {c}" for c in missing]  # the rerun writes only what is missing
    emb.finalize()
    a = clean_store.read_embedding(clean.embedding_id)
    b = crash_store.read_embedding(emb.embedding_id)
    assert a.tobytes() == b.tobytes()


def test_two_processes_write_disjoint_chunks_concurrently(tmp_path):
    st = Store(tmp_path / "s")
    st.ingest(make_counts_adata(n_cells=100), name="d")
    emb = _writer.open_embedding(str(st.root), "d")
    evens = ",".join(str(c) for c in range(0, emb.n_chunks, 2))
    odds = ",".join(str(c) for c in range(1, emb.n_chunks, 2))
    procs = [_run_writer(st.root, "d", evens, 0.01), _run_writer(st.root, "d", odds, 0.01)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert emb.missing_chunks() == []
    emb.finalize()
    assert np.array_equal(st.read_embedding(emb.embedding_id), _writer.rows_of(0, 100))
    assert st.verify_embedding(emb.embedding_id) == []


def test_a_query_past_its_time_limit_is_a_query_error_not_a_refusal(tmp_path):
    from scdm.store.errors import QueryError, ReadOnlyQueryError

    st = Store(tmp_path / "store")
    with pytest.raises(QueryError, match="ran longer than 0.05 s") as caught:
        st.sql("SELECT count(*) FROM range(10000000000) a", timeout_s=0.05)
    assert not isinstance(caught.value, ReadOnlyQueryError)


def test_an_h5ad_export_carries_every_stored_label_set_and_says_where_the_file_differs(st, tmp_path, caplog):
    """The export wrote the obs of the store's copy: a label set added later from another file was missing,
    and after an update the file's changed label column sat there as if it were the stored labels."""
    adata = make_counts_adata(n_cells=30)
    adata.obs["drug_a"] = np.where(np.arange(30) % 2 == 0, "sensitive", "resistant")
    st.ingest(adata, name="d", label_key="drug_a", drug="A")
    other = adata.copy()  # the same cells, labelled for another drug in another file
    other.obs["drug_b"] = np.where(np.arange(30) < 10, "sensitive", "resistant")
    st.ingest(other, name="d", label_key="drug_b", drug="B")
    relabelled = other.copy()  # drug_a changed in the file, the study too: --update takes the study, not drug_a
    relabelled.obs["drug_a"] = "resistant"
    relabelled.obs["study"] = "S9"
    st.ingest(relabelled, name="d", study_key="study", update=True)
    emb = st.create_embedding("d", model="pca", params={}, dim=2)
    _fill(emb, np.zeros((30, 2), dtype=np.float32))
    with caplog.at_level("WARNING", logger="scdm"):
        st.export_embedding(emb.embedding_id, tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad")
    assert (back.obs["scdm_response_A"] == "sensitive").sum() == 15
    assert (back.obs["scdm_response_B"] == "sensitive").sum() == 10
    assert (back.obs["drug_a"] == "resistant").all()  # the file's column, kept as the file has it
    assert '"file_column_differs":15' in back.uns["scdm_label_sets"]["scdm_response_A"].replace(" ", "")
    assert "file_column_differs" not in back.uns["scdm_label_sets"]["scdm_response_B"]
    assert "'drug_a' of the file differs from the stored label set 'A' in 15 of 30 cells" in caplog.text
