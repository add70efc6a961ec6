"""Verified reads: a missing, truncated or altered chunk is an error naming it, and a rerun repairs it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from scdm.embedding.runner import embed_baseline
from scdm.store import EmbeddingIncompleteError, Store, _zarr, example_data
from scdm.store.errors import ArrayMetadataError, ChunkCorruptError, StoreDamagedError

CHUNK_ROWS = 16  # 108 A375 cells -> 7 chunks
BAD = 2  # the chunk the tests damage (rows 32-47)


def damage(path: Path, how: str) -> None:
    """Damage one chunk file the three ways a disk or a user does."""
    if how == "flip":
        data = bytearray(path.read_bytes())
        for i in range(16):
            data[7 * i + 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 3)
    else:  # pragma: no cover
        raise ValueError(how)


REPAIR = "scdm embed a375 --model pca --n-hvg 50 --n-comps 5"
"""The command that recomputes the embedding of :func:`pca` (its original options)."""


def pca(st: Store):
    return embed_baseline(st, ["a375"], model="pca", n_hvg=50, n_comps=5, chunk_rows=CHUNK_ROWS, progress=False)[0]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store with the A375 pca embedding in 7 chunks, built once per module."""
    root = tmp_path_factory.mktemp("verify") / "store"
    st = Store(root)
    st.ingest(example_data(), label_key="response_PLX4720", name="a375")
    pca(st)
    return root


@pytest.fixture()
def a375(template, tmp_path) -> tuple[Store, str, np.ndarray]:
    """A copy of the template store, its embedding id and its clean values."""
    shutil.copytree(template, tmp_path / "store")
    st = Store(tmp_path / "store")
    eid = str(st.embeddings()["embedding_id"].iloc[0])
    return st, eid, st.read_embedding(eid)


def chunk_file(st: Store, eid: str, chunk: int = BAD) -> Path:
    return st.embedding(eid).path / "c" / str(chunk) / "0"


REASONS = {"flip": "checksum mismatch", "delete": "missing", "truncate": "truncated"}


@pytest.mark.parametrize("how", ["flip", "delete", "truncate"])
def test_a_damaged_chunk_is_an_error_that_names_it_and_returns_no_data(a375, tmp_path, how):
    st, eid, clean = a375
    path = chunk_file(st, eid)
    damage(path, how)
    fresh = Store(st.root)  # a new process: nothing verified yet
    for reader in (st, fresh):
        with pytest.raises(ChunkCorruptError) as info:
            reader.read_embedding(eid)
        err = info.value
        assert (err.chunk, err.reason, err.embedding_id, err.path) == (BAD, REASONS[how], eid, str(path))
        text = str(err)
        for part in (eid, "pca", "'a375'", f"chunk {BAD} of 7", "rows 32-47", str(path), REPAIR):
            assert part in text, part
    assert isinstance(err, StoreDamagedError)
    # rows in other chunks still read; rows in the bad chunk do not
    np.testing.assert_array_equal(st.read_embedding(eid, rows=[0, 5, 100]), clean[[0, 5, 100]])
    with pytest.raises(ChunkCorruptError):
        st.read_embedding(eid, rows=[1, 40])
    out = tmp_path / "x.npy"
    with pytest.raises(ChunkCorruptError):
        st.export_embedding(eid, out)
    assert not out.exists()


@pytest.mark.parametrize("how", ["flip", "delete", "truncate"])
def test_verify_reports_the_bad_chunk_and_rerunning_the_embedding_repairs_it_bit_identically(a375, how):
    st, eid, clean = a375
    damage(chunk_file(st, eid), how)
    report = st.verify()
    assert not report.ok and [(b.embedding_id, b.chunk, b.reason) for b in report.bad] == [(eid, BAD, REASONS[how])]
    check = report.embeddings[0]
    assert (check.checked, check.n_chunks, check.bad_chunks, check.marked_pending) == (7, 7, [BAD], False)
    assert check.repair == REPAIR
    assert "1 bad chunk(s) in 1 embedding(s)" in report.summary()
    assert st.verify_embedding(eid) == [BAD]
    assert st.embedding(eid).status == "complete"  # verifying alone changes nothing

    again = pca(st)
    assert (again.embedding_id, again.computed_chunks) == (eid, 1)
    assert st.verify().ok and st.embedding(eid).status == "complete"
    repaired = Store(st.root).read_embedding(eid)
    assert repaired.tobytes() == clean.tobytes()


def test_verify_repair_marks_only_the_bad_chunks_pending(a375):
    st, eid, clean = a375
    damage(chunk_file(st, eid, 1), "flip")
    damage(chunk_file(st, eid, 4), "delete")
    report = st.verify(eid, repair=True)
    assert report.embeddings[0].bad_chunks == [1, 4] and report.embeddings[0].marked_pending
    emb = st.embedding(eid)
    assert emb.status == "pending" and emb.missing_chunks() == [1, 4]
    assert not chunk_file(st, eid, 1).exists()  # damaged bytes are not left for partial reads
    with pytest.raises(EmbeddingIncompleteError):
        st.read_embedding(eid)
    partial = st.read_embedding(eid, allow_partial=True)
    assert not partial[16:32].any() and partial[:16].tobytes() == clean[:16].tobytes()
    assert pca(st).embedding_id == eid
    assert st.read_embedding(eid).tobytes() == clean.tobytes()


def test_a_chunk_changed_after_a_verified_read_is_caught(a375):
    st, eid, clean = a375
    st.read_embedding(eid)  # verified and remembered by this process
    path = chunk_file(st, eid)
    data = bytearray(path.read_bytes())
    data[0] ^= 1  # same size, same inode: only the timestamps tell
    with open(path, "r+b") as fh:
        fh.write(bytes(data))
    with pytest.raises(ChunkCorruptError, match="checksum mismatch"):
        st.read_embedding(eid)
    with pytest.raises(ChunkCorruptError):
        st.read_embedding(eid, rows=[33])


def test_checksums_cached_by_a_reader_follow_a_recomputation_by_another_process(a375):
    st, eid, clean = a375
    st.read_embedding(eid)  # this handle caches the embedding and its checksums
    other = Store(st.root)
    other.mark_chunks_pending(eid, [BAD])
    emb = other.embedding(eid)
    lo, hi = emb.chunk_bounds(BAD)
    emb.write_chunk(BAD, clean[lo:hi] + 1)  # e.g. a GPU recomputation that differs in the last bits
    emb.finalize()
    got = st.read_embedding(eid)
    np.testing.assert_array_equal(got[lo:hi], clean[lo:hi] + 1)


def test_an_all_zero_chunk_has_no_file_and_still_verifies(a375):
    st = a375[0]
    emb = st.create_embedding("a375", model="zeros", params={}, dim=4, chunk_rows=50)
    rows = np.arange(108 * 4, dtype=np.float32).reshape(108, 4)
    rows[50:100] = 0
    for c in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(c)
        emb.write_chunk(c, rows[lo:hi])
    emb.finalize()
    assert not (emb.path / "c" / "1" / "0").exists()  # zarr writes no file for a fill-value chunk
    np.testing.assert_array_equal(st.read_embedding(emb.embedding_id), rows)
    assert st.verify().ok


def test_compressed_arrays_are_verified_through_zarr(a375):
    st = a375[0]
    emb = st.create_embedding("a375", model="z", params={}, dim=8, chunk_rows=32, compressor="zstd")
    data = np.random.default_rng(0).standard_normal((108, 8)).astype(np.float32)
    for c in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(c)
        emb.write_chunk(c, data[lo:hi])
    emb.finalize()
    np.testing.assert_array_equal(st.read_embedding(emb.embedding_id, rows=[3, 70]), data[[3, 70]])
    damage(emb.path / "c" / "2" / "0", "delete")
    with pytest.raises(ChunkCorruptError) as info:
        st.read_embedding(emb.embedding_id)
    assert (info.value.chunk, info.value.reason) == (2, "missing")
    damage(emb.path / "c" / "1" / "0", "flip")
    assert [(b.chunk, b.reason) for b in st.verify().bad] == [(1, "unreadable"), (2, "missing")]


def test_checksums_of_older_stores_are_still_checked():
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    legacy = hashlib.blake2b(block.tobytes(), digest_size=16).hexdigest()  # before CRC-32 was adopted
    assert _zarr.checksum_matches(block, legacy)
    assert _zarr.checksum_matches(block, _zarr.chunk_checksum(block))
    assert not _zarr.checksum_matches(block + 1, legacy)
    assert not _zarr.checksum_matches(block + 1, _zarr.chunk_checksum(block))


# ---- a complete embedding without a chunk's record, the array's own metadata, leftover temporaries ----
def drop_record(st: Store, eid: str, chunk: int = BAD) -> None:
    """What a hand-edited or half-restored catalog leaves: a complete embedding without one chunk's row."""
    st.catalog.execute("DELETE FROM embedding_chunks WHERE embedding_id = ? AND chunk = ?", [eid, chunk])


@pytest.mark.parametrize("file", ["deleted", "kept"])
def test_a_complete_embedding_missing_a_chunk_record_is_damage_and_a_rerun_recomputes_that_chunk(a375, tmp_path, file):
    st, eid, clean = a375
    drop_record(st, eid)
    if file == "deleted":
        chunk_file(st, eid).unlink()  # it would read as zeros
    # st read it before, with every checksum: it still verifies an intact chunk against that one
    readers = (st, Store(st.root)) if file == "deleted" else (Store(st.root),)
    for reader in readers:
        for rows in (None, [0, 100]):  # a complete embedding is not read at all while a record is missing
            with pytest.raises(ChunkCorruptError) as info:
                reader.read_embedding(eid, rows=rows)
            err = info.value
            assert (err.chunk, err.reason, err.embedding_id) == (BAD, "no record", eid)
            for part in ("is damaged", f"chunk {BAD} of 7", "no committed checksum", REPAIR, f"scdm verify --embedding {eid}"):
                assert part in str(err), part
    with pytest.raises(ChunkCorruptError):
        Store(st.root).export_embedding(eid, tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()
    report = st.verify()
    assert not report.ok and [(b.chunk, b.reason) for b in report.bad] == [(BAD, "no record")]
    assert (report.embeddings[0].checked, report.embeddings[0].repair) == (6, REPAIR)
    assert st.verify_embedding(eid) == [BAD] and st.embedding(eid).status == "complete"
    again = pca(st)
    assert (again.embedding_id, again.computed_chunks) == (eid, 1)
    assert st.verify().ok and Store(st.root).read_embedding(eid).tobytes() == clean.tobytes()


def test_verify_repair_puts_a_chunk_without_record_back_to_pending(a375):
    st, eid, clean = a375
    drop_record(st, eid)
    check = st.verify(eid, repair=True).embeddings[0]
    assert (check.bad_chunks, check.marked_pending) == ([BAD], True)
    assert st.embedding(eid).status == "pending" and st.embedding(eid).missing_chunks() == [BAD]
    assert pca(st).computed_chunks == 1 and st.read_embedding(eid).tobytes() == clean.tobytes()


def edit_metadata(array: Path, how: str) -> None:
    """Change (or delete) the array's zarr.json the ways a user or a sync tool does."""
    file = array / "zarr.json"
    if how == "deleted":
        file.unlink()
        return
    meta = json.loads(file.read_text())
    if how == "rows":
        meta["shape"][0] = 96
    elif how == "dtype":
        meta["data_type"] = "int32"
    elif how == "codec":  # a codec zarr-python does not register (numcodecs' pickle would run code): refused, not opened
        meta["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})
    else:  # one column fewer
        meta["shape"][1] -= 1
        meta["chunk_grid"]["configuration"]["chunk_shape"][1] -= 1
    file.write_text(json.dumps(meta))


METADATA = {"rows": "shape (96, 5) where the catalog records (108, 5)", "dtype": "data type int32 where the catalog records float32",
            "dim": "chunk shape (16, 4) where the catalog records (16, 5)", "deleted": "is missing",
            "codec": "names a codec 'numcodecs.pickle' that this zarr cannot decode"}
"""What the report says of each edit of :func:`edit_metadata`."""


@pytest.mark.parametrize("how", list(METADATA))
def test_a_zarr_json_that_disagrees_with_the_catalog_is_damage_that_repair_rewrites(a375, tmp_path, how):
    st, eid, clean = a375
    other = st.create_embedding("a375", model="other", params={}, dim=3, chunk_rows=64)  # verify goes on to it
    for c in range(other.n_chunks):
        other.write_chunk(c, np.ones((other.chunk_bounds(c)[1] - other.chunk_bounds(c)[0], 3), np.float32))
    other.finalize()
    array = st.embedding(eid).path
    edit_metadata(array, how)
    for reader in (st, Store(st.root)):  # st has read (and cached) it before the edit
        for rows in (None, [0, 100]):
            with pytest.raises(ArrayMetadataError) as info:
                reader.read_embedding(eid, rows=rows)
            assert info.value.embedding_id == eid and info.value.path == str(array / "zarr.json")
            for part in ("is damaged", METADATA[how], f"scdm verify --repair --embedding {eid}", "No data was returned"):
                assert part in str(info.value), part
    with pytest.raises(ArrayMetadataError):
        st.export_embedding(eid, tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()

    report = st.verify()
    first, second = report.embeddings
    assert not first.ok and second.ok and not report.ok
    assert METADATA[how] in first.metadata and str(array / "zarr.json") in first.metadata
    assert first.bad == () and first.checked == 7  # the chunks, read as the catalog says they were written, all match
    assert report.problems() == [first.metadata_line()] and "1 damaged array metadata file(s) in 1 embedding(s)" in report.summary()
    assert st.verify_embedding(eid) == []

    fixed = st.verify(eid, repair=True).embeddings[0]
    assert fixed.metadata_rewritten and not fixed.marked_pending
    assert st.verify().ok and st.embedding(eid).status == "complete"
    assert Store(st.root).read_embedding(eid).tobytes() == clean.tobytes()


@pytest.mark.parametrize("how", list(METADATA))
def test_rerunning_the_embedding_rewrites_a_damaged_zarr_json_without_recomputing(a375, how):
    st, eid, clean = a375
    edit_metadata(st.embedding(eid).path, how)
    for _ in range(2):  # once rewritten, it stays so: nothing is marked pending run after run
        again = pca(st)
        assert (again.embedding_id, again.computed_chunks) == (eid, 0)
        assert st.embedding(eid).status == "complete" and st.verify().ok
    assert Store(st.root).read_embedding(eid).tobytes() == clean.tobytes()


def test_a_writer_refuses_an_array_whose_zarr_json_disagrees_with_the_catalog(a375):
    st, eid, clean = a375
    st.mark_chunks_pending(eid, [BAD])
    emb = st.embedding(eid)
    edit_metadata(emb.path, "rows")
    lo, hi = emb.chunk_bounds(BAD)
    with pytest.raises(ArrayMetadataError, match=r"shape \(96, 5\)"):
        emb.write_chunk(BAD, clean[lo:hi])
    with pytest.raises(ArrayMetadataError, match=r"shape \(96, 5\)"):
        emb.target().write(BAD, clean[lo:hi])  # what a Ray worker writes with
    assert not chunk_file(st, eid).exists() and emb.missing_chunks() == [BAD]
    assert pca(st).computed_chunks == 1  # the resume path rewrites the file first
    assert st.read_embedding(eid).tobytes() == clean.tobytes()


def test_a_compressed_array_whose_zarr_json_is_lost_is_rewritten_and_its_chunks_recomputed(a375):
    st = a375[0]
    emb = st.create_embedding("a375", model="z", params={}, dim=8, chunk_rows=32, compressor="zstd")
    data = np.random.default_rng(0).standard_normal((108, 8)).astype(np.float32)
    for c in range(emb.n_chunks):
        emb.write_chunk(c, data[slice(*emb.chunk_bounds(c))])
    emb.finalize()
    edit_metadata(emb.path, "deleted")
    check = st.verify(emb.embedding_id, repair=True).embeddings[0]
    # the catalog does not record the compressor: the file is rewritten uncompressed, and the
    # compressed chunk files, which no longer match their checksums as read, go back to pending
    assert check.metadata_rewritten and check.bad_chunks == [0, 1, 2, 3] and check.marked_pending
    emb = st.embedding(emb.embedding_id)
    for c in emb.missing_chunks():
        emb.write_chunk(c, data[slice(*emb.chunk_bounds(c))])
    emb.finalize()
    np.testing.assert_array_equal(st.read_embedding(emb.embedding_id), data)


def leave_temporary(st: Store, eid: str, chunk: int) -> Path:
    """What a writer killed between writing a chunk's temporary file and renaming it leaves."""
    path = chunk_file(st, eid, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"0.{'ab' * 16}.partial")
    tmp.write_bytes(bytes(16 * 5 * 4))
    return tmp


def test_temporary_files_of_killed_writes_are_removed_once_no_job_writes_the_embedding(a375):
    st, eid, clean = a375
    st.mark_chunks_pending(eid, [BAD])  # a run was killed while writing this chunk
    emb = st.embedding(eid)
    with emb.job():  # a job writes the embedding: temporary files may be its own, live ones, so none is touched
        leftovers = [leave_temporary(st, eid, BAD), leave_temporary(st, eid, 5)]
        assert st.verify().embeddings[0].leftovers == ()
        assert st.verify(repair=True).embeddings[0].leftovers == ()
        with emb.job():  # a second job, started beside it
            pass
        assert all(p.exists() for p in leftovers)
    report = st.verify()  # no job any more: they are leftovers
    assert report.ok and report.embeddings[0].leftovers == tuple(map(str, leftovers))  # not damage: nothing reads them
    assert "2 temporary file(s) left by interrupted writes (`scdm verify --repair` deletes them)" in report.summary()
    assert pca(st).computed_chunks == 1  # the rerun's job starts alone: it removes them
    assert not any(p.exists() for p in leftovers) and st.read_embedding(eid).tobytes() == clean.tobytes()
    assert not list(emb.path.rglob("*.partial")) and st.verify().embeddings[0].leftovers == ()


def test_verify_repair_deletes_temporary_files_of_killed_writes(a375):
    st, eid, clean = a375
    leftover = leave_temporary(st, eid, 6)
    report = st.verify(repair=True)
    assert report.ok and report.embeddings[0].leftovers_removed and not leftover.exists()
    assert "1 temporary file(s) left by interrupted writes (deleted)" in report.summary()
    assert chunk_file(st, eid, 6).exists() and st.read_embedding(eid).tobytes() == clean.tobytes()
