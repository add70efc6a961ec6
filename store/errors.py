"""Error and warning hierarchy shared by every scdm package.

Lives in the bottom layer so that ``scdm_embed`` and ``scdm_classify`` can raise the same
errors; each class also inherits the builtin a caller would naturally catch.
"""

from __future__ import annotations

__all__ = [
    "ScdmError",
    "InputDataError",
    "DatasetNotFoundError",
    "EmbeddingNotFoundError",
    "EmbeddingIncompleteError",
    "StoreFormatError",
    "StoreLockedError",
    "ReadOnlyQueryError",
    "QueryError",
    "CheckpointError",
    "GeneMappingError",
    "UnknownModelError",
    "ScdmWarning",
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


class StoreFormatError(ScdmError, RuntimeError):
    """The store was written by an scdm this version cannot read."""


class StoreLockedError(ScdmError, RuntimeError):
    """The catalog stayed locked by another process for longer than the retry budget."""


class ReadOnlyQueryError(ScdmError, PermissionError):
    """A query tried to write through the read-only SQL interface."""


class QueryError(ScdmError, ValueError):
    """A user SQL query failed in DuckDB (syntax, unknown column, ...)."""


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
