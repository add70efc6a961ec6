"""GET /api/runs: the evaluation and prompting runs as the report's runs table lists them, and the transfer runs.

Before, the server listed no runs at all: its only view of them was POST /api/sql on eval_runs,
where a run whose process was killed reads 'running' forever (the report says 'stopped') and a
prompting run cut short by its request budget reads a bare 'partial' (the report says how to
finish it).
"""

from __future__ import annotations

import re
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
    partial = records.start_run(st, {"arm": "prompt", "heads": ["prompt-zero-shot"], "scenarios": ["pooled"]},
                                scdm_version="test")
    records.finish_run(st, partial, status="partial", seconds=1.0, n_tasks=4, n_done=2)
    lora = records.start_run(st, {"finetune": {"model": "geneformer"}}, scdm_version="test")  # as record_tasks records it
    records.finish_run(st, lora, status="complete", seconds=3.0, n_tasks=1, n_done=1)
    ids = {"killed": killed, "partial": partial, "lora": lora, **_transfer_runs(st, int(gone.stdout))}
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        yield client, st, ids


def _transfer_runs(st: Store, gone_pid: int) -> dict[str, str]:
    """A complete transfer run onto a375 and one whose process was killed."""
    import numpy as np

    from scdm.store import transfer as runs

    target = st.dataset("a375")
    for run_id in ("transfer-done", "transfer-killed"):
        runs.start_transfer_run(st, runs.TransferRunStart(
            run_id=run_id, drug="PLX4720", source_kind="bulk-csv", source={"path": "expr.csv"},
            target_dataset_id=target.dataset_id, features="expr", source_features=None, adapt=True, selection="source_val",
            config={"alpha": 1.0}, scdm_version="test", target_label_set="response_PLX4720"))
    n = target.n_cells
    runs.complete_transfer_run(st, "transfer-done", runs.TransferRunResult(
        selection="source_val", selected_epoch=3, val_score=0.6, cluster_method="kmeans", n_clusters=2, waterfall=None,
        n_source=40, n_target=n, n_features=3, config={"alpha": 1.0}, metric_flags=(), artifacts_path=None, seconds=2.04),
        runs.TransferOutputs(dataset_id=target.dataset_id, proba=np.full(n, 0.5), label=np.zeros(n, dtype=np.int8),
                             cluster=np.zeros(n, dtype=np.int64), features=["G1", "G2", "G3"], history=[], metrics=None))
    st.execute("UPDATE transfer_runs SET config = json_merge_patch(config, ?) WHERE run_id = 'transfer-killed'",
               [f'{{"process": {{"pid": {gone_pid}}}}}'])
    return {"transfer": "transfer-done", "transfer_killed": "transfer-killed"}


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
    assert complete["kind"] == "evaluate"
    assert complete["state"] == "complete" and complete["heads"] == ["ridge"] and complete["folds"] == "3"
    report = runs_table(st)
    evaluation = [r for r in answer.json() if r["kind"] != "transfer"]
    assert list(report["run_id"]) == [r["run_id"] for r in evaluation]
    assert list(report["status"]) == [r["status"] for r in evaluation]
    assert all("host" not in r and "pid" not in r for r in answer.json())  # where a run ran stays on the server


def test_runs_list_transfer_runs_too_with_their_kind(with_runs: tuple[Any, Store, dict[str, str]]) -> None:
    client, _, ids = with_runs
    answer = client.get("/api/runs").json()
    rows = {r["run_id"]: r for r in answer}
    assert rows[ids["transfer"]] | {"created_at": None, "finished_at": None} == rows[ids["transfer"]] | {
        "run_id": ids["transfer"], "kind": "transfer", "status": "complete", "state": "complete", "drug": "PLX4720",
        "target": "a375", "label_set": "response_PLX4720", "n_source": 40, "n_target": 108, "seconds": 2.0,
        "created_at": None, "finished_at": None, "heads": None, "n_tasks": None}
    assert rows[ids["transfer"]]["finished_at"] >= rows[ids["transfer"]]["created_at"]
    killed = rows[ids["transfer_killed"]]
    assert killed["state"] == "stopped" and "scdm transfer" in killed["status"] and killed["finished_at"] is None
    # every run, by what recorded it, oldest first
    assert [rows[ids[k]]["kind"] for k in ("killed", "partial", "lora")] == ["evaluate", "prompt", "finetune"]
    assert sorted(r["kind"] for r in answer) == ["evaluate", "evaluate", "finetune", "prompt", "transfer", "transfer"]
    assert [r["created_at"] for r in answer] == sorted(r["created_at"] for r in answer)
    assert all(r["finished_at"] for r in answer if r["state"] in ("complete", "partial"))


def test_the_runs_tab_lists_every_run_newest_first_with_kind_status_times_and_counts(
        with_runs: tuple[Any, Store, dict[str, str]]) -> None:
    """The page's Runs tab, rendered without a browser: the template's tab and the table its script draws
    from this store's GET /api/runs (the script's own functions, run by Node.js where it is installed)."""
    import json

    from .test_number_format import page_constant, page_functions, run_page

    client, _, ids = with_runs
    page = client.get("/", headers={"Accept": "text/html"}).text
    assert '<a data-tab="runs">Runs</a>' in page and '<section id="runs">' in page and 'id="runs-table"' in page
    script = client.get("/static/scdm.js").text
    assert "runs: () => loadRuns()" in script and 'api("/api/runs")' in script
    runs = client.get("/api/runs").json()
    prelude = (page_functions("plural", "compare", "table", "when", "runRows", "runSummary") + "\n"
               + page_constant("RUN_COLUMNS") + f"\nconst runs = {json.dumps(runs)};\n"
               + "const el = {innerHTML: '', querySelectorAll: () => []}; table(el, runRows(runs), RUN_COLUMNS);")
    html, summary, rows = run_page("[el.innerHTML, runSummary(runs), runRows(runs)]", prelude)  # type: ignore[misc]
    assert summary == "6 runs: 3 complete, 2 stopped, 1 partial"
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in reversed(runs)]  # newest first
    header = re.findall(r'<th data-k="([^"]+)"', html)
    assert header[:9] == ["kind", "state", "status", "started", "finished", "tasks", "fitted", "reused", "skipped"]
    cells = {row[-1]: row for row in (re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in html.split("<tr>")[2:])}
    partial = dict(zip(header, cells[ids["partial"]]))
    assert partial["kind"] == "prompt" and partial["state"] == "partial" and "request budget ran out" in partial["status"]
    assert (partial["tasks"], partial["fitted"]) == ("4", "2") and partial["finished"] != ""
    killed = dict(zip(header, cells[ids["transfer_killed"]]))
    assert killed["kind"] == "transfer" and killed["state"] == "stopped" and killed["finished"] == ""
    done = dict(zip(header, cells[ids["transfer"]]))
    assert (done["target"], done["n_source"], done["n_target"], done["tasks"]) == ("a375", "40", "108", "")
    started = next(r for r in runs if r["run_id"] == ids["transfer"])["created_at"]
    assert done["started"] == started.replace("T", " ")[:19]
