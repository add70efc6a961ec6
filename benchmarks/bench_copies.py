"""Copies-of-cells benchmark: ``store.matrix.copied_cells`` on studies whose 10x barcodes recur.

``scdm evaluate`` and ``scdm transfer`` look for cells of one dataset that are a copy of another's
(same cell id, same expression values) before any split. Cell ids alone recur across 10x runs (a
barcode whitelist of ~737k for v2), so on a store of many studies many cells share an id with a
cell of another study and their expression must be read. This prints ONE table: the search's time
against the floor of reading each recurring cell's expression once (every dataset opened once,
its recurring rows read in blocks), with the ratio and its goal.

Usage: python benchmarks/bench_copies.py [--datasets 20] [--cells 2000] [--genes 2000] [--whitelist 20000] [--copies 1]
  --copies N  ingest N of the studies a second time (all their cells are then copies to find)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.store import Store  # noqa: E402
from scdm.store.matrix import copied_cells, expression_rows  # noqa: E402

GOAL = 1.5


def build(root: Path, n_datasets: int, n_cells: int, n_genes: int, whitelist: int, n_copies: int) -> Store:
    rng = np.random.default_rng(0)
    st = Store(root)
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    for d in range(n_datasets):
        X = sp.random(n_cells, n_genes, density=0.05, format="csr", random_state=d,
                      data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
        barcodes = rng.choice(whitelist, n_cells, replace=False)
        obs = pd.DataFrame({"response": rng.choice(["sensitive", "resistant"], n_cells)},
                           index=[f"{b:016d}-1" for b in barcodes])
        adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
        st.ingest(adata, name=f"study{d:02d}", label_key="response", positive="sensitive", study=f"study{d:02d}")
        if d < n_copies:
            st.ingest(adata[::-1].copy(), name=f"study{d:02d}-again", label_key="response", positive="sensitive",
                      study=f"study{d:02d}-again")
    return st


def read_floor(st: Store, cells: pd.DataFrame, recurring: np.ndarray) -> float:
    """Seconds to open each dataset once and read its recurring rows in 1,024-row blocks."""
    t0 = time.perf_counter()
    for name, group in cells.iloc[recurring].groupby("dataset_id"):
        adata = st.open_anndata(str(name))
        rows = np.sort(group["row"].to_numpy(np.int64))
        for lo in range(0, len(rows), 1024):
            expression_rows(adata, rows[lo:lo + 1024])
        adata.file.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--whitelist", type=int, default=20000)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        st = build(Path(tmp) / "store", args.datasets, args.cells, args.genes, args.whitelist, args.copies)
        cells = st.cells()
        recurring = np.flatnonzero(cells["cell_id"].astype(str).duplicated(keep=False).to_numpy())
        floor = read_floor(st, cells, recurring)
        t0 = time.perf_counter()
        found = copied_cells(st, cells)
        seconds = time.perf_counter() - t0
    load = os.getloadavg()[0]
    print("| datasets | cells | recurring ids | copies found | copied_cells s | read floor s | ratio | goal | met | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratio = seconds / floor
    print(f"| {len(set(cells['dataset_id']))} | {len(cells):,} | {recurring.size:,} | {int(found.sum()):,} | {seconds:.2f} | "
          f"{floor:.2f} | {ratio:.2f}x | <= {GOAL}x | {'yes' if ratio <= GOAL else 'no'} | {load:.1f} |")


if __name__ == "__main__":
    main()
