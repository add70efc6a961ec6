"""On-disk names and format versions of an scdm store (one place, so readers and writers agree)."""

from __future__ import annotations

CATALOG_FILE = "catalog.duckdb"
"""DuckDB catalog file inside the store directory."""
EMBEDDINGS_DIR = "embeddings"
"""Folder of Zarr v3 arrays, one ``<embedding_id>.zarr`` per embedding."""
DATASETS_DIR = "datasets"
"""Folder of ingested expression matrices, one ``<dataset_id>.h5ad`` per dataset."""
ARTIFACTS_DIR = "artifacts"
"""Folder for later stages' files (adapters, trained heads)."""

ENCODING_ATTR = "scdm-encoding"
"""Zarr attribute naming what an array holds."""
VERSION_ATTR = "scdm-version"
"""Zarr attribute with the store format version that wrote the array."""
EMBEDDING_ENCODING = "embedding"
ARRAY_FORMAT_VERSION = 1
"""Version of the embedding array layout; readers refuse newer ones."""

ENV_STORE = "SCDM_STORE"
"""Environment variable naming the default store directory."""
DEFAULT_STORE = "scdm-store"
"""Store directory used when neither an argument nor ``$SCDM_STORE`` names one."""

TARGET_CHUNK_BYTES = 32 * 1024 * 1024
"""Rows per chunk are chosen so one chunk is about this large: measured best for full and random
reads and resumable writes (benchmarks/bench_store.py chunk sweep)."""

LOCK_RETRY_SECONDS = 120.0
"""How long a catalog operation keeps retrying while another process holds the DuckDB lock."""
