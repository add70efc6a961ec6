"""The :class:`Store`: one directory holding the DuckDB catalog and the Zarr embedding arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
import time

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd

from store import _ingest, _zarr
from store._catalog import Catalog
from store._constants import (
    ARTIFACTS_DIR,
    CATALOG_FILE,
    DATASETS_DIR,
    DEFAULT_STORE,
    EMBEDDINGS_DIR,
    ENV_STORE,
)
from store.errors import (
    DatasetNotFoundError,
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
    ScdmError,
    StoreFormatError,
)

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["Store", "StoreLike", "DatasetInfo", "Embedding", "ChunkTarget", "ChunkRecord", "open_store", "default_store_path", "space_id_of"]

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


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


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


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk whose rows are written to the array, waiting to be committed in the catalog."""

    chunk: int
    n_rows: int
    checksum: str
    """:func:`store._zarr.chunk_checksum` of the rows as stored."""
    seconds: float | None = None
    """Time spent computing the chunk (telemetry)."""


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

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last row of ``chunk``."""
        if not 0 <= chunk < self.n_chunks:
            msg = f"Chunk {chunk} is out of range: embedding {self.embedding_id} has chunks 0..{self.n_chunks - 1}."
            raise IndexError(msg)
        lo = chunk * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self.n_cells)

    def checked_block(self, chunk: int, block: np.ndarray) -> tuple[int, np.ndarray]:
        """(first row, block in the stored dtype); refuses a wrong shape or non-finite values."""
        lo, hi = self.chunk_bounds(chunk)
        block = np.asarray(block)
        if block.shape != (hi - lo, self.dim):
            msg = f"Chunk {chunk} needs an array of shape ({hi - lo}, {self.dim}); got {block.shape}."
            raise InputDataError(msg)
        if not np.isfinite(block).all():
            msg = f"Chunk {chunk} of embedding {self.embedding_id} holds NaN or inf; refusing to store it (the model diverged? try --precision fp32)."
            raise InputDataError(msg)
        return lo, block.astype(self.dtype, copy=False)

    def write(self, chunk: int, block: np.ndarray, *, seconds: float | None = None, array: Any = None) -> ChunkRecord:
        """Write one chunk's rows to the array (not the catalog) and return the record to commit.

        ``array`` is an already open :func:`store._zarr.open_array` of this target (saves reopening it
        for every chunk).
        """
        lo, block = self.checked_block(chunk, block)
        arr = array if array is not None else _zarr.open_array(self.location)
        arr[lo:lo + block.shape[0]] = block
        return ChunkRecord(chunk, int(block.shape[0]), _zarr.chunk_checksum(block), seconds)

    def stored_checksum(self, chunk: int) -> str | None:
        """Checksum of the chunk's rows as they are stored now (None when its chunk data is absent)."""
        lo, hi = self.chunk_bounds(chunk)
        if not _zarr.chunk_present(self.location, chunk):
            return None
        block = _zarr.read_rows(self.location, np.arange(lo, hi), out_dtype=self.dtype)
        return _zarr.chunk_checksum(block)


@dataclass(frozen=True)
class Embedding:
    """Handle on one embedding in a store: write chunks, list what is missing, finalize."""

    store: "Store"
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

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """First and one-past-last row of ``chunk``."""
        return self.target().chunk_bounds(chunk)

    def written_chunks(self) -> list[int]:
        frame = self.store.catalog.query(
            "SELECT chunk FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk", [self.embedding_id]
        )
        return frame["chunk"].astype(int).tolist()

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

    def writer(self, *, commit_every_s: float = 1.0) -> "ChunkWriter":
        """A writer that flushes each chunk's data at once but commits catalog rows in batches.

        Use it for long jobs: one catalog commit costs tens of milliseconds, so committing every
        chunk would dominate writing. A chunk still counts only after its data is on disk and its
        row committed; a crash loses at most the last ``commit_every_s`` seconds of chunks.
        """
        return ChunkWriter(self, commit_every_s=commit_every_s)

    def _checked_block(self, chunk: int, block: np.ndarray) -> tuple[int, np.ndarray]:
        return self.target().checked_block(chunk, block)

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
        """
        if not records:
            return []
        chunks = [int(r.chunk) for r in records]
        with self.store.catalog.transaction() as con:
            have = dict(con.execute(
                "SELECT chunk, checksum FROM embedding_chunks WHERE embedding_id = ? AND list_contains(?, chunk)",
                [self.embedding_id, chunks],
            ).fetchall())
            fresh = [r for r in records if have.get(r.chunk) != r.checksum]
            if not fresh:
                return []
            con.executemany(
                "INSERT OR REPLACE INTO embedding_chunks VALUES (?, ?, ?, ?, ?, now())",
                [[self.embedding_id, r.chunk, r.n_rows, r.checksum, r.seconds] for r in fresh],
            )
        for r in fresh:
            if r.chunk in have:
                logger.warning("chunk %d of embedding %s was committed before with checksum %s; the array now holds %s",
                               r.chunk, self.embedding_id, have[r.chunk], r.checksum)
        return [r.chunk for r in fresh]

    def finalize(self, *, telemetry: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> None:
        """Mark complete once every chunk is committed, with telemetry and gene audit."""
        missing = self.missing_chunks()
        if missing:
            msg = f"Embedding {self.embedding_id} still misses chunks {missing[:10]}{'...' if len(missing) > 10 else ''}; write them before finalize()."
            raise EmbeddingIncompleteError(msg)
        self.store.catalog.execute(
            "UPDATE embeddings SET status = 'complete', completed_at = now(), telemetry = ?, "
            "audit = COALESCE(?, audit) WHERE embedding_id = ?",
            [_canonical_json(telemetry or {}), _canonical_json(audit) if audit is not None else None, self.embedding_id],
        )

    def set_audit(self, audit: dict[str, Any]) -> None:
        self.store.catalog.execute("UPDATE embeddings SET audit = ? WHERE embedding_id = ?", [_canonical_json(audit), self.embedding_id])

    @property
    def status(self) -> str:
        frame = self.store.catalog.query("SELECT status FROM embeddings WHERE embedding_id = ?", [self.embedding_id])
        return str(frame["status"].iloc[0]) if len(frame) else "removed"

    def read(self, rows: np.ndarray | None = None, *, allow_partial: bool = False) -> np.ndarray:
        return self.store.read_embedding(self.embedding_id, rows=rows, allow_partial=allow_partial)


_CHECKSUM_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scdm-checksum")


class ChunkWriter:
    """Writes chunks of one embedding; catalog rows are committed in batches (see :meth:`Embedding.writer`).

    Chunk files are written by a small thread pool, so the next chunk is computed (or written) while
    the last one goes to disk; a chunk's catalog row is committed only after its write finished.
    """

    def __init__(self, emb: Embedding, *, commit_every_s: float = 1.0, max_in_flight: int = 2) -> None:
        self.emb = emb
        self.commit_every_s = commit_every_s
        self.max_in_flight = max_in_flight
        self._array = _zarr.open_array(emb.location)
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="scdm-chunk-writer")
        self._in_flight: list[tuple[Future[str], list[Any]]] = []
        self._pending: list[list[Any]] = []
        self._last_commit = time.monotonic()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._drain(wait=True)  # whatever went wrong, chunks whose data is on disk are kept
            self.commit()
        finally:
            self._pool.shutdown(wait=True)

    def _write_file(self, lo: int, block: np.ndarray) -> str:
        checksum = _CHECKSUM_POOL.submit(_zarr.chunk_checksum, block)  # overlaps the file write (both release the GIL)
        self._array[lo:lo + block.shape[0]] = block
        return checksum.result()

    def write(self, chunk: int, block: np.ndarray, *, seconds: float | None = None) -> None:
        """Queue one chunk's rows for writing (atomic chunk file); its catalog row follows the write."""
        lo, block = self.emb._checked_block(chunk, block)
        while len(self._in_flight) >= self.max_in_flight:
            self._drain(wait=True, at_most=1)
        future = self._pool.submit(self._write_file, lo, block)
        self._in_flight.append((future, [self.emb.embedding_id, chunk, block.shape[0], None, seconds]))
        self._drain(wait=False)
        if time.monotonic() - self._last_commit >= self.commit_every_s:
            self.commit()

    def _drain(self, *, wait: bool, at_most: int | None = None) -> None:
        """Move finished writes (oldest first) to the rows waiting for a commit; re-raise write errors."""
        done = 0
        while self._in_flight and (wait or self._in_flight[0][0].done()):
            if at_most is not None and done >= at_most:
                return
            future, row = self._in_flight.pop(0)
            row[3] = future.result()
            self._pending.append(row)
            done += 1

    def commit(self) -> None:
        """Commit the rows of finished writes in one transaction."""
        self._drain(wait=False)
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        with self.emb.store.catalog.transaction() as con:
            con.executemany("INSERT OR REPLACE INTO embedding_chunks VALUES (?, ?, ?, ?, ?, now())", rows)
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

    Examples
    --------
    >>> st = Store("my-store")                                   # doctest: +SKIP
    >>> ds = st.ingest("a375.h5ad", label_key="response_PLX4720")  # doctest: +SKIP
    >>> st.datasets()                                            # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, arrays_url: str | None = None) -> None:
        self.root = Path(path) if path is not None else default_store_path()
        self.root = self.root.expanduser()
        self.arrays_url = _zarr.check_arrays_url(arrays_url) if arrays_url else None
        self._make_dirs()
        self.catalog = Catalog(self.root / CATALOG_FILE)
        self.catalog.migrate(_scdm_version())
        self._complete: dict[str, Embedding] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _make_dirs(self) -> None:
        try:
            for sub in (EMBEDDINGS_DIR, DATASETS_DIR, ARTIFACTS_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / ".scdm-write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            msg = (
                f"Cannot write to the store directory {str(self.root)!r} ({err.strerror}). Choose a writable "
                f"location with --store PATH or the {ENV_STORE} environment variable."
            )
            raise ScdmError(msg) from err

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
        """User-facing read-only SQL: writes, COPY, ATTACH and file access are refused."""
        return self.catalog.read_only_query(query, max_rows=max_rows, timeout_s=timeout_s)

    # ---- datasets ----------------------------------------------------------------------------
    def ingest(self, data: "str | os.PathLike[str] | ad.AnnData", *, name: str | None = None, copy: bool = True, **options: Any) -> DatasetInfo:
        """Add an AnnData (``.h5ad`` path or object) to the store; a no-op if its content is there.

        Parameters
        ----------
        data
            Path of an ``.h5ad`` file (read in backed mode) or an AnnData.
        name
            Unique dataset name; default: the file stem (``"dataset"`` for an in-memory object).
        copy
            Keep a copy of the data inside the store (default). With ``False`` the store refers to
            the source file, which must then stay where it is.
        **options
            Fields of :class:`store._ingest.IngestOptions`: ``label_key``, ``positive``,
            ``unknown_values``, ``study_key``/``study``, ``sample_key``/``sample``,
            ``tissue_key``/``tissue``, ``cancer_key``/``cancer_type``, ``drug_type_key``/``drug_type``,
            ``regimen_key``/``regimen``, ``gene_key``, ``gene_id_kind``, ``x_kind``.

        Returns
        -------
        DatasetInfo
            ``created`` tells whether this call added it.
        """
        opts = _make_options(options)
        adata, source = _ingest.open_anndata(data)
        try:
            return self._ingest_open(adata, source, opts, name=name, copy=copy)
        finally:
            if source is not None and getattr(adata, "file", None) is not None:
                adata.file.close()

    def _ingest_open(self, adata: "ad.AnnData", source: str | None, opts: _ingest.IngestOptions, *, name: str | None, copy: bool) -> DatasetInfo:
        name = name or (Path(source).stem if source else "dataset")
        gene_ids = _ingest.gene_ids_of(adata, opts.gene_key)
        cell_ids = np.asarray(adata.obs_names.astype(str), dtype=object)
        _ingest.check_ids(gene_ids, cell_ids)
        cells = _ingest.cell_table(adata, opts, default_study=name)  # label problems surface before the long scan
        scan = _ingest.scan_matrix(adata, gene_ids, cell_ids)
        existing = self.query("SELECT dataset_id, name FROM datasets WHERE content_hash = ?", [scan.content_hash])
        if len(existing):
            info = self.dataset(str(existing["dataset_id"].iloc[0]))
            if info.options != opts.to_json_dict():
                logger.warning(
                    "dataset %r is already in the store with other ingest options (%s); kept as it was. "
                    "Remove it with `scdm rm --dataset %s` to ingest it again with new options.",
                    info.name, info.options, info.name,
                )
            return info
        if len(self.query("SELECT 1 FROM datasets WHERE name = ?", [name])):
            msg = f"A different dataset named {name!r} is already in the store. Pass another name (--name) or remove the old one (scdm rm --dataset {name})."
            raise InputDataError(msg)
        kind = _ingest.resolve_gene_id_kind(gene_ids, opts.gene_id_kind)
        x_kind = opts.x_kind or scan.x_kind
        if x_kind not in _ingest.X_KINDS:
            msg = f"Unknown value kind {x_kind!r}; use one of {', '.join(_ingest.X_KINDS)}."
            raise InputDataError(msg)
        dataset_id = scan.content_hash[:16]
        stored = self._store_copy(adata, source, dataset_id) if copy else None
        genes = _ingest.gene_table_frame(gene_ids, kind)
        genes.insert(0, "dataset_id", dataset_id)
        cells.insert(0, "dataset_id", dataset_id)
        try:
            with self.catalog.transaction() as con:
                con.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [dataset_id, name, scan.content_hash, scan.n_cells, scan.n_genes, kind, x_kind,
                     scan.x_format, source, stored or source, _canonical_json(opts.to_json_dict())],
                )
                self.catalog.insert_df("genes", genes, con)
                self.catalog.insert_df("cells", cells, con)
        except BaseException:
            if stored:
                (self.root / stored).unlink(missing_ok=True)
            raise
        logger.info("ingested %s: %d cells x %d genes (%s, %s ids)", name, scan.n_cells, scan.n_genes, x_kind, kind)
        return _replace(self.dataset(dataset_id), created=True)

    def _store_copy(self, adata: "ad.AnnData", source: str | None, dataset_id: str) -> str:
        rel = f"{DATASETS_DIR}/{dataset_id}.h5ad"
        final = self.root / rel
        if final.exists():
            return rel
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{dataset_id}-", suffix=".h5ad.tmp")
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
        """All datasets, with labelled-cell counts, newest last."""
        return self.query(
            "SELECT d.dataset_id, d.name, d.n_cells, d.n_genes, d.gene_id_kind, d.x_kind, "
            "count(c.response) AS n_labelled, sum(c.response) AS n_sensitive, d.source_path, d.created_at "
            "FROM datasets d LEFT JOIN cells c USING (dataset_id) GROUP BY ALL ORDER BY d.created_at, d.name"
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

    def cells(self, datasets: str | Iterable[str] | None = None) -> pd.DataFrame:
        """Cell metadata of some (default: all) datasets, in dataset then row order."""
        if datasets is None:
            return self.query("SELECT * FROM cells ORDER BY dataset_id, row")
        names = [datasets] if isinstance(datasets, str) else list(datasets)
        ids = [self.dataset(n).dataset_id for n in names]
        frame = self.query("SELECT * FROM cells WHERE list_contains(?, dataset_id) ORDER BY dataset_id, row", [ids])
        frame["response"] = frame["response"].astype("Int8")
        return frame

    def genes(self, dataset: str) -> pd.DataFrame:
        """The dataset's genes in matrix column order: gene_id, symbol, ensembl."""
        ds = self.dataset(dataset)
        return self.query("SELECT idx, gene_id, symbol, ensembl FROM genes WHERE dataset_id = ? ORDER BY idx", [ds.dataset_id])

    def open_anndata(self, dataset: str, *, backed: bool = True) -> "ad.AnnData":
        """The dataset's AnnData (backed read-only by default: memory does not grow with cells)."""
        import anndata as ad

        ds = self.dataset(dataset)
        path = Path(ds.stored_path)
        path = path if path.is_absolute() else self.root / path
        if not path.exists():
            msg = f"The data of dataset {ds.name!r} is gone from {str(path)!r}. Restore the file or ingest it again."
            raise DatasetNotFoundError(msg)
        return ad.read_h5ad(path, backed="r" if backed else None)

    def remove_dataset(self, dataset: str) -> list[str]:
        """Delete a dataset, its cells, genes and embeddings. Returns the removed embedding ids."""
        ds = self.dataset(dataset)
        removed = [self.remove_embedding(e) for e in self.query("SELECT embedding_id FROM embeddings WHERE dataset_id = ?", [ds.dataset_id])["embedding_id"]]
        with self.catalog.transaction() as con:
            for table in ("cells", "genes", "datasets"):
                con.execute(f"DELETE FROM {table} WHERE dataset_id = ?", [ds.dataset_id])
        if ds.stored_path.startswith(DATASETS_DIR):
            (self.root / ds.stored_path).unlink(missing_ok=True)
        return removed

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
        """
        ds = self.dataset(dataset)
        if dim < 1:
            msg = f"Embedding dim must be >= 1; got {dim}."
            raise InputDataError(msg)
        found = self.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=checkpoint_hash,
                                   adapter_hash=adapter_hash, variant=variant, dtype=dtype)
        if found is not None:
            return found
        space = space_id_of(model, checkpoint_hash, adapter_hash, variant, params)
        embedding_id = _short_hash("embedding", ds.content_hash, space, dtype)
        rows = chunk_rows or _zarr.default_chunk_rows(dim, dtype)
        # array_path is relative to the store root, or a URL when arrays live elsewhere
        rel = f"{self.arrays_url}/{embedding_id}.zarr" if self.arrays_url else f"{EMBEDDINGS_DIR}/{embedding_id}.zarr"
        _zarr.create_array(
            rel if self.arrays_url else self.root / rel, n_rows=ds.n_cells, dim=dim, dtype=dtype, chunk_rows=rows, compressor=compressor,
            attrs={"embedding_id": embedding_id, "dataset_id": ds.dataset_id, "model": model, "variant": variant},
        )
        n_chunks = -(-ds.n_cells // rows)
        self.execute(
            "INSERT OR IGNORE INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', now(), NULL, NULL, NULL)",
            [embedding_id, ds.dataset_id, space, model, variant, checkpoint_hash, adapter_hash,
             _canonical_json(params), dim, dtype, ds.n_cells, rows, n_chunks, rel],
        )
        return self._handle(self.query("SELECT * FROM embeddings WHERE embedding_id = ?", [embedding_id]).iloc[0])

    def get_embedding(self, dataset: str, *, model: str, params: dict[str, Any], checkpoint_hash: str | None = None,
                      adapter_hash: str | None = None, variant: str = "frozen", dtype: str = "float32") -> Embedding | None:
        """The embedding with exactly these settings, or None (nothing is created)."""
        ds = self.dataset(dataset)
        space = space_id_of(model, checkpoint_hash, adapter_hash, variant, params)
        embedding_id = _short_hash("embedding", ds.content_hash, space, dtype)
        found = self.query("SELECT * FROM embeddings WHERE embedding_id = ?", [embedding_id])
        return self._handle(found.iloc[0]) if len(found) else None

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
        frame = self.query(sql + " ORDER BY created_at", args)
        if len(frame) != 1:
            if len(frame) == 0:
                msg = f"No {status or ''} {model} ({variant}) embedding of dataset {ds.name!r}. Compute it with `scdm embed {ds.name} --model {model}`, or list what exists with `scdm ls`."
            else:
                ids = ", ".join(frame["embedding_id"])
                msg = f"Dataset {ds.name!r} has {len(frame)} {model} ({variant}) embeddings with different parameters ({ids}); pass --embedding ID."
            raise EmbeddingNotFoundError(msg)
        return self._handle(frame.iloc[0])

    def embeddings(self, status: str | None = None) -> pd.DataFrame:
        """All embeddings with their dataset name and chunk progress."""
        sql = (
            "SELECT e.embedding_id, e.dataset_id, d.name AS dataset_name, e.space_id, e.model, e.variant, e.dim, "
            "e.dtype, e.n_cells, e.status, (SELECT count(*) FROM embedding_chunks k WHERE k.embedding_id = e.embedding_id) "
            "AS chunks_done, e.n_chunks, e.params, e.checkpoint_hash, e.adapter_hash, e.created_at, e.completed_at, e.telemetry "
            "FROM embeddings e JOIN datasets d USING (dataset_id)"
        )
        args: list[Any] = []
        if status:
            sql += " WHERE e.status = ?"
            args.append(status)
        return self.query(sql + " ORDER BY e.created_at", args)

    def read_embedding(self, embedding_id: str, rows: np.ndarray | Sequence[int] | None = None, *, allow_partial: bool = False) -> np.ndarray:
        """The embedding as float32 ``ndarray`` of shape (n_cells, dim), rows in dataset order.

        Parameters
        ----------
        rows
            Row indices to read (any order; sorted is fastest). Default: all.
        allow_partial
            Read an embedding whose chunks are not all written (unwritten rows are zeros).

        Raises
        ------
        EmbeddingIncompleteError
            If it is not complete and ``allow_partial`` is False.
        """
        emb = self._complete.get(embedding_id)
        if emb is None or not _zarr.array_exists(emb.location):
            emb, status = self._embedding_and_status(embedding_id)
            if status == "complete":
                # ids are content hashes: a complete embedding never changes, so it can be cached
                self._complete[emb.embedding_id] = self._complete[embedding_id] = emb
        else:
            status = "complete"
        if not allow_partial and status != "complete":
            done = len(emb.written_chunks())
            msg = (
                f"Embedding {emb.embedding_id} ({emb.model}) is incomplete: {done} of {emb.n_chunks} chunks written. "
                "Resume it by running the same `scdm embed` command again, or pass allow_partial=True."
            )
            raise EmbeddingIncompleteError(msg)
        return _zarr.read_rows(emb.location, None if rows is None else np.asarray(rows))

    def verify_embedding(self, embedding_id: str) -> list[int]:
        """Chunks whose stored bytes do not match their committed checksum (empty = healthy)."""
        emb = self.embedding(embedding_id)
        frame = self.query("SELECT chunk, checksum FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk", [emb.embedding_id])
        bad = []
        for chunk, checksum in zip(frame["chunk"], frame["checksum"]):
            lo, hi = emb.chunk_bounds(int(chunk))
            block = _zarr.read_rows(emb.location, np.arange(lo, hi), out_dtype=emb.dtype)
            if _zarr.chunk_checksum(block) != checksum:
                bad.append(int(chunk))
        return bad

    def remove_embedding(self, embedding_id: str) -> str:
        """Delete an embedding: its catalog rows first (readers stop seeing it), then its array."""
        emb = self.embedding(embedding_id)
        self._complete = {k: v for k, v in self._complete.items() if v.embedding_id != emb.embedding_id}
        with self.catalog.transaction() as con:
            con.execute("DELETE FROM embedding_chunks WHERE embedding_id = ?", [emb.embedding_id])
            con.execute("DELETE FROM embeddings WHERE embedding_id = ?", [emb.embedding_id])
        _zarr.remove_array(emb.location)
        logger.info("removed embedding %s (%s of %s)", emb.embedding_id, emb.model, emb.dataset_id)
        return emb.embedding_id

    def export_embedding(self, embedding_id: str, out: str | os.PathLike[str]) -> Path:
        """Write an embedding to ``.npy``, or to an ``.h5ad`` copy of its dataset with it in ``obsm``."""
        emb = self.embedding(embedding_id)
        data = self.read_embedding(emb.embedding_id)
        out = Path(out)
        if out.suffix == ".npy":
            np.save(out, data)
        elif out.suffix == ".h5ad":
            adata = self.open_anndata(emb.dataset_id, backed=False)
            key = f"X_{emb.model}" if emb.variant == "frozen" else f"X_{emb.model}_{emb.variant.replace(':', '_')}"
            adata.obsm[key] = data
            adata.uns.setdefault("scdm", {})[key] = {"embedding_id": emb.embedding_id, "params": _canonical_json(emb.params)}
            adata.write_h5ad(out)
        else:
            msg = f"Cannot export to {str(out)!r}: use a path ending in .npy or .h5ad."
            raise InputDataError(msg)
        return out


def _writable(adata: "ad.AnnData") -> "ad.AnnData":
    """A shallow copy whose mixed-type object columns are strings (h5py cannot write them)."""
    obs = adata.obs.copy()
    for col in obs.columns:
        if obs[col].dtype == object and not all(isinstance(v, str) for v in obs[col]):
            obs[col] = obs[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    out = adata.copy() if adata.is_view else adata
    out = out.__class__(X=out.X, obs=obs, var=out.var, uns=out.uns, obsm=out.obsm, layers=out.layers)
    return out


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


def open_store(store: "str | os.PathLike[str] | Store | None" = None) -> Store:
    """Normalise a ``StoreLike`` (path, Store or None for the default) to a :class:`Store`."""
    return store if isinstance(store, Store) else Store(store)


