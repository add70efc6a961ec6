"""The scdm store: chunked Zarr v3 embedding arrays indexed by a DuckDB catalog.

This package is the one owner of persistent state and never imports torch. Open a store with
:class:`Store` (default directory ``$SCDM_STORE`` or ``./scdm-store``)::

    from scdm.store import Store
    st = Store("scdm-store")
    st.ingest("a375.h5ad", label_key="response_PLX4720", study="GSE108383")
    st.embeddings()
"""

from scdm.store._catalog import SCHEMA_VERSION
from scdm.store._constants import ARTIFACTS_DIR
from scdm.store._store import (
    ChunkRecord,
    ChunkTarget,
    ChunkWriter,
    DatasetInfo,
    Embedding,
    EmbeddingJob,
    Store,
    canonical_json,
    default_store_path,
    open_store,
    space_id_of,
)
from scdm.store._zarr import default_chunk_rows
from scdm.store.errors import (
    ArrayMetadataError,
    CatalogDamagedError,
    ChunkCorruptError,
    DatasetFileChangedError,
    DatasetNotFoundError,
    EmbeddingBusyError,
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
    ReadOnlyQueryError,
    ScdmError,
    StoreDamagedError,
    StoreFormatError,
    StoreReadOnlyError,
)

__all__ = [
    "Store",
    "DatasetInfo",
    "Embedding",
    "EmbeddingJob",
    "ChunkRecord",
    "ChunkTarget",
    "ChunkWriter",
    "default_chunk_rows",
    "canonical_json",
    "open_store",
    "default_store_path",
    "space_id_of",
    "example_data",
    "SCHEMA_VERSION",
    "ARTIFACTS_DIR",
    "ScdmError",
    "InputDataError",
    "DatasetNotFoundError",
    "EmbeddingNotFoundError",
    "EmbeddingIncompleteError",
    "EmbeddingBusyError",
    "ReadOnlyQueryError",
    "StoreFormatError",
    "StoreDamagedError",
    "DatasetFileChangedError",
    "CatalogDamagedError",
    "ChunkCorruptError",
    "ArrayMetadataError",
    "StoreReadOnlyError",
]


def example_data(name: str = "A375") -> str:
    """Path of a real dataset shipped with the package (see ``store/_data/PROVENANCE.md``).

    ``"A375"``: 108 A375 melanoma cells, real PLX4720 response (GSE108383), z-scored values,
    Entrez ``var_names`` with ``var.symbol``.
    """
    from importlib import resources

    files = {"A375": "A375_melanoma_GSE108383.h5ad"}
    if name not in files:
        msg = f"No example dataset {name!r}; available: {', '.join(files)}."
        raise KeyError(msg)
    return str(resources.files("scdm.store").joinpath("_data").joinpath(files[name]))
