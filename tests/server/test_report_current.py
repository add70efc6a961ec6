"""The Figures tab says when the report it shows was drawn from results the store no longer holds.

Before, a report written before a re-ingest with other labels (which removes the results made with
the old labels) was served as the report of the store: figures of results that no longer exist,
beside a leaderboard without them, and nothing said so.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from scdm.store import Store, example_data
from tests.server.conftest import build_store
from tests.server.jobwait import finished


def _write_report(client: Any) -> None:
    job = client.post("/api/report", json={"projection": "none"}).json()
    job = finished(client, job, timeout=120, poll=0.1)
    assert job["state"] == "done", job


def test_a_report_written_before_a_re_ingest_with_other_labels_reads_not_current(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    root = tmp_path / "store"
    build_store(root)
    st = Store(root)
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/report/figures").json()["current"] is None  # no report yet
        _write_report(client)
        figures = client.get("/api/report/figures").json()
        assert figures["generated"] and figures["figures"] and figures["current"] is True
        n_before = len(client.get("/api/leaderboard").json())

        adata = ad.read_h5ad(example_data("A375"))
        labels = adata.obs["response_PLX4720"].astype(str).to_numpy().copy()
        labels[:5] = np.where(labels[:5] == labels[0], labels[-1], labels[0])  # 5 cells change class
        adata.obs["response_PLX4720"] = labels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st.ingest(adata, name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
                      cancer_type="melanoma", drug_type="targeted", regimen="PLX4720", update=True)
        assert n_before and client.get("/api/leaderboard").json() == []  # the results of the old labels are gone
        assert client.get("/api/report/figures").json()["current"] is False

        _write_report(client)
        assert client.get("/api/report/figures").json()["current"] is True


def test_an_embedding_swapped_for_another_changes_the_results_state(tmp_path: Path) -> None:
    # one embedding removed and another completed leave as many embeddings: the report's embedding tables and
    # projections differ all the same
    from scdm.classify.report import results_state
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
                  cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
    (first,) = embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
    with_first = results_state(st)
    st.remove_embedding(first.embedding_id)
    embed_baseline(st, ["a375"], model="pca", n_comps=5, n_hvg=100, progress=False)
    assert results_state(st) != with_first


def test_a_report_of_one_model_is_not_made_out_of_date_by_another_models_results(tmp_path: Path) -> None:
    """A report written for pca alone (write_report(models=["pca"]), as `scdm report` is asked for one model)
    read 'out of date' once hvg results were stored, though not a number on it changed; a pca result still
    makes it out of date."""
    from fastapi.testclient import TestClient

    from scdm.classify.grid import evaluate
    from scdm.classify.report import write_report
    from scdm.embedding.runner import embed_baseline
    from scdm.server import create_app
    from scdm.server.routes import REPORT_DIR

    root = tmp_path / "store"
    build_store(root)
    st = Store(root)
    write_report(st, root / REPORT_DIR, models=["pca"], projection="none", formats=["png"], progress=False)
    options = {"scenarios": ["pooled"], "by": ["all"], "folds": 3, "silent": True}
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert client.get("/api/report/figures").json()["current"] is True
        (hvg,) = embed_baseline(st, ["a375"], model="hvg", n_hvg=50, progress=False)
        evaluate(st, [hvg.embedding_id], heads=["ridge"], **options)
        assert not st.query("SELECT * FROM eval_results WHERE model = 'hvg'").empty
        assert client.get("/api/report/figures").json()["current"] is True
        (pca,) = st.query("SELECT embedding_id FROM embeddings WHERE model = 'pca'")["embedding_id"]
        evaluate(st, [pca], heads=["majority"], **options)
        assert client.get("/api/report/figures").json()["current"] is False
