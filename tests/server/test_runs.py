"""GET /api/runs: the evaluation and prompting runs as the report's runs table lists them.

Before, the server listed no runs at all: its only view of them was POST /api/sql on eval_runs,
where a run whose process was killed reads 'running' forever (the report says 'stopped') and a
prompting run cut short by its request budget reads a bare 'partial' (the report says how to
finish it).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from scdm.store import Store
from scdm.store import evaluation as records

from .conftest import build_store


@pytest.fixture(scope="module")
def with_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Store, dict[str, str]]]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    root = tmp_path_factory.mktemp("runs") / "store"
    build_store(root)  # one complete evaluation run
    st = Store(root)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    killed = records.start_run(st, {"heads": ["ridge"], "scenarios": ["pooled"], "folds": 3}, scdm_version="test")
    # the process that started it was killed: it could not record failing (a pid that no longer exists)
    st.execute("UPDATE eval_runs SET config = json_merge_patch(config, ?) WHERE run_id = ?",
               [f'{{"process": {{"pid": {int(gone.stdout)}}}}}', killed])
    partial = records.start_run(st, {"heads": ["prompt-zero-shot"], "scenarios": ["pooled"]}, scdm_version="test")
    records.finish_run(st, partial, status="partial", seconds=1.0, n_tasks=4, n_done=2)
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        yield client, st, {"killed": killed, "partial": partial}


def test_runs_read_as_the_report_shows_them(with_runs: tuple[Any, Store, dict[str, str]]) -> None:
    from scdm.classify.report import runs_table

    client, st, ids = with_runs
    answer = client.get("/api/runs")
    assert answer.status_code == 200, answer.text
    rows = {r["run_id"]: r for r in answer.json()}
    assert rows[ids["killed"]]["state"] == "stopped" and rows[ids["killed"]]["status"].startswith("stopped (its process is gone")
    assert rows[ids["partial"]]["state"] == "partial" and "request budget ran out" in rows[ids["partial"]]["status"]
    assert rows[ids["partial"]]["n_tasks"] == 4 and rows[ids["partial"]]["n_done"] == 2
    (complete,) = [r for r in rows.values() if r["run_id"] not in ids.values()]
    assert complete["state"] == "complete" and complete["heads"] == ["ridge"] and complete["folds"] == "3"
    report = runs_table(st)
    assert list(report["run_id"]) == [r["run_id"] for r in answer.json()]
    assert list(report["status"]) == [r["status"] for r in answer.json()]
    assert all("host" not in r and "pid" not in r for r in answer.json())  # where a run ran stays on the server
