"""Error and warning hierarchy shared by every scdm package.

Lives in the bottom layer so that ``scdm.embedding`` and ``scdm.classify`` can raise the same
errors; each class also inherits the builtin a caller would naturally catch.
"""

from __future__ import annotations

__all__ = [
    "ScdmError",
    "InputDataError",
    "DatasetNotFoundError",
    "EmbeddingNotFoundError",
    "EmbeddingIncompleteError",
    "EmbeddingBusyError",
    "StoreFormatError",
    "StoreDamagedError",
    "ChunkCorruptError",
    "ArrayMetadataError",
    "CatalogDamagedError",
    "DatasetFileChangedError",
    "StoreReadOnlyError",
    "StoreLockedError",
    "ReadOnlyQueryError",
    "QueryError",
    "QueryTimeoutError",
    "CheckpointError",
    "GeneMappingError",
    "UnknownModelError",
    "ScdmWarning",
    "CheckpointLinkWarning",
]


class ScdmError(Exception):
    """Base class of every error scdm raises on purpose."""


class InputDataError(ScdmError, ValueError):
    """The user's data cannot be used as given (message says why and what to do)."""


class DatasetNotFoundError(ScdmError, KeyError):
    """No dataset with that name or id in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class EmbeddingNotFoundError(ScdmError, KeyError):
    """No embedding matches the request."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EmbeddingIncompleteError(ScdmError, RuntimeError):
    """The embedding exists but not all of its chunks are written."""


class EmbeddingBusyError(ScdmError, RuntimeError):
    """Another process is writing the embedding (or creating or removing it) right now.

    ``writers`` describes the jobs that were writing it (pid, host, since when, command).
    """

    def __init__(self, message: str, writers: list | None = None) -> None:
        super().__init__(message)
        self.writers = list(writers or [])


class StoreFormatError(ScdmError, RuntimeError):
    """The store was written by an scdm this version cannot read."""


class StoreDamagedError(StoreFormatError):
    """Part of the store is damaged: a chunk file of an embedding, or the catalog file."""


class ChunkCorruptError(StoreDamagedError):
    """A committed chunk of an embedding is missing, truncated or does not match its checksum.

    ``embedding_id``, ``chunk`` and ``path`` name it (``embedding_id`` is None when the error
    comes from the array layer alone); ``reason`` is ``missing``, ``truncated``, ``wrong size``,
    ``unreadable``, ``checksum mismatch`` or ``no record`` (a chunk of a complete embedding without
    a committed checksum), and ``detail`` says what was found.
    """

    def __init__(self, message: str, *, chunk: int, path: str, reason: str, detail: str = "",
                 embedding_id: str | None = None) -> None:
        super().__init__(message)
        self.chunk, self.path, self.reason, self.detail, self.embedding_id = chunk, path, reason, detail, embedding_id


class ArrayMetadataError(StoreDamagedError):
    """An embedding array's metadata file (``zarr.json``) is missing, unreadable, or disagrees with the catalog.

    The catalog row (rows, dimensions, data type, rows per chunk) is the record of what was written;
    a ``zarr.json`` that says otherwise would make the chunk bytes read as other rows or numbers.
    ``path`` is the metadata file, ``detail`` what is wrong with it; ``embedding_id`` is None when
    the error comes from the array layer alone.
    """

    def __init__(self, message: str, *, path: str, detail: str = "", embedding_id: str | None = None) -> None:
        super().__init__(message)
        self.path, self.detail, self.embedding_id = path, detail, embedding_id


class CatalogDamagedError(StoreDamagedError):
    """The catalog file (``catalog.duckdb``) cannot be read: truncated, overwritten or corrupted."""


class DatasetFileChangedError(StoreDamagedError):
    """The file behind a dataset no longer holds the cells and genes it was ingested with."""


class StoreReadOnlyError(ScdmError, PermissionError):
    """A write was asked of a store opened read-only (no write permission, or read_only=True)."""


class StoreLockedError(ScdmError, RuntimeError):
    """The catalog stayed locked by another process for longer than the retry budget."""


class ReadOnlyQueryError(ScdmError, PermissionError):
    """A query tried to write through the read-only SQL interface."""


class QueryError(ScdmError, ValueError):
    """A user SQL query failed in DuckDB (syntax, unknown column, ...)."""


class QueryTimeoutError(QueryError):
    """A user SQL query ran past its time limit and was stopped (DuckDB's interrupt)."""

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s
        """The limit it ran past, in seconds (a front end says how its user raises it)."""


class CheckpointError(ScdmError, FileNotFoundError):
    """A model checkpoint folder is missing a file or holds the wrong format."""


class GeneMappingError(ScdmError, ValueError):
    """Too few of a dataset's genes are known to a model."""


class UnknownModelError(ScdmError, KeyError):
    """No model (adapter or baseline) is registered under that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ScdmWarning(UserWarning):
    """Something scdm coerced or chose on the user's behalf."""


class CheckpointLinkWarning(ScdmWarning):
    """A checkpoint folder links a folder that holds it (``/``, a parent); scdm left the link out of the
    checkpoint's files and content hash."""
