"""The JSON API: through FastAPI's TestClient (``client``) and against a real ``scdm serve`` process (``server``)."""

from __future__ import annotations

import http.client
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd
import pytest

from scdm.store import example_data
from tests.server.conftest import TOKEN, Server, server_at, start_server, stop_server


# --------------------------------------------------------------------------------------------
# the real server
# --------------------------------------------------------------------------------------------
def test_every_route_needs_the_token(server: Server) -> None:
    for path in ("/", "/openapi.json", "/docs", "/api/datasets", "/api/leaderboard", "/report/index.html", "/nowhere"):
        status, headers, body = server.request("GET", path, token=None)
        assert status == 401, path
        assert json.loads(body)["error"].startswith("Missing or wrong token") and "bearer" in headers["www-authenticate"].lower()
    assert server.request("GET", "/api/datasets", token="wrong-token-0000000")[0] == 401
    assert server.request("POST", "/api/sql", {"query": "SELECT 1"}, token=None)[0] == 401
    # a browser logs in once: a session value (not the token) moves into an HttpOnly cookie
    status, headers, _ = server.request("GET", f"/?token={server.token}", token=None)
    assert status == 302 and "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";")[0]
    assert TOKEN not in headers["set-cookie"]
    status, headers, body = server.request("GET", "/", token=None, headers={"Cookie": cookie})
    assert status == 200 and headers["content-type"].startswith("text/html") and b"Leaderboard" in body
    # the static files of the login page need no token (they hold nothing of the store)
    assert server.request("GET", "/static/scdm.css", token=None)[0] == 200


def test_openapi_documents_the_routes_with_their_schemas(server: Server) -> None:
    status, doc = server.json("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/api/datasets", "/api/embeddings", "/api/leaderboard", "/api/results", "/api/skipped", "/api/sql",
                 "/api/heads", "/api/predictions", "/api/jobs/predict", "/api/jobs/{job_id}", "/api/upload"):
        assert path in doc["paths"], path
    params = {p["name"]: p for p in doc["paths"]["/api/leaderboard"]["get"]["parameters"]}
    assert {"model", "head", "scenario", "category_type", "category", "metric", "dataset", "label_set"} <= set(params)
    schemas = doc["components"]["schemas"]
    assert schemas["Scenario"]["enum"] == ["pooled", "cross", "custom"]
    assert "auroc" in schemas["Metric"]["enum"] and "shuffled-label" in schemas["HeadName"]["enum"]
    assert {"datasets", "label_set", "folds_done", "folds_expected", "complete"} <= set(schemas["LeaderboardRow"]["properties"])
    body = doc["paths"]["/api/sql"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/SqlRequest") and schemas["SqlRequest"]["required"] == ["query"]
    assert "application/octet-stream" in doc["paths"]["/api/upload"]["post"]["requestBody"]["content"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    status, headers, page = server.request("GET", "/docs")
    assert status == 200 and b"/openapi.json" in page and b"/static/docs.js" in page
    assert "<script>" not in page.decode()  # no inline script, even on the docs page


def test_catalog_reads(server: Server) -> None:
    status, datasets = server.json("GET", "/api/datasets")
    assert status == 200 and [d["name"] for d in datasets] == ["a375"] and datasets[0]["n_cells"] == 108
    status, emb = server.json("GET", "/api/embeddings?model=pca&status=complete")
    assert status == 200 and emb[0]["embedding_id"] == server.info["embedding_id"]
    assert emb[0]["params"]["n_comps_requested"] == 8 and emb[0]["telemetry"]["cells"] == 108
    assert emb[0]["telemetry"]["cells_per_s"] > 0 and emb[0]["status"] == "complete"
    status, board = server.json("GET", "/api/leaderboard?metric=auroc&category_type=all&head=ridge&model=pca&scenario=pooled")
    assert status == 200 and len(board) == 1
    assert board[0]["metric"] == "auroc" and board[0]["n_folds"] == 3 and 0.5 < board[0]["mean"] <= 1.0
    assert board[0]["datasets"] == "a375" and board[0]["label_set"] == "response_PLX4720" and board[0]["complete"] is True
    status, by_cat = server.json("GET", "/api/leaderboard?metric=auroc,f1&category=skin")
    assert status == 200 and {r["category"] for r in by_cat} == {"skin"} and {r["metric"] for r in by_cat} == {"auroc", "f1"}
    status, repeated = server.json("GET", "/api/leaderboard?metric=auroc&metric=f1&category=skin")
    assert status == 200 and repeated == by_cat
    status, results = server.json("GET", "/api/results?metric=auroc&category_type=all")
    assert status == 200 and sorted(r["fold"] for r in results) == [0, 1, 2]
    assert board[0]["mean"] == pytest.approx(sum(r["value"] for r in results) / 3)
    status, skipped = server.json("GET", "/api/skipped")
    assert status == 200 and skipped == []
    status, heads = server.json("GET", "/api/heads")
    assert status == 200 and heads[0]["head_id"] == server.info["head_id"] and heads[0]["head"] == "ridge"
    assert any(m["metric"] == "auroc" and m["n_folds"] == 3 for m in heads[0]["train_metrics"])
    status, model = server.json("GET", "/api/models/pca")
    assert status == 200 and model["embeddings"] and model["leaderboard"] and model["trained_heads"]
    status, err = server.json("GET", "/api/models/nosuchmodel")
    assert status == 404 and "nosuchmodel" in err["error"]
    status, err = server.json("GET", "/api/results?limit=abc")
    assert status == 422 and err["error"].startswith("limit='abc'") and "integer" in err["error"]


def test_sql_is_read_only_and_limited(server: Server) -> None:
    status, out = server.json("POST", "/api/sql", {"query": "SELECT * FROM range(5000)", "max_rows": 10})
    assert status == 200 and out["n_rows"] == 10 and out["truncated"] and out["columns"] == ["range"]
    status, out = server.json("POST", "/api/sql", {"query": "SELECT * FROM range(5000)", "max_rows": 10**9})
    assert status == 200 and out["n_rows"] == 1000 and out["max_rows"] == 1000  # the server's cap
    for query in ("DELETE FROM datasets", "DROP TABLE cells", "INSERT INTO meta VALUES ('a', 'b')",
                  "SELECT 1; DELETE FROM datasets", "COPY datasets TO '/tmp/x.csv'", "ATTACH '/tmp/x.db'"):
        status, err = server.json("POST", "/api/sql", {"query": query})
        assert status == 403 and "traceback" not in err["error"].lower(), query
    status, err = server.json("POST", "/api/sql", {"query": "SELECT * FROM no_such_table"})
    assert status == 400 and "no_such_table" in err["error"]
    status, err = server.json("POST", "/api/sql", {})
    assert status == 422 and err["error"] == "query: Field required"
    status, err = server.json("POST", "/api/sql", {"query": "SELECT 1", "max_rows": 0})
    assert status == 422 and err["error"].startswith("max_rows=0")
    status, _, body = server.request("POST", "/api/sql", b"not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    _, datasets = server.json("GET", "/api/datasets")
    assert len(datasets) == 1  # nothing was deleted


def test_prediction_job_round_trip(server: Server) -> None:
    status, job = server.json("POST", "/api/jobs/predict", {"head_id": server.info["head_id"], "dataset": "a375"})
    assert status == 202 and job["state"] in ("queued", "running", "done") and job["status_url"] == f"/api/jobs/{job['job_id']}"
    done = server.wait_job(job["job_id"])
    assert done["state"] == "done" and done["progress"] == 1.0 and done["result"]["n_cells"] == 108
    assert done["position"] is None and done["started_at"] >= done["created_at"]
    status, rows = server.json("GET", f"/api/predictions?head_id={server.info['head_id']}&dataset=a375")
    assert status == 200 and len(rows) == 108 and all(0.0 <= r["proba"] <= 1.0 for r in rows)
    assert all(r["label"] == int(r["proba"] >= 0.5) for r in rows)
    status, headers, body = server.request("GET", done["result"]["csv_url"])
    assert status == 200 and headers["content-type"].startswith("text/csv") and "attachment" in headers["content-disposition"]
    csv = pd.read_csv(io.BytesIO(body))
    assert len(csv) == 108 and {"cell_id", "proba", "label", "response", "trained_on"} <= set(csv.columns)
    # the head was fitted on a375: every prediction is a fitted value, as scdm predict marks it (108 of 108)
    assert csv["trained_on"].all() and all(r["trained_on"] for r in rows) and done["result"]["n_trained_on"] == 108
    status, err = server.json("POST", "/api/jobs/predict", {"head_id": "ffffffffffffffff", "dataset": "a375"})
    assert status == 404 and "ffffffffffffffff" in err["error"]
    status, err = server.json("POST", "/api/jobs/predict", {"head_id": server.info["head_id"], "dataset": "nope"})
    assert status == 404
    assert server.json("GET", "/api/jobs/doesnotexist")[0] == 404
    status, jobs = server.json("GET", "/api/jobs")
    assert status == 200 and job["job_id"] in {j["job_id"] for j in jobs}


def test_a_job_survives_its_client_disconnecting(server: Server) -> None:
    """The client sends the request and hangs up without reading the answer: the job still runs to the end."""
    _, before = server.json("GET", "/api/jobs")
    body = json.dumps({"head_id": server.info["head_id"], "dataset": "a375"}).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/api/jobs/predict", body=body,
                 headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
    conn.sock.close()  # gone before the answer
    conn.close()
    new: list[dict[str, Any]] = []
    for _ in range(300):
        _, jobs = server.json("GET", "/api/jobs")
        new = [j for j in jobs if j["job_id"] not in {b["job_id"] for b in before}]
        if new and new[0]["state"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert len(new) == 1 and new[0]["state"] == "done" and new[0]["result"]["n_cells"] == 108


def _upload(server: Server, filename: str, body: bytes, query: str = "") -> tuple[int, dict]:
    status, _, data = server.request("POST", f"/api/upload?filename={filename}{query}", body,
                                     headers={"Content-Type": "application/octet-stream"})
    return status, json.loads(data)


def test_upload_names_that_leave_the_store_are_refused(server: Server) -> None:
    for name in ("../evil.h5ad", "..%2Fevil.h5ad", "%2Ftmp%2Fevil.h5ad", "sub%2Fx.h5ad", "..h5ad", "x.txt", ".hidden.h5ad", ""):
        status, err = _upload(server, name, b"\x89HDF")
        assert status == 400 and "refused" in err["error"], name
    assert not (server.store.parent / "evil.h5ad").exists() and not (Path(tempfile.gettempdir()) / "evil.h5ad").exists()
    status, _, body = server.request("GET", "/report/../../etc/passwd")
    assert status in (403, 404)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.putrequest("GET", "/report/%2e%2e/catalog.duckdb", skip_accept_encoding=True)
    conn.putheader("Authorization", f"Bearer {server.token}")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 403 and b"outside the report folder" in resp.read()
    conn.close()


def test_oversized_upload_is_refused_before_reading(server: Server) -> None:
    limit = 2 * Path(example_data("A375")).stat().st_size
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.putrequest("POST", "/api/upload?filename=big.h5ad")
    conn.putheader("Authorization", f"Bearer {server.token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()  # no body is sent: the server must answer from the header alone
    resp = conn.getresponse()
    err = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and str(limit) in err["error"]
    assert not list(server.store.glob("uploads/**/*big*"))


def test_a_failed_upload_leaves_nothing_behind(server: Server) -> None:
    """Bytes that are not an .h5ad: the job fails with the reader's message, and its file is removed."""
    _, before = server.json("GET", "/api/datasets")
    status, job = _upload(server, "broken.h5ad", b"this is not an HDF5 file" * 100, "&name=broken")
    assert status == 202, job
    done = server.wait_job(job["job_id"])
    assert done["state"] == "failed" and done["message"]
    assert not list(server.store.glob("uploads/**/*broken*")) and not (server.store / "uploads" / job["job_id"]).exists()
    _, after = server.json("GET", "/api/datasets")
    assert after == before


def test_upload_is_ingested_embedded_with_the_baseline_and_predicted(server: Server, tmp_path: Path) -> None:
    adata = ad.read_h5ad(example_data("A375"))[:50].copy()
    adata.obs_names = [f"new_{i}" for i in range(adata.n_obs)]
    path = tmp_path / "batch.h5ad"
    adata.write_h5ad(path)
    status, job = _upload(server, "batch.h5ad", path.read_bytes(), f"&name=newbatch&head_id={server.info['head_id']}")
    assert status == 202, job
    done = server.wait_job(job["job_id"], timeout=120)
    assert done["state"] == "done", done
    result = done["result"]
    assert result["dataset"] == "newbatch" and result["n_cells"] == 50 and result["requested_head_id"] == server.info["head_id"]
    # the store keeps its own copy of the data: the upload is removed when its job ends, done too
    assert not (server.store / "uploads" / job["job_id"]).exists()
    assert not list(server.store.glob(f"uploads/.{job['job_id']}.lock"))
    status, rows = server.json("GET", f"/api/predictions?head_id={result['head_id']}&dataset=newbatch")
    assert status == 200 and len(rows) == 50 and {r["cell_id"] for r in rows} == set(adata.obs_names)
    # the head retrained in the joint space saw the same training cells and settings
    _, heads = server.json("GET", f"/api/heads/{result['head_id']}")
    assert heads["datasets"] == ["a375"] and heads["n_train"] == 108 and heads["head"] == "ridge"


def test_report_files_are_served_from_the_store_only(server: Server) -> None:
    report = server.store / "artifacts" / "report"
    figures = report / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (figures / "overview_bars.png").write_bytes(png)
    (report / "index.html").write_text("<html><body>report</body></html>")
    try:
        status, listing = server.json("GET", "/api/report/figures")
        assert status == 200 and listing["generated"] and listing["figures"] == ["/report/figures/overview_bars.png"]
        status, headers, body = server.request("GET", "/report/figures/overview_bars.png")
        assert status == 200 and headers["content-type"] == "image/png" and body == png
        assert "script-src 'none'" in headers["content-security-policy"]  # nothing in the report folder runs script
        status, _, body = server.request("GET", "/report/figures/missing.png")
        assert status == 404 and b"POST /api/report" in body
    finally:
        (figures / "overview_bars.png").unlink()
        (report / "index.html").unlink()


@pytest.mark.slow
def test_report_job_writes_the_report_into_the_store(server: Server) -> None:
    status, job = server.json("POST", "/api/report", {"projection": "pca"})
    assert status == 202
    done = server.wait_job(job["job_id"], timeout=300)
    assert done["state"] == "done", done
    status, listing = server.json("GET", "/api/report/figures")
    assert any("radar_" in f for f in listing["figures"]) and any("projection_" in f for f in listing["figures"])
    status, headers, body = server.request("GET", "/report/index.html")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in body.lower()


def test_server_without_token_answers_and_stops(tmp_path: Path) -> None:
    proc, url = start_server(tmp_path / "store", token=None)
    try:
        plain = server_at(url, None, tmp_path / "store", {})
        status, health = plain.json("GET", "/api/health")
        assert status == 200 and health["auth"] is False and health["max_jobs"] == 1
        status, err = plain.json("DELETE", "/api/datasets")
        assert status == 405 and "GET" in err["error"]
        status, figs = plain.json("GET", "/api/report/figures")
        assert status == 200 and figs["generated"] is False and figs["figures"] == []
        assert figs["folder"] == str((tmp_path / "store" / "artifacts" / "report").resolve())
    finally:
        stop_server(proc)
    assert proc.returncode == 0


def test_leaderboard_rows_carry_datasets_and_label_set_and_filter_on_them(tmp_path: Path) -> None:
    """Two datasets embedded with pca separately, one of them under two label sets: three results."""
    import warnings

    from scdm.classify.grid import evaluate
    from scdm.embedding.runner import embed_baseline
    from scdm.store import Store
    from scdm.store.splits import SampleLeakageWarning

    jhu006 = Path(__file__).resolve().parents[1] / "data" / "JHU006_HNSCC_Kinker2020.h5ad"
    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
        st.ingest(jhu006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006")
        st.ingest(jhu006, label_key="response_Vorinostat", drug="Vorinostat")  # a second label set, same cells
        embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        (jhu,) = embed_baseline(st, ["jhu006"], model="pca", n_comps=4, n_hvg=100, progress=False)
        options = {"scenarios": ["pooled"], "by": ["all"], "heads": ["ridge"], "folds": 3, "silent": True}
        evaluate(st, **options)
        evaluate(st, [jhu.embedding_id], label_set="Vorinostat", **options)
    proc, url = start_server(tmp_path / "store", token=None)
    try:
        api = server_at(url, None, tmp_path / "store", {})
        status, board = api.json("GET", "/api/leaderboard?metric=auroc")
        assert status == 200
        assert sorted((r["datasets"], r["label_set"]) for r in board) == [
            ("a375", "response_PLX4720"), ("jhu006", "Gefitinib"), ("jhu006", "Vorinostat")]
        assert all(r["k"] == r["folds_done"] == r["folds_expected"] == r["n_folds"] == 3 and r["complete"] for r in board)
        status, one = api.json("GET", "/api/leaderboard?metric=auroc&dataset=jhu006")
        assert status == 200 and sorted(r["label_set"] for r in one) == ["Gefitinib", "Vorinostat"]
        assert {r["datasets"] for r in one} == {"jhu006"}
        status, vorinostat = api.json("GET", "/api/leaderboard?metric=auroc&label_set=Vorinostat")
        assert status == 200 and [(r["datasets"], r["label_set"]) for r in vorinostat] == [("jhu006", "Vorinostat")]
        status, none = api.json("GET", "/api/leaderboard?dataset=nosuchdataset")
        assert status == 200 and none == []
        # per-fold values filter the same way, and average to the leaderboard's mean
        status, folds = api.json("GET", "/api/results?metric=auroc&dataset=jhu006&label_set=Vorinostat")
        assert status == 200 and sorted(r["fold"] for r in folds) == [0, 1, 2]
        assert vorinostat[0]["mean"] == pytest.approx(sum(r["value"] for r in folds) / 3)
        # the model page: one model name, two datasets and two label sets, apart
        status, model = api.json("GET", "/api/models/pca")
        assert status == 200
        assert {(r["datasets"], r["label_set"]) for r in model["leaderboard"]} == {
            ("a375", "response_PLX4720"), ("jhu006", "Gefitinib"), ("jhu006", "Vorinostat")}
        status, doc = api.json("GET", "/openapi.json")
        params = {p["name"] for p in doc["paths"]["/api/leaderboard"]["get"]["parameters"]}
        assert {"dataset", "label_set"} <= params
        # the page's leaderboard form has the filters; its script shows the columns
        _, _, page = api.request("GET", "/")
        assert b'name="dataset"' in page and b'name="label_set"' in page
        _, _, script = api.request("GET", "/static/scdm.js")
        assert b'"datasets", "label_set", "head"' in script
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------------------------
# through the TestClient (no process)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "field", "allowed"), [
    ("scenario=poooled", "scenario='poooled'", "'pooled', 'cross' or 'custom'"),
    ("scheme=cel", "scheme='cel'", "'cell', 'sample', 'study' or 'custom'"),
    ("category_type=tisue", "category_type='tisue'", "'all', 'tissue', 'cancer_type', 'drug_type' or 'regimen'"),
    ("metric=auroc,aucroc", "metric='aucroc'", "'accuracy', 'precision'"),
    ("head=rige", "head='rige'", "'mlp', 'logreg'"),
])
def test_misspelled_filter_values_are_a_422_naming_the_allowed_ones(client: Any, query: str, field: str, allowed: str) -> None:
    for route in ("/api/leaderboard", "/api/results"):
        response = client.get(f"{route}?{query}")
        assert response.status_code == 422, route
        err = response.json()
        assert err["status"] == 422 and err["error"].startswith(field) and allowed in err["error"]
        assert err["detail"][0]["loc"][:2] == ["query", field.split("=")[0]]


def test_prompt_heads_are_filters_like_the_others(client: Any) -> None:
    # scdm prompt writes results with heads prompt-zero-shot / prompt-<k>-shot; `scdm results --head` takes them
    for route in ("/api/leaderboard", "/api/results"):
        for head in ("prompt-zero-shot", "prompt-4-shot", "ridge,prompt-zero-shot"):
            response = client.get(f"{route}?head={head}")
            assert response.status_code == 200, (route, head, response.text)
            assert {r["head"] for r in response.json()} <= {"ridge"}
        for head in ("prompt-zero-shoot", "prompt-0-shot", "prompt--shot"):
            assert client.get(f"{route}?head={head}").status_code == 422, (route, head)


def test_misspelled_parameter_names_are_refused(client: Any) -> None:
    response = client.get("/api/leaderboard?scenarios=pooled")
    assert response.status_code == 422 and response.json()["error"] == "scenarios: unknown parameter (misspelled?)"
    assert client.get("/api/embeddings?status=done").status_code == 422


def test_filters_take_lists_and_agree_with_the_per_fold_rows(client: Any) -> None:
    board = client.get("/api/leaderboard", params={"metric": "auroc,f1", "scheme": "cell", "category_type": "all"}).json()
    assert {(r["metric"], r["scheme"], r["category_type"]) for r in board} == {("auroc", "cell", "all"), ("f1", "cell", "all")}
    folds = client.get("/api/results", params={"metric": "auroc", "category_type": "all", "limit": 2}).json()
    assert len(folds) == 2 and client.get("/api/results?offset=2&metric=auroc&category_type=all").json()[0]["fold"] == 2
    assert client.get("/api/leaderboard?scheme=study").json() == []
    assert client.get("/api/leaderboard?metric=").status_code == 200  # an empty field means any


@pytest.mark.parametrize("route", ["/api/results", "/api/predictions", "/api/leaderboard"])
def test_an_offset_past_int64_is_a_422_not_a_500(client: Any, route: str) -> None:
    response = client.get(route, params={"offset": 2**63})
    assert response.status_code == 422
    assert response.json()["error"].startswith(f"offset='{2**63}'") and str(2**63 - 1) in response.json()["error"]
    last = client.get(route, params={"offset": 2**63 - 1})
    assert last.status_code == 200 and last.json() == []
    assert client.get(route, params={"offset": -1}).status_code == 422


def test_a_sql_syntax_error_is_a_400_with_the_parsers_message_and_a_write_a_403(client: Any) -> None:
    response = client.post("/api/sql", json={"query": "SELEC name FROM datasets"})
    assert response.status_code == 400 and response.json()["status"] == 400
    assert "syntax error" in response.json()["error"] and "SELEC" in response.json()["error"]
    assert client.post("/api/sql", json={"query": "   "}).status_code == 400  # no statement at all
    assert client.post("/api/sql", json={"query": "DROP TABLE datasets"}).status_code == 403


def test_the_leaderboard_pages_like_the_results_and_says_its_total(client: Any, built_store: tuple[Path, dict[str, str]]) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app
    from scdm.store import Store

    full = client.get("/api/leaderboard")
    everything = full.json()
    assert int(full.headers["x-total-count"]) == len(everything) > 5
    app = create_app(Store(built_store[0]), token=TOKEN, page_rows=5)  # pages shorter than the leaderboard
    with TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {TOKEN}"}) as small:
        first = small.get("/api/leaderboard")
        assert len(first.json()) == 5 and int(first.headers["x-total-count"]) == len(everything)  # cut, and it says so
        pages, offset = [], 0
        while offset < len(everything):
            page = small.get("/api/leaderboard", params={"limit": 3, "offset": offset})
            assert page.status_code == 200 and int(page.headers["x-total-count"]) == len(everything)
            pages += page.json()
            offset += 3
        assert pages == everything  # every row once, in the same order
        assert small.get("/api/leaderboard", params={"limit": 10**9}).json() == everything[:5]  # capped at the page size
        filtered = small.get("/api/leaderboard", params={"metric": "auroc", "limit": 1, "offset": 1})
        auroc = [r for r in everything if r["metric"] == "auroc"]
        assert filtered.json() == auroc[1:2] and int(filtered.headers["x-total-count"]) == len(auroc)
        assert small.get("/api/leaderboard", params={"limit": 0}).status_code == 422


def test_health_and_models_answer_through_the_test_client(client: Any, built_store: tuple[Path, dict[str, str]]) -> None:
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "store": str(built_store[0].resolve()), "auth": True, "read_only": False,
                      "version": health["version"], "max_jobs": 1}
    (pca,) = client.get("/api/models").json()  # other tests of the module may embed uploads with pca too
    assert pca["model"] == "pca" and pca["n_embeddings"] >= 1 and pca["variants"] == ["frozen"] and pca["evaluated"] is True


def test_a_model_with_results_and_no_embedding_is_listed(tmp_path: Path) -> None:
    # a language model's prompting results (scdm prompt) are on the leaderboard; /api/models lists it too
    from fastapi.testclient import TestClient

    from scdm.server import create_app
    from scdm.store import Store
    from scdm.store.prompts import ANSWER_PARSER_VERSION, ZERO_SHOT_BATCHING

    st = Store(tmp_path / "store")
    # a prompting task of this scdm (an older parser's or batching's would be left out of the leaderboard)
    params = json.dumps({"answer_parser": ANSWER_PARSER_VERSION, "batching": ZERO_SHOT_BATCHING})
    common = {"run_id": "run1", "space_id": "space1", "model": "fake-llm", "variant": "prompt", "split_id": "split1",
              "scenario": "pooled", "category_type": "all", "category": "all", "scheme": "cell", "head": "prompt-zero-shot",
              "datasets": "d1", "label_set": "response", "n_folds": 1, "seed": 0, "head_params": params, "task_id": "t0",
              "fold": 0, "n_train": 80, "n_test": 40, "fit_seconds": 1.5}
    st.insert_df("eval_tasks", pd.DataFrame([{**common, "embedding_ids": "[]", "n_test_pos": 20, "predict_seconds": 0.1,
                                              "flags": None, "created_at": pd.Timestamp("2026-01-01")}]))
    st.insert_df("eval_results", pd.DataFrame([{**common, "metric": "auroc", "value": 0.7}]))
    with TestClient(create_app(st, token=TOKEN), base_url="http://127.0.0.1:8000",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as small:
        assert small.get("/api/models").json() == [{"model": "fake-llm", "n_embeddings": 0, "n_unfinished": 0, "n_datasets": 0,
                                                   "variants": ["prompt"], "evaluated": True}]
        assert small.get("/api/models/fake-llm").json()["leaderboard"][0]["mean"] == 0.7


def test_a_store_opened_read_only_refuses_jobs_that_write_it(built_store: tuple[Path, dict[str, str]]) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app
    from scdm.store import Store

    path, info = built_store
    before = sorted(path.rglob("*"))
    app = create_app(Store(path, read_only=True))
    with TestClient(app, base_url="http://localhost") as plain:
        assert plain.get("/api/datasets").status_code == 200
        response = plain.post("/api/report", json={})
        assert response.status_code == 403 and "read-only" in response.json()["error"].lower()
        response = plain.post("/api/upload?filename=x.h5ad", content=b"x", headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 403
    assert sorted(path.rglob("*")) == before


def test_root_path_prefixes_every_url_the_server_hands_out(built_store: tuple[Path, dict[str, str]]) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app
    from scdm.store import Store

    path, info = built_store
    app = create_app(Store(path))
    with TestClient(app, base_url="http://localhost", root_path="/scdm") as proxied:
        page = proxied.get("/scdm/").text
        assert 'data-root="/scdm"' in page and 'src="/scdm/static/scdm.js' in page and 'href="/scdm/static/scdm.css' in page
        job = proxied.post("/scdm/api/jobs/predict", json={"head_id": info["head_id"], "dataset": "a375"}).json()
        assert job["status_url"] == f"/scdm/api/jobs/{job['job_id']}"
        for _ in range(600):
            done = proxied.get(job["status_url"]).json()
            if done["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert done["state"] == "done" and done["result"]["csv_url"].startswith("/scdm/api/predictions.csv?")
        figures = proxied.get("/scdm/api/report/figures").json()  # the slow report test may have written one
        assert all(f.startswith("/scdm/report/figures/") for f in figures["figures"])
        assert figures["index"] is None or figures["index"] == "/scdm/report/index.html"


def test_the_non_loopback_bind_and_bad_tokens_are_refused_before_serving(tmp_path: Path) -> None:
    from scdm.server import serve
    from scdm.store.errors import InputDataError

    with pytest.raises(InputDataError, match="--token"):
        serve(tmp_path / "store", host="0.0.0.0", port=0)
    for token, match in (("   ", "only whitespace"), ("short-token", "at least 16"), (" padded-token-0123456789 ", "whitespace")):
        with pytest.raises(InputDataError, match=match):
            serve(tmp_path / "store", port=0, token=token)
    with pytest.raises(InputDataError, match="fixed port"):
        serve(tmp_path / "store", port=0, workers=2)
