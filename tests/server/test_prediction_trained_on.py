"""The server's predictions say which cells trained the head, as `scdm predict` does.

`scdm predict` marks the cells a head was fitted on (column trained_on) and warns that their
predictions are fitted values; the server's job, JSON and CSV of the same predictions carried no
such flag: a head predicting its own training cells read as 60 held-out predictions.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import Store
from tests.server.jobwait import finished


def _adata(n: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    response = np.array(["sensitive", "resistant"] * (n // 2))
    counts = rng.poisson(1.0, size=(n, 60)).astype(np.float32)
    counts[response == "sensitive", :8] += 4
    obs = pd.DataFrame({"response": response}, index=[f"s{seed}c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(60)]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, str, Any]]:
    """A head trained on 'train' (60 cells) of a joint pca space that also holds 'new' (40 held-out cells)."""
    from fastapi.testclient import TestClient

    from scdm.classify.trained_heads import train_head
    from scdm.embedding.runner import embed_baseline
    from scdm.server import create_app
    from scdm.store.splits import SampleLeakageWarning

    st = Store(tmp_path_factory.mktemp("trained-on") / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(_adata(60, 0), name="train", label_key="response")
        st.ingest(_adata(40, 1), name="new", label_key="response")
        embs = embed_baseline(st, ["train", "new"], model="pca", n_comps=4, progress=False)
        head_id = train_head(st, [embs[0].embedding_id], "all", "all", "logreg")
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        yield st, head_id, client


def _predict_job(client: Any, head_id: str, dataset: str) -> dict[str, Any]:
    job = client.post("/api/jobs/predict", json={"head_id": head_id, "dataset": dataset}).json()
    job = finished(client, job)
    assert job["state"] == "done", job
    return job


@pytest.mark.parametrize(("dataset", "n_trained_on"), [("train", 60), ("new", 0)])
def test_the_server_marks_the_cells_that_trained_the_head_as_scdm_predict_does(
        trained: tuple[Store, str, Any], dataset: str, n_trained_on: int) -> None:
    from scdm.classify.trained_heads import predict

    st, head_id, client = trained
    job = _predict_job(client, head_id, dataset)
    params = {"head_id": head_id, "dataset": dataset}
    served = pd.DataFrame(client.get("/api/predictions", params=params).json()).sort_values("row")
    csv = pd.read_csv(io.StringIO(client.get(job["result"]["csv_url"]).text)).sort_values("row")
    cli = predict(st, head_id, dataset)
    assert served["trained_on"].tolist() == csv["trained_on"].tolist() == cli["trained_on"].tolist()
    assert int(served["trained_on"].sum()) == job["result"]["n_trained_on"] == n_trained_on
    # the warning scdm predict prints about them, in its words, comes with the job
    assert job["result"]["notes"] == cli.attrs["notes"]
    assert any(f"{n_trained_on} of the {len(cli)} cells of {dataset} trained head" in n for n in job["result"]["notes"]) \
        == bool(n_trained_on)


def test_predictions_stored_without_the_flag_are_served_as_unknown(trained: tuple[Store, str, Any]) -> None:
    from scdm.classify.trained_heads import predict
    from scdm.store.heads import Predictions, replace_predictions

    st, head_id, client = trained
    frame = predict(st, head_id, "train")
    replace_predictions(st, Predictions(head_id, frame["dataset_id"].iloc[0], frame["embedding_id"].iloc[0],
                                        frame["row"].to_numpy(), frame["proba"].to_numpy(), frame["label"].to_numpy()))
    try:
        rows = client.get("/api/predictions", params={"head_id": head_id, "dataset": "train"}).json()
        assert {r["trained_on"] for r in rows} == {None}  # not recorded: neither held-out nor trained on
    finally:
        predict(st, head_id, "train")


def test_predicting_with_a_head_an_older_revision_fitted_says_so(trained: tuple[Store, str, Any]) -> None:
    """GET /api/heads marks a head fitted by an older revision ('train it again'); its predictions, through
    `scdm predict` or the server's job, came with no word of it."""
    from scdm.classify.trained_heads import predict, trained_heads

    st, head_id, client = trained
    with st.catalog.transaction() as con:  # as an scdm of logreg's revision 2 recorded it
        con.execute("UPDATE trained_heads SET revision = 2 WHERE head_id = ?", [head_id])
    try:
        (revision_note,) = trained_heads(st).query("head_id == @head_id")["revision_note"]
        assert revision_note.startswith("fitted by revision 2 of logreg, now 4")
        cli = predict(st, head_id, "new")
        job = _predict_job(client, head_id, "new")
        for notes in (cli.attrs["notes"], job["result"]["notes"]):
            (note,) = [n for n in notes if revision_note in n]
            assert f"head {head_id}: " in note and "train-head --embedding" in note
    finally:
        with st.catalog.transaction() as con:
            con.execute("UPDATE trained_heads SET revision = 4 WHERE head_id = ?", [head_id])


def test_the_models_page_shows_why_a_trained_head_may_be_wrong_now(trained: tuple[Store, str, Any]) -> None:
    """The Models tab listed a head fitted by an older revision like any other (GET /api/heads says 'train it again')."""
    import html

    from tests.server.test_number_format import run_page_loader
    from tests.server.test_page_columns import html_table

    st, head_id, client = trained
    with st.catalog.transaction() as con:
        con.execute("UPDATE trained_heads SET revision = 2 WHERE head_id = ?", [head_id])
    try:
        answer = client.get("/api/models/pca").json()
        shown = run_page_loader("loadModel('pca')", {"/api/models/pca": answer}, [], read="els['mh'].innerHTML",
                                functions=("notesHtml", "loadModel"))
    finally:
        with st.catalog.transaction() as con:
            con.execute("UPDATE trained_heads SET revision = 4 WHERE head_id = ?", [head_id])
    (row,) = html_table(str(shown))
    (listed,) = answer["trained_heads"]
    assert row["head_id"] == head_id and row["threshold"] == "0.500"
    # the whole note is in the cell's title where the table cuts it
    assert listed["revision_note"].startswith("fitted by revision 2 of logreg") and html.escape(listed["revision_note"]) in str(shown)
    assert "note" in row
