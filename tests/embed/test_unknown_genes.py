"""A cell none of whose expressed genes the model knows is refused before the model runs, in the
models that would otherwise give it a constant non-zero vector (pooled special tokens, zero bins)."""

from __future__ import annotations

import importlib
import json
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


@pytest.mark.parametrize(("model", "ckpt"), [("geneformer", {"version": 2}), ("scbert", {}), ("celllm", {}), ("cellplm", {})])
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
    # kept, and counted: the audit said cells_without_expressed_genes 0 and zero_rows 0 for them, and no
    # line warned, though Geneformer V2 gives both the vector of <cls><eos> alone
    audit = json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [kept.embedding_id])["audit"].iloc[0])
    assert audit["cells_without_known_genes"] == 2 and audit["cells_without_expressed_genes"] == 0


def test_an_embedding_kept_with_allow_empty_cells_is_not_returned_to_a_run_without_it(unknown_only, tmp_path):
    # allow_empty_cells is not part of the identity: a later run without it found the stored embedding
    # and returned its 2 cells of <cls><eos> alone (one shared, non-zero vector) silently, where
    # computing it refuses them
    path, vocabulary = unknown_only
    from scdm.embedding.models.geneformer import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", genes=vocabulary, seed=1, version=2)
    st = Store(tmp_path / "store")
    name = st.ingest(path).name
    kept = embed(st, name, "geneformer", checkpoint, batch_size=4, progress=False, allow_empty_cells=True)
    with pytest.raises(InputDataError, match=rf"embedding {kept.embedding_id} was made with allow_empty_cells .*\(2 cells express "
                                             r"no gene the model knows\)\. Pass --allow-empty-cells"):
        embed(st, name, "geneformer", checkpoint, batch_size=4, progress=False)
    again = embed(st, name, "geneformer", checkpoint, batch_size=4, progress=False, allow_empty_cells=True)
    assert (again.embedding_id, again.computed_chunks) == (kept.embedding_id, 0)


def test_stored_zeros_at_known_genes_do_not_count_as_expressed() -> None:
    from scdm.embedding._adapter import check_cells_known

    # row 1: explicitly stored zeros at known genes 0 and 1, counts only at the unknown gene 4
    x = sp.csr_matrix((np.array([3, 0, 0, 7], dtype=np.float32), np.array([0, 0, 1, 4]), np.array([0, 1, 4])), shape=(2, 5))
    with pytest.raises(InputDataError, match=r"rows 1 \(1 in all\) express none of the genes the model knows"):
        check_cells_known(x, np.array([0, 1, 2]), np.arange(2), "geneformer")


def test_a_file_with_stored_zeros_at_known_genes_is_refused_not_embedded_as_cls_eos(unknown_only, tmp_path) -> None:
    # An h5ad keeps explicit zeros (e.g. after X.data[X.data < 2] = 0) and the store copies it as is:
    # cell 1's stored zeros at vocabulary genes made it pass, and Geneformer V2 stored <cls><eos> alone.
    from scdm.embedding.models.geneformer import write_tiny_checkpoint

    path, vocabulary = unknown_only
    adata = ad.read_h5ad(path)
    x = sp.csr_matrix(adata.X)
    rows = [x[2]] + [x[i] for i in range(1, x.shape[0])]  # cell 0: an ordinary cell
    # cell 1: stored zeros at the vocabulary genes 0 and 5, counts only at genes the model does not know
    rows[1] = sp.csr_matrix((np.array([0, 0, 9, 9, 9, 9], dtype=x.dtype), np.array([0, 5, 21, 22, 23, 24]), np.array([0, 6])),
                            shape=(1, x.shape[1]))
    adata.X = sp.vstack(rows, format="csr")
    assert adata.X[1].nnz == 6  # the zeros are stored
    adata.write_h5ad(tmp_path / "stored_zeros.h5ad")
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", genes=vocabulary, seed=1, version=2)
    st = Store(tmp_path / "store")
    name = st.ingest(tmp_path / "stored_zeros.h5ad").name
    with pytest.raises(InputDataError, match=r"rows 1 \(1 in all\) express none of the genes the model knows"):
        embed(st, name, "geneformer", checkpoint, batch_size=4, progress=False)


@pytest.mark.parametrize(("model", "ckpt"), [("scgpt", {}), ("uce", {}), ("scfoundation", {})])
def test_models_that_cannot_keep_such_cells_say_the_flag_does_not_apply(model, ckpt, unknown_only, tmp_path):
    """scGPT, UCE and scFoundation have nothing to embed for such a cell; with --allow-empty-cells they refused it
    with 'Remove empty cells before ingest', as if the flag had been ignored."""
    path, vocabulary = unknown_only
    module = importlib.import_module(f"scdm.embedding.models.{model}")
    checkpoint = module.write_tiny_checkpoint(tmp_path / "ckpt", genes=vocabulary, **ckpt)
    st = Store(tmp_path / "store")
    name = st.ingest(path).name
    with pytest.raises(InputDataError, match="row 0 .*--allow-empty-cells cannot keep it"):
        embed(st, name, model, checkpoint, batch_size=4, progress=False, allow_empty_cells=True)
