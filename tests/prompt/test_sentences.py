"""Cell sentences: the top-k genes equal a direct computation on the counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdm.prompt.sentences import cell_gene_lists, gene_symbols, top_genes, value_note
from scdm.store import Store, example_data
from scdm.store.errors import InputDataError


def direct_top(values: np.ndarray, symbols: list[str | None], k: int) -> list[str]:
    """The definition, written plainly: positive values, highest first, ties by symbol, each symbol once."""
    pairs = sorted((-float(v), s) for v, s in zip(values, symbols) if v > 0 and s is not None)
    out: list[str] = []
    for _, s in pairs:
        if s not in out:
            out.append(s)
    return out[:k]


def test_top10_equals_direct_computation_on_real_counts(tmp_path, pc9_counts_path) -> None:
    st = Store(tmp_path / "store")
    st.ingest(str(pc9_counts_path), name="pc9", label_key="scDEAL_GSE149383_label", unknown_values=["not_in_scDEAL_set"])
    adata = ad.read_h5ad(pc9_counts_path)
    counts = sp.csr_matrix(adata.X).toarray()
    symbols = gene_symbols(st, "pc9")
    assert len(symbols) == adata.n_vars
    rows = list(range(adata.n_obs))
    got = cell_gene_lists(st, "pc9", rows, k=10)
    assert sorted(got) == rows
    for r in rows:
        expected = direct_top(counts[r], symbols, 10)
        assert got[r] == expected, r
        assert all(counts[r][adata.var_names.get_loc(g)] > 0 for g in got[r] if g in adata.var_names)
    assert all(len(g) == 10 for g in got.values())  # every PC9 cell expresses more than 10 genes
    # ties are common in UMI counts: the tie-break is the symbol, not the file's gene order
    ties = sum(len({counts[r][adata.var_names.get_loc(g)] for g in got[r]}) < 10 for r in rows)
    assert ties > 100


def test_zero_counts_never_listed_and_ties_by_symbol() -> None:
    x = sp.csr_matrix(np.array([[0, 3, 3, 0, 1, 0], [0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2]], dtype=np.float32))
    symbols = ["ZZZ", "BBB", "AAA", "CCC", "DDD", None]
    assert top_genes(x, symbols, k=10) == [["AAA", "BBB", "DDD"], [], ["AAA", "BBB", "CCC", "DDD", "ZZZ"]]
    assert top_genes(x, symbols, k=2) == [["AAA", "BBB"], [], ["AAA", "BBB"]]
    # the same cells with the genes in another column order give the same sentences
    perm = [3, 5, 0, 4, 2, 1]
    assert top_genes(x[:, perm], [symbols[i] for i in perm], k=3) == top_genes(x, symbols, k=3)
    # dense input, and a symbol on two columns is listed once (at its best value)
    dense = np.array([[1.0, 5.0, 4.0]])
    assert top_genes(dense, ["X", "Y", "X"], k=3) == [["Y", "X"]]


def test_bad_k_and_shape_refused() -> None:
    x = np.ones((1, 2))
    with pytest.raises(InputDataError, match="top_k"):
        top_genes(x, ["A", "B"], k=0)
    with pytest.raises(InputDataError, match="2 genes but 3 symbols"):
        top_genes(x, ["A", "B", "C"], k=1)


def test_scaled_values_list_genes_above_their_mean(tmp_path) -> None:
    """A375 is z-scored: the sentence lists the genes most above their mean (positive z), never a negative one."""
    st = Store(tmp_path / "store")
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", drug="PLX4720")
    assert st.dataset("a375").x_kind == "scaled"
    assert "above their mean" in value_note("scaled")
    adata = ad.read_h5ad(example_data("A375"))
    z = np.asarray(adata.X)
    got = cell_gene_lists(st, "a375", [0, 5, 107], k=10)
    symbols = gene_symbols(st, "a375")
    for r, genes in got.items():
        assert genes == direct_top(z[r], symbols, 10)
        values = [z[r][symbols.index(g)] for g in genes]
        assert min(values) > 0 and values == sorted(values, reverse=True)
