"""Copies of cells across datasets (store.matrix.copied_cells): found by cell id and expression values."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import Store
from scdm.store.matrix import copied_cells


def _counts(n_cells: int, genes: list[str], seed: int, cell_ids: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, (n_cells, len(genes))).astype(np.float32)
    obs = pd.DataFrame({"response": np.where(np.arange(n_cells) % 2 == 0, "sensitive", "resistant")}, index=cell_ids)
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))


GENES = [f"ENSG{i:011d}" for i in range(60)]
IDS = [f"BC{i:04d}-1" for i in range(20)]


def _ingest(st: Store, adata: ad.AnnData, name: str) -> None:
    st.ingest(adata, name=name, label_key="response", positive="sensitive", study=name)


def test_a_copy_on_fewer_genes_in_another_order_with_stored_zeros_is_found_and_reused_barcodes_are_not(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    full = _counts(20, GENES, 0, IDS)
    _ingest(st, full, "full")
    subset = full[5:15, GENES[:45][::-1]].copy()  # a re-save of ten cells on fewer genes, reordered
    X = sp.csr_matrix(subset.X)
    X.data[X.data == 1.0] = 0.0  # values written out as stored zeros...
    X = X + sp.csr_matrix(np.where(subset.X == 1.0, 1.0, 0.0).astype(np.float32))  # ...and back as entries
    subset.X = sp.csr_matrix(X)
    _ingest(st, subset, "subset")
    _ingest(st, _counts(20, GENES, 1, IDS), "other-run")  # the same barcodes, other cells
    cells = st.cells()
    found = copied_cells(st, cells)
    copies = cells[found]
    assert sorted(copies["dataset_id"].map(lambda d: st.dataset(d).name).unique()) == ["full", "subset"]
    assert sorted(copies["cell_id"].unique()) == IDS[5:15]
    assert found.sum() == 20


def test_cells_equal_only_beyond_the_genes_all_datasets_share_are_still_compared(tmp_path: Path) -> None:
    """A third dataset with few genes makes the shared genes few: a copy all zero there is no evidence either way."""
    st = Store(tmp_path / "store")
    full = _counts(20, GENES, 0, IDS)
    full.X[:, :10] = 0.0
    _ingest(st, full, "full")
    _ingest(st, full[::-1].copy(), "again")  # the same cells at other rows
    _ingest(st, _counts(20, GENES[:10], 2, IDS), "few-genes")
    found = copied_cells(st, st.cells())
    assert found.sum() == 40


def test_each_dataset_is_opened_once_when_no_cells_are_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recurring barcodes over many studies: opening both files of every pair of datasets took 0.5 s a pair."""
    st = Store(tmp_path / "store")
    for seed in range(5):
        _ingest(st, _counts(20, GENES, seed, IDS), f"run{seed}")
    opened: list[str] = []
    open_anndata = st.open_anndata
    monkeypatch.setattr(st, "open_anndata", lambda name, *a, **k: opened.append(name) or open_anndata(name, *a, **k))
    assert not copied_cells(st, st.cells()).any()
    assert len(opened) == 5
