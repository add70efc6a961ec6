"""The JSON API of a real ``scdm_server`` process on a free loopback port."""

from __future__ import annotations

import http.client
import io
import json
import tempfile
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from store import example_data
from tests.server.conftest import Server, start_server, stop_server


def test_every_route_needs_the_token(server: Server) -> None:
    for path in ("/", "/openapi.json", "/api/datasets", "/api/leaderboard", "/report/index.html", "/nowhere"):
        status, headers, body = server.request("GET", path, token=None)
        assert status == 401, path
        assert json.loads(body)["error"].startswith("Missing or wrong token") and "bearer" in headers["www-authenticate"].lower()
    assert server.request("GET", "/api/datasets", token="wrong-token-000")[0] == 401
    assert server.request("POST", "/api/sql", {"query": "SELECT 1"}, token=None)[0] == 401
    # a browser logs in once: the token moves into an HttpOnly cookie
    status, headers, _ = server.request("GET", f"/?token={server.token}", token=None)
    assert status == 302 and "HttpOnly" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";")[0]
    status, headers, body = server.request("GET", "/", token=None, headers={"Cookie": cookie})
    assert status == 200 and headers["content-type"].startswith("text/html") and b"Leaderboard" in body


def test_openapi_documents_the_routes(server: Server) -> None:
    status, doc = server.json("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/api/datasets", "/api/embeddings", "/api/leaderboard", "/api/results", "/api/skipped", "/api/sql",
                 "/api/heads", "/api/predictions", "/api/jobs/predict", "/api/jobs/{job_id}", "/api/upload"):
        assert path in doc["paths"], path
    params = {p["name"] for p in doc["paths"]["/api/leaderboard"]["get"]["parameters"]}
    assert {"model", "head", "scenario", "category_type", "category", "metric"} <= params


def test_catalog_reads(server: Server) -> None:
    status, datasets = server.json("GET", "/api/datasets")
    assert status == 200 and [d["name"] for d in datasets] == ["a375"] and datasets[0]["n_cells"] == 108
    status, emb = server.json("GET", "/api/embeddings?model=pca")
    assert status == 200 and emb[0]["embedding_id"] == server.info["embedding_id"]
    assert emb[0]["params"]["n_comps_requested"] == 8 and emb[0]["telemetry"]["cells"] == 108
    assert emb[0]["telemetry"]["cells_per_s"] > 0 and emb[0]["status"] == "complete"
    status, board = server.json("GET", "/api/leaderboard?metric=auroc&category_type=all&head=ridge&model=pca&scenario=pooled")
    assert status == 200 and len(board) == 1
    assert board[0]["metric"] == "auroc" and board[0]["n_folds"] == 3 and 0.5 < board[0]["mean"] <= 1.0
    status, by_cat = server.json("GET", "/api/leaderboard?metric=auroc,f1&category=skin")
    assert status == 200 and {r["category"] for r in by_cat} == {"skin"} and {r["metric"] for r in by_cat} == {"auroc", "f1"}
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
    assert status == 400 and "not an integer" in err["error"]


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
    assert status == 400 and "query" in err["error"]
    status, _, body = server.request("POST", "/api/sql", b"not json", headers={"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    _, datasets = server.json("GET", "/api/datasets")
    assert len(datasets) == 1  # nothing was deleted


def test_prediction_job_round_trip(server: Server) -> None:
    status, job = server.json("POST", "/api/jobs/predict", {"head_id": server.info["head_id"], "dataset": "a375"})
    assert status == 202 and job["state"] in ("queued", "running", "done")
    done = server.wait_job(job["job_id"])
    assert done["state"] == "done" and done["progress"] == 1.0 and done["result"]["n_cells"] == 108
    status, rows = server.json("GET", f"/api/predictions?head_id={server.info['head_id']}&dataset=a375")
    assert status == 200 and len(rows) == 108 and all(0.0 <= r["proba"] <= 1.0 for r in rows)
    assert all(r["label"] == int(r["proba"] >= 0.5) for r in rows)
    status, headers, body = server.request("GET", done["result"]["csv_url"])
    assert status == 200 and headers["content-type"].startswith("text/csv") and "attachment" in headers["content-disposition"]
    csv = pd.read_csv(io.BytesIO(body))
    assert len(csv) == 108 and {"cell_id", "proba", "label", "response"} <= set(csv.columns)
    status, err = server.json("POST", "/api/jobs/predict", {"head_id": "ffffffffffffffff", "dataset": "a375"})
    assert status == 404 and "ffffffffffffffff" in err["error"]
    status, err = server.json("POST", "/api/jobs/predict", {"head_id": server.info["head_id"], "dataset": "nope"})
    assert status == 404
    assert server.json("GET", "/api/jobs/doesnotexist")[0] == 404


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
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()  # no body is sent: the server must answer from the header alone
    resp = conn.getresponse()
    err = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and str(limit) in err["error"]
    assert not list(server.store.glob("uploads/*big*"))


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
    assert (server.store / "uploads" / "batch.h5ad").is_file()
    status, rows = server.json("GET", f"/api/predictions?head_id={result['head_id']}&dataset=newbatch")
    assert status == 200 and len(rows) == 50 and {r["cell_id"] for r in rows} == set(adata.obs_names)
    # the head retrained in the joint space saw the same training cells and settings
    _, heads = server.json("GET", f"/api/heads/{result['head_id']}")
    assert heads["datasets"] == ["a375"] and heads["n_train"] == 108 and heads["head"] == "ridge"


def test_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    from scdm_server import serve
    from store.errors import InputDataError

    with pytest.raises(InputDataError, match="--token"):
        serve(tmp_path / "store", host="0.0.0.0", port=0)


def test_server_without_token_answers_and_stops(tmp_path: Path) -> None:
    proc, url = start_server(tmp_path / "store", token=None)
    try:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        plain = Server(url, host, int(port), None, tmp_path / "store", {})
        status, health = plain.json("GET", "/api/health")
        assert status == 200 and health["auth"] is False
        status, err = plain.json("DELETE", "/api/datasets")
        assert status == 405 and "GET" in err["error"]
        status, figs = plain.json("GET", "/api/report/figures")
        assert status == 200 and figs == {"generated": False, "figures": []}
    finally:
        stop_server(proc)
    assert proc.returncode is not None


def test_report_files_are_served_from_the_store_only(server: Server) -> None:
    figures = server.store / "artifacts" / "report" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (figures / "overview_bars.png").write_bytes(png)
    status, listing = server.json("GET", "/api/report/figures")
    assert status == 200 and listing == {"generated": True, "figures": ["/report/figures/overview_bars.png"]}
    status, headers, body = server.request("GET", "/report/figures/overview_bars.png")
    assert status == 200 and headers["content-type"] == "image/png" and body == png
    status, _, body = server.request("GET", "/report/figures/missing.png")
    assert status == 404 and b"POST /api/report" in body


@pytest.mark.slow
def test_report_job_writes_the_report_into_the_store(server: Server) -> None:
    status, job = server.json("POST", "/api/report")
    assert status == 202
    done = server.wait_job(job["job_id"], timeout=300)
    assert done["state"] == "done", done
    status, listing = server.json("GET", "/api/report/figures")
    assert any("radar_" in f for f in listing["figures"]) and any("projection_" in f for f in listing["figures"])
    status, headers, body = server.request("GET", "/report/index.html")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in body.lower()
