"""Concurrent operations on one embedding: removal while a job writes, shared chunk claims,
claims of killed processes, and the leftovers of a removal that raced a writer."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scdm.store import EmbeddingIncompleteError, EmbeddingNotFoundError, InputDataError, Store, _claims
from scdm.store._store import ChunkRecord, ChunkWriter
from scdm.store.errors import EmbeddingBusyError
from tests.store import _job_proc, _writer
from tests.store.conftest import make_counts_adata

JOB = Path(_job_proc.__file__)


@pytest.fixture()
def st(tmp_path) -> Store:
    st = Store(tmp_path / "s")
    st.ingest(make_counts_adata(n_cells=60), name="d")  # 8 chunks of 8 rows (the last one 4)
    return st


def _start(st: Store, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(JOB), str(st.root), "d", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _fill(emb) -> None:
    with emb.writer() as w:
        for c in emb.missing_chunks():
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))


@contextlib.contextmanager
def _unguarded_removal(monkeypatch):
    """Removal that ignores running jobs, as an older scdm (or a hand-made DELETE) would do."""
    monkeypatch.setattr(_claims, "exclusive", lambda *a, **k: contextlib.nullcontext())
    yield
    monkeypatch.undo()


def test_rm_is_refused_while_another_process_writes(st):
    emb = _writer.open_embedding(str(st.root), "d")
    proc = _start(st, "hold", "60")
    try:
        with pytest.raises(EmbeddingBusyError, match=f"pid {proc.pid} on {platform.node()} since .*kill PID") as err:
            st.remove_embedding(emb.embedding_id)
        assert [w.pid for w in err.value.writers] == [proc.pid]
        assert [w.pid for w in st.writing_jobs(emb.embedding_id)] == [proc.pid]
        with pytest.raises(EmbeddingBusyError, match=f"pid {proc.pid}"):
            st.remove_dataset("d")
        assert st.embedding(emb.embedding_id).status == "pending" and len(st.datasets()) == 1  # nothing removed
        assert _writer.open_embedding(str(st.root), "d").path.is_dir()
    finally:
        _stop(proc)
    assert st.writing_jobs(emb.embedding_id) == []  # the killed job holds nothing
    st.remove_embedding(emb.embedding_id)
    assert st.embeddings().empty and not emb.path.exists()
    assert not _claims.claims_folder(st.root, emb.embedding_id).exists()


def test_rm_waits_for_a_job_when_asked(st):
    from click.testing import CliRunner

    from scdm.cli import main

    emb = _writer.open_embedding(str(st.root), "d")
    proc = _start(st, "hold", "1")
    out = CliRunner().invoke(main, ["--store", str(st.root), "rm", "--embedding", emb.embedding_id])
    assert out.exit_code == 1 and f"pid {proc.pid}" in out.output and "--wait SECONDS" in out.output
    t0 = time.monotonic()
    out = CliRunner().invoke(main, ["--store", str(st.root), "rm", "--embedding", emb.embedding_id, "--wait", "30"])
    assert out.exit_code == 0, out.output
    assert time.monotonic() - t0 > 0.2 and proc.wait(timeout=30) == 0
    assert st.embeddings().empty


def test_rm_is_refused_while_a_writer_here_is_open(st):
    emb = _writer.open_embedding(str(st.root), "d")
    with emb.writer() as w:
        w.write(0, _writer.rows_of(0, 8))
        with pytest.raises(EmbeddingBusyError, match=f"pid {os.getpid()}"):
            st.remove_embedding(emb.embedding_id)
    st.remove_embedding(emb.embedding_id)  # the writer is closed: nothing holds it now


def test_two_processes_share_the_chunks_each_computed_once(st, tmp_path):
    go = tmp_path / "go"
    env = {"SCDM_TEST_GO": str(go)}
    procs = [_start(st, "share", "0.15", env=env) for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    done = [json.loads(out.splitlines()[-1]) for out in outs]
    assert all(done) and sorted(done[0] + done[1]) == list(range(8))  # each chunk once, both took part
    emb = _writer.open_embedding(str(st.root), "d")
    emb.finalize()
    assert np.array_equal(st.read_embedding(emb.embedding_id), _writer.rows_of(0, 60))


def test_a_killed_claimer_does_not_block_its_chunk(st):
    emb = _writer.open_embedding(str(st.root), "d")
    proc = _start(st, "claim", "3", "60")
    with emb.job() as job:
        assert not job.claim(3)
        assert f"pid {proc.pid}" in job.holder(3)
        assert job.claim(4)  # other chunks are free
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert job.claim(3) and job.holder(3) is None


def test_waiting_for_chunks_of_a_killed_process_takes_them_over(st):
    emb = _writer.open_embedding(str(st.root), "d")
    proc = _start(st, "claim", "5", "60")
    try:
        with emb.writer() as w:
            elsewhere = []
            for c in emb.missing_chunks():
                if w.claim(c):
                    w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
                else:
                    elsewhere.append(c)
            assert elsewhere == [5]
            killer = subprocess.Popen([sys.executable, "-c", f"import os, signal, time; time.sleep(0.5); os.kill({proc.pid}, signal.SIGKILL)"])
            assert w.wait_for(elsewhere) == [5]  # blocks until the claimer is gone
            w.write(5, _writer.rows_of(*emb.chunk_bounds(5)))
            killer.wait(timeout=30)
    finally:
        _stop(proc)
    emb.finalize()
    assert np.array_equal(st.read_embedding(emb.embedding_id), _writer.rows_of(0, 60))


def test_a_chunk_committed_by_another_process_is_not_claimed(st):
    emb = _writer.open_embedding(str(st.root), "d")
    with emb.job() as job:
        emb.write_chunk(2, _writer.rows_of(16, 24))  # another writer (its own job) commits chunk 2
        assert not job.claim(2)
        assert job.wait_for([2]) == []


def test_a_writer_whose_embedding_was_removed_stops_without_orphans(st, monkeypatch):
    emb = _writer.open_embedding(str(st.root), "d")
    writer = emb.writer()
    writer.write(0, _writer.rows_of(0, 8))
    writer.commit()
    with _unguarded_removal(monkeypatch):
        st.remove_embedding(emb.embedding_id)
    with pytest.raises(EmbeddingNotFoundError, match="was removed"):
        writer.write(1, _writer.rows_of(8, 16))
    with pytest.raises(EmbeddingNotFoundError, match="was removed"):
        writer.__exit__(None, None, None)
    with pytest.raises(EmbeddingNotFoundError, match="was removed"):
        emb.commit_chunks([ChunkRecord(2, 8, "crc32:00000000")])  # what a Ray worker reports
    with pytest.raises(EmbeddingNotFoundError, match="was removed"):
        emb.finalize()
    with pytest.raises(EmbeddingNotFoundError, match="was removed"):
        emb.job()
    assert st.query("SELECT count(*) AS n FROM embedding_chunks")["n"].item() == 0  # no orphan rows


def test_create_replaces_the_leftovers_of_a_raced_removal(st, monkeypatch):
    emb = _writer.open_embedding(str(st.root), "d")
    _fill(emb)
    with _unguarded_removal(monkeypatch):
        st.remove_embedding(emb.embedding_id)
    # what a writer racing an old `scdm rm` left: chunk files without zarr.json, orphan chunk rows
    (emb.path / "c" / "1").mkdir(parents=True)
    (emb.path / "c" / "1" / "0").write_bytes(b"\x00" * 16)
    st.catalog.execute("INSERT INTO embedding_chunks (embedding_id, chunk, n_rows, checksum, seconds, written_at) VALUES (?, 1, 8, 'crc32:00000000', NULL, now())", [emb.embedding_id])
    again = _writer.open_embedding(str(st.root), "d")
    assert again.embedding_id == emb.embedding_id
    assert again.missing_chunks() == list(range(8))  # the orphan row counts for nothing
    assert (again.path / "zarr.json").is_file() and not (again.path / "c").exists()
    _fill(again)
    again.finalize()
    assert np.array_equal(st.read_embedding(again.embedding_id), _writer.rows_of(0, 60))


def test_a_deleted_array_folder_is_started_again(st):
    emb = _writer.open_embedding(str(st.root), "d")
    for c in (0, 1, 2):
        emb.write_chunk(c, _writer.rows_of(*emb.chunk_bounds(c)))
    shutil.rmtree(emb.path)
    again = _writer.open_embedding(str(st.root), "d")
    assert again.missing_chunks() == list(range(8)) and (again.path / "zarr.json").is_file()


def test_finalize_refuses_chunks_whose_data_is_gone(st):
    emb = _writer.open_embedding(str(st.root), "d")
    _fill(emb)
    (emb.path / "c" / "2" / "0").unlink()
    with pytest.raises(EmbeddingIncompleteError, match=r"chunks \[2\] are committed but their data is not in the array"):
        emb.finalize()
    assert emb.missing_chunks() == [2] and emb.status == "pending"
    emb.write_chunk(2, _writer.rows_of(16, 24))
    emb.finalize()
    assert emb.status == "complete"


def test_writer_finalize_commits_the_last_rows_and_the_mark_in_one_transaction(st, monkeypatch):
    emb = _writer.open_embedding(str(st.root), "d")
    opened = []
    real = type(st.catalog).transaction
    with emb.writer(commit_every_s=3600) as w:  # no commit on the way: every row waits for finalize
        for c in emb.missing_chunks():
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
        monkeypatch.setattr(type(st.catalog), "transaction", lambda self: opened.append(1) or real(self))
        w.finalize(telemetry={"cells": 60}, audit={"note": "x"})
        with pytest.raises(ValueError, match="was finalized; write chunks before finalize"):
            w.write(0, _writer.rows_of(0, 8))
    assert len(opened) == 1  # leaving the with block commits nothing more
    assert emb.status == "complete" and emb.missing_chunks() == []
    row = st.query("SELECT telemetry, audit FROM embeddings WHERE embedding_id = ?", [emb.embedding_id]).iloc[0]
    assert json.loads(row["telemetry"]) == {"cells": 60} and json.loads(row["audit"]) == {"note": "x"}
    assert np.array_equal(st.read_embedding(emb.embedding_id), _writer.rows_of(0, 60))
    assert not _claims.claims_folder(st.root, emb.embedding_id).exists()


def test_writer_finalize_commits_what_was_written_before_it_refuses(st):
    emb = _writer.open_embedding(str(st.root), "d")
    with emb.writer(commit_every_s=3600) as w:
        for c in range(6):
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
        with pytest.raises(EmbeddingIncompleteError, match=r"still misses chunks \[6, 7\]"):
            w.finalize()
    assert emb.missing_chunks() == [6, 7] and emb.status == "pending"  # the six rows were committed all the same
    with emb.writer() as w:
        (emb.path / "c" / "1" / "0").unlink()  # committed, data gone: dropped, the rows written here kept
        for c in (6, 7):
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
        with pytest.raises(EmbeddingIncompleteError, match=r"chunks \[1\] are committed but their data is not in the array"):
            w.finalize()
        assert emb.missing_chunks() == [1]
        w.write(1, _writer.rows_of(8, 16))  # not finalized: the writer goes on
        w.finalize()
    assert emb.status == "complete" and np.array_equal(st.read_embedding(emb.embedding_id), _writer.rows_of(0, 60))


def test_writer_finalize_raises_a_failed_write_after_committing_the_others(st, monkeypatch):
    emb = _writer.open_embedding(str(st.root), "d")
    real = ChunkWriter._write_file

    def slow_last(self, chunk, lo, block):
        if chunk == 7:
            time.sleep(0.3)  # still in flight when finalize starts: its drain meets the failure
        return real(self, chunk, lo, block)

    monkeypatch.setattr(ChunkWriter, "_write_file", slow_last)
    with emb.writer(commit_every_s=3600) as w:
        for c in range(8):
            block = _writer.rows_of(*emb.chunk_bounds(c))
            if c == 7:
                block[0, 0] = np.nan
            w.write(c, block)
        with pytest.raises(InputDataError, match="Chunk 7 of embedding .* holds NaN or inf"):
            w.finalize()
    assert emb.missing_chunks() == [7] and emb.status == "pending"


def test_an_all_zero_chunk_needs_no_file(st):
    emb = _writer.open_embedding(str(st.root), "d")
    with emb.writer() as w:
        for c in emb.missing_chunks():
            w.write(c, np.zeros((emb.chunk_bounds(c)[1] - emb.chunk_bounds(c)[0], emb.dim), np.float32) if c == 3 else _writer.rows_of(*emb.chunk_bounds(c)))
    assert not (emb.path / "c" / "3").exists()  # zarr writes no chunk equal to the fill value
    emb.finalize()
    assert not st.read_embedding(emb.embedding_id)[24:32].any()


@pytest.mark.parametrize("bad", [{"chunk_rows": 0}, {"chunk_rows": -5}, {"chunk_rows": 2.5}, {"chunk_rows": True}, {"dim": 0}])
def test_invalid_sizes_create_nothing(st, bad):
    kw = {"dim": 4, **bad}
    with pytest.raises(InputDataError, match=f"{next(iter(bad))} must be an integer >= 1"):
        st.create_embedding("d", model="m", params={}, **kw)
    assert st.embeddings().empty
    assert list((st.root / "embeddings").iterdir()) == [] and not (st.root / _claims.CLAIMS_DIR).exists()


def test_a_job_leaves_no_lock_files_behind(st):
    emb = _writer.open_embedding(str(st.root), "d")
    _fill(emb)
    emb.finalize()
    assert not _claims.claims_folder(st.root, emb.embedding_id).exists()


def test_remove_dataset_removes_all_of_it_and_it_can_come_back(tmp_path):
    st = Store(tmp_path / "s2")
    adata = make_counts_adata(n_cells=60)
    st.ingest(adata, name="d", label_key="label")
    emb = _writer.open_embedding(str(st.root), "d")
    _fill(emb)
    emb.finalize()
    assert st.remove_dataset("d") == [emb.embedding_id]
    for table in ("datasets", "cells", "genes", "label_sets", "cell_labels", "embeddings", "embedding_chunks"):
        assert st.query(f"SELECT count(*) AS n FROM {table}")["n"].item() == 0, table
    assert not emb.path.exists() and list((st.root / "datasets").iterdir()) == []
    st.ingest(adata, name="d", label_key="label")
    assert len(st.query("SELECT * FROM label_sets")) == 1


def _no_catalog(store: Store, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the read looked in the catalog")

    monkeypatch.setattr(store, "query", refuse)
    monkeypatch.setattr(store.catalog, "connect", refuse)


@pytest.mark.parametrize("how", ["writer", "embedding"])
def test_the_first_read_after_finalize_needs_no_catalog_and_still_verifies(st, monkeypatch, how):
    """The finalize transaction tells its store the checksums: the next read opens no catalog
    connection (reopening one after a write costs ~20 ms), yet every chunk is hashed."""
    from scdm.store import ChunkCorruptError, _zarr

    emb = _writer.open_embedding(str(st.root), "d")
    with emb.writer(commit_every_s=3600) as w:
        for c in emb.missing_chunks():
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
        if how == "writer":
            w.finalize()
    if how == "embedding":
        emb.finalize()
    with monkeypatch.context() as m:
        _no_catalog(emb.store, m)
        _zarr.forget_verified()  # as in a read that has not hashed these chunks yet
        assert np.array_equal(emb.store.read_embedding(emb.embedding_id), _writer.rows_of(0, 60))
        raw = (emb.path / "c" / "3" / "0").read_bytes()
        flipped = bytes([raw[0] ^ 1]) + raw[1:]  # the same size: only the checksum can tell
        (emb.path / "c" / "3" / "0").write_bytes(flipped)
        _zarr.forget_verified()
        # a mismatch first looks in the catalog once more (another process may have recomputed the chunk)
        with pytest.raises(AssertionError, match="looked in the catalog"):
            emb.store.read_embedding(emb.embedding_id)
    with pytest.raises(ChunkCorruptError, match="chunk 3 of 8 .* checksum mismatch"):
        emb.store.read_embedding(emb.embedding_id)


def test_a_refused_finalize_leaves_the_store_nothing_to_read(st):
    emb = _writer.open_embedding(str(st.root), "d")
    with emb.writer(commit_every_s=3600) as w:
        for c in range(6):
            w.write(c, _writer.rows_of(*emb.chunk_bounds(c)))
        with pytest.raises(EmbeddingIncompleteError, match="still misses chunks"):
            w.finalize()
    with pytest.raises(EmbeddingIncompleteError, match="is incomplete: 6 of 8 chunks written"):
        emb.store.read_embedding(emb.embedding_id)
