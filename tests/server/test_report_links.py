"""The report route serves files inside the store only, also when the report folder is a link.

A store may be shared: anyone who may write it could replace ``artifacts/report`` by a link to
``/`` or a home folder, and ``GET /report/<path>`` then served any file the server's user may read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from scdm.store import Store

TOKEN = "report-links-token"


def _client(store: Path) -> Any:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    app = create_app(Store(store), token=TOKEN)
    return TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {TOKEN}"})


def _store_whose_report_links_to(tmp_path: Path, outside: Path) -> Path:
    """A store whose artifacts/report is a link to ``outside`` (as a shared store's writer could make it)."""
    store = tmp_path / "store"
    Store(store)
    (store / "artifacts").mkdir(exist_ok=True)
    os.symlink(outside, store / "artifacts" / "report")
    return store


def test_a_report_folder_linked_outside_the_store_is_not_served(tmp_path: Path) -> None:
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY")
    store = _store_whose_report_links_to(tmp_path, outside)
    with _client(store) as client:
        answer = client.get("/report/id_rsa")
    assert answer.status_code == 403 and "PRIVATE KEY" not in answer.text
    assert "links outside the store" in answer.json()["error"]


def test_a_report_folder_inside_the_store_is_served(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store(store)
    (store / "artifacts" / "report").mkdir(parents=True)
    (store / "artifacts" / "report" / "index.html").write_text("<p>report</p>")
    os.symlink(store, tmp_path / "linked-store")  # the store itself reached through a link is fine
    with _client(tmp_path / "linked-store") as client:
        answer = client.get("/report/index.html")
    assert answer.status_code == 200 and "report" in answer.text


def test_no_report_is_written_into_a_folder_linked_outside_the_store(tmp_path: Path) -> None:
    outside = tmp_path / "project"
    (outside / "tables").mkdir(parents=True)
    (outside / "figures").mkdir()
    (outside / "tables" / "counts.csv").write_text("gene,n\nTP53,3\n")
    store = _store_whose_report_links_to(tmp_path, outside)
    with _client(store) as client:
        answer = client.post("/api/report", json={})
    assert answer.status_code == 403 and "links outside the store" in answer.json()["error"]
    assert (outside / "tables" / "counts.csv").read_text() == "gene,n\nTP53,3\n"


def test_the_figures_of_a_report_folder_linked_outside_the_store_are_not_listed(tmp_path: Path) -> None:
    outside = tmp_path / "home"
    (outside / "figures").mkdir(parents=True)
    (outside / "index.html").write_text("<p>someone's page</p>")
    (outside / "figures" / "holiday-2026.png").write_bytes(b"")
    store = _store_whose_report_links_to(tmp_path, outside)
    with _client(store) as client:
        answer = client.get("/api/report/figures")
    assert answer.status_code == 403 and "holiday" not in answer.text


def test_no_report_is_written_into_a_tables_folder_linked_outside_the_store(tmp_path: Path) -> None:
    # the report folder itself is in the store, its tables/ a link to a project folder
    outside = tmp_path / "project"
    outside.mkdir()
    (outside / "counts.csv").write_text("gene,n\nTP53,3\n")
    store = tmp_path / "store"
    Store(store)
    (store / "artifacts" / "report" / "figures").mkdir(parents=True)
    os.symlink(outside, store / "artifacts" / "report" / "tables")
    with _client(store) as client:
        answer = client.post("/api/report", json={"projection": "none"})
        if answer.status_code < 300:  # the old code ran the job: wait for it
            for _ in range(200):
                if client.get(answer.json()["status_url"]).json()["state"] not in ("queued", "running"):
                    break
                time.sleep(0.05)
    assert answer.status_code == 403 and "artifacts/report/tables links outside the store" in answer.json()["error"]
    assert (outside / "counts.csv").read_text() == "gene,n\nTP53,3\n"
