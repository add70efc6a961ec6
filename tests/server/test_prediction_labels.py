"""Beside a head's predictions stands the label of the drug the head learned, not the dataset's default drug."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdm.store import Store


def _adata(n: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    drug_x = np.array(["sensitive", "resistant"] * (n // 2))
    counts = rng.poisson(1.0, size=(n, 60)).astype(np.float32)
    counts[drug_x == "sensitive", :8] += 4
    other = np.where(drug_x == "sensitive", "resistant", "sensitive")  # another drug, the opposite response
    obs = pd.DataFrame({"drug_x": drug_x, "drug_y": other}, index=[f"s{seed}c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(60)]))


def test_the_api_shows_the_labels_of_the_heads_drug(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.classify.trained_heads import predict, train_head
    from scdm.embedding.runner import embed_baseline
    from scdm.server import create_app
    from scdm.store.splits import SampleLeakageWarning

    st = Store(tmp_path / "store")
    target = _adata(40, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(_adata(60, 0), name="train", label_key="drug_x", drug="X")
        st.ingest(target, name="target", label_key="drug_y", drug="Y")  # its default: drug Y
        st.ingest(target, name="target", label_key="drug_x", drug="X")
        embs = embed_baseline(st, ["train", "target"], model="pca", n_comps=4, progress=False)
        head_id = train_head(st, [embs[0].embedding_id], "all", "all", "logreg")
        shown = predict(st, head_id, "target")
    truth = (target.obs["drug_x"] == "sensitive").to_numpy()
    assert (shown["label_set"] == "X").all() and (shown["response"].to_numpy(bool) == truth).all()
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        rows = client.get("/api/predictions", params={"head_id": head_id, "dataset": "target"}).json()
        csv = client.get("/api/predictions.csv", params={"head_id": head_id, "dataset": "target"}).text
    rows = sorted(rows, key=lambda r: r["row"])
    assert [r["label_set"] for r in rows] == ["X"] * 40
    assert [r["response"] for r in rows] == truth.astype(int).tolist()  # drug Y's labels are the opposite
    assert "label_set" in csv.splitlines()[0]
