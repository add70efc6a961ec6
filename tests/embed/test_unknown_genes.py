"""A cell none of whose expressed genes the model knows is refused before the model runs, in the
models that would otherwise give it a constant non-zero vector (pooled special tokens, zero bins)."""

from __future__ import annotations

import importlib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdm.embedding.runner import embed
from scdm.store import InputDataError, Store

PC9 = Path(__file__).resolve().parents[1] / "data" / "PC9_erlotinib_subsample300.h5ad"


@pytest.fixture(scope="module")
def unknown_only(tmp_path_factory) -> tuple[Path, list[str]]:
    """40 PC9 cells; cells 0 and 1 express only genes outside every fifth gene (the vocabulary below)."""
    folder = tmp_path_factory.mktemp("unknown")
    adata = ad.read_h5ad(PC9)[:40].copy()
    x = sp.csr_matrix(adata.X).tolil()
    x[0, :] = 0
    x[1, :] = 0
    for j in (1, 2, 3, 6, 7, 8):
        x[0, j] = 5
    for j in (21, 22, 23, 24):
        x[1, j] = 9
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(folder / "cells.h5ad")
    return folder / "cells.h5ad", adata.var_names.tolist()[::5]


@pytest.mark.parametrize(("model", "ckpt"), [("geneformer", {"version": 2}), ("scbert", {}), ("celllm", {})])
def test_cells_expressing_no_known_gene_are_refused_or_kept_when_allowed(model, ckpt, unknown_only, tmp_path):
    path, vocabulary = unknown_only
    module = importlib.import_module(f"scdm.embedding.models.{model}")
    checkpoint = module.write_tiny_checkpoint(tmp_path / "ckpt", genes=vocabulary, seed=1, **ckpt)
    st = Store(tmp_path / "store")
    name = st.ingest(path).name
    with pytest.raises(InputDataError, match=r"rows 0, 1 \(2 in all\) express none of the genes the model knows"):
        embed(st, name, model, checkpoint, batch_size=4, progress=False)
    kept = embed(st, name, model, checkpoint, batch_size=4, progress=False, allow_empty_cells=True)
    assert np.isfinite(st.read_embedding(kept.embedding_id)).all()
