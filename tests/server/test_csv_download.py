"""The predictions CSV download is opened in spreadsheets: cell ids must not run there as formulas."""

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

# ids a spreadsheet would run (=, +, -, @), and ordinary ones with those characters inside
HOSTILE_IDS = ['=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)"]


def _cells(n: int) -> list[str]:
    return HOSTILE_IDS + [f"AAAC-{i}" for i in range(n - len(HOSTILE_IDS))]


@pytest.fixture(scope="module")
def store_with_predictions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    from scdm.classify.trained_heads import predict, train_head
    from scdm.embedding.runner import embed_baseline
    from scdm.store.splits import SampleLeakageWarning

    rng = np.random.default_rng(0)
    n = 60
    response = np.array(["sensitive", "resistant"] * (n // 2))
    counts = rng.poisson(1.0, size=(n, 80)).astype(np.float32)
    counts[response == "sensitive", :10] += 4  # a signal the head can find
    adata = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame({"response": response}, index=_cells(n)),
                       var=pd.DataFrame(index=[f"GENE{i}" for i in range(80)]))
    st = Store(tmp_path_factory.mktemp("csv") / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(adata, name="cells", label_key="response")
        (emb,) = embed_baseline(st, ["cells"], model="pca", n_comps=4, progress=False)
        head_id = train_head(st, [emb.embedding_id], "all", "all", "ridge")
        predict(st, head_id, "cells")
    return st, head_id


@pytest.fixture(scope="module")
def client(store_with_predictions: tuple[Store, str]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    st, _ = store_with_predictions
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as test_client:
        yield test_client


def test_the_csv_download_quotes_formula_ids_and_the_json_keeps_them(client: Any, store_with_predictions: tuple[Store, str]) -> None:
    _, head_id = store_with_predictions
    answer = client.get("/api/predictions.csv", params={"head_id": head_id, "dataset": "cells"})
    assert answer.status_code == 200
    csv = pd.read_csv(io.StringIO(answer.text), keep_default_na=False)
    ids = csv.sort_values("row")["cell_id"].tolist()
    assert ids == ["'" + i for i in HOSTILE_IDS] + _cells(60)[len(HOSTILE_IDS):]
    text = csv.select_dtypes(include="object").to_numpy().ravel()
    assert not any(v.startswith(("=", "+", "-", "@")) for v in text)
    assert pd.api.types.is_float_dtype(csv["proba"]) and csv["proba"].between(0, 1).all()
    rows = client.get("/api/predictions", params={"head_id": head_id, "dataset": "cells"}).json()
    assert [r["cell_id"] for r in sorted(rows, key=lambda r: r["row"])][:4] == HOSTILE_IDS  # machine-readable: as stored


def test_the_csv_download_holds_the_probabilities_the_json_and_scdm_predict_hold(client: Any,
                                                                                 store_with_predictions: tuple[Store, str],
                                                                                 tmp_path: Any) -> None:
    """The stored float32 proba was written in float32's short form: 0.9432321 in the CSV, 0.9432321190834045 elsewhere."""
    from scdm.classify.trained_heads import predict

    st, head_id = store_with_predictions
    params = {"head_id": head_id, "dataset": "cells"}
    csv = pd.read_csv(io.StringIO(client.get("/api/predictions.csv", params=params).text), float_precision="round_trip")
    served = pd.DataFrame(client.get("/api/predictions", params=params).json())
    predict(st, head_id, "cells", out=tmp_path / "p.csv")
    written = pd.read_csv(tmp_path / "p.csv", float_precision="round_trip")
    by_row = [f.set_index("row").sort_index()["proba"].tolist() for f in (csv, served, written)]
    assert by_row[0] == by_row[1] == by_row[2]
    assert any(len(repr(p)) > 12 for p in by_row[0])  # digits a float32 short form drops


def test_the_csv_download_keeps_probabilities_float32_would_round_to_one(client: Any,
                                                                         store_with_predictions: tuple[Store, str]) -> None:
    """predictions.proba was REAL: 1 - 1e-9 and 1 - 1e-12 were both served as 1.0 in the CSV and the JSON."""
    from scdm.classify.trained_heads import predict
    from scdm.store.heads import Predictions, replace_predictions

    st, head_id = store_with_predictions
    stored = st.query('SELECT dataset_id, "row", embedding_id FROM predictions WHERE head_id = ? ORDER BY "row"', [head_id])
    near_one = 1.0 - 10.0 ** -np.linspace(8.0, 15.0, len(stored))  # distinct in float64, all 1.0 in float32
    replace_predictions(st, Predictions(head_id, stored["dataset_id"].iloc[0], stored["embedding_id"].iloc[0],
                                        stored["row"].to_numpy(), near_one, np.ones(len(stored), np.int8)))
    try:
        params = {"head_id": head_id, "dataset": "cells"}
        csv = pd.read_csv(io.StringIO(client.get("/api/predictions.csv", params=params).text), float_precision="round_trip")
        served = pd.DataFrame(client.get("/api/predictions", params=params).json())
        for frame in (csv, served):
            np.testing.assert_array_equal(frame.sort_values("row")["proba"].to_numpy(), near_one)
    finally:
        predict(st, head_id, "cells")  # the module's other tests read the head's own predictions
