"""The JHU006 test store most result tests start from: two label sets of one matrix, one pca space."""

from __future__ import annotations

from pathlib import Path

from scdm.embedding.runner import embed
from scdm.store import Store

JHU006 = Path(__file__).resolve().parent / "data" / "JHU006_HNSCC_Kinker2020.h5ad"


def jhu006_store(root: Path) -> Store:
    """JHU006 with its Gefitinib (default) and Vorinostat label sets, embedded by pca (10 components)."""
    st = Store(root)
    st.ingest(JHU006, name="JHU006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020")
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    return st
