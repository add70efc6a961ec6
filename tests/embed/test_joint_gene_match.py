"""Joint pca/hvg fits match their datasets' genes by the gene each id resolves to, not by spelling."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scdm.embedding.runner import embed_baseline, repair
from scdm.store import Store
from scdm.store.genes import map_genes
from scdm.store.verify import repair_hint
from tests.store.conftest import make_counts_adata


def _lognorm(x: np.ndarray) -> np.ndarray:
    return np.log1p(x * (1e4 / x.sum(axis=1, keepdims=True)))


def _two_datasets(st: Store) -> tuple[np.ndarray, np.ndarray]:
    """A symbol dataset naming AARS1 'AARS' (its symbol before 2019) and an Ensembl dataset of the same genes."""
    by_symbol = make_counts_adata(n_cells=30, seed=0)
    by_symbol.var_names = ["AARS" if g == "AARS1" else g for g in by_symbol.var_names]
    by_ensembl = make_counts_adata(n_cells=25, seed=1)
    ensembl = map_genes(list(by_ensembl.var_names), src="symbol", dst="ensembl")
    by_ensembl = by_ensembl[:, [e is not None for e in ensembl]].copy()
    by_ensembl.var_names = [e for e in ensembl if e is not None]
    assert "ENSG00000090861" in by_ensembl.var_names  # AARS1
    st.ingest(by_symbol, name="sym")
    st.ingest(by_ensembl, name="ens")
    aars = (_lognorm(sp.csr_matrix(by_symbol.X).toarray())[:, list(by_symbol.var_names).index("AARS")],
            _lognorm(sp.csr_matrix(by_ensembl.X).toarray())[:, list(by_ensembl.var_names).index("ENSG00000090861")])
    return aars


def test_an_outdated_symbol_and_the_ensembl_id_of_its_gene_are_one_gene_in_a_joint_fit(tmp_path):
    """'AARS' (symbol dataset) and ENSG00000090861 (AARS1, Ensembl dataset) map to one gene in the genes table, but
    the joint fit matched the stored symbols 'AARS' and 'AARS1': 36 shared genes instead of 37, AARS left out without
    a word (PC9 against an Ensembl copy of itself: 15,211 shared genes instead of 16,321)."""
    st = Store(tmp_path / "store")
    aars_sym, aars_ens = _two_datasets(st)
    res = {r.dataset: r for r in embed_baseline(st, ["sym", "ens"], model="hvg", n_hvg=1000, progress=False)}
    assert res["sym"].dim == res["ens"].dim == 37
    sym, ens = st.read_embedding(res["sym"].embedding_id), st.read_embedding(res["ens"].embedding_id)
    column = [j for j in range(sym.shape[1]) if np.allclose(sym[:, j], aars_sym, atol=1e-5)]
    assert len(column) == 1  # one column holds AARS of the symbol dataset ...
    np.testing.assert_allclose(ens[:, column[0]], aars_ens, atol=1e-5)  # ... and AARS1 of the Ensembl one
    assert st.embedding(res["sym"].embedding_id).params["gene_match"] == "gene"
    assert set(st.embeddings()["note"]) == {""}


def test_a_joint_fit_made_by_symbol_keeps_its_id_and_numbers_is_noted_and_repairs_as_it_was_made(tmp_path):
    st = Store(tmp_path / "store")
    _two_datasets(st)
    old = embed_baseline(st, ["sym", "ens"], model="pca", n_hvg=1000, n_comps=3, chunk_rows=10, progress=False,
                         _symbol_match=True)  # as scdm made joint fits before it matched genes
    assert "gene_match" not in st.embedding(old[0].embedding_id).params
    new = embed_baseline(st, ["sym", "ens"], model="pca", n_hvg=1000, n_comps=3, chunk_rows=10, progress=False)
    assert {r.embedding_id for r in new}.isdisjoint(r.embedding_id for r in old)  # a new space beside the old one
    notes = st.embeddings().set_index("embedding_id")["note"]
    assert all(notes[r.embedding_id].startswith("older gene matching") for r in old)
    assert all(notes[r.embedding_id] == "" for r in new)
    before = st.read_embedding(old[0].embedding_id).copy()
    # `scdm embed sym ens --joint` would make the new space again, not repair this one
    assert repair_hint(st, st.embedding(old[0].embedding_id)).startswith(f"scdm verify --repair --embedding {old[0].embedding_id}")
    st.mark_chunks_pending(old[0].embedding_id, [1])
    assert repair_hint(st, st.embedding(old[0].embedding_id)).startswith(f"scdm.embedding.runner.repair(STORE, '{old[0].embedding_id}')")
    assert repair_hint(st, st.embedding(new[0].embedding_id)).startswith("scdm embed")
    assert repair(st, old[0].embedding_id, progress=False).embedding_id == old[0].embedding_id
    assert st.read_embedding(old[0].embedding_id).tobytes() == before.tobytes()
    (solo,) = embed_baseline(st, ["sym"], model="pca", n_hvg=1000, n_comps=3, progress=False)
    assert "gene_match" not in st.embedding(solo.embedding_id).params  # one dataset: its id is unchanged
