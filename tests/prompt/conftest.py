"""Fixtures of the prompting tests: the fake OpenAI-compatible server and small labelled stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import Store
from scdm.store.genes import gene_table
from tests.prompt.fake_llm import FakeServer

N_GENES = 30


@pytest.fixture(scope="session")
def symbols() -> list[str]:
    table = gene_table()
    return table["symbol"].drop_duplicates().iloc[:N_GENES].tolist()


@pytest.fixture(scope="session")
def marker(symbols: list[str]) -> str:
    """The gene the fake server reads as 'sensitive' (highly expressed in most sensitive cells)."""
    return symbols[0]


def marker_adata(symbols: list[str], n_cells: int = 64, seed: int = 0) -> ad.AnnData:
    """Counts where sensitive cells mostly express ``symbols[0]`` highly and resistant ones ``symbols[1]``.

    One cell in eight has the opposite marker, so a model reading the marker is good, not perfect;
    two studies, so cross-data splits exist.
    """
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.6, size=(n_cells, len(symbols))).astype(np.float32)
    labels = np.array(["sensitive", "resistant"] * (n_cells // 2))
    flip = rng.random(n_cells) < 0.125
    high = np.where((labels == "sensitive") ^ flip, 0, 1)
    x[np.arange(n_cells), high] = 20 + rng.integers(0, 5, n_cells)
    obs = pd.DataFrame({"response": labels, "study": np.where(np.arange(n_cells) % 4 < 2, "S1", "S2"),
                        "patient": [f"p{(i // 2) % 8}" for i in range(n_cells)]}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=symbols))


@pytest.fixture()
def marker_store(tmp_path: Path, symbols: list[str]) -> Store:
    st = Store(tmp_path / "store")
    st.ingest(marker_adata(symbols), name="marker", label_key="response", study_key="study", sample_key="patient",
              tissue="lung", cancer_type="NSCLC", drug="Erlotinib", drug_type="targeted", regimen="mono")
    return st


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


@pytest.fixture()
def llm(server: FakeServer, marker: str) -> FakeServer:
    """The server, reset, reading ``marker``."""
    server.behaviour.reset()
    server.behaviour.marker = marker
    return server
