from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import Store, example_data


@pytest.fixture()
def st(tmp_path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture()
def a375_path() -> str:
    return example_data("A375")


def make_counts_adata(n_cells: int = 60, n_genes: int = 40, seed: int = 0, sparse: bool = True) -> ad.AnnData:
    """Small raw-count AnnData with labels, studies and samples (symbols as var_names)."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    from scdm.store.genes import gene_table

    symbols = gene_table()["symbol"].drop_duplicates().iloc[:n_genes].tolist()
    obs = pd.DataFrame(
        {
            "label": rng.choice(["sensitive", "resistant"], n_cells),
            "study": rng.choice(["S1", "S2"], n_cells),
            "patient": [f"p{i % 6}" for i in range(n_cells)],
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=pd.DataFrame(index=symbols))
