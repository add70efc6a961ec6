"""A server job shows what it warned of, as the ``scdm`` command doing the same work prints it.

Uploads used to be ingested, embedded and predicted without a word of the warnings ``scdm ingest``
prints (unlogged values, label confounders, ...): the job read ``done`` and the upload's user never
learnt that its dataset was ingested with values the embeddings take as they are.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdm.server.jobs import JobBoard, JobHandle
from scdm.store import Store, example_data
from scdm.store.errors import ScdmWarning
from tests.server.jobwait import finished

_log = logging.getLogger("scdm.store.test_job_warnings")


def unlogged_a375(path: Path) -> Path:
    """A375 with its values made positive and large: `scdm ingest` warns that they are not logged."""
    adata = ad.read_h5ad(example_data("A375"))
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    adata.X = (np.abs(x) * 1000).astype(np.float32)
    adata.write_h5ad(path)
    return path


def cli_stderr_lines(store: Path, file: Path, *args: str) -> list[str]:
    from click.testing import CliRunner

    from scdm.cli import main

    result = CliRunner().invoke(main, ["--store", str(store), "ingest", str(file), *args])
    assert result.exit_code == 0, result.output
    return result.stderr.splitlines()


def test_an_upload_job_shows_the_warnings_scdm_ingest_prints_in_its_words(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    file = unlogged_a375(tmp_path / "unlogged.h5ad")
    cli = cli_stderr_lines(tmp_path / "cli-store", file, "--label-key", "response_PLX4720")
    cli_warnings = [line for line in cli if line.startswith("warning: ")]
    assert any("not logged" in line for line in cli_warnings), cli

    with TestClient(create_app(Store(tmp_path / "store")), base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/api/upload?filename=unlogged.h5ad&label_key=response_PLX4720", content=file.read_bytes(),
                             headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 202, answer.text
        job = finished(client, answer.json())
        listed = {j["job_id"]: j for j in client.get("/api/jobs").json()}

    assert job["state"] == "done", job
    # every warning line the command prints, and nothing it does not print
    assert sorted(line for line in job["warnings"] if line.startswith("warning: ")) == sorted(cli_warnings)
    assert set(job["warnings"]) <= set(cli)
    assert listed[job["job_id"]]["warnings"] == job["warnings"]


def test_a_job_gets_only_its_own_warnings_while_another_runs_beside_it(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs", max_jobs=2)
    both_running = threading.Barrier(2, timeout=10)
    both_warned = threading.Barrier(2, timeout=10)

    def work(name: str) -> Any:
        def run(job: JobHandle) -> None:
            both_running.wait()
            warnings.warn(f"{name} warned", ScdmWarning, stacklevel=1)
            _log.warning("%s logged", name)
            both_warned.wait()  # neither finishes before the other has warned
        return run

    first, second = board.submit("upload", work("first")), board.submit("predict", work("second"))
    warnings.warn("outside any job", ScdmWarning, stacklevel=1)
    done = [_wait_board(board, first.job_id), _wait_board(board, second.job_id)]

    assert [j.state for j in done] == ["done", "done"]
    assert done[0].warnings == ["warning: first warned", "first logged"]
    assert done[1].warnings == ["warning: second warned", "second logged"]


def test_a_warning_is_shown_to_every_job_that_gives_it(tmp_path: Path) -> None:
    # Python shows a warning once per code line and process by default: the second upload of the day would not see it
    board = JobBoard(tmp_path / "jobs")

    def run(job: JobHandle) -> None:
        warnings.warn("the same words", ScdmWarning, stacklevel=1)
        warnings.warn("the same words", ScdmWarning, stacklevel=1)

    jobs = [_wait_board(board, board.submit("predict", run).job_id) for _ in range(2)]
    assert [j.warnings for j in jobs] == [["warning: the same words"], ["warning: the same words"]]


def test_a_failed_job_keeps_the_warnings_it_gave_before_failing(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs")

    def run(job: JobHandle) -> None:
        warnings.warn("before the failure", ScdmWarning, stacklevel=1)
        raise ValueError("the failure")

    job = _wait_board(board, board.submit("predict", run).job_id)
    assert (job.state, job.message, job.warnings) == ("failed", "ValueError: the failure", ["warning: before the failure"])


def _wait_board(board: JobBoard, job_id: str) -> Any:
    deadline = time.monotonic() + 30
    while (record := board.get(job_id)).active and time.monotonic() < deadline:
        time.sleep(0.02)
    return record


# ---- jobs beside a block of scdm's code that silences or collects warnings -------------------
# ``warnings.catch_warnings`` swaps the process-wide filters and showwarning (Python 3.11): while one
# job's thread was inside such a block, a warning of the job running beside it was ignored (metrics,
# splits) or recorded into the other job's list (the logreg fit), and that job read done without it.
def _pause_first(owner: Any, name: str, inside: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """``owner.name`` (a function or method) calls ``inside`` first: the job stops there, within scdm's block."""
    real = getattr(owner, name)

    def paused(*args: Any, **kwargs: Any) -> Any:
        inside()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, paused)


def _logreg_block(inside: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    from sklearn.linear_model import LogisticRegression

    from scdm.classify.heads import LogRegHead

    _pause_first(LogisticRegression, "fit", inside, monkeypatch)
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.array([0, 1] * 10)
    return lambda: LogRegHead().fit(X, y) and None


def _splits_block(inside: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    import pandas as pd
    from sklearn.model_selection import StratifiedGroupKFold

    from scdm.store import splits

    _pause_first(StratifiedGroupKFold, "split", inside, monkeypatch)
    cells = pd.DataFrame({"study": ["s"] * 12, "sample": [f"p{i % 6}" for i in range(12)], "response": [0, 1] * 6})
    return lambda: splits._sample_folds(cells, 3, 0) and None  # the grouped folds of split_scheme='sample'


@pytest.mark.parametrize("block", [_logreg_block, _splits_block], ids=["logreg", "splits"])
def test_a_job_keeps_its_warnings_while_the_job_beside_it_is_inside_a_quiet_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: Callable[..., Callable[[], None]]) -> None:
    board = JobBoard(tmp_path / "jobs", max_jobs=2)
    both_running = threading.Barrier(2, timeout=10)
    inside, warned = threading.Event(), threading.Event()

    def pause_inside() -> None:  # called inside the block, in the first job's thread only
        if not inside.is_set():
            inside.set()
            assert warned.wait(10), "the second job never warned"

    quiet = block(pause_inside, monkeypatch)

    def first(job: JobHandle) -> None:
        both_running.wait()
        quiet()

    def second(job: JobHandle) -> None:
        both_running.wait()
        assert inside.wait(10), "the first job never entered its block"
        warnings.warn("second warned", ScdmWarning, stacklevel=1)
        warned.set()

    ids = [board.submit("report", first).job_id, board.submit("predict", second).job_id]
    done = [_wait_board(board, job_id) for job_id in ids]
    assert [j.state for j in done] == ["done", "done"], [j.message for j in done]
    assert done[1].warnings == ["warning: second warned"]
    assert done[0].warnings == []


def test_a_job_gets_the_warnings_given_in_the_threads_its_work_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.classify import _threads

    monkeypatch.setattr(_threads, "cpu_budget", lambda: 2)  # map_solves runs its items in a pool of two threads
    board = JobBoard(tmp_path / "jobs")

    def solve(i: int) -> str:
        warnings.warn(f"solve {i} warned", ScdmWarning, stacklevel=1)
        _log.warning("solve %d logged", i)
        return threading.current_thread().name

    names: list[str] = []
    job = _wait_board(board, board.submit("report", lambda job: names.extend(_threads.map_solves(solve, range(2)))).job_id)
    assert job.state == "done", job.message
    assert all(name.startswith("scdm-solve") for name in names), names
    assert sorted(job.warnings) == ["solve 0 logged", "solve 1 logged", "warning: solve 0 warned", "warning: solve 1 warned"]
