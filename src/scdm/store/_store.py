"""The :class:`Store`: one directory holding the DuckDB catalog and the Zarr embedding arrays."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store import _claims, _ingest, _zarr, labels
from scdm.store import leftovers as _leftovers
from scdm.store import splits as _splits
from scdm.store import verify as _verify
from scdm.store._catalog import Catalog, registered
from scdm.store._constants import (
    ARTIFACTS_DIR,
    CATALOG_FILE,
    DATASETS_DIR,
    DEFAULT_STORE,
    EMBEDDINGS_DIR,
    ENV_STORE,
    LOCK_RETRY_SECONDS,
)
from scdm.store.errors import (
    ArrayMetadataError,
    ChunkCorruptError,
    DatasetFileChangedError,
    DatasetNotFoundError,
    EmbeddingBusyError,
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
    ScdmError,
    StoreDamagedError,
    StoreFormatError,
    StoreReadOnlyError,
)
from scdm.store.genes import gene_table_note_sql
from scdm.store.warning_scopes import ignoring, in_context
from scdm.store.wording import offers, option

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["Store", "StoreLike", "DatasetInfo", "Embedding", "EmbeddingJob", "ChunkTarget", "ChunkRecord", "open_store", "default_store_path", "space_id_of"]

logger = logging.getLogger(__name__)

StoreLike = "str | os.PathLike[str] | Store"


def _scdm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


def default_store_path() -> Path:
    """``$SCDM_STORE`` if set, else ``./scdm-store``."""
    return Path(os.environ.get(ENV_STORE) or DEFAULT_STORE)


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: equal settings give equal text (and equal hashes)."""
    return _canonical_json(obj)


def _token_lengths_json(counts: dict[int, int] | None) -> str | None:
    """A chunk's cells per token length as its catalog row keeps them (lengths in ascending order)."""
    return None if counts is None else json.dumps({str(int(k)): int(v) for k, v in sorted(counts.items())})


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _checkpoint_source(telemetry: Any) -> str | None:
    """``org/name@commit`` or the local folder, from an embedding's telemetry JSON (None when it records none)."""
    try:
        source = json.loads(telemetry).get("checkpoint") if isinstance(telemetry, str) else None
    except (ValueError, AttributeError):
        return None
    if not isinstance(source, dict):
        return None
    if source.get("hub_id"):
        return f"{source['hub_id']}@{source.get('commit') or source.get('revision')}"
    return str(source["path"]) if source.get("path") else None


_PLAIN_ID = re.compile(r"[0-9A-Za-z_-]+")


def _foreign_array_path(embedding_id: str, array_path: str) -> bool:
    """Whether a catalog row's array path is none scdm writes (``embeddings/<id>.zarr`` in the store, ``<arrays_url>/<id>.zarr``).

    A shared catalog may be edited by anyone who may write it: a row naming ``../thesis`` or
    ``/home/someone`` must not make scdm delete (or refill) that folder with the permissions of
    whoever removes or repairs the embedding.
    """
    name = f"{embedding_id}.zarr"
    if not _PLAIN_ID.fullmatch(embedding_id):
        return True
    if "://" in array_path:
        from urllib.parse import urlparse

        parts = urlparse(array_path).path.split("/")
        return parts[-1] != name or ".." in parts
    return array_path != f"{EMBEDDINGS_DIR}/{name}"


def _refuse_foreign_array(emb: Embedding) -> None:
    """Refuse to write to (or repair, or renew) an array at a path scdm never writes (:func:`_foreign_array_path`)."""
    if _foreign_array_path(emb.embedding_id, emb.array_path):
        msg = (f"Embedding {emb.embedding_id}'s catalog row names the array {emb.array_path!r}, where scdm never "
               f"writes one ({EMBEDDINGS_DIR}/{emb.embedding_id}.zarr): someone edited the catalog. Nothing was "
               f"removed or written there. Remove the embedding (scdm rm --embedding {emb.embedding_id}) and embed again.")
        raise StoreDamagedError(msg)


def _short_hash(*parts: Any, n: int = 16) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(_canonical_json(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:n]


def space_id_of(model: str, checkpoint_hash: str | None, adapter_hash: str | None, variant: str, params: dict[str, Any]) -> str:
    """Identity of an embedding space: vectors with equal space ids are comparable across datasets."""
    return _short_hash("space", model, checkpoint_hash, adapter_hash, variant, params)


@dataclass(frozen=True)
class DatasetInfo:
    """One ingested dataset, as recorded in the catalog."""

    dataset_id: str
    """First 16 hex digits of the content hash."""
    name: str
    """Unique name in the store (defaults to the file stem)."""
    content_hash: str
    """blake2b of expression matrix, gene ids and cell ids."""
    n_cells: int
    n_genes: int
    gene_id_kind: str
    """symbol | ensembl | entrez."""
    x_kind: str
    """counts | normalized | scaled."""
    x_format: str
    source_path: str | None
    stored_path: str
    """Copy of the data inside the store, relative to its root."""
    options: dict[str, Any]
    created: bool = False
    """True when this call ingested it; False when it was already in the store."""
    label_set: str | None = None
    """The label set this call read labels into (or found already stored); None without --label-key."""
    label_set_created: bool = False
    """True when this call added that label set (a new dataset's first, or another one of a stored matrix)."""


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk whose rows are written to the array, waiting to be committed in the catalog."""

    chunk: int
    n_rows: int
    checksum: str
    """:func:`store._zarr.chunk_checksum` of the rows as stored."""
    seconds: float | None = None
    """Time spent computing the chunk (telemetry)."""
    token_lengths: dict[int, int] | None = None
    """Cells of the chunk per token length (the audit's tokens_per_cell_* sum them over all chunks); None when not tokenised."""


@dataclass(frozen=True)
class ChunkTarget:
    """Where and how one embedding's chunks are written, without the catalog.

    A plain picklable value: a worker on another machine writes chunk data with it and reports a
    :class:`ChunkRecord`; the process that owns the catalog commits it with
    :meth:`Embedding.commit_chunks`. Workers never open the catalog.
    """

    embedding_id: str
    location: str
    """Absolute local path or URL of the Zarr array."""
    n_cells: int
    dim: int
    dtype: str
    chunk_rows: int
    n_chunks: int

    def exists(self) -> bool:
        """Whether the array is where the target says (workers check before writing)."""
        return _zarr.array_exists(self.location)

    @property
    def spec(self) -> _zarr.ArraySpec:
        """What the catalog records of the array: its ``zarr.json`` must say the same."""
        return _zarr.ArraySpec(self.n_cells, self.dim, self.dtype, self.chunk_rows)

    def open_array(self) -> Any:
        """The Zarr array, opened for writing chunks (pass it to :meth:`write` as ``array``).

        Raises
        ------
        ArrayMetadataError
            Its ``zarr.json`` is missing or disagrees with the catalog (nothing can be written).
        """
        return _zarr.open_array(self.location, self.spec)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last row of ``chunk``."""
        if not 0 <= chunk < self.n_chunks:
            msg = f"Chunk {chunk} is out of range: embedding {self.embedding_id} has chunks 0..{self.n_chunks - 1}."
            raise IndexError(msg)
        lo = chunk * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self.n_cells)

    def checked_block(self, chunk: int, block: np.ndarray) -> tuple[int, np.ndarray]:
        """(first row, block in the stored dtype); refuses a wrong shape.

        The values are checked by :meth:`write_rows`, piece by piece while the bytes are in cache
        (after the cast: a float64 beyond the stored dtype's range is inf there, and refused).
        """
        lo, hi = self.chunk_bounds(chunk)
        block = np.asarray(block)
        if block.shape != (hi - lo, self.dim):
            msg = f"Chunk {chunk} needs an array of shape ({hi - lo}, {self.dim}); got {block.shape}."
            raise InputDataError(msg)
        return lo, block.astype(self.dtype, copy=False)

    def non_finite_error(self, chunk: int) -> InputDataError:
        """The error for a chunk whose values (in the stored dtype) hold NaN or inf."""
        msg = (f"Chunk {chunk} of embedding {self.embedding_id} holds NaN or inf (in {self.dtype}); refusing to store it "
               "(the model diverged? try --precision fp32).")
        return InputDataError(msg)

    def write_rows(self, chunk: int, lo: int, block: np.ndarray, rows: _zarr.RowWriter) -> str:
        """Write a block from :meth:`checked_block` through ``rows``; its checksum.

        NaN or inf is refused here, on the way to disk, and nothing of that chunk is written.
        """
        try:
            return rows.write(lo, block, check_finite=True)
        except _zarr.NonFiniteError:
            raise self.non_finite_error(chunk) from None

    def write(self, chunk: int, block: np.ndarray, *, seconds: float | None = None, array: Any = None,
              token_lengths: dict[int, int] | None = None) -> ChunkRecord:
        """Write one chunk's rows to the array (not the catalog) and return the record to commit.

        ``array`` is an already open :func:`store._zarr.open_array` of this target (saves reopening it
        for every chunk). ``token_lengths``: cells per token length, kept in the chunk's row.
        """
        lo, block = self.checked_block(chunk, block)
        checksum = self.write_rows(chunk, lo, block, _zarr.RowWriter(self.location, array, self.spec))
        return ChunkRecord(chunk, int(block.shape[0]), checksum, seconds, token_lengths)

    def stored_checksum(self, chunk: int) -> str | None:
        """Checksum of the chunk's rows as they are stored now (None when its chunk data is absent)."""
        lo, hi = self.chunk_bounds(chunk)
        if not _zarr.chunk_present(self.location, chunk):
            return None
        block = _zarr.read_rows(self.location, np.arange(lo, hi), out_dtype=self.dtype, spec=self.spec)
        return _zarr.chunk_checksum(block)


@dataclass(frozen=True)
class Embedding:
    """Handle on one embedding in a store: write chunks, list what is missing, finalize."""

    store: Store
    embedding_id: str
    dataset_id: str
    space_id: str
    model: str
    variant: str
    dim: int
    dtype: str
    n_cells: int
    chunk_rows: int
    n_chunks: int
    array_path: str
    params: dict[str, Any]

    @property
    def location(self) -> str:
        """The array's absolute local path, or its URL (``array_path`` records either)."""
        if "://" in self.array_path:
            return self.array_path
        return str((self.store.root / self.array_path).absolute())  # workers may run elsewhere: never relative

    @property
    def path(self) -> Path:
        """The array's local path (``file://`` URLs included); remote arrays have only :attr:`location`."""
        path = _zarr.local_path(self.location)
        if path is None:
            msg = f"Embedding {self.embedding_id} lives at {self.array_path!r}, not on a local path; use Embedding.location."
            raise StoreFormatError(msg)
        return path

    def target(self) -> ChunkTarget:
        """A catalog-free, picklable description for writing this embedding's chunks elsewhere."""
        return ChunkTarget(self.embedding_id, self.location, self.n_cells, self.dim, self.dtype, self.chunk_rows, self.n_chunks)

    @property
    def spec(self) -> _zarr.ArraySpec:
        """What the catalog records of the array: reads, verification and writes check its ``zarr.json`` against it."""
        return self.target().spec

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last row of ``chunk``."""
        return self.target().chunk_bounds(chunk)

    def written_chunks(self) -> list[int]:
        frame = self.store.catalog.query(
            "SELECT chunk FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk", [self.embedding_id]
        )
        return frame["chunk"].astype(int).tolist()

    def chunk_token_lengths(self) -> dict[int, dict[int, int] | None]:
        """Committed chunk -> its cells per token length (None for a chunk written without them: baselines, older scdm)."""
        frame = self.store.catalog.query(
            "SELECT chunk, token_lengths FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk", [self.embedding_id]
        )
        return {int(c): None if not isinstance(raw, str) else {int(k): int(v) for k, v in json.loads(raw).items()}
                for c, raw in zip(frame["chunk"], frame["token_lengths"], strict=True)}

    def missing_chunks(self) -> list[int]:
        """Chunks not yet committed, in order (a rerun writes exactly these)."""
        done = set(self.written_chunks())
        return [c for c in range(self.n_chunks) if c not in done]

    def write_chunk(self, chunk: int, block: np.ndarray, *, seconds: float | None = None) -> None:
        """Write one chunk's rows, flush, then commit its catalog row (in that order).

        A chunk written twice (two workers, or a retry) is harmless: the data is identical and the
        catalog row is replaced.
        """
        with self.writer() as w:
            w.write(chunk, block, seconds=seconds)

    def writer(self, *, commit_every_s: float = 1.0, job: EmbeddingJob | None = None) -> ChunkWriter:
        """A writer that flushes each chunk's data at once but commits catalog rows in batches.

        Use it for long jobs: one catalog commit costs tens of milliseconds, so committing every
        chunk would dominate writing. A chunk still counts only after its data is on disk and its
        row committed; a crash loses at most the last ``commit_every_s`` seconds of chunks.

        The writer runs inside ``job`` (see :meth:`job`), or in a job of its own that ends with it:
        while it is open, removing the embedding is refused.
        """
        return ChunkWriter(self, commit_every_s=commit_every_s, job=job)

    def job(self, *, wait_s: float = LOCK_RETRY_SECONDS) -> EmbeddingJob:
        """Announce that this process writes the embedding, until the job is closed.

        While any job is open, :meth:`Store.remove_embedding` refuses to remove the embedding
        (naming the job). A job claims chunks before computing them (:meth:`EmbeddingJob.claim`),
        so that several processes asked for the same embedding share its chunks. ``wait_s``: how
        long to wait while another process creates or removes the embedding.

        Raises
        ------
        EmbeddingNotFoundError
            The embedding was removed before the job started.
        """
        return EmbeddingJob(self, wait_s=wait_s)

    def commit_chunks(self, records: Sequence[ChunkRecord]) -> list[int]:
        """Commit chunks whose data another process wrote (see :meth:`target`); idempotent.

        A chunk already committed with the same checksum is left alone, so a chunk is never
        committed twice. One committed with another checksum was overwritten since (a second job
        on the same embedding, or non-deterministic GPU kernels): its row takes the new checksum,
        which is what the array now holds, and a warning says so.

        Returns
        -------
        list of int
            The chunks this call committed (new or changed rows).

        Raises
        ------
        EmbeddingNotFoundError
            The embedding was removed meanwhile: nothing is committed.
        """
        if not records:
            return []
        chunks = [int(r.chunk) for r in records]
        with self.store.catalog.transaction() as con:
            _require_row(con, self.embedding_id)
            have = dict(con.execute(
                "SELECT chunk, checksum FROM embedding_chunks WHERE embedding_id = ? AND list_contains(?, chunk)",
                [self.embedding_id, chunks],
            ).fetchall())
            fresh = [r for r in records if have.get(r.chunk) != r.checksum]
            if not fresh:
                return []
            Catalog.insert_rows(con, "embedding_chunks", CHUNK_COLUMNS,
                                [(self.embedding_id, r.chunk, r.n_rows, r.checksum, r.seconds, _token_lengths_json(r.token_lengths))
                                 for r in fresh],
                                verb="INSERT OR REPLACE", computed={"written_at": "now()"})
        for r in fresh:
            if r.chunk in have:
                logger.warning("chunk %d of embedding %s was committed before with checksum %s; the array now holds %s",
                               r.chunk, self.embedding_id, have[r.chunk], r.checksum)
        return [r.chunk for r in fresh]

    def finalize(self, *, telemetry: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> None:
        """Mark complete once every chunk is committed and its data is in the array.

        A committed chunk whose chunk file is gone (deleted by hand, a half-removed array) is not
        complete: its row is dropped, so that running the job again recomputes exactly that chunk,
        and this raises. Everything is checked and marked in one catalog transaction (one commit
        costs tens of milliseconds; a chunk dropped by a repair elsewhere cannot slip in between).
        A job that writes through :meth:`writer` can call :meth:`ChunkWriter.finalize` instead: the
        rows of its last chunks and the mark then share that one transaction.

        Raises
        ------
        EmbeddingIncompleteError
            A chunk is not committed, or its data is absent from the array.
        EmbeddingNotFoundError
            The embedding was removed meanwhile.
        """
        with self.store.catalog.transaction() as con:
            refused, sums = self._finalize_in(con, telemetry, audit)
        self._after_finalize(refused, sums)

    def _finalize_in(self, con: Any, telemetry: dict[str, Any] | None,
                     audit: dict[str, Any] | None) -> tuple[EmbeddingIncompleteError | None, dict[int, str]]:
        """Inside a write transaction: check and mark complete.

        Returns the error to raise once the transaction is committed (None on success) and the
        checksum of every committed chunk (empty unless marked complete). The error is returned
        rather than raised, so that what the transaction did (rows committed beside it, the rows of
        chunks without data dropped) is committed before the caller raises it.
        """
        if con.execute("SELECT 1 FROM embeddings WHERE embedding_id = ?", [self.embedding_id]).fetchone() is None:
            raise _removed_error(self.embedding_id, "before it was finalized")
        committed = con.execute("SELECT chunk, n_rows, checksum FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk",
                                [self.embedding_id]).fetchall()
        done = {int(c) for c, _, _ in committed}
        missing = [c for c in range(self.n_chunks) if c not in done]
        if missing:
            return EmbeddingIncompleteError(f"Embedding {self.embedding_id} still misses chunks {_some(missing)}; write them before finalize()."), {}
        absent = self._chunks_without_data(committed)
        if absent:
            # committed, so that the rerun sees exactly these chunks missing; the error follows the commit
            con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ? AND list_contains(?, chunk)", [self.embedding_id, absent])
            con.execute("UPDATE embeddings SET status = 'pending', completed_at = NULL WHERE embedding_id = ?", [self.embedding_id])
            return EmbeddingIncompleteError(
                f"Embedding {self.embedding_id} is not complete: chunks {_some(absent)} are committed but their data is not in "
                f"the array at {self.location}. They are marked missing again; run the same command again to recompute them."), {}
        con.execute(
            "UPDATE embeddings SET status = 'complete', completed_at = now(), telemetry = ?, "
            "audit = COALESCE(?, audit) WHERE embedding_id = ?",
            [_canonical_json(telemetry or {}), _canonical_json(audit) if audit is not None else None, self.embedding_id],
        )
        return None, {int(c): str(k) for c, _, k in committed}

    def _after_finalize(self, refused: BaseException | None, sums: dict[int, str]) -> None:
        """Once the finalize transaction is committed: raise its error, or let the store read without a look-up.

        The store learns the complete embedding and every chunk's checksum from the transaction
        that marked it complete, so this process's first read of it needs no catalog connection
        (after a write, reopening the catalog costs ~20 ms: DuckDB's open, then the look-ups).
        The chunks are still verified against those checksums as they are read.
        """
        if refused is not None:
            raise refused
        self.store._remember_complete(self, sums)

    def _chunks_without_data(self, committed: Sequence[tuple[int, int, str]]) -> list[int]:
        """Of the ``(chunk, n_rows, checksum)`` rows committed, the chunks whose chunk file is absent.

        An all-zero chunk legitimately has none (zarr does not store a chunk equal to the fill value).
        """
        if not _array_whole(self.location):
            return list(range(self.n_chunks))
        present = _zarr.chunks_present(self.location, [int(c) for c, _, _ in committed])
        absent = []
        for (chunk, n_rows, checksum), here in zip(committed, present):
            if not here and checksum != _zarr.chunk_checksum(np.zeros((int(n_rows), self.dim), dtype=self.dtype)):
                absent.append(int(chunk))
        return absent

    def set_audit(self, audit: dict[str, Any]) -> None:
        self.store.catalog.execute("UPDATE embeddings SET audit = ? WHERE embedding_id = ?", [_canonical_json(audit), self.embedding_id])

    @property
    def status(self) -> str:
        frame = self.store.catalog.query("SELECT status FROM embeddings WHERE embedding_id = ?", [self.embedding_id])
        return str(frame["status"].iloc[0]) if len(frame) else "removed"

    def read(self, rows: np.ndarray | None = None, *, allow_partial: bool = False) -> np.ndarray:
        return self.store.read_embedding(self.embedding_id, rows=rows, allow_partial=allow_partial)


class ChunkWriter:
    """Writes chunks of one embedding; catalog rows are committed in batches (see :meth:`Embedding.writer`).

    Chunk files are written by a small thread pool, so the next chunk is computed (or written) while
    the last one goes to disk; a chunk's catalog row is committed only after its write finished.
    A claim on a chunk (:meth:`claim`) is held until its row is committed, so another process
    never starts a chunk whose data is written but not yet committed.
    """

    def __init__(self, emb: Embedding, *, commit_every_s: float = 1.0, max_in_flight: int = 2, job: EmbeddingJob | None = None) -> None:
        self.emb = emb
        self.commit_every_s = commit_every_s
        self.max_in_flight = max_in_flight
        self._own_job = job is None
        self.job = EmbeddingJob(emb, check=False) if job is None else job
        try:
            # a zarr.json that disagrees with the catalog is refused before anything is written
            self._array = _zarr.open_array(emb.location, emb.spec)
            self._rows = _zarr.RowWriter(emb.location, self._array, emb.spec)
        except BaseException:
            if self._own_job:
                self.job.close()
            raise
        self._local = _zarr.local_path(emb.location) is not None
        self._target = emb.target()
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="scdm-chunk-writer")
        self._in_flight: list[tuple[Future[str], list[Any]]] = []
        self._pending: list[list[Any]] = []
        self._last_commit = time.monotonic()
        self._finalized = False

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            failed: BaseException | None = None
            try:
                self._drain(wait=True)
            except Exception as err:  # noqa: BLE001 - raised below, once the good chunks are committed
                failed = err
            # whatever went wrong, chunks whose data is on disk are kept
            if not self._pending and exc[0] is None and failed is None and not self._finalized:
                with self.emb.store.catalog.transaction() as con:
                    _require_row(con, self.emb.embedding_id)  # removed meanwhile: say so, however fast the writes were
            self.commit()
            if failed is not None and exc[0] is None:
                raise failed
        finally:
            self._pool.shutdown(wait=True)
            if self._own_job:
                self.job.close()

    def claim(self, chunk: int) -> bool:
        """Claim ``chunk`` before computing it; False when another live process computes it or it is done."""
        return self.job.claim(chunk)

    def wait_for(self, chunks: Sequence[int]) -> list[int]:
        """Wait for chunks claimed by other processes; returns those this process must compute now.

        Rows of this writer's finished chunks are committed first (and while waiting), so that
        processes waiting for them in turn see them. An empty list: all of ``chunks`` are committed.
        """
        self._drain(wait=True)
        self.commit()
        return self.job.wait_for(chunks, between=self.commit)

    def _write_file(self, chunk: int, lo: int, block: np.ndarray) -> str:
        # hashes and checks each piece as it is written (see _zarr.RowWriter): one pass over the rows
        return self._target.write_rows(chunk, lo, block, self._rows)

    def write(self, chunk: int, block: np.ndarray, *, seconds: float | None = None, token_lengths: dict[int, int] | None = None) -> None:
        """Queue one chunk's rows for writing (atomic chunk file); its catalog row follows the write.

        ``token_lengths``: cells of the chunk per token length (see :meth:`Embedding.chunk_token_lengths`).

        A block of the wrong shape is refused here; one holding NaN or inf when its write is
        collected (by a later call or on leaving the ``with`` block), with nothing of it written.
        """
        if self._finalized:
            raise ValueError(f"the writer of embedding {self.emb.embedding_id} was finalized; write chunks before finalize()")
        lo, block = self._target.checked_block(chunk, block)
        if self._local and not _array_whole(self.emb.location):
            # writing on would recreate chunk files in a removed array's folder, without its zarr.json
            raise _removed_error(self.emb.embedding_id, f"its array {self.emb.location} is gone")
        while len(self._in_flight) >= self.max_in_flight:
            self._drain(wait=True, at_most=1)
        future = self._pool.submit(in_context(self._write_file), chunk, lo, block)
        self._in_flight.append((future, [self.emb.embedding_id, chunk, block.shape[0], None, seconds, _token_lengths_json(token_lengths)]))
        self._drain(wait=False)
        if time.monotonic() - self._last_commit >= self.commit_every_s:
            self.commit()

    def _drain(self, *, wait: bool, at_most: int | None = None) -> None:
        """Move finished writes (oldest first) to the rows waiting for a commit; re-raise write errors.

        The writes that succeeded are moved even when an earlier one failed (their data is on disk,
        so their rows must be committed); the first failure is raised after.
        """
        done, failed = 0, None
        while self._in_flight and (wait or self._in_flight[0][0].done()):
            if at_most is not None and done >= at_most:
                break
            future, row = self._in_flight.pop(0)
            done += 1
            try:
                row[3] = future.result()
            except Exception as err:  # noqa: BLE001 - re-raised below
                failed = failed or err
                continue
            self._pending.append(row)
        if failed is not None:
            raise failed

    def finalize(self, *, telemetry: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> None:
        """Commit the rows of the chunks written so far and mark the embedding complete, in one transaction.

        The same as leaving the ``with`` block and calling :meth:`Embedding.finalize`, at one catalog
        commit instead of two: the catalog connection opens while the last chunk files are still
        being written (opening it takes about as long as writing one chunk). The rows of every
        chunk whose write succeeded are committed even when this raises.

        Raises
        ------
        EmbeddingIncompleteError
            A chunk is not committed, or its data is absent from the array (see :meth:`Embedding.finalize`).
        EmbeddingNotFoundError
            The embedding was removed meanwhile: nothing is committed.
        """
        failed: BaseException | None = None
        with self.emb.store.catalog.transaction() as con:
            try:
                self._drain(wait=True)
            except Exception as err:  # noqa: BLE001 - raised below, once the good chunks are committed
                failed = err
            rows, self._pending = self._pending, []
            self._insert(con, rows)
            refused, sums = self.emb._finalize_in(con, telemetry, audit) if failed is None else (failed, {})
        self._committed(rows)
        self._finalized = refused is None
        self.emb._after_finalize(refused, sums)

    def commit(self) -> None:
        """Commit the rows of finished writes in one transaction, then release their claims.

        Raises
        ------
        EmbeddingNotFoundError
            The embedding was removed meanwhile: nothing is committed.
        """
        self._drain(wait=False)
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        with self.emb.store.catalog.transaction() as con:
            self._insert(con, rows)
        self._committed(rows)

    def _insert(self, con: Any, rows: list[list[Any]]) -> None:
        """Inside a write transaction: the rows of written chunks (refused when the embedding was removed)."""
        _require_row(con, self.emb.embedding_id)
        if rows:
            Catalog.insert_rows(con, "embedding_chunks", CHUNK_COLUMNS, rows, verb="INSERT OR REPLACE",
                                computed={"written_at": "now()"})

    def _committed(self, rows: list[list[Any]]) -> None:
        """After the commit of ``rows``: their claims are released (other processes may take them as done)."""
        self.job.release([int(r[1]) for r in rows])
        self._last_commit = time.monotonic()


class Store:
    """An scdm store: ``catalog.duckdb`` plus Zarr v3 arrays under one directory.

    Parameters
    ----------
    path
        Store directory; created if missing. Default: ``$SCDM_STORE`` or ``./scdm-store``.
    arrays_url
        Folder (fsspec URL such as ``file:///shared/scdm-arrays`` or ``s3://bucket/prefix``, or a
        plain path) for the arrays of embeddings created through this handle, so that workers on
        other machines can write and read them. The catalog stays a local file in ``path``; each
        embedding records its array's URL, so later readers need no ``arrays_url``. Default: the
        store's own ``embeddings/`` folder.
    read_only
        Open the store for reading only: nothing is created or migrated, catalog connections are
        read-only, and every write raises :class:`~store.errors.StoreReadOnlyError`. Default
        (None): read-only when ``$SCDM_READ_ONLY`` is ``1``/``true``, or when the store exists
        but this user may not write its directory or catalog file.

    Examples
    --------
    >>> st = Store("my-store")                                   # doctest: +SKIP
    >>> ds = st.ingest("a375.h5ad", label_key="response_PLX4720")  # doctest: +SKIP
    >>> st.datasets()                                            # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, arrays_url: str | None = None,
                 read_only: bool | None = None) -> None:
        self.root = Path(path) if path is not None else default_store_path()
        self.root = self.root.expanduser()
        self.arrays_url = _zarr.check_arrays_url(arrays_url) if arrays_url else None
        self.read_only, why = _read_only_mode(self.root, read_only)
        if self.read_only:
            _check_readable_store(self.root, why)
        else:
            _check_store_folder(self.root)
            self._make_dirs()
        self.catalog = Catalog(self.root / CATALOG_FILE, read_only_reason=why if self.read_only else None)
        if self.read_only:
            self.catalog.check_schema(_scdm_version())  # a read-only store cannot be migrated
        else:
            self.catalog.migrate(_scdm_version())
        self._complete: dict[str, Embedding] = {}
        self._chunk_sums: dict[str, dict[int, str]] = {}
        """Committed checksums of the embeddings in ``_complete`` (verified reads)."""

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _make_dirs(self) -> None:
        try:
            for sub in (EMBEDDINGS_DIR, DATASETS_DIR, ARTIFACTS_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            # one probe per opener: two processes (or threads) opening the store at once must not
            # delete each other's probe and conclude the directory is read-only
            probe = self.root / _leftovers.write_probe_name(threading.get_ident())
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
        except OSError as err:
            msg = (
                f"Cannot write to the store directory {str(self.root)!r} ({err.strerror}). Choose a writable "
                f"location with --store PATH or the {ENV_STORE} environment variable; to read an existing store "
                f"you may not write, open it read-only (scdm --read-only, {ENV_READ_ONLY}=1, Store(path, read_only=True))."
            )
            raise ScdmError(msg) from err

    def check_writable(self, action: str = "change the store") -> None:
        """Raise :class:`StoreReadOnlyError` if this store is open read-only (call before any work)."""
        if self.read_only:
            raise StoreReadOnlyError(self.catalog.read_only_message(action))

    # ---- SQL ---------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run one query on the catalog and return a DataFrame (values bound with ``?``)."""
        return self.catalog.query(sql, params)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one write statement in a short transaction (retried while another process holds the lock)."""
        self.catalog.execute(sql, params)

    def insert_df(self, table: str, frame: pd.DataFrame) -> None:
        """Append a DataFrame's rows to a catalog table in one transaction."""
        self.catalog.insert_df(table, frame)

    def sql(self, query: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """User-facing read-only SQL: writes, COPY, ATTACH, file access and state-changing functions are refused.

        ``max_rows=None`` (the default) answers every row, held in memory at once; give ``max_rows``
        to bound it, or read a long answer in parts with :meth:`sql_batches`.
        """
        return self.catalog.read_only_query(query, max_rows=max_rows, timeout_s=timeout_s)

    def sql_batches(self, query: str, *, batch_rows: int = 10_000, timeout_s: float | None = None) -> Iterator[pd.DataFrame]:
        """:meth:`sql`'s whole answer in DataFrames of at most ``batch_rows`` rows, each read when asked for.

        Only one part is held at a time (``scdm sql --all --format csv`` writes them as they come).
        The first part comes even for an empty answer (it has the columns). Exhaust the iterator or
        close it (``contextlib.closing``) to give the read connection back.

        Examples
        --------
        >>> with contextlib.closing(store.sql_batches("SELECT * FROM cells")) as parts:  # doctest: +SKIP
        ...     for part in parts:
        ...         part.to_csv(out, header=out.tell() == 0, index=False)
        """
        return self.catalog.read_only_batches(query, batch_rows=batch_rows, timeout_s=timeout_s)

    # ---- datasets ----------------------------------------------------------------------------
    def ingest(self, data: str | os.PathLike[str] | ad.AnnData, *, name: str | None = None, copy: bool = True,
               update: bool = False, **options: Any) -> DatasetInfo:
        """Add an AnnData (``.h5ad`` path or object) to the store, or a label set to a stored one.

        The dataset's identity is its content (matrix, gene ids, cell ids). Ingesting content that
        is already stored with another ``label_key`` (or ``positive``/``unknown_values``/``drug``)
        adds a *label set* to the stored dataset (see :mod:`store.labels`); with the same labels it
        is a no-op, with other labels from the same column (a relabelled file) an error unless
        ``update=True``, which replaces them. Cell metadata that differs from what is stored
        (another study, sample, tissue, ...) is an error unless ``update=True``, which rewrites it;
        so is a ``gene_id_kind`` or ``x_kind`` other than the stored one (``update=True`` rewrites
        it and the genes' symbol/Ensembl columns, refused while embeddings made with the old one
        exist: they are named, to remove first). Every rewrite removes the splits made from the old
        labels, metadata or kinds and every evaluation result on them (a warning says how many), so
        no old number is read as a new one. A ``name`` other than the stored dataset's is not
        added: a warning names the stored one.

        Parameters
        ----------
        data
            Path of an ``.h5ad`` file (read in backed mode) or an AnnData.
        name
            Unique dataset name; default: the file stem, or ``dataset-<8 hex digits of the content hash>`` for an in-memory object (two never collide).
        copy
            Keep a copy of the data inside the store (default). With ``False`` the store refers to
            the source file, which must then stay where it is.
        update
            Rewrite the cell metadata or the gene id / value kind, or replace the labels of a label
            set, of an already stored dataset with what is given here (results made from the old
            ones are removed); the store's copy of the data becomes this file.
        **options
            Fields of :class:`store._ingest.IngestOptions`: ``label_key``, ``positive``,
            ``unknown_values``, ``study_key``/``study``, ``sample_key``/``sample``,
            ``tissue_key``/``tissue``, ``cancer_key``/``cancer_type``, ``drug_type_key``/``drug_type``,
            ``regimen_key``/``regimen``, ``gene_key``, ``gene_id_kind``, ``x_kind``, ``drug``
            (recorded with the label set), ``label_set`` (its name; default: ``drug``, else
            ``label_key``).

        Returns
        -------
        DatasetInfo
            ``created`` tells whether this call added it.
        """
        opts = _make_options(options)
        adata, source = _ingest.open_anndata(data)
        try:
            return self._ingest_open(adata, source, opts, name=name, copy=copy, update=update)
        finally:
            if source is not None and getattr(adata, "file", None) is not None:
                adata.file.close()

    def _ingest_open(self, adata: ad.AnnData, source: str | None, opts: _ingest.IngestOptions, *, name: str | None,
                     copy: bool, update: bool) -> DatasetInfo:
        gene_ids = _ingest.gene_ids_of(adata, opts.gene_key)
        _ingest.check_gene_column(adata, opts.gene_key)
        cell_ids = np.asarray(adata.obs_names.astype(str), dtype=object)
        _ingest.check_ids(gene_ids, cell_ids)
        default_study = name or (Path(source).stem if source else None)
        cells = _ingest.cell_table(adata, opts, default_study=default_study or "dataset")  # label problems surface before the long scan
        scan = _ingest.scan_matrix(adata, gene_ids, cell_ids)
        _ingest.check_given_x_kind(opts.x_kind, scan)  # before anything is written, stored content or new
        existing = self.query("SELECT dataset_id FROM datasets WHERE content_hash = ?", [scan.content_hash])
        if len(existing):
            held = self.dataset(str(existing["dataset_id"].iloc[0]))
            if opts.x_kind is None and (wrong := _ingest.stored_x_kind_message(held.x_kind, scan, held.name)) is not None:
                warnings.warn(wrong, _ingest.IngestWarning, stacklevel=3)  # an older scdm took the given kind unchecked
            return self._ingest_again(held, cells, opts, update=update, name=name, gene_ids=gene_ids, file=(adata, source))
        # an in-memory AnnData without a name is named after its content: two of them never collide
        name = default_study or f"dataset-{scan.content_hash[:8]}"
        _check_dataset_name(name)
        _ingest.refuse_lower_case_ensembl(gene_ids)
        par_y = _ingest.check_par_y_copies(adata, gene_ids, name)
        if default_study is None and opts.study_key is None and opts.study is None:
            cells["study"] = name
        if len(self.query("SELECT 1 FROM datasets WHERE name = ?", [name])):
            raise InputDataError(self._name_taken_message(name, opts))
        kind = _ingest.resolve_gene_id_kind(gene_ids, opts.gene_id_kind)
        x_kind = _ingest.resolve_x_kind(opts.x_kind, scan.x_kind)
        dataset_id = scan.content_hash[:16]
        stored = self._store_copy(adata, source, dataset_id) if copy else None
        genes = _ingest.gene_table_frame(gene_ids, kind)
        genes.insert(0, "dataset_id", dataset_id)
        cells.insert(0, "dataset_id", dataset_id)
        label_set = None
        try:
            with self.catalog.transaction() as con:
                con.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [dataset_id, name, scan.content_hash, scan.n_cells, scan.n_genes, kind, x_kind,
                     scan.x_format, source, stored or source, _canonical_json(opts.to_json_dict())],
                )
                self.catalog.insert_df("genes", genes, con)
                self.catalog.insert_df("cells", cells, con)
                if opts.label_key is not None:
                    label_set = self._add_label_set(con, dataset_id, cells["response"], opts, is_default=True)
        except BaseException:
            if stored:
                (self.root / stored).unlink(missing_ok=True)
            raise
        logger.info("ingested %s: %d cells x %d genes (%s, %s ids)", name, scan.n_cells, scan.n_genes, x_kind, kind)
        if opts.x_kind is None and (stray := _ingest.stray_values_message(scan, name)) is not None:
            warnings.warn(stray, _ingest.IngestWarning, stacklevel=3)  # points at the ingest() call
        if opts.x_kind is None and (unlogged := _ingest.unlogged_message(scan, name)) is not None:
            warnings.warn(unlogged, _ingest.IngestWarning, stacklevel=3)
        if (empty := _ingest.empty_cells_message(scan, name)) is not None:
            warnings.warn(empty, _ingest.IngestWarning, stacklevel=3)
        if (mixed := _ingest.mixed_gene_ids_message(gene_ids, kind, name)) is not None:
            warnings.warn(mixed, _ingest.IngestWarning, stacklevel=3)
        if (dates := _ingest.excel_dates_message(gene_ids, kind, name)) is not None:
            warnings.warn(dates, _ingest.IngestWarning, stacklevel=3)
        if (mouse := _ingest.mouse_symbols_message(gene_ids, kind, name)) is not None:
            warnings.warn(mouse, _ingest.IngestWarning, stacklevel=3)
        if par_y is not None:
            warnings.warn(par_y, _ingest.IngestWarning, stacklevel=3)
        if (shared := _ingest.shared_ensembl_message(genes, name)) is not None:
            warnings.warn(shared, _ingest.IngestWarning, stacklevel=3)
        if label_set is not None and opts.sample_key is None and opts.sample is None:
            _warn_label_confounders(adata, cells["response"], opts, name)
        return _replace(self.dataset(dataset_id), created=True, label_set=label_set.name if label_set else None,
                        label_set_created=label_set is not None)

    def _add_label_set(self, con: Any, dataset_id: str, response: pd.Series, opts: _ingest.IngestOptions, *,
                       is_default: bool) -> labels.LabelSet:
        name = labels.label_set_name(opts.label_key, opts.drug, opts.label_set)
        ls = labels.write_label_set(con, dataset_id, name, response, label_key=opts.label_key, positive=opts.positive,
                                    unknown_values=opts.unknown_values, drug=opts.drug, is_default=is_default)
        if ls.n_labelled and ls.n_sensitive in (0, ls.n_labelled):
            # stored all the same (it can be pooled with other datasets), but alone every split of it is skipped
            only = "sensitive" if ls.n_sensitive else "resistant"
            logger.warning("label set %r holds one class only (%d labelled cells, all %s, read from column %r): it can be "
                           "evaluated pooled with datasets that have the other class, never alone; check %s, %s and %s "
                           "if it should have both", name, ls.n_labelled, only, opts.label_key, option("label_key"),
                           option("positive"), option("unknown_values"))
        return ls

    def _ingest_again(self, info: DatasetInfo, cells: pd.DataFrame, opts: _ingest.IngestOptions, *,
                      update: bool, name: str | None, gene_ids: np.ndarray,
                      file: tuple[ad.AnnData, str | None]) -> DatasetInfo:
        """Content already stored: add a label set, rewrite metadata or kinds (``update``), or nothing."""
        _warn_other_name(info, name)
        changed = self._changed_metadata(info, cells, opts)
        kinds = _changed_kinds(info, gene_ids, opts)
        if (changed or kinds) and not update:
            raise InputDataError(_update_needed_message(info, changed, kinds))
        have = labels.label_sets(self, info.dataset_id)
        label_set, created = None, False
        forgotten = _splits.ForgottenSplits()
        with self.catalog.transaction() as con:
            if kinds:  # first: a refusal (embeddings made with the old kinds) leaves everything as it was
                self._rewrite_kinds(con, info, gene_ids, kinds)
            if changed:
                self._rewrite_metadata(con, info, cells, opts)
            if changed or kinds:
                # results were computed from the old kinds (every split) or the old metadata (the splits it defines)
                stale = _splits.stale_splits(con, info.dataset_id, changed=() if kinds else changed)
                forgotten = _splits.forget_splits(con, stale)
            if opts.label_key is not None:
                label_set, created, relabelled = self._label_set_for(con, info, have, cells, opts, update=update)
                forgotten = forgotten + relabelled
        replaced = {ls.labels_hash for ls in have} - {ls.labels_hash for ls in labels.label_sets(self, info.dataset_id)}
        if changed or kinds or replaced:
            self._refresh_copy(info, *file)
        if changed:
            logger.warning("dataset %r: cell metadata rewritten (%s)%s", info.name, ", ".join(changed),
                           f"; {forgotten.describe()}" if forgotten and not kinds else "")
        if kinds:
            logger.warning("dataset %r: %s rewritten%s", info.name, _kinds_text(kinds),
                           f"; {forgotten.describe()}" if forgotten else "")
        return _replace(self.dataset(info.dataset_id), label_set=label_set, label_set_created=created)

    def _rewrite_kinds(self, con: Any, info: DatasetInfo, gene_ids: np.ndarray, kinds: dict[str, tuple[str, str]]) -> None:
        """Set a stored dataset's gene id and value kinds, refused while embeddings made with the old ones exist.

        Embedding ids do not include these kinds, so an old embedding would be found again as if made
        with the new ones; the user removes them (their GPU hours) knowingly, never this method.
        """
        users = con.execute(
            "SELECT e.embedding_id, e.model, d.name FROM embeddings e JOIN datasets d USING (dataset_id) "
            "WHERE e.dataset_id = ? OR contains(CAST(e.params AS VARCHAR), ?) ORDER BY e.created_at, e.embedding_id",
            [info.dataset_id, info.content_hash]).fetchall()  # the content hash: joint baselines fitted on it too
        if users:
            raise InputDataError(_kinds_in_use_message(info, kinds, users))
        if "gene_id_kind" in kinds:  # symbol and Ensembl columns mapped again, as at first ingest
            frame = _ingest.gene_table_frame(gene_ids, _ingest.as_gene_id_kind(kinds["gene_id_kind"][1]))
            with registered(con, "_scdm_new_genes", frame[["idx", "symbol", "ensembl"]]):
                con.execute("UPDATE genes SET symbol = g.symbol, ensembl = g.ensembl FROM _scdm_new_genes g "
                            "WHERE genes.dataset_id = ? AND genes.idx = g.idx", [info.dataset_id])
        new = {field: value for field, (_, value) in kinds.items()}
        row = {"gene_id_kind": info.gene_id_kind, "x_kind": info.x_kind, **new}
        con.execute("UPDATE datasets SET gene_id_kind = ?, x_kind = ?, options = ? WHERE dataset_id = ?",
                    [row["gene_id_kind"], row["x_kind"], _canonical_json({**info.options, **new}), info.dataset_id])

    def _name_taken_message(self, name: str, opts: _ingest.IngestOptions) -> str:
        msg = (f"A different dataset named {name!r} is already in the store (other content). Pass another name "
               f"({option('name', 'NAME')}) or remove the old one (scdm rm --dataset {name}).")
        stored = self.dataset(name).options.get("gene_key")
        if stored != opts.gene_key:  # the same file with another gene id column is other content
            msg += (f" The stored one takes its gene ids from {_gene_source(stored)}, this one from "
                    f"{_gene_source(opts.gene_key)}: gene ids are part of a dataset's content.")
        return msg

    def _label_set_for(self, con: Any, info: DatasetInfo, have: list[labels.LabelSet], cells: pd.DataFrame,
                       opts: _ingest.IngestOptions, *, update: bool) -> tuple[str, bool, _splits.ForgottenSplits]:
        """The stored label set these options describe, adding it when it is new.

        The same source with other labels (the file was relabelled) is an error unless ``update``,
        which replaces the stored labels and the splits and results made with them.
        """
        name = labels.label_set_name(opts.label_key, opts.drug, opts.label_set)
        same = [ls for ls in have if ls.same_source(opts.label_key, opts.positive, opts.unknown_values, opts.drug)
                and (opts.label_set is None or ls.name == opts.label_set)]
        if same:
            return self._same_label_set(con, info, same[0], cells, opts, update=update)
        clash = [ls for ls in have if ls.name == name]
        if clash:
            old = clash[0]
            msg = (f"Dataset {info.name!r} already has a label set {name!r} read from column {old.label_key!r} "
                   f"(positive={old.positive!r}, drug={old.drug!r}, unknown_values={list(old.unknown_values)!r}); "
                   f"this one differs in {_label_source_difference(old, opts)}. Name the new one with "
                   f"{option('label_set', 'NAME')}.")
            raise InputDataError(msg)
        ls = self._add_label_set(con, info.dataset_id, cells["response"], opts, is_default=not have)
        if not have:
            labels.set_default(con, ls)
        logger.info("dataset %r: added label set %r (%d labelled cells, %d sensitive)", info.name, ls.name,
                    ls.n_labelled, ls.n_sensitive)
        return ls.name, True, _splits.ForgottenSplits()

    def _same_label_set(self, con: Any, info: DatasetInfo, old: labels.LabelSet, cells: pd.DataFrame,
                        opts: _ingest.IngestOptions, *, update: bool) -> tuple[str, bool, _splits.ForgottenSplits]:
        """A label set read again from its source: unchanged, refused, or (``update``) replaced."""
        differ = labels.differing_cells(con, old, cells["response"])
        if not differ.size:
            return old.name, False, _splits.ForgottenSplits()
        first = int(differ[0])
        if not update:
            msg = (f"Dataset {info.name!r} already has label set {old.name!r} from column {old.label_key!r} with other "
                   f"labels: {differ.size} of {len(cells)} cells differ (first: cell {cells['cell_id'].iloc[first]!r}). "
                   + (f"Pass {option('update')} to replace the stored labels (the splits and results made with them "
                      f"are removed), or {option('label_set', 'NEW_NAME')} to keep both." if offers("update") else
                      f"Pass {option('label_set', 'NEW_NAME')} to keep both (replacing stored labels is not done here)."))
            raise InputDataError(msg)
        ls = labels.replace_labels(con, old, cells["response"])
        if ls.is_default:
            labels.set_default(con, ls)
        forgotten = _splits.forget_label_set(con, info.dataset_id, old.name)
        logger.warning("dataset %r: label set %r replaced (%d cells changed; %d labelled, %d sensitive)%s", info.name,
                       old.name, differ.size, ls.n_labelled, ls.n_sensitive,
                       f"; {forgotten.describe()}" if forgotten else "")
        return old.name, False, forgotten

    def _changed_metadata(self, info: DatasetInfo, cells: pd.DataFrame, opts: _ingest.IngestOptions) -> dict[str, tuple[Any, Any]]:
        """Metadata columns that these options set to other values than the stored ones."""
        given = [col for col, (key_opt, const_opt) in _ingest.METADATA_FIELDS.items()
                 if getattr(opts, key_opt) is not None or getattr(opts, const_opt) is not None]
        if not given:
            return {}
        stored = self.query(f'SELECT {", ".join(given)} FROM cells WHERE dataset_id = ? ORDER BY "row"', [info.dataset_id])
        changed = {}
        for col in given:
            old = stored[col].astype(object).where(stored[col].notna(), None).tolist()
            new = cells[col].astype(object).where(cells[col].notna(), None).tolist()
            if old != new:
                first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
                changed[col] = (old[first], new[first])
        return changed

    def _rewrite_metadata(self, con: Any, info: DatasetInfo, cells: pd.DataFrame, opts: _ingest.IngestOptions) -> None:
        given = [col for col, (key_opt, const_opt) in _ingest.METADATA_FIELDS.items()
                 if getattr(opts, key_opt) is not None or getattr(opts, const_opt) is not None]
        frame = cells[["row", *given]].copy()
        sets = ", ".join(f"{c} = m.{c}" for c in given)
        with registered(con, "_scdm_new_meta", frame):
            con.execute(f'UPDATE cells SET {sets} FROM _scdm_new_meta m WHERE cells.dataset_id = ? AND cells."row" = m."row"',
                        [info.dataset_id])
        merged = {**info.options, **{k: v for k, v in opts.to_json_dict().items() if k not in _ingest.LABEL_OPTIONS}}
        con.execute("UPDATE datasets SET options = ? WHERE dataset_id = ?", [_canonical_json(merged), info.dataset_id])

    def _refresh_copy(self, info: DatasetInfo, adata: ad.AnnData, source: str | None) -> None:
        """Replace the store's copy of a dataset with the file whose labels or metadata ``update`` just took.

        The matrix, cell and gene ids are the same (the content hash matched), so embeddings stay
        valid; without this, obs of the copy (read by ``export`` and ``predict --out`` to .h5ad)
        kept the old labels beside the store's new ones. A dataset kept in place (``copy=False``)
        has no copy to refresh.
        """
        if info.stored_path == self._copy_path(info.dataset_id):
            self._store_copy(adata, source, info.dataset_id, replace=True)

    @staticmethod
    def _copy_path(dataset_id: str) -> str:
        return f"{DATASETS_DIR}/{dataset_id}.h5ad"

    def _store_copy(self, adata: ad.AnnData, source: str | None, dataset_id: str, *, replace: bool = False) -> str:
        rel = self._copy_path(dataset_id)
        final = self.root / rel
        if final.exists() and not replace:
            return rel
        # the name carries this process's pid: `scdm verify --repair` deletes it if the copy is killed
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=_leftovers.temp_prefix(dataset_id))
        os.close(fd)
        try:
            if source is not None:
                shutil.copyfile(source, tmp)
            else:
                _writable(adata).write_h5ad(tmp)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return rel

    def datasets(self) -> pd.DataFrame:
        """All datasets, with labelled-cell counts, newest last.

        The counts are of the dataset's default label set, named in ``label_set`` (None: unlabelled);
        :meth:`label_sets` counts every label set.
        """
        return self.query(
            "SELECT d.dataset_id, d.name, d.n_cells, d.n_genes, d.gene_id_kind, d.x_kind, "
            # sum() of the TINYINT labels is a HUGEINT, which pandas reads as float (327.0 sensitive cells)
            "count(c.response) AS n_labelled, coalesce(sum(c.response), 0)::BIGINT AS n_sensitive, "
            "l.name AS label_set, d.source_path, d.created_at "
            "FROM datasets d LEFT JOIN cells c USING (dataset_id) "
            "LEFT JOIN label_sets l ON l.dataset_id = d.dataset_id AND l.is_default "
            "GROUP BY ALL ORDER BY d.created_at, d.name"
        )

    def dataset(self, name_or_id: str) -> DatasetInfo:
        """A dataset by name or id (an unambiguous id prefix also works)."""
        frame = self.query(
            "SELECT * FROM datasets WHERE name = ? OR dataset_id = ? OR (length(?) >= 6 AND starts_with(dataset_id, ?))",
            [name_or_id, name_or_id, name_or_id, name_or_id],
        )
        if len(frame) != 1:
            names = ", ".join(self.query("SELECT name FROM datasets ORDER BY name")["name"]) or "(none)"
            what = "matches several datasets" if len(frame) > 1 else "is not in the store"
            msg = f"Dataset {name_or_id!r} {what}. Datasets: {names}. Ingest it with `scdm ingest FILE.h5ad`."
            raise DatasetNotFoundError(msg)
        r = frame.iloc[0].to_dict()
        return DatasetInfo(
            dataset_id=r["dataset_id"], name=r["name"], content_hash=r["content_hash"], n_cells=int(r["n_cells"]),
            n_genes=int(r["n_genes"]), gene_id_kind=r["gene_id_kind"], x_kind=r["x_kind"], x_format=r["x_format"],
            source_path=r["source_path"], stored_path=r["stored_path"], options=json.loads(r["options"] or "{}"),
        )

    def cells(self, datasets: str | Iterable[str] | None = None, *, label_set: str | None = None) -> pd.DataFrame:
        """Cell metadata of some (default: all) datasets, in dataset then row order.

        ``response`` holds each dataset's default label set, or the label set named ``label_set``
        (every dataset must have one of that name; see :mod:`store.labels`). A ``label_set``
        column names the label set each cell's response comes from (None: unlabelled dataset).
        """
        if datasets is None:
            ids = list(self.query("SELECT dataset_id FROM datasets ORDER BY dataset_id")["dataset_id"])
        else:
            ids = self._dataset_ids([datasets] if isinstance(datasets, str) else list(datasets))
        frame = self.query('SELECT c.*, l.name AS label_set FROM cells c LEFT JOIN label_sets l '
                           'ON l.dataset_id = c.dataset_id AND l.is_default '
                           'WHERE list_contains(?, c.dataset_id) ORDER BY c.dataset_id, c."row"', [ids])
        frame["response"] = frame["response"].astype("Int8")
        if label_set is None:
            return frame
        chosen = labels.resolve_label_sets(self, ids, label_set)
        lab = labels.cell_labels(self, [ls.label_set_id for ls in chosen.values()])
        frame = frame.drop(columns=["response"]).merge(lab, on=["dataset_id", "row"], how="left")
        frame["response"] = frame["response"].astype("Int8")
        frame["label_set"] = label_set
        return frame

    def _dataset_ids(self, names: Sequence[str]) -> list[str]:
        """Ids of datasets given by name or id (as :meth:`dataset` resolves them), from one catalog query."""
        table = self.query("SELECT dataset_id, name FROM datasets")
        pairs = list(zip(table["dataset_id"], table["name"]))
        ids = []
        for n in names:
            hits = [i for i, name in pairs if name == n or i == n or (len(n) >= 6 and i.startswith(n))]
            ids.append(hits[0] if len(hits) == 1 else self.dataset(n).dataset_id)  # dataset() raises the usual error
        return ids

    def label_sets(self, datasets: str | Iterable[str] | None = None) -> pd.DataFrame:
        """Label sets of some (default: all) datasets with their dataset name (see :mod:`store.labels`)."""
        frame = pd.DataFrame([vars(ls) for ls in labels.label_sets(self, datasets)])
        if frame.empty:
            return pd.DataFrame(columns=["dataset", *labels.LabelSet.__dataclass_fields__])
        names = self.query("SELECT dataset_id, name AS dataset FROM datasets")
        return names.merge(frame, on="dataset_id")

    def add_stored_labels(self, adata: ad.AnnData, dataset: str) -> list[str]:
        """Put each label set of ``dataset``, as the store holds it, into ``adata.obs`` (cells in dataset order).

        Column ``scdm_response_<label set>`` holds ``sensitive``/``resistant`` (missing: unknown or
        unlabelled); ``adata.uns['scdm_label_sets']`` maps each column to its label set (JSON: name,
        label_key, positive, unknown_values, drug, default) and, where the obs column the labels were
        read from now reads otherwise (a later ``update`` took the file's other columns but kept these
        labels), how many cells differ. The file's own columns are the file's: without these, an
        export of the store's copy showed them as the labels and lacked every label set added later.

        Returns
        -------
        list of str
            Warnings: one per label set whose source column in ``adata.obs`` differs from it.
        """
        ds = self.dataset(dataset)
        have = labels.label_sets(self, ds.dataset_id)
        described: dict[str, str] = {}
        notes = []
        for ls in have:
            column = "scdm_response_" + re.sub(r"[^A-Za-z0-9_.-]", "_", ls.name)
            ids = labels.cell_labels(self, [ls.label_set_id])
            response = np.full(adata.n_obs, -1, dtype=np.int8)
            response[ids["row"].to_numpy(dtype=np.int64)] = ids["response"].to_numpy(dtype=np.int8)
            adata.obs[column] = pd.Categorical.from_codes(np.where(response < 0, -1, 1 - response),
                                                         categories=["sensitive", "resistant"])
            about: dict[str, Any] = {"label_set": ls.name, "label_key": ls.label_key, "positive": ls.positive,
                                     "unknown_values": list(ls.unknown_values), "drug": ls.drug, "default": ls.is_default}
            differ = _file_labels_differ(adata, ls, response)
            if differ:
                about["file_column_differs"] = differ
                notes.append(f"obs column {ls.label_key!r} of the file differs from the stored label set {ls.name!r} "
                             f"in {differ} of {adata.n_obs} cells; the store's labels are in {column!r}")
            described[column] = _canonical_json(about)
        adata.uns["scdm_label_sets"] = described
        return notes

    def genes(self, dataset: str) -> pd.DataFrame:
        """The dataset's genes in matrix column order: gene_id, symbol, ensembl."""
        ds = self.dataset(dataset)
        return self.query("SELECT idx, gene_id, symbol, ensembl FROM genes WHERE dataset_id = ? ORDER BY idx", [ds.dataset_id])

    def open_anndata(self, dataset: str, *, backed: bool = True) -> ad.AnnData:
        """The dataset's AnnData (backed read-only by default: memory does not grow with cells)."""
        import anndata as ad

        ds = self.dataset(dataset)
        path = Path(ds.stored_path)
        path = path if path.is_absolute() else self.root / path
        if not path.exists():
            msg = f"The data of dataset {ds.name!r} is gone from {str(path)!r}. Restore the file or ingest it again."
            raise DatasetNotFoundError(msg)
        adata = ad.read_h5ad(path, backed="r" if backed else None)
        try:
            self._check_dataset_file(ds, adata, path)
        except BaseException:
            if backed and getattr(adata, "file", None) is not None:
                adata.file.close()
            raise
        return adata

    def _check_dataset_file(self, ds: DatasetInfo, adata: ad.AnnData, path: Path) -> None:
        """Refuse a file that no longer holds the ingested cells and genes, in their order.

        A ``--no-copy`` source (or a replaced copy) can change after ingest; read as is, its rows
        would silently take the labels, embeddings and results of other cells.
        """
        problem = None
        if adata.shape != (ds.n_cells, ds.n_genes):
            problem = f"it holds {adata.n_obs} cells x {adata.n_vars} genes, ingested as {ds.n_cells} x {ds.n_genes}"
        else:
            stored_cells = self.query('SELECT cell_id FROM cells WHERE dataset_id = ? ORDER BY "row"', [ds.dataset_id])["cell_id"]
            stored_genes = self.query("SELECT gene_id FROM genes WHERE dataset_id = ? ORDER BY idx", [ds.dataset_id])["gene_id"]
            gene_ids = _ingest.gene_ids_of(adata, ds.options.get("gene_key"))
            problem = (_first_difference("cell", np.asarray(adata.obs_names.astype(str), dtype=object), stored_cells.to_numpy())
                       or _first_difference("gene", gene_ids, stored_genes.to_numpy()))
        if problem:
            msg = (f"The data file of dataset {ds.name!r} ({str(path)!r}) changed since it was ingested: {problem}. Its "
                   "labels, embeddings and results belong to the ingested cells. Put the original file back, or remove "
                   f"the dataset (scdm rm --dataset {ds.name}) and ingest the new file.")
            raise DatasetFileChangedError(msg)

    def remove_dataset(self, dataset: str, *, wait_s: float = 0.0) -> list[str]:
        """Delete a dataset, its cells, genes, label sets and embeddings. Returns the removed embedding ids.

        The splits of its cells and every evaluation result on them go too (a warning says how
        many), and trained heads' predictions of its cells: no number is left that cannot be
        traced back to stored data.

        Nothing is removed while a job writes one of its embeddings: that is refused (after waiting
        up to ``wait_s`` seconds for the jobs to end) with an error naming the jobs.

        Raises
        ------
        EmbeddingBusyError
            A job is writing one of the dataset's embeddings.
        """
        ds = self.dataset(dataset)
        ids = sorted(str(e) for e in self.query("SELECT embedding_id FROM embeddings WHERE dataset_id = ?", [ds.dataset_id])["embedding_id"])
        embs = [self.embedding(e) for e in ids]
        with contextlib.ExitStack() as held:
            for emb in embs:  # every embedding is checked before anything is removed
                held.enter_context(_claims.exclusive(self._claims_folder(emb.embedding_id), emb.embedding_id, wait_s=wait_s, doing="remove"))
            with self.catalog.transaction() as con:
                now = sorted(r[0] for r in con.execute("SELECT embedding_id FROM embeddings WHERE dataset_id = ?", [ds.dataset_id]).fetchall())
                if now != ids:
                    msg = f"A job started a new embedding of dataset {ds.name!r} while it was being removed; nothing was removed. Run the removal again."
                    raise EmbeddingBusyError(msg)
                con.execute("DELETE FROM embedding_chunks WHERE list_contains(?, embedding_id)", [ids])
                con.execute("DELETE FROM embeddings WHERE list_contains(?, embedding_id)", [ids])
                # results on its cells can no longer be traced to data: they go with it
                forgotten = _splits.forget_splits(con, _splits.stale_splits(con, ds.dataset_id))
                con.execute("DELETE FROM predictions WHERE dataset_id = ?", [ds.dataset_id])
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()").fetchall()}
                for table in ("cell_labels", "label_sets", "cells", "genes", "datasets"):
                    if table in tables:
                        con.execute(f"DELETE FROM {table} WHERE dataset_id = ?", [ds.dataset_id])
            for emb in embs:
                self._forget_embedding(emb)
        if forgotten:
            logger.warning("dataset %r removed; %s", ds.name, forgotten.describe())
        # only the store's own copy: a path edited into the catalog (datasets/../../x) names a file elsewhere
        if _PLAIN_ID.fullmatch(ds.dataset_id) and ds.stored_path == self._copy_path(ds.dataset_id):
            (self.root / ds.stored_path).unlink(missing_ok=True)
        elif ds.stored_path.startswith(DATASETS_DIR):
            logger.warning("dataset %r: its catalog row names %r as the store's copy, which is not the copy scdm "
                           "writes (%s); that file was left in place", ds.name, ds.stored_path, self._copy_path(ds.dataset_id))
        return ids

    # ---- embeddings --------------------------------------------------------------------------
    def create_embedding(
        self,
        dataset: str,
        *,
        model: str,
        params: dict[str, Any],
        dim: int,
        checkpoint_hash: str | None = None,
        adapter_hash: str | None = None,
        variant: str = "frozen",
        dtype: str = "float32",
        chunk_rows: int | None = None,
        compressor: str | None = None,
    ) -> Embedding:
        """Create the embedding of ``dataset`` under these settings, or return it if it exists.

        The id is a hash of the dataset content and everything that determines the values
        (model, checkpoint hash, adapter hash, variant, params), so asking again returns the same
        embedding, complete or half-written (then :meth:`Embedding.missing_chunks` says what is left).

        Without a catalog row, anything at the array's place in the store is a leftover (of an
        embedding removed while a job still wrote to it, or of a crash): it is replaced by a fresh
        array, and chunk rows left under the id are dropped, so nothing of it is taken for data.
        """
        ds = self.dataset(dataset)
        _check_size("dim", dim)
        if chunk_rows is not None:
            _check_size("chunk_rows", chunk_rows)
        found = self.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=checkpoint_hash,
                                   adapter_hash=adapter_hash, variant=variant, dtype=dtype)
        if found is not None:
            _refuse_foreign_array(found)  # before anything is repaired, removed or written there
            if not _array_whole(found.location):
                return self._renew_array(found, compressor)
            self._repair_metadata(found)  # a zarr.json edited since: rewritten from the catalog before anything is written
            return found
        space = space_id_of(model, checkpoint_hash, adapter_hash, variant, params)
        embedding_id = _short_hash("embedding", ds.content_hash, space, dtype)
        rows = chunk_rows if chunk_rows is not None else _zarr.default_chunk_rows(dim, dtype)
        # never a chunk taller than the dataset: Zarr pads an edge chunk to full size on disk, so a
        # 108-cell dataset's 50-dim pca took 13 MB (one 65,536-row chunk) instead of 22 KB
        rows = min(rows, ds.n_cells)
        # array_path is relative to the store root, or a URL when arrays live elsewhere
        rel = f"{self.arrays_url}/{embedding_id}.zarr" if self.arrays_url else f"{EMBEDDINGS_DIR}/{embedding_id}.zarr"
        location: _zarr.ArrayLocation = rel if self.arrays_url else self.root / rel
        # one creator at a time, and never while a removal of the same id is under way; a job
        # that holds the embedding shows that another process created it meanwhile
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while (held := _claims.try_exclusive(self._claims_folder(embedding_id))) is None:
            found = self.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=checkpoint_hash,
                                       adapter_hash=adapter_hash, variant=variant, dtype=dtype)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                who = "; ".join(w.describe() for w in _claims.live_writers(self._claims_folder(embedding_id))) or "another process"
                msg = f"Cannot create embedding {embedding_id}: {who} held it for {LOCK_RETRY_SECONDS:g} s without creating it; run again."
                raise EmbeddingBusyError(msg)
            time.sleep(0.02)
        try:
            found = self.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=checkpoint_hash,
                                       adapter_hash=adapter_hash, variant=variant, dtype=dtype)
            if found is not None:  # another process created it while this one waited
                return found
            if not self.arrays_url or not _array_whole(location):
                # arrays under a shared arrays_url may belong to another store: only a broken one goes
                _zarr.remove_array(location)
            _zarr.create_array(
                location, n_rows=ds.n_cells, dim=dim, dtype=dtype, chunk_rows=rows, compressor=compressor,
                attrs={"embedding_id": embedding_id, "dataset_id": ds.dataset_id, "model": model, "variant": variant},
            )
            n_chunks = -(-ds.n_cells // rows)
            try:
                with self.catalog.transaction() as con:
                    if con.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", [ds.dataset_id]).fetchone() is None:
                        msg = f"Dataset {ds.name!r} was removed while its embedding was being created."
                        raise DatasetNotFoundError(msg)
                    con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ?", [embedding_id])  # rows of a removed job
                    con.execute(
                        "INSERT INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', now(), NULL, NULL, NULL)",
                        [embedding_id, ds.dataset_id, space, model, variant, checkpoint_hash, adapter_hash,
                         _canonical_json(params), dim, dtype, ds.n_cells, rows, n_chunks, rel],
                    )
            except BaseException:
                _zarr.remove_array(location)
                raise
        finally:
            _claims.release(held)
        return self._handle(self.query("SELECT * FROM embeddings WHERE embedding_id = ?", [embedding_id]).iloc[0])

    def get_embedding(self, dataset: str, *, model: str, params: dict[str, Any], checkpoint_hash: str | None = None,
                      adapter_hash: str | None = None, variant: str = "frozen", dtype: str = "float32") -> Embedding | None:
        """The embedding with exactly these settings, or None (nothing is created)."""
        ds = self.dataset(dataset)
        space = space_id_of(model, checkpoint_hash, adapter_hash, variant, params)
        embedding_id = _short_hash("embedding", ds.content_hash, space, dtype)
        found = self.query("SELECT * FROM embeddings WHERE embedding_id = ?", [embedding_id])
        return self._handle(found.iloc[0]) if len(found) else None

    def _renew_array(self, emb: Embedding, compressor: str | None) -> Embedding:
        """An embedding whose array is gone or broken (no ``zarr.json``): a fresh array, every chunk missing again."""
        with _claims.exclusive(self._claims_folder(emb.embedding_id), emb.embedding_id, wait_s=LOCK_RETRY_SECONDS, doing="repair"):
            if _array_whole(emb.location):  # another process renewed it meanwhile
                return emb
            logger.warning("the array of embedding %s at %s is gone or broken; starting it again from an empty array",
                           emb.embedding_id, emb.location)
            _zarr.remove_array(emb.location)
            _zarr.create_array(
                emb.location, n_rows=emb.n_cells, dim=emb.dim, dtype=emb.dtype, chunk_rows=emb.chunk_rows, compressor=compressor,
                attrs={"embedding_id": emb.embedding_id, "dataset_id": emb.dataset_id, "model": emb.model, "variant": emb.variant},
            )
            with self.catalog.transaction() as con:
                _require_row(con, emb.embedding_id)
                con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ?", [emb.embedding_id])
                con.execute("UPDATE embeddings SET status = 'pending', completed_at = NULL WHERE embedding_id = ?", [emb.embedding_id])
        self._complete = {k: v for k, v in self._complete.items() if v.embedding_id != emb.embedding_id}
        return emb

    def _claims_folder(self, embedding_id: str) -> Path:
        return _claims.claims_folder(self.root, embedding_id)

    def writing_jobs(self, embedding_id: str) -> list[_claims.WriterInfo]:
        """The processes writing an embedding right now (pid, host, since when, command)."""
        return _claims.live_writers(self._claims_folder(self.embedding(embedding_id).embedding_id))

    def _handle(self, row: pd.Series) -> Embedding:
        r = row.to_dict()  # attribute access would clash with Series.dtype / Series.name
        return Embedding(
            store=self, embedding_id=r["embedding_id"], dataset_id=r["dataset_id"], space_id=r["space_id"],
            model=r["model"], variant=r["variant"], dim=int(r["dim"]), dtype=str(r["dtype"]), n_cells=int(r["n_cells"]),
            chunk_rows=int(r["chunk_rows"]), n_chunks=int(r["n_chunks"]), array_path=r["array_path"],
            params=json.loads(r["params"]),
        )

    def embedding(self, embedding_id: str) -> Embedding:
        """Handle on an embedding by id (or unambiguous id prefix of at least 6 characters)."""
        return self._embedding_and_status(embedding_id)[0]

    def _embedding_and_status(self, embedding_id: str) -> tuple[Embedding, str]:
        frame = self.query(
            "SELECT * FROM embeddings WHERE embedding_id = ? OR (length(?) >= 6 AND starts_with(embedding_id, ?))",
            [embedding_id, embedding_id, embedding_id],
        )
        if len(frame) != 1:
            what = "matches several embeddings" if len(frame) > 1 else "does not exist"
            msg = f"Embedding {embedding_id!r} {what}. List them with `scdm ls`."
            raise EmbeddingNotFoundError(msg)
        return self._handle(frame.iloc[0]), str(frame["status"].iloc[0])

    def find_embedding(self, dataset: str, model: str, variant: str = "frozen", *, status: str | None = "complete") -> Embedding:
        """The one embedding of ``dataset`` by ``model``/``variant`` (error if none or several)."""
        ds = self.dataset(dataset)
        sql = "SELECT * FROM embeddings WHERE dataset_id = ? AND model = ? AND variant = ?"
        args: list[Any] = [ds.dataset_id, model, variant]
        if status:
            sql += " AND status = ?"
            args.append(status)
        frame = self.query(sql.replace("SELECT *", f"SELECT *, {gene_table_note_sql('params')} AS gene_table_note", 1)
                           + " ORDER BY created_at", args)
        if len(frame) != 1:
            if len(frame) == 0:
                msg = f"No {status or ''} {model} ({variant}) embedding of dataset {ds.name!r}. Compute it with `scdm embed {ds.name} --model {model}`, or list what exists with `scdm ls`."
            else:  # one made by an older scdm's gene table is named as such: the other is the one this scdm makes
                ids = ", ".join(i + (f" ({note})" if note else "") for i, note in zip(frame["embedding_id"], frame["gene_table_note"]))
                msg = f"Dataset {ds.name!r} has {len(frame)} {model} ({variant}) embeddings with different parameters ({ids}); pass --embedding ID."
            raise EmbeddingNotFoundError(msg)
        return self._handle(frame.iloc[0])

    def embeddings(self, status: str | None = None) -> pd.DataFrame:
        """All embeddings with their dataset name and chunk progress.

        ``checkpoint_source`` says where the checkpoint of the run that completed it came from:
        ``org/name@commit`` for a Hugging Face Hub id, the folder for a local one, None for
        baselines and embeddings made before scdm recorded it (``telemetry["checkpoint"]`` has it all).
        ``note`` is ``'older gene table (...)'`` for one made with another gene table than this
        scdm's (:func:`scdm.store.genes.gene_table_note_sql`), else empty.
        """
        sql = (
            "SELECT e.embedding_id, e.dataset_id, d.name AS dataset_name, e.space_id, e.model, e.variant, e.dim, "
            "e.dtype, e.n_cells, e.status, (SELECT count(*) FROM embedding_chunks k WHERE k.embedding_id = e.embedding_id) "
            "AS chunks_done, e.n_chunks, e.params, e.checkpoint_hash, e.adapter_hash, e.created_at, e.completed_at, e.telemetry, "
            f"{gene_table_note_sql('e.params')} AS note "
            "FROM embeddings e JOIN datasets d USING (dataset_id)"
        )
        args: list[Any] = []
        if status:
            sql += " WHERE e.status = ?"
            args.append(status)
        frame = self.query(sql + " ORDER BY e.created_at", args)
        frame["checkpoint_source"] = [_checkpoint_source(t) for t in frame["telemetry"]]
        return frame

    def read_embedding(self, embedding_id: str, rows: np.ndarray | Sequence[int] | None = None, *, allow_partial: bool = False) -> np.ndarray:
        """The embedding as float32 ``ndarray`` of shape (n_cells, dim), rows in dataset order.

        Parameters
        ----------
        rows
            Row indices to read (any order; sorted is fastest), or a boolean mask with one entry
            per cell. Default: all.
        allow_partial
            Read an embedding whose chunks are not all written (unwritten rows are zeros).

        Every committed chunk the read touches is checked against its checksum first (a chunk
        verified before by this process is trusted while its file is unchanged), and the array's
        ``zarr.json`` against the catalog row (rows, dimensions, data type, rows per chunk).

        Raises
        ------
        EmbeddingIncompleteError
            If it is not complete and ``allow_partial`` is False.
        ChunkCorruptError
            If a chunk it touches is missing, truncated or altered, or the embedding is complete
            but a chunk has no committed record (its rows could not be verified); no data is
            returned, and the message names the chunk, its file and the command that recomputes it.
        ArrayMetadataError
            If the array's ``zarr.json`` is missing, unreadable or disagrees with the catalog; no
            data is returned, and the message says how to rewrite it.
        InputDataError
            If ``rows`` is neither whole row numbers nor a mask of one entry per cell.
        """
        for fresh in (False, True):
            emb, status, sums = self._readable(embedding_id, fresh=fresh)
            selected = None if rows is None else _row_indices(rows, emb.n_cells)
            if not allow_partial and status != "complete":
                msg = (
                    f"Embedding {emb.embedding_id} ({emb.model}) is incomplete: {len(sums)} of {emb.n_chunks} chunks "
                    "written. Resume it by running the same `scdm embed` command again, or pass allow_partial=True."
                )
                raise EmbeddingIncompleteError(msg)
            try:
                if status == "complete":
                    _raise_first(_unrecorded(emb, sums))
                return _zarr.read_rows(emb.location, selected, checksums=sums, spec=emb.spec)
            except ChunkCorruptError as err:
                if not fresh:
                    # the cached checksums may be stale (another process recomputed chunks since):
                    # look in the catalog again once before calling the chunk damaged
                    continue
                raise self._damaged(emb, err) from err
            except ArrayMetadataError as err:
                if not fresh:
                    continue  # the cached row may be stale (the embedding removed and made again since)
                raise self._bad_metadata(emb, err) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _readable(self, embedding_id: str, *, fresh: bool = False) -> tuple[Embedding, str, dict[int, str]]:
        """(handle, status, committed checksum per chunk); complete embeddings are cached unless ``fresh``."""
        emb = None if fresh else self._complete.get(embedding_id)
        if emb is None and not fresh:
            self._cache_space_of(embedding_id)
            emb = self._complete.get(embedding_id)
        sums = self._chunk_sums.get(emb.embedding_id) if emb is not None else None
        if emb is not None and sums is not None and _zarr.array_exists(emb.location):
            return emb, "complete", sums
        emb, status = self._embedding_and_status(embedding_id)
        sums = self._chunk_checksums(emb.embedding_id)
        if status == "complete":
            # ids are content hashes: a complete embedding changes only when a repair resets
            # chunks, and then a read that fails looks again (read_embedding)
            self._remember_complete(emb, sums)
            self._complete[embedding_id] = emb  # the id prefix asked for, too
        return emb, status, sums

    def _remember_complete(self, emb: Embedding, sums: dict[int, str]) -> None:
        """Cache a complete embedding with its committed checksums (from a look-up, or from the
        transaction that finalized it), so that its reads verify without the catalog."""
        self._complete[emb.embedding_id] = emb
        self._chunk_sums[emb.embedding_id] = dict(sums)

    def _cache_space_of(self, embedding_id: str) -> None:
        """Cache every complete embedding of ``embedding_id``'s space with its checksums: two catalog queries
        for a space's datasets, where reading them one by one took two each (evaluation reads them all)."""
        frame = self.query(
            "SELECT * FROM embeddings WHERE status = 'complete' AND space_id IN (SELECT space_id FROM embeddings "
            "WHERE embedding_id = ?)", [embedding_id])
        if frame.empty:
            return  # an id prefix, or not complete: the one-by-one path answers
        sums = self.query("SELECT embedding_id, chunk, checksum FROM embedding_chunks WHERE list_contains(?, embedding_id)",
                          [list(frame["embedding_id"])])
        by_id: dict[str, dict[int, str]] = {e: {} for e in frame["embedding_id"]}
        for e, c, k in zip(sums["embedding_id"], sums["chunk"], sums["checksum"]):
            by_id[e][int(c)] = str(k)
        for i in range(len(frame)):
            emb = self._handle(frame.iloc[i])
            self._remember_complete(emb, by_id[emb.embedding_id])

    def _chunk_checksums(self, embedding_id: str) -> dict[int, str]:
        frame = self.query("SELECT chunk, checksum FROM embedding_chunks WHERE embedding_id = ?", [embedding_id])
        return {int(c): str(s) for c, s in zip(frame["chunk"], frame["checksum"])}

    def verify_embedding(self, embedding_id: str) -> list[int]:
        """Chunks to recompute: committed ones whose stored data does not match their checksum, and, of a
        complete embedding, those without a committed record (empty = healthy).

        Reads and hashes every committed chunk (see :meth:`verify` for a report with reasons). A
        local array whose ``zarr.json`` is missing or disagrees with the catalog is read in the
        catalog's layout; the file itself is :meth:`repair_array_metadata`'s business.
        """
        emb, status = self._embedding_and_status(embedding_id)
        return [err.chunk for err in self._chunk_damage(emb, status, self._chunk_checksums(emb.embedding_id))]

    def _chunk_damage(self, emb: Embedding, status: str, sums: dict[int, str]) -> list[ChunkCorruptError]:
        """The bad committed chunks and, when ``status`` is complete, the chunks without a record; in chunk order."""
        found = _zarr.verify_chunks(emb.location, sums, emb.spec)
        if status == "complete":
            found += _unrecorded(emb, sums)
        return sorted(found, key=lambda err: err.chunk)

    def repair_array_metadata(self, embedding: str | Embedding) -> str | None:
        """Rewrite an embedding's ``zarr.json`` from its catalog row if it is missing or disagrees with it.

        ``embedding`` is an id or a handle (a handle saves a catalog look-up when nothing is wrong).
        The chunk files are kept: verify them next (:meth:`verify_embedding`) and recompute the bad
        ones (bytes written in another layout do not match their checksums). Returns what was wrong
        with the file, or None when it matched (then nothing is written).

        Raises
        ------
        EmbeddingBusyError
            A job kept writing the embedding.
        """
        return self._repair_metadata(embedding if isinstance(embedding, Embedding) else self.embedding(embedding))

    def _repair_metadata(self, emb: Embedding) -> str | None:
        problem = _zarr.metadata_problem(emb.location, emb.spec)
        if problem is None:
            return None
        self.check_writable("rewrite an embedding's array metadata (zarr.json)")
        # the job lock: never under a running job's feet, nor into the folder of an embedding being removed
        with _claims.exclusive(self._claims_folder(emb.embedding_id), emb.embedding_id, wait_s=LOCK_RETRY_SECONDS, doing="repair"):
            if self.query("SELECT 1 FROM embeddings WHERE embedding_id = ?", [emb.embedding_id]).empty:
                raise _removed_error(emb.embedding_id, "before its array metadata was rewritten")
            _zarr.write_metadata(emb.location, emb.spec, {"embedding_id": emb.embedding_id, "dataset_id": emb.dataset_id,
                                                          "model": emb.model, "variant": emb.variant})
        logger.warning("embedding %s (%s): its array metadata file %s; rewrote it from the catalog", emb.embedding_id, emb.model, problem)
        return problem

    def remove_embedding(self, embedding_id: str, *, wait_s: float = 0.0) -> str:
        """Delete an embedding: its catalog rows first (readers stop seeing it), then its array.

        Refused while a job writes it (see :meth:`Embedding.job`): the error names the job (pid,
        host, since when). ``wait_s``: wait up to this long for the jobs to end instead.

        Raises
        ------
        EmbeddingBusyError
            A job kept writing the embedding.
        """
        emb = self.embedding(embedding_id)
        with _claims.exclusive(self._claims_folder(emb.embedding_id), emb.embedding_id, wait_s=wait_s, doing="remove"):
            with self.catalog.transaction() as con:
                con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ?", [emb.embedding_id])
                con.execute("DELETE FROM embeddings WHERE embedding_id = ?", [emb.embedding_id])
            self._forget_embedding(emb)
        logger.info("removed embedding %s (%s of %s)", emb.embedding_id, emb.model, emb.dataset_id)
        return emb.embedding_id

    def _forget_embedding(self, emb: Embedding) -> None:
        """After its rows are deleted: drop an embedding's cache entries, array and lock folder."""
        self._complete = {k: v for k, v in self._complete.items() if v.embedding_id != emb.embedding_id}
        if _foreign_array_path(emb.embedding_id, emb.array_path):
            logger.warning("embedding %s: its catalog row names the array %r, where scdm never writes one (%s/%s.zarr); "
                           "that folder was left in place", emb.embedding_id, emb.array_path, EMBEDDINGS_DIR, emb.embedding_id)
        else:
            _zarr.remove_array(emb.location)
        _claims.forget(self._claims_folder(emb.embedding_id))

    def _checkpoint_provenance(self, embedding_id: str) -> dict[str, str]:
        """``checkpoint_hash`` (the identity) and ``checkpoint`` (the JSON of where it came from: Hub id, revision and
        commit, or the folder) of an embedding, those it records (none for a baseline)."""
        row = self.query("SELECT checkpoint_hash, telemetry FROM embeddings WHERE embedding_id = ?", [embedding_id]).iloc[0]
        out = {"checkpoint_hash": row["checkpoint_hash"]} if isinstance(row["checkpoint_hash"], str) else {}
        try:
            source = json.loads(row["telemetry"]).get("checkpoint") if isinstance(row["telemetry"], str) else None
        except (ValueError, AttributeError):
            source = None
        return {**out, "checkpoint": _canonical_json(source)} if isinstance(source, dict) else out

    def export_embedding(self, embedding_id: str, out: str | os.PathLike[str]) -> Path:
        """Write an embedding to ``.npy``, or to an ``.h5ad`` copy of its dataset with it in ``obsm``.

        The ``.h5ad`` records in ``uns['scdm'][<obsm key>]`` the ``embedding_id``, its ``params`` and, for
        a foundation model, ``checkpoint_hash`` and ``checkpoint`` (JSON: the Hub id, the revision asked
        for and the commit, or the local folder).
        """
        emb = self.embedding(embedding_id)
        data = self.read_embedding(emb.embedding_id)
        out = Path(out)
        if out.suffix == ".npy":
            np.save(out, data)
        elif out.suffix == ".h5ad":
            adata = self.open_anndata(emb.dataset_id, backed=False)
            key = f"X_{emb.model}" if emb.variant == "frozen" else f"X_{emb.model}_{emb.variant.replace(':', '_')}"
            adata.obsm[key] = data
            adata.uns.setdefault("scdm", {})[key] = {"embedding_id": emb.embedding_id, "params": _canonical_json(emb.params),
                                                     **self._checkpoint_provenance(emb.embedding_id)}
            for note in self.add_stored_labels(adata, emb.dataset_id):
                logger.warning("export of %s: %s", self.dataset(emb.dataset_id).name, note)
            adata.write_h5ad(out)
        else:
            msg = f"Cannot export to {str(out)!r}: use a path ending in .npy or .h5ad."
            raise InputDataError(msg)
        return out

    # ---- verification and repair -----------------------------------------------------------
    def verify(self, embedding_ids: str | Iterable[str] | None = None, *, repair: bool = False) -> _verify.VerifyReport:
        """Check every committed chunk of some (default: all) embeddings against its checksum.

        Also damage: a chunk of a complete embedding without a committed record, and an array
        whose ``zarr.json`` is missing or disagrees with the catalog row (the chunks are then
        judged in the catalog's layout). Temporary files of killed writes are listed apart (see
        :mod:`store.verify`); so are, when the whole store is checked, its leftovers: files and
        folders no catalog row names, and temporaries of interrupted ingests and saves (see
        :mod:`store.leftovers`), and the datasets stored with a value kind, given at ingest, that their
        values contradict (``report.datasets``, with the ``scdm ingest --update`` command that fixes each).

        Parameters
        ----------
        embedding_ids
            Embedding ids (or unambiguous prefixes); default: every embedding in the store.
        repair
            Rewrite a damaged ``zarr.json`` from the catalog, put the bad chunks back to pending
            (:meth:`mark_chunks_pending`), so that rerunning the embedding's ``scdm embed`` command
            (``EmbeddingCheck.repair``) recomputes exactly those, and delete the temporary files of
            killed writes (unless a job writes the embedding now) and the store's leftovers whose
            writer is gone (:func:`store.leftovers.scan`).

        Returns
        -------
        VerifyReport
            One :class:`~store.verify.EmbeddingCheck` per embedding; ``report.ok`` when nothing is bad.
        """
        if repair:
            self.check_writable("mark damaged chunks for recomputation (verify --repair)")
        if embedding_ids is None:
            ids = self.query("SELECT embedding_id FROM embeddings ORDER BY created_at, embedding_id")["embedding_id"].tolist()
        else:
            ids = [embedding_ids] if isinstance(embedding_ids, str) else list(embedding_ids)
        checks = tuple(self._check_embedding(str(e), repair=repair) for e in ids)
        # the whole store is checked: also what interrupted or half-undone work left beside the catalog
        found = tuple(_leftovers.scan(self, remove=repair)) if embedding_ids is None else ()
        kinds = self._wrong_value_kinds() if embedding_ids is None else ()
        return _verify.VerifyReport(checks, found, kinds)

    def _wrong_value_kinds(self) -> tuple[_verify.WrongValueKind, ...]:
        """Datasets stored with a value kind given at ingest that their values contradict (ingest's own check).

        Only a given kind can be wrong (a detected one is what the values show), so only those datasets
        are read again, one pass over their matrix each.
        """
        found = []
        for dataset_id in self.query("SELECT dataset_id FROM datasets ORDER BY created_at, name")["dataset_id"]:
            info = self.dataset(str(dataset_id))
            given = info.options.get("x_kind")
            if given not in ("counts", "normalized") or given != info.x_kind:
                continue
            try:
                adata = self.open_anndata(info.dataset_id, backed=True)
            except ScdmError as err:  # a moved --no-copy source: not this check's to report
                logger.warning("dataset %r: its value kind was not checked (%s)", info.name, err)
                continue
            try:
                gene_ids = self.genes(info.dataset_id)["gene_id"].astype(str).to_numpy(object)
                scan = _ingest.scan_matrix(adata, gene_ids, np.asarray(adata.obs_names.astype(str), dtype=object))
            finally:
                if getattr(adata, "file", None) is not None:
                    adata.file.close()
            problem = _ingest.contradicted_x_kind(given, scan)
            if problem is not None:
                fix = _verify.value_kind_fix(info.name, info.source_path, info.options.get("gene_key"), scan.x_kind)
                found.append(_verify.WrongValueKind(info.name, given, scan.x_kind, problem, fix))
        return tuple(found)

    def _check_embedding(self, embedding_id: str, *, repair: bool) -> _verify.EmbeddingCheck:
        emb, status = self._embedding_and_status(embedding_id)
        sums = self._chunk_checksums(emb.embedding_id)
        dataset = self._dataset_name(emb.dataset_id)
        problem = _zarr.metadata_problem(emb.location, emb.spec)
        metadata = None if problem is None else f"array metadata file {_zarr.metadata_file(emb.location)} {problem}"
        rewritten = repair and self._repair_metadata(emb) is not None  # first: the chunks are then checked as reads see them
        try:
            damage = self._chunk_damage(emb, status, sums)
        except ArrayMetadataError:  # a remote array without usable metadata: its chunks are judged once it is rewritten
            damage = _unrecorded(emb, sums) if status == "complete" else []
        bad = tuple(
            _verify.BadChunk(emb.embedding_id, emb.model, dataset, err.chunk, emb.chunk_bounds(err.chunk), err.path,
                             err.reason, err.detail)
            for err in damage
        )
        hint = _verify.repair_hint(self, emb) if bad or metadata else None
        if bad and repair:
            self.mark_chunks_pending(emb.embedding_id, [b.chunk for b in bad])
        leftovers = tuple(str(p) for p in self._leftover_partials(emb, remove=repair))
        return _verify.EmbeddingCheck(emb.embedding_id, emb.model, emb.variant, dataset, status, emb.n_chunks, len(sums),
                                      bad, hint, marked_pending=bool(bad) and repair, metadata=metadata,
                                      metadata_rewritten=rewritten, leftovers=leftovers, leftovers_removed=repair and bool(leftovers))

    def _leftover_partials(self, emb: Embedding, *, remove: bool) -> list[Path]:
        """Temporary files that interrupted writes left in the array (deleted with ``remove``).

        None are listed while a job writes the embedding: its own temporary files are live.
        """
        folder = self._claims_folder(emb.embedding_id)
        if remove:
            return _remove_leftovers(folder, emb.location)
        return [] if _claims.live_writers(folder) else _zarr.partial_files(emb.location)

    def mark_chunks_pending(self, embedding_id: str, chunks: Iterable[int]) -> None:
        """Put committed chunks back to pending so that the resume path recomputes them.

        Their catalog rows are deleted and the embedding's status goes back to ``pending`` in one
        transaction (readers stop trusting those chunks at once); then their files are deleted,
        so that a partial read shows the fill value rather than damaged bytes.
        """
        self.check_writable("mark chunks for recomputation")
        emb = self.embedding(embedding_id)
        todo = sorted({int(c) for c in chunks})
        for c in todo:
            emb.chunk_bounds(c)  # refuses chunks out of range
        if not todo:
            return
        with self.catalog.transaction() as con:
            con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ? AND list_contains(?, chunk)", [emb.embedding_id, todo])
            con.execute("UPDATE embeddings SET status = 'pending', completed_at = NULL WHERE embedding_id = ?", [emb.embedding_id])
        self._complete = {k: v for k, v in self._complete.items() if v.embedding_id != emb.embedding_id}
        self._chunk_sums.pop(emb.embedding_id, None)
        for c in todo:
            _zarr.remove_chunk(emb.location, c)
        logger.warning("embedding %s (%s): chunk(s) %s marked pending for recomputation", emb.embedding_id, emb.model,
                       ", ".join(map(str, todo)))

    def _dataset_name(self, dataset_id: str) -> str:
        frame = self.query("SELECT name FROM datasets WHERE dataset_id = ?", [dataset_id])
        return str(frame["name"].iloc[0]) if len(frame) else dataset_id

    def _damaged(self, emb: Embedding, err: ChunkCorruptError) -> ChunkCorruptError:
        """The read error a user sees: which embedding, model, dataset, chunk and file, and the fix."""
        lo, hi = emb.chunk_bounds(err.chunk)
        msg = (
            f"Embedding {emb.embedding_id} ({emb.model}, {emb.variant}) of dataset {self._dataset_name(emb.dataset_id)!r} "
            f"is damaged: chunk {err.chunk} of {emb.n_chunks} (rows {lo}-{hi - 1}) failed verification, {err.reason} ({err.detail}). "
            f"File: {err.path}. No data was returned. Recompute exactly the bad chunks with: "
            f"{_verify.repair_hint(self, emb)}; `scdm verify --embedding {emb.embedding_id}` lists every bad chunk."
        )
        return ChunkCorruptError(msg, chunk=err.chunk, path=err.path, reason=err.reason, detail=err.detail,
                                 embedding_id=emb.embedding_id)

    def _bad_metadata(self, emb: Embedding, err: ArrayMetadataError) -> ArrayMetadataError:
        """The read error a user sees when the array's ``zarr.json`` is missing or disagrees with the catalog, and the fix."""
        msg = (
            f"Embedding {emb.embedding_id} ({emb.model}, {emb.variant}) of dataset {self._dataset_name(emb.dataset_id)!r} "
            f"is damaged: its array metadata file {err.path} {err.detail}. No data was returned. Rewrite the file from the "
            f"catalog and re-check every chunk with `scdm verify --repair --embedding {emb.embedding_id}` (chunks that do "
            f"not match are recomputed as for any damaged chunk)."
        )
        return ArrayMetadataError(msg, path=err.path, detail=err.detail, embedding_id=emb.embedding_id)


def _warn_label_confounders(adata: ad.AnnData, response: pd.Series, opts: _ingest.IngestOptions, name: str) -> None:
    """Warn when an obs column splits the labels perfectly and no sample ids were given."""
    import warnings

    from scdm.store.splits import SampleLeakageWarning

    skip = [opts.label_key] + [c for c in adata.obs.columns if str(c).startswith("response")]
    columns = _ingest.label_confounders(adata.obs, response, skip=skip)
    # a column with one value for a class restates the labels: grouping folds by it skips every fold
    restated = _ingest.restated_labels(adata.obs, response, columns)
    keys = [c for c in columns if c not in restated]
    if keys:
        msg = (f"dataset {name!r}: the labels are constant within each value of obs column(s) "
               f"{', '.join(map(repr, keys))}. If these are samples or conditions, ingest with "
               f"{option('sample_key', keys[0])} and evaluate with --split-scheme sample: cell-level folds would put cells of "
               "one sample on both sides and a head could score by recognising samples.")
        warnings.warn(msg, SampleLeakageWarning, stacklevel=3)
    if restated:
        each = "; ".join(f"{col!r} ({values})" for col, values in restated.items())
        msg = (f"dataset {name!r}: obs column(s) {each} restate the labels: a class is one value, so they are no sample "
               "key (folds grouped by one hold out a whole class, and every fold is skipped as its training cells hold "
               "one class). If a class is one sample or culture, no fold of this dataset alone tells the response from "
               "what else differs between them, and cell-level results can score that difference: evaluate it cross-data "
               "(held out as a study), or ingest more samples per class with their sample ids as sample key.")
        warnings.warn(msg, SampleLeakageWarning, stacklevel=3)


def _warn_other_name(info: DatasetInfo, name: str | None) -> None:
    """A name given for content the store already holds under another name: say which name it has."""
    if name is None or name == info.name:
        return
    msg = (f"dataset {name!r}: this content (expression matrix, gene ids and cell ids) is already in the store as "
           f"{info.name!r}; refer to it by that name ({name!r} was not added: a dataset has one name).")
    warnings.warn(msg, _ingest.IngestWarning, stacklevel=5)  # points at the ingest() call


def _changed_kinds(info: DatasetInfo, gene_ids: np.ndarray, opts: _ingest.IngestOptions) -> dict[str, tuple[str, str]]:
    """The gene id and value kinds these options set to other values than the stored ones: {field: (stored, given)}."""
    given = {
        "gene_id_kind": None if opts.gene_id_kind is None else _ingest.resolve_gene_id_kind(gene_ids, opts.gene_id_kind),
        "x_kind": None if opts.x_kind is None else _ingest.resolve_x_kind(opts.x_kind, info.x_kind),
    }
    return {k: (getattr(info, k), v) for k, v in given.items() if v is not None and v != getattr(info, k)}


def _kinds_text(kinds: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in kinds.items())


def _update_needed_message(info: DatasetInfo, changed: dict[str, tuple[Any, Any]], kinds: dict[str, tuple[str, str]]) -> str:
    what = "; ".join(f"{col}: stored {old!r}, given {new!r}" for col, (old, new) in {**changed, **kinds}.items())
    subjects = [s for s, on in (("cell metadata", changed), ("gene id kind", "gene_id_kind" in kinds),
                                ("value kind", "x_kind" in kinds)) if on]
    head = f"Dataset {info.name!r} is already in the store with other {' and '.join(subjects)} ({what})."
    if offers("update"):
        return f"{head} Pass {option('update')} to rewrite it, or leave those options out to use the stored dataset as it is."
    return f"{head} Leave those options out to use the stored dataset as it is (rewriting a stored dataset is not done here)."


def _kinds_in_use_message(info: DatasetInfo, kinds: dict[str, tuple[str, str]], users: list[tuple[Any, ...]]) -> str:
    shown = ", ".join(f"{model} {eid}" + ("" if ds == info.name else f" (of {ds!r}, fitted jointly)") for eid, model, ds in users[:5])
    more = f" and {len(users) - 5} more (see `scdm ls`)" if len(users) > 5 else ""
    return (f"Dataset {info.name!r} cannot change its {_kinds_text(kinds)}: {len(users)} embedding(s) were made with the "
            f"stored kinds and would no longer match it ({shown}{more}). Nothing was changed. Remove them "
            f"(`scdm rm --embedding ID`) and run this again, or start over: `scdm rm --dataset {info.name}` (its "
            "embeddings, splits and results go with it), then ingest the file with these options.")


def _file_labels_differ(adata: ad.AnnData, ls: labels.LabelSet, stored: np.ndarray) -> int:
    """Cells where ``adata.obs[ls.label_key]``, read with the label set's options, is not ``stored`` (-1 = none); 0 if no column."""
    if ls.label_key is None or ls.label_key not in adata.obs.columns:
        return 0
    try:
        with ignoring():  # the ingest's own warnings about the column were given when it was stored
            read = _ingest.normalise_response(adata.obs[ls.label_key], positive=ls.positive, unknown_values=ls.unknown_values)
    except InputDataError:
        return adata.n_obs  # the column no longer reads as labels with these options: none of it is the store's
    given = np.asarray(read.fillna(-1).to_numpy(dtype=np.int64), dtype=np.int8)
    return int((given != stored).sum())


def _label_source_difference(old: labels.LabelSet, opts: _ingest.IngestOptions) -> str:
    """Which reading options of a label set these options change, stored -> given (the name clash's cause)."""
    pairs = {"label_key": (old.label_key, opts.label_key), "positive": (old.positive, opts.positive),
             "unknown_values": (list(old.unknown_values), list(opts.unknown_values)), "drug": (old.drug, opts.drug)}
    if opts.drug is None:
        del pairs["drug"]  # no drug given matches the stored one (LabelSet.same_source)
    return ", ".join(f"{option(key)} ({a!r} stored, {b!r} given)" for key, (a, b) in pairs.items() if a != b)


def _gene_source(gene_key: str | None) -> str:
    return "var_names" if gene_key is None else f"var column {gene_key!r}"


def _writable(adata: ad.AnnData) -> ad.AnnData:
    """A shallow copy whose mixed-type object columns are strings (h5py cannot write them)."""
    obs = adata.obs.copy()
    for col in obs.columns:
        if obs[col].dtype == object and not all(isinstance(v, str) for v in obs[col]):
            obs[col] = obs[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    out = adata.copy() if adata.is_view else adata
    out = out.__class__(X=out.X, obs=obs, var=out.var, uns=out.uns, obsm=out.obsm, layers=out.layers)
    return out


def _check_dataset_name(name: str) -> None:
    """Result rows join the datasets of a pooled result with commas: a name with one would read as two."""
    if "," in name or not name.strip():
        msg = (f"Dataset name {name!r} cannot be used: it is empty or holds a comma (result rows join pooled datasets "
               f"with commas). Pass another with {option('name', 'NAME')}, e.g. {name.replace(',', '+').strip() or 'my-data'!r}.")
        raise InputDataError(msg)


def _first_difference(kind: str, given: np.ndarray, stored: np.ndarray) -> str | None:
    """Where a file's ids stop matching the ingested ones, in words (None: they all match)."""
    bad = np.flatnonzero(given != stored)
    if not bad.size:
        return None
    i = int(bad[0])
    return f"{bad.size} {kind} ids differ from the ingested ones (position {i}: {given[i]!r}, ingested {stored[i]!r})"


def _replace(info: DatasetInfo, **changes: Any) -> DatasetInfo:
    from dataclasses import replace

    return replace(info, **changes)


def _make_options(options: dict[str, Any]) -> _ingest.IngestOptions:
    fields = set(_ingest.IngestOptions.__dataclass_fields__)
    unknown = set(options) - fields
    if unknown:
        msg = f"Unknown ingest option(s): {', '.join(sorted(unknown))}. Known: {', '.join(sorted(fields))}."
        raise TypeError(msg)
    clean = {k: v for k, v in options.items() if v is not None}
    if "unknown_values" in clean:
        clean["unknown_values"] = tuple(clean["unknown_values"])
    return _ingest.IngestOptions(**clean)


def open_store(store: str | os.PathLike[str] | Store | None = None) -> Store:
    """Normalise a ``StoreLike`` (path, Store or None for the default) to a :class:`Store`."""
    return store if isinstance(store, Store) else Store(store)


# ---- writing jobs and their claims -----------------------------------------------------------
class EmbeddingJob:
    """This process writes one embedding: removal is refused meanwhile, and chunks are claimed.

    Several processes asked for the same embedding (two runs of one command, one per GPU) share
    its chunks: each claims a chunk before computing it and skips chunks that another live
    process holds (:meth:`claim`), then waits at the end for those (:meth:`wait_for`). A claim
    held by a process that died (even SIGKILLed) is free again, so its chunk is taken over. See
    :mod:`store._claims` for the lock files behind it.
    """

    POLL_S = 0.2
    """How often :meth:`wait_for` looks whether other processes' chunks are committed."""

    def __init__(self, emb: Embedding, *, wait_s: float = LOCK_RETRY_SECONDS, check: bool = True) -> None:
        self.emb = emb
        if check:
            # a job (re)starting the embedding clears what killed writers left; a writer's own short
            # job (check=False, one per write_chunk) skips it: it would list the array on every chunk
            removed = _remove_leftovers(_claims.claims_folder(emb.store.root, emb.embedding_id), emb.location)
            if removed:
                logger.info("embedding %s: removed %d temporary file(s) of interrupted writes", emb.embedding_id, len(removed))
        self._lease = _claims.JobLease(_claims.claims_folder(emb.store.root, emb.embedding_id), emb.embedding_id, wait_s=wait_s)
        try:
            # a writer's own short job skips this read: its commit checks the row in its transaction
            if check and emb.store.query("SELECT 1 FROM embeddings WHERE embedding_id = ?", [emb.embedding_id]).empty:
                raise _removed_error(emb.embedding_id, "before this job started")
        except BaseException:
            self._lease.close()
            raise

    def __enter__(self) -> EmbeddingJob:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the job: release every claim and the job's lock."""
        self._lease.close()

    def claim(self, chunk: int) -> bool:
        """Claim ``chunk`` for this process (never waits).

        Returns
        -------
        bool
            True: this process holds the claim and the chunk is not committed, so compute it.
            False: another live process holds it, or it is committed already.

        Raises
        ------
        EmbeddingNotFoundError
            The embedding was removed meanwhile.
        """
        if self._lease.holds(chunk):
            return True
        if not self._lease.try_claim(chunk):
            return False
        try:
            done = int(chunk) in self._committed([int(chunk)])
        except BaseException:
            self._lease.release(chunk)
            raise
        if done:  # committed by another process since this one listed what was missing
            self._lease.release(chunk)
        return not done

    def release(self, chunks: Iterable[int]) -> None:
        """Give up the claims on ``chunks`` (their rows committed, or not computed after all)."""
        for chunk in chunks:
            self._lease.release(chunk)

    def holder(self, chunk: int) -> str | None:
        """Who holds the claim on ``chunk`` (``pid ... on host ... since ...``), if another process does."""
        info = self._lease.holder(chunk)
        return None if info is None else info.describe()

    def wait_for(self, chunks: Iterable[int], *, between: Any = None) -> list[int]:
        """Wait until each chunk is committed by its claimer, or free to claim (its claimer died).

        Returns the chunks this process claimed meanwhile (it must compute them, then call again
        for the rest), or an empty list once all are committed. ``between`` is called on each
        look (a writer commits its own rows there).
        """
        remaining = sorted({int(c) for c in chunks})
        told = False
        while remaining:
            if between is not None:
                between()
            done = self._committed(remaining)
            remaining = [c for c in remaining if c not in done]
            mine = [c for c in remaining if self.claim(c)]
            if mine:
                return mine
            if remaining:
                if not told:
                    who = "; ".join(sorted({h for h in (self.holder(c) for c in remaining) if h})) or "other processes"
                    logger.info("embedding %s: waiting for %d chunk(s) that %s compute", self.emb.embedding_id, len(remaining), who)
                    told = True
                time.sleep(self.POLL_S)
        return []

    def _committed(self, chunks: list[int]) -> set[int]:
        """Which of ``chunks`` are committed; raises when the embedding is gone."""
        frame = self.emb.store.query(
            "SELECT e.embedding_id, k.chunk FROM embeddings e LEFT JOIN embedding_chunks k "
            "ON k.embedding_id = e.embedding_id AND list_contains(?, k.chunk) WHERE e.embedding_id = ?",
            [chunks, self.emb.embedding_id],
        )
        if frame.empty:
            raise _removed_error(self.emb.embedding_id, "while this job was writing it")
        return {int(c) for c in frame["chunk"].dropna()}


CHUNK_COLUMNS = ("embedding_id", "chunk", "n_rows", "checksum", "seconds", "token_lengths")
"""Columns of an ``embedding_chunks`` row a writer supplies (``written_at`` is the commit time)."""


def _unrecorded(emb: Embedding, sums: dict[int, str]) -> list[ChunkCorruptError]:
    """The chunks with no committed record, as damage: of a complete embedding, every chunk must have one."""
    detail = ("the embedding is marked complete, but the catalog holds no committed checksum for this chunk: its rows "
              "cannot be verified, and a deleted chunk file would read as zeros")
    errors = []
    for chunk in range(emb.n_chunks):
        if chunk not in sums:
            path = f"{emb.location}/c/{chunk}/0"
            errors.append(ChunkCorruptError(f"Chunk {chunk} ({path!r}) failed verification, no record: {detail}.",
                                            chunk=chunk, path=path, reason="no record", detail=detail))
    return errors


def _raise_first(errors: Sequence[BaseException]) -> None:
    if errors:
        raise errors[0]


def _remove_leftovers(claims: Path, location: _zarr.ArrayLocation) -> list[Path]:
    """Delete the temporary files that killed writers left in an array, unless a job writes it now.

    Holding the embedding's job lock exclusively proves that no job runs, and every writer runs in
    one (a :class:`ChunkWriter` in its own or its runner's, Ray workers under their driver's), so
    no temporary file there is about to be renamed into place.
    """
    if not _zarr.partial_files(location):
        return []  # the common case: no lock file is created for nothing
    held = _claims.try_exclusive(claims)
    if held is None:
        return []  # a job writes now: its temporaries may be live; a later job or `scdm verify --repair` removes the rest
    try:
        return _zarr.remove_partials(location)
    finally:
        _claims.release(held)


def _row_indices(rows: np.ndarray | Sequence[int], n_cells: int) -> np.ndarray:
    """``rows`` as int64 row numbers: a boolean mask selects its True rows (never rows 0 and 1).

    A mask cast to integers would read cells 0 and 1 over and over, and 2.7 would read cell 2: both
    give a matrix of the expected shape whose rows belong to other cells, so they are refused.
    """
    picked = np.asarray(rows)
    if picked.dtype == object and picked.ndim == 1:
        picked = np.asarray(picked.tolist())  # an object array of Python ints (or bools): numbers again
    if picked.ndim != 1:
        msg = f"rows must be a 1-D list of row numbers or a boolean mask; got an array of shape {picked.shape}."
        raise InputDataError(msg)
    if picked.dtype == bool:
        if picked.size != n_cells:
            msg = f"A boolean rows mask needs one entry per cell ({n_cells}); got {picked.size}."
            raise InputDataError(msg)
        return np.flatnonzero(picked)
    if picked.size == 0:
        return picked.astype(np.int64)
    if picked.dtype.kind in "iu":
        return picked.astype(np.int64)
    if picked.dtype.kind == "f" and np.all(np.isfinite(picked)) and np.all(picked == np.round(picked)):
        return picked.astype(np.int64)
    msg = (f"rows must be whole row numbers (0-based positions in the dataset) or a boolean mask; got {picked.dtype} "
           f"values such as {str(picked[0])!r}. For cell ids, map them to rows first, e.g. via store.cells(dataset).")
    raise InputDataError(msg)


def _removed_error(embedding_id: str, when: str) -> EmbeddingNotFoundError:
    msg = (f"Embedding {embedding_id} was removed {when}; this job stops and commits nothing more. "
           "Run the same command again to compute it anew.")
    return EmbeddingNotFoundError(msg)


def _require_row(con: Any, embedding_id: str) -> None:
    """Inside a write transaction: raise unless the embedding's catalog row exists."""
    if con.execute("SELECT 1 FROM embeddings WHERE embedding_id = ?", [embedding_id]).fetchone() is None:
        raise _removed_error(embedding_id, "while this job was writing it")


def _array_whole(location: _zarr.ArrayLocation) -> bool:
    """Whether the array at ``location`` has its metadata (a folder of chunk files alone is no array)."""
    path = _zarr.local_path(location)
    if path is not None:
        return (path / "zarr.json").is_file()
    return _zarr.array_exists(location)


def _some(chunks: Sequence[int], n: int = 10) -> str:
    return f"{list(chunks[:n])}{'...' if len(chunks) > n else ''}"


def _check_size(name: str, value: Any, minimum: int = 1) -> None:
    """Refuse a size that is not an integer >= ``minimum`` (before anything is created)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}; got {value!r}."
        raise InputDataError(msg)


ENV_READ_ONLY = "SCDM_READ_ONLY"
"""Environment variable: ``1``/``true`` opens stores read-only (``0``/``false``: never automatically)."""


def _read_only_mode(root: Path, asked: bool | None) -> tuple[bool, str]:
    """(read-only?, why) for a store at ``root``: asked for, set in the environment, or not writable."""
    if asked is not None:
        return asked, "opened read-only on request: read_only=True or --read-only"
    env = os.environ.get(ENV_READ_ONLY, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True, f"{ENV_READ_ONLY}={os.environ[ENV_READ_ONLY]}"
    if env in ("0", "false", "no", "off"):
        return False, ""
    catalog = root / CATALOG_FILE
    if catalog.exists() and not (os.access(root, os.W_OK) and os.access(catalog, os.W_OK)):
        return True, "this user may not write to it"
    return False, ""


_STORE_ENTRIES = frozenset({EMBEDDINGS_DIR, DATASETS_DIR, ARTIFACTS_DIR, _claims.CLAIMS_DIR})
"""What a store folder holds beside its catalog."""
_IGNORED_ENTRIES = frozenset({".DS_Store"})
"""Files the system may put in any folder (a Finder view of an empty one)."""


def _check_store_folder(root: Path) -> None:
    """Refuse to make a store in a folder that holds something else: it would be strewn with store files.

    A store is its ``catalog.duckdb``. A folder without one becomes a store only if it is missing,
    empty, or holds nothing but the empty sub-folders of a store whose creation was interrupted.
    A typo'd ``--store`` (a data folder, the home folder) otherwise got a catalog and three
    sub-folders from even a read command such as ``scdm ls``.
    """
    if (root / CATALOG_FILE).is_file() or not root.exists():
        return
    if not root.is_dir():
        msg = f"--store {str(root)!r} is a file, not a folder. Give the store's folder, or a new or empty folder to make a store in."
        raise ScdmError(msg)
    try:
        entries = sorted(p for p in root.iterdir() if p.name not in _IGNORED_ENTRIES and not p.name.startswith(".scdm-write-probe-"))
    except OSError:
        return  # unreadable: _make_dirs reports what the system says
    if not entries:
        return
    used = [p.name for p in entries if p.name in _STORE_ENTRIES and p.is_dir() and any(p.iterdir())]
    if used and all(p.name in _STORE_ENTRIES for p in entries):
        msg = (f"{str(root)!r} holds {', '.join(f'{n}/' for n in used)} of an scdm store but no {CATALOG_FILE}: its catalog was "
               f"deleted or moved. Put {CATALOG_FILE} back into that folder, or give a new or empty folder to start another store.")
        raise StoreDamagedError(msg)
    if not used and all(p.name in _STORE_ENTRIES and p.is_dir() for p in entries):
        return  # a store whose creation stopped before its catalog was made
    shown = ", ".join(repr(p.name) for p in entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    msg = (f"{str(root)!r} is not an scdm store (it has no {CATALOG_FILE}) and is not empty (it holds {shown}); scdm does not "
           f"turn a folder of other files into a store. Give the store's folder with --store (or {ENV_STORE}), or a new or empty "
           "folder to make a store in.")
    raise ScdmError(msg)


def _check_readable_store(root: Path, why: str) -> None:
    """A store opened read-only must exist already: nothing is created."""
    if not (root / CATALOG_FILE).is_file():
        what = "does not exist" if not root.exists() else f"holds no {CATALOG_FILE}"
        if root.is_dir() and any(p.name not in _IGNORED_ENTRIES for p in root.iterdir()):  # a folder of other files
            msg = (f"Cannot open {str(root)!r} read-only ({why}): it {what}, so it is not an scdm store. "
                   f"Point --store (or {ENV_STORE}) at an existing store's folder.")
            raise ScdmError(msg)
        msg = (f"Cannot open {str(root)!r} read-only ({why}): it {what}, so it is not an scdm store yet. "
               "Create it first with write access (e.g. `scdm ingest FILE.h5ad`), or point --store at an existing store.")
        raise ScdmError(msg)
