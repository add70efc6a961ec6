"""Gene ids whose shape hides what they are: GENCODE ``_PAR_Y`` copies of a gene, lower-case Ensembl ids."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdm.store import InputDataError, Store
from scdm.store._ingest import IngestWarning
from scdm.store.genes import gene_table
from tests.store.conftest import make_counts_adata


def _ensembl_adata(par_y_values: float | None, *, copy_first: bool = False) -> ad.AnnData:
    """40 genes with versioned Ensembl ids; column 5 is the ``_PAR_Y`` copy of column 4 (or 4 of 5)."""
    table = gene_table()
    ids = [f"{e}.3" for e in table.loc[table["ensembl"] != "", "ensembl"].drop_duplicates().iloc[:40]]
    gene, copy = (5, 4) if copy_first else (4, 5)
    ids[copy] = ids[gene] + "_PAR_Y"
    adata = make_counts_adata()
    x = adata.X.toarray()
    x[:, copy] = 0 if par_y_values is None else par_y_values
    adata.X = sp.csr_matrix(x)
    adata.var_names = ids
    return adata


def test_an_all_zero_par_y_copy_is_stored_unmapped_with_a_warning_naming_the_count(st: Store) -> None:
    """Both ids read as one gene (NAT2 twice in the genes table), and nothing said so."""
    with pytest.warns(IngestWarning, match=r"1 gene ids are GENCODE _PAR_Y copies.*only zeros"):
        st.ingest(_ensembl_adata(None), name="gencode", label_key="label")
    genes = st.genes("gencode")
    assert genes["symbol"].iloc[4] is not None and genes["symbol"].iloc[5] is None
    assert genes["ensembl"].iloc[5] is None
    assert (genes["symbol"] == genes["symbol"].iloc[4]).sum() == 1


@pytest.mark.parametrize(("values", "copy_first", "why"), [
    (1.0, False, "1 of them hold values"),
    (None, True, "1 of them come before their gene's column"),
])
def test_a_par_y_copy_a_model_would_read_is_refused_and_nothing_is_stored(st: Store, values: float | None,
                                                                          copy_first: bool, why: str) -> None:
    with pytest.raises(InputDataError, match=f"GENCODE _PAR_Y copies.*{why}.*drop the copies"):
        st.ingest(_ensembl_adata(values, copy_first=copy_first), name="gencode", label_key="label")
    assert st.query("SELECT count(*) AS n FROM datasets")["n"].iloc[0] == 0


def test_a_par_y_id_without_its_gene_is_that_gene(st: Store) -> None:
    adata = _ensembl_adata(None)
    adata = adata[:, [i for i in range(adata.n_vars) if i != 4]].copy()
    adata.X = sp.csr_matrix(np.asarray(adata.X.toarray()) + 1)
    st.ingest(adata, name="only_y", label_key="label")
    assert st.genes("only_y")["symbol"].notna().all()


@pytest.mark.parametrize("given", [None, "ensembl"])
def test_lower_case_ensembl_ids_are_refused_saying_to_upper_case_them(st: Store, given: str | None) -> None:
    """They were detected as symbols and stored with no symbol or Ensembl id for any gene, without a word."""
    adata = _ensembl_adata(1.0)
    adata = adata[:, [i for i in range(adata.n_vars) if i != 5]].copy()
    adata.var_names = [g.lower() for g in adata.var_names]
    with pytest.raises(InputDataError, match=r"39 of the 39 gene ids are Ensembl ids written in lower case.*str\.upper"):
        st.ingest(adata, name="lower", label_key="label", gene_id_kind=given)
    assert st.query("SELECT count(*) AS n FROM datasets")["n"].iloc[0] == 0
