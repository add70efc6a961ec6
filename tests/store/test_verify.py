"""Verified reads: a missing, truncated or altered chunk is an error naming it, and a rerun repairs it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from scdm.embedding.runner import embed_baseline
from scdm.store import EmbeddingIncompleteError, Store, _zarr, example_data
from scdm.store.errors import ChunkCorruptError, StoreDamagedError

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
