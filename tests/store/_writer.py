"""Helper process for the crash and concurrency tests: writes chunks of one embedding.

Usage: python _writer.py STORE DATASET CHUNKS(comma list or 'all') DELAY_S
Each chunk's rows are a deterministic function of the row index, so any two writers agree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scdm.store import Store  # noqa: E402

DIM = 48


def rows_of(lo: int, hi: int) -> np.ndarray:
    r = np.arange(lo, hi, dtype=np.float64)[:, None]
    c = np.arange(DIM, dtype=np.float64)[None, :]
    return (np.sin(r * 0.37 + c * 1.3) * (1 + r % 7)).astype(np.float32)


def open_embedding(store: str, dataset: str):
    return Store(store).create_embedding(dataset, model="synthetic", params={"dim": DIM}, dim=DIM, chunk_rows=8)


def main() -> None:
    store, dataset, which, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    emb = open_embedding(store, dataset)
    chunks = emb.missing_chunks() if which == "all" else [int(c) for c in which.split(",")]
    for c in chunks:
        lo, hi = emb.chunk_bounds(c)
        block = rows_of(lo, hi)
        time.sleep(delay)
        emb.write_chunk(c, block)
        print(f"chunk {c}", flush=True)


if __name__ == "__main__":
    main()
