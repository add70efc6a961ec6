from __future__ import annotations

import pytest

from scdm.embedding._adapter import GeneAudit, require_matches
from scdm.store import Store
from scdm.store.errors import GeneMappingError
from tests.store.conftest import make_counts_adata


def test_wrong_gene_id_kind_advice_works_for_a_stored_dataset(tmp_path):
    """The advice of the gene mapping error, followed to the letter, corrects a dataset already stored."""
    st = Store(tmp_path / "store")
    adata = make_counts_adata()
    st.ingest(adata, name="d", gene_id_kind="ensembl")  # symbols declared as Ensembl ids: no symbol maps
    assert st.genes("d")["symbol"].isna().all()
    audit = GeneAudit(n_input_genes=adata.n_vars, n_matched=0, unmatched_examples=tuple(adata.var_names[:5]))
    with pytest.raises(GeneMappingError, match=r"gene_id_kind, see `scdm ls`.*ingest the file again with "
                                               r"--gene-id-kind KIND --update, which rewrites it"):
        require_matches(audit, "toy")
    fixed = st.ingest(adata, gene_id_kind="symbol", update=True)
    assert fixed.gene_id_kind == "symbol" and st.genes("d")["symbol"].tolist() == list(adata.var_names)
