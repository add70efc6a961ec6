"""Chunk files written directly (``_zarr.RowWriter``) and read with a CRC-32 per piece (issue 19 point 3)."""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np
import pytest
import zarr

from scdm.store import _zarr
from scdm.store.errors import ArrayMetadataError, ChunkCorruptError

N, DIM, ROWS = 50, 12, 16  # 4 chunks, the last one (2 rows) an edge chunk


def _rows(lo: int, hi: int) -> np.ndarray:
    r = np.arange(lo, hi, dtype=np.float32)[:, None]
    return (r * 0.5 + np.arange(DIM, dtype=np.float32)[None, :]).astype(np.float32)


@pytest.fixture()
def array(tmp_path):
    location = tmp_path / "a.zarr"
    _zarr.create_array(location, n_rows=N, dim=DIM, dtype="float32", chunk_rows=ROWS)
    return location


def _write_all(location, zero_chunk: int | None = None) -> dict[int, str]:
    writer = _zarr.RowWriter(location)
    sums = {}
    for c, lo in enumerate(range(0, N, ROWS)):
        hi = min(lo + ROWS, N)
        block = np.zeros((hi - lo, DIM), np.float32) if c == zero_chunk else _rows(lo, hi)
        sums[c] = writer.write(lo, block)
    return sums


def test_chunks_written_directly_are_what_zarr_python_writes_and_reads(array, tmp_path):
    sums = _write_all(array, zero_chunk=1)
    expected = _rows(0, N)
    expected[ROWS:2 * ROWS] = 0
    assert np.array_equal(zarr.open_array(str(array), mode="r")[:], expected)  # any Zarr client reads it
    # byte for byte the chunk files zarr-python itself writes: padded edge chunk, no file for the all-zero chunk
    reference = tmp_path / "ref.zarr"
    _zarr.create_array(reference, n_rows=N, dim=DIM, dtype="float32", chunk_rows=ROWS)
    zarr.open_array(str(reference), mode="r+")[:] = expected
    for c in range(4):
        ours, theirs = array / "c" / str(c) / "0", reference / "c" / str(c) / "0"
        assert ours.exists() == theirs.exists() == (c != 1)
        if c != 1:
            assert ours.read_bytes() == theirs.read_bytes()
    assert not (array / "c" / "1").exists()
    assert not list(array.rglob("*.partial"))
    assert sums == {c: _zarr.chunk_checksum(expected[c * ROWS:(c + 1) * ROWS]) for c in range(4)}
    assert np.array_equal(_zarr.read_rows(array, checksums=sums), expected)


@pytest.mark.skipif(sys.platform != "linux", reason="fallocate is Linux's; elsewhere chunk files grow as they are written")
def test_a_chunk_file_is_reserved_in_one_go_before_it_is_written(tmp_path):
    """The libc binding works: the file has its size and its blocks before a byte is written (as np.save's files)."""
    path = tmp_path / "chunk"
    with open(path, "wb", buffering=0) as fh:
        _zarr._reserve(fh.fileno(), 3 << 20)
    assert path.stat().st_size == 3 << 20
    assert path.stat().st_blocks * 512 >= 3 << 20
    assert path.read_bytes() == bytes(3 << 20)  # reserved blocks read as zeros: the edge chunk's padding


def test_crc32_is_zlibs_whichever_implementation_runs():
    data = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    assert _zarr.chunk_checksum(data) == f"crc32:{zlib.crc32(data.tobytes()):08x}"
    assert _zarr._crc32(data[50:].tobytes(), _zarr._crc32(data[:50].tobytes())) == zlib.crc32(data.tobytes())


def test_an_interrupted_write_keeps_the_committed_chunk_and_leaves_no_partial_file(array, monkeypatch):
    sums = _write_all(array)
    before = (array / "c" / "0" / "0").read_bytes()
    monkeypatch.setattr(_zarr, "_WRITE_PIECE", 64)  # several pieces per chunk: fail after the first one

    calls = {"n": 0}
    real = _zarr._crc32

    def crash_on_second_piece(data, value=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(data, value)

    monkeypatch.setattr(_zarr, "_crc32", crash_on_second_piece)
    with pytest.raises(KeyboardInterrupt):
        _zarr.RowWriter(array).write(0, _rows(0, ROWS) + 1)
    assert (array / "c" / "0" / "0").read_bytes() == before
    assert not list(array.rglob("*.partial"))
    monkeypatch.setattr(_zarr, "_crc32", real)
    _zarr.forget_verified()
    assert np.array_equal(_zarr.read_rows(array, checksums=sums), _rows(0, N))


@pytest.mark.parametrize("piece", [64, 1 << 20])
def test_a_flipped_byte_is_caught_by_the_piecewise_crc(array, monkeypatch, piece):
    monkeypatch.setattr(_zarr, "_PIECE", piece)
    sums = _write_all(array)
    path = array / "c" / "2" / "0"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    _zarr.forget_verified()
    with pytest.raises(ChunkCorruptError, match="checksum mismatch") as err:
        _zarr.read_rows(array, checksums=sums)
    assert err.value.chunk == 2
    assert [e.chunk for e in _zarr.verify_chunks(array, sums)] == [2]
    # the unverified read still returns the bytes as stored; a verified one never does
    assert not np.array_equal(_zarr.read_rows(array), _rows(0, N))


def test_a_verified_read_is_remembered_until_the_file_changes(array):
    sums = _write_all(array)
    _zarr.forget_verified()
    assert np.array_equal(_zarr.read_rows(array, checksums=sums), _rows(0, N))
    assert len([k for k in _zarr._VERIFIED if k.startswith(str(array))]) == 4
    _zarr.RowWriter(array).write(16, _rows(16, 32) * 2)  # rewritten: a new file, not trusted any more
    with pytest.raises(ChunkCorruptError, match="chunk 1|Chunk 1"):
        _zarr.read_rows(array, checksums=sums)


SPEC = _zarr.ArraySpec(N, DIM, "float32", ROWS)
"""What the catalog records of :func:`array`."""


def _set_metadata(array, **fields) -> None:
    meta = json.loads((array / "zarr.json").read_text())
    meta.update(fields)
    (array / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [{"shape": [N - 2, DIM]}, {"data_type": "int32"}, "deleted"])
def test_reads_and_writes_given_the_catalogs_spec_refuse_a_zarr_json_that_disagrees(array, edit):
    sums = _write_all(array)
    assert _zarr.metadata_problem(array, SPEC) is None
    if edit == "deleted":
        (array / "zarr.json").unlink()
    else:
        _set_metadata(array, **edit)
    problem = _zarr.metadata_problem(array, SPEC)
    assert problem is not None and ("is missing" in problem if edit == "deleted" else "disagrees with the catalog" in problem)
    for attempt in (lambda: _zarr.read_rows(array, checksums=sums, spec=SPEC),
                    lambda: _zarr.read_rows(array, np.array([0, 40]), checksums=sums, spec=SPEC),
                    lambda: _zarr.RowWriter(array, spec=SPEC),
                    lambda: _zarr.open_array(array, SPEC)):
        with pytest.raises(ArrayMetadataError) as info:
            attempt()
        assert info.value.path == str(array / "zarr.json") and info.value.detail == problem
    assert _zarr.verify_chunks(array, sums, SPEC) == []  # judged in the catalog's layout, the chunks are intact
    _zarr.write_metadata(array, SPEC)
    assert _zarr.metadata_problem(array, SPEC) is None
    assert np.array_equal(_zarr.read_rows(array, checksums=sums, spec=SPEC), _rows(0, N))


def test_a_missing_zarr_json_is_store_damage_even_without_a_spec(array):
    _write_all(array)
    (array / "zarr.json").unlink()
    for attempt in (lambda: _zarr.read_rows(array), lambda: _zarr.RowWriter(array), lambda: _zarr.chunks_present(array, [0])):
        with pytest.raises(ArrayMetadataError, match="is missing"):
            attempt()
    _zarr.remove_chunk(array, 0)  # still works: the key scdm writes
    assert not (array / "c" / "0" / "0").exists()


def test_temporary_files_are_listed_and_removed_with_the_chunk_folders_they_leave_empty(array):
    _write_all(array)
    (array / "c" / "9").mkdir()
    stale = [array / "c" / "0" / "0.aa.partial", array / "c" / "9" / "0.bb.partial", array / "zarr.json.cc.partial"]
    for path in stale:
        path.write_bytes(b"x")
    assert _zarr.partial_files(array) == sorted(stale)
    assert _zarr.remove_partials(array) == sorted(stale)
    assert _zarr.partial_files(array) == [] and not (array / "c" / "9").exists()
    assert (array / "c" / "0" / "0").exists() and (array / "zarr.json").exists()
