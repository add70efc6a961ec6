"""GET /api/models counts what `scdm ls` and the leaderboards show: complete embeddings, results not left out."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest
from fastapi.testclient import TestClient

from scdm.classify.grid import evaluate
from scdm.classify.heads import LogRegHead
from scdm.server import create_app
from scdm.store import example_data
from tests.classify.test_trained_heads import _scores, a375_store, write_embedding
from tests.server.conftest import TOKEN


@pytest.mark.filterwarnings("ignore::scdm.classify.splits.SampleLeakageWarning")
def test_models_count_complete_embeddings_and_call_a_model_evaluated_only_with_shown_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: an embedding stopped half-way counted in n_embeddings (2 for pca-test, `scdm ls` lists 1),
    # and a model whose only results an older scdm fitted (left out of every leaderboard) read evaluated
    st = a375_store(tmp_path / "store")
    write_embedding(st, "a375", _scores(ad.read_h5ad(example_data("A375")), 6))
    st.create_embedding("a375", model="pca-test", params={"n_components": 3}, dim=3)  # never finished
    with monkeypatch.context() as m:  # the older scdm: revision 1 of logreg, no head_revisions in its config
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        evaluate(st, heads=["logreg"], scenarios=["pooled"], by=["all"], folds=3, seed=0, silent=True)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET config = json_object('heads', ['logreg'])")
    with TestClient(create_app(st, token=TOKEN), base_url="http://127.0.0.1:8000",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        (row,) = client.get("/api/models").json()
        assert (row["n_embeddings"], row["n_unfinished"], row["n_datasets"]) == (1, 1, 1)
        assert row["evaluated"] is False
        assert client.get("/api/models/pca-test").json()["leaderboard"] == []
        evaluate(st, heads=["logreg"], scenarios=["pooled"], by=["all"], folds=3, seed=0, silent=True)  # this scdm
        assert client.get("/api/models").json()[0]["evaluated"] is True
